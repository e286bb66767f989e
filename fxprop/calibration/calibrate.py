"""Calibration: measure what reuse costs on the model itself, then choose the schedule.

A few plain generations are recorded (the UNet's calls and the final sample). For each,
:mod:`~fxprop.calibration.propagation` measures how much an output error at a step moves the
final sample (a few replays from probed steps), and :mod:`~fxprop.calibration.measure` the
output error of every cut and forecast order from every earlier key-step state, weighted by
that gain: the error tables. :mod:`~fxprop.calibration.choice` chooses the schedule from them
(:mod:`~fxprop.calibration.optimise`'s exact optimum per cut and order, then the best
candidates verified on the calibration calls with other noise: :attr:`Source.other`, a
pipeline call's generators reseeded, a ComfyUI seed drawn anew). The progress bar counts UNet
steps of the whole batch. Where the generations come from, and how they are read, is a
:class:`~fxprop.calibration.sources.Source`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..graph.capture import FlatCall
from ..plan.forecast import check_forecast
from .choice import choose_calibration
from .data import Calibration
from .measure import Measurement
from .optimise import check_budget, check_speedup_target, most_keys, speedup
from .propagation import final_of, gains, probe_steps, record
from .significance import MIN_SAMPLES
from .sources import Source, source_of

__all__ = ["calibrate", "measure", "held_out_for", "longest_segment", "MAX_INTERVAL"]

#: The longest segment measured unless a target needs longer ones (``max_interval=None``).
MAX_INTERVAL = 5


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
    if max_interval is not None and (isinstance(max_interval, bool) or not isinstance(
            max_interval, int) or max_interval < 2):
        raise ValueError(f"max_interval (the longest segment measured) must be an int >= 2 or "
                         f"None, got {max_interval!r}")


def calibrate(target: Any, calls: Sequence[Any], num_inference_steps: int | None = None, *,
              target_speedup: float | None = None, max_error: float | None = None,
              verify: int = 4, **settings: Any) -> Calibration:
    """Measure every cut and forecast order on plain generations (:func:`measure`, which takes
    ``settings``) and choose the schedule of least final error at ``target_speedup``
    (FLOP-ideal), or the fastest within ``max_error`` (predicted relative error of the final
    sample). ``verify``: fitted finalists run accelerated on held-out noise, beside the best hand-set
    schedule of each cut and order, to choose among (0: the least predicted error); a fitted schedule replaces the best hand-set one only where the
    held-out samples say it is better at 95% confidence (``Calibration.verdict``)."""
    check_budget(target_speedup, max_error)
    measured = measure(target, calls, num_inference_steps, min_speedup=target_speedup,
                       **settings)
    return choose_calibration(measured, target_speedup=target_speedup, max_error=max_error,
                              verify=verify)


def measure(target: Any, calls: Sequence[Any], num_inference_steps: int | None = None, *,
            scheduler: Any = None, orders: Sequence[int] = (0, 1),
            max_interval: int | None = None,
            probes: int = 8, samples: int | None = 4, max_rows: int = 128,
            min_speedup: float | None = None, held_out: int | None = None,
            progress: bool = True) -> Measurement:
    """The error tables of every cut on the generations of ``calls`` (choose from them with
    :func:`choose_calibration`, once per budget).

    Args:
        target: a diffusers pipeline (``calls`` are dicts of its arguments), a bare UNet
            (``calls`` are your sampling loops, ``loop(unet)``; pass ``scheduler=``, the one
            your loop steps with) or a :class:`~fxprop.calibration.sources.Source` (``calls`` are
            what its ``make_run`` takes: seeds, for ComfyUI's). Calls must be deterministic given
            their generators.
        num_inference_steps: passed to every pipeline call (``None``: the calls' own).
        orders: forecast orders to consider (0 reuse, 1 linear, 2 quadratic).
        max_interval: the longest segment (key step to next key step) measured (``None``:
            5, or longer where ``min_speedup`` needs it: :func:`longest_segment`, 38 at 6x
            on a UNet whose deepest branch costs 12% of a step; order-1 tables grow with its
            square).
        probes: steps whose gain to the final sample is measured, shared out among the calls
            (each costs one replay from that step).
        samples: rows of each call's UNet batch the error tables are measured on (``None``:
            all of them).
        max_rows: rows of one run of an every-step part (states are stacked up to it).
        min_speedup: skip the cuts that cannot reach this FLOP-ideal speedup.
        held_out: plain generations on other noise per call, whose rows verification judges
            finalists on (more: a surer choice, one plain and ``verify`` accelerated
            generations each; ``None``: enough for the 8 paired samples a significant
            difference needs, at least 1: 4 for two calls of one image each).
    """
    _check_settings(calls, orders, max_interval)
    if held_out is not None and (isinstance(held_out, bool) or not isinstance(held_out, int)
                                 or held_out < 1):
        raise ValueError(f"held_out (plain generations on other noise per call) must be an int "
                         f">= 1 or None, got {held_out!r}")
    source = source_of(target, num_inference_steps, scheduler)
    measurement, count = None, held_out
    with tqdm(desc="fxprop calibrate", unit="step", disable=not progress) as bar:
        for index, call in enumerate(calls):
            # drawn before any run advances the call's generators
            others = _draws(source, call, held_out or MIN_SAMPLES)
            run = source.make_run(call)
            rec = record(source.unet, run, source.scheduler)
            flat = _flat_generation(source, rec.calls, index)
            count = count or held_out_for(rec.final, len(calls))
            others = others[:count]
            if measurement is None:
                bar.total = _work(len(flat), len(calls), probes,
                                  held_out=0 if others[0] is call else len(others))
                bar.refresh()
                measurement = _prepare(source, flat, orders, max_interval, min_speedup,
                                       samples, max_rows)
                measurement.progress = progress
            steps = probe_steps(len(flat), max(probes, len(calls)))[index::len(calls)]
            _add_call(measurement, index, (run, rec, flat), steps, bar)
            measurement.replays += [(run, rec.final)] if others[0] is call else [
                _held_out(measurement, source.make_run(other), bar) for other in others]
            del rec, flat
    return measurement


def held_out_for(final: Any, num_calls: int) -> int:
    """Held-out generations per call for :data:`MIN_SAMPLES` paired samples (a sample is a
    row of the final batch)."""
    rows = final.shape[0] if isinstance(final, torch.Tensor) and final.ndim else 1
    return max(1, math.ceil(MIN_SAMPLES / (rows * num_calls)))


def _draws(source: Source, call: Any, count: int) -> list:
    """``count`` draws of ``call`` on other noise, each from the one before (``[call]`` if it
    cannot be reseeded)."""
    draws = [source.other(call)]
    while draws[0] is not call and len(draws) < count:
        draws.append(source.other(draws[-1]))
    return draws


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


def _work(num_steps: int, num_calls: int, probes: int, held_out: int) -> int:
    """UNet steps of the whole measurement (for the progress bar): per call a recorded
    generation, its replays, the measured steps and ``held_out`` plain generations on other
    noise for verification."""
    replays = sum(num_steps - j for j in probe_steps(num_steps, max(probes, num_calls)))
    return (2 + held_out) * num_steps * num_calls + replays


def _prepare(source: Source, flat: list[FlatCall], orders: Sequence[int], max_interval: int,
             target_speedup: float | None, samples: int | None,
             max_rows: int) -> Measurement:
    """Capture and count FLOPs; with a FLOP budget, drop the cuts that cannot reach it."""
    num_steps = len(flat)
    measurement = Measurement(source, flat[0], orders, max_interval, samples, max_rows)
    measurement.num_steps = num_steps
    if max_interval is None:
        max_interval = longest_segment(target_speedup, num_steps, measurement.cuts)
        measurement.max_interval = max_interval
    if target_speedup is not None:
        fewest = math.ceil(num_steps / max_interval)
        reach = {c.id: speedup(fewest, num_steps, c.step_cost) for c in measurement.cuts}
        check_speedup_target(target_speedup, max(reach.values()))
        measurement.keep(lambda c: reach[c.id] >= target_speedup * (1 - 1e-9))
    return measurement


def longest_segment(target: float | None, num_steps: int, cuts: list) -> int:
    """:data:`MAX_INTERVAL`, or where no cut reaches ``target`` with segments that long, 1.5
    times the longest segment of the every-N-th schedule of the most key steps that reach it
    (room to place them: at exactly that length there is one such schedule); every segment
    if no cut reaches it (the refusal then names the fastest schedule there is)."""
    if target is None:
        return MAX_INTERVAL
    most = max((most_keys(num_steps, c.step_cost, target) for c in cuts), default=0)
    if most < 1:
        return num_steps
    needed = math.ceil(num_steps / most)
    return MAX_INTERVAL if needed <= MAX_INTERVAL else min(num_steps, math.ceil(1.5 * needed))
