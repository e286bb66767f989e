"""The runtime: follows a plan across the UNet calls of a generation.

:class:`AcceleratedUNet` holds a UNet and a policy. It intercepts the UNet's own forward
(:mod:`fxprop.runtime.intercept`), so the UNet stays the user's module, and runs there, whenever one
of its scopes is active (its own call, or a pipeline call), the step function of
:class:`~fxprop.runtime.follow.PlanFollower`: the full graph at a key step (output and frontier),
else the every-step part on the cached or forecast frontier. Graphs come from the UNet's capture
cache, keyed by the state they are taken in (:meth:`~fxprop.graph.cache.CaptureCache.state`: the
UNet's fingerprint and the grad and autocast modes, read at every call) and the call signature.
A state that changes within a generation (a callback toggling FreeU or an IP-Adapter scale) is
seen at the next key step; at a non-key step the frontier was computed in the old state, so
the generation leaves its plan and runs the whole UNet, with one warning. Captures trace a
twin of the UNet's module tree (:mod:`fxprop.graph.twin`) and refuse processors with Python side
effects (:mod:`fxprop.graph.purity`). Cross-step state belongs to the generation,
which belongs to its scope: the last key frontiers (:mod:`fxprop.plan.forecast`) and, in parallel
mode, the outputs of the current chunk of steps (:mod:`fxprop.runtime.parallel`). Any call that does
not match the plan runs the original forward, which is always correct, and warns once.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Hashable, Iterator

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.profiler import record_function

from ..graph.capture import Captured, FlatCall, capture, flatten_call
from ..graph.fingerprint import portable_digests
from ..graph.purity import SideEffects, check_no_side_effects, isolate_processors
from ..graph.regions import resolve_layout
from ..graph.split import Parts, split
from ..graph.twin import twin
from ..plan.plans import Plan
from ..plan.policies import Policy
from .compile import CompileOptions, compile_options, compile_parts
from .distributed import (Ranks, agree, gather, inputs_digest, local_call, own_steps, plan_digest,
                          ranks_of)
from .follow import FollowState, PlanFollower, Scope, TimestepSource, scoped
from .generation import Generation
from .gridparallel import GridSegments
from .intercept import NOT_PLANNED, check_hooks, intercept, intercepted, release
from .parallel import (BatchedGeneration, Chunk, Inputs, batched_inputs, check_batched, chunk_at,
                       repeated_call, steps_per_call, timestep_vector)

__all__ = ["AcceleratedUNet", "TimestepSource", "plain_unet"]


class AcceleratedUNet(GridSegments, PlanFollower):
    """A UNet that reuses features across steps by a plan; called like the UNet itself.

    The UNet is intercepted in place (see the module docstring); this module is its entry for
    hand-written loops (``set_timesteps``, then one call per step) and the runtime that
    accelerated pipelines activate around each call.
    """

    def __init__(self, unet: nn.Module, policy: Policy,
                 timestep_source: TimestepSource | None = None,
                 compile: bool | dict | CompileOptions | None = None) -> None:
        super().__init__(timestep_source)
        self.unet = plain_unet(unet)
        self.policy = policy
        self.compile_options = compile_options(compile)
        self.layout = resolve_layout(self.unet, policy.regions)
        policy.validate(self.unet)
        # a bad process group raises here, before the UNet is intercepted
        self._ranks = (policy, ranks_of(policy.group, policy.cfg_parallel))
        self._intercept = intercept(self.unet, self)
        self._timestep_name = _timestep_name(self._intercept.original_forward)

    def __getattr__(self, name: str) -> Any:
        # Reads of the UNet's attributes (``config``, ``dtype`` ...) through the runtime.
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules") or {}
            if "unet" not in modules:
                raise
            return getattr(modules["unet"], name)

    @property
    def ranks(self) -> Ranks | None:
        """This process's place in the policy's process group (None: one process)."""
        if self._ranks[0] is not self.policy:
            self._ranks = (self.policy, ranks_of(self.policy.group, self.policy.cfg_parallel))
        return self._ranks[1]

    def with_policy(self, policy: Policy) -> "AcceleratedUNet":
        """A runtime of the same UNet with ``policy`` (it shares the UNet's captured graphs)."""
        return AcceleratedUNet(self.unet, policy, self.timestep_source, self.compile_options)

    @property
    def captures(self) -> int:
        """How many captured graphs the UNet's cache holds (of every runtime of the UNet, and
        batched ones of parallel mode)."""
        return len(self._intercept.captures)

    def clear_captures(self) -> None:
        """Drop every captured graph of the UNet (never needed for correctness: a changed UNet
        is captured anew; this frees their memory)."""
        self._intercept.captures.clear()

    def release(self) -> None:
        """This runtime no longer runs the UNet (what :func:`fxprop.restore` does); the UNet
        is no longer intercepted once no runtime of it is left."""
        release(self.unet, self)

    @contextlib.contextmanager
    def scope(self, state: FollowState | None = None) -> Iterator[Scope]:
        """Make this runtime follow ``state`` (default: this thread's) for calls of its UNet
        inside the block; pipelines open one per call with a fresh state."""
        if intercepted(self.unet) is not self._intercept or self not in self._intercept.users:
            raise RuntimeError(f"this runtime of {type(self.unet).__name__} was released "
                               "(fxprop.restore): accelerate the UNet again")
        with scoped(Scope(self, state or self.follow_state())) as active:
            yield active

    # -- calls ---------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.scope():
            return self.unet(*args, **kwargs)  # its hooks run; the interception calls planned

    def planned(self, args: tuple, kwargs: dict) -> Any:
        """The UNet's output by the plan, or ``NOT_PLANNED`` (the caller runs the original)."""
        call = flatten_call(self._intercept.original_forward, args, kwargs)
        if torch.is_grad_enabled() and any(x.requires_grad for x in call.tensors):
            # a call differentiated by its caller (Attend-and-Excite's latent updates): its
            # Python (processors storing attention maps) must run; not a step of the plan
            return NOT_PLANNED
        gen = self._on_plan(call.timestep)
        if gen is None or not self._same_state(gen, self.model_state(call)):
            return NOT_PLANNED
        call = self._local(gen, call)
        try:
            captured, parts = self.parts_for(call, gen.model_state)  # may raise: not consumed
        except SideEffects as err:  # the whole UNet runs its Python at every step
            gen.leave_plan()
            self._warn(str(err))
            return NOT_PLANNED
        out = self.run_planned(gen, call, parts)
        if out is None:
            return NOT_PLANNED
        return pytree.tree_unflatten(list(out), captured.out_spec)

    def model_state(self, call: FlatCall) -> Hashable:
        """The state a graph captured now for ``call`` is valid for (UNet and trace modes)."""
        return self._intercept.captures.state(self.unet, call.tensors[0])

    def _same_state(self, gen: Generation, state: Hashable) -> bool:
        """Take ``state`` for the coming step; False (and leave the plan) at a non-key step
        whose frontier was computed in another state: only the whole UNet is exact there."""
        if gen.model_state in (None, state) or gen.plan.is_key[gen.step]:
            gen.model_state = state
            return True
        gen.leave_plan()
        self._warn(f"the UNet or the grad/autocast mode changed at step {gen.step}, after the "
                   "key step whose features it would reuse (e.g. a callback toggled FreeU or "
                   "an IP-Adapter scale; such changes are seen from the next key step)")
        return False

    def parts_for(self, call: FlatCall, state: Hashable = None) -> tuple[Captured, Parts]:
        """Captured graph and parts for this call's signature and ``state`` (default: now),
        captured (and, with ``compile=``, wrapped by ``torch.compile``) on first use; cached
        in the UNet's capture cache."""
        state = self.model_state(call) if state is None else state
        entry = self._intercept.captures.entry(state, call.key, lambda: self._capture(call),
                                               self.unet)
        parts = entry.get(("parts", self.policy.cut_id, self.layout, repr(self.compile_options)),
                          lambda: compile_parts(self._split(entry.captured),
                                                self.compile_options))
        return entry.captured, parts

    def split_call(self, call: FlatCall) -> tuple[Captured, Parts]:
        """Capture the UNet for ``call`` and cut it with the policy's cut (uncached, eager)."""
        captured = self._capture(call)
        return captured, self._split(captured)

    def _capture(self, call: FlatCall) -> Captured:
        """Capture the UNet for ``call``, traced on a twin of its module tree whose processors
        of unknown purity are copies, refusing Python side effects (:mod:`fxprop.graph.purity`)."""
        check_hooks(self.unet)  # hooks added since accelerate() would be skipped: refuse
        tree = isolate_processors(twin(self.unet))
        before = (portable_digests(self.unet), portable_digests(tree))
        captured = capture(self.unet, call, self._intercept.original_forward, tree)
        check_no_side_effects(self.unet, tree, before)  # e.g. an attention store: refuse
        return captured

    def _split(self, captured: Captured) -> Parts:
        return split(captured, self.policy.cut(captured, self.layout))

    # -- parallel mode: the step function's key and reuse steps, batched -------------------------

    def _local(self, gen: Generation, call: FlatCall) -> FlatCall:
        """The part of ``call`` this process computes (its half of the batch with
        cfg_parallel); at a generation's first call, check that all ranks agree on it."""
        if self.ranks is None:
            return call
        if not gen.agreed:
            device = call.tensors[0].device
            agree(self.ranks, plan_digest(gen.plan, call, repr(self.policy), self.unet), device)
            agree(self.ranks, inputs_digest(call), device)  # the same fields: shapes agree
            gen.agreed = True
        return local_call(self._intercept.original_forward, call, self.ranks)

    def _whole(self, outputs: tuple, step: int, call: FlatCall) -> tuple:
        """The whole batch of one step computed on each rank's half (cfg_parallel)."""
        if self.ranks is None or self.ranks.halves == 1:
            return outputs
        return gather(self.ranks, outputs, range(step, step + 1), _batch(call))

    def _start(self, generation: Generation | None) -> None:
        super()._start(generation)
        if generation is not None:
            self._intercept.captures.begin_run()  # its graphs are kept while it runs

    def _new_generation(self, plan: Plan, source: Any, begin: int) -> Generation:
        if self.policy.batches:
            return BatchedGeneration(plan, source, begin)
        return super()._new_generation(plan, source, begin)

    def _key_step(self, gen: Generation, step: int, call: FlatCall, parts: Parts) -> tuple:
        """Compute the frontier, and the output of this step (of its chunk in parallel mode)."""
        steps = self._chunk(gen, step, call)
        if steps is None or len(steps) == 1:
            with record_function("fxprop.full"):
                return self._whole(super()._key_step(gen, step, call, parts), step, call)
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
            return self._whole(super()._reuse_step(gen, step, call, parts), step, call)

    def _chunk(self, gen: Generation, step: int, call: FlatCall) -> range | None:
        """In parallel mode, the steps computed in one call from ``step`` if a chunk starts
        there; else None."""
        if not isinstance(gen, BatchedGeneration):
            return None  # sequential mode, or a grid's (gridparallel.GridSegments batches it)
        segment = gen.plan.segment_of(step)
        ranks = 1 if self.ranks is None else self.ranks.shares
        per_call = steps_per_call(self.policy.max_batch, _batch(call), segment, ranks)
        return chunk_at(segment, step, per_call)

    def _run_chunk(self, gen: BatchedGeneration, steps: range, call: FlatCall,
                   parts: Parts) -> tuple:
        """Run the every-step part once for ``steps`` (this rank's share of them, with a
        group) and keep the outputs; return the first."""
        batch, t_index = _batch(call), self._timestep_index(call)
        own = steps if self.ranks is None else own_steps(steps, self.ranks)
        timesteps = timestep_vector(gen.timesteps_like(call.tensors[t_index]), own, batch)
        batched = self._batched_parts(gen, call, parts, len(own), timesteps)
        with record_function(f"fxprop.step[x{len(own)}]"):  # with the repeats: all it costs
            inputs = batched_inputs(call, batched.step_inputs, batch, len(own), t_index,
                                    timesteps)
            frontier = gen.frontiers.batched(own, [gen.plan.weights[s] for s in own])
            outputs = tuple(batched.step(*inputs, *frontier))
            del inputs, frontier
        if self.ranks is not None:
            with record_function("fxprop.all_gather"):
                outputs = gather(self.ranks, outputs, steps, batch)
            batch *= self.ranks.halves
        every_step = [i for i in parts.step_inputs if i != t_index]
        gen.chunk = Chunk(steps, outputs, batch, Inputs.of(call, every_step))
        return gen.chunk.take(steps.start)

    def _batched_parts(self, gen: Generation, call: FlatCall, parts: Parts, times: int,
                       timesteps: torch.Tensor) -> Parts:
        """Parts of the UNet captured at ``times`` x this call's batch (cached with the
        captured graph of ``call``)."""
        entry = self._intercept.captures.entry(gen.model_state, call.key,
                                               lambda: self._capture(call), self.unet)

        def make() -> Parts:
            repeated = repeated_call(self._intercept.original_forward, call, times,
                                     self._timestep_index(call), timesteps)
            batched = self.parts_for(repeated, gen.model_state)[1]
            check_batched(parts, batched, 0, times)
            return batched

        return entry.get(("batched", self.policy.cut_id, self.layout,
                          repr(self.compile_options), times), make)

    def _batched_grid_parts(self, gen: Generation, call: FlatCall, parts: Parts, times: int,
                            timesteps: torch.Tensor) -> Parts:
        return self._batched_parts(gen, call, parts, times, timesteps)

    def _varying(self, call: FlatCall) -> set[int]:
        """The call's tensors that change every step: the latent (leaf 0)."""
        return {0}

    def _timestep_index(self, call: FlatCall) -> int:
        """Index of the timestep among the call's tensor leaves (the forward's 2nd argument)."""
        return call.names.index(self._timestep_name)


def plain_unet(unet: nn.Module) -> nn.Module:
    """``unet`` itself, or a clear error for wrappers fxprop cannot cut."""
    if isinstance(unet, AcceleratedUNet):
        return unet.unet
    if isinstance(unet, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError(f"the UNet is a torch.compile'd module ({type(unet).__name__} of "
                         f"{type(unet._orig_mod).__name__}), which fxprop cannot cut: pass the "
                         "module it wraps (unet._orig_mod) and compile=True, and fxprop "
                         "compiles the parts it runs")
    return unet


def _timestep_name(forward: Any) -> str:
    """The name of the UNet forward's second parameter, the timestep."""
    names = list(inspect.signature(forward).parameters)
    if len(names) < 2:
        raise TypeError(f"fxprop accelerates UNets called as forward(sample, timestep, ...); "
                        f"{getattr(forward, '__qualname__', forward)} takes {names}")
    return names[1]


def _batch(call: FlatCall) -> int:
    return call.tensors[0].shape[0]
