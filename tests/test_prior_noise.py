"""Prior noise in every scheduler's units, off where it is not defined, never silently ignored."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler, StableDiffusionInpaintPipeline

import fxprop
from conftest import assert_differs, decoder_attn_unet, make_scheduler, sd_pipeline
from test_workflows import run


def _relative_change(scheduler) -> float:
    """How much default prior noise changes an every-key-step generation, relative to plain."""
    pipe = sd_pipeline(unet=decoder_attn_unet())
    pipe.scheduler = scheduler
    plain = run(type(pipe)(**pipe.components), num_inference_steps=10)
    out = run(fxprop.accelerate(pipe, key_steps=1), num_inference_steps=10)
    return ((out - plain).norm() / plain.norm()).item()


def test_injection_is_the_same_size_in_sigma_units_as_in_ddim():
    """Euler holds the DDIM latent divided by sqrt(alpha_bar) and z_T times init_noise_sigma:
    in its units the same injection changes the image about as much as in DDIM's (before, z_T
    was added as is: 1.7% against DDIM's 0.3%)."""
    ddim, euler = (_relative_change(make_scheduler(name)) for name in ("ddim", "euler"))
    assert 0 < ddim < 0.02 and 0 < euler
    assert 1 / 3 < euler / ddim < 3, (euler, ddim)


def test_the_sigma_unit_injection_follows_the_documented_rule():
    """Before every step with t < T/2: + w * z_T / init_noise_sigma * sqrt(1 + sigma^2)."""
    pipe = sd_pipeline(unet=decoder_attn_unet())
    pipe.scheduler = make_scheduler("euler")
    z = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(9))

    def inject(p, i, t, kwargs):
        s = p.scheduler
        if i + 1 < len(s.timesteps) and s.timesteps[i + 1] < 500:
            sigma = float(s.sigmas[i + 1])
            return {"latents": kwargs["latents"] + 0.01 * z * math.sqrt(1 + sigma ** 2)}
        return {}

    plain = type(pipe)(**pipe.components)
    size = dict(latents=z, height=16, width=16)  # the pipeline scales z by init_noise_sigma
    reference = run(plain, callback_on_step_end=inject, **size)
    fxprop.accelerate(pipe, key_steps=1, prior_noise=0.01)
    out = run(pipe, **size)
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-5)
    assert_differs(out, run(plain, **size), 1e-4, "with and without prior noise")


def test_edm_schedulers_have_no_prior_noise():
    edm = EDMDPMSolverMultistepScheduler()
    assert _relative_change(edm) == 0  # the default is off: every key step equals plain
    pipe = sd_pipeline(unet=decoder_attn_unet())
    pipe.scheduler = edm
    with pytest.raises(ValueError, match="EDMDPMSolverMultistepScheduler has none; pass "
                                         "prior_noise=0"):
        fxprop.accelerate(pipe, prior_noise=0.003)
    pipe.scheduler = make_scheduler("ddim")
    fxprop.accelerate(pipe, prior_noise=0.003)
    pipe.scheduler = edm  # swapped after accelerate(): refused at the call
    with pytest.raises(ValueError, match="EDMDPMSolverMultistepScheduler has none"):
        run(pipe)


def test_inpainting_applies_an_explicit_prior_noise():
    """Its prepare_latents returns a tuple: the latents (first item) get the injection."""
    pipe = sd_pipeline(StableDiffusionInpaintPipeline, unet=decoder_attn_unet())
    g = torch.Generator().manual_seed(2)
    image, mask = torch.rand(1, 3, 16, 16, generator=g), torch.rand(1, 1, 16, 16, generator=g)
    outs = {}
    for weight in (0, 0.01):
        fxprop.accelerate(pipe, key_steps=1, prior_noise=weight)
        outs[weight] = run(pipe, image=image, mask_image=mask, strength=1.0,
                           num_inference_steps=6)
    assert_differs(outs[0.01], outs[0], 1e-4, "with and without prior noise")
