"""Structured key-step schedules: the hand-set one and families that generalise across samples.

The optimiser (:mod:`~fxprop.calibration.optimise`) fits key steps to the error tables of a
few calls; a structured schedule has few degrees of freedom, so what verifies well on
held-out noise is more likely to hold on other noise too. Each family gives, for ``num_steps``
steps and at most ``count`` key steps, one schedule (sorted, from step 0):

- ``every``: every N-th step from 0, the hand-set schedule of the nodes' ``interval`` and
  ``key_steps=N`` (N the least that fits ``count``);
- ``every+last``: the same with the last step a key step (every N-th leaves up to N-1 final
  steps without one, where a model's output changes fastest);
- ``even+last``: ``count`` steps evenly spaced from the first to the last;
- ``dense ends``: ``count`` steps spaced as a cosine, dense at the start and the end;
- ``phases a/b/c``: the run in three equal phases with intervals a, b, c, and the last step
  (:func:`phase_schedules` gives every split that fits; the error tables pick among them).
"""

from __future__ import annotations

import math

__all__ = ["HAND_SET", "every_n", "family_schedules", "phase_schedules"]

#: The family name of the hand-set schedule.
HAND_SET = "every"


def every_n(num_steps: int, interval: int, last: bool = False) -> tuple[int, ...]:
    """Every ``interval``-th step from 0 (and the last step with ``last``)."""
    keys = set(range(0, num_steps, interval))
    if last:
        keys.add(num_steps - 1)
    return tuple(sorted(keys))


def _spaced(num_steps: int, count: int, where) -> tuple[int, ...] | None:
    """``count`` distinct steps at ``where(i / (count - 1))`` of the run (``None`` if two
    round to the same step)."""
    if count < 2 or count > num_steps:
        return None
    keys = {round(where(i / (count - 1)) * (num_steps - 1)) for i in range(count)}
    return tuple(sorted(keys)) if len(keys) == count else None


def family_schedules(num_steps: int, count: int) -> dict[str, tuple[int, ...]]:
    """Family name -> its schedule of at most ``count`` key steps (families that cannot make
    one are left out)."""
    if count < 1 or num_steps < 1:
        return {}
    out = {HAND_SET: every_n(num_steps, math.ceil(num_steps / count))}
    interval = next((n for n in range(1, num_steps + 1)
                     if len(every_n(num_steps, n, last=True)) <= count), None)
    if interval is not None:
        out["every+last"] = every_n(num_steps, interval, last=True)
    for name, where in (("even+last", lambda u: u),
                        ("dense ends", lambda u: (1 - math.cos(math.pi * u)) / 2)):
        keys = _spaced(num_steps, count, where)
        if keys is not None:
            out[name] = keys
    return {name: keys for name, keys in out.items() if len(keys) <= count}


def phase_schedules(num_steps: int, count: int, max_interval: int
                    ) -> dict[str, tuple[int, ...]]:
    """``"phases a/b/c"`` -> the schedule of intervals a, b, c over the run's three thirds and
    the last step, for every a, b, c up to ``max_interval`` of at most ``count`` key steps and
    at least ``count - 2`` (the budget used, not wasted)."""
    bounds = [0, round(num_steps / 3), round(2 * num_steps / 3), num_steps]
    out = {}
    for a in range(1, max_interval + 1):
        for b in range(1, max_interval + 1):
            for c in range(1, max_interval + 1):
                keys, step = {num_steps - 1}, 0
                for phase, interval in enumerate((a, b, c)):
                    while step < bounds[phase + 1]:
                        keys.add(step)
                        step += interval
                if count - 2 <= len(keys) <= count:
                    out[f"phases {a}/{b}/{c}"] = tuple(sorted(keys))
    return out
