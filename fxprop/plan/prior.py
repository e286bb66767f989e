"""Prior noise injection (Faster Diffusion, Sec. 3.3) in the units of any scheduler.

The paper samples with DDIM, whose latent at timestep ``t`` is ``sqrt(a_t) x_0 +
sqrt(1 - a_t) eps`` (``a`` = ``alphas_cumprod``), and before every step with ``t < T/2`` adds
``w * z_T`` (``z_T`` the initial noise, unit variance). Schedulers of the same training
schedule but in sigma units (Euler, Heun, LMS, KDPM2: latent ``x_0 + sigma eps``, initial noise
scaled by ``init_noise_sigma``) hold that latent divided by ``sqrt(a_t)``, so the same
injection there is ``w * (z_T / init_noise_sigma) * sqrt(1 + sigma^2)``, at the same steps
(their timesteps are the training timesteps, so ``t < T/2`` means the same). Schedulers without
a discrete training schedule (``alphas_cumprod``: EDM and cosine DPM-Solver) have no ``T/2``:
there injection is not defined, off by default, and an explicit weight is refused.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["undefined_for", "check_weight", "increment"]


def undefined_for(scheduler: Any) -> str | None:
    """Why prior noise is not defined for ``scheduler``, or None if it is."""
    config = getattr(scheduler, "config", None)
    if getattr(scheduler, "alphas_cumprod", None) is None or getattr(
            config, "num_train_timesteps", None) is None:
        return (f"prior noise injection is defined for schedulers of a discrete training "
                f"schedule (alphas_cumprod, timesteps below num_train_timesteps / 2); "
                f"{type(scheduler).__name__} has none")
    return None


def check_weight(value: Any) -> float:
    """``prior_noise=``: a finite number >= 0."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value < 0):
        raise ValueError(f"prior_noise must be a finite number >= 0, got {value!r}")
    return float(value)


def increment(scheduler: Any, initial: torch.Tensor, index: int) -> torch.Tensor:
    """What ``w = 1`` adds to the latent before step ``index`` of ``scheduler.timesteps``,
    given the recorded initial noise ``initial`` (see the module docstring)."""
    sigma_units = float(scheduler.init_noise_sigma) != 1.0
    if not sigma_units:
        return initial
    sigma = float(scheduler.sigmas[index])
    return initial * (math.sqrt(1 + sigma * sigma) / float(scheduler.init_noise_sigma))
