"""compile=: every part compiles whole (no graph break), once per shape, and equals eager.

Dynamo is exercised with the ``aot_eager`` backend (it traces and partitions exactly as for
inductor, without generating C++), and one generation is compiled with inductor for real.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import fxprop
from conftest import sd_unet

TIMESTEPS = torch.tensor([999, 799, 599, 399, 199, 99])
KEYS = [0, 2, 3]            # segments [0 1] [2] [3 4 5]: chunk lengths 2, 1 and 3
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def unet():
    return sd_unet(down_block_types=("DownBlock2D", "DownBlock2D"),
                   mid_block_type="UNetMidBlock2D",
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _loop(runtime, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(TIMESTEPS), 2, 4, 8, 8, generator=g)
    embeds = torch.randn(2, 5, 32, generator=g)
    runtime.set_timesteps(TIMESTEPS)
    with torch.no_grad():
        return torch.stack([runtime(latents[i], t, encoder_hidden_states=embeds).sample
                            for i, t in enumerate(TIMESTEPS)])


def _graphs() -> int:
    """Graphs dynamo has compiled since the last reset (each recompilation adds one)."""
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("parallel, expected_graphs", [
    (False, 2),   # full (key steps) and step (the others), both at batch 2
    (True, 4),    # full (segment of 1), key, and step at batch 2 x 2 and 2 x 3
])
def test_parts_compile_whole_once_per_shape_and_equal_eager(unet, parallel, expected_graphs):
    eager = fxprop.accelerate(unet, key_steps=KEYS, parallel=parallel)
    compiled = fxprop.accelerate(unet, key_steps=KEYS, parallel=parallel,
                                 compile={"backend": "aot_eager"})
    reference = _loop(eager)
    first = _loop(compiled)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert _graphs() == expected_graphs  # not one per step: timesteps are graph inputs
    assert (first - reference).abs().max().item() <= TOLERANCE
    second = _loop(compiled, seed=1)  # a new generation of the same shapes
    assert _graphs() == expected_graphs
    assert (second - _loop(eager, seed=1)).abs().max().item() <= TOLERANCE


def test_inductor_generation_equals_eager(unet):
    """One real compile with inductor's C++ backend (about a minute on 2 cores)."""
    eager = fxprop.accelerate(unet, key_steps=[0, 3])
    compiled = fxprop.accelerate(unet, key_steps=[0, 3], compile=True)
    candidate = _loop(compiled)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert (candidate - _loop(eager)).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("value, error", [
    ({"fullgraph": False}, ValueError), ({"mode": "fast", "bogus": 1}, ValueError),
    ({"mode": "fast"}, ValueError), ({"mode": "reduce-overhead"}, ValueError),
    ({"backend": "inductr"}, ValueError),
    ({"mode": "default", "options": {"freezing": True}}, ValueError), ("yes", TypeError),
])
def test_bad_compile_options_are_rejected_at_accelerate(unet, value, error):
    with pytest.raises(error, match="compile"):
        fxprop.accelerate(unet, compile=value)
