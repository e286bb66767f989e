"""Calibration: measure what reuse costs on the model itself, then choose the schedule.

A few plain generations are recorded (the UNet's calls and the final sample). For each,
:mod:`fxprop.propagation` measures how much an output error at a step moves the final sample
(a few replays from probed steps), and :mod:`fxprop.measure` the output error of every cut and
forecast order from every earlier key-step state, weighted by that gain: the error tables.
:mod:`fxprop.optimise` chooses the key steps of least predicted final error exactly per cut and
order; the best candidates (the optimiser's schedule, the every-N-th one of at most as many key
steps, as the hand-set policies place them, and the evenly spaced one of as many, for the two
best cuts and orders; the first ``verify`` of them) are then run accelerated on the calibration
calls with other noise (:attr:`Source.other`: a pipeline call's generators reseeded, a ComfyUI
seed drawn anew; samples the tables were not measured on; on the measurement's own graphs,
:meth:`Measurement.accelerated`) and the one whose final samples are nearest plain's is chosen,
at equal cost over the hand-set one only if it is nearer on every held-out call. The progress
bar counts UNet steps of the whole batch. Where the generations come from, and how they are
read, is a :class:`~fxprop.sources.Source` (:mod:`fxprop.sources`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from .calibration import Calibration, model_id
from .capture import FlatCall
from .forecast import check_forecast
from .measure import Measurement, states
from .optimise import (Option, check_budget, check_speedup_target, choose, options,
                       schedule_error, speedup, state_after)
from .propagation import final_of, gains, probe_steps, record
from .sources import Source, other_noise, source_of

__all__ = ["calibrate", "measure", "choose_calibration", "verified_choice", "error_curve",
           "other_noise", "Measurement", "states"]


def _flat_generation(source: Source, recorded: list, index: int) -> list[FlatCall]:
    flat = [source.flatten(args, kwargs) for args, kwargs in recorded]
    if len(flat) < 2:
        raise ValueError(f"call {index} ran the UNet {len(flat)} time(s): calibration needs a "
                         "generation of at least 2 steps")
    if source.calls_per_run is not None and len(flat) != source.calls_per_run:
        raise ValueError(f"call {index} ran the UNet {len(flat)} times, not "
                         f"{source.calls_per_run}: {source.why}")
    odd = next((j for j, f in enumerate(flat) if f.key != flat[0].key), None)
    if odd is not None:
        raise ValueError(f"call {index}: UNet call {odd} has other input shapes or options "
                         "than call 0; a calibrated generation must keep its signature")
    return flat


def _check_settings(calls: Any, orders: Sequence[int], max_interval: Any) -> None:
    if not isinstance(calls, (list, tuple)) or not calls:
        raise ValueError(f"calls must be a non-empty list (pipeline arguments as dicts, or "
                         f"sampling loops for a bare UNet), got {calls!r}")
    if not orders or any(check_forecast(o) is None for o in orders):
        raise ValueError(f"orders must be a non-empty list of forecast orders, got {orders!r}")
    if isinstance(max_interval, bool) or not isinstance(max_interval, int) or max_interval < 2:
        raise ValueError(f"max_interval (the longest segment measured) must be an int >= 2, "
                         f"got {max_interval!r}")


def calibrate(target: Any, calls: Sequence[Any], num_inference_steps: int | None = None, *,
              target_speedup: float | None = None, max_error: float | None = None,
              verify: int = 4, **settings: Any) -> Calibration:
    """Measure every cut and forecast order on plain generations (:func:`measure`, which takes
    ``settings``) and choose the schedule of least final error at ``target_speedup``
    (FLOP-ideal), or the fastest within ``max_error`` (predicted relative error of the final
    sample). ``verify``: candidates run accelerated to choose among (0: prediction only)."""
    check_budget(target_speedup, max_error)
    measured = measure(target, calls, num_inference_steps, min_speedup=target_speedup,
                       **settings)
    return choose_calibration(measured, target_speedup=target_speedup, max_error=max_error,
                              verify=verify)


def measure(target: Any, calls: Sequence[Any], num_inference_steps: int | None = None, *,
            scheduler: Any = None, orders: Sequence[int] = (0, 1), max_interval: int = 5,
            probes: int = 8, samples: int | None = 4, max_rows: int = 128,
            min_speedup: float | None = None, progress: bool = True) -> Measurement:
    """The error tables of every cut on the generations of ``calls`` (choose from them with
    :func:`choose_calibration`, once per budget).

    Args:
        target: a diffusers pipeline (``calls`` are dicts of its arguments), a bare UNet
            (``calls`` are your sampling loops, ``loop(unet)``; pass ``scheduler=``, the one
            your loop steps with) or a :class:`~fxprop.sources.Source` (``calls`` are what its
            ``make_run`` takes: seeds, for ComfyUI's). Calls must be deterministic given their
            generators.
        num_inference_steps: passed to every pipeline call (``None``: the calls' own).
        orders: forecast orders to consider (0 reuse, 1 linear, 2 quadratic).
        max_interval: the longest segment (key step to next key step) measured.
        probes: steps whose gain to the final sample is measured, shared out among the calls
            (each costs one replay from that step).
        samples: rows of each call's UNet batch the error tables are measured on (``None``:
            all of them).
        max_rows: rows of one run of an every-step part (states are stacked up to it).
        min_speedup: skip the cuts that cannot reach this FLOP-ideal speedup.
    """
    _check_settings(calls, orders, max_interval)
    source = source_of(target, num_inference_steps, scheduler)
    measurement = None
    with tqdm(desc="fxprop calibrate", unit="step", disable=not progress) as bar:
        for index, call in enumerate(calls):
            other = source.other(call)   # drawn before any run advances its generators
            run = source.make_run(call)
            rec = record(source.unet, run, source.scheduler)
            flat = _flat_generation(source, rec.calls, index)
            if measurement is None:
                bar.total = _work(len(flat), len(calls), probes, held_out=other is not call)
                bar.refresh()
                measurement = _prepare(source, flat, orders, max_interval, min_speedup,
                                       samples, max_rows)
                measurement.progress = progress
            steps = probe_steps(len(flat), max(probes, len(calls)))[index::len(calls)]
            _add_call(measurement, index, (run, rec, flat), steps, bar)
            measurement.replays.append((run, rec.final) if other is call else
                                       _held_out(measurement, source.make_run(other), bar))
            del rec, flat
    return measurement


def _held_out(measurement: Measurement, run: Callable, bar: Any) -> tuple:
    """``(run, plain final)`` that verification judges candidates on: the call on other noise,
    samples the error tables were not measured on (the optimiser's schedule is fitted to those,
    so judging it there favours it: on the digits model by 2 dB at 3x). A call that cannot be
    reseeded (a bare UNet's loop seeds its own noise) is judged on itself."""
    final = final_of(run, measurement.scheduler)
    bar.update(measurement.num_steps)
    return run, final


def _add_call(measurement: Measurement, index: int, recorded: tuple, steps: list[int],
              bar: Any) -> None:
    """Add one recorded call, ``(run, recording, flat calls)``, to the tables: its gains at
    ``steps`` and its errors."""
    run, rec, flat = recorded
    if len(flat) != measurement.num_steps:
        raise ValueError(f"call {index} ran {len(flat)} UNet steps, call 0 ran "
                         f"{measurement.num_steps}: calibrate one step count and scheduler at "
                         "a time")
    bar.update(len(flat))
    measurement.add_gains(gains(measurement.unet, run, rec, measurement.scheduler, steps, bar))
    measurement.measure(flat, measurement.source.positions(len(flat)), bar, rec.final)


def _work(num_steps: int, num_calls: int, probes: int, held_out: bool) -> int:
    """UNet steps of the whole measurement (for the progress bar): per call a recorded
    generation, its replays, the measured steps and (``held_out``) a plain generation on other
    noise for verification."""
    replays = sum(num_steps - j for j in probe_steps(num_steps, max(probes, num_calls)))
    return (3 if held_out else 2) * num_steps * num_calls + replays


def _prepare(source: Source, flat: list[FlatCall], orders: Sequence[int], max_interval: int,
             target_speedup: float | None, samples: int | None,
             max_rows: int) -> Measurement:
    """Capture and count FLOPs; with a FLOP budget, drop the cuts that cannot reach it."""
    num_steps = len(flat)
    measurement = Measurement(source, flat[0], orders, max_interval, samples, max_rows)
    measurement.num_steps = num_steps
    if target_speedup is not None:
        fewest = math.ceil(num_steps / max_interval)
        reach = {c.id: speedup(fewest, num_steps, c.step_cost) for c in measurement.cuts}
        check_speedup_target(target_speedup, max(reach.values()))
        measurement.keep(lambda c: reach[c.id] >= target_speedup * (1 - 1e-9))
    return measurement


# -- choosing -----------------------------------------------------------------------------------

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

