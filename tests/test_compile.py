"""compile=: every part compiles whole (no graph break), once per shape, and equals eager.

Dynamo is exercised with the ``aot_eager`` backend (it traces and partitions exactly as for
inductor, without generating C++), and one generation is compiled with inductor for real.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import fxprop
from conftest import QUICK_BUILD, decoder_attn_unet, loop_inputs, one_level_unet, run_loop

KEYS = [0, 2, 3]            # LOOP_TIMESTEPS' segments [0 1] [2] [3 4 5]: chunks of 2, 1 and 3
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def unet():
    return decoder_attn_unet()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _loop(runtime, seed: int = 0) -> torch.Tensor:
    return run_loop(runtime, *loop_inputs(seed))


def _graphs() -> int:
    """Graphs dynamo has compiled since the last reset (each recompilation adds one)."""
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("parallel, expected_graphs", [
    (False, 2),   # full (key steps) and step (the others), both at batch 2
    pytest.param(True, 4, marks=pytest.mark.slow),  # full (segment of 1), key, and step at
                                                    # batch 2 x 2 and 2 x 3
])
def test_parts_compile_whole_once_per_shape_and_equal_eager(unet, parallel, expected_graphs):
    eager = fxprop.accelerate(unet, key_steps=KEYS, parallel=parallel)
    compiled = fxprop.accelerate(unet, key_steps=KEYS, parallel=parallel,
                                 compile={"backend": "aot_eager"})
    reference = _loop(eager)
    first = _loop(compiled)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert _graphs() == expected_graphs  # not one per step: timesteps are graph inputs
    torch.testing.assert_close(first, reference, rtol=0, atol=TOLERANCE)
    second = _loop(compiled, seed=1)  # a new generation of the same shapes
    assert _graphs() == expected_graphs
    torch.testing.assert_close(second, _loop(eager, seed=1), rtol=0, atol=TOLERANCE)


@pytest.mark.slow
def test_inductor_generation_equals_eager():
    """One real compile with inductor's C++ backend, of the smallest UNet with scalar kernels
    (cold cache: 83 s on 2 cores with the two-level UNet and vector kernels)."""
    unet = one_level_unet()
    eager = fxprop.accelerate(unet, key_steps=[0, 3])
    compiled = fxprop.accelerate(unet, key_steps=[0, 3], compile=True)
    with torch._inductor.config.patch(QUICK_BUILD):
        candidate = _loop(compiled)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(candidate, _loop(eager), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("value, error", [
    ({"fullgraph": False}, ValueError), ({"mode": "fast", "bogus": 1}, ValueError),
    ({"mode": "fast"}, ValueError), ({"mode": "reduce-overhead"}, ValueError),
    ({"backend": "inductr"}, ValueError),
    ({"mode": "default", "options": {"freezing": True}}, ValueError), ("yes", TypeError),
])
def test_bad_compile_options_are_rejected_at_accelerate(unet, value, error):
    with pytest.raises(error, match="compile"):
        fxprop.accelerate(unet, compile=value)
