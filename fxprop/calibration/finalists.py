"""The schedules verification runs at a FLOP budget: hand-set ones and fitted ones, screened
by the error tables.

For every cut and forecast order that reaches the budget, the candidates are the optimiser's
schedule, the structured families of :mod:`~fxprop.calibration.families` at the most key
steps the budget allows, and every hand-set schedule (every N-th step) at or below that cost.
Verification runs cost a generation each, so the tables' predictions screen them: the best
hand-set schedule of each cut and order (a faster one can be the better: on a pretrained UNet
every 8th step beat every 5th by 2-3 dB) and, for the fitted side, the optimiser's best
schedule and the best of each family, so that structure competes with the fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .families import HAND_SET, every_n, family_schedules, phase_schedules
from .measure import Measurement
from .optimise import Option, most_keys, schedule_error, speedup

__all__ = ["Finalist", "finalists", "NEAR_COUNT", "NEAR_RATIO"]

#: Hand-set schedules of other costs verified beside the best predicted one of a cut and
#: order: up to NEAR_COUNT predicted within NEAR_RATIO of its error (2 dB): on a pretrained UNet
#: every 8th step beat every 5th, the tables' ranking across costs is not sure either.
NEAR_COUNT = 3
NEAR_RATIO = 10 ** (2 / 20)


@dataclass(frozen=True)
class Finalist:
    """A schedule to verify: its option (cut, order, key steps, speedup, predicted error) and
    where it comes from (``"every"`` for hand-set, a family name, or ``"fitted"``)."""

    option: Option
    family: str

    @property
    def hand_set(self) -> bool:
        return self.family == HAND_SET

    def describe(self) -> str:
        o = self.option
        cut = "encoder" if o.cut[0] == "encoder" else f"deep b{o.cut[1]}"
        name = f"every {o.key_steps[1] - o.key_steps[0]}" if self.hand_set and \
            len(o.key_steps) > 1 else self.family
        return f"{name}, {cut}, forecast {o.order}, {len(o.key_steps)} key steps"


def _option(measurement: Measurement, table: dict, cut, order: int,
            keys: tuple[int, ...]) -> Option | None:
    """``keys`` as an option of ``cut`` and ``order`` (``None`` if a segment is not
    measured)."""
    n = measurement.num_steps
    error = schedule_error(table, keys, n, order)
    if math.isinf(error):
        return None
    return Option(cut.id, order, keys, n, speedup(len(keys), n, cut.step_cost), math.sqrt(error))


def _pools(measurement: Measurement, fitted: list[Option], target: float
           ) -> tuple[list[Finalist], dict[str, list[Finalist]]]:
    """Every measurable hand-set schedule at or below the budget's cost, and the others by
    family (``"fitted"``: the optimiser's)."""
    tables, n = measurement.tables(), measurement.num_steps
    hand, families = [], {"fitted": [Finalist(o, "fitted") for o in fitted]}
    for cut in measurement.cuts:
        count = most_keys(n, cut.step_cost, target)
        if count < 1:
            continue
        shapes = {**family_schedules(n, count),
                  **phase_schedules(n, count, measurement.max_interval)}
        shapes.pop(HAND_SET, None)
        for order in measurement.orders:
            for interval in range(math.ceil(n / count), n + 1):
                found = _option(measurement, tables[cut.id], cut, order, every_n(n, interval))
                if found is not None:
                    hand.append(Finalist(found, HAND_SET))
            for name, keys in shapes.items():
                found = _option(measurement, tables[cut.id], cut, order, keys)
                if found is not None:
                    kind = "phases" if name.startswith("phases") else name
                    families.setdefault(kind, []).append(Finalist(found, name))
    return hand, families


def finalists(measurement: Measurement, fitted: list[Option], target: float,
              count: int) -> tuple[list[Finalist], list[Finalist]]:
    """``(hand-set, fitted)`` finalists. Hand-set, of each cut and forecast order that
    reaches the budget: the best predicted schedule, those predicted near it
    (:func:`_hand_set`) and every other of its cost (as many key steps: at long segments
    several every-N-th schedules have as many, and the tables do not tell them apart: at 6x
    they ranked every 17th step first on the digits model, every 19th was 0.5 dB nearer
    plain; on photo patches every 29th and 31st, every 33rd was). Fitted: ``count``, the best
    of each family and order, the orders in turn, best predicted first within each. The
    tables rank schedules of one cut and order well, not across them (they add a reuse
    segment's correlated errors as independent): on the digits model at 2x they ranked every
    4th step on branch 1 above every 3rd on branch 0, which was 5.5 dB nearer plain; on a
    UNet of photo patches at 4x, every 8th step with reuse above it with a forecast (5 dB
    nearer plain)."""
    hand, families = _pools(measurement, fitted, target)
    per_cut: dict[tuple, list[Finalist]] = {}
    for f in sorted(hand, key=lambda f: f.option.error):
        per_cut.setdefault((f.option.cut, f.option.order), []).append(f)
    hand = [f for group in per_cut.values() for f in _hand_set(group)]
    best = {}
    for group in families.values():
        for f in group:
            kind = (f.family.split()[0], f.option.order)
            if kind not in best or f.option.error < best[kind].option.error:
                best[kind] = f
    return hand, _in_turn(list(best.values()), max(1, count), {_key(f) for f in hand})


def _hand_set(group: list[Finalist]) -> list[Finalist]:
    """Of one cut and order's hand-set schedules, best predicted first: every one of the best's
    cost (as many key steps) and up to :data:`NEAR_COUNT` predicted within :data:`NEAR_RATIO`
    of it (a faster one can be the better)."""
    best = group[0].option
    near = [f for f in group if f.option.error <= best.error * NEAR_RATIO][:NEAR_COUNT]
    same = [f for f in group if len(f.option.key_steps) == len(best.key_steps)]
    return _unique(near + same)


def _in_turn(found: list[Finalist], count: int, seen: set) -> list[Finalist]:
    """Up to ``count`` of ``found`` (not in ``seen``), the forecast orders in turn (the order
    of the best predicted first), best predicted first within each order."""
    by_order: dict[int, list[Finalist]] = {}
    for f in _unique(sorted(found, key=lambda f: f.option.error), seen):
        by_order.setdefault(f.option.order, []).append(f)
    queues, out = list(by_order.values()), []
    while len(out) < count and any(queues):
        for queue in queues:
            if queue and len(out) < count:
                out.append(queue.pop(0))
    return out


def _key(finalist: Finalist) -> tuple:
    o = finalist.option
    return (o.cut, o.order, o.key_steps)


def _unique(found: list[Finalist], seen: set | None = None) -> list[Finalist]:
    seen, out = set() if seen is None else set(seen), []
    for f in found:
        if _key(f) not in seen:
            seen.add(_key(f))
            out.append(f)
    return out
