"""Choosing a schedule from the error tables: predicted, then verified on held-out noise.

:mod:`fxprop.calibration.optimise` gives each cut and forecast order its Pareto options from
the tables of a :class:`~fxprop.calibration.measure.Measurement`. For a FLOP budget the best
candidates (the optimiser's schedule, the every-N-th one of at most as many key steps, as the
hand-set policies place them, and the evenly spaced one of as many, for the two best cuts and
orders; the first ``verify`` of them) are run accelerated on the calibration calls with other
noise (samples the tables were not measured on, on the measurement's own graphs) and the one
whose final samples are nearest plain's is chosen, at equal cost over the hand-set one only if
it is nearer on every held-out call. The result is a :class:`~fxprop.Calibration`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tqdm.auto import tqdm

from .data import Calibration, model_id
from .measure import Measurement
from .optimise import Option, check_budget, choose, options, schedule_error, speedup, state_after
from .propagation import final_of

__all__ = ["choose_calibration", "verified_choice", "error_curve"]


def _rms(option: Option) -> Option:
    """The option with its error as the predicted relative final error (root of the sum)."""
    return Option(option.cut, option.order, option.key_steps, option.num_steps,
                  option.speedup, math.sqrt(option.error))


def _candidates(measurement: Measurement, budget: dict) -> tuple[list[Option], list[Option]]:
    """Every cut and order's Pareto options, and the best option of each at the budget."""
    tables, found, best = measurement.tables(), [], []
    for cut in measurement.cuts:
        for order in measurement.orders:
            these = [_rms(o) for o in options(tables[cut.id], measurement.num_steps, order,
                                              cut.id, cut.step_cost)]
            found += these
            try:
                best.append(choose(these, **budget))
            except ValueError:
                continue
    return found, best


def _even(measurement: Measurement, option: Option) -> Option | None:
    """The evenly spaced schedule with as many key steps as ``option`` (``None`` if a segment
    is not measured)."""
    n, count = measurement.num_steps, len(option.key_steps)
    keys = tuple(sorted({round(i * n / count) for i in range(count)}))
    return _schedule(measurement, option, keys) if len(keys) == count else None


def _interval(measurement: Measurement, option: Option) -> Option | None:
    """The hand-set schedule of at most as many key steps as ``option`` (every N-th step from
    0, as the nodes' and presets' ``interval``): a finalist, so that a calibrated schedule is
    chosen over it only where it verifies better (``None`` if a segment is not measured)."""
    n = measurement.num_steps
    return _schedule(measurement, option, tuple(range(0, n, math.ceil(n / len(option.key_steps)))))


def _schedule(measurement: Measurement, option: Option, keys: tuple[int, ...]) -> Option | None:
    """``option``'s cut and order with key steps ``keys``, its speedup and predicted error
    (``None`` if a segment is not measured)."""
    n = measurement.num_steps
    cut = next(c for c in measurement.cuts if c.id == option.cut)
    error = schedule_error(cut.table(measurement.gain_curve()), keys, n, option.order)
    if math.isinf(error):
        return None
    return Option(option.cut, option.order, keys, n, speedup(len(keys), n, cut.step_cost),
                  math.sqrt(error))


def _make(measurement: Measurement, chosen: Option, budget: dict, best: list[Option],
          verified: float | None = None) -> Calibration:
    cut = next(c for c in measurement.cuts if c.id == chosen.cut)
    table = measurement.tables()[cut.id]
    return Calibration(
        reuse=cut.reuse, branch=cut.branch, forecast=chosen.order, forecast_in=cut.forecast_in,
        forecast_reach=cut.reach, key_steps=chosen.key_steps, num_steps=measurement.num_steps,
        num_inference_steps=measurement.source.num_inference_steps,
        scheduler=measurement.source.name, sigmas=measurement.source.sigmas,
        model=model_id(measurement.unet), weights=measurement.source.digest(),
        predicted_speedup=chosen.speedup, predicted_error=chosen.error,
        error_curve=error_curve(table, chosen.key_steps, measurement.num_steps, chosen.order),
        budget={k: v for k, v in budget.items() if v is not None},
        alternatives=tuple((o.cut[0], o.cut[1], o.order, o.speedup, o.error) for o in best),
        verified_error=verified)


def choose_calibration(measurement: Measurement, target_speedup: float | None = None,
                       max_error: float | None = None, verify: int = 4) -> Calibration:
    """The schedule for one budget: least predicted error at ``target_speedup`` (then, with
    ``verify``, the least measured final error among that many candidates run accelerated
    on the calibration calls with other noise), or the fastest predicted within ``max_error``."""
    check_budget(target_speedup, max_error)
    budget = dict(target_speedup=target_speedup, max_error=max_error)
    found, best = _candidates(measurement, budget)
    chosen = choose(found, **budget)
    if target_speedup is None or verify < 1 or not measurement.replays:
        return _make(measurement, chosen, budget, best)
    ranked = sorted(best, key=lambda o: o.error)[: max(1, (verify + 1) // 2)]
    groups = [(o, _interval(measurement, o), _even(measurement, o)) for o in ranked]
    if not groups:
        return _make(measurement, chosen, budget, best)
    finalists: dict = {}
    for o in (o for group in groups for o in group if o is not None):
        finalists.setdefault((o.cut, o.order, o.key_steps), o)
    scored = [(_final_errors(measurement, o), o) for o in tqdm(
        list(finalists.values())[:verify], desc="fxprop verify", unit="schedule",
        disable=not measurement.progress)]
    errors, chosen = verified_choice(scored, groups[0][1])
    return _make(measurement, chosen, budget, best, verified=_rms_of(errors))


def verified_choice(scored: list[tuple[list[float], Option]],
                    hand_set: Option | None) -> tuple[list[float], Option]:
    """The finalist of least error (root mean square over the held-out calls), unless the
    hand-set schedule is a finalist of the same cost (cut and number of key steps) that it
    does not beat on every call: at equal cost, a schedule fitted to the tables replaces the
    hand-set one only where it verifies better throughout (on the ComfyUI digits twin at 3x,
    two held-out calls ranked a fitted schedule 1% ahead of every 4th step, 0.0265 to 0.0267,
    whose error on the benchmark's 50 samples was twice that one's, 0.048 to 0.023)."""
    errors, chosen = min(scored, key=lambda s: _rms_of(s[0]))
    base = next((s for s in scored if hand_set is not None and s[1] == hand_set), None)
    if base is None or (base[1].cut, len(base[1].key_steps)) != \
            (chosen.cut, len(chosen.key_steps)) or all(
                e < b for e, b in zip(errors, base[0])):
        return errors, chosen
    return base


def _rms_of(errors: list[float]) -> float:
    return math.sqrt(sum(e * e for e in errors) / len(errors))


def _final_errors(measurement: Measurement, option: Option) -> list[float]:
    """Relative error of the final sample of each calibration call run accelerated with
    ``option``."""
    errors = []
    for run, final in measurement.replays:
        forward = measurement.accelerated(option.cut, option.order, option.key_steps)
        found = final_of(run, measurement.scheduler, measurement.unet, forward).double()
        errors.append(float((found - final.double()).norm() /
                            final.double().norm().clamp_min(1e-30)))
    return errors


def error_curve(table: dict, keys: Sequence[int], num_steps: int, order: int) -> tuple:
    """Each step's predicted share of the squared relative final error (0 at key steps)."""
    curve, state = [], ()
    for j in range(num_steps):
        if j in keys:
            state = state_after(state, j, order)
            curve.append(0.0)
        else:
            curve.append(table[state, j])
    return tuple(curve)
