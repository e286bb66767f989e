"""Calibrated schedules scored on held-out samples (not a test; minutes, not the 40 of
tools/bench_calibration.py).

    python tools/heldout_calibration.py

Calibrates the shipped digits model once (as ``python -m fxprop calibrate``: 50 DDIM steps, the
ten digits at seeds 100-101), chooses a schedule at FLOP-ideal 1.5x, 2x, 2.5x and 3x, and runs
each on the measurement's own graphs for the ten digits at seeds 2000-2003 (40 samples neither
the error tables nor verification saw): the relative error of its final samples against
plain's, beside the error verification measured on the calibration calls with other noise.
"""

from __future__ import annotations

import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fxprop.calibration.calibrate import measure  # noqa: E402
from fxprop.calibration.choice import choose_calibration  # noqa: E402
from fxprop.cli import calibration_calls  # noqa: E402
from fxprop.demo import load_digits_pipeline  # noqa: E402
from fxprop.calibration.propagation import final_of  # noqa: E402

TARGETS = (1.5, 2.0, 2.5, 3.0)
SEEDS = (2000, 2001, 2002, 2003)


def held_out_calls(pipe, steps: int) -> list[tuple]:
    """``(run, plain final)`` of the ten digits at each of ``SEEDS``."""
    calls = []
    for seed in SEEDS:
        state = torch.Generator().manual_seed(seed).get_state()

        def run(state=state):
            generator = torch.Generator()
            generator.set_state(state)
            return pipe(list(range(10)), generator=generator, num_inference_steps=steps,
                        output_type="pt")
        calls.append((run, final_of(run, pipe.scheduler).double()))
    return calls


def held_out_error(pipe, measured, calibration, calls: list[tuple]) -> float:
    """Relative error of the final samples over all held-out calls (pooled, as PSNR is)."""
    cut = (calibration.reuse, calibration.branch)
    error = total = 0.0
    for run, final in calls:
        forward = measured.accelerated(cut, calibration.forecast, calibration.key_steps)
        found = final_of(run, pipe.scheduler, pipe.unet, forward).double()
        error += float((found - final).pow(2).sum())
        total += float(final.pow(2).sum())
    return math.sqrt(error / total)


def main() -> int:
    torch.set_num_threads(os.cpu_count() or 1)
    pipe = load_digits_pipeline()
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    measured = measure(pipe, calibration_calls(), 50, min_speedup=min(TARGETS), progress=False)
    print(f"measurement took {time.perf_counter() - start:.1f} s")
    calls = held_out_calls(pipe, 50)
    with torch.no_grad():
        for target in TARGETS:
            c = choose_calibration(measured, target_speedup=target)
            error = held_out_error(pipe, measured, c, calls)
            print(f"{target}x: {c.reuse} branch {c.branch} forecast {c.forecast}, "
                  f"{len(c.key_steps)} key steps {list(c.key_steps)} "
                  f"({c.predicted_speedup:.2f}x), predicted {c.predicted_error:.4f}, "
                  f"verified {c.verified_error:.4f}, held-out {error:.4f} "
                  f"({-20 * math.log10(error):.1f} dB relative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
