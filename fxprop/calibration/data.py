"""A calibration is data: the schedule chosen for one model, scheduler and step count.

:class:`Calibration` is what :func:`fxprop.calibration.calibrate.calibrate` returns: the reuse mode,
branch, forecast order and key steps it chose, what it was calibrated for (step count, scheduler
class, model: its class, config and a digest of its weights) and what it predicts (FLOP-ideal
speedup, error, the error of every step).
It is saved and loaded as JSON, and turns into the keyword arguments of ``fxprop.accelerate``
only for the step count and scheduler it was measured on (:meth:`accelerate_options`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..graph.fingerprint import weights_digest
from ..plan.forecast import FORECAST_ORDERS, FORECAST_VARIABLES
from ..plan.policies import REUSE_MODES

__all__ = ["Calibration", "FORMAT_VERSION", "model_id"]

#: Version of the JSON format (3: ``weights``; 4: ``sigmas``; 5: ``verdict``); version 3 files
#: are read as calibrations for any sigma grid of their scheduler, versions 3 and 4 as
#: calibrations without a verdict, files of other versions are refused.
FORMAT_VERSION = 5
#: Fields each older version that is still read lacks, with the value they mean there.
MIGRATIONS = {3: {"sigmas": [], "verdict": None}, 4: {"verdict": None}}
#: Two digests name the same weights if no group differs by more than this (a model loaded in
#: fp16 or bf16 moves a group by about 1e-4; other weights by about 0.03).
DIGEST_TOLERANCE = 2e-3
#: Two sigma grids are the same if no sigma differs by more than this, relatively (a grid
#: computed in another dtype or on another device moves a sigma by about 1e-7).
SIGMA_TOLERANCE = 1e-4


def model_id(unet: nn.Module) -> str:
    """A short hash of what a calibration depends on: the UNet's class and its config (or,
    without one, its parameter names and shapes). The config's private entries
    (``_name_or_path``, ``_diffusers_version`` ...) say where and how it was saved, not what
    the model is: the same model loaded from another folder has the same id."""
    config = getattr(unet, "config", None)
    if config is not None:
        public = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        described = json.dumps(public, sort_keys=True, default=str)
    else:
        described = json.dumps([(n, list(p.shape)) for n, p in unet.named_parameters()])
    digest = hashlib.sha256(f"{type(unet).__qualname__}:{described}".encode()).hexdigest()
    return f"{type(unet).__name__}:{digest[:16]}"



@dataclass(frozen=True)
class Calibration:
    """A schedule chosen from measured errors (see :mod:`fxprop.calibrate`).

    Attributes:
        reuse, branch: the cut (``branch`` is ``None`` for ``"encoder"``).
        forecast, forecast_in, forecast_reach: the frontier forecast it was measured with.
        key_steps: the chosen key steps (sorted, from 0).
        num_steps: UNet calls per generation (entries of ``scheduler.timesteps``).
        num_inference_steps: what the pipeline was called with (``None`` for a bare UNet).
        scheduler: the scheduler's class name (in ComfyUI: the sampler's name).
        sigmas: the sigma grid it was measured on, where the sampler's name does not fix it
            (ComfyUI: scheduler, steps and denoise make the grid); empty: any grid.
        model: :func:`model_id` of the UNet (its class and config, unlike
            :func:`fxprop.fingerprint`, which is the state captures depend on).
        weights: :func:`weights_digest` of the UNet (empty: not checked, for hand-made
            calibrations).
        predicted_speedup: FLOP-ideal speedup over plain sampling.
        predicted_error: predicted relative error of the final sample (root of the sum of
            ``error_curve``).
        error_curve: each step's measured output error as it reaches the final sample, squared
            and relative to it (0 at key steps).
        budget: ``{"target_speedup": x}`` or ``{"max_error": x}``.
        alternatives: the best schedule of every other cut and order at the same budget, as
            ``(reuse, branch, forecast, speedup, error)`` (what the choice was made against).
        verified_error: root mean square relative error of the held-out final samples.
        verdict: how sure the verified choice is (``None``: not verified): ``chosen`` and
            ``versus`` (the best finalist of the other side, hand-set or fitted) described,
            ``hand_set`` (the pick is a hand-set schedule), ``gain_db`` (mean PSNR gain of
            the pick over ``versus``) and its ``interval_db`` at ``confidence``, ``samples``.
    """

    reuse: str
    branch: int | None
    forecast: int
    forecast_in: str
    forecast_reach: float
    key_steps: tuple[int, ...]
    num_steps: int
    num_inference_steps: int | None
    scheduler: str
    model: str
    predicted_speedup: float
    predicted_error: float
    error_curve: tuple[float, ...]
    budget: dict = dataclasses.field(default_factory=dict, compare=False)
    alternatives: tuple = ()
    verified_error: float | None = None
    weights: tuple[float, ...] = ()
    sigmas: tuple[float, ...] = ()
    verdict: dict | None = dataclasses.field(default=None, compare=False)
    version: int = FORMAT_VERSION

    def accelerate_options(self, num_steps: int, scheduler: Any) -> dict:
        """Keyword arguments of ``fxprop.accelerate`` for this schedule; ``ValueError`` if
        ``num_steps`` or ``scheduler`` (an instance, class or class name) is not what it was
        calibrated for."""
        if num_steps != self.num_steps:
            raise ValueError(f"this calibration is for {self.num_steps} steps "
                             f"({self.scheduler}), not {num_steps}: calibrate again for "
                             f"{num_steps} steps")
        self._check_scheduler(scheduler)
        options = dict(reuse=self.reuse, key_steps=list(self.key_steps), forecast=self.forecast,
                       forecast_in=self.forecast_in, forecast_reach=self.forecast_reach,
                       prior_noise=0)
        if self.reuse == "deep":
            options["branch"] = self.branch
        return options

    def check_grid(self, scheduler: Any, sigmas: Sequence[float]) -> None:
        """Raise ``ValueError`` unless ``scheduler`` (an instance, class or name) is the one
        calibrated for and ``sigmas`` (a run's grid, its last entry the end) the grid it was
        measured on (any grid, for a calibration without ``sigmas``)."""
        self._check_scheduler(scheduler)
        if not self.sigmas:
            return
        if len(sigmas) != len(self.sigmas):
            raise ValueError(f"this calibration is for {len(self.sigmas) - 1} steps, not "
                             f"{len(sigmas) - 1}: calibrate again for {len(sigmas) - 1} steps")
        worst = _worst([abs(a - b) / max(abs(b), 1e-3) for a, b in zip(sigmas, self.sigmas)])
        if not worst <= SIGMA_TOLERANCE:  # a NaN sigma is refused too
            raise ValueError(f"this calibration is for the sigmas {_short(self.sigmas)}, not "
                             f"{_short(sigmas)} (another scheduler, denoise or start step): "
                             "calibrate again for this grid")

    def _check_scheduler(self, scheduler: Any) -> None:
        name = _class_name(scheduler)
        if name != self.scheduler:
            raise ValueError(f"this calibration is for {self.scheduler}, not {name}: "
                             "calibrate again with that scheduler or sampler")

    def check_model(self, unet: nn.Module) -> None:
        """Raise ``ValueError`` if ``unet`` is not the model this was calibrated on."""
        found = model_id(unet)
        if found != self.model:
            raise ValueError(f"this calibration is for the model {self.model}, not {found}: "
                             "calibrate again on this model")
        if not self.weights:
            return
        ours = weights_digest(unet)
        moved = (_worst([abs(a - b) for a, b in zip(ours, self.weights)])
                 if len(ours) == len(self.weights) else math.inf)
        if not moved <= DIGEST_TOLERANCE:  # a NaN in either digest is refused too
            raise ValueError(f"this calibration is for other weights of {self.model} (their "
                             f"digest differs by {moved:.3g}, more than {DIGEST_TOLERANCE}): "
                             "calibrate again on this model")

    def policy_options(self, target: Any) -> dict:
        """Keyword arguments of ``fxprop.accelerate`` that apply this calibration to
        ``target`` (a pipeline or a UNet); ``key_steps`` is a schedule that raises
        ``ValueError`` at a generation of another step count. Raises ``ValueError`` now if
        ``target`` is another model or its scheduler another class."""
        pipe_unet = getattr(target, "unet", None)
        self.check_model(pipe_unet if isinstance(pipe_unet, nn.Module) else target)
        scheduler = getattr(target, "scheduler", None)
        options = self.accelerate_options(self.num_steps, scheduler or self.scheduler)
        options["key_steps"] = self._schedule
        return options

    def _schedule(self, num_steps: int) -> tuple[int, ...]:
        if num_steps != self.num_steps:
            raise ValueError(f"this calibration is for {self.num_steps} steps "
                             f"({self.scheduler}), not {num_steps}: calibrate again for "
                             f"{num_steps} steps")
        return self.key_steps

    # -- JSON --------------------------------------------------------------------------------

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["forecast_reach"] = None if math.isinf(self.forecast_reach) else self.forecast_reach
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Calibration":
        """Rebuild from :meth:`to_json`; ``ValueError`` for another format version, other
        fields or a field that breaks its rule (a hand-edited NaN would pass every check)."""
        version = data.get("version")
        if version in MIGRATIONS:
            data = {**MIGRATIONS[version], **data, "version": FORMAT_VERSION}
            version = FORMAT_VERSION
        if version != FORMAT_VERSION:
            raise ValueError(f"calibration format version {version!r} is not supported (this "
                             f"fxprop reads version {FORMAT_VERSION}); calibrate again")
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            raise ValueError(f"not a calibration: missing {sorted(names - set(data))}, "
                             f"unknown {sorted(set(data) - names)}")
        _check_fields(data)
        data = dict(data)
        reach = data["forecast_reach"]
        data["forecast_reach"] = math.inf if reach is None else float(reach)
        data["key_steps"] = tuple(data["key_steps"])
        data["error_curve"] = tuple(data["error_curve"])
        data["alternatives"] = tuple(tuple(a) for a in data["alternatives"])
        data["weights"] = tuple(float(w) for w in data["weights"])
        data["sigmas"] = tuple(float(s) for s in data["sigmas"])
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not a calibration JSON file: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a calibration JSON file (not an object)")
        return cls.from_json(data)

    def __str__(self) -> str:
        cut = "encoder" if self.reuse == "encoder" else f"deep, branch {self.branch}"
        order = ("reuse", "linear", "quadratic")[self.forecast]
        budget = ", ".join(f"{k}={v}" for k, v in self.budget.items())
        lines = [
            f"Calibration for {self.model}, {self.scheduler}, {self.num_steps} steps ({budget})",
            *([f"  sigmas:     {_short(self.sigmas)}"] if self.sigmas else []),
            f"  reuse:      {cut}",
            f"  forecast:   {self.forecast} ({order}, in {self.forecast_in})",
            f"  key steps:  {list(self.key_steps)} ({len(self.key_steps)} of {self.num_steps})",
            f"  predicted:  {self.predicted_speedup:.2f}x FLOP-ideal, relative final error "
            f"{self.predicted_error:.4f}" + ("" if self.verified_error is None else
                                             f" (measured {self.verified_error:.4f})"),
            "  error curve (share of the squared final error, per step): " +
            " ".join(f"{e:.0e}" if e else "0" for e in self.error_curve),
        ]
        if self.verdict:
            lines.append(_verdict_line(self.verdict))
        if self.alternatives:
            lines.append("  best of each cut and order at this budget (speedup, error):")
            for reuse, branch, forecast, speed, error in self.alternatives:
                name = "encoder" if reuse == "encoder" else f"deep b{branch}"
                lines.append(f"    {name:<10} forecast {forecast}  {speed:5.2f}x  {error:.4f}")
        return "\n".join(lines)


def _verdict_line(verdict: dict) -> str:
    """The verdict in one line: the pick, and its gain over the other side's best."""
    line = f"  verified:   {verdict['chosen']} on {verdict['samples']} held-out samples"
    if verdict.get("versus") is None:
        return line
    low, high = verdict["interval_db"]
    return (f"{line}; {verdict['gain_db']:+.2f} dB over {verdict['versus']} "
            f"({verdict['confidence']:.0%} interval {low:+.2f} to {high:+.2f} dB)")


def _worst(gaps: list) -> float:
    """The largest gap, NaN if any gap is (``max`` keeps or drops a NaN by its position)."""
    return math.nan if any(math.isnan(g) for g in gaps) else max(gaps, default=0.0)


def _short(values: Sequence[float]) -> str:
    """A grid for a message: its first and last entries."""
    shown = [f"{float(v):.4g}" for v in values]
    return "[" + (", ".join(shown) if len(shown) <= 6 else
                  ", ".join(shown[:3]) + ", ..., " + ", ".join(shown[-2:])) + "]"


def _class_name(scheduler: Any) -> str:
    if isinstance(scheduler, str):
        return scheduler
    return scheduler.__name__ if isinstance(scheduler, type) else type(scheduler).__name__


# -- the rules of a calibration's JSON fields --------------------------------------------------

def _check_fields(data: dict) -> None:
    """Raise ``ValueError`` naming the field and its value unless every field of ``data`` (a
    calibration's JSON) keeps its rule: a hand-edited file must not load as a calibration whose
    checks then pass by accident (a NaN compares false with anything)."""
    _check_cut(data["reuse"], data["branch"])
    _check_forecast(data["forecast"], data["forecast_in"], data["forecast_reach"])
    _check_steps(data["num_steps"], data["key_steps"], data["error_curve"])
    _check_sigmas(data["sigmas"], data["num_steps"])
    _check_numbers("weights", data["weights"])
    for name in ("scheduler", "model"):
        value = data[name]
        _require(isinstance(value, str) and value.strip() != "", name, value,
                 "a non-empty string")
    calls = data["num_inference_steps"]
    _require(calls is None or _count(calls, 1), "num_inference_steps", calls,
             "None (a bare UNet) or an int >= 1")
    _check_outcome(data)


def _require(ok: bool, field: str, value: Any, rule: str) -> None:
    """The one refusal: ``field`` must be ``rule``, and ``value`` is not."""
    if not ok:
        raise ValueError(f"not a valid calibration: {field} must be {rule}, got {value!r} "
                         "(calibrate again rather than edit the file)")


def _finite(value: Any) -> bool:
    """A finite number (a bool is not one)."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any, least: int) -> bool:
    """An int (not a bool) >= ``least``."""
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= least


def _check_numbers(field: str, values: Any, least: float = -math.inf) -> None:
    """``values`` a list of finite numbers, each >= ``least``."""
    _require(isinstance(values, (list, tuple)), field, values, "a list of finite numbers")
    rule = "a finite number" + ("" if least == -math.inf else f" >= {least:g}")
    for i, value in enumerate(values):
        _require(_finite(value) and value >= least, f"{field}[{i}]", value, rule)


def _either(names: Any) -> str:
    """``'"a" or "b"'``: the accepted names, as a rule says them (from their source)."""
    return " or ".join(f'"{name}"' for name in names)


def _check_cut(reuse: Any, branch: Any) -> None:
    """The cut: the encoder (no branch) or a deep branch."""
    _require(reuse in REUSE_MODES, "reuse", reuse, _either(REUSE_MODES))
    if reuse == "encoder":
        _require(branch is None, "branch", branch, 'None (null) for reuse "encoder"')
    else:
        _require(_count(branch, 0), "branch", branch, 'an int >= 0 for reuse "deep"')


def _check_forecast(order: Any, position: Any, reach: Any) -> None:
    """The frontier forecast: its order, what it extrapolates in, and how far."""
    _require(_count(order, 0) and order in FORECAST_ORDERS, "forecast", order,
             f"an int in {min(FORECAST_ORDERS)}..{max(FORECAST_ORDERS)} (its order)")
    _require(position in FORECAST_VARIABLES, "forecast_in", position,
             _either(FORECAST_VARIABLES))
    _require(reach is None or (_finite(reach) and reach > 0), "forecast_reach", reach,
             "a finite number > 0 or None (unbounded)")


def _check_steps(num_steps: Any, key_steps: Any, error_curve: Any) -> None:
    """``num_steps`` UNet calls, key steps among them from 0 on, and one error per step."""
    _require(_count(num_steps, 1), "num_steps", num_steps, "an int >= 1")
    _require(isinstance(key_steps, (list, tuple)) and all(_count(k, 0) for k in key_steps),
             "key_steps", key_steps, "a list of ints >= 0")
    _require(list(key_steps[:1]) == [0], "key_steps", key_steps,
             "a list starting at 0 (the first step is always computed)")
    _require(all(a < b for a, b in zip(key_steps, key_steps[1:])), "key_steps", key_steps,
             "strictly increasing")
    _require(key_steps[-1] < num_steps, "key_steps", key_steps,
             f"steps below num_steps = {num_steps}")
    _check_numbers("error_curve", error_curve, least=0)
    _require(len(error_curve) == num_steps, "len(error_curve)", len(error_curve),
             f"num_steps = {num_steps} (an entry per step)")


def _check_sigmas(sigmas: Any, num_steps: int) -> None:
    """No grid, or a run's: a sigma per step and the end, never rising."""
    _check_numbers("sigmas", sigmas)
    _require(len(sigmas) in (0, num_steps + 1), "len(sigmas)", len(sigmas),
             f"0 (any grid) or num_steps + 1 = {num_steps + 1} (the steps and the end)")
    for i in range(1, len(sigmas)):
        _require(sigmas[i] <= sigmas[i - 1], f"sigmas[{i}]", sigmas[i],
                 f"<= sigmas[{i - 1}] = {sigmas[i - 1]!r} (a grid does not rise)")


def _check_outcome(data: dict) -> None:
    """What it predicts and was chosen against: finite numbers, errors >= 0."""
    speedup, verified = data["predicted_speedup"], data["verified_error"]
    _require(_finite(speedup) and speedup > 0, "predicted_speedup", speedup,
             "a finite number > 0")
    _require(_finite(data["predicted_error"]) and data["predicted_error"] >= 0,
             "predicted_error", data["predicted_error"], "a finite number >= 0")
    _require(verified is None or (_finite(verified) and verified >= 0), "verified_error",
             verified, "None (not verified) or a finite number >= 0")
    verdict = data["verdict"]
    _require(verdict is None or (isinstance(verdict, dict) and _finite(verdict.get("samples"))
                                 and all(_finite(v) for v in verdict.get("interval_db") or [])),
             "verdict", verdict, "None or a dict with samples and a finite interval_db")
    budget, rows = data["budget"], data["alternatives"]
    _require(isinstance(budget, dict) and all(_finite(v) for v in budget.values()), "budget",
             budget, "a dict of finite numbers")
    _require(isinstance(rows, (list, tuple)) and all(
        isinstance(r, (list, tuple)) and len(r) == 5 and _finite(r[3]) and _finite(r[4])
        for r in rows), "alternatives", rows,
        "a list of (reuse, branch, forecast, speedup, error), speedup and error finite")
