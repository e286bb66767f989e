"""Stock diffusers pipelines: with every step a key step fxprop equals plain sampling."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline

import fxprop
from conftest import (DECODER_ATTN, assert_differs, controlnet_pipeline, ddpm_pipeline,
                      decoder_attn_unet, make_scheduler, scheduler_params, sd_pipeline,
                      sdxl_embeds, sdxl_pipeline, sdxl_unet, text_embeds)

STEPS = 6


def _latents(shape, seed=5):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# name -> (pipeline factory, call kwargs). SD with CFG has cross-attention at every level (the
# skips read the conditioning); the others have it in the decoder only, which captures in a
# third of the time (their pipelines' own features do not depend on where the attention is).
CASES = {
    "sd-cfg": (sd_pipeline, lambda: dict(**text_embeds(1), guidance_scale=5.0, height=16,
                                         width=16)),
    "sd-nocfg-batch": (lambda: sd_pipeline(unet=decoder_attn_unet()),
                       lambda: dict(**text_embeds(2), guidance_scale=1.0,
                                    num_images_per_prompt=2, height=16, width=16)),
    "img2img": (lambda: sd_pipeline(StableDiffusionImg2ImgPipeline, unet=decoder_attn_unet()),
                lambda: dict(**text_embeds(1), image=_latents((1, 4, 8, 8)), strength=0.7,
                             guidance_scale=4.0)),
    "sdxl": (lambda: sdxl_pipeline(sdxl_unet(**DECODER_ATTN)),
             lambda: dict(**sdxl_embeds(1), guidance_scale=5.0, height=16, width=16)),
    "controlnet": (lambda: controlnet_pipeline(decoder_attn_unet()),
                   lambda: dict(**text_embeds(1), image=_latents((1, 3, 16, 16)).clamp(-1, 1),
                                guidance_scale=5.0, height=16, width=16)),
}


def _run(pipe, kwargs, scheduler=None, seed=0):
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler)
    out = pipe(**kwargs, num_inference_steps=STEPS, output_type="latent",
               generator=torch.Generator().manual_seed(seed))
    return out.images


class Plain:
    """The plain pipeline of a case and its outputs per scheduler, computed once: both reuse
    modes compare against them."""

    def __init__(self, case: str) -> None:
        factory, self.kwargs = CASES[case]
        self.pipe, self.outputs = factory(), {}

    def output(self, scheduler: str) -> torch.Tensor:
        if scheduler not in self.outputs:
            self.outputs[scheduler] = _run(self.pipe, self.kwargs(), scheduler)
        return self.outputs[scheduler]


@pytest.fixture(scope="module", params=sorted(CASES))
def plain(request):
    return Plain(request.param)


@pytest.fixture(scope="module", params=["encoder", "deep"])
def pair(plain, request):
    """A plain pipeline and an accelerated one sharing the same components."""
    accelerated = type(plain.pipe)(**plain.pipe.components)
    fxprop.accelerate(accelerated, key_steps=1, prior_noise=0, reuse=request.param)
    return plain, accelerated, plain.kwargs


@pytest.mark.parametrize("scheduler", scheduler_params())
def test_every_step_key_equals_plain(pair, scheduler):
    plain, accelerated, kwargs = pair
    reference = plain.output(scheduler)
    candidate = _run(accelerated, kwargs(), scheduler)
    assert candidate.shape == reference.shape
    torch.testing.assert_close(candidate, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_ddpm_pipeline_every_step_key_equals_plain(scheduler):
    from diffusers import DDIMScheduler, DDPMScheduler
    plain = ddpm_pipeline()
    plain.scheduler = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[scheduler]()
    accelerated = type(plain)(**plain.components)
    fxprop.accelerate(accelerated, key_steps=1, prior_noise=0)
    outs = [p(batch_size=2, num_inference_steps=STEPS, output_type="np",
              generator=torch.Generator().manual_seed(0)).images for p in (plain, accelerated)]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheduler", scheduler_params(["ddim", "euler_a", "dpm++", "heun"]))
def test_sparse_key_steps_follow_the_plan(pair, scheduler):
    """Sparse key steps run without falling back to the whole UNet (a fallback warning is an
    error in this suite) and really reuse features."""
    plain, accelerated, kwargs = pair
    reuse = fxprop.runtime_of(accelerated).policy.reuse
    fxprop.accelerate(accelerated, key_steps=[0, 2, 3], prior_noise=0, reuse=reuse)
    try:
        candidate = _run(accelerated, kwargs(), scheduler)
    finally:
        fxprop.accelerate(accelerated, key_steps=1, prior_noise=0, reuse=reuse)
    assert torch.isfinite(candidate).all()
    assert_differs(candidate, plain.output(scheduler), 1e-4, "sparse and plain")
