"""Key-step schedules: plain data made by small named functions, validated once.

A schedule is a function ``num_steps -> sorted tuple of key steps``; steps are 0-based UNet
calls of one generation. :func:`key_step_schedule` turns what a user passes to
``fxprop.accelerate(key_steps=...)`` into such a function, raising on bad input up front.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Callable

import numpy as np

__all__ = ["Schedule", "PRESETS", "faster_diffusion", "every", "explicit", "deepcache_nonuniform",
           "quad_center", "key_step_schedule", "validate_key_steps"]

Schedule = Callable[[int], tuple[int, ...]]

#: Faster Diffusion's key steps for 50 DDIM steps (Li et al., arXiv 2312.09608).
FASTER_DIFFUSION_50 = (0, 1, 2, 3, 5, 10, 15, 25, 35)


def faster_diffusion(num_steps: int) -> tuple[int, ...]:
    """The paper's 50-step key steps, scaled proportionally to ``num_steps`` (0 always kept)."""
    scaled = {math.floor(k * num_steps / 50 + 0.5) for k in FASTER_DIFFUSION_50}
    return tuple(sorted(k for k in scaled | {0} if k < num_steps))


def every(n: int, num_steps: int) -> tuple[int, ...]:
    """Every ``n``-th step from 0 (DeepCache's uniform schedule)."""
    return tuple(range(0, num_steps, n))


def explicit(steps: tuple[int, ...], num_steps: int) -> tuple[int, ...]:
    """A fixed list; entries past the last step are ignored."""
    return tuple(k for k in steps if k < num_steps)


def deepcache_nonuniform(interval: int, center: int = 15, power: float = 1.4) -> Schedule:
    """DeepCache's non-uniform schedule (Ma et al., arXiv 2312.00858): ``ceil(N / interval)``
    key steps, denser around step ``center`` (the defaults are DeepCache's for 50 steps)."""
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"interval must be an int >= 1, got {interval!r}")
    if isinstance(center, bool) or not isinstance(center, int) or center < 0:
        raise ValueError(f"center must be a non-negative int (a step), got {center!r}")
    if isinstance(power, bool) or not isinstance(power, (int, float)) or power <= 1:
        raise ValueError(f"power must be a number > 1, got {power!r}")
    return functools.partial(quad_center, interval, center, power)


def quad_center(interval: int, center: int, power: float, num_steps: int) -> tuple[int, ...]:
    """``sample_from_quad_center`` of DeepCache's SD pipeline, re-implemented: key steps at
    ``center + x ** power`` for evenly spaced ``x``, lowering ``power`` by 0.02 until they are
    distinct. ``(-center) ** (1 / power)`` is complex; the steps are the truncated real parts."""
    if interval == 1:
        return tuple(range(num_steps))
    wanted = -(-num_steps // interval)
    p = power
    while p > 1:
        x = np.linspace((-center) ** (1 / p), (num_steps - center) ** (1 / p), wanted + 1)
        steps = np.unique(np.real(x ** p).astype(np.int32))[1:-1] + center
        if len(steps) + 1 == wanted:
            return tuple(sorted({0, *(int(s) for s in steps)}))
        p -= 0.02
    raise ValueError(f"no power in (1, {power}] spreads {wanted} distinct key steps over "
                     f"{num_steps} steps around center={center}; lower center or interval")


PRESETS: dict[str, Schedule] = {"faster-diffusion": faster_diffusion}


def validate_key_steps(steps: Sequence[int]) -> tuple[int, ...]:
    """Check the rules for an explicit key-step list and return it as a tuple."""
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
        raise TypeError(f"key_steps must be a sequence of ints, an int or a preset name, "
                        f"got {type(steps).__name__}")
    steps = tuple(steps)
    if not steps:
        raise ValueError("key_steps must not be empty (it must contain step 0)")
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int)]
    if bad:
        raise TypeError(f"key_steps must contain ints only, got {bad!r}")
    negative = [s for s in steps if s < 0]
    if negative:
        raise ValueError(f"key_steps must be non-negative, got {negative}")
    duplicated = sorted({s for s in steps if steps.count(s) > 1})
    if duplicated:
        raise ValueError(f"key_steps must not repeat a step, got {duplicated} more than once")
    unsorted = [(a, b) for a, b in zip(steps, steps[1:]) if a > b]
    if unsorted:
        raise ValueError(f"key_steps must be sorted ascending, got {unsorted[0][0]} before "
                         f"{unsorted[0][1]}")
    if steps[0] != 0:
        raise ValueError(f"key_steps must contain step 0 (the first step has nothing to "
                         f"reuse), got {list(steps)}")
    return steps


def key_step_schedule(key_steps: object) -> Schedule:
    """A schedule from a preset name, an interval ``N`` or an explicit list."""
    if isinstance(key_steps, str):
        if key_steps not in PRESETS:
            raise ValueError(f"unknown key_steps preset {key_steps!r}; known presets: "
                             f"{sorted(PRESETS)}")
        return PRESETS[key_steps]
    if isinstance(key_steps, int) and not isinstance(key_steps, bool):
        if key_steps < 1:
            raise ValueError(f"key_steps as an interval must be >= 1, got {key_steps}")
        return functools.partial(every, key_steps)
    if callable(key_steps):
        return _checked(key_steps)
    return functools.partial(explicit, validate_key_steps(key_steps))


def _checked(schedule: Callable[[int], Sequence[int]]) -> Schedule:
    """A user's schedule function, with its output validated at every plan."""

    @functools.wraps(schedule)
    def run(num_steps: int) -> tuple[int, ...]:
        return explicit(validate_key_steps(tuple(schedule(num_steps))), num_steps)

    return run
