"""Parallel mode across processes: a segment's steps, and CFG's two halves, over torch.distributed.

Encoder propagation makes the non-key steps of a segment independent of each other: they read
the key step's frontier, the timestep and the conditioning, never the latent
(:mod:`fxprop.runtime.parallel`). So the ranks of a process group can share a segment exactly: every
rank runs the same pipeline call with the same seed and computes the key part itself (the frontier
is then local; broadcasting it would cost a transfer and save no time, since the other ranks
wait for it anyway), computes a contiguous, balanced share of the segment's steps, and the
predictions are exchanged with ``all_gather``, so every rank applies the scheduler to the same
values. With ``cfg_parallel=True`` the UNet batch is split in two halves (classifier-free
guidance's unconditional and conditional ones) between two ranks: rank ``g`` of the group
computes half ``g % 2`` of share ``g // 2``. UNets compute every sample on its own, so splitting
the batch is exact.

Before a generation's first exchange the ranks compare a digest of their plan, input
signature, first latent and UNet (:func:`~fxprop.graph.fingerprint.portable_fingerprint` and
:func:`~fxprop.graph.fingerprint.weights_digest`) with one small ``all_gather``, then, their input
signatures being equal, the sums of every conditioning input (prompt embeddings, added
conditions, ControlNet residuals) with another; ranks that disagree all raise, naming what.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from torch import nn

from ..graph.capture import FlatCall
from ..graph.fingerprint import portable_fingerprint, weights_digest
from ..plan.policies import check_group
from .parallel import map_batched

__all__ = ["Ranks", "ranks_of", "shares", "own_steps", "local_call", "gather", "agree",
           "plan_digest", "inputs_digest"]


@dataclass(frozen=True)
class Ranks:
    """This process's place in a group that shares parallel mode's work."""

    group: Any       # the torch.distributed process group
    size: int
    rank: int        # in ``group``
    halves: int      # 2 with cfg_parallel (the batch is split in two), else 1

    @property
    def half(self) -> int:
        return self.rank % self.halves

    @property
    def share(self) -> int:
        """Index of this rank's share of a chunk's steps."""
        return self.rank // self.halves

    @property
    def shares(self) -> int:
        return self.size // self.halves



def ranks_of(group: Any, cfg_parallel: bool) -> Ranks | None:
    """This process's :class:`Ranks` in ``group``; None for no group or a group of one (which
    behaves exactly like no group)."""
    check_group(group, cfg_parallel)
    if group is None:
        return None
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not in the group "
                         "passed as group=")
    halves = 2 if cfg_parallel else 1
    if size % halves:
        raise ValueError(f"cfg_parallel=True needs an even group size (two ranks per pair of "
                         f"CFG halves), got {size}")
    return None if size == 1 else Ranks(group, size, rank, halves)


def shares(steps: range, n: int) -> list[range]:
    """``steps`` cut into ``n`` contiguous shares whose lengths differ by at most one (the
    first ones longer; some are empty when there are fewer steps than shares)."""
    size, extra = divmod(len(steps), n)
    out, start = [], steps.start
    for i in range(n):
        stop = start + size + (i < extra)
        out.append(range(start, stop))
        start = stop
    return out


def own_steps(steps: range, ranks: Ranks) -> range:
    """The steps this rank computes: its share, or the last step if its share is empty (it
    has to send a block of the shape of the others; computing a step costs it no time, the
    others compute at least one)."""
    mine = shares(steps, ranks.shares)[ranks.share]
    return mine if len(mine) else range(steps.stop - 1, steps.stop)


def local_call(forward: Callable, call: FlatCall, ranks: Ranks | None) -> FlatCall:
    """``call`` with every per-sample leaf cut to this rank's half of the batch (itself
    without cfg_parallel). Raises ``ValueError`` for an odd batch."""
    if ranks is None or ranks.halves == 1:
        return call
    batch = call.tensors[0].shape[0]
    if batch % 2:
        raise ValueError(f"cfg_parallel=True splits the UNet's batch in two halves, but the "
                         f"batch is {batch}: use it with classifier-free guidance")
    lo, hi = ranks.half * batch // 2, (ranks.half + 1) * batch // 2

    def half(x: torch.Tensor) -> torch.Tensor:
        per = x.shape[0] // batch   # 1, or the frames of a video's per-frame leaves
        return x[lo * per:hi * per]

    return map_batched(forward, call, half)


def gather(ranks: Ranks, outputs: tuple[torch.Tensor, ...], steps: range,
           batch: int) -> tuple[torch.Tensor, ...]:
    """Every step's whole outputs, step-major, from each rank's ``outputs`` of
    :func:`own_steps` on its half (``batch`` samples per step and half)."""
    parts = shares(steps, ranks.shares)
    owners = [(s, k) for s, part in enumerate(parts) for k in range(len(part))]
    rows = max(len(part) for part in parts) * batch
    whole = []
    for out in outputs:
        block = out.contiguous()
        if block.shape[0] < rows:  # a shorter share: pad to the longest, all_gather's rule
            pad = block.new_zeros((rows - block.shape[0], *block.shape[1:]))
            block = torch.cat([block, pad])
        blocks = [torch.empty_like(block) for _ in range(ranks.size)]
        dist.all_gather(blocks, block, group=ranks.group)
        whole.append(torch.cat([blocks[s * ranks.halves + h][k * batch:(k + 1) * batch]
                                for s, k in owners for h in range(ranks.halves)]))
    return tuple(whole)


def plan_digest(plan: Any, call: FlatCall, policy_text: str,
                unet: nn.Module | None = None) -> dict[str, float]:
    """What ranks must agree on before exchanging: the plan, the input signature, the policy,
    the first latent (the seed) and the UNet (its state and weights), as numbers."""
    sample = call.tensors[0].detach().double()
    digest = {"steps": float(len(plan)), "latent size": float(sample.numel()),
              "latent sum": float(sample.sum()), "latent abs sum": float(sample.abs().sum()),
              _HASHED + "key steps": _hash(plan.is_key),
              _HASHED + "timesteps": _hash(plan.timesteps),
              _HASHED + "input shapes": _hash(call.key), _HASHED + "options": _hash(policy_text)}
    if unet is not None:
        digest[_HASHED + "UNet state (processors, adapters, FreeU ...)"] = float(
            portable_fingerprint(unet))
        digest[_HASHED + "UNet weights"] = _hash(weights_digest(unet))
    return digest


def inputs_digest(call: FlatCall) -> dict[str, float]:
    """The sum and absolute sum of every tensor input but the latent, by name (compared once
    the ranks agree on the input signature, so every rank has the same fields)."""
    digest = {}
    for name, x in zip(call.names[1:], call.tensors[1:]):
        x = x.detach().double()
        digest[f"{name} sum"], digest[f"{name} abs sum"] = float(x.sum()), float(x.abs().sum())
    return digest


_HASHED = "#"   # a field compared by a hash: its values mean nothing to a reader


def _hash(value: Any) -> float:
    """A 48-bit hash of ``repr(value)``, exact as a float64."""
    return float(int(hashlib.sha1(repr(value).encode()).hexdigest()[:12], 16))


def _disagreement(name: str, column: torch.Tensor) -> str:
    if name.startswith(_HASHED):
        return f"{name[len(_HASHED):]} (they differ)"
    values = ", ".join(f"rank {r}: {v:.10g}" for r, v in enumerate(column.tolist()))
    return f"{name} ({values})"


def agree(ranks: Ranks, digest: dict[str, float], device: torch.device) -> None:
    """Raise ``ValueError`` on every rank unless all ranks have the same ``digest``."""
    mine = torch.tensor(list(digest.values()), dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(ranks.size)]
    dist.all_gather(every, mine, group=ranks.group)
    every = torch.stack(every).cpu()
    differ = []
    for j, name in enumerate(digest):
        column = every[:, j]
        if not torch.allclose(column, column[0].expand_as(column), rtol=1e-6, atol=0):
            differ.append(_disagreement(name, column))
    if differ:
        raise ValueError("fxprop: the ranks of the group disagree before their first exchange "
                         f"on {'; '.join(differ)}. Every rank must run the same pipeline call: "
                         "the same step count, key steps, options, input shapes, seed, "
                         "conditioning and UNet (weights, processors, adapters, FreeU)")
