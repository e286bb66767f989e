"""The error tables of calibration: every candidate cut measured on recorded plain generations.

Every recorded step ``j`` runs the whole UNet once, returning its output and the frontier of
every candidate cut (the encoder cut and each deep branch), and, per cut, the every-step part on
the frontier reused or forecast from earlier key steps ``state`` (one for reuse, two or three
for a forecast), for every gap up to ``max_interval``. What is kept per ``(state, j)`` is the
output error *as it reaches the final sample*: ``(gain_j * |out - true| / |final|)^2``
(Frobenius norms over the batch, so CFG halves and samples are pooled; ``gain_j`` from
:mod:`fxprop.calibration.propagation`), averaged over calls. Errors of different steps reach the
final sample in nearly independent directions, so their squares add: the sum over a schedule's
non-key steps predicts its squared relative final error, additive as
:mod:`fxprop.calibration.optimise` needs. Only the frontiers of the last ``(max order + 1) *
max_interval`` steps are kept.

Cost: the tables are measured on ``samples`` evenly spaced rows of the batch (as many of each
CFG half; their squared error, times the batch over the rows, stands for the batch's), and the
every-step part runs once per cut and step for all of that step's states, their frontiers
stacked along the batch (``max_rows`` rows a run): two captures, one at the rows, one at the
stacked batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from ..graph.capture import CallKey, FlatCall, capture
from ..graph.deep import find_branches
from ..graph.regions import resolve_layout
from ..graph.split import Parts, split
from ..plan.forecast import lagrange
from ..plan.policies import make_policy
from ..runtime.parallel import map_batched, repeat_batch
from .optimise import State, schedule_error, speedup, state_after
from .propagation import interpolate, smooth
from .sources import Source

__all__ = ["states", "Cut", "Measurement", "output_errors", "measured_rows"]


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
    group: int | None = None           # states measured per run of the every-step part

    @property
    def id(self) -> tuple:
        return (self.reuse, self.branch)

    def weights(self, state: State, j: int) -> tuple[float, ...] | None:
        """The forecast weights of ``state`` at ``j``, as
        :func:`fxprop.plan.forecast.forecast_weights` makes them; ``None`` if two key steps share a
        position (the runtime skips one)."""
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

    def __init__(self, source: Source, first: FlatCall, orders: Sequence[int],
                 max_interval: int, samples: int | None = 4, max_rows: int = 128) -> None:
        self.source, self.unet, self.scheduler = source, source.unet, source.scheduler
        self.orders, self.max_interval = tuple(orders), max_interval
        self.samples, self.max_rows = samples, max_rows
        self.forward, self.flatten = source.forward, source.flatten
        self.num_steps = 0
        self.layout = resolve_layout(self.unet, None)
        self._graphs: dict[CallKey, tuple[Parts, dict]] = {}
        self._out_specs: dict[CallKey, Any] = {}
        self.cuts: list[Cut] = []
        self.gains: dict[int, list[float]] = {}   # probed step -> gain of each call
        self.replays: list[tuple[Callable, torch.Tensor]] = []  # (run a call, its final)
        self.progress = False
        first = self.subset(first)[0]
        union, steps = self._capture(first)
        full = _flops(union.full, *first.tensors)
        for cut in self.cuts:
            parts = steps[cut.id]
            cut.step_cost = _flops(parts.step, *_step_args(parts, first, union, cut)) / full

    def _capture(self, call: FlatCall) -> tuple[Parts, dict]:
        """The union parts (whole UNet + every frontier) and each cut's parts, per signature."""
        if call.key in self._graphs:
            return self._graphs[call.key]
        captured = capture(self.unet, call, self.forward)
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
        self._out_specs[call.key] = captured.out_spec
        return self._graphs[call.key]

    def add_gains(self, found: dict[int, float]) -> None:
        for j, g in found.items():
            self.gains.setdefault(j, []).append(g)

    def gain_curve(self) -> list[float]:
        """Every step's gain: the probed ones averaged over calls if every step after 0 is
        probed, else a smooth curve fitted to them
        (:func:`fxprop.calibration.propagation.smooth`)."""
        known = {j: sum(g) / len(g) for j, g in self.gains.items()}
        if not known:
            return [1.0] * self.num_steps
        if len(known) >= self.num_steps - 1:
            return interpolate(known, self.num_steps)
        return smooth(known, self.num_steps)

    def tables(self) -> dict[tuple, dict]:
        gains = self.gain_curve()
        return {cut.id: cut.table(gains) for cut in self.cuts}

    def predict(self, reuse: str, branch: int | None, order: int, key_steps: Sequence[int],
                propagated: bool = True) -> tuple[float, float] | None:
        """``(FLOP-ideal speedup, predicted relative final error)`` of any schedule of a
        measured cut, or ``None`` if a segment is longer than ``max_interval``.
        ``propagated=False``: the output errors alone (every gain 1), the other measure."""
        cut = next(c for c in self.cuts if c.id == (reuse, branch))
        keys = [k for k in key_steps if k < self.num_steps]
        gains = self.gain_curve() if propagated else [1.0] * self.num_steps
        error = schedule_error(cut.table(gains), keys, self.num_steps, order)
        if math.isinf(error):
            return None
        return speedup(len(keys), self.num_steps, cut.step_cost), math.sqrt(error)

    def accelerated(self, cut_id: tuple, order: int, key_steps: Sequence[int],
                    segments: Mapping[int, tuple] | None = None) -> Callable:
        """A UNet forward that runs one generation as ``fxprop.accelerate`` would with this
        cut, order and key steps (prior noise off), on the measurement's own graphs: what
        verifying a candidate runs, with no capture of its own. ``segments``: key step ->
        ``(cut id, order)`` of the steps after it, a cut and order per segment (which the
        runtime does not run: ``tools/mixed_cuts.py`` measures whether it would pay)."""
        cuts, keys, plan = {c.id: c for c in self.cuts}, set(key_steps), dict(segments or {})
        depth = max([order, *(o for _, o in plan.values())])
        step, state, kept, now = [0], [()], {}, [(cut_id, order)]

        @torch.no_grad()
        def forward(*args: Any, **kwargs: Any) -> Any:
            j, call = step[0], self.flatten(args, kwargs)
            step[0] += 1
            union, steps = self._capture(call)
            if j in keys:
                out = union.full(*call.tensors)
                kept[j], out = out[union.num_outputs:], out[: union.num_outputs]
                state[0], now[0] = state_after(state[0], j, depth), plan.get(j, (cut_id, order))
            else:
                cut, used = cuts[now[0][0]], state[0][: now[0][1] + 1]
                weights = cut.weights(used, j)
                used = used if weights is not None else used[:1]
                frontier = _combine([[kept[k][i] for i in cut.index] for k in used],
                                    weights or (1.0,))
                parts = steps[cut.id]
                out = parts.step(*[call.tensors[i] for i in parts.step_inputs], *frontier)
            return pytree.tree_unflatten(list(out), self._out_specs[call.key])
        return forward

    def keep(self, wanted: Callable[[Cut], bool]) -> None:
        """Measure only the cuts ``wanted`` accepts (e.g. those that reach a FLOP budget)."""
        self.cuts = [c for c in self.cuts if wanted(c)]

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
            sub, share = self.subset(call)
            union, _ = self._capture(sub)
            out = union.full(*sub.tensors)
            true, kept[j] = out[: union.num_outputs], tuple(out[union.num_outputs:])
            kept.pop(j - depth, None)
            for cut in self.cuts:  # the rows' error stands for the batch's: times sqrt(share)
                self._measure_step(cut, sub, j, true, kept, scale / math.sqrt(share))
            if bar is not None:
                bar.update(1)

    def subset(self, call: FlatCall) -> tuple[FlatCall, float]:
        """``call`` on the rows measured (``samples`` evenly spaced rows of the batch, which
        takes as many of each CFG half) and the batch's size over theirs."""
        batch = call.tensors[0].shape[0]
        rows = measured_rows(batch, self.samples)
        if len(rows) == batch or call.tensors[0].ndim == 5:  # video: per-frame leaves
            return call, 1.0
        index = torch.tensor(rows, device=call.tensors[0].device)
        return map_batched(self.forward, call, lambda x: x.index_select(0, index)), \
            batch / len(rows)

    def _group(self, cut: Cut, call: FlatCall, true: Sequence, kept: dict, j: int) -> int:
        """How many states one run of the every-step part measures (1 unless every frontier
        tensor and output has the batch first)."""
        if cut.group is None:
            batch = call.tensors[0].shape[0]
            tensors = [kept[j][i] for i in cut.index] + list(true)
            whole = all(x.ndim and x.shape[0] == batch for x in tensors)
            cut.group = min(self._most_states(), max(1, self.max_rows // batch)) if whole \
                else 1
        return cut.group

    def _most_states(self) -> int:
        reach = min(self.num_steps, (max(self.orders) + 2) * self.max_interval + 1)
        return max(len(states(j, self.orders, self.max_interval)) for j in range(reach))

    def _measure_step(self, cut: Cut, call: FlatCall, j: int, true: Sequence, kept: dict,
                      final: float) -> None:
        found = []
        for state in states(j, self.orders, self.max_interval):
            weights = cut.weights(state, j)
            if weights is not None:
                found.append((state, weights))
        group = self._group(cut, call, true, kept, j)
        for start in range(0, len(found), group):
            chunk = found[start:start + group]
            frontiers = [_combine([[kept[k][i] for i in cut.index] for k in state], weights)
                         for state, weights in chunk]
            for (state, _), error in zip(chunk, self._errors(cut, call, frontiers, group, true)):
                total = cut.sums.setdefault((state, j), [0.0, 0])
                total[0] += (error / final) ** 2
                total[1] += 1

    def _errors(self, cut: Cut, call: FlatCall, frontiers: list[list[torch.Tensor]],
                group: int, true: Sequence) -> list[float]:
        """The output error of the every-step part on each frontier, ``group`` frontiers a
        run (stacked along the batch, the last repeated to fill the run)."""
        if group == 1:
            parts = self._capture(call)[1][cut.id]
            inputs = [call.tensors[i] for i in parts.step_inputs]
            return [output_errors(parts.step(*inputs, *f), true) for f in frontiers]
        batch = call.tensors[0].shape[0]
        frontiers = frontiers + [frontiers[-1]] * (group - len(frontiers))
        stacked = [torch.cat([f[p] for f in frontiers]) for p in range(len(frontiers[0]))]
        tiled = map_batched(self.forward, call, lambda x: repeat_batch(x, group))
        parts = self._capture(tiled)[1][cut.id]
        out = parts.step(*[tiled.tensors[i] for i in parts.step_inputs], *stacked)
        return [output_errors([o[g * batch:(g + 1) * batch] for o in out], true)
                for g in range(len(frontiers))]


def measured_rows(batch: int, samples: int | None) -> list[int]:
    """``samples`` rows of a batch evenly spaced (all of them for ``None`` or more)."""
    if samples is None or samples >= batch:
        return list(range(batch))
    return sorted({batch * i // samples for i in range(samples)})


def _step_args(parts: Parts, call: FlatCall, union: Parts, cut: Cut) -> list[torch.Tensor]:
    """The step part's arguments on ``call`` with its own frontier (for counting FLOPs)."""
    with torch.no_grad():
        frontier = union.full(*call.tensors)[union.num_outputs:]
    return [call.tensors[i] for i in parts.step_inputs] + [frontier[i] for i in cut.index]
