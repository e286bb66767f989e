"""One generation's cross-step state, and which planned step a call's timestep is.

A :class:`Generation` holds the plan of one generation, the step it is at and the key frontiers
it reuses; it is dropped whole when the next one starts. Here calls follow the plan in order,
one per step (diffusers pipelines and loops); :class:`fxprop.runtime.grid.GridGeneration` maps
calls to the steps of a sigma grid by value instead (k-diffusion samplers, ComfyUI). Planned
timesteps are host numbers; a pipeline's timestep (a view of the scheduler's timesteps) is
matched by its storage offset, so the common path reads no device value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..plan.forecast import KeyFrontiers
from ..plan.plans import Plan

__all__ = ["Generation", "timestep_float", "first_index"]


@dataclass
class Generation:
    """Cross-step state of one generation; dropped whole when a new one starts."""

    plan: Plan
    source: Any                     # the timesteps tensor planned from (compared by identity)
    begin: int = 0                  # index of step 0 in ``source``
    step: int = 0                   # the next step to run
    off_plan: bool = False
    frontiers: KeyFrontiers = None  # type: ignore[assignment]  # the last key frontiers
    model_state: Any = None  # the state its frontier was computed in (runtime's, per key step)

    def __post_init__(self) -> None:
        if self.frontiers is None:
            self.frontiers = KeyFrontiers(self.plan.forecast + 1)

    def leave_plan(self) -> None:
        """Run the whole UNet for the rest of this generation; release the cached state."""
        self.off_plan = True
        self.release()

    def release(self) -> None:
        """Drop the tensors kept across steps (the generation cannot use them any more)."""
        self.frontiers.clear()

    #: Whether a call with a signature not seen at a key step runs the whole UNet and keeps
    #: its frontier (a key step of its own); else it leaves the plan.
    adopts = False

    def select(self, key: Any) -> None:
        """Make ``frontiers`` those of calls with signature ``key`` (here one set for all: a
        key step with another signature replaces it; see
        :class:`fxprop.runtime.grid.GridGeneration`)."""

    @property
    def finished(self) -> bool:
        """Whether every planned step ran (its cached tensors can go)."""
        return self.step >= len(self.plan)

    def match(self, timestep: Any) -> str | None:
        """Make ``step`` the step of a call with ``timestep``; None, or why it is off-plan.

        Here calls follow the plan in order, one per step (diffusers pipelines and loops);
        :class:`fxprop.runtime.grid.GridGeneration` maps them by value (k-diffusion samplers)."""
        if self.step >= len(self.plan) or not _matches(timestep, self, self.begin + self.step):
            return (f"UNet call {self.step} does not match the plan of {len(self.plan)} "
                    "steps (unexpected timestep or call order)")
        return None


def timestep_float(timestep: Any) -> float:
    t = torch.as_tensor(timestep).flatten()
    return float(t[0])


def _view_index(timestep: Any, source: Any) -> int | None:
    """Index of ``timestep`` in ``source`` if it is a 0-d view of it (host metadata only)."""
    if (isinstance(timestep, torch.Tensor) and isinstance(source, torch.Tensor)
            and timestep.ndim == 0 and timestep._base is source and source.is_contiguous()
            and source.ndim == 1):
        return timestep.storage_offset() - source.storage_offset()
    return None


def _matches(timestep: Any, gen: Generation, index: int) -> bool:
    """Whether ``timestep`` is entry ``index`` of the planned timesteps.

    A pipeline iterating ``scheduler.timesteps`` passes views of it; their storage offset is
    host metadata, so matching them costs no device sync. Other values are compared by value,
    after rounding the planned one to the call's dtype (a loop may pass ``t.to(torch.float16)``).
    """
    view = _view_index(timestep, gen.source)
    if view is not None:
        return view == index
    value, planned = timestep_float(timestep), gen.plan.timesteps[index - gen.begin]
    if value == planned:
        return True
    if isinstance(timestep, torch.Tensor) and timestep.dtype.is_floating_point:
        return float(torch.tensor(planned).to(timestep.dtype)) == value
    return False


def first_index(timesteps: torch.Tensor, timestep: Any) -> int:
    """Where a generation that starts at ``timestep`` begins in ``timesteps`` (once per run)."""
    view = _view_index(timestep, timesteps)
    if view is not None:
        return view
    values = torch.as_tensor(timesteps).flatten().tolist()
    first = timestep_float(timestep)
    return next((i for i, v in enumerate(values) if float(v) == first), 0)
