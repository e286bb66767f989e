"""Following a plan across the UNet calls of one generation, with one step function.

:class:`PlanFollower` is shared by the runtime (:class:`fxprop.AcceleratedUNet`) and by loaded
exports (:class:`fxprop.runtime.export.LoadedUNet`): it starts a generation when the pipeline's
scheduler sets its timesteps (or :meth:`~PlanFollower.set_timesteps` is called), checks that
every call is the planned one, and otherwise marks the generation off-plan and warns once.
A generation started by :meth:`~PlanFollower.set_sigmas` (k-diffusion samplers) maps calls to
the steps of a sigma grid by their timestep instead (:mod:`fxprop.runtime.grid`).
:meth:`PlanFollower.run_planned` is the one step function of both (plan lookup, then the full
part at a key step or the every-step part on the planned frontier, then the cache update), so
an export cannot behave differently from the runtime. One generation's state, and how a call's
timestep is matched to its planned step, are :mod:`fxprop.runtime.generation`'s.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import nn

from ..plan.forecast import sigma_signal, signal_levels
from ..plan.plans import Plan
from .generation import Generation, first_index
from .grid import GridGeneration, grid_values, host_floats, model_timesteps
from .gridparallel import ParallelGridGeneration, TimestepOf

__all__ = ["PlanFollower", "FollowState", "Scope", "active_scope", "TimestepSource", "StepCall",
           "StepParts"]

#: () -> the scheduler of the current generation (its ``timesteps``, ``begin_index``,
#: ``config.num_train_timesteps`` and signal levels are read when it sets new timesteps)
TimestepSource = Callable[[], Any]


class StepCall(Protocol):
    """A UNet call as the step function sees it (:class:`fxprop.graph.capture.FlatCall` is one)."""

    key: Any                         # its signature: frontiers of another are never reused
    tensors: list[torch.Tensor]      # its tensor inputs, in the parts' order


class StepParts(Protocol):
    """The two parts the step function runs (:class:`fxprop.graph.split.Parts` is one)."""

    full: Callable[..., Sequence[torch.Tensor]]   # all inputs -> (*outputs, *frontier)
    step: Callable[..., Sequence[torch.Tensor]]   # (*step inputs, *frontier) -> outputs
    step_inputs: list[int]                        # the call's tensors the step part reads
    num_outputs: int



@dataclass
class FollowState:
    """What one scope follows: a pipeline call's generation, or a thread's own loop's."""

    generation: Generation | None = None
    warned: bool = False           # warned once in this generation
    once: bool = False             # plan at the first call only (a pipeline call)


@dataclass
class Scope:
    """A runtime following ``state`` while it is active (see :func:`active_scope`)."""

    follower: "PlanFollower"
    state: FollowState = field(default_factory=FollowState)


_SCOPE: ContextVar[Scope | None] = ContextVar("fxprop_scope", default=None)
_THREAD = threading.local()


def active_scope() -> Scope | None:
    """The scope of the UNet call being made in this thread (or task), if any."""
    return _SCOPE.get()


@contextlib.contextmanager
def scoped(scope: Scope) -> Iterator[Scope]:
    """Make ``scope`` active for the calls made inside the ``with`` block."""
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


def _thread_state(owner: "PlanFollower") -> FollowState:
    """``owner``'s state in this thread: a user's loop is one thread's, never shared."""
    states = _THREAD.__dict__.setdefault("states", weakref.WeakKeyDictionary())
    if owner not in states:
        states[owner] = FollowState()
    return states[owner]


class PlanFollower(nn.Module):
    """Base of modules that run one UNet call per planned step (see the module docstring).

    Subclasses set ``policy`` (a :class:`fxprop.plan.policies.Policy`): plans are made by it. The
    generation followed belongs to the active :class:`Scope` (a pipeline call) or else to the
    calling thread, so two threads never share one.
    """

    policy: Any

    def __init__(self, timestep_source: TimestepSource | None = None) -> None:
        super().__init__()
        self.timestep_source = timestep_source

    def follow_state(self) -> FollowState:
        """The state of the calls made now: the active scope's if it is this follower's."""
        scope = _SCOPE.get()
        if scope is not None and scope.follower is self:
            return scope.state
        return _thread_state(self)

    @property
    def _generation(self) -> Generation | None:
        return self.follow_state().generation

    @property
    def plan(self) -> Plan | None:
        return None if self._generation is None else self._generation.plan

    @property
    def step(self) -> int:
        """The index of the next UNet call in the current generation."""
        return 0 if self._generation is None else self._generation.step

    @property
    def off_plan(self) -> bool:
        """Whether the current generation left its plan (it runs the whole UNet)."""
        return self._generation is not None and self._generation.off_plan

    def _start(self, generation: Generation | None) -> None:
        state = self.follow_state()
        state.generation, state.warned = generation, False  # warn once per generation

    def set_timesteps(self, timesteps: torch.Tensor, num_train_timesteps: int | None = None,
                      begin: int = 0, signal: Sequence[float] | None = None) -> Plan:
        """Start a generation over ``timesteps[begin:]``; returns its plan.

        ``signal``: ``sqrt(alpha_bar)`` of every entry of ``timesteps``
        (``fxprop.signal_levels(scheduler)``), needed by forecasts in that variable.
        """
        plan = self.policy.plan(timesteps[begin:], num_train_timesteps,
                                None if signal is None else list(signal)[begin:])
        self._start(self._new_generation(plan, timesteps, begin))
        return plan

    def set_sigmas(self, sigmas: torch.Tensor, model_wrap: Any) -> Plan:
        """Start a generation of a k-diffusion sampler over the grid ``sigmas``; returns its
        plan (one step per grid point but the last, key steps index them).

        ``model_wrap``: the sampler's model wrapper (``CompVisDenoiser``,
        ``DiscreteEpsDDPMDenoiser``, anything with ``sigma_to_t``): the grid's timesteps are
        ``model_wrap.sigma_to_t(sigmas[:-1])``, and each call is mapped to a grid step by the
        timestep the UNet receives (see :mod:`fxprop.runtime.grid`), so Heun's and DPM2's second
        calls and DPM++ 2S/SDE midpoints belong to a step. Forecasts in the signal variable
        use ``1 / sqrt(1 + sigma^2)``. In parallel mode a segment's decoder passes are batched
        at ``model_wrap.sigma_to_t`` of its grid sigmas (:mod:`fxprop.runtime.gridparallel`).
        Raises ``ValueError`` for a grid whose timesteps do not decrease."""
        train = getattr(model_wrap, "sigmas", None)
        return self.set_grid(sigmas, model_timesteps(sigmas, model_wrap),
                             len(train) if isinstance(train, torch.Tensor) else None,
                             timestep_of=model_wrap.sigma_to_t)

    def set_grid(self, sigmas: Any, timesteps: Any, num_train_timesteps: int | None = None,
                 by: str = "timestep", policy: Any = None,
                 timestep_of: TimestepOf | None = None) -> Plan:
        """Start a generation of a sampler over the grid ``sigmas`` (step ``i`` is
        ``sigmas[i]``, the last entry is the end), whose UNet receives ``timesteps`` (one per
        entry of ``sigmas``); returns its plan. Each call is mapped to its grid step by the
        value it carries: ``by="timestep"`` (the UNet's timestep, :meth:`set_sigmas`) or
        ``by="sigma"`` (the caller passes each call's sigma; the timesteps may then repeat,
        as ComfyUI's rounded ones do). ``policy``: plan with it instead of ``self.policy``
        (a run's own key steps). ``timestep_of``: sigmas -> the UNet's timesteps at them, as
        the loop computes them (needed in parallel mode, which batches future steps). Raises
        ``ValueError`` for a grid whose ``by`` values do not decrease strictly, and in parallel
        mode without ``timestep_of`` or with a process group."""
        if by not in ("timestep", "sigma"):
            raise ValueError(f"by must be 'timestep' or 'sigma', got {by!r}")
        policy = self.policy if policy is None else policy
        if policy.batches and (timestep_of is None or policy.group is not None):
            raise ValueError("parallel mode on a sigma grid needs timestep_of (how the loop "
                             "makes the UNet's timestep from a sigma; set_sigmas passes "
                             "model_wrap.sigma_to_t) and no process group (group=None); got "
                             f"timestep_of={timestep_of!r}, group={policy.group!r}")
        sigma_values, t_values = host_floats(sigmas), host_floats(timesteps)
        if len(t_values) != len(sigma_values):
            raise ValueError(f"timesteps must hold one entry per sigma ({len(sigma_values)}), "
                             f"got {len(t_values)}")
        grid, end = grid_values(t_values if by == "timestep" else sigma_values, by)
        signal = sigma_signal(sigma_values[:-1])
        plan = policy.plan(t_values[:-1], num_train_timesteps,
                           signal if policy.needs_signal else None)
        if policy.batches:
            gen = ParallelGridGeneration(plan, sigmas, end=end, grid=tuple(grid), unit=by,
                                         timestep_of=timestep_of)
        else:
            gen = GridGeneration(plan, sigmas, end=end, grid=tuple(grid), unit=by)
        self._start(gen)
        return plan

    def _new_generation(self, plan: Plan, source: Any, begin: int) -> Generation:
        return Generation(plan, source, begin)

    def reset(self) -> None:
        """Forget the current generation (plan and cached frontier)."""
        self._start(None)

    def _sync(self, timestep: Any) -> None:
        """Start a new generation if the timestep source was set anew since the last plan."""
        if self.timestep_source is None:
            return
        state = self.follow_state()
        if state.once and state.generation is not None:
            return  # a pipeline call plans once: other threads may set the shared scheduler
        scheduler = self.timestep_source()
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None or (state.generation and state.generation.source is timesteps):
            return
        begin = getattr(scheduler, "begin_index", None)
        if begin is None:
            begin = first_index(timesteps, timestep)
        signal = signal_levels(scheduler) if self.policy.needs_signal else None
        self.set_timesteps(timesteps, getattr(scheduler.config, "num_train_timesteps", None),
                           begin, signal)

    def _warn(self, reason: str) -> None:
        state = self.follow_state()
        if not state.warned:
            state.warned = True
            warnings.warn(f"fxprop: {reason}; running the whole UNet for the rest of this "
                          "generation (correct, not accelerated)", stacklevel=3)

    def _on_plan(self, timestep: Any) -> Generation | None:
        """The current generation if the next call matches its plan, else None (and warn)."""
        self._sync(timestep)
        gen = self._generation
        if gen is None:
            self._warn("no plan: call set_timesteps(...) before the loop (set_sigmas(sigmas, "
                       "model_wrap) before a k-diffusion sampler; adaptive-step samplers, "
                       "sample_dpm_adaptive and sample_dpm_fast, have no grid to plan on)")
            return None
        if gen.off_plan:
            return None
        reason = gen.match(timestep)
        if reason is not None:
            gen.leave_plan()
            self._warn(reason)
            return None
        return gen

    # -- the step function ---------------------------------------------------------------------

    def run_planned(self, gen: Generation, call: StepCall, parts: StepParts) -> tuple | None:
        """Run the next planned step of ``gen`` for ``call``.

        Returns its outputs, or None if it cannot follow the plan (a non-key step whose
        inputs have another signature than its key step's): then the caller runs the whole
        UNet and the generation is off-plan.
        """
        step, gen.step = gen.step, gen.step + 1
        gen.select(call.key)
        if gen.plan.is_key[step] or (gen.adopts and not gen.frontiers.has(call.key)):
            out = self._key_step(gen, step, call, parts)
        elif gen.frontiers.has(call.key):
            out = self._reuse_step(gen, step, call, parts)
        else:
            gen.leave_plan()
            self._warn(f"UNet call {step} has other inputs than its key step")
            return None
        if gen.finished:
            gen.release()
        return out

    def _key_step(self, gen: Generation, step: int, call: StepCall, parts: StepParts) -> tuple:
        """Run the whole UNet, keeping the frontier (parallel mode extends this)."""
        out = parts.full(*call.tensors)
        gen.frontiers.add(step, call.key, out[parts.num_outputs:])
        return tuple(out[: parts.num_outputs])

    def _reuse_step(self, gen: Generation, step: int, call: StepCall,
                    parts: StepParts) -> tuple:
        """Run the every-step part on the planned (reused or forecast) frontier."""
        frontier = gen.frontiers.at(step, gen.plan.weights[step])
        return tuple(parts.step(*[call.tensors[i] for i in parts.step_inputs], *frontier))

    def next_is_key(self, timestep: Any) -> bool:
        """Whether the next call with ``timestep`` computes the cut part (used by adapters)."""
        gen = self._on_plan(timestep)
        return gen is None or gen.plan.is_key[gen.step]



