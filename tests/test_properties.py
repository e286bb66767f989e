"""Property tests: over random small UNet configs, the encoder split composes to the whole UNet
and a generation with every step a key step equals plain sampling (both within 1e-5); the
structural fallback's cut of the same graph composes too.

Each example costs one torch.export capture, so examples are few, tiny and derandomized (the
same configs every run: a stable time budget on busy machines).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxprop.graph.cuts import structural_cut
from fxprop.graph.split import check_split, split
from fxprop.graph.capture import flatten_call
from test_models import TIMESTEPS, Model, check_model

SETTINGS = settings(max_examples=4, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
CONTEXT = 16


@st.composite
def levels(draw):
    """(channels per level, layers per block, norm groups, sample size)."""
    n = draw(st.integers(2, 4))
    channels = tuple(sorted(draw(st.lists(st.sampled_from([8, 16]), min_size=n, max_size=n))))
    layers = draw(st.integers(1, 6 // n))  # at most 6 blocks a side: a capture of a few seconds
    return channels, layers, draw(st.sampled_from([4, 8])), draw(st.sampled_from([8, 16]))


@st.composite
def cond_configs(draw):
    channels, layers, groups, size = draw(levels())
    attention = draw(st.lists(st.booleans(), min_size=len(channels), max_size=len(channels)))
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attention[::-1])
    mid = draw(st.sampled_from(["UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None]))
    return dict(sample_size=size, block_out_channels=channels, layers_per_block=layers,
                norm_num_groups=groups, down_block_types=down, up_block_types=up,
                mid_block_type=mid, attention_head_dim=draw(st.sampled_from([2, 4])),
                use_linear_projection=draw(st.booleans()), cross_attention_dim=CONTEXT)


@st.composite
def plain_configs(draw):
    channels, layers, groups, size = draw(levels())
    kinds = st.sampled_from(["", "Attn", "Resnet"])
    types = [draw(kinds) for _ in channels]
    down = tuple("ResnetDownsampleBlock2D" if t == "Resnet" else f"{t}DownBlock2D" for t in types)
    up = tuple("ResnetUpsampleBlock2D" if t == "Resnet" else f"{t}UpBlock2D" for t in types[::-1])
    return dict(sample_size=size, in_channels=3, out_channels=3, block_out_channels=channels,
                layers_per_block=layers, norm_num_groups=groups, down_block_types=down,
                up_block_types=up, attention_head_dim=4, add_attention=draw(st.booleans()),
                resnet_time_scale_shift=draw(st.sampled_from(["default", "scale_shift"])),
                time_embedding_type=draw(st.sampled_from(["positional", "fourier"])))


def _build(cls, config):
    torch.manual_seed(0)
    return lambda: cls(**config).eval()


def _check(model: Model) -> None:
    """The named cut composes and generates exactly; so does the structural fallback's."""
    unet = model.build()
    check = check_model(model, unet)
    torch.testing.assert_close(check.split_error, 0.0, rtol=0, atol=1e-5)
    torch.testing.assert_close(check.generation_error, 0.0, rtol=0, atol=1e-5)
    x, args, kwargs = model.call()
    tensors = flatten_call(unet.forward, (x, TIMESTEPS[0], *args), kwargs).tensors
    parts = split(check.captured, structural_cut(check.captured))
    assert 0 not in parts.step_inputs
    torch.testing.assert_close(check_split(parts, check.captured, tensors), 0.0, rtol=0, atol=1e-5)


@pytest.mark.slow
@SETTINGS
@given(cond_configs())
def test_unet2d_condition_splits_and_equals_plain(config):
    size = config["sample_size"]
    context = torch.randn(2, 3, CONTEXT, generator=torch.Generator().manual_seed(1))
    model = Model(_build(UNet2DConditionModel, config), (2, 4, size, size), lambda: (context,))
    _check(model)


@pytest.mark.slow
@SETTINGS
@given(plain_configs())
def test_unet2d_splits_and_equals_plain(config):
    size = config["sample_size"]
    model = Model(_build(UNet2DModel, config), (2, 3, size, size))
    _check(model)
