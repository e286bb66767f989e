"""AcceleratedUNet on a bare UNet in a hand-written sampling loop."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

import fxprop
from conftest import assert_differs, decoder_attn_unet, sd_unet
from reference import decode, encode

KEYS = [0, 2, 3]


@pytest.fixture(scope="module")
def unet():
    return sd_unet(seed=3)  # not changed by the tests that share it


@pytest.fixture(scope="module")
def shared(unet):
    """A runtime whose captured graphs the tests share through ``with_policy`` (a capture of
    the tiny UNet costs seconds; the graph does not depend on the key steps)."""
    return fxprop.accelerate(unet, key_steps=1)


def _with_keys(runtime, key_steps, **options):
    """``runtime``'s UNet and captured graphs with other key steps."""
    return runtime.with_policy(fxprop.EncoderPropagation(key_steps=key_steps, **options))


def _inputs(batch=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, size, size, generator=g), torch.randn(batch, 5, 32, generator=g)


@torch.no_grad()
def test_reference_composes_to_the_unet(unet):
    x, context = _inputs()
    whole = unet(x, 500, context).sample
    torch.testing.assert_close(decode(unet, *encode(unet, x, 500, context), 500, context), whole,
                               rtol=0, atol=1e-5)


@torch.no_grad()
def test_non_key_steps_equal_the_eager_reference(unet, shared):
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(6)
    acc = _with_keys(shared, KEYS)
    acc.set_timesteps(scheduler.timesteps)
    x, context = _inputs()
    cached = None
    for i, t in enumerate(scheduler.timesteps):
        x = x + 0.1 * i  # a different latent every step: non-key steps must not read it
        out = acc(x, t, context).sample
        if i in KEYS:
            cached = encode(unet, x, t, context)
            reference = unet(x, t, context).sample
        else:
            reference = decode(unet, *cached, t, context)
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-5, msg=lambda m: f"step {i}: {m}")


@torch.no_grad()
def test_new_resolution_and_batch_get_their_own_graph(unet):
    acc = fxprop.accelerate(unet, key_steps=1)
    for batch, size in [(2, 8), (1, 16), (2, 8)]:
        acc.set_timesteps(torch.tensor([900, 500]))
        x, context = _inputs(batch, size)
        for t in (900, 500):
            torch.testing.assert_close(acc(x, t, context).sample, unet(x, t, context).sample,
                                       rtol=0, atol=1e-5)
    assert acc.captures == 2


@torch.no_grad()
def test_off_plan_call_runs_the_whole_unet_and_warns_once(unet, shared):
    acc = _with_keys(shared, [0])
    acc.set_timesteps(torch.tensor([900, 500, 100]))
    x, context = _inputs()
    acc(x, 900, context)
    with pytest.warns(UserWarning, match="does not match the plan") as record:
        out = acc(x, 123, context).sample  # not the planned timestep
        later = acc(x, 100, context).sample  # stays off plan: never reuses stale features
    assert len(record) == 1
    torch.testing.assert_close(out, unet(x, 123, context).sample, rtol=0, atol=1e-6)
    torch.testing.assert_close(later, unet(x, 100, context).sample, rtol=0, atol=1e-6)


@torch.no_grad()
def test_without_a_plan_it_warns_and_runs_whole(unet):
    acc = fxprop.accelerate(unet, key_steps=2)
    x, context = _inputs()
    with pytest.warns(UserWarning, match="set_timesteps"):
        out = acc(x, 10, context)
    torch.testing.assert_close(out.sample, unet(x, 10, context).sample, rtol=0, atol=1e-6)


def test_return_types_match_the_unet(unet, shared):
    acc = shared
    acc.set_timesteps(torch.tensor([900, 800]))
    x, context = _inputs()
    with torch.no_grad():
        assert type(acc(x, 900, context)) is type(unet(x, 900, context))
        assert isinstance(acc(x, 800, context, return_dict=False), tuple)
    assert acc.config is unet.config and acc.dtype == unet.dtype


def test_changing_the_unet_through_the_runtime_drops_its_stale_graphs():
    """FreeU's factors are Python attributes baked into a captured graph: enabling it through
    the runtime must recapture, not keep running the graph captured without it (a fresh
    UNet, as FreeU changes it; cross-attention in its decoder only: cheaper captures)."""
    unet = decoder_attn_unet(seed=3)
    acc = fxprop.accelerate(unet, key_steps=1, prior_noise=0)
    x, t, e = torch.randn(2, 4, 8, 8), torch.tensor(500), torch.randn(2, 5, 32)
    with torch.no_grad():
        acc.set_timesteps(torch.tensor([500]))
        before = acc(x, t, encoder_hidden_states=e).sample
        acc.enable_freeu(s1=0.9, s2=0.2, b1=1.4, b2=1.6)
        acc.set_timesteps(torch.tensor([500]))
        after = acc(x, t, encoder_hidden_states=e).sample
        expected = unet(x, t, encoder_hidden_states=e).sample
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-5)
    assert_differs(after, before, 1e-3, "with and without FreeU")


def test_each_generation_warns_again_when_it_leaves_the_plan(shared):
    acc = _with_keys(shared, 2)
    x, e = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    with torch.no_grad():
        for _ in range(2):
            acc.set_timesteps(torch.tensor([900, 500]))
            acc(x, torch.tensor(900), encoder_hidden_states=e)
            with pytest.warns(UserWarning, match="does not match the plan"):
                acc(x, torch.tensor(7), encoder_hidden_states=e)


def test_timesteps_cast_to_a_lower_precision_still_follow_the_plan(shared):
    """A loop passing ``t.to(torch.bfloat16)`` (999 -> 1000) matches its planned step."""
    acc = _with_keys(shared, [0], prior_noise=0)
    timesteps = torch.tensor([999.0, 500.5])
    x, e = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    acc.set_timesteps(timesteps)
    with torch.no_grad():  # an off-plan warning would be an error in this suite
        for t in timesteps:
            acc(x, t.to(torch.bfloat16), encoder_hidden_states=e)
    assert acc.step == 2 and not acc.off_plan
