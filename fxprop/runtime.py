"""The runtime: a module with the UNet's own call signature that follows a plan.

:class:`AcceleratedUNet` captures the UNet once per input signature, splits it with the
policy's cut, and at every call runs either the full graph (key step: output and frontier) or
the every-step part on the cached frontier. The frontier is its only cross-step state (plus,
in parallel mode, the outputs of the current chunk of steps: see :mod:`fxprop.parallel`). Any
call that does not match the plan runs the whole UNet, which is always correct, and warns once.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.profiler import record_function

from .capture import CallKey, Captured, FlatCall, capture, flatten_call
from .compile import CompileOptions, compile_options, compile_parts
from .config import Policy
from .follow import PlanFollower, TimestepSource, Generation
from .parallel import (Chunk, Inputs, batched_inputs, check_batched, chunk_at, repeat_batch,
                       repeated_call, steps_per_call, timestep_vector)
from .regions import resolve_layout
from .schedules import Schedule
from .split import Parts, split

__all__ = ["AcceleratedUNet", "TimestepSource"]


class AcceleratedUNet(PlanFollower):
    """Drop-in replacement of a UNet that reuses features across steps by a plan."""

    def __init__(self, unet: nn.Module, policy: Policy,
                 timestep_source: TimestepSource | None = None,
                 compile: bool | dict | CompileOptions | None = None) -> None:
        super().__init__(timestep_source)
        self.unet = unet
        self.policy = policy
        self.compile_options = compile_options(compile)
        self.layout = resolve_layout(unet, getattr(policy, "regions", None))
        policy.validate(unet)
        self._captured: dict[CallKey, tuple[Captured, Parts]] = {}
        self._batched: dict[tuple[CallKey, int], Parts] = {}
        self._timestep_name = list(inspect.signature(unet.forward).parameters)[1]

    def __getattr__(self, name: str) -> Any:
        # Pipelines read ``unet.config``, ``unet.dtype``, ``unet.add_embedding`` ...
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules") or {}
            if "unet" not in modules:
                raise
            value = getattr(modules["unet"], name)
            if name in MUTATORS and callable(value):
                return _clearing(value, self)
            return value

    def with_policy(self, policy: Policy) -> "AcceleratedUNet":
        """A runtime of the same UNet with ``policy``; it shares this one's captured graphs
        when both cut alike (same reuse mode, branch and layout), so re-planning costs no new
        capture."""
        other = AcceleratedUNet(self.unet, policy, self._source, self.compile_options)
        same_cut = (type(policy) is type(self.policy) and other.layout == self.layout
                    and getattr(policy, "branch", None) == getattr(self.policy, "branch", None))
        if same_cut:
            other._captured, other._batched = self._captured, self._batched
        return other

    def clear_cache(self) -> None:
        """Drop every captured graph (and the generation). Needed after changing the UNet in a
        way its graphs baked in (attention processors, FreeU, new LoRA scales); the methods
        that do so are called through this module and clear it themselves (``MUTATORS``)."""
        self._captured.clear()
        self._batched.clear()
        self.reset()

    @property
    def schedule(self) -> Schedule:
        return self.policy.schedule

    # -- calls ---------------------------------------------------------------------------------

    def parts_for(self, call: FlatCall) -> tuple[Captured, Parts]:
        """Captured graph and parts for this call's signature, captured (and, with
        ``compile=``, wrapped by ``torch.compile``) on first use."""
        if call.key not in self._captured:
            captured, parts = self.split_call(call)
            self._captured[call.key] = captured, compile_parts(parts, self.compile_options)
        return self._captured[call.key]

    def split_call(self, call: FlatCall) -> tuple[Captured, Parts]:
        """Capture the UNet for ``call`` and cut it with the policy's cut (uncached, eager)."""
        captured = capture(self.unet, call)
        return captured, split(captured, self.policy.cut(captured, self.layout))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        call = flatten_call(self.unet.forward, args, kwargs)
        gen = self._on_plan(call.timestep)
        if gen is None:
            return self.unet(*args, **kwargs)
        captured, parts = self.parts_for(call)  # may raise: then the step is not consumed
        step, gen.step = gen.step, gen.step + 1
        if gen.plan.is_key[step]:
            out = self._key_step(gen, step, call, parts)
        elif gen.frontier is None or gen.frontier_key != call.key:
            gen.off_plan, gen.frontier, gen.chunk = True, None, None
            self._warn(f"UNet call {step} has other inputs than its key step")
            return self.unet(*args, **kwargs)
        else:
            out = self._reuse_step(gen, step, call, parts)
        return pytree.tree_unflatten(list(out), captured.out_spec)

    def _key_step(self, gen: Generation, step: int, call: FlatCall, parts: Parts) -> tuple:
        """Compute the frontier, and the output of this step (of its chunk in parallel mode)."""
        gen.frontier_key, gen.chunk = call.key, None
        steps = self._chunk(gen, step, call)
        if steps is None or len(steps) == 1:
            with record_function("fxprop.full"):
                out = parts.full(*call.tensors)
            gen.frontier = out[parts.num_outputs:]
            return out[: parts.num_outputs]
        with record_function("fxprop.key"):
            gen.frontier = parts.key(*[call.tensors[i] for i in parts.key_inputs])
        return self._run_chunk(gen, steps, call, parts)

    def _reuse_step(self, gen: Generation, step: int, call: FlatCall, parts: Parts) -> tuple:
        """The output of a non-key step from the cached frontier."""
        if gen.chunk is not None and step in gen.chunk.steps and gen.chunk.inputs.same_as(call):
            return gen.chunk.take(step)
        steps = self._chunk(gen, step, call)
        if steps is not None and len(steps) > 1:
            return self._run_chunk(gen, steps, call, parts)
        # Sequential mode, a chunk of one step, or inputs changed since the chunk was computed
        # (e.g. a callback replaced the prompt embeddings): this step alone, still exact.
        with record_function("fxprop.step"):
            return parts.step(*[call.tensors[i] for i in parts.step_inputs], *gen.frontier)

    # -- parallel mode -------------------------------------------------------------------------

    def _chunk(self, gen: Generation, step: int, call: FlatCall) -> range | None:
        """In parallel mode, the steps computed in one call from ``step`` if a chunk starts
        there; else None."""
        if not getattr(self.policy, "parallel", False):
            return None
        segment = gen.plan.segment_of(step)
        per_call = steps_per_call(getattr(self.policy, "max_batch", None), _batch(call), segment)
        return chunk_at(segment, step, per_call)

    def _run_chunk(self, gen: Generation, steps: range, call: FlatCall, parts: Parts) -> tuple:
        """Run the every-step part once for ``steps`` and keep the outputs; return the first."""
        batch, times, t_index = _batch(call), len(steps), self._timestep_index(call)
        if gen.timesteps is None:  # one host-to-device copy per generation
            like = call.tensors[t_index]
            gen.timesteps = torch.tensor(gen.plan.timesteps, dtype=torch.float64).to(
                like.dtype).to(like.device)
        timesteps = timestep_vector(gen.timesteps, steps, batch)
        batched = self._batched_parts(call, parts, times, timesteps)
        with record_function(f"fxprop.step[x{times}]"):  # with the repeats: all a chunk costs
            inputs = batched_inputs(call, batched.step_inputs, batch, times, t_index, timesteps)
            frontier = [repeat_batch(f, times) for f in gen.frontier]
            outputs = batched.step(*inputs, *frontier)
            del inputs, frontier
        every_step = [i for i in parts.step_inputs if i != t_index]
        gen.chunk = Chunk(steps, tuple(outputs), batch, Inputs.of(call, every_step))
        return gen.chunk.take(steps.start)

    def _batched_parts(self, call: FlatCall, parts: Parts, times: int,
                       timesteps: torch.Tensor) -> Parts:
        """Parts of the UNet captured at ``times`` x this call's batch (cached by CallKey)."""
        if (call.key, times) not in self._batched:
            repeated = repeated_call(self.unet.forward, call, times, self._timestep_index(call),
                                     timesteps)
            batched = self.parts_for(repeated)[1]
            check_batched(parts, batched, 0, times)
            self._batched[call.key, times] = batched
        return self._batched[call.key, times]

    def _timestep_index(self, call: FlatCall) -> int:
        """Index of the timestep among the call's tensor leaves (the forward's 2nd argument)."""
        return call.names.index(self._timestep_name)


#: UNet methods that change what a captured graph computes: called through the runtime, they
#: drop its captures (the next call captures the changed UNet).
MUTATORS = frozenset({
    "load_lora_adapter", "load_attn_procs", "set_adapters", "set_adapter", "enable_adapters",
    "disable_adapters", "delete_adapters", "fuse_lora", "unfuse_lora", "unload_lora",
    "set_attn_processor", "set_default_attn_processor", "fuse_qkv_projections",
    "unfuse_qkv_projections", "enable_freeu", "disable_freeu",
})


def _clearing(method: Any, runtime: "AcceleratedUNet") -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        finally:
            runtime.clear_cache()
    return call


def _batch(call: FlatCall) -> int:
    return call.tensors[0].shape[0]
