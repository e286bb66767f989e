"""Calibration against every hand-set policy, on three models, with paired intervals (#30).

    HF_HUB_OFFLINE=1 python tools/bench_calibration_models.py            # all three models
    HF_HUB_OFFLINE=1 python tools/bench_calibration_models.py --models shapes --targets 2 4

Models: the shipped ``digits`` (diffusers ``UNet2DConditionModel``, CFG 1.5, epsilon), and
tools/bench_models.py's ``patches`` (``UNet2DModel`` on photo patches, epsilon) and ``shapes``
(LDM ``UNetModel``, class labels, v-prediction, cosine schedule), all DDIM 50. Each is
calibrated once as a user would (two calls, ``fxprop.calibration.calibrate.measure``), then a
schedule is chosen per FLOP-ideal target (``choose_calibration``, the verified choice). Every
policy, hand-set (every N-th step, N = 2 .. ``--max-interval``, of every measured cut and
forecast order 0-1) and calibrated, runs on the measurement's own graphs
(``Measurement.accelerated``, exactly what ``fxprop.accelerate`` runs, prior noise off) on
held-out samples no calibration step saw (``--samples``, default >= 60), and is scored by its
per-sample PSNR against plain (peak 2: images in [-1, 1]). Per model and target it prints the
calibrated schedule, the best hand-set policy at or below its FLOPs (speedup >= the
calibrated one's), the paired gain in dB with its 95% bootstrap interval, and the verdict:
``above`` (interval above 0), ``tie`` (interval holds 0), ``BELOW`` (interval below 0). Also
the optimiser's schedule alone (``verify=0``) as the choice without verification, and at 4x the
best hand-set policy at 2.5x; and every N-th step of the DeepCache node's defaults (branch 0,
forecast 1) with and without the last step as a key step. Minutes per model on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

import bench_models  # noqa: E402
from common import verdict  # noqa: E402
from fxprop.calibration.calibrate import measure  # noqa: E402
from fxprop.calibration.choice import choose_calibration, final_errors  # noqa: E402
from fxprop.calibration.families import every_n  # noqa: E402
from fxprop.calibration.optimise import Option  # noqa: E402
from fxprop.calibration.propagation import final_of  # noqa: E402
from fxprop.calibration.significance import paired_gain  # noqa: E402
from fxprop.calibration.sources import Source  # noqa: E402

TARGETS = (1.5, 2.0, 2.5, 3.0, 4.0, 6.0)
STEPS = 50
BATCH = 16


def _loop(name: str, unet, scheduler, seed: int):
    """A DDIM loop of ``BATCH`` samples of model ``name`` from noise seeded ``seed``."""
    def run():
        gen = torch.Generator().manual_seed(seed)
        channels = 3 if name == "patches" else 1
        x = torch.randn(BATCH, channels, 16, 16, generator=gen)
        labels = torch.arange(BATCH) % 3
        scheduler.set_timesteps(STEPS)
        with torch.no_grad():
            for t in scheduler.timesteps:
                out = bench_models.call(unet, name, x, t.expand(BATCH), labels)
                x = scheduler.step(out, t, x).prev_sample
        return x
    return run


def model_case(name: str) -> tuple[Source, list, list]:
    """``(source, calibration calls, held-out calls)`` of a model; a held-out call is
    ``run()``."""
    if name == "digits":
        from fxprop.cli import calibration_calls
        from fxprop.calibration.sources import source_of
        from fxprop.demo import load_digits_pipeline
        pipe = load_digits_pipeline()
        pipe.set_progress_bar_config(disable=True)
        source = source_of(pipe, STEPS, None)
        held = [source.make_run(dict(labels=list(range(10)), output_type="pt",
                                     generator=torch.Generator().manual_seed(1000 + s)))
                for s in range(6)]
        return source, calibration_calls(), held
    unet, scheduler = bench_models.load(name), bench_models.scheduler(name)
    source = Source(unet, scheduler, lambda seed: _loop(name, unet, scheduler, seed),
                    f"{type(scheduler).__name__}", other=lambda seed: seed + 7919,
                    num_inference_steps=STEPS)
    return source, [100, 101], [_loop(name, unet, scheduler, 1000 + s) for s in range(4)]


def scorer(measured, held: list):
    """``score(cut, order, keys, segments=None)``: per-sample relative errors of the policy
    on ``held`` (``choice.final_errors`` against plain finals computed once)."""
    replays = [(run, final_of(run, measured.scheduler).double()) for run in held]

    def score(cut, order, keys, segments=None) -> list[float]:
        return final_errors(measured, Option(cut, order, tuple(keys), measured.num_steps, 0, 0),
                            replays, segments)
    # a sample's PSNR (peak 2) is its offset minus 20 log10 of its relative error
    score.offsets = [10 * math.log10(4 * f[0].numel() / max(float(r.pow(2).sum()), 1e-30))
                     for _, f in replays for r in f]
    return score


def hand_set(measured, max_interval: int, floor: float = 1.0) -> dict:
    """name -> (cut, order, keys, FLOP-ideal speedup) of every hand-set policy at ``floor``
    FLOP-ideal speedup or faster (the slower ones are compared with no target)."""
    out, n = {}, measured.num_steps
    for cut in measured.cuts:
        label = "encoder" if cut.reuse == "encoder" else f"deep b{cut.branch}"
        for order in measured.orders:
            for interval in range(2, max_interval + 1):
                keys = every_n(n, interval)
                found = measured.predict(cut.reuse, cut.branch, order, keys)
                if found is not None and found[0] >= floor * (1 - 1e-9):
                    out[f"{label} N={interval} f{order}"] = (cut.id, order, keys, found[0])
    return out


def psnr(errors: list[float], offsets: list[float]) -> float:
    """Mean per-sample PSNR in dB against plain, from relative errors."""
    return sum(o - 20 * math.log10(max(e, 1e-12)) for e, o in zip(errors, offsets)) / len(errors)


def calibrated(measured, target: float, verify: int) -> tuple | None:
    """``(cut, order, keys, speedup, calibration)`` chosen at ``target`` (``None`` if no
    measured schedule reaches it)."""
    try:
        c = choose_calibration(measured, target_speedup=target, verify=verify)
    except ValueError as err:
        print(f"  {target}x: {err}")
        return None
    return (c.reuse, c.branch), c.forecast, c.key_steps, c.predicted_speedup, c


def compare(name: str, found: tuple, hands: dict, scored: dict, offsets: list) -> tuple:
    """Print the calibrated row against the best hand-set policy at or below its FLOPs;
    return ``(verdict, calibrated PSNR)``."""
    cut, order, keys, speed, c = found
    errors = scored[cut, order, keys]
    fit = {k: v for k, v in hands.items() if v[3] >= speed * (1 - 1e-9)}
    mine = psnr(errors, offsets)
    line = (f"  {name:<22} {speed:5.2f}x {mine:6.2f} dB  {len(keys):2d} keys, "
            f"{cut[0]} {cut[1]}, f{order}")
    if not fit:
        print(line + "  (no hand-set policy at or below its FLOPs)")
        return "above", mine
    best = max(fit, key=lambda k: psnr(scored[hands[k][:3]], offsets))
    gain = paired_gain(errors, scored[hands[best][:3]])
    found_verdict = verdict(gain)
    print(f"{line}  vs {best} ({fit[best][3]:.2f}x "
          f"{psnr(scored[hands[best][:3]], offsets):.2f} dB): {gain.mean:+.2f} dB "
          f"[{gain.low:+.2f}, {gain.high:+.2f}] {found_verdict}")
    if c is not None and c.verdict:
        print(f"      verdict: {c.verdict}")
    return found_verdict, mine


def _without_early_stop(measured, target: float, verify: int, chosen) -> str:
    """The same choice with every finalist verified on every held-out call: its time, and
    whether it picks the same schedule (the early stop's evidence)."""
    start = time.perf_counter()
    full = choose_calibration(measured, target_speedup=target, verify=verify, early_stop=False)
    same = (full.reuse, full.branch, full.forecast, full.key_steps) == (
        chosen.reuse, chosen.branch, chosen.forecast, chosen.key_steps)
    return (f"; without early stop {time.perf_counter() - start:.1f} s, "
            f"{'same pick' if same else 'OTHER PICK: '}"
            + ("" if same else f"{len(full.key_steps)} keys, b{full.branch} f{full.forecast}"))


def last_step(measured, score, hands: dict, scored: dict) -> None:
    """Every N-th step with and without the last step as a key step, deep branch 0 and a
    linear forecast (the DeepCache node's defaults): the evidence for or against a key step
    at the end by default."""
    n = measured.num_steps
    for name, (cut, order, keys, speed) in hands.items():
        if cut != ("deep", 0) or order != 1 or keys[-1] == n - 1:
            continue
        more = (*keys, n - 1)
        found = measured.predict(cut[0], cut[1], order, more)
        if found is None:
            continue
        plus = score(cut, order, more)
        gain = paired_gain(plus, scored[cut, order, keys])
        print(f"  {name:<18} {speed:.2f}x {psnr(scored[cut, order, keys], score.offsets):6.2f} dB"
              f"  + last step {found[0]:.2f}x {psnr(plus, score.offsets):6.2f} dB: "
              f"{gain.mean:+.2f} dB [{gain.low:+.2f}, {gain.high:+.2f}]")


def run_model(name: str, args) -> list[tuple]:
    """Calibrate ``name``, score every policy, print the table; return its verdict rows. The
    targets no schedule reaches with segments of ``--max-interval`` are measured again as a
    user's calibration at that target would be (``max_interval=None``: segments as long as it
    needs)."""
    torch.manual_seed(0)
    source, calls, held = model_case(name)
    floor = min([*args.targets, *([2.5] if 4.0 in args.targets else [])])
    rows, later = _targets(name, (source, calls, held), args.targets, args.max_interval,
                           floor, args)
    for target in later:
        rows += _targets(name, (source, calls, held), [target], None, target, args)[0]
    return rows


def _targets(name: str, case: tuple, targets: list[float], max_interval: int | None,
             floor: float, args) -> tuple[list[tuple], list[float]]:
    """One measurement, the calibrated choice at each of ``targets`` against every hand-set
    policy at ``floor`` or faster: ``(verdict rows, targets not reached)``."""
    source, calls, held = case
    start = time.perf_counter()
    try:
        measured = measure(source, calls, orders=(0, 1), max_interval=max_interval,
                           min_speedup=min(targets), progress=False)
    except ValueError as err:   # no cut reaches min(targets) with these segments
        print(f"\n== {name}, segments up to {max_interval}: {err}")
        return [], list(targets)
    print(f"\n== {name}: measured in {time.perf_counter() - start:.0f} s, segments up to "
          f"{measured.max_interval}; cuts " + ", ".join(
              f"{c.reuse} {c.branch} (step cost {c.step_cost:.3f})" for c in measured.cuts))
    score, hands = scorer(measured, held), hand_set(measured, measured.max_interval, floor)
    scored = {v[:3]: score(*v[:3]) for v in hands.values()}
    print(f"  {len(hands)} hand-set policies on {len(next(iter(scored.values())))} held-out "
          f"samples ({time.perf_counter() - start:.0f} s)")
    rows, best_at, missing = [], {}, []
    for target in targets:
        for verify, label in ((args.verify, f"calibrated {target}x"),
                              (0, f"optimiser only {target}x")):
            t0 = time.perf_counter()
            found = calibrated(measured, target, verify)
            if found is None:
                missing += [target] if verify else []
                break
            took = time.perf_counter() - t0
            scored.setdefault(found[:3], score(*found[:3]))
            outcome, mine = compare(label, found, hands, scored, score.offsets)
            if verify:
                print(f"      chosen in {took:.1f} s" + _without_early_stop(
                    measured, target, verify, found[4]))
                rows.append((name, target, outcome))
                best_at[target] = mine
    if args.last_step and max_interval is not None:
        last_step(measured, score, hands, scored)
    if 4.0 in best_at:
        at25 = [psnr(scored[v[:3]], score.offsets) for v in hands.values() if v[3] >= 2.5]
        print(f"  4x calibrated {best_at[4.0]:.2f} dB; best hand-set at >= 2.5x "
              f"{max(at25):.2f} dB")
    return rows, missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits", "patches", "shapes"])
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    parser.add_argument("--max-interval", type=int, default=10)
    parser.add_argument("--verify", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-last-step", dest="last_step", action="store_false",
                        help="skip every N-th step with and without a key step at the end")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [row for name in args.models for row in run_model(name, args)]
    counts = {v: sum(r[2] == v for r in rows) for v in ("above", "tie", "BELOW")}
    print(f"\nverdicts over {len(rows)} (model, target) pairs: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
