"""Helpers shared by the benchmarks in ``tools/`` (a script's own folder is on its path, so
they ``import common``): FLOP counts, side-by-side timing and paired verdicts."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

from torch.utils.flop_counter import FlopCounterMode

#: The repository's root folder.
ROOT = Path(__file__).resolve().parents[1]


def flops(run: Callable[[], Any]) -> int:
    """The FLOPs ``run()`` executes (torch's ``FlopCounterMode``)."""
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def verdict(gain: Any) -> str:
    """A paired gain's interval against 0 (``fxprop.calibration.significance.Gain``):
    ``above``, ``BELOW`` or ``tie`` (it holds 0)."""
    return "above" if gain.low > 0 else "BELOW" if gain.high < 0 else "tie"


def timed_rounds(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """The median wall-clock time of each run over ``repeats`` rounds, every round running all
    of them in turn (side by side: a slow moment of a shared CPU hits every row alike)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
