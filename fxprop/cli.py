"""``python -m fxprop demo``: every policy on the shipped digits model, side by side.

Generates every digit with the plain pipeline and with each fxprop policy from the same
seeds, prints time, speedup, PSNR and max error against plain, and the shipped classifier's
accuracy, and writes one PNG grid with a labelled row per policy.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

#: (row label, accelerate() options); None is the plain pipeline.
POLICIES: list[tuple[str, dict | None]] = [
    ("plain", None),
    ("encoder faster-diffusion", dict(key_steps="faster-diffusion", prior_noise=0)),
    ("encoder fd + prior noise", dict(key_steps="faster-diffusion")),
    ("encoder fd parallel", dict(key_steps="faster-diffusion", prior_noise=0, parallel=True,
                                 max_batch=240)),  # CPU: large batches lose the cache
    ("deep N=3 branch 0", dict(reuse="deep", key_steps=3, branch=0)),
    ("deep N=5 branch 0", dict(reuse="deep", key_steps=5, branch=0)),
    ("deep N=5 b0 forecast 1", dict(reuse="deep", key_steps=5, branch=0, forecast=1)),
]


def _generate(pipe: Any, labels: list[int], steps: int, seed: int) -> tuple[Any, float]:
    import torch

    start = time.perf_counter()
    images = pipe(labels, num_inference_steps=steps, output_type="pt",
                  generator=torch.Generator().manual_seed(seed)).images
    return images, time.perf_counter() - start


def psnr(images: Any, reference: Any) -> float:
    mse = float(((images - reference) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def run_policies(per_digit: int, steps: int, seed: int) -> list[dict]:
    """Generate ``per_digit`` samples of every digit under every policy; score them."""
    from tqdm.auto import tqdm

    import fxprop
    from fxprop.demo import load_digits_pipeline
    from fxprop.demo.classifier import classify, load_classifier, to_model_range

    base = load_digits_pipeline()
    base.set_progress_bar_config(disable=True)
    classifier = load_classifier()
    labels = [d for d in range(10) for _ in range(per_digit)]
    rows, reference = [], None
    for name, options in tqdm(POLICIES, desc="policies", leave=False):
        pipe = type(base)(**base.components)
        pipe.set_progress_bar_config(disable=True)
        if options is not None:
            fxprop.accelerate(pipe, **options)
        # warm-up of the same signature: capture (and, in parallel mode, one capture per
        # chunk length) happens here, not in the timed run
        _generate(pipe, labels, steps if options else 2, seed)
        images, seconds = _generate(pipe, labels, steps, seed)
        reference = images if reference is None else reference
        predicted, _ = classify(classifier, to_model_range(images))
        accuracy = float((predicted == predicted.new_tensor(labels)).float().mean())
        rows.append(dict(name=name, seconds=seconds, images=images, accuracy=accuracy,
                         psnr=psnr(images, reference),
                         max_error=float((images - reference).abs().max())))
    for row in rows:
        row["speedup"] = rows[0]["seconds"] / row["seconds"]
    return rows


def print_table(rows: list[dict], file: Any = sys.stdout) -> None:
    print(f"{'policy':<28}{'time s':>8}{'speedup':>9}{'PSNR dB':>9}{'max err':>9}"
          f"{'accuracy':>10}", file=file)
    for r in rows:
        print(f"{r['name']:<28}{r['seconds']:>8.2f}{r['speedup']:>9.2f}{r['psnr']:>9.1f}"
              f"{r['max_error']:>9.3f}{r['accuracy']:>10.1%}", file=file)


def save_grid(rows: list[dict], per_digit: int, path: str, zoom: int = 4) -> None:
    """One row per policy: its label, then the first sample of every digit."""
    from PIL import Image, ImageDraw

    cell, label_width = 16 * zoom, 200
    grid = Image.new("L", (label_width + 10 * cell, len(rows) * cell), color=255)
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        draw.text((4, r * cell + cell // 2 - 6), row["name"], fill=0)
        for digit in range(10):
            pixels = (row["images"][digit * per_digit, 0] * 255).round().byte().numpy()
            tile = Image.fromarray(pixels, mode="L").resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (label_width + digit * cell, r * cell))
    grid.save(path)


def demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fxprop demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-digit", type=int, default=4, help="samples of each digit")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="fxprop-demo.png", help="PNG grid to write")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(min(os.cpu_count() or 1, 4))
    rows = run_policies(args.per_digit, args.steps, args.seed)
    print(f"digits model, {args.steps} DDIM steps, {10 * args.per_digit} samples per policy")
    print_table(rows)
    save_grid(rows, args.per_digit, args.out)
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "demo":
        print("usage: fxprop demo [--per-digit N] [--steps N] [--seed N] [--out PATH]",
              file=sys.stderr)
        return 2
    return demo(argv[1:])
