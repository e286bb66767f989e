"""Train (and evaluate) the shipped demo model in fxprop/demo/digits/.

Trains, on CPU in minutes, a class-conditional pixel-space
UNet2DConditionModel on scikit-learn's bundled 8x8 handwritten digits
(upsampled to 16x16, in [-1, 1]), conditioned through cross-attention on a
learned label embedding (10 digits + a null label, dropped 10% of the time
for classifier-free guidance), with epsilon prediction under a 1000-step
DDPM schedule and an EMA of the weights. It also trains a small CNN digit
classifier used to score samples. A stratified 15% held-out split is used by
neither model and is saved for Fréchet-distance benchmarks.

    HF_HUB_OFFLINE=1 python tools/train_digits.py            # train, save, evaluate
    HF_HUB_OFFLINE=1 python tools/train_digits.py --evaluate # evaluate the shipped model
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

# Sleep rather than spin when waiting for the other thread: on a shared 2-core
# machine spinning OpenMP threads run up to ~10x slower when another process is busy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel  # noqa: E402

from fxprop.demo import DIGITS_DIR  # noqa: E402
from fxprop.demo.classifier import (  # noqa: E402
    CLASSIFIER_SUBFOLDER, HELDOUT_FILE, DigitClassifier, classify, frechet_distance,
    load_classifier, load_heldout, to_model_range,
)
from fxprop.demo.pipeline import DEFAULT_GUIDANCE_SCALE, DigitsPipeline, LabelEmbedding  # noqa: E402

NULL_LABEL = 10
EMBED_DIM = 64


def load_split(seed: int = 0, heldout_fraction: float = 0.15) -> dict[str, torch.Tensor]:
    """Digits as (N,1,16,16) tensors in [-1,1] (bilinear upsampling), split stratified."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8 - 1
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, heldout_idx = train_test_split(
        np.arange(len(labels)), test_size=heldout_fraction, stratify=digits.target, random_state=seed
    )
    train_idx, heldout_idx = torch.tensor(np.sort(train_idx)), torch.tensor(np.sort(heldout_idx))
    return {
        "train_images": images[train_idx], "train_labels": labels[train_idx],
        "heldout_images": images[heldout_idx], "heldout_labels": labels[heldout_idx],
        "heldout_indices": heldout_idx,
    }


def build_unet() -> UNet2DConditionModel:
    """A 3-level UNet (16->8->4) with cross-attention at 8x8 and 4x4 (~1.7M params)."""
    return UNet2DConditionModel(
        sample_size=16, in_channels=1, out_channels=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=EMBED_DIM, attention_head_dim=4,
    )


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def diffusion_loss(models, scheduler, images, labels, gen, label_dropout):
    """Epsilon-prediction MSE on a batch, with labels dropped to the null label."""
    drop = torch.rand(len(labels), generator=gen) < label_dropout
    labels = torch.where(drop, torch.full_like(labels, NULL_LABEL), labels)
    noise = torch.randn(images.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(images),), generator=gen)
    noisy = scheduler.add_noise(images, noise, t)
    context = models["label_embedding"](labels)
    pred = models["unet"](noisy, t, encoder_hidden_states=context, return_dict=False)[0]
    return F.mse_loss(pred, noise)


def train_unet(data, args) -> torch.nn.ModuleDict:
    """Train UNet + label embedding with AdamW, cosine LR and EMA; return the EMA copy."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    models = torch.nn.ModuleDict({"unet": build_unet(), "label_embedding": LabelEmbedding(NULL_LABEL + 1, EMBED_DIM)})
    ema = copy.deepcopy(models).requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(models.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = min(100, args.steps // 10)
    lr_at = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * s / args.steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    images, labels = data["train_images"], data["train_labels"]
    bar = tqdm(range(args.steps), desc="unet", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(images), (args.batch_size,), generator=gen)
        loss = diffusion_loss(models, scheduler, images[idx], labels[idx], gen, args.label_dropout)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema, models, min(args.ema_decay, (1 + step) / (10 + step)))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema


def shift_augment(images: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Randomly translate each image by up to `max_shift` pixels (background fill -1)."""
    n, _, h, w = images.shape
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train_classifier(data, args) -> tuple[DigitClassifier, float]:
    """Train the CNN on the train split (shift + noise augmentation); return it and held-out accuracy."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    images, labels = data["train_images"], data["train_labels"]
    steps = args.classifier_epochs * (len(images) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in tqdm(range(steps), desc="classifier", dynamic_ncols=True):
        idx = torch.randint(0, len(images), (64,), generator=gen)
        x = shift_augment(images[idx], gen)
        x = (x + 0.1 * torch.rand(()) * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    preds, _ = classify(model, data["heldout_images"])
    return model, (preds == data["heldout_labels"]).float().mean().item()


def save_all(ema, classifier, data, out: Path) -> None:
    """Write the pipeline (diffusers format), the classifier and the held-out split to `out`."""
    scheduler = DDIMScheduler.from_config(DDPMScheduler(num_train_timesteps=1000).config)
    pipe = DigitsPipeline(unet=ema["unet"], scheduler=scheduler, label_embedding=ema["label_embedding"])
    pipe.save_pretrained(out, safe_serialization=True)
    classifier.save_pretrained(out / CLASSIFIER_SUBFOLDER, safe_serialization=True)
    heldout = {
        "images": data["heldout_images"].contiguous(),
        "labels": data["heldout_labels"].contiguous(),
        "indices": data["heldout_indices"].contiguous(),
    }
    save_file(heldout, str(out / HELDOUT_FILE))


def generate(pipe, labels: list[int], args, batch_size: int = 100) -> torch.Tensor:
    """Sample `labels` in batches with seeds args.seed + batch index; return [-1,1] images."""
    chunks = []
    for b, start in enumerate(range(0, len(labels), batch_size)):
        gen = torch.Generator().manual_seed(args.seed + b)
        out = pipe(labels[start:start + batch_size], num_inference_steps=args.sample_steps,
                   guidance_scale=args.guidance_scale, generator=gen, output_type="pt")
        chunks.append(to_model_range(out.images))
    return torch.cat(chunks)


def evaluate(path: Path, args) -> dict:
    """Fraction of plain samples (args.per_digit per digit) the classifier labels as requested,
    plus the Fréchet distance of their classifier features to the held-out real digits."""
    pipe = DigitsPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier(path)
    labels = [d for d in range(10) for _ in range(args.per_digit)]
    start = time.time()
    samples = generate(pipe, labels, args)
    seconds = time.time() - start
    preds, feats = classify(classifier, samples)
    hits = preds == torch.tensor(labels)
    heldout = load_heldout(path)
    _, real_feats = classify(classifier, heldout["images"])
    if args.grid:
        save_grid(samples, labels, args.grid)
    return {
        "sample_accuracy": hits.float().mean().item(),
        "per_digit_accuracy": [round(hits[torch.tensor(labels) == d].float().mean().item(), 3) for d in range(10)],
        "frechet_distance_to_heldout": frechet_distance(feats, real_feats),
        "num_samples": len(labels), "sample_steps": args.sample_steps,
        "guidance_scale": args.guidance_scale, "sampling_seconds": round(seconds, 1),
    }


def save_grid(samples: torch.Tensor, labels: list[int], path: str, per_row: int = 10) -> None:
    """Save the first `per_row` samples of each digit as one PNG (a row per digit)."""
    from PIL import Image

    rows = [samples[torch.tensor(labels) == d][:per_row] for d in range(10)]
    grid = torch.cat([torch.cat(list(r[:, 0]), dim=1) for r in rows], dim=0)
    pixels = ((grid + 1) * 127.5).clamp(0, 255).round().byte().numpy()
    Image.fromarray(pixels, mode="L").resize((pixels.shape[1] * 4, pixels.shape[0] * 4), Image.NEAREST).save(path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DIGITS_DIR, help="output folder (default: the shipped one)")
    p.add_argument("--evaluate", action="store_true", help="only evaluate the model in --out")
    p.add_argument("--no-evaluate", action="store_true", help="skip the evaluation after training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1200, help="UNet training steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--classifier-epochs", type=int, default=30)
    p.add_argument("--per-digit", type=int, default=50, help="evaluation samples per digit")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps when evaluating")
    p.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    p.add_argument("--grid", default=None, help="write a PNG grid of evaluation samples here")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.evaluate:
        start = time.time()
        data = load_split(args.seed)
        ema = train_unet(data, args)
        unet_seconds = time.time() - start
        classifier, accuracy = train_classifier(data, args)
        save_all(ema, classifier, data, args.out)
        info = {"unet_train_seconds": round(unet_seconds, 1), "total_train_seconds": round(time.time() - start, 1),
                "classifier_heldout_accuracy": round(accuracy, 4), "num_train": len(data["train_labels"]),
                "num_heldout": len(data["heldout_labels"]), "args": {k: str(v) for k, v in vars(args).items() if k != "out"}}
        print(json.dumps(info, indent=2))
        (args.out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if not args.no_evaluate:
        print(json.dumps(evaluate(args.out, args), indent=2))


if __name__ == "__main__":
    main()
