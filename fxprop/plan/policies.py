"""One config dataclass per reuse policy, validated when made, and the protocol they share.

The runtime reads a policy only through :class:`Policy`: its cut, its key-step schedule (and
the plan made from it), its prior noise weight, its forecast order and whether it batches.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Hashable, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

from ..graph.cuts import Cut, encoder_cut
from ..graph.deep import check_branch, deep_cut
from .forecast import check_forecast, check_forecast_in, check_reach
from .plans import Plan, make_plan
from .prior import check_weight
from .schedules import Schedule, key_step_schedule

__all__ = ["EncoderPropagation", "DeepCache", "Policy", "make_policy", "REUSE_MODES",
           "check_group"]


@runtime_checkable
class Policy(Protocol):
    """What a reuse mode provides to the runtime."""

    reuse: str                 # "encoder" or "deep"
    prior_noise: float         # weight of z_T added before steps with t < T/2 (0: off)
    forecast: int              # order of the frontier forecast (0: reuse as cached)
    forecast_in: str           # its variable: "step" (index) or "signal" (sqrt(alpha_bar))
    forecast_reach: float      # how far past the last key step it extrapolates
    regions: Any               # module prefixes by region, or None

    @property
    def schedule(self) -> Schedule: ...

    @property
    def cut(self) -> Cut: ...

    @property
    def cut_id(self) -> Hashable:
        """Equal for two policies that cut the same graph alike (they share captures)."""

    @property
    def batches(self) -> bool:
        """Whether a segment's every-step passes run as one batched call (parallel mode)."""

    @property
    def max_batch(self) -> int | None: ...

    @property
    def group(self) -> Any:
        """The process group whose ranks share parallel mode's work, or None."""

    @property
    def cfg_parallel(self) -> bool:
        """Whether two ranks of ``group`` split the UNet batch (CFG's halves)."""

    @property
    def needs_signal(self) -> bool:
        """Whether :meth:`plan` needs the signal level of every step."""

    def plan(self, timesteps: torch.Tensor | list, num_train_timesteps: int | None,
             signal: Sequence[float] | None = None) -> Plan: ...

    def validate(self, unet: nn.Module) -> None: ...


class _Planning:
    """The plan of a policy, and the checks of its forecast fields (shared by both)."""

    def _check_forecast(self) -> None:
        check_forecast(self.forecast)
        check_forecast_in(self.forecast_in)
        check_reach(self.forecast_reach)

    @property
    def needs_signal(self) -> bool:
        return self.forecast > 0 and self.forecast_in == "signal"

    def plan(self, timesteps: torch.Tensor | list, num_train_timesteps: int | None,
             signal: Sequence[float] | None = None) -> Plan:
        """The plan of one generation over ``timesteps``; ``signal``: the signal level
        ``sqrt(alpha_bar)`` of every step (:func:`fxprop.plan.forecast.signal_levels`), needed
        when the forecast is in that variable."""
        if self.needs_signal and signal is None:
            raise ValueError(
                "forecast_in='signal' needs the signal level of every step: pass "
                "set_timesteps(..., signal=fxprop.signal_levels(scheduler)) (pipelines do it "
                "for you), or forecast_in='step'")
        positions = signal if self.needs_signal else None
        return make_plan(timesteps, self.schedule, num_train_timesteps, self.forecast,
                         positions, self.forecast_reach)


@dataclass(frozen=True)
class EncoderPropagation(_Planning):
    """Faster Diffusion's encoder propagation (Li et al., arXiv 2312.09608).

    Attributes:
        key_steps: preset name, interval ``N`` or explicit list of steps where the encoder runs.
        prior_noise: weight of the initial noise ``z_T`` added to the latent before every step
            whose timestep is below half the training horizon (0 turns it off).
        parallel: batch the decoder passes of each segment into one call at its key step.
        max_batch: upper bound, in samples, of one batched decoder call (parallel mode); with
            ``group``, of one rank's call.
        group: a ``torch.distributed`` process group whose ranks share each segment's steps
            (parallel mode; every rank runs the same call with the same seed, see
            :mod:`fxprop.runtime.distributed`). ``None`` or a group of one: one process.
        cfg_parallel: with ``group``, two ranks split the UNet batch in halves (classifier-free
            guidance's unconditional and conditional ones).
        forecast: order of the frontier forecast between key steps (0: reuse the key step's
            frontier, as the paper; 1: linear, 2: quadratic extrapolation through the last
            key frontiers; see :mod:`fxprop.plan.forecast`).
        forecast_in: the forecast's variable: ``"step"`` (the step index; the default here,
            measured best for encoder features) or ``"signal"`` (``sqrt(alpha_bar)``).
        forecast_reach: a forecast goes at most this many times the distance of the last two
            key steps past the last one (``math.inf``: unbounded). 1 by default here: the
            faster-diffusion preset's long late segments overshoot without it.
        regions: module prefixes by region for UNets with unknown names, e.g.
            ``{"encoder": ["enc"], "mid": ["bottleneck"], "decoder": ["dec"], "output": ["head"]}``
            (``None``: diffusers or LDM names, else the structural fallback).
    """

    key_steps: Any = "faster-diffusion"
    prior_noise: float = 0.003
    parallel: bool = False
    max_batch: int | None = None
    group: Any = field(default=None, compare=False, repr=False)
    cfg_parallel: bool = False
    forecast: int = 0
    forecast_in: str = "step"
    forecast_reach: float = 1.0
    regions: Any = field(default=None, compare=False)
    schedule: Schedule = field(init=False, repr=False, compare=False)

    reuse = "encoder"

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", key_step_schedule(self.key_steps))
        check_weight(self.prior_noise)
        self._check_forecast()
        if self.max_batch is not None and (not isinstance(self.max_batch, int)
                                           or self.max_batch < 1):
            raise ValueError(f"max_batch must be a positive int or None, got {self.max_batch!r}")
        if self.max_batch is not None and not self.parallel:
            raise ValueError("max_batch bounds the batched decoder call of parallel mode; "
                             "pass parallel=True or drop max_batch")
        check_group(self.group, self.cfg_parallel)
        if self.group is not None and not self.parallel:
            raise ValueError("group= shares parallel mode's batched decoder steps between "
                             "ranks: pass parallel=True with it")

    @property
    def cut(self) -> Cut:
        return encoder_cut

    @property
    def cut_id(self) -> Hashable:
        return ("encoder",)

    @property
    def batches(self) -> bool:
        return self.parallel

    def validate(self, unet: nn.Module) -> None:
        """Checks that need the UNet (none: its regions are found when it is captured)."""


@dataclass(frozen=True)
class DeepCache(_Planning):
    """DeepCache's deep-feature caching (Ma et al., arXiv 2312.00858).

    Attributes:
        key_steps: interval ``N`` (DeepCache's ``cache_interval``), explicit list of steps, or a
            schedule such as :func:`fxprop.plan.schedules.deepcache_nonuniform`. Steps count UNet
            calls, which is DeepCache's step index for first-order schedulers.
        branch: a skip connection found in the captured graph, whose deep hidden state is
            cached: DeepCache's ``cache_branch_id`` on diffusers UNets (see :mod:`fxprop.graph.deep`
            for the ids of SD, SDXL and ``UNet2DModel``), else 0..n-1 from the shallowest.
            0 is the shallowest and fastest; list them with :func:`fxprop.graph.deep.branches`.
        prior_noise: weight of Faster Diffusion's prior noise injection (off by default: not
            part of DeepCache).
        regions: as for :class:`EncoderPropagation`.
    """

    key_steps: Any = 3
    branch: int = 0
    prior_noise: float = 0.0
    forecast: int = 0
    forecast_in: str = "signal"
    forecast_reach: float = math.inf
    regions: Any = field(default=None, compare=False)
    schedule: Schedule = field(init=False, repr=False, compare=False)

    reuse = "deep"
    batches = False   # the shallow branch reads the current latent: steps are sequential
    max_batch = None
    group = None
    cfg_parallel = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", key_step_schedule(self.key_steps))
        check_weight(self.prior_noise)
        self._check_forecast()
        if isinstance(self.branch, bool) or not isinstance(self.branch, int) or self.branch < 0:
            raise ValueError(f"branch must be a non-negative int (DeepCache's cache_branch_id),"
                             f" got {self.branch!r}")

    @property
    def cut(self) -> Cut:
        return functools.partial(deep_cut, branch=self.branch)

    @property
    def cut_id(self) -> Hashable:
        return ("deep", self.branch)

    def validate(self, unet: nn.Module) -> None:
        """Raise ``ValueError`` if ``branch`` is out of range for ``unet``."""
        check_branch(unet, self.branch)


REUSE_MODES: dict[str, type] = {"encoder": EncoderPropagation, "deep": DeepCache}


def make_policy(reuse: str, **options: Any) -> Policy:
    """The policy for ``reuse`` with ``options`` (``None`` values take the policy's default)."""
    if reuse not in REUSE_MODES:
        raise ValueError(f"unknown reuse {reuse!r}; choose one of {sorted(REUSE_MODES)}")
    cls = REUSE_MODES[reuse]
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - _options(cls))
    if unknown:
        raise ValueError(f"reuse={reuse!r} does not take {unknown}{_elsewhere(unknown)}; it "
                         f"takes {sorted(_options(cls))}")
    return cls(**given)


def _options(cls: type) -> set[str]:
    return set(cls.__dataclass_fields__) - {"schedule"}


def _elsewhere(names: list[str]) -> str:
    """Where these options belong, e.g. "; parallel is only valid with reuse='encoder'"."""
    hints = []
    for name in names:
        modes = [repr(m) for m, cls in REUSE_MODES.items() if name in _options(cls)]
        if modes:
            hints.append(f"; {name} is only valid with reuse={' or '.join(modes)}")
    return "".join(hints)


def check_group(group: Any, cfg_parallel: Any) -> None:
    """Raise unless ``group`` is a process group (or None) and ``cfg_parallel`` a bool that
    has a group."""
    if not isinstance(cfg_parallel, bool):
        raise TypeError(f"cfg_parallel must be a bool, got {cfg_parallel!r}")
    if group is None:
        if cfg_parallel:
            raise ValueError("cfg_parallel=True splits the batch between two ranks of a "
                             "process group: pass group= (e.g. dist.group.WORLD)")
        return
    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed process group (after "
                        f"dist.init_process_group(), e.g. dist.group.WORLD), got "
                        f"{type(group).__name__}")
