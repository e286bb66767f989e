"""Two small UNets unlike the digits model, trained here, for calibration benchmarks (#30).

    HF_HUB_OFFLINE=1 python tools/bench_models.py            # train both (minutes on CPU)
    HF_HUB_OFFLINE=1 python tools/bench_models.py --only shapes

- ``patches``: diffusers' unconditional ``UNet2DModel`` (no cross-attention; attention only at
  the middle level) on 16x16 RGB patches of the two photographs scikit-learn ships
  (``load_sample_images``: a temple in China, a flower; 4x4 average-pooled crops), epsilon
  prediction under a linear 1000-step DDPM schedule.
- ``shapes``: the original LDM ``UNetModel`` (pip's ``stable-diffusion-sdkit``, the code A1111
  and Forge run) with a class embedding (``num_classes``: disc, square, cross), no transformer,
  on procedurally drawn 16x16 one-channel shapes of random place, size and brightness,
  **v-prediction** under the cosine schedule (``squaredcos_cap_v2``).

Both sample with DDIM (:func:`scheduler`). Weights (fp32 safetensors) and the config go to
``tools/models/<name>/``; :func:`load` rebuilds the model. Training is seeded and single
threaded-deterministic on one machine; seconds are printed, not promised.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

MODELS_DIR = Path(__file__).resolve().parent / "models"

#: name -> (training schedule and DDIM settings, model config)
SPECS = {
    "patches": dict(beta_schedule="linear", prediction_type="epsilon", steps=700, lr=2e-3,
                    config=dict(sample_size=16, in_channels=3, out_channels=3,
                                block_out_channels=[32, 64, 64], layers_per_block=1,
                                down_block_types=["DownBlock2D", "AttnDownBlock2D",
                                                  "DownBlock2D"],
                                up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
                                norm_num_groups=8, attention_head_dim=8)),
    "shapes": dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                   steps=700, lr=2e-3,
                   config=dict(image_size=16, in_channels=1, out_channels=1, model_channels=32,
                               num_res_blocks=1, attention_resolutions=[2],
                               channel_mult=[1, 2, 2], num_heads=2, num_classes=3)),
}


def build(name: str) -> nn.Module:
    """The untrained model ``name``."""
    config = SPECS[name]["config"]
    if name == "patches":
        from diffusers import UNet2DModel
        return UNet2DModel(**config)
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    return UNetModel(**config)


def scheduler(name: str, kind: str = "ddim"):
    """The model's DDIM (``kind="ddim"``) or DDPM (training) scheduler."""
    from diffusers import DDIMScheduler, DDPMScheduler
    spec = SPECS[name]
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    return cls(num_train_timesteps=1000, beta_schedule=spec["beta_schedule"],
               prediction_type=spec["prediction_type"], clip_sample=kind == "ddim")


def load(name: str) -> nn.Module:
    """The trained model ``name`` from ``tools/models/<name>/`` (eval mode, fp32)."""
    from safetensors.torch import load_file
    model = build(name)
    model.load_state_dict(load_file(str(MODELS_DIR / name / "model.safetensors")))
    return model.eval()


def patches(count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` 16x16 RGB patches in [-1, 1]: random 64x64 crops of scikit-learn's two
    sample photographs, 4x4 average pooled, randomly mirrored."""
    from sklearn.datasets import load_sample_images
    photos = [torch.tensor(p, dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1
              for p in load_sample_images().images]
    out = []
    for _ in range(count):
        photo = photos[int(torch.randint(len(photos), (1,), generator=gen))]
        y = int(torch.randint(photo.shape[1] - 64, (1,), generator=gen))
        x = int(torch.randint(photo.shape[2] - 64, (1,), generator=gen))
        crop = F.avg_pool2d(photo[:, y:y + 64, x:x + 64][None], 4)[0]
        out.append(crop.flip(-1) if torch.rand(1, generator=gen) < 0.5 else crop)
    return torch.stack(out)


def shapes(count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` 16x16 one-channel shapes in [-1, 1] and their classes (0 disc, 1 square,
    2 cross) of random centre, radius 3-6 and brightness on a dark background."""
    grid = torch.stack(torch.meshgrid(torch.arange(16.0), torch.arange(16.0),
                                      indexing="ij")) + 0.5
    labels = torch.randint(3, (count,), generator=gen)
    centre = 4 + torch.rand(count, 2, 1, 1, generator=gen) * 8
    radius = (3 + torch.rand(count, 1, 1, generator=gen) * 3)
    level = 0.3 + 0.7 * torch.rand(count, 1, 1, generator=gen)
    d = (grid[None] - centre).abs()
    disc = (d.pow(2).sum(1) <= radius ** 2)
    square = d.amax(1) <= radius * 0.8
    cross = (d.amin(1) <= radius * 0.3) & (d.amax(1) <= radius)
    mask = torch.where(labels[:, None, None] == 0, disc,
                       torch.where(labels[:, None, None] == 1, square, cross))
    images = torch.where(mask, level, torch.zeros(())) * 2 - 1
    return images[:, None], labels


def call(model: nn.Module, name: str, x: torch.Tensor, t: torch.Tensor,
         labels: torch.Tensor | None) -> torch.Tensor:
    """The model's prediction (both classes' forward conventions)."""
    if name == "patches":
        return model(x, t).sample
    return model(x, t, y=labels)


def train(name: str, steps: int | None = None, batch: int = 48, seed: int = 0) -> dict:
    """Train ``name`` with an EMA of its weights; save it; return the training facts."""
    spec, gen = SPECS[name], torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model, ddpm = build(name).train(), scheduler(name, "ddpm")
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0)
    steps = steps or spec["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    start, losses = time.perf_counter(), []
    for step in range(steps):
        if name == "patches":
            images, labels = patches(batch, gen), None
        else:
            images, labels = shapes(batch, gen)
        noise = torch.randn(images.shape, generator=gen)
        t = torch.randint(1000, (batch,), generator=gen)
        noisy = ddpm.add_noise(images, noise, t)
        target = noise if spec["prediction_type"] == "epsilon" else \
            ddpm.get_velocity(images, noise, t)
        loss = F.mse_loss(call(model, name, noisy, t, labels), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(0.995, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            recent = sum(losses[-100:]) / len(losses[-100:])
            print(f"{name} step {step}: loss {recent:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return _save(name, ema, dict(steps=steps, batch=batch, seed=seed,
                                 seconds=round(time.perf_counter() - start, 1),
                                 final_loss=round(sum(losses[-100:]) / len(losses[-100:]), 5)))


def _save(name: str, model: nn.Module, facts: dict) -> dict:
    from safetensors.torch import save_file
    out = MODELS_DIR / name
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    info = {**{k: v for k, v in SPECS[name].items() if k not in ("config", "steps")}, **facts,
            "config": SPECS[name]["config"],
            "parameters": sum(p.numel() for p in model.parameters())}
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    return info


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SPECS), help="train one model")
    parser.add_argument("--steps", type=int, help="training steps (default: the spec's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in [args.only] if args.only else sorted(SPECS):
        train(name, args.steps)


if __name__ == "__main__":
    sys.exit(main())
