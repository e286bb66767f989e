"""Calibrated schedules against every hand-set policy of the same speed (not a test).

    python tools/bench_calibration.py                      # 1.5x 2x 2.5x 3x, 10 per digit
    python tools/bench_calibration.py --per-digit 20 --plot calibration.png

Calibrates the shipped digits model once (50 DDIM steps, 2 calls of the ten digits, seeds
100-101; ``fxprop.calibrate.measure``) and chooses a schedule per FLOP-ideal target from
that one measurement (each choice runs its finalists on the calibration calls to verify). Hand-set policies: the faster-diffusion preset, encoder every N, DeepCache
uniform (every branch) and non-uniform, each with forecast orders 0-2 where they apply. All
run on other seeds (1000+) than calibration, interleaved (tools/bench_quality.py's runner);
per policy: FLOP-ideal and measured speedup, PSNR against plain, classifier accuracy, Fréchet
distance, and the relative final error calibration predicts for it (``-`` where a segment is longer than the
measured ``max_interval``). Per target it prints the best hand-set PSNR within +-10% of the
speed, the calibrated PSNR, and the rank correlation of predicted error and measured PSNR.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

import fxprop  # noqa: E402
from bench_quality import Row, run, score  # noqa: E402
from fxprop.calibrate import measure  # noqa: E402
from fxprop.demo import load_digits_pipeline  # noqa: E402
from fxprop.schedules import deepcache_nonuniform, every, faster_diffusion  # noqa: E402

TARGETS = (1.5, 2.0, 2.5, 3.0)


def hand_set(measured) -> dict[str, tuple[dict, tuple]]:
    """Name -> (accelerate options, (reuse, branch, order, key steps)) of every hand-set policy."""
    n = measured.num_steps
    out = {}
    for order in (0, 1, 2):
        tag = "" if order == 0 else f" f{order}"
        fd = faster_diffusion(n)
        out[f"encoder fd{tag}"] = (dict(key_steps="faster-diffusion", prior_noise=0,
                                        forecast=order), ("encoder", None, order, fd))
        for interval in (2, 3):
            out[f"encoder N={interval}{tag}"] = (
                dict(key_steps=interval, prior_noise=0, forecast=order),
                ("encoder", None, order, every(interval, n)))
        for cut in measured.cuts:
            if cut.reuse != "deep":
                continue
            for interval in range(2, 8):
                out[f"deep N={interval} b{cut.branch}{tag}"] = (
                    dict(reuse="deep", key_steps=interval, branch=cut.branch, forecast=order),
                    ("deep", cut.branch, order, every(interval, n)))
        for interval in (3, 4, 5):
            try:
                keys = deepcache_nonuniform(interval)(n)
            except ValueError:  # too few steps for DeepCache's center
                continue
            out[f"deep nonuniform N={interval} b0{tag}"] = (
                dict(reuse="deep", key_steps=list(keys), branch=0, forecast=order),
                ("deep", 0, order, keys))
    return out


def _ideal(measured, reuse, branch, keys) -> float:
    cut = next(c for c in measured.cuts if c.id == (reuse, branch))
    n = measured.num_steps
    return n / (len(keys) + (n - len(keys)) * cut.step_cost)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-digit", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-interval", type=int, default=5)
    parser.add_argument("--plot", default="bench-calibration.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = load_digits_pipeline()
    base.set_progress_bar_config(disable=True)
    calls = [dict(labels=list(range(10)), generator=torch.Generator().manual_seed(s),
                  output_type="pt") for s in (100, 101)]
    start = time.perf_counter()
    measured = measure(base, calls, args.steps, max_interval=args.max_interval,
                       min_speedup=min(TARGETS))
    print(f"calibration (measurement) took {time.perf_counter() - start:.1f} s")
    policies = {"plain": (None, None)}
    for target in TARGETS:
        start = time.perf_counter()
        calibration = measured.calibration(target_speedup=target)
        print(f"choosing (with verification) at {target}x took "
              f"{time.perf_counter() - start:.1f} s")
        print(calibration)
        policies[f"calibrated {target}x"] = (calibration.accelerate_options(
            args.steps, base.scheduler), (calibration.reuse, calibration.branch,
                                          calibration.forecast, calibration.key_steps))
    cuts = {c.id for c in measured.cuts}
    for name, (options, spec) in hand_set(measured).items():
        ideal = _ideal(measured, *spec[:2], spec[3]) if spec[:2] in cuts else 0
        if any(abs(ideal / t - 1) <= 0.1 for t in TARGETS):
            policies[name] = (options, spec)
    rows, info = [], {}
    for name, (options, spec) in policies.items():
        pipe = type(base)(**base.components)
        pipe.set_progress_bar_config(disable=True)
        if options is not None:
            fxprop.accelerate(pipe, **options)
            predicted = measured.predict(*spec)
            info[name] = (_ideal(measured, spec[0], spec[1], spec[3]),
                          None if predicted is None else predicted[1])
        rows.append(Row(name, pipe))
    labels = [d for _ in range(args.per_digit) for d in range(10)]
    with torch.no_grad():
        run(rows, labels, 100, args.steps, 1000)
    score(rows, labels)
    report(rows, info)
    plot(rows, info, args.plot)
    return 0


def report(rows: list[Row], info: dict) -> None:
    print(f"{'policy':<30}{'ideal':>7}{'speedup':>8}{'PSNR dB':>9}{'acc':>7}{'FD':>8}"
          f"{'pred err':>10}")
    for row in rows:
        m = row.metrics
        ideal, predicted = info.get(row.name, (1.0, 0.0))
        pred = "-" if predicted is None else f"{predicted:.4f}"
        print(f"{row.name:<30}{ideal:>7.2f}{m['speedup']:>8.2f}{m['psnr']:>9.1f}"
              f"{m['accuracy']:>7.1%}{m['fd']:>8.2f}{pred:>10}")
    for target in TARGETS:
        near = [r for r in rows if r.name in info and not r.name.startswith("calibrated")
                and abs(info[r.name][0] / target - 1) <= 0.1]
        calibrated = next(r for r in rows if r.name == f"calibrated {target}x")
        best = max(near, key=lambda r: r.metrics["psnr"], default=None)
        line = f"{target}x: calibrated {calibrated.metrics['psnr']:.1f} dB"
        if best is not None:
            line += f", best hand-set {best.name} {best.metrics['psnr']:.1f} dB"
        print(line)
    scored = [(info[r.name][1], r.metrics["psnr"]) for r in rows
              if r.name in info and info[r.name][1] is not None]
    print(f"rank correlation of predicted error and -PSNR over {len(scored)} policies: "
          f"{_spearman([p for p, _ in scored], [-q for _, q in scored]):.3f}")


def _spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (torch.tensor(x).argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def plot(rows: list[Row], info: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for row in rows[1:]:
        calibrated = row.name.startswith("calibrated")
        ax.scatter(info[row.name][0], row.metrics["psnr"], s=70 if calibrated else 25,
                   marker="*" if calibrated else "o",
                   color="tab:red" if calibrated else "tab:blue")
        ax.annotate(row.name, (info[row.name][0], row.metrics["psnr"]), fontsize=6,
                    xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel("FLOP-ideal speedup (x)")
    ax.set_ylabel("PSNR against plain (dB)")
    ax.set_title("calibrated (red stars) vs hand-set policies, digits model, 50 DDIM steps")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
