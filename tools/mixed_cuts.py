"""Would a different cut per segment pay? Predicted by the error tables (#30; not a test).

    HF_HUB_OFFLINE=1 python tools/mixed_cuts.py --models digits patches shapes

Each model of ``tools/bench_calibration_models.py`` is measured as there (two calls, DDIM 50,
every cut, forecast orders 0-1, ``--max-interval``). A schedule whose segments (a key step and
the steps to the next) each take their own cut costs a whole UNet at the key step and the
cut's every-step part after it; its predicted error is the sum of its segments' table entries
(a segment's error depends on the key steps only: every cut's frontier is there at a key
step). A dynamic programme over key-step states minimises ``error + lambda * FLOPs`` for a
sweep of lambda (the lower convex hull of mixed schedules), beside the exact optimum of one cut
(``fxprop.calibration.optimise.options``). Per FLOP-ideal target it prints the least
predicted error of each, in dB of the final sample's relative error; the mixed schedule's
cuts, per segment. The tables rank schedules of one cut well, not across cuts (they add a
reuse segment's correlated errors as independent), so a predicted gain is a reason to verify,
not a result: ``--verify`` runs each target's best mixed schedule (``Measurement.accelerated``
with ``segments``) on the held-out calls beside the calibrated choice, with the paired gain.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from bench_calibration_models import model_case, scorer  # noqa: E402
from fxprop.calibration.calibrate import measure  # noqa: E402
from fxprop.calibration.choice import choose_calibration  # noqa: E402
from fxprop.calibration.optimise import options, state_after  # noqa: E402
from fxprop.calibration.significance import mean_db, paired_gain  # noqa: E402

TARGETS = (1.5, 2.0, 2.5, 3.0, 4.0)


def mixed(tables: dict, costs: dict, n: int, orders: tuple, lam: float, max_interval: int):
    """Least ``error + lam * FLOPs`` over schedules with a cut and a forecast order (of
    ``orders``) per segment: ``(error, FLOPs in whole-UNet steps, ((key, cut, order), ...))``.
    A state holds the last ``max(orders) + 1`` key steps; a segment of order ``o`` reads the
    table at the first ``o + 1`` of them."""
    best = {(0,): (0.0, 0.0, 0.0, None)}   # state -> (objective, error, flops, back pointer)
    done, depth = None, max(orders)
    for k in range(n):
        for state in [s for s in best if s[0] == k]:
            obj, err, flo, _ = best[state]
            for (cut, table), order in itertools.product(tables.items(), orders):
                seg, at = 0.0, state[:order + 1]
                for nxt in range(k + 1, min(n, k + max_interval) + 1):
                    f = 1 + (nxt - k - 1) * costs[cut]
                    entry = (obj + seg + lam * f, err + seg, flo + f, (state, cut, order))
                    if nxt == n:
                        done = entry if done is None or entry[0] < done[0] else done
                        break
                    child = state_after(state, nxt, depth)
                    if child not in best or entry[0] < best[child][0]:
                        best[child] = entry
                    if (at, nxt) not in table:
                        break
                    seg += table[at, nxt]
    return done[1], done[2], _path(best, done)


def _path(best: dict, entry: tuple) -> tuple:
    out = []
    while entry[3] is not None:
        state, cut, order = entry[3]
        out.append((state[0], cut, order))
        entry = best[state]
    return tuple(reversed(out))


def db(error_squared: float) -> float:
    return -10 * math.log10(max(error_squared, 1e-30))


def run_model(name: str, args) -> None:
    torch.manual_seed(0)
    source, calls, held = model_case(name)
    measured = measure(source, calls, orders=(0, 1), max_interval=args.max_interval,
                       min_speedup=min(args.targets), progress=False)
    print(f"\n== {name}")
    found = report(measured, args.targets, args.lambdas)
    if args.verify:
        verify(measured, held, found)


def report(measured, targets: list[float], lambdas: int = 80) -> None:
    """Per target: the least predicted error of one cut and order, of a cut per segment
    (each order alone), and of a cut and an order per segment."""
    n, tables = measured.num_steps, measured.tables()
    costs = {c.id: c.step_cost for c in measured.cuts}
    max_interval = measured.max_interval
    single = {order: [o for c in measured.cuts
                      for o in options(tables[c.id], n, order, c.id, c.step_cost)]
              for order in measured.orders}
    lams = torch.logspace(-8, 0, lambdas).tolist()
    hulls = {(order,): [mixed(tables, costs, n, (order,), lam, max_interval)
                        for lam in lams] for order in measured.orders}
    hulls[measured.orders] = [mixed(tables, costs, n, measured.orders, lam, max_interval)
                              for lam in lams]
    best = {}
    for target in targets:
        one = [o for found in single.values() for o in found
               if o.speedup >= target * (1 - 1e-9)]
        if not one:
            continue
        o = min(one, key=lambda o: o.error)
        line = (f"  {target:3.1f}x  one cut, one order {db(o.error):6.2f} dB ({o.speedup:.2f}x, "
                f"b{o.cut[1]} f{o.order}, {len(o.key_steps)} keys)")
        for orders, hull in hulls.items():
            mix = [h for h in hull if n / h[1] >= target * (1 - 1e-9)]
            if mix:
                err, flo, path = min(mix, key=lambda h: h[0])
                segs = " ".join(f"{k}:b{c[1]}f{r}" for k, c, r in path)
                line += (f"\n        mixed cuts, orders {orders}: {db(err):6.2f} dB "
                         f"({n / flo:.2f}x) {db(err) - db(o.error):+.2f} dB  [{segs}]")
                best[target] = (path, n / flo)
        print(line, flush=True)
    return best


def verify(measured, held: list, found: dict, verify_count: int = 6) -> None:
    """Run each target's best predicted schedule of a cut and order per segment on ``held``
    (the held-out calls) beside the calibrated choice at that target; print both and the
    paired gain of the mixed one."""
    score = scorer(measured, held)
    for target, (path, speed) in found.items():
        c = choose_calibration(measured, target_speedup=target, verify=verify_count)
        chosen = score((c.reuse, c.branch), c.forecast, c.key_steps)
        segments = {k: (cut, order) for k, cut, order in path}
        mixes = score(path[0][1], path[0][2], list(segments), segments)
        gain = paired_gain(mixes, chosen)
        print(f"  {target:3.1f}x  calibrated {c.predicted_speedup:.2f}x {-mean_db(chosen):6.2f} dB"
              f"  mixed {speed:.2f}x {-mean_db(mixes):6.2f} dB: {gain.mean:+.2f} dB "
              f"[{gain.low:+.2f}, {gain.high:+.2f}]", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits", "patches", "shapes"])
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    parser.add_argument("--max-interval", type=int, default=10)
    parser.add_argument("--lambdas", type=int, default=80)
    parser.add_argument("--verify", action="store_true", help="run the best mixed schedule "
                        "of each target on the held-out calls beside the calibrated choice")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.models:
        run_model(name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
