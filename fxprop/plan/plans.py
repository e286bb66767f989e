"""The plan of one generation, made before its loop: key steps, segments, noise injection.

Everything the runtime decides per step is looked up here, so no decision is taken inside
compiled code and no device value is read in the hot loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .forecast import Weights, check_forecast, forecast_weights
from .schedules import Schedule

__all__ = ["Segment", "Plan", "make_plan"]


@dataclass(frozen=True)
class Segment:
    """A key step and the steps after it that reuse its frontier: ``range(start, stop)``."""

    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Plan:
    timesteps: tuple[float, ...]   # the timestep of every step, as host numbers
    is_key: tuple[bool, ...]
    segments: tuple[Segment, ...]
    inject: tuple[bool, ...]       # add prior noise to the latent before this step
    weights: tuple[Weights, ...]   # the key frontiers each step reads (see fxprop.plan.forecast)
    forecast: int                  # the forecast order the weights were made with

    def __len__(self) -> int:
        return len(self.timesteps)

    def segment_of(self, step: int) -> Segment:
        for segment in self.segments:
            if segment.start <= step < segment.stop:
                return segment
        raise IndexError(f"step {step} is outside the plan of {len(self)} steps")


def make_plan(timesteps: torch.Tensor | list, schedule: Schedule,
              num_train_timesteps: int | None = None, forecast: int = 0,
              positions: Sequence[float] | None = None, reach: float = math.inf) -> Plan:
    """Plan a generation over ``timesteps`` (the steps it runs, from its first), with the
    frontier of every non-key step forecast at order ``forecast`` (0: reused as cached) in the
    variable ``positions`` (one per step; default the step index) up to ``reach`` (see
    :func:`fxprop.plan.forecast.forecast_weights`)."""
    values = tuple(float(t) for t in torch.as_tensor(timesteps).flatten().tolist())
    n = len(values)
    if n == 0:
        raise ValueError("cannot plan a generation of 0 steps")
    keys = set(schedule(n))
    if 0 not in keys:
        raise ValueError(f"the key-step schedule gave {sorted(keys)} for {n} steps, without 0")
    is_key = tuple(i in keys for i in range(n))
    starts = sorted(keys)
    segments = tuple(Segment(a, b) for a, b in zip(starts, starts[1:] + [n]))
    half = None if num_train_timesteps is None else 0.5 * num_train_timesteps
    inject = tuple(half is not None and t < half for t in values)
    if positions is not None and len(positions) != n:
        raise ValueError(f"positions has {len(positions)} entries for {n} steps")
    weights = forecast_weights(is_key, check_forecast(forecast), positions, reach)
    return Plan(values, is_key, segments, inject, weights, forecast)
