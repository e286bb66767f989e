"""The public entry points: :func:`accelerate` and :func:`restore`."""

from __future__ import annotations

from typing import Any

from torch import nn

from .calibration.data import Calibration
from .clients.pipelines import accelerate_pipeline, is_pipeline, restore_pipeline
from .plan.policies import make_policy
from .runtime.accelerated import AcceleratedUNet
from .runtime.compile import compile_options

__all__ = ["accelerate", "restore"]


def accelerate(target: Any, key_steps: Any = None, *, reuse: str = "encoder",
               prior_noise: float | None = None, parallel: bool | None = None,
               max_batch: int | None = None, compile: Any = False, **options: Any) -> Any:
    """Make a UNet or a diffusers pipeline reuse features across sampling steps.

    Args:
        target: a diffusers pipeline with a ``unet`` (returned, accelerated in place: its UNet
            stays the same module, intercepted), or a UNet ``nn.Module`` (an
            :class:`AcceleratedUNet` of it is returned, for hand-written loops).
        key_steps: steps where the cut part runs: a preset name (``"faster-diffusion"``), an
            interval ``N`` (every N-th step from 0) or a sorted list of steps containing 0.
            ``None`` takes the policy's default. A :class:`~fxprop.Calibration` (from
            :func:`fxprop.calibrate`) sets the cut, forecast and key steps it chose; it
            raises ``ValueError`` for another model or scheduler class now, and for a
            generation of another step count then.
        reuse: ``"encoder"`` (encoder propagation, Faster Diffusion; see
            :class:`~fxprop.EncoderPropagation`) or ``"deep"`` (deep-feature caching, DeepCache;
            see :class:`~fxprop.DeepCache`).
        prior_noise: weight of prior noise injection (``None``: the policy's default, 0.003 for
            ``"encoder"``, 0 for ``"deep"``), a finite number >= 0. Pipelines apply it in
            their scheduler's units (:mod:`fxprop.plan.prior`); with schedulers where it is not
            defined (no ``alphas_cumprod``: EDM) the default is off and an explicit weight
            raises. For a bare UNet it is part of the plan (``plan.inject``) and your loop
            adds it.
        parallel, max_batch: parallel mode of encoder propagation.
        options: further policy fields, e.g. ``branch=`` for ``reuse="deep"`` (DeepCache's
            ``cache_branch_id``), or in parallel mode ``group=`` (a ``torch.distributed``
            process group whose ranks share each segment's steps; every rank runs the same
            call) and ``cfg_parallel=True`` (two ranks split CFG's halves); see
            :mod:`fxprop.runtime.distributed`.
        compile: ``True``, a dict of ``torch.compile`` options (``backend``, ``mode``,
            ``dynamic``, ``options``) or :class:`~fxprop.CompileOptions`: compile every part
            with ``torch.compile(fullgraph=True)`` when it is first captured (once per input
            signature; later generations reuse it).

    Raises:
        TypeError: ``target`` is neither a UNet module nor a pipeline with one.
        ValueError: an option breaks its rule; the UNet's regions cannot be found; the UNet
            cannot be run correctly as a captured graph (hooks on its submodules, such as
            sequential CPU offload; a ``torch.compile``'d module: pass the module it wraps
            and ``compile=True``).
    """
    if isinstance(key_steps, Calibration):  # its cut, order and key steps, checked
        calibrated = key_steps.policy_options(target)
        reuse, key_steps = calibrated.pop("reuse"), calibrated.pop("key_steps")
        prior_noise = calibrated.pop("prior_noise") if prior_noise is None else prior_noise
        options = {**calibrated, **options}
    policy = make_policy(reuse, key_steps=key_steps, prior_noise=prior_noise,
                         parallel=parallel, max_batch=max_batch, **options)
    compile_options(compile)  # validate before touching the target
    if is_pipeline(target):
        return accelerate_pipeline(target, policy, explicit_prior_noise=prior_noise is not None,
                                   compile=compile)
    if isinstance(target, nn.Module):
        return AcceleratedUNet(target, policy, compile=compile)
    raise TypeError(f"fxprop.accelerate takes a UNet (nn.Module) or a diffusers pipeline "
                    f"with a .unet, got {type(target).__name__}")


def restore(target: Any) -> Any:
    """Undo :func:`accelerate`: the pipeline with its original UNet, or the bare UNet."""
    if isinstance(target, AcceleratedUNet):
        target.release()
        return target.unet
    if is_pipeline(target):
        return restore_pipeline(target)
    raise ValueError(f"{type(target).__name__} was not accelerated by fxprop; "
                     "nothing to restore")
