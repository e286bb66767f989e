"""The exact optimiser of calibrated schedules: key steps chosen from measured errors.

Calibration (:mod:`fxprop.calibrate`) measures, per cut, an *error table*: the output error at
step ``j`` when its frontier is made from the key steps ``state`` (most recent first; one key
step for reuse, two for a linear forecast, three for a quadratic one, fewer at the start where
``state`` ends at step 0). A schedule's predicted error is the sum of the table entries of its
non-key steps, which is additive over segments, so dynamic programming over the last
``order + 1`` key steps finds, for every key-step count, the schedule of least predicted error
exactly (:func:`pareto`). A FLOP budget is a bound on the key-step count of each cut, an error
budget a bound on the error: :func:`choose` picks among the Pareto points of every cut and order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

__all__ = ["State", "ErrorTable", "Option", "check_budget", "check_speedup_target", "most_keys",
           "schedule_error", "pareto", "speedup", "options", "choose"]

#: Key steps a non-key step's frontier is made of, most recent first.
State = tuple[int, ...]
#: ``(state, step) -> error`` of that step on that frontier; a missing entry is infeasible.
ErrorTable = Mapping[tuple[State, int], float]


def _number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and not math.isnan(value)


def check_budget(target_speedup: Any, max_error: Any) -> None:
    """Raise ``ValueError`` unless exactly one valid budget is given."""
    if (target_speedup is None) == (max_error is None):
        raise ValueError(f"give exactly one budget, target_speedup= (FLOP-ideal, > 1) or "
                         f"max_error= (relative error of the final sample, >= 0); got "
                         f"target_speedup={target_speedup!r}, max_error={max_error!r}")
    if target_speedup is not None and not (_number(target_speedup) and target_speedup > 1):
        raise ValueError(f"target_speedup must be a number > 1 (plain sampling is 1), got "
                         f"{target_speedup!r}")
    if max_error is not None and not (_number(max_error) and 0 <= max_error < math.inf):
        raise ValueError(f"max_error must be a finite number >= 0, got {max_error!r}")


def state_after(state: State, key: int, order: int) -> State:
    """The state once ``key`` is a key step: it and the last ``order`` key steps before it."""
    return (key, *state[:order])


def schedule_error(table: ErrorTable, keys: Sequence[int], num_steps: int, order: int) -> float:
    """Predicted error of ``keys`` (sum over non-key steps; ``inf`` if one is not measured),
    straight from the definition (the optimiser's reference)."""
    keys = sorted(keys)
    if not keys or keys[0] != 0:
        raise ValueError(f"key steps must contain step 0, got {keys}")
    total, state, pending = 0.0, (), list(keys)
    for j in range(num_steps):
        if pending and pending[0] == j:
            state = state_after(state, pending.pop(0), order)
            continue
        total += table.get((state, j), math.inf)
    return total


def pareto(table: ErrorTable, num_steps: int, order: int) -> list[tuple[float, tuple] | None]:
    """``best[K]``: ``(error, key steps)`` of least predicted error with exactly ``K`` key
    steps (``None`` if no schedule of ``K`` is measured), for ``K`` in ``0..num_steps``.

    Dynamic programming over ``(count, state)`` in order of the state's last key step; a
    segment extends while its steps are in ``table``. Ties keep the first schedule found.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    best: dict[tuple[int, State], tuple[float, tuple | None]] = {(1, (0,)): (0.0, None)}
    by_key: dict[int, list[tuple[int, State]]] = {0: [(1, (0,))]}
    final: list[tuple[float, tuple] | None] = [None] * (num_steps + 1)
    for k in range(num_steps):
        for node in by_key.pop(k, []):
            count, state = node
            cost = best[node][0]
            for nxt, seg in _segments(table, state, k, num_steps):
                if nxt == num_steps:
                    done = (cost + seg, node)
                    if final[count] is None or done[0] < final[count][0]:
                        final[count] = done
                    continue
                child = (count + 1, state_after(state, nxt, order))
                if child not in best:
                    by_key.setdefault(nxt, []).append(child)
                if child not in best or cost + seg < best[child][0]:
                    best[child] = (cost + seg, node)
    return [None if f is None else (f[0], _keys(best, f[1])) for f in final]


def _segments(table: ErrorTable, state: State, k: int, num_steps: int):
    """``(next key step or num_steps, error of the steps between)`` while they are measured."""
    seg = 0.0
    for nxt in range(k + 1, num_steps + 1):
        yield nxt, seg
        if nxt == num_steps or (state, nxt) not in table:
            return
        seg += table[state, nxt]


def _keys(best: dict, node: tuple[int, State]) -> tuple[int, ...]:
    keys = []
    while node is not None:
        keys.append(node[1][0])
        node = best[node][1]
    return tuple(reversed(keys))


def speedup(num_keys: int, num_steps: int, step_cost: float) -> float:
    """FLOP-ideal speedup of ``num_keys`` key steps (whole UNet) of ``num_steps``, the others
    costing ``step_cost`` (the every-step part's FLOPs / the whole UNet's)."""
    return num_steps / (num_keys + (num_steps - num_keys) * step_cost)


@dataclass(frozen=True)
class Option:
    """One schedule: a cut, a forecast order, key steps, its speedup and predicted error
    (the sum of its table entries, or a monotone function of it)."""

    cut: tuple            # ("encoder", None) or ("deep", branch)
    order: int
    key_steps: tuple[int, ...]
    num_steps: int
    speedup: float
    error: float


def options(table: ErrorTable, num_steps: int, order: int, cut: tuple,
            step_cost: float) -> list[Option]:
    """The Pareto points of one cut and order, one per feasible key-step count."""
    out = []
    for count, found in enumerate(pareto(table, num_steps, order)):
        if found is not None:
            out.append(Option(cut, order, found[1], num_steps, speedup(count, num_steps, step_cost),
                              found[0]))
    return out


def most_keys(num_steps: int, step_cost: float, target: float) -> int:
    """The most key steps whose FLOP-ideal speedup still reaches ``target`` (0 if none)."""
    return max((k for k in range(1, num_steps + 1)
                if speedup(k, num_steps, step_cost) >= target * (1 - 1e-9)), default=0)


def check_speedup_target(target: float, best: float) -> None:
    if target > best * (1 + 1e-9):
        raise ValueError(f"no measured schedule reaches target_speedup={target}: the best "
                         f"reachable FLOP-ideal speedup is {best:.3f} (allow longer segments "
                         "with max_interval=, or lower the target)")


def choose(candidates: Sequence[Option], target_speedup: float | None = None,
           max_error: float | None = None) -> Option:
    """The least-error option at ``target_speedup`` or more, or the fastest accelerated one
    within ``max_error`` (ties: the faster, then the lower error, then the first)."""
    check_budget(target_speedup, max_error)
    if not candidates:
        raise ValueError("no schedule was measured: nothing to choose from")
    if target_speedup is not None:
        check_speedup_target(target_speedup, max(o.speedup for o in candidates))
        fit = [o for o in candidates if o.speedup >= target_speedup * (1 - 1e-9)]
        return min(fit, key=lambda o: (o.error, -o.speedup))
    fast = [o for o in candidates if len(o.key_steps) < o.num_steps]
    fit = [o for o in fast if o.error <= max_error]
    if not fit:
        least = min(fast, key=lambda o: o.error, default=None)
        found = ("no schedule skips a step" if least is None else
                 f"the least predicted error of a schedule that skips a step is "
                 f"{least.error:.4g} (speedup {least.speedup:.2f})")
        raise ValueError(f"no accelerated schedule reaches max_error={max_error}: {found}")
    return min(fit, key=lambda o: (-o.speedup, o.error))

