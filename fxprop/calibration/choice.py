"""Choosing a schedule from the error tables: predicted, then verified on held-out noise.

:mod:`fxprop.calibration.optimise` gives each cut and forecast order its Pareto options from
the tables of a :class:`~fxprop.calibration.measure.Measurement`. With a FLOP budget,
:mod:`~fxprop.calibration.finalists` screens the hand-set schedules and the fitted ones (the
optimiser's and the structured families') by the tables, and the finalists run accelerated on
the calibration calls with other noise (samples the tables were not measured on, on the
measurement's own graphs). Each row of each held-out batch is one paired sample: the finalist
nearest plain is chosen over the best hand-set one only where the paired bootstrap says it is
better, not by chance (:mod:`~fxprop.calibration.significance`); the
:class:`~fxprop.Calibration` records that verdict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import Calibration, model_id
from .finalists import Finalist, finalists
from .measure import Measurement
from .optimise import Option, check_budget, choose, options, state_after
from .propagation import final_of
from .significance import mean_db, paired_gain, rms

__all__ = ["choose_calibration", "race", "verified_choice", "final_errors", "row_errors",
           "error_curve"]


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


def _make(measurement: Measurement, chosen: Option, budget: dict, best: list[Option],
          verified: float | None = None, verdict: dict | None = None) -> Calibration:
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
        verified_error=verified, verdict=verdict or None)


def choose_calibration(measurement: Measurement, target_speedup: float | None = None,
                       max_error: float | None = None, verify: int = 4,
                       confidence: float = 0.95, early_stop: bool = True) -> Calibration:
    """The schedule for one budget: at ``target_speedup``, the verified choice among ``verify``
    fitted finalists and the best hand-set schedule of each cut and order
    (:func:`verified_choice`; 0: the least predicted error); within ``max_error``, the fastest
    predicted. ``early_stop``: verify held-out call by call, stopping the finalists clearly
    behind (:func:`race`); ``False``: every finalist on every call."""
    check_budget(target_speedup, max_error)
    budget = dict(target_speedup=target_speedup, max_error=max_error)
    found, best = _candidates(measurement, budget)
    chosen = choose(found, **budget)
    if target_speedup is None or verify < 1 or not measurement.replays:
        return _make(measurement, chosen, budget, best)
    hand, fitted = finalists(measurement, best, target_speedup, verify)
    replays = measurement.replays
    errors = race([*hand, *fitted], [[r] for r in replays] if early_stop else [replays],
                  lambda f, stage: final_errors(measurement, f.option, stage),
                  confidence, measurement.progress)
    pick, verdict = verified_choice(errors, [f for f in hand if f in errors], confidence)
    return _make(measurement, pick.option, budget, best, verified=rms(errors[pick]),
                 verdict=verdict)


def race(runs: list[Finalist], stages: Sequence, score: Callable[[Finalist, Any], list[float]],
         confidence: float = 0.95, progress: bool = True) -> dict[Finalist, list[float]]:
    """Per-sample errors of the finalists that survive verification, stage by stage (a stage:
    held-out calls; ``score(finalist, stage)`` runs it there): after each stage but the
    last, a finalist significantly worse than the leader so far (its paired interval below
    0) runs no further, unless it is the best hand-set or the best fitted one, which the
    verdict compares. Verification time goes to the finalists still in question."""
    errors = {f: [] for f in runs}
    with tqdm(total=len(runs) * len(stages), desc="fxprop verify", unit="run",
              disable=not progress) as bar:
        for index, stage in enumerate(stages):
            for f in errors:
                errors[f] += score(f, stage)
                bar.update()
            if index < len(stages) - 1:
                errors = _survivors(errors, confidence)
                bar.total = bar.n + len(errors) * (len(stages) - index - 1)
                bar.refresh()
    return errors


def _survivors(errors: dict[Finalist, list[float]], confidence: float
               ) -> dict[Finalist, list[float]]:
    """The finalists not significantly worse than the leader, and the best of each side."""
    leader = min(errors, key=lambda f: mean_db(errors[f]))
    keep = {leader}
    for side in (True, False):
        found = [f for f in errors if f.hand_set == side]
        keep.update([min(found, key=lambda f: mean_db(errors[f]))] if found else [])
    return {f: e for f, e in errors.items() if f in keep
            or not paired_gain(errors[leader], e, confidence).significant}


def verified_choice(errors: dict[Finalist, list[float]], hand: list[Finalist],
                    confidence: float = 0.95) -> tuple[Finalist, dict]:
    """The finalist nearest plain on the held-out samples (least mean log error), unless the
    best hand-set finalist is not significantly worse than it (paired bootstrap at
    ``confidence``): then the hand-set one, at its cost or below, which needs no fit to hold.
    Returns the pick and its verdict (how sure: its gain over the best of the other side)."""
    best = min(errors, key=lambda f: mean_db(errors[f]))
    base = min(hand, key=lambda f: mean_db(errors[f]), default=None)
    if base is None:
        return best, {}
    if best.hand_set:
        rival = min((f for f in errors if not f.hand_set), key=lambda f: mean_db(errors[f]),
                    default=None)
        return best, _verdict(best, rival, errors, confidence, kept=True)
    gain = paired_gain(errors[best], errors[base], confidence)
    if gain.significant:
        return best, _verdict(best, base, errors, confidence, kept=False)
    return base, _verdict(base, best, errors, confidence, kept=True)


def _verdict(pick: Finalist, rival: Finalist | None, errors: dict, confidence: float,
             kept: bool) -> dict:
    """What the choice was made against: ``pick``'s gain over ``rival`` in dB (mean and
    interval over the paired held-out samples)."""
    out = dict(chosen=pick.describe(), hand_set=kept, samples=len(errors[pick]),
               confidence=confidence)
    if rival is None:
        return {**out, "versus": None, "gain_db": None, "interval_db": None}
    gain = paired_gain(errors[pick], errors[rival], confidence)
    return {**out, "versus": rival.describe(), "gain_db": round(gain.mean, 3),
            "interval_db": [round(gain.low, 3), round(gain.high, 3)]}


def final_errors(measurement: Measurement, option: Option,
                 replays: Sequence[tuple] | None = None,
                 segments: Mapping[int, tuple] | None = None) -> list[float]:
    """Relative error of each final sample (each row of each call's batch) run accelerated
    with ``option`` (and ``segments``, as :meth:`Measurement.accelerated` takes them), against
    the plain finals of ``replays`` (``(run, final)`` pairs; default the measurement's
    held-out calls): the paired samples verification decides on."""
    errors = []
    for run, final in measurement.replays if replays is None else replays:
        forward = measurement.accelerated(option.cut, option.order, option.key_steps, segments)
        found = final_of(run, measurement.scheduler, measurement.unet, forward).double()
        errors += row_errors(found, final.double())
    return errors


def row_errors(found: torch.Tensor, true: torch.Tensor) -> list[float]:
    """``|found_i - true_i| / |true_i|`` of each row ``i`` of a batch."""
    diff = (found - true).flatten(1).norm(dim=1)
    return (diff / true.flatten(1).norm(dim=1).clamp_min(1e-30)).tolist()


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
