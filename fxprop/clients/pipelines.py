"""Adapters: the thin glue between :class:`AcceleratedUNet` and stock diffusers pipelines.

Nothing of a pipeline's ``__call__`` is copied, and its components stay the user's modules:
the UNet (and a ControlNet) are intercepted in place with diffusers' hook registry, so every
pipeline method (LoRA, IP-Adapter, attention processors, FreeU, offload, ``save_pretrained``)
acts on the real model and the next generation sees it. The pipeline object gets a subclass of
its own class (``isinstance`` and every attribute keep working) whose ``__call__`` opens a
scope of the runtime with a fresh :class:`PipelineCall` (the state of this call only: its
generation, ``z_T``, a ControlNet's last residuals) and composes fxprop's
``callback_on_step_end`` with the user's, and whose ``prepare_latents`` records ``z_T``.
Calls of the same components from other pipelines, or from other threads without their own
call, see no scope and run plainly. :func:`restore_pipeline` undoes all of it.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..graph.capture import flatten_call
from ..plan.policies import Policy
from ..plan.prior import increment, undefined_for
from ..runtime.accelerated import AcceleratedUNet
from ..runtime.attach import ATTRIBUTE
from ..runtime.copying import copies_plain, forget, plain_reduce
from ..runtime.follow import FollowState, active_scope
from ..runtime.intercept import add_beneath, as_model_hook, registry_of, remove_beneath

__all__ = ["PipelineAdapter", "PipelineCall", "accelerate_pipeline", "restore_pipeline",
           "is_pipeline"]

_GATE = "fxprop-key-steps-only"


def is_pipeline(obj: Any) -> bool:
    return isinstance(getattr(obj, "unet", None), nn.Module) and hasattr(obj, "scheduler")


@dataclass
class PipelineCall(FollowState):
    """The state of one pipeline call: its generation, ``z_T``, a ControlNet's residuals."""

    once: bool = True                       # plan at the first UNet call of the call
    initial_latents: torch.Tensor | None = field(default=None, repr=False)
    residuals: tuple | None = field(default=None, repr=False)  # (call key, ControlNet output)
    prior_noise: float = 0.0


@dataclass
class PipelineAdapter:
    """What fxprop added to one pipeline (nothing of any one call). The pipeline owns it (in
    its ``__dict__``), so it refers to the pipeline weakly: a dropped pipeline is freed with
    its adapter and runtime, without waiting for the garbage collector."""

    pipe_ref: Any                           # weakref.ref to the pipeline
    runtime: AcceleratedUNet
    original_class: type
    prior_noise: float
    explicit_prior_noise: bool
    controlnet: nn.Module | None = None

    @property
    def pipe(self) -> Any:
        return self.pipe_ref()

    def new_call(self) -> PipelineCall:
        """A fresh call state, with the prior noise weight this call's scheduler allows."""
        return PipelineCall(prior_noise=self.prior_noise_for(self.pipe.scheduler))

    def prior_noise_for(self, scheduler: Any) -> float:
        """The weight for a call with ``scheduler`` (the pipeline's may have been swapped)."""
        reason = undefined_for(scheduler) if self.prior_noise else None
        if reason is None:
            return self.prior_noise
        if self.explicit_prior_noise:
            raise ValueError(f"fxprop: {reason}; pass prior_noise=0 (or use another scheduler)")
        return 0.0  # the default weight: off where injection is not defined (see README)

    def record(self, call: PipelineCall, latents: torch.Tensor, timestep: Any) -> torch.Tensor:
        """Keep ``z_T``; inject before step 0 if that step is already below the threshold."""
        call.initial_latents = latents
        if call.prior_noise and timestep is not None and self._below_half(timestep):
            return latents + call.prior_noise * self._increment(latents, self.begin_index())
        return latents

    def _below_half(self, timestep: Any) -> bool:
        horizon = getattr(self.pipe.scheduler.config, "num_train_timesteps", None)
        first = torch.as_tensor(timestep).flatten()[0].item()
        return horizon is not None and first < 0.5 * horizon

    def begin_index(self) -> int:
        """Where the pipeline's generation starts in its scheduler's timesteps."""
        return getattr(self.pipe.scheduler, "begin_index", None) or 0

    def _increment(self, initial: torch.Tensor, index: int) -> torch.Tensor:
        return increment(self.pipe.scheduler, initial, index)

    def inject_after(self, call: PipelineCall, step: int, latents: torch.Tensor) -> torch.Tensor:
        """Prior noise injection before step ``step + 1`` (Faster Diffusion, Sec. 3.3)."""
        gen = call.generation
        if (not call.prior_noise or gen is None or call.initial_latents is None
                or step + 1 >= len(gen.plan) or not gen.plan.inject[step + 1]):
            return latents
        index = gen.begin + step + 1
        return latents + call.prior_noise * self._increment(call.initial_latents, index)

    def callback(self, call: PipelineCall, user: Any) -> Any:
        """fxprop's ``callback_on_step_end`` for ``call``, run after the user's."""

        def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
            out = dict(user(pipe, step, timestep, kwargs) or {}) if user is not None else {}
            out["latents"] = self.inject_after(call, step, out.get("latents", kwargs["latents"]))
            return out

        return on_step_end


def _call(self: Any, *args: Any, **kwargs: Any) -> Any:
    """``__call__`` of an accelerated pipeline: the original one in a scope of its own."""
    adapter = self.__dict__.get(ATTRIBUTE)
    if adapter is None:  # made by from_pipe on the accelerated class: a plain pipeline
        return type(self).fxprop_original_class.__call__(self, *args, **kwargs)
    adapter = _follow_unet(self, adapter)
    call = adapter.new_call()
    if call.prior_noise:
        kwargs = _with_callback(adapter, call, kwargs)
    with adapter.runtime.scope(call):
        return adapter.original_class.__call__(self, *args, **kwargs)


def _follow_unet(pipe: Any, adapter: PipelineAdapter) -> PipelineAdapter:
    """The adapter of ``pipe`` for the UNet it has now: after ``pipe.unet = other``, ``pipe``
    is accelerated again with the same policy (the old UNet's runtime is released)."""
    if pipe.unet is adapter.runtime.unet:
        return adapter
    runtime = adapter.runtime
    accelerate_pipeline(pipe, runtime.policy, adapter.explicit_prior_noise,
                        compile=runtime.compile_options)
    return pipe.__dict__[ATTRIBUTE]


def _with_callback(adapter: PipelineAdapter, call: PipelineCall, kwargs: dict) -> dict:
    """``kwargs`` with fxprop's callback composed with the user's (both are keyword-only in
    practice: they come last in every pipeline's signature)."""
    user = kwargs.get("callback_on_step_end")
    inputs = list(getattr(user, "tensor_inputs", None)
                  or kwargs.get("callback_on_step_end_tensor_inputs") or ["latents"])
    if "latents" not in inputs:
        inputs.append("latents")
    return {**kwargs, "callback_on_step_end": adapter.callback(call, user),
            "callback_on_step_end_tensor_inputs": inputs}


def _current_call(adapter: PipelineAdapter) -> PipelineCall | None:
    scope = active_scope()
    if scope is None or scope.follower is not adapter.runtime:
        return None
    return scope.state if isinstance(scope.state, PipelineCall) else None


def _prepare_latents(self: Any, *args: Any, **kwargs: Any) -> Any:
    """``prepare_latents`` of an accelerated pipeline: records ``z_T`` for prior noise (the
    latents, or the first item where it returns a tuple, as inpainting does)."""
    adapter = self.__dict__.get(ATTRIBUTE)
    original = type(self).fxprop_original_class.prepare_latents
    out = original(self, *args, **kwargs)
    call = None if adapter is None else _current_call(adapter)
    if call is None or not call.prior_noise:
        return out
    latents = out[0] if isinstance(out, tuple) else out
    timestep = inspect.signature(original).bind_partial(self, *args, **kwargs).arguments.get(
        "timestep")  # img2img passes the first timestep it runs
    if timestep is None:
        timesteps = getattr(self.scheduler, "timesteps", None)
        timestep = None if timesteps is None or len(timesteps) == 0 else timesteps[
            adapter.begin_index()]
    latents = adapter.record(call, latents, timestep)
    return (latents, *out[1:]) if isinstance(out, tuple) else latents


def _reduce_ex(self: Any, protocol: int) -> tuple:
    """Copies and pickles of an accelerated pipeline are plain pipelines of its original class
    (their UNet a plain copy, :mod:`fxprop.runtime.copying`): accelerate a copy again to accelerate
    it."""
    return plain_reduce(self, type(self).fxprop_original_class, ATTRIBUTE, protocol)


class KeyStepsOnly:
    """On a ControlNet: inside an accelerated pipeline's call, its residuals are computed at
    key steps only (encoder propagation reads them there); at other steps the key step's are
    returned, unless this call has other inputs (shapes, plain values) than that one, e.g.
    after a callback dropped classifier-free guidance: then it runs, as the UNet will. One
    hook serves every accelerated pipeline sharing the ControlNet (``gating``)."""

    def __init__(self) -> None:
        super().__init__()
        # runtime -> weakref to its adapter (which holds the runtime: a strong value would keep
        # the key, and with it every per-request pipeline, alive)
        self.gating: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        original = self.fn_ref.original_forward
        scope = active_scope()
        ref = None if scope is None else self.gating.get(scope.follower)
        adapter = None if ref is None else ref()
        if adapter is None or not isinstance(scope.state, PipelineCall):
            return original(*args, **kwargs)
        call, key = scope.state, flatten_call(original, args, kwargs).key
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if (call.residuals is None or call.residuals[0] != key
                or adapter.runtime.next_is_key(timestep)):
            call.residuals = (key, original(*args, **kwargs))
        return call.residuals[1]


_SUBCLASSES: dict[type, type] = {}


def _accelerated_class(cls: type) -> type:
    """One cached subclass per pipeline class: adds behaviour without touching the class."""
    if cls not in _SUBCLASSES:
        methods: dict[str, Any] = {"__call__": _call, "__module__": __name__,
                                   "fxprop_original_class": cls, "__reduce_ex__": _reduce_ex}
        if hasattr(cls, "prepare_latents"):
            methods["prepare_latents"] = _prepare_latents
        # The same name: configs (``_class_name`` in save_pretrained) name the user's class.
        _SUBCLASSES[cls] = type(cls.__name__, (cls,), {**methods, "__qualname__":
                                                       cls.__qualname__})
    return _SUBCLASSES[cls]


def _supports_prior_noise(cls: type) -> bool:
    params = inspect.signature(cls.__call__).parameters
    return "callback_on_step_end" in params and hasattr(cls, "prepare_latents")


def _resolve_prior_noise(pipe: Any, cls: type, policy: Policy, explicit: bool) -> float:
    """The prior noise weight of ``pipe`` (of class ``cls``), checked against its class (its
    scheduler is checked at every call: it may be swapped)."""
    if not policy.prior_noise:
        return 0.0
    if not _supports_prior_noise(cls):
        message = (f"fxprop: {cls.__name__}.__call__ has no callback_on_step_end or no "
                   "prepare_latents, so fxprop cannot inject prior noise into its latents")
        if explicit:
            raise ValueError(f"{message}; pass prior_noise=0")
        warnings.warn(f"{message}; running without it (pass prior_noise=0 to silence this)",
                      stacklevel=4)
        return 0.0
    return policy.prior_noise


def accelerate_pipeline(pipe: Any, policy: Policy, explicit_prior_noise: bool,
                        compile: Any = None) -> Any:
    """Install fxprop on ``pipe`` in place (re-planning cleanly if it was already)."""
    previous = pipe.__dict__.get(ATTRIBUTE)
    cls = type(pipe) if previous is None else previous.original_class
    prior_noise = _resolve_prior_noise(pipe, cls, policy, explicit_prior_noise)
    runtime = AcceleratedUNet(pipe.unet, policy, compile=compile)  # shares the UNet's captures
    ref = weakref.ref(pipe)
    runtime.timestep_source = lambda: ref().scheduler  # weak: the pipeline owns the runtime
    adapter = PipelineAdapter(ref, runtime, cls, prior_noise, explicit_prior_noise)
    try:
        adapter.prior_noise_for(pipe.scheduler)  # an explicit weight it cannot take: raise now
    except ValueError:
        runtime.release()
        raise
    if previous is not None:
        restore_pipeline(pipe)
    _gate_controlnet(pipe, adapter)
    pipe.__dict__[ATTRIBUTE] = adapter
    pipe.__class__ = _accelerated_class(cls)
    return pipe


def _gate_controlnet(pipe: Any, adapter: PipelineAdapter) -> None:
    controlnet = getattr(pipe, "controlnet", None)
    if not isinstance(controlnet, nn.Module) or adapter.runtime.policy.reuse != "encoder":
        return
    gate = registry_of(controlnet).get_hook(_GATE)
    if gate is None:
        gate = as_model_hook(KeyStepsOnly)()
        add_beneath(controlnet, gate, _GATE)
    gate.gating[adapter.runtime] = weakref.ref(adapter)
    adapter.controlnet = controlnet
    copies_plain(controlnet, _GATE)


def _ungate_controlnet(adapter: PipelineAdapter) -> None:
    if adapter.controlnet is None:
        return
    gate = registry_of(adapter.controlnet).get_hook(_GATE)
    if gate is not None:
        gate.gating.pop(adapter.runtime, None)
        if not gate.gating:
            remove_beneath(adapter.controlnet, _GATE)
            forget(adapter.controlnet, _GATE)


def restore_pipeline(pipe: Any) -> Any:
    """Undo :func:`accelerate_pipeline`: the original class, and the UNet and ControlNet no
    longer intercepted unless another accelerated pipeline or runtime shares them."""
    adapter = pipe.__dict__.get(ATTRIBUTE)
    if adapter is None:
        raise ValueError(f"{type(pipe).__name__} was not accelerated by fxprop; "
                         "nothing to restore")
    pipe.__class__ = adapter.original_class
    del pipe.__dict__[ATTRIBUTE]
    _ungate_controlnet(adapter)
    adapter.runtime.release()
    return pipe
