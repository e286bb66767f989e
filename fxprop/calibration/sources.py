"""Where calibration's plain generations come from: a :class:`Source` runs one calibration
call the same way every time and says how to read it.

:func:`source_of` makes the source of a diffusers pipeline (calls are dicts of its arguments)
or of a bare UNet (calls are your sampling loops, ``loop(unet)``); other samplers (ComfyUI's:
:mod:`fxprop.clients.comfyui.calibrate`) build a :class:`Source` of their own. A source says what
calibration cannot find out by itself: which scheduler's last ``step`` is the final sample (or,
without one, that ``run()`` returns it), the forward that calls are flattened by and captured
with, the forecast variables of each step, the same call on other noise (for verification), and
what the calibration is for (scheduler name, sigma grid, weights digest).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..graph.capture import FlatCall, flatten_call
from ..graph.fingerprint import weights_digest
from ..plan.forecast import signal_levels
from ..runtime.accelerated import AcceleratedUNet
from ..runtime.attach import runtime_of

__all__ = ["Source", "source_of", "other_noise", "generators", "scheduler_positions"]


def generators(call: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` leaves of ``call``."""
    return [g for g in pytree.tree_leaves(call) if isinstance(g, torch.Generator)]


def other_noise(call: Any) -> Any:
    """``call`` with each ``torch.Generator`` replaced by one seeded from a draw of it: the
    same arguments on other noise (``call`` itself if it has no generator, e.g. a loop)."""
    def reseed(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Generator):
            return leaf
        draw = torch.Generator(leaf.device)
        draw.set_state(leaf.get_state())
        seed = int(torch.randint(2 ** 62, (1,), generator=draw, device=leaf.device))
        return torch.Generator(leaf.device).manual_seed(seed)
    return pytree.tree_map(reseed, call) if generators(call) else call


def scheduler_positions(scheduler: Any, num_steps: int) -> dict[str, list[float]]:
    """Every forecast variable's value per step (``signal`` only if the scheduler tells it)."""
    out = {"step": [float(i) for i in range(num_steps)]}
    try:
        levels = signal_levels(scheduler)
    except (ValueError, AttributeError, TypeError, IndexError):
        return out
    if len(levels) >= num_steps:
        out["signal"] = [float(x) for x in levels[len(levels) - num_steps:]]
    return out


@dataclass
class Source:
    """The plain generations of one model, as calibration reads them.

    Attributes:
        unet: the module whose calls are recorded (its instance ``forward`` is replaced while
            a generation runs).
        scheduler: the scheduler whose last ``step`` result is the final sample; ``None``: the
            first tensor that ``run()`` returns is.
        make_run: ``make_run(call)`` returns ``run()``, which runs the call the same way each
            time (its noise reset or seeded anew).
        name: what the calibration is for (the scheduler's class name, or a sampler's name).
        other: ``other(call)``: the call on other noise (``call`` itself if it cannot be).
        forward: the forward calls are bound to, flattened by and captured with.
        flatten: ``flatten(args, kwargs)``: a recorded call as captured (default: bound to
            ``forward``).
        positions: ``positions(num_steps)``: each forecast variable's value per step.
        calls_per_run: UNet calls every generation must make (``None``: any); ``why`` says
            what a different count means.
        digest: the weights digest of the model as it ran (default: :func:`weights_digest`).
        sigmas: the sigma grid the calibration is for (empty: any grid of its scheduler).
        num_inference_steps: what the generations were asked for (``None``: their own).
    """

    unet: nn.Module
    scheduler: Any
    make_run: Callable[[Any], Callable[[], Any]]
    name: str
    other: Callable[[Any], Any] = other_noise
    forward: Callable | None = None
    flatten: Callable[[tuple, dict], FlatCall] | None = None
    positions: Callable[[int], dict] | None = None
    calls_per_run: int | None = None
    why: str = ""
    digest: Callable[[], tuple] | None = None
    sigmas: tuple[float, ...] = ()
    num_inference_steps: int | None = None

    def __post_init__(self) -> None:
        if self.forward is None:
            self.forward = type(self.unet).forward.__get__(self.unet)
        if self.flatten is None:
            self.flatten = lambda args, kwargs: flatten_call(self.forward, args, kwargs)
        if self.positions is None:
            self.positions = lambda n: scheduler_positions(self.scheduler, n)
        if self.digest is None:
            self.digest = lambda: weights_digest(self.unet)


def source_of(target: Any, num_inference_steps: int | None, scheduler: Any) -> Source:
    """The :class:`Source` of a diffusers pipeline with a ``.unet`` (``scheduler``: ignored) or
    of a bare UNet whose calls are sampling loops (``scheduler``: the one they step)."""
    if isinstance(target, Source):
        return target
    unet = getattr(target, "unet", None)
    if isinstance(target, AcceleratedUNet) or (
            hasattr(target, "scheduler") and runtime_of(target) is not None):
        raise ValueError("calibrate measures plain sampling, and this target is accelerated by "
                         "fxprop: pass fxprop.restore(target) instead")
    if isinstance(unet, nn.Module) and hasattr(target, "scheduler"):
        return Source(unet, target.scheduler, _pipeline_runs(target, num_inference_steps),
                      type(target.scheduler).__name__, num_inference_steps=num_inference_steps)
    if not isinstance(target, nn.Module):
        raise TypeError(f"calibrate takes a diffusers pipeline with a .unet or a UNet module, "
                        f"got {type(target).__name__}")
    if scheduler is None:
        raise ValueError("calibrating a bare UNet needs scheduler= (the scheduler your loop "
                         "uses: its class is part of the calibration)")
    return Source(target, scheduler, _loop_runs(target), type(scheduler).__name__,
                  num_inference_steps=num_inference_steps)


def _pipeline_runs(pipeline: Any, num_inference_steps: int | None
                   ) -> Callable[[Any], Callable[[], Any]]:
    """``make_run`` of a pipeline: its generators are reset to their state at ``make_run``."""
    extra = {} if num_inference_steps is None else {"num_inference_steps": num_inference_steps}

    def make_run(call: Any) -> Callable[[], Any]:
        if not isinstance(call, dict):
            raise TypeError(f"calls of a pipeline are dicts of its arguments, got "
                            f"{type(call).__name__}")
        saved = [(g, g.get_state()) for g in generators(call)]

        def run() -> Any:
            for g, state in saved:
                g.set_state(state)
            return pipeline(**call, **extra)
        return run
    return make_run


def _loop_runs(unet: nn.Module) -> Callable[[Any], Callable[[], Any]]:
    """``make_run`` of a bare UNet: the calls are the user's sampling loops."""
    def make_run(call: Any) -> Callable[[], Any]:
        if not callable(call):
            raise TypeError(f"calls of a bare UNet are your sampling loops, functions "
                            f"unet -> anything, got {type(call).__name__}")
        return lambda: call(unet)
    return make_run
