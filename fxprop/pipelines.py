"""Adapters: the thin glue between :class:`AcceleratedUNet` and stock diffusers pipelines.

Nothing of a pipeline's ``__call__`` is copied. The pipeline object gets a subclass of its own
class (so ``isinstance`` and every attribute keep working) whose ``__call__`` resets the
runtime around the original call and composes fxprop's ``callback_on_step_end`` with the
user's, and whose ``prepare_latents`` records the initial noise ``z_T``. The UNet is replaced
by an :class:`AcceleratedUNet` that learns each generation's timesteps from the scheduler.
A ControlNet gets a subclass whose ``forward`` runs only at key steps. :func:`restore_pipeline`
undoes all of it.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import Policy
from .runtime import AcceleratedUNet

__all__ = ["PipelineAdapter", "accelerate_pipeline", "restore_pipeline", "is_pipeline"]

_ATTR = "_fxprop"


def is_pipeline(obj: Any) -> bool:
    return isinstance(getattr(obj, "unet", None), nn.Module) and hasattr(obj, "scheduler")


@dataclass
class PipelineAdapter:
    """What fxprop added to one pipeline, and the per-call state of prior noise injection."""

    pipe: Any
    runtime: AcceleratedUNet
    original_class: type
    prior_noise: float
    controlnet_class: type | None = None
    active: bool = False            # inside this pipeline's __call__
    initial_latents: torch.Tensor | None = field(default=None, repr=False)

    def timesteps(self) -> tuple[Any, Any, Any]:
        """The scheduler's timesteps, begin index and training horizon (each may be None)."""
        scheduler = self.scheduler()
        return (getattr(scheduler, "timesteps", None), getattr(scheduler, "begin_index", None),
                getattr(scheduler.config, "num_train_timesteps", None))

    def scheduler(self) -> Any:
        """The runtime's timestep source: the scheduler the pipeline has now."""
        return self.pipe.scheduler

    def begin(self) -> None:
        self.runtime.reset()
        self.initial_latents = None
        self.active = True

    def end(self) -> None:
        """Drop all cross-step state, also when the generation was interrupted."""
        self.begin()
        self.active = False

    def record(self, latents: torch.Tensor, timestep: Any) -> torch.Tensor:
        """Keep ``z_T``; inject before step 0 if that step is already below the threshold."""
        self.initial_latents = latents
        if self.prior_noise and timestep is not None and self._below_half(timestep):
            return latents + self.prior_noise * latents
        return latents

    def _below_half(self, timestep: Any) -> bool:
        horizon = self.timesteps()[2]
        first = torch.as_tensor(timestep).flatten()[0].item()
        return horizon is not None and first < 0.5 * horizon

    def inject_after(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        """Prior noise injection before step ``step + 1`` (Faster Diffusion, Sec. 3.3)."""
        plan = self.runtime.plan
        if (not self.prior_noise or plan is None or self.initial_latents is None
                or step + 1 >= len(plan) or not plan.inject[step + 1]):
            return latents
        return latents + self.prior_noise * self.initial_latents

    def callback(self, user: Any) -> Any:
        """fxprop's ``callback_on_step_end``, run after the user's."""

        def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
            out = dict(user(pipe, step, timestep, kwargs) or {}) if user is not None else {}
            out["latents"] = self.inject_after(step, out.get("latents", kwargs["latents"]))
            return out

        return on_step_end


def _call(self: Any, *args: Any, **kwargs: Any) -> Any:
    """``__call__`` of an accelerated pipeline: the original one, with fxprop's callback."""
    adapter: PipelineAdapter = self.__dict__[_ATTR]
    original = adapter.original_class.__call__
    if adapter.prior_noise:
        kwargs = _with_callback(adapter, kwargs)
    adapter.begin()
    try:
        return original(self, *args, **kwargs)
    finally:
        adapter.end()


def _with_callback(adapter: PipelineAdapter, kwargs: dict) -> dict:
    """``kwargs`` with fxprop's callback composed with the user's (both are keyword-only in
    practice: they come last in every pipeline's signature)."""
    user = kwargs.get("callback_on_step_end")
    inputs = list(getattr(user, "tensor_inputs", None)
                  or kwargs.get("callback_on_step_end_tensor_inputs") or ["latents"])
    if "latents" not in inputs:
        inputs.append("latents")
    return {**kwargs, "callback_on_step_end": adapter.callback(user),
            "callback_on_step_end_tensor_inputs": inputs}


def _prepare_latents(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``prepare_latents`` of an accelerated pipeline: records ``z_T`` for prior noise."""
    adapter: PipelineAdapter = self.__dict__[_ATTR]
    original = adapter.original_class.prepare_latents
    latents = original(self, *args, **kwargs)
    if not isinstance(latents, torch.Tensor):
        return latents
    timestep = inspect.signature(original).bind_partial(self, *args, **kwargs).arguments.get(
        "timestep")  # img2img passes the first timestep it runs
    if timestep is None:
        timesteps, begin, _ = adapter.timesteps()
        timestep = None if timesteps is None or len(timesteps) == 0 else timesteps[begin or 0]
    return adapter.record(latents, timestep)


def _gated_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """``forward`` of a gated ControlNet: its residuals only matter at key steps."""
    gate: dict = self.__dict__[_ATTR]
    adapter: PipelineAdapter = gate["adapter"]
    if not adapter.active:  # called by another pipeline sharing this ControlNet
        return adapter.controlnet_class.forward(self, *args, **kwargs)
    timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
    if adapter.runtime.next_is_key(timestep) or gate.get("last") is None:
        gate["last"] = adapter.controlnet_class.forward(self, *args, **kwargs)
    return gate["last"]


_SUBCLASSES: dict[tuple[type, str], type] = {}


def _subclass(cls: type, kind: str, methods: dict) -> type:
    """One cached subclass per original class: adds behaviour without touching the class."""
    if (cls, kind) not in _SUBCLASSES:
        _SUBCLASSES[cls, kind] = type(f"{kind}{cls.__name__}", (cls,),
                                      {"__module__": __name__, **methods})
    return _SUBCLASSES[cls, kind]


def _supports_prior_noise(cls: type) -> bool:
    params = inspect.signature(cls.__call__).parameters
    return "callback_on_step_end" in params and hasattr(cls, "prepare_latents")


def _resolve_prior_noise(cls: type, policy: Policy, explicit: bool) -> float:
    if not policy.prior_noise or _supports_prior_noise(cls):
        return policy.prior_noise
    message = (f"fxprop: {cls.__name__}.__call__ has no callback_on_step_end or no prepare_latents, so "
               "fxprop cannot inject prior noise into its latents")
    if explicit:
        raise ValueError(f"{message}; pass prior_noise=0")
    warnings.warn(f"{message}; running without it (pass prior_noise=0 to silence this)",
                  stacklevel=3)
    return 0.0


def accelerate_pipeline(pipe: Any, policy: Policy, explicit_prior_noise: bool,
                        compile: Any = None) -> Any:
    """Install fxprop on ``pipe`` in place (re-planning cleanly if it was already)."""
    if _ATTR in pipe.__dict__:
        restore_pipeline(pipe)
    cls = type(pipe)
    prior_noise = _resolve_prior_noise(cls, policy, explicit_prior_noise)
    runtime = AcceleratedUNet(pipe.unet, policy, compile=compile)
    adapter = PipelineAdapter(pipe, runtime, cls, prior_noise)
    runtime.timestep_source = adapter.scheduler
    methods = {"__call__": _call}
    if hasattr(cls, "prepare_latents"):
        methods["prepare_latents"] = _prepare_latents
    pipe.__dict__[_ATTR] = adapter
    pipe.__class__ = _subclass(cls, "Accelerated", methods)
    pipe.unet = runtime
    _gate_controlnet(pipe, adapter)
    return pipe


def _gate_controlnet(pipe: Any, adapter: PipelineAdapter) -> None:
    controlnet = getattr(pipe, "controlnet", None)
    if not isinstance(controlnet, nn.Module) or adapter.runtime.policy.reuse != "encoder":
        return
    adapter.controlnet_class = type(controlnet)
    controlnet.__dict__[_ATTR] = {"adapter": adapter}
    controlnet.__class__ = _subclass(type(controlnet), "KeyStepOnly", {"forward": _gated_forward})


def restore_pipeline(pipe: Any) -> Any:
    """Undo :func:`accelerate_pipeline`: original class, UNet and ControlNet, bit for bit."""
    adapter = pipe.__dict__.get(_ATTR)
    if adapter is None:
        raise ValueError(f"{type(pipe).__name__} was not accelerated by fxprop; "
                         "nothing to restore")
    pipe.__class__ = adapter.original_class
    del pipe.__dict__[_ATTR]
    pipe.unet = adapter.runtime.unet
    if adapter.controlnet_class is not None:
        pipe.controlnet.__class__ = adapter.controlnet_class
        del pipe.controlnet.__dict__[_ATTR]
    adapter.end()
    return pipe
