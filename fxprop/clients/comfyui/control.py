"""ControlNets at key steps only, in ComfyUI's sampler.

ComfyUI runs a ControlNet in ``samplers.calc_cond_batch`` (``control.get_control``) before the
diffusion-model call fxprop wraps, so a ControlNet left alone runs every step. Its UNet adds
the ``output`` residuals to the skips as it pops them and ``middle`` after the middle block;
in the captured graph those additions depend on encoder values and residuals only, so
encoder propagation caches them with the skips (its decoder reads no residual), while
DeepCache's shallow branch reads the residual of the shallowest skip.

fxprop's ``CALC_COND_BATCH`` wrapper (:func:`calc_cond_batch`) gives ComfyUI's batching the
run's conditionings with each ControlNet replaced by a :class:`KeyStepControl` in front of it
(the user's objects are untouched; one stand-in per ControlNet and call, so conditionings batch
as they did). At a key step the stand-in runs the ControlNet and keeps its residuals per batch
(the ControlNet, which conditioning entries, the latent's shape); at a non-key step it returns
them as the plan's frontier would be (reused, or forecast with the same weights: forecasts are
linear, so this equals forecasting the control-added skips) instead of running it. It runs the
ControlNet anyway where the kept residuals would be wrong or are missing:

* a ControlNet of the chain (``previous_controlnet``) is active at this step but was not at the
  key step, or the reverse (each one's own start/end percent: ``timestep_range``, compared as
  ComfyUI compares it), or none is active (``get_control`` is then free);
* the batch was not run at a key step (cond and uncond split differently, a new shape);
* the step runs the whole UNet after all (a call signature first seen between key steps, a
  refusal): :func:`whole_step_call` and :func:`unserved` compute its residuals then.

ControlNet classes other than ComfyUI's own (``comfy.controlnet``: ControlNet, ControlLora,
T2IAdapter ...; other packs' subclasses may vary strength per step) and context windows (one
batch key for several windows) are not served: the ControlNet runs every step of that run, said
in one log line.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import weakref
from typing import Any

import torch
import torch.utils._pytree as pytree

from ...plan.forecast import KeyFrontiers, Weights
from ...runtime.follow import active_scope
from .calls import ComfyCall, comfy_call

__all__ = ["RunControls", "KeyStepControl", "calc_cond_batch", "whole_step_call", "unserved",
           "active_pattern", "COMFY_CONTROL_MODULE"]

LOG = logging.getLogger("fxprop.comfyui")
#: The module of ComfyUI's own ControlNet classes, whose residuals depend only on the latent,
#: the step, the conditioning and which ControlNets of a chain are in range.
COMFY_CONTROL_MODULE = "comfy.controlnet"
_TOLD: "weakref.WeakKeyDictionary[Any, set[str]]" = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class RunControls:
    """The ControlNet residuals of one sampler run: the last key steps' per batch, and those
    served to the calls being made now (with how to compute them fresh)."""

    depth: int                                                  # key steps kept (forecast + 1)
    kept: dict = dataclasses.field(default_factory=dict)        # batch -> [KeyFrontiers, spec]
    served: dict = dataclasses.field(default_factory=dict)      # id -> (served dict, compute)
    refused: bool = False                                       # runs every step this run

    def keep(self, batch: tuple, pattern: tuple, step: int, control: dict) -> None:
        leaves, spec = pytree.tree_flatten(control)
        entry = self.kept.setdefault(batch, [KeyFrontiers(self.depth), spec])
        entry[0].add(step, pattern, leaves)
        entry[1] = spec

    def serve(self, batch: tuple, pattern: tuple, step: int, weights: Weights) -> dict | None:
        """The residuals of ``batch`` at ``step`` from its key steps', or None if it has none
        with this ``pattern`` of active ControlNets."""
        entry = self.kept.get(batch)
        if entry is None or not entry[0].has(pattern):
            return None
        return pytree.tree_unflatten(list(entry[0].at(step, weights)), entry[1])


def active_pattern(control: Any, t: torch.Tensor) -> tuple[bool, ...]:
    """Which ControlNets of the chain ending in ``control`` run at sigma ``t`` (ComfyUI's
    ``get_control`` skips one whose ``timestep_range`` excludes ``t[0]``)."""
    pattern = []
    while control is not None:
        limits = control.timestep_range
        pattern.append(limits is None or not bool(t[0] > limits[0] or t[0] < limits[1]))
        control = control.previous_controlnet
    return tuple(pattern)


class KeyStepControl:
    """In front of one ControlNet for one ``calc_cond_batch`` call: runs it and keeps its
    residuals (``record``, a key step) or serves the kept ones (see the module docstring).
    Every other attribute is the ControlNet's."""

    def __init__(self, control: Any, runs: RunControls, step: int, weights: Weights,
                 record: bool) -> None:
        self.control, self.runs, self.step = control, runs, step
        self.weights, self.record = weights, record

    def __getattr__(self, name: str) -> Any:
        return getattr(self.control, name)

    def get_control(self, x: torch.Tensor, t: torch.Tensor, cond: dict, batched_number: int,
                    transformer_options: dict) -> Any:
        def compute() -> Any:
            return self.control.get_control(x, t, cond, batched_number, transformer_options)

        pattern = active_pattern(self.control, t)
        if not any(pattern):
            return compute()
        batch = (id(self.control), tuple(transformer_options.get("uuids") or ()),
                 tuple(transformer_options.get("cond_or_uncond") or ()), tuple(x.shape),
                 batched_number)
        if self.record:
            out = compute()
            if isinstance(out, dict):
                self.runs.keep(batch, pattern, self.step, out)
            return out
        served = self.runs.serve(batch, pattern, self.step, self.weights)
        if served is None:
            return compute()
        self.runs.served[id(served)] = (served, compute)
        return served


def _controls(conds: list) -> dict[int, Any]:
    """The distinct ControlNets of the run's conditionings, by id."""
    found = {}
    for cond in conds:
        for entry in cond or ():
            control = entry.get("control") if isinstance(entry, dict) else None
            if control is not None:
                found[id(control)] = control
    return found


def _why_not(controls: dict[int, Any], model_options: dict) -> str | None:
    """Why the ControlNets of this call cannot be served from key steps, or None."""
    if model_options.get("context_handler") is not None:
        return "context windows run several batches of one shape per step"
    for control in controls.values():
        while control is not None:
            cls = type(control)
            if cls.__module__ != COMFY_CONTROL_MODULE:
                return (f"{cls.__module__}.{cls.__qualname__} is not one of ComfyUI's own "
                        "ControlNet classes (its residuals may change per step in ways fxprop "
                        "cannot see)")
            control = control.previous_controlnet
    return None


def calc_cond_batch(runner: Any, executor: Any, model: Any, conds: list, x_in: torch.Tensor,
                    timestep: torch.Tensor, model_options: dict, **kwargs: Any) -> Any:
    """``CALC_COND_BATCH`` wrapper: the call with its ControlNets behind
    :class:`KeyStepControl` stand-ins while ``runner``'s run follows its plan."""
    def as_it_came() -> Any:
        return executor(model, conds, x_in, timestep, model_options, **kwargs)

    scope = active_scope()
    if scope is None or scope.follower is not runner:
        return as_it_came()
    state, controls = scope.state, _controls(conds)
    gen = state.generation
    if not controls or gen is None or gen.off_plan:
        return as_it_came()
    if getattr(state, "control", None) is None:
        state.control = RunControls(gen.plan.forecast + 1)
    runs = state.control
    reason = None if runs.refused else _why_not(controls, model_options)
    if reason is not None:
        runs.refused = True
        _log_once(runner, reason)
    if runs.refused:
        return as_it_came()
    record = runner.next_is_key(timestep)   # maps the call to its step, as the UNet call will
    gen = state.generation
    if gen is None or gen.off_plan:
        return as_it_came()
    runs.served.clear()
    step = gen.step
    stand_ins = {i: KeyStepControl(c, runs, step, gen.plan.weights[step], record)
                 for i, c in controls.items()}
    behind = [None if cond is None else [_behind(entry, stand_ins) for entry in cond]
              for cond in conds]
    return executor(model, behind, x_in, timestep, model_options, **kwargs)


def _behind(entry: Any, stand_ins: dict[int, KeyStepControl]) -> Any:
    control = entry.get("control") if isinstance(entry, dict) else None
    if control is None:
        return entry
    return {**entry, "control": stand_ins[id(control)]}


def unserved(state: Any, forward: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a diffusion-model call of ``forward`` (ComfyUI passes ``control``
    positionally), with residuals computed now in place of served ones (for a call that runs
    the whole UNet); the same objects if it has none served."""
    runs = getattr(state, "control", None)
    if runs is None or not runs.served:
        return args, kwargs
    bound = inspect.signature(forward).bind(*args, **kwargs)
    control = bound.arguments.get("control")
    entry = None if control is None else runs.served.get(id(control))
    if entry is None or entry[0] is not control:
        return args, kwargs
    bound.arguments["control"] = entry[1]()
    return bound.args, bound.kwargs


def whole_step_call(state: Any, gen: Any, call: ComfyCall, forward: Any, args: tuple,
                    kwargs: dict) -> ComfyCall:
    """The planned ``call``, or, if it runs the whole UNet (a key step, or a signature without
    a frontier yet) on served residuals, the call with residuals computed now."""
    gen.select(call.key)
    if not gen.plan.is_key[gen.step] and gen.frontiers.has(call.key):
        return call
    fresh_args, fresh_kwargs = unserved(state, forward, args, kwargs)
    if fresh_args is args and fresh_kwargs is kwargs:
        return call
    return comfy_call(forward, fresh_args, fresh_kwargs)


def _log_once(runner: Any, reason: str) -> None:
    told = _TOLD.setdefault(runner, set())
    if reason not in told:
        told.add(reason)
        LOG.warning("fxprop: ControlNet residuals cannot be served from key steps: %s; the "
                    "ControlNet runs every step of this run", reason)

