"""UNets and pipelines with random weights that the benchmarks time (nothing downloads)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)

SD15_WIDTHS = (320, 640, 1280, 1280)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def sd15_unet(scale: float = 0.25, seed: int = 0) -> UNet2DConditionModel:
    """diffusers' SD-1.5 UNet config (its defaults) with every block width scaled by ``scale``."""
    widths = tuple(max(8, int(w * scale)) for w in SD15_WIDTHS)
    groups = max(g for g in range(1, 33) if all(w % g == 0 for w in widths))
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=32, block_out_channels=widths, norm_num_groups=groups,
                                attention_head_dim=8, cross_attention_dim=768).eval()


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    """The tests' tiny SD-style UNet (2 levels, widths 16/32, text dim 32)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=4,
        cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


@dataclass(frozen=True)
class Workload:
    name: str
    make_unet: Callable[[], UNet2DConditionModel]
    size: int       # latent side
    tokens: int     # text tokens


WORKLOADS = {"tiny": Workload("tiny UNet", tiny_unet, 8, 5),
             "sd15": Workload("SD-1.5-arch x0.25", sd15_unet, 32, 77)}


def pipeline(unet: UNet2DConditionModel) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline around ``unet`` with DDIM (SD's betas); no text encoder."""
    vae = AutoencoderKL(block_out_channels=(8,) * 4, norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)  # only its scale factor is used
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generation(pipe: Any, workload: Workload, steps: int) -> Callable[[], torch.Tensor]:
    """One CFG generation (UNet batch 2) of the workload's latent, as a zero-argument function."""
    g = torch.Generator().manual_seed(0)
    dim = pipe.unet.config.cross_attention_dim
    embeds = {"prompt_embeds": torch.randn(1, workload.tokens, dim, generator=g),
              "negative_prompt_embeds": torch.randn(1, workload.tokens, dim, generator=g)}
    size = pipe.vae_scale_factor * workload.size

    def run() -> torch.Tensor:
        with torch.no_grad():
            return pipe(**embeds, height=size, width=size, num_inference_steps=steps,
                        guidance_scale=7.5, output_type="latent",
                        generator=torch.Generator().manual_seed(1)).images

    return run
