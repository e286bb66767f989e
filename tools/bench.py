"""Benchmark fxprop against plain sampling, side by side in one run (not a test).

    python tools/bench.py                      # SD-1.5-architecture UNet at scale 0.25
    python tools/bench.py --modes plain encoder every-key --repeats 5

Builds a StableDiffusionPipeline around diffusers' SD-1.5 UNet config with every block width
scaled by ``--scale`` (random weights, nothing downloads), samples a 32x32 latent with
classifier-free guidance (UNet batch 2) for 50 DDIM steps, and prints per mode the median
time, the speedup over plain, the FLOP-ideal speedup (FLOPs of key and non-key steps counted
with ``torch.utils.flop_counter``) and their ratio, the efficiency.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from torch.utils.flop_counter import FlopCounterMode

import fxprop
from fxprop.capture import flatten_call

SD15_WIDTHS = (320, 640, 1280, 1280)
TEXT_LEN, TEXT_DIM = 77, 768

#: mode name -> accelerate() options (None: the plain pipeline)
MODES: dict[str, dict | None] = {
    "plain": None,
    "encoder": dict(key_steps="faster-diffusion"),
    "every-key": dict(key_steps=1, prior_noise=0),
}


def sd15_unet(scale: float, seed: int = 0) -> UNet2DConditionModel:
    """diffusers' SD-1.5 UNet config with block widths scaled by ``scale``."""
    widths = tuple(max(8, int(w * scale)) for w in SD15_WIDTHS)
    groups = max(g for g in range(1, 33) if all(w % g == 0 for w in widths))
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=widths, norm_num_groups=groups, attention_head_dim=8,
        cross_attention_dim=TEXT_DIM,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()


def sd15_pipeline(scale: float) -> StableDiffusionPipeline:
    vae = AutoencoderKL(block_out_channels=(8,) * 4, norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)  # only its scale factor is used
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None,
                                   unet=sd15_unet(scale), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generation(pipe: Any, steps: int) -> Callable[[], torch.Tensor]:
    """One generation of a 32x32 latent with CFG, as a zero-argument function."""
    g = torch.Generator().manual_seed(0)
    embeds = {"prompt_embeds": torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g),
              "negative_prompt_embeds": torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)}
    size = 8 * 32

    def run() -> torch.Tensor:
        return pipe(**embeds, height=size, width=size, num_inference_steps=steps,
                    guidance_scale=7.5, output_type="latent",
                    generator=torch.Generator().manual_seed(1)).images

    return run


def median_time(run: Callable[[], Any], repeats: int) -> float:
    run()  # warm-up: capture, allocator, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def flop_ideal(pipe: Any, steps: int) -> float:
    """Plain FLOPs / fxprop FLOPs for one generation, from the parts' op counts."""
    runtime = pipe.unet
    plan = fxprop.make_plan(list(range(steps)), runtime.policy.schedule)
    latents = torch.zeros(2, 4, 32, 32)
    text = torch.zeros(2, TEXT_LEN, TEXT_DIM)
    call = flatten_call(runtime.unet.forward, (latents, torch.tensor(999), text),
                        {"return_dict": False})
    _, parts = runtime.parts_for(call)
    full = _flops(lambda: parts.full(*call.tensors))
    frontier = parts.key(*[call.tensors[i] for i in parts.key_inputs])
    step = _flops(lambda: parts.step(*[call.tensors[i] for i in parts.step_inputs], *frontier))
    keys = sum(plan.is_key)
    return steps * full / (keys * full + (steps - keys) * step)


def _flops(fn: Callable[[], Any]) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args(argv)
    torch.set_num_threads(min(os.cpu_count() or 1, 4))
    pipe = sd15_pipeline(args.scale)
    components = pipe.components
    print(f"SD-1.5-architecture UNet x{args.scale}: "
          f"{sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.1f}M params, "
          f"{args.steps} DDIM steps, 32x32 latent, CFG batch 2, median of {args.repeats}")
    rows, plain_time = [], None
    for mode in ["plain"] + [m for m in args.modes if m != "plain"]:
        options = MODES[mode]
        candidate = type(pipe)(**components)
        candidate.set_progress_bar_config(disable=True)
        if options is not None:
            fxprop.accelerate(candidate, **options)
        seconds = median_time(generation(candidate, args.steps), args.repeats)
        plain_time = plain_time or seconds
        ideal = 1.0 if options is None else flop_ideal(candidate, args.steps)
        rows.append((mode, seconds, plain_time / seconds, ideal))
    print(f"{'mode':<12}{'time s':>9}{'speedup':>9}{'FLOP-ideal':>12}{'efficiency':>12}")
    for mode, seconds, speedup, ideal in rows:
        print(f"{mode:<12}{seconds:>9.3f}{speedup:>9.2f}{ideal:>12.2f}{speedup / ideal:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
