"""How sure a verified choice is: paired comparisons of per-sample errors on held-out noise.

Two schedules run on the same held-out samples give paired relative errors ``a_i``, ``b_i``.
Their difference in PSNR against plain sampling is ``20 log10(b_i / a_i)`` dB per sample (the
reference's peak cancels); the mean over samples is the gain of ``a`` over ``b``, and a
percentile bootstrap over samples (resampling pairs, a fixed seed: the same data give the same
interval) bounds it. Pairing removes what the samples share (an easy sample is easy for both),
so a few dB are told apart on tens of samples where unpaired errors would not be.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Gain", "MIN_SAMPLES", "paired_gain", "mean_db", "rms"]

#: Fewer paired samples than this are never significant: a bootstrap of a handful of pairs
#: gives an interval far narrower than the truth.
MIN_SAMPLES = 8
#: Errors below this are taken as this (a sample equal to plain would give an infinite gain).
FLOOR = 1e-12


@dataclass(frozen=True)
class Gain:
    """Mean PSNR gain in dB of one schedule over another on ``samples`` paired samples, with
    its ``confidence`` interval ``[low, high]``."""

    mean: float
    low: float
    high: float
    samples: int
    confidence: float = 0.95

    @property
    def significant(self) -> bool:
        """The interval is above 0 (on at least :data:`MIN_SAMPLES` samples): the first
        schedule is nearer plain, not by chance."""
        return self.low > 0 and self.samples >= MIN_SAMPLES


def _db(errors: Sequence[float]) -> torch.Tensor:
    return 20 * torch.log10(torch.tensor(errors, dtype=torch.float64).clamp_min(FLOOR))


def mean_db(errors: Sequence[float]) -> float:
    """Mean of ``20 log10(error)`` over samples: lower is nearer plain (minus the mean PSNR
    up to the peak's constant)."""
    return float(_db(errors).mean())


def paired_gain(better: Sequence[float], base: Sequence[float], confidence: float = 0.95,
                resamples: int = 4000, seed: int = 0) -> Gain:
    """The gain of ``better`` over ``base`` (per-sample relative errors, same samples in the
    same order): mean of ``20 log10(base_i / better_i)`` and its percentile bootstrap
    interval."""
    if len(better) != len(base) or not better:
        raise ValueError(f"paired errors need the same, non-zero number of samples, got "
                         f"{len(better)} and {len(base)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    diff = _db(base) - _db(better)
    if not bool(torch.isfinite(diff).all()):
        raise ValueError("paired errors must be finite")
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(diff), (resamples, len(diff)), generator=gen)
    means = diff[picks].mean(1)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return Gain(float(diff.mean()), float(low), float(high), len(diff), confidence)


def rms(errors: Sequence[float]) -> float:
    """Root mean square of per-sample errors."""
    return math.sqrt(sum(e * e for e in errors) / len(errors))
