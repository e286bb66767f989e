"""Following a plan on a sigma grid: k-diffusion samplers, calls matched by their timestep.

A k-diffusion sampler (``k_diffusion.sampling.sample_*``) walks a grid of sigmas and may call
the model more than once per grid step: Heun and DPM2 at the next sigma, DPM++ 2S and DPM++ SDE
at a midpoint. So a call is mapped to its grid step by the timestep the UNet receives, not by
a call counter: a call whose timestep equals grid point ``i``'s (within the call dtype's
rounding) or lies strictly between grid points ``i`` and ``i + 1`` belongs to step ``i``. Calls
must come in non-increasing timestep order, from step 0 on, without skipping a grid step; any
other call (back up, off the grid, a skipped step) makes the generation off-plan.

The lookup is a :func:`bisect` over host floats made once per generation; the only device
value read per call is the timestep's first entry.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any

import torch

from .follow import Generation, timestep_float

__all__ = ["GridGeneration", "grid_step", "sigma_grid"]

#: How many of the call dtype's epsilons (relative) a timestep may be from a grid point and
#: still be that point: ``sigma_to_t`` of a batch vector and of the grid vector may differ by
#: a few ulps (vectorised ``log``), and a loop may round the timestep to float16.
ULPS = 4


def tolerance(timestep: Any, planned: float) -> float:
    """How far a call's timestep may be from ``planned`` and still equal it."""
    dtype = timestep.dtype if isinstance(timestep, torch.Tensor) else torch.float64
    if not dtype.is_floating_point:
        return 0.0
    return ULPS * torch.finfo(dtype).eps * max(1.0, abs(planned))


def grid_step(grid: tuple[float, ...], end: float, value: float, tol: float,
              negated: list[float] | None = None) -> int | None:
    """The step of a strictly decreasing ``grid`` that ``value`` belongs to, or None.

    Step ``i`` owns ``grid[i]`` (within ``tol``) and the open interval down to ``grid[i + 1]``
    (to ``end`` for the last step; ``end == grid[-1]``: the last point only). ``negated``:
    ``[-g for g in grid]``, ascending for bisect (made once per generation by the caller).
    """
    negated = [-g for g in grid] if negated is None else negated
    i = bisect_right(negated, -value) - 1  # the last grid point >= value, -1 if none
    if i + 1 < len(grid) and abs(value - grid[i + 1]) <= tol:
        return i + 1
    if i < 0:
        return None
    if i == len(grid) - 1 and value <= end and abs(value - grid[i]) > tol:
        return None  # below the last grid point and its interval
    return i


@dataclass
class GridGeneration(Generation):
    """A generation whose calls are matched to grid steps by their timestep (see the module
    docstring); several calls may map to one step."""

    end: float = 0.0                 # the timestep of the grid's last sigma (exclusive)
    last: float = math.inf           # the timestep of the previous call
    at: int = -1                     # the grid step of the previous call
    negated: list = field(default_factory=list, repr=False)  # -grid, ascending

    def __post_init__(self) -> None:
        super().__post_init__()
        self.negated = [-g for g in self.plan.timesteps]

    @property
    def finished(self) -> bool:
        """Never certain: a sampler may call the last grid step again (Heun, DPM2 and
        midpoint samplers call it twice unless the grid ends at sigma 0); the frontier goes
        at the next ``set_sigmas`` or ``reset()``."""
        return False

    def match(self, timestep: Any) -> str | None:
        grid, value = self.plan.timesteps, timestep_float(timestep)
        step = grid_step(grid, self.end, value, tolerance(timestep, value), self.negated)
        if step is None:
            return (f"UNet call at timestep {value:g} is off the planned grid [{grid[0]:g} .. "
                    f"{self.end:g}] (set_sigmas with the sampler's sigmas; adaptive-step "
                    f"samplers such as sample_dpm_adaptive and sample_dpm_fast have no fixed "
                    f"grid)")
        if step < self.at or value - self.last > tolerance(timestep, self.last):
            return (f"UNet call at timestep {value:g} goes back up from {self.last:g} (calls "
                    "must come in non-increasing timestep order: set_sigmas before each "
                    "generation; restarts and rejected adaptive steps break it)")
        if step > self.at + 1:
            return (f"UNet call at timestep {value:g} is at grid step {step}, but step "
                    f"{self.at + 1} never ran (calls must visit every grid step from 0)")
        self.last, self.at, self.step = value, step, step
        return None


def sigma_grid(sigmas: torch.Tensor, model_wrap: Any) -> tuple[list[float], float]:
    """The timesteps the UNet receives at ``sigmas[:-1]`` (the grid steps) and at
    ``sigmas[-1]`` (the grid's end), through ``model_wrap.sigma_to_t``."""
    if not hasattr(model_wrap, "sigma_to_t"):
        raise TypeError(f"set_sigmas needs the k-diffusion model wrapper (CompVisDenoiser, "
                        f"DiscreteEpsDDPMDenoiser or any object with sigma_to_t), got "
                        f"{type(model_wrap).__name__}")
    sigmas = torch.as_tensor(sigmas).flatten()
    if len(sigmas) < 2:
        raise ValueError(f"sigmas must hold at least 2 entries (one step and the end), "
                         f"got {len(sigmas)}")
    with torch.no_grad():
        t = model_wrap.sigma_to_t(sigmas.to(_device(model_wrap)))
    values = [float(v) for v in t.double().cpu().tolist()]
    grid, end = values[:-1], values[-1]
    if any(a <= b for a, b in zip(values, values[1:-1])) or end > grid[-1]:
        raise ValueError(f"the timesteps of sigmas must decrease strictly (a sampler's grid), "
                         f"got {[round(v, 3) for v in values]}: drop repeated sigmas, or "
                         f"sigmas beyond the model's range (they clamp to one timestep)")
    return grid, end


def _device(model_wrap: Any) -> torch.device:
    sigmas = getattr(model_wrap, "sigmas", None)
    return sigmas.device if isinstance(sigmas, torch.Tensor) else torch.device("cpu")
