"""Following a plan across the UNet calls of one generation.

:class:`PlanFollower` is the state machine shared by the runtime (:class:`fxprop.AcceleratedUNet`)
and by loaded exports (:class:`fxprop.export.LoadedUNet`): it starts a generation when the
pipeline's scheduler sets its timesteps (or :meth:`~PlanFollower.set_timesteps` is called),
checks that every call is the planned one, and otherwise marks the generation off-plan and
warns once. Planned timesteps are host numbers; a pipeline's timestep (a view of the scheduler's
timesteps) is matched by its storage offset, so the common path reads no device value.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from .plan import Plan, make_plan
from .schedules import Schedule

if TYPE_CHECKING:
    from .capture import CallKey
    from .parallel import Chunk

__all__ = ["PlanFollower", "Generation", "TimestepSource"]

#: () -> (timesteps tensor or None, begin index or None, num_train_timesteps or None)
TimestepSource = Callable[[], tuple[Any, Any, Any]]


@dataclass
class Generation:
    """Cross-step state of one generation; dropped whole when a new one starts."""

    plan: Plan
    source: Any                     # the timesteps tensor planned from (compared by identity)
    begin: int = 0                  # index of step 0 in ``source``
    step: int = 0                   # the next step to run
    frontier: tuple | None = None
    frontier_key: CallKey | None = None
    off_plan: bool = False
    chunk: Chunk | None = None      # parallel mode: outputs of the current chunk of steps
    timesteps: torch.Tensor | None = None  # parallel mode: the plan's, on the call's device


class PlanFollower(nn.Module):
    """Base of modules that run one UNet call per planned step (see the module docstring)."""

    def __init__(self, timestep_source: TimestepSource | None = None) -> None:
        super().__init__()
        self._source = timestep_source
        self._generation: Generation | None = None
        self._warned = False

    @property
    def schedule(self) -> Schedule:
        """The key-step schedule plans are made with."""
        raise NotImplementedError

    @property
    def plan(self) -> Plan | None:
        return None if self._generation is None else self._generation.plan

    @property
    def step(self) -> int:
        """The index of the next UNet call in the current generation."""
        return 0 if self._generation is None else self._generation.step

    def set_timesteps(self, timesteps: torch.Tensor, num_train_timesteps: int | None = None,
                      begin: int = 0) -> Plan:
        """Start a generation over ``timesteps[begin:]``; returns its plan."""
        plan = make_plan(timesteps[begin:], self.schedule, num_train_timesteps)
        self._warned = False  # warn once per generation
        self._generation = Generation(plan, timesteps, begin)
        return plan

    def reset(self) -> None:
        """Forget the current generation (plan and cached frontier)."""
        self._generation = None
        self._warned = False

    def _sync(self, timestep: Any) -> None:
        """Start a new generation if the timestep source was set anew since the last plan."""
        if self._source is None:
            return
        timesteps, begin, horizon = self._source()
        if timesteps is None or (self._generation and self._generation.source is timesteps):
            return
        if begin is None:
            begin = _first_index(timesteps, timestep)
        self.set_timesteps(timesteps, horizon, begin)

    def _warn(self, reason: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"fxprop: {reason}; running the whole UNet for the rest of this "
                          "generation (correct, not accelerated)", stacklevel=3)

    def _on_plan(self, timestep: Any) -> Generation | None:
        """The current generation if the next call matches its plan, else None (and warn)."""
        self._sync(timestep)
        gen = self._generation
        if gen is None:
            self._warn("no plan: call set_timesteps(...) before the loop")
            return None
        if gen.off_plan:
            return None
        if gen.step >= len(gen.plan) or not _matches(timestep, gen, gen.begin + gen.step):
            gen.off_plan, gen.frontier, gen.chunk = True, None, None
            self._warn(f"UNet call {gen.step} does not match the plan of {len(gen.plan)} "
                       "steps (unexpected timestep or call order)")
            return None
        return gen

    def next_is_key(self, timestep: Any) -> bool:
        """Whether the next call with ``timestep`` computes the cut part (used by adapters)."""
        gen = self._on_plan(timestep)
        return gen is None or gen.plan.is_key[gen.step]


def _timestep_float(timestep: Any) -> float:
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
    value, planned = _timestep_float(timestep), gen.plan.timesteps[index - gen.begin]
    if value == planned:
        return True
    if isinstance(timestep, torch.Tensor) and timestep.dtype.is_floating_point:
        return float(torch.tensor(planned).to(timestep.dtype)) == value
    return False


def _first_index(timesteps: torch.Tensor, timestep: Any) -> int:
    """Where a generation that starts at ``timestep`` begins in ``timesteps`` (once per run)."""
    view = _view_index(timestep, timesteps)
    if view is not None:
        return view
    values = torch.as_tensor(timesteps).flatten().tolist()
    first = _timestep_float(timestep)
    return next((i for i, v in enumerate(values) if float(v) == first), 0)
