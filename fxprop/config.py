"""One config dataclass per reuse policy, validated when made."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .cuts import Cut, encoder_cut
from .deep import check_branch, deep_cut
from .schedules import Schedule, key_step_schedule

__all__ = ["EncoderPropagation", "DeepCache", "Policy", "make_policy", "REUSE_MODES"]


@dataclass(frozen=True)
class EncoderPropagation:
    """Faster Diffusion's encoder propagation (Li et al., arXiv 2312.09608).

    Attributes:
        key_steps: preset name, interval ``N`` or explicit list of steps where the encoder runs.
        prior_noise: weight of the initial noise ``z_T`` added to the latent before every step
            whose timestep is below half the training horizon (0 turns it off).
        parallel: batch the decoder passes of each segment into one call at its key step.
        max_batch: upper bound, in samples, of one batched decoder call (parallel mode).
        regions: module prefixes by region for UNets with unknown names, e.g.
            ``{"encoder": ["enc"], "mid": ["bottleneck"], "decoder": ["dec"], "output": ["head"]}``
            (``None``: diffusers or LDM names, else the structural fallback).
    """

    key_steps: Any = "faster-diffusion"
    prior_noise: float = 0.003
    parallel: bool = False
    max_batch: int | None = None
    regions: Any = field(default=None, compare=False)
    schedule: Schedule = field(init=False, repr=False, compare=False)

    reuse = "encoder"

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", key_step_schedule(self.key_steps))
        _check_prior_noise(self.prior_noise)
        if self.max_batch is not None and (not isinstance(self.max_batch, int)
                                           or self.max_batch < 1):
            raise ValueError(f"max_batch must be a positive int or None, got {self.max_batch!r}")
        if self.max_batch is not None and not self.parallel:
            raise ValueError("max_batch bounds the batched decoder call of parallel mode; "
                             "pass parallel=True or drop max_batch")

    @property
    def cut(self) -> Cut:
        return encoder_cut

    def validate(self, unet: nn.Module) -> None:
        """Checks that need the UNet (none: its regions are found when it is captured)."""


@dataclass(frozen=True)
class DeepCache:
    """DeepCache's deep-feature caching (Ma et al., arXiv 2312.00858).

    Attributes:
        key_steps: interval ``N`` (DeepCache's ``cache_interval``), explicit list of steps, or a
            schedule such as :func:`fxprop.schedules.deepcache_nonuniform`. Steps count UNet
            calls, which is DeepCache's step index for first-order schedulers.
        branch: DeepCache's ``cache_branch_id``: the up resnet ``up_blocks[-1 - branch // 3]
            .resnets[-1 - branch % 3]`` whose input is cached (see :mod:`fxprop.deep` for the
            ids of SD, SDXL and ``UNet2DModel``). 0 is the shallowest and fastest.
        prior_noise: weight of Faster Diffusion's prior noise injection (off by default: not
            part of DeepCache).
        regions: as for :class:`EncoderPropagation`.
    """

    key_steps: Any = 3
    branch: int = 0
    prior_noise: float = 0.0
    regions: Any = field(default=None, compare=False)
    schedule: Schedule = field(init=False, repr=False, compare=False)

    reuse = "deep"

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", key_step_schedule(self.key_steps))
        _check_prior_noise(self.prior_noise)
        if isinstance(self.branch, bool) or not isinstance(self.branch, int) or self.branch < 0:
            raise ValueError(f"branch must be a non-negative int (DeepCache's cache_branch_id),"
                             f" got {self.branch!r}")

    @property
    def cut(self) -> Cut:
        return functools.partial(deep_cut, branch=self.branch)

    def validate(self, unet: nn.Module) -> None:
        """Raise ``ValueError`` if ``branch`` is out of range for ``unet``."""
        check_branch(unet, self.branch)


Policy = EncoderPropagation | DeepCache
REUSE_MODES: dict[str, type] = {"encoder": EncoderPropagation, "deep": DeepCache}


def _check_prior_noise(value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"prior_noise must be a non-negative number, got {value!r}")


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
