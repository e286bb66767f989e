"""Calibrated schedules against every hand-set policy of the same speed (not a test).

    python tools/bench_calibration.py                      # 1.5x 2x 2.5x 3x, 10 per digit
    python tools/bench_calibration.py --per-digit 20 --plot calibration.png

Calibrates the shipped digits model once (50 DDIM steps, 2 calls of the ten digits, seeds
100-101, as ``python -m fxprop calibrate``; ``fxprop.calibration.calibrate.measure``) and
chooses a schedule per FLOP-ideal target from that one measurement (``choose_calibration``;
each choice runs its finalists on the calibration calls to verify). Hand-set policies: the
faster-diffusion preset, encoder every N, DeepCache uniform (every branch) and non-uniform,
each with forecast orders 0-2 where they apply, those of a measured cut within 10% of a
target's speed. All run on other seeds (1000+)
than calibration, interleaved (tools/bench_quality.py's runner); per policy: FLOP-ideal and
measured speedup, PSNR against plain, classifier accuracy, Fréchet distance, and the relative
final error calibration predicts for it (``-`` where a segment is longer than the measured
``max_interval`` or the order was not measured). Per target it prints the best hand-set PSNR
within +-10% of the speed and the calibrated PSNR, and where that policy's speed is not the
calibrated schedule's, the PSNR of a schedule calibrated at exactly its speed (a second round,
with plain again); then the rank correlation of predicted error
and measured PSNR for both measures (the error propagated to the final sample, the output error
alone); and it draws the Pareto plot (``fxprop.demo.plot``).
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
from fxprop.calibration.calibrate import measure  # noqa: E402
from fxprop.calibration.choice import choose_calibration  # noqa: E402
from fxprop.cli import calibration_calls  # noqa: E402
from fxprop.demo import load_digits_pipeline  # noqa: E402
from fxprop.demo.plot import pareto_plot  # noqa: E402
from fxprop.plan.schedules import deepcache_nonuniform, every, faster_diffusion  # noqa: E402

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


def calibrated_policy(measured, speed: float, steps: int, scheduler) -> tuple[dict, tuple]:
    """(accelerate options, spec) of the schedule calibrated at FLOP-ideal ``speed`` (printed)."""
    calibration = choose_calibration(measured, target_speedup=speed)
    print(calibration)
    return calibration.accelerate_options(steps, scheduler), (
        calibration.reuse, calibration.branch, calibration.forecast, calibration.key_steps)


def calibrated(measured, steps: int, scheduler) -> dict:
    """Name -> (accelerate options, spec) of the calibrated schedule of every target."""
    out = {}
    for target in TARGETS:
        start = time.perf_counter()
        out[f"calibrated {target}x"] = calibrated_policy(measured, target, steps, scheduler)
        print(f"choosing (with verification) at {target}x took "
              f"{time.perf_counter() - start:.1f} s")
    return out


def policy_row(base, measured, name: str, options: dict, spec: tuple) -> tuple[Row, tuple]:
    """The policy's accelerated pipeline, and (FLOP-ideal speedup, predicted error propagated
    to the final sample, output error alone)."""
    fxprop.accelerate(pipe := _pipe(base), **options)
    predicted = [measured.predict(*spec, propagated=p) for p in (True, False)]
    return Row(name, pipe), (_ideal(measured, spec[0], spec[1], spec[3]),
                             *[None if p is None else p[1] for p in predicted])


def rows_of(base, measured, policies: dict) -> tuple[list[Row], dict]:
    """A pipeline per policy, and name -> :func:`policy_row`'s figures."""
    rows, info = [Row("plain", _pipe(base))], {}
    for name, (options, spec) in policies.items():
        row, info[name] = policy_row(base, measured, name, options, spec)
        rows.append(row)
    return rows, info


def _pipe(base):
    pipe = type(base)(**base.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _near(measured, policies: dict) -> dict:
    """The hand-set policies within +-10% of a target's FLOP-ideal speedup."""
    cuts = {c.id for c in measured.cuts}
    return {name: (options, spec) for name, (options, spec) in policies.items()
            if spec[:2] in cuts and any(
                abs(_ideal(measured, *spec[:2], spec[3]) / t - 1) <= 0.1 for t in TARGETS)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-digit", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-interval", type=int, default=5)
    parser.add_argument("--samples", type=int, default=4,
                        help="rows of each calibration call's batch measured")
    parser.add_argument("--plot", default="bench-calibration.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = load_digits_pipeline()
    base.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    measured = measure(base, calibration_calls(), args.steps, max_interval=args.max_interval,
                       samples=args.samples, min_speedup=min(TARGETS))
    print(f"calibration (measurement) took {time.perf_counter() - start:.1f} s")
    policies = calibrated(measured, args.steps, base.scheduler)
    policies.update(_near(measured, hand_set(measured)))
    rows, info = rows_of(base, measured, policies)
    labels = [d for _ in range(args.per_digit) for d in range(10)]
    with torch.no_grad():
        run(rows, labels, 100, args.steps, 1000)
    score(rows, labels)
    matched = matched_rows(base, measured, rows, info, args.steps)
    if matched:   # a second round: plain again (the same images) and the matched schedules
        second = [Row("plain", rows[0].pipe), *matched]
        with torch.no_grad():
            run(second, labels, 100, args.steps, 1000)
        score(second, labels)
    report(rows, info, matched)
    pareto_plot([(r.name, info[r.name][0], r.metrics["psnr"]) for r in [*rows[1:], *matched]],
                args.plot,
                xlabel="FLOP-ideal speedup (x)", ylabel="PSNR against plain (dB)",
                title=f"calibrated (red stars) vs hand-set policies, digits model, "
                      f"{args.steps} DDIM steps")
    print(f"wrote {args.plot}")
    return 0


def _best_near(rows: list[Row], info: dict, target: float) -> Row | None:
    """The hand-set row of highest PSNR within +-10% of ``target``'s FLOP-ideal speedup."""
    near = [r for r in rows if r.name in info and not r.name.startswith("calibrated")
            and abs(info[r.name][0] / target - 1) <= 0.1]
    return max(near, key=lambda r: r.metrics["psnr"], default=None)


def matched_rows(base, measured, rows: list[Row], info: dict, steps: int) -> list[Row]:
    """Per target whose best hand-set policy is not at the calibrated schedule's speed, a
    schedule calibrated at exactly that policy's FLOP-ideal speedup (the same speed)."""
    out = []
    for target in TARGETS:
        best = _best_near(rows, info, target)
        if best is None:
            continue
        name = f"calibrated at {best.name}"
        if abs(info[best.name][0] - info[f"calibrated {target}x"][0]) < 1e-6 or name in info:
            continue   # already at its speed, or matched for another target
        options, spec = calibrated_policy(measured, info[best.name][0] * (1 - 1e-9), steps,
                                          base.scheduler)
        row, info[name] = policy_row(base, measured, name, options, spec)
        out.append(row)
    return out


def psnr_interval(row: Row, other: Row, plain: Row, rounds: int = 2000) -> tuple:
    """PSNR of ``row`` minus ``other``'s (dB) and its 95% paired bootstrap interval over the
    samples: how much of a difference the sample set can tell (a few samples far from plain
    dominate the pooled MSE, so two sets of seeds can rank close policies differently)."""
    reference = torch.cat(plain.images)
    errors = [(torch.cat(r.images) - reference).pow(2).flatten(1).mean(1).double()
              for r in (row, other)]
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(reference), (rounds, len(reference)), generator=g)
    diff = [10 * torch.log10(e[idx].mean(1)) for e in errors]
    spread = (diff[1] - diff[0]).quantile(torch.tensor([0.025, 0.975], dtype=torch.float64))
    point = 10 * torch.log10(errors[1].mean() / errors[0].mean())
    return float(point), float(spread[0]), float(spread[1])


def report(rows: list[Row], info: dict, matched: list[Row] = ()) -> None:
    print(f"{'policy':<30}{'ideal':>7}{'speedup':>8}{'PSNR dB':>9}{'acc':>7}{'FD':>8}"
          f"{'pred err':>10}")
    for row in [*rows, *matched]:
        m = row.metrics
        ideal, predicted, _ = info.get(row.name, (1.0, 0.0, 0.0))
        pred = "-" if predicted is None else f"{predicted:.4f}"
        print(f"{row.name:<30}{ideal:>7.2f}{m['speedup']:>8.2f}{m['psnr']:>9.1f}"
              f"{m['accuracy']:>7.1%}{m['fd']:>8.2f}{pred:>10}")
    for target in TARGETS:
        mine = next(r for r in rows if r.name == f"calibrated {target}x")
        best = _best_near(rows, info, target)
        line = f"{target}x: calibrated {mine.metrics['psnr']:.1f} dB ({info[mine.name][0]:.2f}x)"
        if best is not None:
            line += (f", best hand-set {best.name} {best.metrics['psnr']:.1f} dB "
                     f"({info[best.name][0]:.2f}x)")
            same = next((r for r in matched if r.name == f"calibrated at {best.name}"), None)
            if same is not None:
                line += f", calibrated at its speed {same.metrics['psnr']:.1f} dB"
            point, low, high = psnr_interval(same or mine, best, rows[0])
            line += f"; difference {point:+.1f} dB (95% bootstrap {low:+.1f} to {high:+.1f})"
        print(line)
    for index, measure_name in ((1, "error propagated to the final sample"),
                                (2, "output error alone")):
        scored = [(info[r.name][index], r.metrics["psnr"]) for r in [*rows, *matched]
                  if r.name in info and info[r.name][index] is not None]
        print(f"rank correlation of predicted error ({measure_name}) and -PSNR over "
              f"{len(scored)} policies: "
              f"{_spearman([p for p, _ in scored], [-q for _, q in scored]):.3f}")


def _spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (torch.tensor(x).argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


if __name__ == "__main__":
    sys.exit(main())
