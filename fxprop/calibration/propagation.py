"""How much an output error at one step moves the final sample: recorded and replayed runs.

A calibration call is run once plain (:func:`record`: every UNet call's inputs and outputs, and
the final sample, the last ``scheduler.step`` result). :func:`gains` then replays it from step
``j`` (the recorded outputs stand in for the UNet before ``j``, so only steps ``j..n-1`` run),
adding to the UNet output at ``j`` the change of the output over one step, ``out_j - out_{j-1}``
(the direction and size of a one-step-stale reuse error), and measures
``gain_j = |final' - final| / |out_j - out_{j-1}|`` (Frobenius norms over the batch). One probe
measures one direction, so probes are noisy (on the digits model neighbouring probes differ by 2x
and more): when not every step is probed, the gain curve is a quadratic in ``log gain`` fitted
to them (:func:`smooth`), not an interpolation that a key-step optimiser would chase. Replays
must be deterministic: pipelines get their generators' states reset before every run; a
bare-UNet loop must seed its own noise. :func:`final_of` with ``forward=`` also runs the
candidates that calibration verifies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

__all__ = ["Recording", "record", "replay", "final_of", "gains", "probe_steps",
           "interpolate", "smooth"]


@dataclass
class Recording:
    """One plain generation: ``(args, kwargs)`` and output of every UNet call, final sample."""

    calls: list[tuple[tuple, dict]] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    final: torch.Tensor | None = None


def _clone(tree: Any) -> Any:
    return pytree.tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x,
                           tree)


class _Patched:
    """Context: ``unet.forward`` replaced by ``forward`` and ``scheduler.step`` recording its
    sample into ``sink`` (instance attributes, restored on exit)."""

    def __init__(self, unet: nn.Module | None, forward: Callable | None, scheduler: Any,
                 sink: list) -> None:
        self.targets = [] if forward is None else [(unet, "forward", forward)]
        if scheduler is not None and callable(getattr(scheduler, "step", None)):
            step = scheduler.step

            def recorded_step(*args: Any, **kwargs: Any) -> Any:
                out = step(*args, **kwargs)
                sink[:] = [pytree.tree_leaves(out)[0].detach().clone()]
                return out
            self.targets.append((scheduler, "step", recorded_step))

    def __enter__(self) -> None:
        self.saved = []
        for obj, name, value in self.targets:
            self.saved.append(obj.__dict__.get(name))
            object.__setattr__(obj, name, value)

    def __exit__(self, *exc: Any) -> None:
        for (obj, name, _), old in zip(self.targets, self.saved):
            if old is None:
                object.__delattr__(obj, name)
            else:
                object.__setattr__(obj, name, old)


def record(unet: nn.Module, run: Callable[[], Any], scheduler: Any = None) -> Recording:
    """Run ``run()`` plain and record every call of ``unet`` and the final sample: the last
    ``scheduler.step`` result, or, with no scheduler (a sampler that steps by itself, such as
    ComfyUI's), the first tensor that ``run()`` returns."""
    rec, sink = Recording(), []
    forward = unet.forward

    def recording_forward(*args: Any, **kwargs: Any) -> Any:
        rec.calls.append(_clone((args, kwargs)))
        out = forward(*args, **kwargs)
        rec.outputs.append(_clone(out))
        return out

    with _Patched(unet, recording_forward, scheduler, sink):
        rec.final = _final(run(), scheduler, sink)
    return rec


def replay(unet: nn.Module, run: Callable[[], Any], rec: Recording, step: int,
           delta: torch.Tensor, scheduler: Any) -> torch.Tensor | None:
    """The final sample of ``run()`` with ``delta`` added to the UNet output at ``step`` (the
    recorded outputs stand in for the earlier steps); ``None`` if the replay left the
    recording (another call count)."""
    forward, count, sink = unet.forward, [0], []

    def replaying_forward(*args: Any, **kwargs: Any) -> Any:
        i = count[0]
        count[0] += 1
        if i < step and i < len(rec.outputs):
            return _clone(rec.outputs[i])
        out = forward(*args, **kwargs)
        if i != step:
            return out
        leaves, spec = pytree.tree_flatten(out)
        return pytree.tree_unflatten([leaves[0] + delta, *leaves[1:]], spec)

    with _Patched(unet, replaying_forward, scheduler, sink):
        final = _final(run(), scheduler, sink)
    return final if count[0] == len(rec.outputs) else None


def final_of(run: Callable[[], Any], scheduler: Any, unet: nn.Module | None = None,
             forward: Callable | None = None) -> torch.Tensor | None:
    """The final sample of ``run()`` (see :func:`record`), with ``unet.forward`` replaced by
    ``forward`` if given."""
    sink: list = []
    with _Patched(unet, forward, scheduler, sink):
        return _final(run(), scheduler, sink)


def _final(out: Any, scheduler: Any, sink: list) -> torch.Tensor | None:
    """The final sample: the last ``scheduler.step`` result (in ``sink``), or, without a
    scheduler, the first tensor ``run()`` returned (``out``: a sampler's own result)."""
    if scheduler is not None:
        return sink[0] if sink else None
    first = next((x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)), None)
    return None if first is None else first.detach().clone()


def probe_steps(num_steps: int, probes: int) -> list[int]:
    """``probes`` steps of ``1..num_steps-1`` spread evenly (all of them if fewer)."""
    if num_steps - 1 <= probes:
        return list(range(1, num_steps))
    return sorted({round(1 + i * (num_steps - 2) / (probes - 1)) for i in range(probes)})


def interpolate(known: dict[int, float], num_steps: int) -> list[float]:
    """Every step's value from ``known`` ones, log-linear between and constant outside;
    step 0 (always a key step) gets its neighbour's."""
    steps = sorted(known)
    out = []
    for j in range(num_steps):
        lo = max((s for s in steps if s <= j), default=steps[0])
        hi = min((s for s in steps if s >= j), default=steps[-1])
        if lo == hi:
            out.append(known[lo])
            continue
        a, b = math.log(max(known[lo], 1e-30)), math.log(max(known[hi], 1e-30))
        out.append(math.exp(a + (b - a) * (j - lo) / (hi - lo)))
    return out


def smooth(known: dict[int, float], num_steps: int, degree: int = 2) -> list[float]:
    """Every step's value from ``known`` ones: least squares polynomial of ``degree`` in the
    step fitted to their logarithms (log-linear interpolation if there are too few to fit)."""
    if len(known) <= degree + 1:
        return interpolate(known, num_steps)
    steps = torch.tensor(sorted(known), dtype=torch.float64)
    values = torch.tensor([math.log(max(known[j], 1e-30)) for j in sorted(known)],
                          dtype=torch.float64)
    scale = max(num_steps - 1, 1)
    basis = torch.stack([(steps / scale) ** p for p in range(degree + 1)], 1)
    coeffs = torch.linalg.lstsq(basis, values[:, None]).solution[:, 0]
    at = torch.arange(num_steps, dtype=torch.float64) / scale
    fitted = sum(c * at ** p for p, c in enumerate(coeffs))
    return [math.exp(float(x)) for x in fitted]


@torch.no_grad()
def gains(unet: nn.Module, run: Callable[[], Any], rec: Recording, scheduler: Any,
          steps: Sequence[int], bar: Any = None) -> dict[int, float]:
    """``gain_j`` for each of ``steps`` (>= 1): how much the final sample moves per unit of
    output error at ``j`` (see the module docstring)."""
    if rec.final is None:
        raise ValueError("calibration could not see the final sample: the sampling loop does "
                         "not call scheduler.step of the scheduler given (pass scheduler=)")
    first = [pytree.tree_leaves(o)[0] for o in rec.outputs]
    found = {}
    for j in steps:
        delta = (first[j] - first[j - 1]).double()
        final = replay(unet, run, rec, j, delta.to(first[j].dtype), scheduler)
        if bar is not None:
            bar.update(len(rec.outputs) - j)
        if final is None:
            raise ValueError("a replayed calibration call ran another number of UNet steps: "
                             "calibration calls must be deterministic (seeded generators)")
        moved = (final.double() - rec.final.double()).norm()
        found[j] = float(moved / delta.norm().clamp_min(1e-30))
    return found
