"""The runtime: a module with the UNet's own call signature that follows a plan.

:class:`AcceleratedUNet` captures the UNet once per input signature, splits it with the
policy's cut, and at every call runs the step function of :class:`~fxprop.follow.PlanFollower`:
the full graph at a key step (output and frontier), else the every-step part on the cached or
forecast frontier. Its cross-step state belongs to the current generation: the last key
frontiers (see :mod:`fxprop.forecast`) and, in parallel mode, the outputs of the current chunk
of steps (see :mod:`fxprop.parallel`). Any call that does not match the plan runs the whole
UNet, which is always correct, and warns once.
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
from .follow import Generation, PlanFollower, TimestepSource
from .parallel import (BatchedGeneration, Chunk, Inputs, batched_inputs, check_batched, chunk_at,
                       repeated_call, steps_per_call, timestep_vector)
from .plan import Plan
from .regions import resolve_layout
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
        self.layout = resolve_layout(unet, policy.regions)
        policy.validate(unet)
        self._captured: dict[CallKey, tuple[Captured, Parts]] = {}
        self._batched: dict[tuple[CallKey, int], Parts] = {}
        self._timestep_name = _timestep_name(unet)

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
        other = AcceleratedUNet(self.unet, policy, self.timestep_source, self.compile_options)
        if policy.cut_id == self.policy.cut_id and other.layout == self.layout:
            other._captured, other._batched = self._captured, self._batched
        return other

    @property
    def captures(self) -> int:
        """How many call signatures have a captured graph (batched ones of parallel mode
        included)."""
        return len(self._captured)

    def clear_captures(self) -> None:
        """Drop every captured graph (and the generation). Needed after changing the UNet in a
        way its graphs baked in (attention processors, FreeU, new LoRA scales); the methods
        that do so are called through this module and clear it themselves (``MUTATORS``)."""
        self._captured.clear()
        self._batched.clear()
        self.reset()

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
        out = self.run_planned(gen, call, parts)
        if out is None:
            return self.unet(*args, **kwargs)
        return pytree.tree_unflatten(list(out), captured.out_spec)

    # -- parallel mode: the step function's key and reuse steps, batched -------------------------

    def _new_generation(self, plan: Plan, source: Any, begin: int) -> Generation:
        if self.policy.batches:
            return BatchedGeneration(plan, source, begin)
        return super()._new_generation(plan, source, begin)

    def _key_step(self, gen: Generation, step: int, call: FlatCall, parts: Parts) -> tuple:
        """Compute the frontier, and the output of this step (of its chunk in parallel mode)."""
        steps = self._chunk(gen, step, call)
        if steps is None or len(steps) == 1:
            with record_function("fxprop.full"):
                return super()._key_step(gen, step, call, parts)
        with record_function("fxprop.key"):
            gen.frontiers.add(step, call.key,
                              parts.key(*[call.tensors[i] for i in parts.key_inputs]))
        return self._run_chunk(gen, steps, call, parts)

    def _reuse_step(self, gen: Generation, step: int, call: FlatCall, parts: Parts) -> tuple:
        """The output of a non-key step from the cached (or forecast) frontier."""
        if isinstance(gen, BatchedGeneration) and gen.chunk is not None:
            if step in gen.chunk.steps and gen.chunk.inputs.same_as(call):
                return gen.chunk.take(step)
        steps = self._chunk(gen, step, call)
        if steps is not None and len(steps) > 1:
            return self._run_chunk(gen, steps, call, parts)
        # Sequential mode, a chunk of one step, or inputs changed since the chunk was computed
        # (e.g. a callback replaced the prompt embeddings): this step alone, still exact.
        with record_function("fxprop.step"):
            return super()._reuse_step(gen, step, call, parts)

    def _chunk(self, gen: Generation, step: int, call: FlatCall) -> range | None:
        """In parallel mode, the steps computed in one call from ``step`` if a chunk starts
        there; else None."""
        if not self.policy.batches:
            return None
        segment = gen.plan.segment_of(step)
        per_call = steps_per_call(self.policy.max_batch, _batch(call), segment)
        return chunk_at(segment, step, per_call)

    def _run_chunk(self, gen: BatchedGeneration, steps: range, call: FlatCall,
                   parts: Parts) -> tuple:
        """Run the every-step part once for ``steps`` and keep the outputs; return the first."""
        batch, times, t_index = _batch(call), len(steps), self._timestep_index(call)
        timesteps = timestep_vector(gen.timesteps_like(call.tensors[t_index]), steps, batch)
        batched = self._batched_parts(call, parts, times, timesteps)
        with record_function(f"fxprop.step[x{times}]"):  # with the repeats: all a chunk costs
            inputs = batched_inputs(call, batched.step_inputs, batch, times, t_index, timesteps)
            frontier = gen.frontiers.batched(steps, [gen.plan.weights[s] for s in steps])
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
            runtime.clear_captures()
    return call


def _timestep_name(unet: nn.Module) -> str:
    """The name of the UNet's second ``forward`` parameter, the timestep."""
    names = list(inspect.signature(unet.forward).parameters)
    if len(names) < 2:
        raise TypeError(f"fxprop accelerates UNets called as forward(sample, timestep, ...); "
                        f"{type(unet).__name__}.forward takes {names}")
    return names[1]


def _batch(call: FlatCall) -> int:
    return call.tensors[0].shape[0]
