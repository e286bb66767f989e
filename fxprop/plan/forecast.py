"""Forecasting the frontier: extrapolate the cached features between key steps.

Both seeds freeze the frontier for a whole segment. The tensors that cross a cut drift
smoothly from step to step, so the frontiers cached at the last key steps say where they are
heading (finite differences, as TaylorSeer does for DiT blocks). At a non-key step ``j`` whose
last key steps are ``k > k' (> k'')``, the frontier used is the polynomial through the frontiers
cached at those key steps, evaluated at ``j`` (the variable is the step index):

* order 0: ``f_k`` (reuse: what the seeds do);
* order 1: ``f_k + (j - k) / (k - k') * (f_k - f_k')``;
* order 2: the Lagrange polynomial through ``k, k', k''``.

Until enough key steps exist the highest order available is used. The polynomial's variable
(``forecast_in`` of a policy) is the step index (``"step"``) or the scheduler's signal level
``sqrt(alpha_bar)`` of each step (``"signal"``, :func:`signal_levels`; key steps at the same
level, as Heun's paired calls, count once). ``reach`` bounds how far past the last key step a
forecast goes, as a multiple of the last two key steps' distance (long segments saturate
instead of overshooting). A forecast is a weighted sum ``sum_i w_i f_i`` whose weights depend
only on the plan, so they are plan data (:func:`forecast_weights`, made before the loop); at
run time :class:`KeyFrontiers` keeps the last ``order + 1`` key frontiers of one generation and
forms the sums (a few element-wise ops between the two graph parts, so compiled parts never see
the weights and never recompile).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["FORECAST_ORDERS", "FORECAST_VARIABLES", "check_forecast", "check_forecast_in",
           "check_reach", "lagrange", "forecast_weights", "signal_levels", "sigma_signal",
           "Weights", "KeyFrontiers"]

#: Orders a policy's ``forecast`` takes: 0 reuse, 1 linear, 2 quadratic.
FORECAST_ORDERS = (0, 1, 2)
#: The variables a forecast's polynomial can be in (a policy's ``forecast_in``).
FORECAST_VARIABLES = ("step", "signal")

#: ``((key step, weight), ...)``: the frontier of a step as a weighted sum of key frontiers.
Weights = tuple[tuple[int, float], ...]


def check_forecast(order: Any) -> int:
    """``order`` if it is 0, 1 or 2 (not a bool), else ``ValueError`` naming it."""
    if isinstance(order, bool) or not isinstance(order, int) or order not in FORECAST_ORDERS:
        raise ValueError(f"forecast must be one of {list(FORECAST_ORDERS)} (0: reuse the key "
                         f"step's frontier, 1: linear, 2: quadratic extrapolation), got "
                         f"{order!r}")
    return order


def check_forecast_in(variable: Any) -> str:
    if variable not in FORECAST_VARIABLES:
        raise ValueError(f"forecast_in must be one of {list(FORECAST_VARIABLES)} (the step "
                         f"index, or the scheduler's signal level sqrt(alpha_bar)), got "
                         f"{variable!r}")
    return variable


def check_reach(reach: Any) -> float:
    if (isinstance(reach, bool) or not isinstance(reach, (int, float)) or math.isnan(reach)
            or reach <= 0):
        raise ValueError(f"forecast_reach must be a positive number (math.inf: unbounded), "
                         f"got {reach!r}")
    return reach


def sigma_signal(sigmas: Sequence[float]) -> list[float]:
    """``sqrt(alpha_bar) = 1 / sqrt(1 + sigma^2)`` of each sigma of a k-diffusion grid."""
    return [1 / (1 + float(s) ** 2) ** 0.5 for s in sigmas]


def signal_levels(scheduler: Any, timesteps: Any = None) -> list[float]:
    """``sqrt(alpha_bar)`` of every step of ``scheduler`` (its ``timesteps``, or the given
    ones): from its ``sigmas`` (``1 / sqrt(1 + sigma^2)``) when it has one per step, else from
    its ``alphas_cumprod`` at the timesteps."""
    steps = torch.as_tensor(scheduler.timesteps if timesteps is None else timesteps).flatten()
    sigmas = getattr(scheduler, "sigmas", None)
    if (timesteps is None and isinstance(sigmas, torch.Tensor) and sigmas.ndim == 1
            and len(sigmas) >= len(steps)):
        return (1 / (1 + sigmas[: len(steps)].double() ** 2).sqrt()).tolist()
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if isinstance(alphas, torch.Tensor):
        return alphas.double()[steps.round().long().cpu()].sqrt().tolist()
    raise ValueError(f"{type(scheduler).__name__} has neither sigmas nor alphas_cumprod, so "
                     "fxprop cannot tell the signal level of its steps; use forecast_in='step'")


def lagrange(xs: Sequence[float], x: float) -> tuple[float, ...]:
    """The Lagrange basis through the distinct points ``xs``, evaluated at ``x``."""
    weights = []
    for i, xi in enumerate(xs):
        w = 1.0
        for m, xm in enumerate(xs):
            if m != i:
                w *= (x - xm) / (xi - xm)
        weights.append(w)
    return tuple(weights)


def forecast_weights(is_key: Sequence[bool], order: int,
                     positions: Sequence[float] | None = None,
                     reach: float = math.inf) -> tuple[Weights, ...]:
    """Per step, the key frontiers its frontier is made of and their weights.

    A key step reads its own frontier; a non-key step the polynomial of degree ``order``
    (lower while fewer key steps exist) through its last key steps at distinct ``positions``
    (default: the step indices), evaluated at its position, at most ``reach`` times the last
    two key positions' distance past the last one.
    """
    x = [float(i) for i in range(len(is_key))] if positions is None else list(positions)
    keys: list[int] = []
    out: list[Weights] = []
    for step, key in enumerate(is_key):
        if key:
            keys.append(step)
            out.append(((step, 1.0),))
            continue
        if not keys:
            raise ValueError("step 0 must be a key step")
        used = _last_distinct(keys, x, order + 1)
        xs = [x[k] for k in used]
        at = x[step]
        if reach < math.inf and len(xs) > 1:
            limit = reach * abs(xs[0] - xs[1])
            at = xs[0] + max(-limit, min(limit, at - xs[0]))
        out.append(tuple(zip(used, lagrange(xs, at))))
    return tuple(out)


def _last_distinct(keys: list[int], x: list[float], count: int) -> list[int]:
    """The last key steps, most recent first, skipping any at an already used position."""
    used: list[int] = []
    for k in reversed(keys):
        if all(x[k] != x[u] for u in used):
            used.append(k)
            if len(used) == count:
                break
    return used


class KeyFrontiers:
    """The frontiers of one generation's last ``depth`` key steps, for one call signature.

    Frontiers of another signature (``key``) are never mixed: adding one drops the others.
    """

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.key: Any = None
        self._steps: list[int] = []
        self._frontiers: list[tuple[torch.Tensor, ...]] = []

    def add(self, step: int, key: Any, frontier: Sequence[torch.Tensor]) -> None:
        if key != self.key:
            self.clear()
            self.key = key
        if self._steps and self._steps[-1] == step:  # another call of the same key step
            self._steps.pop(), self._frontiers.pop()
        self._steps.append(step)
        self._frontiers.append(tuple(frontier))
        del self._steps[: -self.depth], self._frontiers[: -self.depth]

    def clear(self) -> None:
        self.key, self._steps, self._frontiers = None, [], []

    @property
    def steps(self) -> tuple[int, ...]:
        """The key steps whose frontiers are kept, oldest first."""
        return tuple(self._steps)

    def has(self, key: Any) -> bool:
        return bool(self._steps) and key == self.key

    def at(self, step: int, weights: Weights) -> tuple[torch.Tensor, ...]:
        """The frontier of ``step``: the weighted sum of the key frontiers ``weights`` names."""
        terms = self._terms(step, weights)
        if len(terms) == 1 and terms[0][1] == 1.0:
            return terms[0][0]
        return tuple(_combine([f[p] for f, _ in terms], [w for _, w in terms])
                     for p in range(len(terms[0][0])))

    def batched(self, steps: range, weights: Sequence[Weights]) -> list[torch.Tensor]:
        """The frontiers of ``steps`` stacked along the batch, step-major (parallel mode)."""
        terms = [self._terms(s, w) for s, w in zip(steps, weights)]
        used = sorted({id(f): f for t in terms for f, _ in t}.values(), key=self._index)
        table = [[sum(w for f, w in t if f is g) for g in used] for t in terms]
        out = []
        for p in range(len(used[0])):
            stacked = [g[p] for g in used]
            if not stacked[0].is_floating_point() or len(used) == 1:
                last = stacked[-1]  # step-major repeat, as parallel.repeat_batch
                out.append(last.repeat(len(terms), *([1] * (last.ndim - 1))))
                continue
            w = torch.tensor(table, dtype=stacked[0].dtype).to(stacked[0].device)
            mixed = torch.tensordot(w, torch.stack(stacked), dims=1)  # (steps, batch, ...)
            out.append(mixed.flatten(0, 1))
        return out

    def _index(self, frontier: tuple) -> int:
        return next(i for i, f in enumerate(self._frontiers) if f is frontier)

    def _terms(self, step: int, weights: Weights) -> list[tuple[tuple, float]]:
        """``(frontier, weight)`` pairs; if a key step's frontier is gone (the call signature
        changed at a key step), the polynomial through the key frontiers that are kept."""
        kept = {s: f for s, f in zip(self._steps, self._frontiers)}
        if all(s in kept for s, _ in weights):
            return [(kept[s], w) for s, w in weights]
        used = [s for s, _ in weights if s in kept] or self._steps[-1:]
        return list(zip((kept[s] for s in used), lagrange(used, float(step))))


def _combine(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``sum_i weights[i] * tensors[i]`` (non-float tensors: the most recent one)."""
    if not tensors[0].is_floating_point():
        return tensors[0]
    if len(tensors) == 2:  # one fused kernel; Lagrange weights sum to 1, so w0 = 1 - w1
        return torch.lerp(tensors[0], tensors[1], weights[1])
    out = tensors[0] * weights[0]
    for x, w in zip(tensors[1:], weights[1:]):
        out.add_(x, alpha=w)
    return out
