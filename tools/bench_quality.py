"""Speed/quality sweep of fxprop's policies on the shipped digits model (not a test).

    python tools/bench.py --quality                      # 20 samples per digit per policy
    python tools/bench_quality.py --per-digit 30 --plot pareto.png
    python tools/bench_quality.py --forecast --per-digit 10   # reuse vs forecast, same key steps

Every policy generates the same labels from the same seeds as the plain pipeline (50 DDIM
steps, the model's guidance). Batches run interleaved across policies, so drifts of this
shared machine hit all alike. Per policy it prints: measured speedup; FLOP-ideal speedup
(plain FLOPs / the policy's, ``torch.utils.flop_counter``, one generation of the ten digits);
PSNR and max abs error vs plain; the shipped classifier's accuracy; the Fréchet distance
between classifier features of the samples and of the real held-out digits (lower is better).
It names the policy with the lowest Fréchet distance at >= 1.5x and >= 2x measured speedup,
and draws speedup vs Fréchet distance (a Pareto plot) with matplotlib.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import fxprop  # noqa: E402
from common import flops  # noqa: E402
from fxprop.cli import psnr  # noqa: E402
from fxprop.demo import load_digits_pipeline  # noqa: E402
from fxprop.demo.classifier import (classify, frechet_distance, load_classifier,  # noqa: E402
                                    load_heldout, to_model_range)


def policies(unet: torch.nn.Module) -> dict[str, dict | None]:
    """The sweep: encoder presets and every-N with prior noise off/on; deep intervals 2-5 at
    branch 0 and every valid branch at interval 3."""
    sweep: dict[str, dict | None] = {"plain": None}
    for keys in ["faster-diffusion", 2, 3, 4]:
        for noise in (0.0, 0.003):
            name = f"encoder {'fd' if isinstance(keys, str) else f'N={keys}'}"
            sweep[name + (" +noise" if noise else "")] = dict(key_steps=keys, prior_noise=noise)
    for interval in (2, 3, 4, 5):
        sweep[f"deep N={interval} b=0"] = dict(reuse="deep", key_steps=interval, branch=0)
    for branch in filter(lambda b: _valid_branch(unet, b), range(1, 12)):
        sweep[f"deep N=3 b={branch}"] = dict(reuse="deep", key_steps=3, branch=branch)
    return sweep


def forecast_policies(unet: torch.nn.Module) -> dict[str, dict | None]:
    """Reuse beside forecast orders 1 and 2 at the same key steps: deep (branch 0) every 2-8
    steps, encoder propagation every 3 and the faster-diffusion preset (prior noise off)."""
    sweep: dict[str, dict | None] = {"plain": None}
    bases = {f"deep N={n} b=0": dict(reuse="deep", key_steps=n, branch=0) for n in range(2, 9)}
    bases.update({"encoder N=3": dict(key_steps=3, prior_noise=0),
                  "encoder fd": dict(key_steps="faster-diffusion", prior_noise=0)})
    for name, options in bases.items():
        for order, label in enumerate(("reuse", "f1", "f2")):
            sweep[f"{name} {label}"] = dict(options, forecast=order)
    return sweep


def _valid_branch(unet: torch.nn.Module, branch: int) -> bool:
    try:
        fxprop.DeepCache(branch=branch).validate(unet)
        return True
    except ValueError:
        return False


@dataclass
class Row:
    name: str
    pipe: Any
    seconds: float = 0.0
    flops: int = 0
    images: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


def sample(pipe: Any, labels: list[int], seed: int, steps: int) -> torch.Tensor:
    return pipe(labels, num_inference_steps=steps, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images


def run(rows: list[Row], labels: list[int], batch: int, steps: int, seed: int) -> None:
    """Warm up and count FLOPs per policy, then sample all labels, batches interleaved."""
    for row in rows:
        sample(row.pipe, list(range(10)), 0, steps)  # capture outside the timed runs
        row.flops = flops(lambda: sample(row.pipe, list(range(10)), 0, steps))
    batches = [labels[i:i + batch] for i in range(0, len(labels), batch)]
    for b, chunk in enumerate(tqdm(batches, desc="batches (all policies)")):
        for row in rows:
            start = time.perf_counter()
            row.images.append(sample(row.pipe, chunk, seed + b, steps))
            row.seconds += time.perf_counter() - start


def score(rows: list[Row], labels: list[int]) -> None:
    classifier = load_classifier()
    _, real = classify(classifier, load_heldout()["images"])
    plain = torch.cat(rows[0].images)
    for row in rows:
        images = torch.cat(row.images)
        predicted, feats = classify(classifier, to_model_range(images))
        row.metrics = dict(
            speedup=rows[0].seconds / row.seconds, ideal=rows[0].flops / row.flops,
            psnr=psnr(images, plain), max_error=(images - plain).abs().max().item(),
            accuracy=(predicted == torch.tensor(labels)).float().mean().item(),
            fd=frechet_distance(feats, real))


def print_table(rows: list[Row]) -> None:
    """One line per policy; forecast rows also give their PSNR gain and time ratio over the
    reuse row of the same key steps (``+dB``, ``t/reuse``)."""
    print(f"{'policy':<24}{'speedup':>8}{'FLOP-ideal':>11}{'PSNR dB':>9}{'max err':>9}"
          f"{'accuracy':>10}{'FD':>8}{'+dB':>7}{'t/reuse':>9}")
    by_name = {row.name: row for row in rows}
    for row in rows:
        m = row.metrics
        reuse = by_name.get(row.name.rsplit(" ", 1)[0] + " reuse")
        versus = ""
        if reuse is not None and reuse is not row:
            versus = (f"{m['psnr'] - reuse.metrics['psnr']:>+7.1f}"
                      f"{row.seconds / reuse.seconds:>9.3f}")
        print(f"{row.name:<24}{m['speedup']:>8.2f}{m['ideal']:>11.2f}{m['psnr']:>9.1f}"
              f"{m['max_error']:>9.3f}{m['accuracy']:>10.1%}{m['fd']:>8.2f}{versus}")
    for target in (1.5, 2.0):
        fast = [r for r in rows if r.metrics["speedup"] >= target]
        best = min(fast, key=lambda r: r.metrics["fd"], default=None)
        print(f"best at >= {target}x: " + (f"{best.name} (FD {best.metrics['fd']:.2f}, "
              f"{best.metrics['speedup']:.2f}x)" if best else "none reaches it"))


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"plain": ("*", "black"), "encoder": ("o", "tab:blue"), "deep": ("s", "tab:orange"),
              "f1": ("^", "tab:green"), "f2": ("v", "tab:red")}
    for row in rows:
        last = row.name.split()[-1]
        kind = last if last in ("f1", "f2") else row.name.split()[0]
        marker, color = styles[kind]
        ax.scatter(row.metrics["speedup"], row.metrics["fd"], marker=marker, color=color, s=60,
                   label=kind if kind not in ax.get_legend_handles_labels()[1] else None)
        ax.annotate(row.name, (row.metrics["speedup"], row.metrics["fd"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("measured speedup over plain (x)")
    ax.set_ylabel("Fréchet distance to held-out digits (lower is better)")
    ax.set_title("fxprop policies on the shipped digits model (50 DDIM steps)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-digit", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=100, help="samples per pipeline call")
    parser.add_argument("--plot", default="bench-quality.png")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--forecast", action="store_true",
                        help="sweep reuse vs forecast orders 1 and 2 at the same key steps")
    parser.add_argument("--seed", type=int, default=1000,
                        help="seed of the first batch (the forecast sweep's default, 7000, "
                             "is used nowhere else)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = load_digits_pipeline()
    rows = []
    sweep = forecast_policies if args.forecast else policies
    seed = 7000 if args.forecast and args.seed == 1000 else args.seed
    for name, options in sweep(base.unet).items():
        pipe = type(base)(**base.components)
        pipe.set_progress_bar_config(disable=True)
        if options is not None:
            fxprop.accelerate(pipe, **options)
        rows.append(Row(name, pipe))
    labels = [d for _ in range(args.per_digit) for d in range(10)]
    print(f"digits model: {len(rows)} policies x {len(labels)} samples, {args.steps} DDIM steps")
    with torch.no_grad():
        run(rows, labels, args.batch, args.steps, seed)
    score(rows, labels)
    print_table(rows)
    plot(rows, args.plot)
    print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
