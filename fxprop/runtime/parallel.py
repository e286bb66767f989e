"""Parallel mode of encoder propagation: the decoder passes of a segment in one batched call.

At a non-key step the every-step part reads the frontier cached at the key step, the timestep
and the conditioning, never the latent (Faster Diffusion, Sec. 3.2, "parallel"). So the passes
of ``L`` consecutive steps of a segment are one call at batch ``L * B``: every batched input
(a tensor leaf with ``shape[0] == B``, or ``B * frames`` for video) repeated ``L`` times, step-major, and the timestep leaf
replaced by the steps' timesteps, each repeated ``B`` times. Sample ``j * B + b`` of the call
is sample ``b`` of step ``j``.

Shapes stay static: the runtime captures the UNet once more at batch ``L * B`` for every
distinct chunk length ``L > 1``. A segment is cut into chunks of ``max(1, max_batch // B)``
steps (the whole segment without ``max_batch``), so the number of extra graphs per call
signature is at most the number of distinct chunk lengths: the distinct segment lengths, or
with ``max_batch`` at most two per segment length (full chunks and the remainder).

Everything here reads host metadata only (shapes, data pointers, version counters), so the
hot loop makes no device sync, except under ``torch.inference_mode()`` (see :class:`Inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection

import torch
import torch.utils._pytree as pytree

from ..graph.capture import TENSOR, FlatCall, flatten_call
from ..graph.nodes import placeholders
from ..graph.split import Parts
from ..plan.plans import Segment
from .generation import Generation

__all__ = ["steps_per_call", "chunk_at", "repeat_batch", "timestep_vector", "repeated_call",
           "batched_inputs", "check_batched", "batch_sizes", "map_batched",
           "Inputs", "Chunk", "BatchedGeneration"]


def steps_per_call(max_batch: int | None, batch: int, segment: Segment, ranks: int = 1) -> int:
    """How many steps of ``segment`` one batched call computes (at least 1), or with ``ranks``
    processes sharing it (:mod:`fxprop.runtime.distributed`), one call on each of them."""
    if max_batch is None:
        return len(segment)
    return max(1, min(len(segment), ranks * max(1, max_batch // batch)))


def chunk_at(segment: Segment, step: int, per_call: int) -> range | None:
    """The steps computed together from ``step``, or None if no chunk starts at ``step``."""
    if (step - segment.start) % per_call:
        return None
    return range(step, min(segment.stop, step + per_call))


def repeat_batch(x: torch.Tensor, times: int) -> torch.Tensor:
    """``x`` repeated ``times`` times along the batch, step-major: ``cat([x] * times)``."""
    return x.repeat(times, *([1] * (x.ndim - 1)))


def timestep_vector(table: torch.Tensor, steps: range, batch: int) -> torch.Tensor:
    """The per-sample timesteps of ``steps``: each step's entry of ``table``, ``batch`` times."""
    return table[steps.start:steps.stop, None].expand(len(steps), batch).reshape(-1)


def batch_sizes(call: FlatCall) -> set[int]:
    """First dims of leaves that hold per-sample data: the batch ``B``, and for video samples
    (5-D, frames at dim 1 or 2) ``B * frames`` (AnimateDiff passes per-frame text embeddings)."""
    sample = call.tensors[0]
    batch = sample.shape[0]
    if sample.ndim != 5:
        return {batch}
    return {batch, batch * sample.shape[1], batch * sample.shape[2]}


def _batched(x: torch.Tensor, sizes: set[int]) -> bool:
    return x.ndim > 0 and x.shape[0] in sizes


def map_batched(forward: Callable, call: FlatCall,
                fn: Callable[[torch.Tensor], torch.Tensor]) -> FlatCall:
    """``call`` with ``fn`` applied to every per-sample leaf (first dim the batch, or batch x
    frames for video), flattened anew so its key is the one a real call with them has."""
    sizes, tensors = batch_sizes(call), iter(call.tensors)
    leaves = []
    for leaf in call.template:
        if leaf is TENSOR:
            x = next(tensors)
            leaf = fn(x) if _batched(x, sizes) else x
        leaves.append(leaf)
    return flatten_call(forward, (), pytree.tree_unflatten(leaves, call.spec))


def repeated_call(forward: Callable, call: FlatCall, times: int, timestep_index: int,
                  timesteps: torch.Tensor, unread: Collection[int] = ()) -> FlatCall:
    """``call`` with every batched leaf repeated ``times`` times and the timestep vector;
    leaves ``unread`` (which no part of its graph reads) are left as they are, so a call that
    carries one (ComfyUI's sigma) may share a capture with a call of the larger batch.

    Built through :func:`flatten_call`, so its key is the one a real call at that batch has.
    """
    batch = call.tensors[0].shape[0]
    read = [i for i in range(len(call.tensors)) if i not in unread]
    repeated = dict(zip(read, batched_inputs(call, read, batch, times, timestep_index,
                                             timesteps)))
    tensors = iter(repeated.get(i, x) for i, x in enumerate(call.tensors))
    leaves = [next(tensors) if leaf is TENSOR else leaf for leaf in call.template]
    return flatten_call(forward, (), pytree.tree_unflatten(leaves, call.spec))


def batched_inputs(call: FlatCall, indices: Any, batch: int, times: int,
                   timestep_index: int, timesteps: torch.Tensor) -> list[torch.Tensor]:
    """The tensor leaves ``indices`` of ``call`` as the batched call reads them."""
    out, sizes = [], batch_sizes(call)
    for i in indices:
        x = call.tensors[i]
        if i == timestep_index:
            out.append(timesteps)
        elif _batched(x, sizes):
            out.append(repeat_batch(x, times))
        else:
            out.append(x)
    return out


def _frontier_shapes(parts: Parts) -> list[tuple[int, ...] | None]:
    """Shapes of the frontier inputs of ``parts.step`` from the capture's metadata."""
    inputs = placeholders(parts.step.graph)
    vals = [n.meta.get("val") for n in inputs[len(parts.step_inputs):]]
    return [tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in vals]


def check_batched(parts: Parts, batched: Parts, latent_index: int, times: int) -> None:
    """Raise unless ``batched`` (captured at ``times`` x the batch) can take ``parts``' frontier
    repeated ``times`` times, and its every-step part does not read the latent."""
    if latent_index in batched.step_inputs:
        raise ValueError("parallel mode needs an every-step part that does not read the latent "
                         f"(input {latent_index}); its inputs are {batched.step_inputs}: pass "
                         "parallel=False")
    ours, theirs = _frontier_shapes(parts), _frontier_shapes(batched)
    expected = [None if s is None else (s[0] * times, *s[1:]) for s in ours]
    if expected != theirs:
        raise ValueError(f"parallel mode: the UNet captured at {times}x the batch has the "
                         f"frontier {theirs}, expected {expected}; pass parallel=False")


def _version(x: torch.Tensor) -> int | None:
    """The in-place version counter (inference tensors have none)."""
    return None if x.is_inference() else x._version


@dataclass
class Inputs:
    """The every-step inputs a chunk was computed from, to tell whether a later call has them.

    Holding the tensors keeps their memory alive, so an equal data pointer, stride and version
    means the same values: a pipeline may pass the same tensor or a fresh view of it. Inference
    tensors (``torch.inference_mode()``) have no version counter: for them a copy is kept and
    compared by value (one device sync per reused step), so in-place edits are still seen.
    """

    indices: tuple[int, ...]
    tensors: tuple[torch.Tensor, ...]
    versions: tuple[int | None, ...]
    copies: tuple[torch.Tensor | None, ...]

    @classmethod
    def of(cls, call: FlatCall, indices: Any, by_value: bool = False) -> "Inputs":
        """``by_value``: compare every input by value (a loop that builds its conditioning
        anew at every call, as ComfyUI's does)."""
        tensors = tuple(call.tensors[i] for i in indices)
        return cls(tuple(indices), tensors, tuple(_version(x) for x in tensors),
                   tuple(x.clone() if by_value or x.is_inference() else None for x in tensors))

    def same_as(self, call: FlatCall) -> bool:
        for i, ref, version, copy in zip(self.indices, self.tensors, self.versions, self.copies):
            x = call.tensors[i]
            if copy is not None:
                if x.shape != copy.shape or not torch.equal(x, copy):
                    return False
            elif (x.data_ptr() != ref.data_ptr() or x.stride() != ref.stride()
                    or _version(x) != version):
                return False
        return True


@dataclass
class Chunk:
    """Predictions of the steps ``steps``, computed in one call from ``inputs``."""

    steps: range
    outputs: tuple[torch.Tensor, ...]   # each of batch ``len(steps) * batch``, step-major
    batch: int
    inputs: Inputs

    def take(self, step: int) -> tuple[torch.Tensor, ...]:
        """The outputs of ``step`` (views of the batched outputs)."""
        j = step - self.steps.start
        return tuple(o[j * self.batch:(j + 1) * self.batch] for o in self.outputs)


@dataclass
class BatchedGeneration(Generation):
    """A generation in parallel mode: also the outputs of its current chunk of steps."""

    chunk: Chunk | None = None
    agreed: bool = False   # the ranks of a process group checked that they run the same plan
    timesteps: torch.Tensor | None = None  # the plan's, on the calls' device and dtype

    def timesteps_like(self, like: torch.Tensor) -> torch.Tensor:
        """The plan's timesteps as a tensor like ``like`` (one host-to-device copy)."""
        if self.timesteps is None:
            self.timesteps = torch.tensor(self.plan.timesteps, dtype=torch.float64).to(
                like.dtype).to(like.device)
        return self.timesteps

    def release(self) -> None:
        super().release()
        self.chunk = None
