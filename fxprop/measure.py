"""The error tables of calibration: every candidate cut measured on recorded plain generations.

Every recorded step ``j`` runs the whole UNet once, returning its output and the frontier of
every candidate cut (the encoder cut and each deep branch), and, per cut, the every-step part on
the frontier reused or forecast from earlier key steps ``state`` (one for reuse, two or three
for a forecast), for every gap up to ``max_interval``. What is kept per ``(state, j)`` is the
output error *as it reaches the final sample*: ``(gain_j * |out - true| / |final|)^2``
(Frobenius norms over the batch, so CFG halves and samples are pooled; ``gain_j`` from
:mod:`fxprop.propagation`), averaged over calls. Errors of different steps reach the final
sample in nearly independent directions, so their squares add: the sum over a schedule's
non-key steps predicts its squared relative final error, additive as :mod:`fxprop.optimise`
needs. Only the frontiers of the last ``(max order + 1) * max_interval`` steps are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .capture import CallKey, FlatCall, capture
from .config import make_policy
from .deep import find_branches
from .forecast import lagrange
from .optimise import State, schedule_error, speedup
from .propagation import interpolate
from .regions import resolve_layout
from .split import Parts, split

__all__ = ["states", "Cut", "Measurement", "output_errors"]


def states(j: int, orders: Sequence[int], max_interval: int) -> list[State]:
    """The key-step states step ``j`` can read under ``orders``: its last key step at most
    ``max_interval - 1`` before it, each earlier one at most ``max_interval`` before the next,
    ``order + 1`` of them (fewer only when the last is step 0)."""
    found = set()
    for order in orders:
        todo = [(k,) for k in range(max(0, j - max_interval + 1), j)]
        while todo:
            s = todo.pop()
            if len(s) == order + 1 or s[-1] == 0:
                found.add(s)
                continue
            todo.extend(s + (p,) for p in range(max(0, s[-1] - max_interval), s[-1]))
    return sorted(found)


@dataclass
class Cut:
    """A candidate cut: its every-step part, where its frontier sits in the union frontier,
    its FLOPs relative to the whole UNet and its forecast variable."""

    reuse: str
    branch: int | None
    index: list[int]                   # positions of its frontier in the union frontier
    step_cost: float
    forecast_in: str
    reach: float
    positions: list[float] = field(default_factory=list)
    sums: dict = field(default_factory=dict)   # (state, j) -> [sum of (err / |final|)^2, calls]

    @property
    def id(self) -> tuple:
        return (self.reuse, self.branch)

    def weights(self, state: State, j: int) -> tuple[float, ...] | None:
        """The forecast weights of ``state`` at ``j``, as :func:`fxprop.forecast.forecast_weights`
        makes them; ``None`` if two key steps share a position (the runtime skips one)."""
        xs = [self.positions[k] for k in state]
        if len(set(xs)) < len(xs):
            return None
        at = self.positions[j]
        if self.reach < math.inf and len(xs) > 1:
            limit = self.reach * abs(xs[0] - xs[1])
            at = xs[0] + max(-limit, min(limit, at - xs[0]))
        return lagrange(xs, at)

    def table(self, gains: Sequence[float]) -> dict:
        """``(state, j) -> (gain_j * error / |final|)^2``, averaged over calls."""
        return {(s, j): gains[j] ** 2 * total / count for (s, j), (total, count)
                in self.sums.items()}


def _flops(fn: Callable, *args: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def _combine(frontiers: list[tuple], weights: Sequence[float]) -> list[torch.Tensor]:
    """``sum_i weights[i] * frontiers[i]`` per tensor (non-float tensors: the most recent)."""
    out = []
    for p, first in enumerate(frontiers[0]):
        if len(frontiers) == 1 or not first.is_floating_point():
            out.append(first)
            continue
        total = first * weights[0]
        for f, w in zip(frontiers[1:], weights[1:]):
            total = total + f[p] * w
        out.append(total)
    return out


def output_errors(predicted: Sequence[torch.Tensor], true: Sequence[torch.Tensor]) -> float:
    """``|predicted - true|`` over all outputs and the whole batch (Frobenius), in float64."""
    p = torch.cat([x.reshape(-1) for x in predicted]).double()
    t = torch.cat([x.reshape(-1) for x in true]).double()
    return float((p - t).norm())


class Measurement:
    """The error tables of every candidate cut over the recorded generations."""

    def __init__(self, unet: nn.Module, first: FlatCall, orders: Sequence[int],
                 max_interval: int) -> None:
        self.unet, self.orders, self.max_interval = unet, tuple(orders), max_interval
        self.num_steps, self.num_inference_steps, self.scheduler = 0, None, None
        self.layout = resolve_layout(unet, None)
        self._graphs: dict[CallKey, tuple[Parts, dict]] = {}
        self.cuts: list[Cut] = []
        self.gains: dict[int, list[float]] = {}   # probed step -> gain of each call
        self.replays: list[tuple[Callable, torch.Tensor]] = []  # (run a call, its final)
        self.target: Any = None
        union, steps = self._capture(first)
        full = _flops(union.full, *first.tensors)
        for cut in self.cuts:
            parts = steps[cut.id]
            cut.step_cost = _flops(parts.step, *_step_args(parts, first, union, cut)) / full

    def _capture(self, call: FlatCall) -> tuple[Parts, dict]:
        """The union parts (whole UNet + every frontier) and each cut's parts, per signature."""
        if call.key in self._graphs:
            return self._graphs[call.key]
        captured = capture(self.unet, call, type(self.unet).forward.__get__(self.unet))
        frontiers = {("encoder", None): make_policy("encoder").cut(captured, self.layout)}
        for branch in find_branches(captured, self.layout):
            try:
                frontiers["deep", branch.id] = make_policy("deep", branch=branch.id).cut(
                    captured, self.layout)
            except ValueError:  # no shallow branch there (score-SDE skip blocks)
                continue
        union = list(dict.fromkeys(n for f in frontiers.values() for n in f))
        steps = {cut: split(captured, f) for cut, f in frontiers.items()}
        if not self.cuts:
            for (reuse, branch), f in frontiers.items():
                policy = make_policy(reuse)
                self.cuts.append(Cut(reuse, branch, [union.index(n) for n in f], 1.0,
                                     policy.forecast_in, policy.forecast_reach))
        self._graphs[call.key] = split(captured, union), steps
        return self._graphs[call.key]

    def calibration(self, target_speedup: float | None = None,
                    max_error: float | None = None) -> Any:
        """The :class:`~fxprop.calibration.Calibration` for one budget (see
        :func:`fxprop.calibrate.choose_calibration`)."""
        from .calibrate import choose_calibration
        return choose_calibration(self, target_speedup=target_speedup, max_error=max_error)

    def add_gains(self, found: dict[int, float]) -> None:
        for j, g in found.items():
            self.gains.setdefault(j, []).append(g)

    def gain_curve(self) -> list[float]:
        """Every step's gain: the probed ones averaged over calls, the others interpolated."""
        known = {j: sum(g) / len(g) for j, g in self.gains.items()}
        return interpolate(known, self.num_steps) if known else [1.0] * self.num_steps

    def tables(self) -> dict[tuple, dict]:
        gains = self.gain_curve()
        return {cut.id: cut.table(gains) for cut in self.cuts}

    def predict(self, reuse: str, branch: int | None, order: int,
                key_steps: Sequence[int]) -> tuple[float, float] | None:
        """``(FLOP-ideal speedup, predicted relative final error)`` of any schedule of a
        measured cut, or ``None`` if a segment is longer than ``max_interval``."""
        cut = next(c for c in self.cuts if c.id == (reuse, branch))
        keys = [k for k in key_steps if k < self.num_steps]
        error = schedule_error(cut.table(self.gain_curve()), keys, self.num_steps, order)
        if math.isinf(error):
            return None
        return speedup(len(keys), self.num_steps, cut.step_cost), math.sqrt(error)

    def keep(self, wanted: Callable[[Cut], bool]) -> None:
        """Measure only the cuts ``wanted`` accepts (e.g. those that reach a FLOP budget)."""
        self.cuts = [c for c in self.cuts if wanted(c)]

    def work(self, num_steps: int) -> int:
        """Part runs one generation costs (for the progress bar)."""
        per_step = [1 + len(self.cuts) * len(states(j, self.orders, self.max_interval))
                    for j in range(num_steps)]
        return sum(per_step)

    @torch.no_grad()
    def measure(self, calls: list[FlatCall], positions: dict[str, list[float]],
                bar: Any, final: torch.Tensor) -> None:
        """Add one recorded generation (``final``: its final sample) to the error tables."""
        scale = float(final.double().norm().clamp_min(1e-30))
        for cut in self.cuts:
            cut.positions = positions.get(cut.forecast_in) or positions["step"]
            if cut.positions is positions["step"]:
                cut.forecast_in = "step"
        depth = (max(self.orders) + 1) * self.max_interval
        kept: dict[int, tuple] = {}
        for j, call in enumerate(calls):
            union, steps = self._capture(call)
            out = union.full(*call.tensors)
            true, kept[j] = out[: union.num_outputs], tuple(out[union.num_outputs:])
            kept.pop(j - depth, None)
            bar.update(1)
            for cut in self.cuts:
                self._measure_step(cut, steps[cut.id], call, j, true, kept, bar, scale)

    def _measure_step(self, cut: Cut, parts: Parts, call: FlatCall, j: int, true: Sequence,
                      kept: dict, bar: Any, final: float) -> None:
        inputs = [call.tensors[i] for i in parts.step_inputs]
        for state in states(j, self.orders, self.max_interval):
            bar.update(1)
            weights = cut.weights(state, j)
            if weights is None:
                continue
            frontier = _combine([[kept[k][i] for i in cut.index] for k in state], weights)
            error = output_errors(parts.step(*inputs, *frontier), true) / final
            total = cut.sums.setdefault((state, j), [0.0, 0])
            total[0] += error ** 2
            total[1] += 1


def _step_args(parts: Parts, call: FlatCall, union: Parts, cut: Cut) -> list[torch.Tensor]:
    """The step part's arguments on ``call`` with its own frontier (for counting FLOPs)."""
    with torch.no_grad():
        frontier = union.full(*call.tensors)[union.num_outputs:]
    return [call.tensors[i] for i in parts.step_inputs] + [frontier[i] for i in cut.index]
