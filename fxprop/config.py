"""One config dataclass per reuse policy, validated when made."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .cuts import Cut, encoder_cut
from .schedules import Schedule, key_step_schedule

__all__ = ["EncoderPropagation", "Policy", "make_policy", "REUSE_MODES"]


@dataclass(frozen=True)
class EncoderPropagation:
    """Faster Diffusion's encoder propagation (Li et al., arXiv 2312.09608).

    Attributes:
        key_steps: preset name, interval ``N`` or explicit list of steps where the encoder runs.
        prior_noise: weight of the initial noise ``z_T`` added to the latent before every step
            whose timestep is below half the training horizon (0 turns it off).
        parallel: batch the decoder passes of each segment into one call at its key step.
        max_batch: upper bound, in samples, of one batched decoder call (parallel mode).
    """

    key_steps: Any = "faster-diffusion"
    prior_noise: float = 0.003
    parallel: bool = False
    max_batch: int | None = None
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


Policy = EncoderPropagation
REUSE_MODES: dict[str, type] = {"encoder": EncoderPropagation}


def _check_prior_noise(value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"prior_noise must be a non-negative number, got {value!r}")


def make_policy(reuse: str, **options: Any) -> Policy:
    """The policy for ``reuse`` with ``options`` (``None`` values take the policy's default)."""
    if reuse not in REUSE_MODES:
        raise ValueError(f"unknown reuse {reuse!r}; choose one of {sorted(REUSE_MODES)}")
    cls = REUSE_MODES[reuse]
    given = {k: v for k, v in options.items() if v is not None}
    known = set(cls.__dataclass_fields__) - {"schedule"}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"reuse={reuse!r} does not take {unknown}; it takes {sorted(known)}")
    return cls(**given)
