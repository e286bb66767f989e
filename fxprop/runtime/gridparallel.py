"""Parallel mode on a sigma grid: a segment's decoder passes in one call, for samplers whose
calls are placed on the grid by value (k-diffusion, ComfyUI; :mod:`fxprop.runtime.grid`).

A non-key step's every-step part is a function of its inputs only: the frontier of its step
(fixed once the segment's key step ran), the call's timestep, and the other call inputs the
part reads (the conditioning). So when a segment's first non-key call arrives, the part runs
once for the remaining steps of the segment, batched at their grid timesteps, and later calls
take their output from that batch when their timestep and every-step inputs are the ones it
was computed at. What decides it is what the captured part reads, not the sampler:

* a part that reads an input which changes every step (the latent, the call's sigma, inputs
  computed from the latent such as ControlNet residuals: the client names them) cannot be
  batched; the generation runs sequential encoder propagation, with one log line;
* a call whose timestep is not its step's grid timestep (a DPM2 or DPM++ SDE midpoint) or whose
  other inputs differ runs the every-step part alone on its step's frontier, exactly as
  sequential mode (one log line per generation). Heun's second call lands on the next grid
  point and reads nothing else, so it takes its output from the batch.

Key steps run the whole UNet as in sequential mode (a sampler may call one more than once; the
latest frontier is kept), and a key call drops its signature's batch. Timesteps of future steps
are made as the loop makes them (``timestep_of``: ``model_wrap.sigma_to_t`` for k-diffusion,
``model_sampling.timestep`` in ComfyUI) from a per-call sigma vector, and compared exactly, so a
batch never serves a call it was not computed for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..plan.plans import Segment
from .grid import GridGeneration, host_floats
from .parallel import Inputs, batched_inputs, steps_per_call

__all__ = ["TimestepOf", "GridChunk", "ParallelGridGeneration", "GridSegments"]

LOG = logging.getLogger("fxprop")

#: sigmas (a vector, one per sample) -> the timesteps the UNet receives at them
TimestepOf = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class GridChunk:
    """Outputs of ``steps`` of one call signature, computed in one call at ``timesteps``
    (``len(steps) * batch`` of them, step-major) from ``inputs``."""

    steps: range
    outputs: tuple[torch.Tensor, ...]
    batch: int
    timesteps: torch.Tensor
    inputs: Inputs

    def _rows(self, step: int) -> slice:
        j = step - self.steps.start
        return slice(j * self.batch, (j + 1) * self.batch)

    def serves(self, step: int, call: Any, t_index: int) -> bool:
        """Whether ``call`` at ``step`` has the timestep and inputs this chunk was computed at."""
        if step not in self.steps:
            return False
        t, ours = call.tensors[t_index], self.timesteps[self._rows(step)]
        return t.shape == ours.shape and torch.equal(t, ours) and self.inputs.same_as(call)

    def take(self, step: int) -> tuple[torch.Tensor, ...]:
        return tuple(o[self._rows(step)] for o in self.outputs)


@dataclass
class ParallelGridGeneration(GridGeneration):
    """A grid generation in parallel mode: also each signature's current chunk."""

    timestep_of: TimestepOf | None = None
    sigmas: tuple = ()                  # the grid's sigma of every step (host floats)
    sigma_dtype: torch.dtype = torch.float32
    chunks: dict = field(default_factory=dict, repr=False)   # call key -> GridChunk
    told: set = field(default_factory=set, repr=False)       # notes logged in this generation

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.timestep_of is None:
            raise ValueError("parallel mode on a sigma grid needs timestep_of (how the UNet's "
                             "timestep is made from a sigma)")
        self.sigmas = tuple(host_floats(self.source)[:len(self.plan)])
        if isinstance(self.source, torch.Tensor) and self.source.is_floating_point():
            self.sigma_dtype = self.source.dtype

    def timesteps(self, steps: range, like: torch.Tensor) -> torch.Tensor:
        """The timesteps a call of ``like``'s batch receives at ``steps``, step-major."""
        batch = like.shape[0]
        with torch.no_grad():
            per_step = [self.timestep_of(torch.full((batch,), self.sigmas[s],
                                                    dtype=self.sigma_dtype, device=like.device))
                        for s in steps]
        return torch.cat([t.reshape(-1).expand(batch) for t in per_step]).to(like)

    def note(self, reason: str) -> None:
        """Log ``reason`` once in this generation (still accelerated, not batched there)."""
        if reason not in self.told:
            self.told.add(reason)
            LOG.info("fxprop: %s", reason)

    def release(self) -> None:
        self.chunks.clear()
        super().release()


class GridSegments:
    """The step function's key and reuse steps for :class:`ParallelGridGeneration` (a mixin
    before :class:`fxprop.runtime.follow.PlanFollower`). A subclass gives
    ``_timestep_index(call)``, ``_varying(call)`` (indices of the call's tensors that change
    every step) and ``_batched_grid_parts(gen, call, parts, times, timesteps)`` (parts captured
    at ``times`` x the call's batch)."""

    policy: Any

    def _key_step(self, gen: Any, step: int, call: Any, parts: Any) -> tuple:
        if isinstance(gen, ParallelGridGeneration):
            gen.chunks.pop(call.key, None)  # a new frontier: its signature's batch is stale
        return super()._key_step(gen, step, call, parts)  # type: ignore[misc]

    def _reuse_step(self, gen: Any, step: int, call: Any, parts: Any) -> tuple:
        if not isinstance(gen, ParallelGridGeneration):
            return super()._reuse_step(gen, step, call, parts)  # type: ignore[misc]
        t_index = self._timestep_index(call)
        chunk = gen.chunks.get(call.key)
        if chunk is None or step not in chunk.steps:
            chunk = self._grid_chunk(gen, step, call, parts, t_index)
        if chunk is not None:
            if chunk.serves(step, call, t_index):
                return chunk.take(step)
            gen.note("a call between grid points (a midpoint sampler's) or with other inputs "
                     "than its segment's ran its decoder alone (sequential encoder "
                     "propagation for that call)")
        return super()._reuse_step(gen, step, call, parts)  # type: ignore[misc]

    def _grid_chunk(self, gen: ParallelGridGeneration, step: int, call: Any, parts: Any,
                    t_index: int) -> GridChunk | None:
        """Run the every-step part once for the rest of ``step``'s segment (up to
        ``max_batch``) and keep it as the signature's chunk; None where it cannot be batched
        (a single step, a call off its grid point, a part that reads a per-step input)."""
        varying = sorted(self._varying(call) & set(parts.step_inputs))
        if varying:
            names = getattr(call, "flat", call).names
            gen.note(f"parallel mode runs sequentially here: the decoder reads "
                     f"{[names[i] for i in varying]}, which change every step")
            return None
        batch, rest = call.tensors[0].shape[0], Segment(step, gen.plan.segment_of(step).stop)
        steps = range(step, step + steps_per_call(self.policy.max_batch, batch, rest))
        if len(steps) < 2:
            return None
        timesteps = gen.timesteps(steps, call.tensors[t_index])
        if not torch.equal(call.tensors[t_index], timesteps[:batch]):
            return None  # a call off its grid point: the step's on-grid call batches
        batched = self._batched_grid_parts(gen, call, parts, len(steps), timesteps)
        inputs = batched_inputs(call, batched.step_inputs, batch, len(steps), t_index,
                                timesteps)
        frontier = gen.frontiers.batched(steps, [gen.plan.weights[s] for s in steps])
        outputs = tuple(batched.step(*inputs, *frontier))
        every_step = [i for i in parts.step_inputs if i != t_index]
        gen.chunks[call.key] = GridChunk(steps, outputs, batch, timesteps,
                                         Inputs.of(call, every_step, by_value=True))
        return gen.chunks[call.key]

    def _timestep_index(self, call: Any) -> int:
        raise NotImplementedError

    def _varying(self, call: Any) -> set[int]:
        raise NotImplementedError

    def _batched_grid_parts(self, gen: Any, call: Any, parts: Any, times: int,
                            timesteps: torch.Tensor) -> Any:
        raise NotImplementedError
