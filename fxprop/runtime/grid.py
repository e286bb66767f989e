"""Following a plan on a sigma grid: calls matched by their timestep (k-diffusion) or sigma.

A k-diffusion sampler (``k_diffusion.sampling.sample_*``) walks a grid of sigmas and may call
the model more than once per grid step: Heun and DPM2 at the next sigma, DPM++ 2S and DPM++ SDE
at a midpoint. So a call is mapped to its grid step by the timestep the UNet receives, not by
a call counter: a call whose timestep equals grid point ``i``'s (within the call dtype's
rounding) or lies strictly between grid points ``i`` and ``i + 1`` belongs to step ``i``. Calls
must come in non-increasing timestep order, from step 0 on, without skipping a grid step, and
the first call of each step must be at its grid point (a sampler that steps on the grid makes
it there); any other call (back up, off the grid, a skipped step, a step entered between grid
points, as samplers with steps of their own do) makes the generation off-plan.

Where the loop knows each call's sigma (ComfyUI passes it in ``transformer_options["sigmas"]``)
calls are matched by sigma instead, by the same rules (``PlanFollower.set_grid(..., by=
"sigma")``): the sigmas of a grid decrease strictly even where the rounded timesteps repeat.
Each call signature (cond and uncond run as separate calls) keeps its own key frontiers; a
signature first seen at a non-key step runs the whole UNet there and starts its own.

The lookup is a :func:`bisect` over host floats made once per generation; the only device
value read per call is the timestep's first entry.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

import torch

from ..plan.forecast import KeyFrontiers
from .generation import Generation, timestep_float

__all__ = ["GridGeneration", "grid_step", "grid_values", "model_timesteps", "host_floats"]

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
    """A generation whose calls are matched to grid steps by a value they carry (see the module
    docstring); several calls may map to one step, and each call signature keeps its own key
    frontiers (cond and uncond run as separate calls)."""

    end: float = 0.0                 # the grid's end value (exclusive)
    grid: tuple = ()                 # the value of every step, strictly decreasing
    unit: str = "timestep"           # what the values are, for messages: "timestep", "sigma"
    last: float = math.inf           # the value of the previous call
    at: int = -1                     # the grid step of the previous call
    negated: list = field(default_factory=list, repr=False)  # -grid, ascending
    slots: dict = field(default_factory=dict, repr=False)    # call key -> its KeyFrontiers

    #: A call signature first seen at a non-key step (a ControlNet whose range starts or ends
    #: there: ComfyUI passes ``control=None`` outside it) runs whole and keeps its frontier.
    adopts = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.grid = tuple(self.grid) or self.plan.timesteps
        if len(self.grid) != len(self.plan):
            raise ValueError(f"a grid of {len(self.grid)} values for a plan of "
                             f"{len(self.plan)} steps")
        self.negated = [-g for g in self.grid]

    @property
    def finished(self) -> bool:
        """Never certain: a sampler may call the last grid step again (Heun, DPM2 and
        midpoint samplers call it twice unless the grid ends at sigma 0); the frontier goes
        at the next ``set_sigmas`` or ``reset()``."""
        return False

    def select(self, key: Any) -> None:
        """Make ``frontiers`` those of calls with signature ``key``."""
        if key not in self.slots:
            self.slots[key] = KeyFrontiers(self.plan.forecast + 1)
        self.frontiers = self.slots[key]

    def release(self) -> None:
        for frontiers in self.slots.values():
            frontiers.clear()
        super().release()

    def match(self, value: Any) -> str | None:
        """Map a call carrying ``value`` (a timestep or sigma, as the grid's ``unit``: a
        tensor whose first entry is read, or a number) to its grid step."""
        number = timestep_float(value)
        return self.match_value(number, tolerance(value, number))

    def match_value(self, value: float, tol: float) -> str | None:
        """Make ``step`` the grid step of ``value`` (within ``tol``); None, or why not."""
        grid, unit = self.grid, self.unit
        step = grid_step(grid, self.end, value, tol, self.negated)
        if step is None:
            return (f"UNet call at {unit} {value:g} is off the planned grid [{grid[0]:g} .. "
                    f"{self.end:g}] (plan with the sampler's sigmas; adaptive-step samplers "
                    f"such as sample_dpm_adaptive and sample_dpm_fast have no fixed grid)")
        if step < self.at or value - self.last > tol:
            return (f"UNet call at {unit} {value:g} goes back up from {self.last:g} (calls "
                    f"must come in non-increasing {unit} order: plan before each "
                    "generation; restarts and rejected adaptive steps break it)")
        if step > self.at + 1:
            return (f"UNet call at {unit} {value:g} is at grid step {step}, but step "
                    f"{self.at + 1} never ran (calls must visit every grid step from 0)")
        if step > self.at and abs(value - grid[step]) > tol:
            return (f"UNet call at {unit} {value:g} starts grid step {step} away from its "
                    f"grid point {grid[step]:g}: the sampler does not step on the planned "
                    "grid (dpm_fast and dpm_adaptive choose their own steps), and key steps "
                    "are grid steps")
        self.last, self.at, self.step = value, step, step
        return None


def model_timesteps(sigmas: torch.Tensor, model_wrap: Any) -> list[float]:
    """The timesteps the UNet receives at every entry of ``sigmas``, through
    ``model_wrap.sigma_to_t`` (k-diffusion's model wrappers)."""
    if not hasattr(model_wrap, "sigma_to_t"):
        raise TypeError(f"set_sigmas needs the k-diffusion model wrapper (CompVisDenoiser, "
                        f"DiscreteEpsDDPMDenoiser or any object with sigma_to_t), got "
                        f"{type(model_wrap).__name__}")
    sigmas = torch.as_tensor(sigmas).flatten()
    with torch.no_grad():
        t = model_wrap.sigma_to_t(sigmas.to(_device(model_wrap)))
    return [float(v) for v in t.double().cpu().tolist()]


def grid_values(values: Sequence[float], unit: str) -> tuple[list[float], float]:
    """``values[:-1]`` (the grid steps) and ``values[-1]`` (the grid's end), checked: a
    sampler's grid, strictly decreasing (the end may repeat the last step's value)."""
    if len(values) < 2:
        raise ValueError(f"a sampler's grid holds at least 2 sigmas (one step and the end), "
                         f"got {len(values)}")
    grid, end = list(values[:-1]), values[-1]
    if any(a <= b for a, b in zip(grid, grid[1:])) or end > grid[-1]:
        hint = (": drop repeated sigmas, or sigmas beyond the model's range (they clamp to "
                "one timestep); where the loop knows each call's sigma, map calls by sigma "
                "(set_grid(..., by='sigma'))" if unit == "timestep" else ": drop repeated sigmas")
        what = "the timesteps of sigmas" if unit == "timestep" else "sigmas"
        raise ValueError(f"{what} must decrease strictly (a sampler's grid), "
                         f"got {[round(v, 3) for v in values]}{hint}")
    return grid, end


def host_floats(values: Any) -> list[float]:
    """``values`` (a tensor or a sequence of numbers) as a flat list of Python floats."""
    return [float(v) for v in torch.as_tensor(values).flatten().double().cpu().tolist()]


def _device(model_wrap: Any) -> torch.device:
    sigmas = getattr(model_wrap, "sigmas", None)
    return sigmas.device if isinstance(sigmas, torch.Tensor) else torch.device("cpu")
