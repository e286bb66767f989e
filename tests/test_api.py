"""accelerate / restore on pipelines: errors, restore, prior noise, ControlNet gating."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import fxprop
from conftest import (assert_differs, controlnet_pipeline, ddpm_pipeline, decoder_attn_unet,
                      sd_pipeline, sd_unet, text_embeds)

CALL = dict(guidance_scale=5.0, height=16, width=16, num_inference_steps=8, output_type="latent")


def _run(pipe, seed=0, **extra):
    return pipe(**text_embeds(1), **CALL, generator=torch.Generator().manual_seed(seed),
                **extra).images


def test_bad_targets_and_options():
    unet = sd_unet()  # each refusal leaves it as it was: one UNet serves them all
    with pytest.raises(TypeError, match="got str"):
        fxprop.accelerate("unet")
    with pytest.raises(ValueError, match="unknown reuse 'decoder'"):
        fxprop.accelerate(unet, reuse="decoder")
    for bad in (-1, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match=f"prior_noise must be a finite number >= 0, got "
                                             f"{re.escape(repr(bad))}"):
            fxprop.accelerate(unet, prior_noise=bad)
    with pytest.raises(ValueError, match="max_batch bounds"):
        fxprop.accelerate(unet, max_batch=4)
    assert fxprop.runtime.intercept.intercepted(unet) is None


def test_unknown_regions_name_what_was_looked_for():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
    with pytest.raises(ValueError, match=r"Net: it looked for .*down_blocks.*input_blocks.*"
                                         r"found \['dec', 'enc'\]"):
        fxprop.accelerate(Net())


def test_restore_is_bit_for_bit_and_untouched_restore_raises():
    pipe = sd_pipeline()
    original_unet, original_class = pipe.unet, type(pipe)
    with pytest.raises(ValueError, match="was not accelerated"):
        fxprop.restore(pipe)
    plain = _run(pipe)
    fxprop.accelerate(pipe, key_steps="faster-diffusion")
    assert isinstance(pipe, original_class) and pipe.unet is original_unet
    assert type(pipe).__name__ == original_class.__name__  # what save_pretrained writes
    fxprop.accelerate(pipe, key_steps=[0, 4])  # again: re-plans cleanly
    accelerated = _run(pipe)
    assert fxprop.restore(pipe) is pipe
    assert type(pipe) is original_class and pipe.unet is original_unet
    assert "forward" not in vars(pipe.unet) or not fxprop.runtime.intercept.intercepted(pipe.unet)
    assert torch.equal(_run(pipe), plain)
    assert not torch.equal(accelerated, plain)  # a sparse plan really reuses features
    with pytest.raises(ValueError, match="was not accelerated"):
        fxprop.restore(pipe)


def test_prior_noise_injection_matches_a_hand_written_callback():
    """Before every step with t < 500 the latent gets + 0.003 * z_T (every step a key step)."""
    pipe = sd_pipeline()
    shape = (1, 4, 8, 8)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    seen = []

    def inject(p, i, t, kwargs):
        timesteps = p.scheduler.timesteps
        if i + 1 < len(timesteps) and timesteps[i + 1] < 500:
            return {"latents": kwargs["latents"] + 0.003 * z * p.scheduler.init_noise_sigma}
        return {}

    reference = _run(pipe, latents=z, callback_on_step_end=inject)
    fxprop.accelerate(pipe, key_steps=1, prior_noise=0.003)
    record = lambda p, i, t, kwargs: seen.append(i) or {}  # the user's callback still runs
    out = _run(pipe, latents=z, callback_on_step_end=record)
    assert seen == list(range(CALL["num_inference_steps"]))
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    without = fxprop.accelerate(pipe, key_steps=1, prior_noise=0)
    assert_differs(_run(without, latents=z), reference, 1e-4, "without prior noise")


def test_prior_noise_needs_callbacks():
    with pytest.raises(ValueError, match="DDPMPipeline.*pass prior_noise=0"):
        fxprop.accelerate(ddpm_pipeline(), prior_noise=0.003)
    with pytest.warns(UserWarning, match="running without it"):
        fxprop.accelerate(ddpm_pipeline())


def test_interrupted_generation_leaves_nothing_behind():
    pipe = fxprop.accelerate(sd_pipeline(), key_steps=[0, 3])

    def stop(p, i, t, kwargs):
        if i == 4:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        _run(pipe, callback_on_step_end=stop)
    assert fxprop.runtime_of(pipe).plan is None  # the call's state went with the call
    fresh = fxprop.accelerate(sd_pipeline(), key_steps=[0, 3])
    assert torch.equal(_run(pipe), _run(fresh))


def test_controlnet_runs_at_key_steps_only():
    pipe = controlnet_pipeline(decoder_attn_unet())
    calls = []
    pipe.controlnet.conv_in.register_forward_hook(lambda m, a, o: calls.append(1))  # real work
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    fxprop.accelerate(pipe, key_steps=[0, 2, 5], prior_noise=0)
    _run(pipe, image=image)
    assert len(calls) == 3
    fxprop.restore(pipe)
    calls.clear()
    _run(pipe, image=image)
    assert len(calls) == CALL["num_inference_steps"]
