"""Tiny models and pipelines built from configs with random weights (nothing downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import (AutoencoderKL, ControlNetModel, DDIMScheduler, DDPMPipeline,
                       DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, LCMScheduler, PNDMScheduler,
                       StableDiffusionControlNetPipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel, UNet2DModel,
                       UniPCMultistepScheduler)

torch.set_num_threads(1)  # tiny models: threads cost more than they bring

SCHEDULERS = {
    "ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler, "dpm++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler, "lcm": LCMScheduler, "heun": HeunDiscreteScheduler,
}
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                    beta_schedule="scaled_linear")
TEXT_DIM = 32


def make_scheduler(name: str):
    extra = {"skip_prk_steps": True} if name == "pndm" else {}
    return SCHEDULERS[name](**SD_SCHEDULER, **extra)


def sd_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    config = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=4,
                  cross_attention_dim=TEXT_DIM,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    return sd_unet(seed, addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=8 * 6 + TEXT_DIM,
                   transformer_layers_per_block=(1, 2))


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(16, 16), latent_channels=4, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2).eval()


def text_embeds(batch: int = 1, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(batch, 5, TEXT_DIM, generator=g),
            "negative_prompt_embeds": torch.randn(batch, 5, TEXT_DIM, generator=g)}


def sd_pipeline(cls=StableDiffusionPipeline, unet=None, **extra):
    return cls(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet or sd_unet(),
               scheduler=make_scheduler("ddim"), safety_checker=None, feature_extractor=None,
               requires_safety_checker=False, **extra)


def controlnet_pipeline():
    torch.manual_seed(2)
    controlnet = ControlNetModel(in_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                                 norm_num_groups=8, attention_head_dim=4,
                                 cross_attention_dim=TEXT_DIM,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 conditioning_embedding_out_channels=(8, 16)).eval()
    return sd_pipeline(StableDiffusionControlNetPipeline, controlnet=controlnet)


def sdxl_pipeline():
    return StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=None, text_encoder_2=None,
                                     tokenizer=None, tokenizer_2=None, unet=sdxl_unet(),
                                     scheduler=make_scheduler("ddim"))


def sdxl_embeds(batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(3)
    return {**text_embeds(batch), "pooled_prompt_embeds": torch.randn(batch, TEXT_DIM, generator=g),
            "negative_pooled_prompt_embeds": torch.randn(batch, TEXT_DIM, generator=g)}


def ddpm_pipeline():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)
