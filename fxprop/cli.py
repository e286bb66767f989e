"""``python -m fxprop demo`` and ``python -m fxprop calibrate`` on the shipped digits model.

``demo`` generates every digit with the plain pipeline and with each fxprop policy, the
calibrated schedule among them, from the same seeds (every policy warmed up once, then timed
in rounds that interleave the policies), prints time, speedup, PSNR and max error against
plain and the shipped classifier's accuracy, and writes a PNG grid with a labelled row per
policy and, beside it, the Pareto plot (speedup against PSNR). ``calibrate`` calibrates the
digits model (two calls of the ten digits) and saves the calibration as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from typing import Any, Iterator

#: (row label, accelerate() options); None is the plain pipeline.
POLICIES: list[tuple[str, dict | None]] = [
    ("plain", None),
    ("encoder faster-diffusion", dict(key_steps="faster-diffusion", prior_noise=0)),
    ("encoder fd parallel", dict(key_steps="faster-diffusion", prior_noise=0, parallel=True,
                                 max_batch=240)),  # CPU: large batches lose the cache
    ("deep N=3 branch 0", dict(reuse="deep", key_steps=3, branch=0)),
    ("deep N=5 branch 0", dict(reuse="deep", key_steps=5, branch=0)),
    ("deep N=5 b0 forecast 1", dict(reuse="deep", key_steps=5, branch=0, forecast=1)),
    ("calibrated 2x", "calibrated"),   # the shipped calibration (or one made for --steps)
]
#: Seeds of the calibration calls (the demo and the benchmarks use others).
CALIBRATION_SEEDS = (100, 101)


def _generate(pipe: Any, labels: list[int], steps: int, seed: int) -> tuple[Any, float]:
    import torch

    start = time.perf_counter()
    images = pipe(labels, num_inference_steps=steps, output_type="pt",
                  generator=torch.Generator().manual_seed(seed)).images
    return images, time.perf_counter() - start


def psnr(images: Any, reference: Any) -> float:
    mse = float(((images - reference) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def calibration_calls() -> list[dict]:
    """The calls the digits model is calibrated on: the ten digits, twice."""
    import torch

    return [dict(labels=list(range(10)), generator=torch.Generator().manual_seed(seed),
                 output_type="pt") for seed in CALIBRATION_SEEDS]


def calibrated_options(base: Any, steps: int, progress: bool = True) -> Any:
    """The shipped calibration for ``steps`` DDIM steps, or (another step count) one made
    now at the same budget."""
    from fxprop import Calibration, calibrate
    from fxprop.demo import DIGITS_CALIBRATION

    shipped = Calibration.load(DIGITS_CALIBRATION)
    if shipped.num_steps == steps:
        return shipped
    print(f"the shipped calibration is for {shipped.num_steps} steps: calibrating for {steps}")
    return calibrate(base, calibration_calls(), steps, progress=progress, **shipped.budget)


def _pipelines(base: Any, steps: int) -> list[tuple[str, Any]]:
    import fxprop

    pipes, calibration = [], calibrated_options(base, steps)  # before any accelerate()
    for name, options in POLICIES:
        pipe = type(base)(**base.components)
        pipe.set_progress_bar_config(disable=True)
        if options == "calibrated":
            fxprop.accelerate(pipe, calibration)
        elif options is not None:
            fxprop.accelerate(pipe, **options)
        pipes.append((name, pipe))
    return pipes


def run_policies(per_digit: int, steps: int, seed: int) -> list[dict]:
    """Generate ``per_digit`` rounds of the ten digits under every policy (round ``r`` from
    seed ``seed + r``), the policies interleaved in each round; score them."""
    import torch
    from tqdm.auto import tqdm

    from fxprop.demo import load_digits_pipeline
    from fxprop.demo.classifier import classify, load_classifier, to_model_range

    base = load_digits_pipeline()
    base.set_progress_bar_config(disable=True)
    pipes, labels = _pipelines(base, steps), list(range(10))
    for _, pipe in tqdm(pipes, desc="warm-up (capture)", leave=False):
        _generate(pipe, labels, steps, seed)  # the timed signature: captures happen here
    seconds, images = [0.0] * len(pipes), [[] for _ in pipes]
    for r in tqdm(range(per_digit), desc="rounds (all policies)", leave=False):
        for p, (_, pipe) in enumerate(pipes):
            found, took = _generate(pipe, labels, steps, seed + r)
            images[p].append(found)
            seconds[p] += took
    classifier, rows = load_classifier(), []
    reference, expected = torch.cat(images[0]), torch.tensor(labels * per_digit)
    for (name, _), took, found in zip(pipes, seconds, images):
        found = torch.cat(found)
        predicted, _ = classify(classifier, to_model_range(found))
        rows.append(dict(name=name, seconds=took, images=found, psnr=psnr(found, reference),
                         accuracy=float((predicted == expected).float().mean()),
                         max_error=float((found - reference).abs().max()),
                         speedup=seconds[0] / took))
    return rows


def print_table(rows: list[dict], file: Any = None) -> None:
    file = sys.stdout if file is None else file   # the stream now, not at import
    print(f"{'policy':<28}{'time s':>8}{'speedup':>9}{'PSNR dB':>9}{'max err':>9}"
          f"{'accuracy':>10}", file=file)
    for r in rows:
        print(f"{r['name']:<28}{r['seconds']:>8.2f}{r['speedup']:>9.2f}{r['psnr']:>9.1f}"
              f"{r['max_error']:>9.3f}{r['accuracy']:>10.1%}", file=file)


def save_grid(rows: list[dict], path: str, zoom: int = 4) -> None:
    """One row per policy: its label, then the first sample of every digit (round 0)."""
    from PIL import Image, ImageDraw

    cell, label_width = 16 * zoom, 200
    grid = Image.new("L", (label_width + 10 * cell, len(rows) * cell), color=255)
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        draw.text((4, r * cell + cell // 2 - 6), row["name"], fill=0)
        for digit in range(10):
            pixels = (row["images"][digit, 0] * 255).round().byte().numpy()
            tile = Image.fromarray(pixels, mode="L").resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (label_width + digit * cell, r * cell))
    grid.save(path)


def pareto_path(grid: str) -> str:
    """Where the demo writes its Pareto plot: beside the grid, ``NAME-pareto.png``."""
    root, ext = os.path.splitext(grid)
    return f"{root}-pareto{ext or '.png'}"


def demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fxprop demo", description=__doc__.split("\n\n")[1])
    parser.add_argument("--per-digit", type=int, default=3,
                        help="samples of each digit (rounds of the ten digits)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="fxprop-demo.png", help="PNG grid to write")
    args = parser.parse_args(argv)
    rows = run_policies(args.per_digit, args.steps, args.seed)
    print(f"digits model, {args.steps} DDIM steps, {10 * args.per_digit} samples per policy")
    print_table(rows)
    save_grid(rows, args.out)
    print(f"wrote {args.out}")
    try:
        from fxprop.demo.plot import pareto_plot

        plot = pareto_path(args.out)
        pareto_plot([(r["name"], r["speedup"], min(r["psnr"], 60.0)) for r in rows[1:]], plot,
                    xlabel="measured speedup over plain (x)", ylabel="PSNR against plain (dB)",
                    title=f"fxprop policies, digits model, {args.steps} DDIM steps")
        print(f"wrote {plot}")
    except ImportError:  # matplotlib comes with the demo extra
        print("no Pareto plot: matplotlib is not installed (pip install 'fxprop[demo]')")
    return 0


def calibrate_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fxprop calibrate",
                                     description=__doc__.split("\n\n")[1])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--speedup", type=float, default=None,
                        help="FLOP-ideal speedup to reach (default 2.0)")
    budget.add_argument("--max-error", type=float, default=None,
                        help="predicted relative error of the final sample to stay within")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--out", default="fxprop-digits-calibration.json",
                        help="JSON file to write")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from fxprop import calibrate
    from fxprop.demo import load_digits_pipeline

    if args.speedup is None and args.max_error is None:
        args.speedup = 2.0
    base = load_digits_pipeline()
    base.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    calibration = calibrate(base, calibration_calls(), args.steps, target_speedup=args.speedup,
                            max_error=args.max_error, progress=not args.quiet)
    print(calibration)
    calibration.save(args.out)
    print(f"calibrated in {time.perf_counter() - start:.1f} s; wrote {args.out}")
    return 0


@contextlib.contextmanager
def _process_settings() -> Iterator[None]:
    """A command's process settings: offline hub, a thread per core this process may run on
    (unless ``OMP_NUM_THREADS`` says how many). Restored afterwards, so that calling
    :func:`main` in-process (tests, notebooks) leaves the caller's thread count as it was."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(cores or 1, 4))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


COMMANDS = {"demo": demo, "calibrate": calibrate_command}
USAGE = ("usage: fxprop demo [--per-digit N] [--steps N] [--seed N] [--out PATH]\n"
         "       fxprop calibrate [--speedup X | --max-error E] [--steps N] [--out PATH] "
         "[--quiet]")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return 2
    with _process_settings():
        return COMMANDS[argv[0]](argv[1:])
