"""fxprop's runtime inside ComfyUI's sampler: one plan per sampler run, one planned step per
diffusion-model call.

:class:`ComfyRunner` is registered on a ``ModelPatcher`` clone as two wrappers
(:mod:`fxprop.clients.comfyui.patch`): ``OUTER_SAMPLE`` (once per sampler run: plan over the
run's sigmas, the grid of KSampler, KSamplerAdvanced's partial grid, img2img's or
SamplerCustom's, and drop everything in ``finally``, also when the run raises or is
interrupted) and ``DIFFUSION_MODEL`` (around every call of the UNet: it receives the UNet and
its call, and returns the planned step's output, or runs the call as it came). Calls are mapped
to grid steps by the sigma ComfyUI passes in ``transformer_options["sigmas"]``
(:mod:`fxprop.runtime.grid`), so repeated rounded timesteps, Heun's second calls and midpoints
are placed by the rules of k-diffusion grids. Runtime state lives in the run's
:class:`~fxprop.runtime.follow.Scope`, never in ``model_options`` (which ``clone()``
deep-copies); captured graphs live in a cache the UNet module owns (they go when ComfyUI
unloads the model), keyed by the state they are taken in (its fingerprint, grad and autocast
modes: LoRA weights patched in or restored make a new capture, whose entry drops the graphs
holding weights the UNet no longer has) and the call signature.

What it cannot run right it refuses, in ComfyUI's log (each reason once) and as a warning,
running the whole UNet: lowvram partial loading and weight patches applied per call (weights
only cast from their stored dtype are captured), other nodes' attention patches and
replacements (they may keep Python state across calls), other ``DIFFUSION_MODEL`` wrappers
beneath fxprop's, a UNet it cannot capture or cut, a grid whose sigmas do not decrease.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Hashable

import torch
import torch.utils._pytree as pytree
from torch import nn

from ...graph.cache import owned_cache
from ...graph.capture import Captured, FlatCall, capture, why_not_captured
from ...graph.regions import resolve_layout
from ...graph.split import Parts, split
from ...plan.plans import Plan
from ...plan.policies import Policy
from ...runtime.compile import CompileOptions, compile_options, compile_parts
from ...runtime.follow import FollowState, PlanFollower, Scope, active_scope, scoped
from ...runtime.generation import Generation
from ...runtime.intercept import NOT_PLANNED, check_hooks
from .calls import ComfyCall, attention_patches, comfy_call
from .control import unserved, whole_step_call
from .parallel import ComfyParallel, comfy_timestep_of

__all__ = ["ComfyRunner", "lowvram_reason"]

LOG = logging.getLogger("fxprop.comfyui")


def lowvram_reason(unet: nn.Module, model: Any = None) -> str | None:
    """Why ``unet`` cannot run as a captured graph now, or None: ComfyUI's lowvram partial
    loading (``model``, the BaseModel, says ``model_lowvram``: weights move between devices at
    every call) or weight patches applied at every call (``weight_function``, as lowvram applies
    LoRA). Weights cast from their stored dtype at every call (fp8, fp16 or bf16 checkpoints
    computed in another dtype: ComfyUI's manual casting) are captured: the cast is in the graph,
    which reads the stored weights live."""
    if getattr(model, "model_lowvram", False):
        return ("the model is partially loaded (ComfyUI's lowvram mode moves its weights between "
                "devices at every call; a captured graph would not): free memory or use "
                "--normalvram/--highvram")
    for path, module in unet.named_modules():
        if getattr(module, "weight_function", None) or getattr(module, "bias_function", None):
            return (f"{path or type(unet).__name__} patches its weights at every call "
                    "(ComfyUI's lowvram LoRA patches); a captured graph would not: free memory "
                    "or use --normalvram/--highvram")
    return None


@dataclasses.dataclass
class RunState(FollowState):
    """What one sampler run follows, and its unit noise (for prior noise injection)."""

    noise: torch.Tensor | None = None
    compile: CompileOptions | None = None   # the parts' compile options for this run
    model: Any = None                       # ComfyUI's BaseModel of this run (lowvram state)
    control: Any = None                     # its ControlNet residuals (control.RunControls)


class ComfyRunner(ComfyParallel, PlanFollower):
    """A policy's runtime for ComfyUI sampler runs (see the module docstring).

    ``start_percent`` / ``end_percent``: steps whose sigma lies before ``start_percent`` or
    after ``end_percent`` of the model's sampling range (ComfyUI's ``percent_to_sigma``) are all
    key steps. ``prior_noise`` of the policy is added to the UNet input at the plan's
    ``inject`` steps as ``prior_noise * noise`` (the run's unit noise; ComfyUI's samplers own
    the latent, which is left as it is). With the policy's ``parallel``, each segment's
    decoder passes run as one batched call (:mod:`fxprop.clients.comfyui.parallel`).
    """

    def __init__(self, policy: Policy, start_percent: float = 0.0, end_percent: float = 1.0,
                 compile: Any = None) -> None:
        super().__init__(None)
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise ValueError(f"need 0 <= start_percent <= end_percent <= 1, got "
                             f"{start_percent} and {end_percent}")
        self.policy = policy
        self.percents = (start_percent, end_percent)
        self.compile_options = compile_options(compile)
        self._told: set[str] = set()   # reasons logged already: one log line each

    # -- one sampler run (OUTER_SAMPLE) ---------------------------------------------------------

    def outer_sample(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        """``OUTER_SAMPLE`` wrapper: plan over the run's sigmas, run, forget."""
        noise, sigmas = args[0], args[3] if len(args) > 3 else kwargs["sigmas"]
        patcher = executor.class_obj.model_patcher
        state = RunState(noise=noise, compile=self.compile_options or model_compile(patcher),
                         model=getattr(patcher, "model", None))
        with scoped(Scope(self, state)):
            try:
                self.start(sigmas, patcher)
                return executor(*args, **kwargs)
            finally:
                if state.generation is not None:
                    state.generation.release()
                self.reset()

    def start(self, sigmas: torch.Tensor, patcher: Any) -> Plan | None:
        """Plan a run over ``sigmas`` for the model of ``patcher``; None if refused (logged)."""
        sampling = patcher.get_model_object("model_sampling")
        try:
            with torch.no_grad():
                timesteps = sampling.timestep(sigmas.float()).float().cpu()
            train = getattr(sampling, "sigmas", None)
            plan = self.set_grid(sigmas.float().cpu(), timesteps,
                                 len(train) if isinstance(train, torch.Tensor) else None,
                                 by="sigma", policy=self.run_policy(sigmas, sampling),
                                 timestep_of=comfy_timestep_of(sampling))
        except ValueError as err:
            self._refuse(f"cannot plan this run: {err}")
            return None
        return plan

    def run_policy(self, sigmas: torch.Tensor, sampling: Any) -> Policy:
        """The policy with this run's key steps: the policy's, plus every step outside
        ``[start_percent, end_percent]``."""
        steps = len(sigmas) - 1
        if steps < 1 or self.percents == (0.0, 1.0):
            return self.policy
        high, low = (float(sampling.percent_to_sigma(p)) for p in self.percents)
        grid = sigmas[:-1].tolist()
        forced = {i for i, s in enumerate(grid) if s > high or s < low}
        keys = sorted(set(self.policy.schedule(steps)) | forced)
        return dataclasses.replace(self.policy, key_steps=keys)

    # -- one diffusion-model call (DIFFUSION_MODEL) ---------------------------------------------

    def diffusion_model(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        """``DIFFUSION_MODEL`` wrapper: the planned step's output, else the call as it came."""
        scope = active_scope()
        gen = scope.state.generation if scope is not None and scope.follower is self else None
        if gen is not None and not gen.off_plan:
            out = self.planned(executor, args, kwargs)
            if out is not NOT_PLANNED:
                return out
        args, kwargs = unserved(self.follow_state(), executor.original, args, kwargs)
        return executor(*args, **kwargs)  # with fresh ControlNet residuals if any were served

    def planned(self, executor: Any, args: tuple, kwargs: dict) -> Any:
        """The output of this call by the plan, or ``NOT_PLANNED``."""
        unet, forward = executor.class_obj, executor.original
        beneath = executor.wrappers[executor.idx + 1:]
        if beneath:
            return self._refuse(f"other DIFFUSION_MODEL wrappers run beneath fxprop's "
                                f"({[getattr(w, '__qualname__', w) for w in beneath]}); a "
                                "captured graph would skip them")
        call = comfy_call(forward, args, kwargs)
        patches = attention_patches(call.options)
        if patches:
            return self._refuse(f"attention patches of other nodes {patches[:3]} may keep "
                                "state across calls, which a captured graph would not run")
        if call.sigma is None:
            return self._refuse("ComfyUI passed no transformer_options['sigmas'] to map the "
                                "call to its step")
        gen = self._on_plan(call.sigma)
        if gen is None:
            return NOT_PLANNED
        if gen.model_state is None:
            reason = lowvram_reason(unet, getattr(self.follow_state(), "model", None))
            if reason is not None:
                return self._refuse(reason)
            self.check_model(unet)
            cache = owned_cache(unet)   # every runner's: two fxprop nodes capture once
            cache.begin_run()           # the graphs this run uses are kept while it runs
            gen.model_state = cache.state(unet, call.flat.tensors[0])
        try:
            captured, parts = self.parts_for(unet, forward, call.flat, gen.model_state)
        except Exception as err:  # any capture or cut failure: run ComfyUI's own forward
            return self._refuse(_cannot_capture(unet, err))
        call = whole_step_call(self.follow_state(), gen, call, forward, args, kwargs)
        self._inject(gen, call)
        out = self.run_planned(gen, call, parts)
        if out is None:
            return NOT_PLANNED
        return pytree.tree_unflatten(list(out), captured.out_spec)

    def check_model(self, unet: nn.Module) -> None:
        """Raise ``ValueError`` if this runner must not run ``unet`` as loaded for this run
        (checked at the run's first planned call; any UNet here)."""

    def _inject(self, gen: Generation, call: ComfyCall) -> None:
        """Add prior noise to the call's latent at the plan's ``inject`` steps."""
        noise = getattr(self.follow_state(), "noise", None)
        weight = self.policy.prior_noise
        if not weight or noise is None or not gen.plan.inject[gen.step]:
            return
        x = call.flat.tensors[0]
        if x.shape[0] % noise.shape[0] or x.shape[1:] != noise.shape[1:]:
            return
        repeats = (x.shape[0] // noise.shape[0],) + (1,) * (x.ndim - 1)
        call.flat.tensors[0] = x + weight * noise.to(x.device, x.dtype).repeat(repeats)

    # -- captured graphs ------------------------------------------------------------------------

    def parts_for(self, unet: nn.Module, forward: Any, call: FlatCall,
                  state: Hashable) -> tuple[Captured, Parts]:
        """Captured graph and parts of ``unet`` for ``call`` in ``state`` (cached per UNet)."""
        def make_capture() -> Captured:
            check_hooks(unet)
            return capture(unet, call, forward)

        entry = owned_cache(unet).entry(state, call.key, make_capture, owner=unet)
        options = getattr(self.follow_state(), "compile", None)
        key = ("parts", self.policy.cut_id, repr(options))
        return entry.captured, entry.get(key, lambda: self._split(unet, entry.captured, options))

    def _split(self, unet: nn.Module, captured: Captured, options: Any) -> Parts:
        self.policy.validate(unet)
        layout = resolve_layout(unet, self.policy.regions)
        return compile_parts(split(captured, self.policy.cut(captured, layout)), options)

    # -- refusals -------------------------------------------------------------------------------

    def _refuse(self, reason: str) -> Any:
        """Run the whole UNet for the rest of this run, saying why; ``NOT_PLANNED``."""
        gen = self._generation
        if gen is not None:
            gen.leave_plan()
        self._warn(reason)
        return NOT_PLANNED

    def _warn(self, reason: str) -> None:
        """Warn once per run; log each reason once (a workflow run again says nothing new)."""
        if not self.follow_state().warned and reason not in self._told:
            self._told.add(reason)
            LOG.warning("fxprop: %s; running the whole UNet for the rest of this run", reason)
        super()._warn(reason)


def _cannot_capture(unet: nn.Module, err: Exception) -> str:
    """Why ``unet`` runs plain, in one line; a patch that reads the step's sigma is named."""
    why = why_not_captured(err)
    hint = ("; a node that patches the model does this (Deep Shrink's PatchModelAddDownscale "
            "compares the step's sigma): without it fxprop accelerates"
            if "reads the value" in why else "")
    return f"cannot capture and cut {type(unet).__name__} as patched: {why}{hint}"


def model_compile(patcher: Any) -> CompileOptions | None:
    """The compile options a model asks for (ComfyUI's TorchCompileModel stores them in its
    ``model_options``), so that fxprop's parts compile as the UNet would have."""
    asked = getattr(patcher, "model_options", {}).get("torch_compile_kwargs")
    if not asked:
        return None
    return compile_options({"backend": asked.get("backend") or "inductor",
                            "mode": asked.get("mode"), "options": asked.get("options"),
                            "dynamic": asked.get("dynamic") or False})
