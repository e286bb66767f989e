"""Calibration inside ComfyUI: :func:`fxprop.calibrate`'s measurement on plain KSampler runs.

A calibration call is a seed: ``comfy.sample.sample`` runs from that seed's noise, as KSampler
does, with the prompts, latent, steps, CFG, sampler, scheduler and denoise of a
:class:`ComfySampling`; the latent it returns is the final sample. The calibration is for that
sampler (named by its sampling function, :func:`sampler_name`) and that sigma grid, and for the
model's weights as they ran (LoRA patched in). Its key steps count grid steps, so the sampler
must call the model once a step with cond and uncond in one batch (euler, euler_ancestral,
dpmpp_2m, ddim, lms, uni_pc ...; not heun or dpm_2, which call it twice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ...calibration.calibrate import calibrate
from ...calibration.data import Calibration
from ...calibration.sources import Source
from ...graph.fingerprint import weights_digest
from ...plan.forecast import sigma_signal
from .calls import attention_patches, comfy_call
from .patch import KEY, refusal
from .runner import lowvram_reason

__all__ = ["ComfySampling", "calibrate_comfy", "comfy_source", "sampler_name", "other_seed"]

#: Why a ComfyUI calibration needs one model call per grid step.
ONE_CALL = ("a ComfyUI calibration counts grid steps, so the sampler must call the model once a "
            "step with cond and uncond batched (euler, dpmpp_2m, ddim, uni_pc ...; not heun, "
            "dpm_2 or dpmpp_sde, nor ComfyUI splitting cond and uncond when memory is short)")


@dataclass(frozen=True)
class ComfySampling:
    """What every calibration run samples with: KSampler's inputs but the seed (``latent``:
    a LATENT dict, ``{"samples": tensor, ...}``)."""

    positive: Any
    negative: Any
    latent: dict
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    denoise: float = 1.0


def sampler_name(sampler: Any) -> str:
    """How a calibration names a ComfyUI sampler object (what an ``OUTER_SAMPLE`` wrapper
    receives): ``"ComfyUI <its sampling function>"``, e.g. ``"ComfyUI sample_euler"``."""
    function = getattr(sampler, "sampler_function", None)
    return f"ComfyUI {getattr(function, '__name__', None) or type(sampler).__name__}"


def check_seed(seed: Any) -> int:
    """``seed`` if it is an int (a ComfyUI calibration's calls are seeds), else ``TypeError``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"calls of a ComfyUI calibration are seeds (ints), got {seed!r}")
    return seed


def other_seed(seed: int) -> int:
    """A seed drawn from ``seed``: the same run on other noise (for verification)."""
    check_seed(seed)
    return int(torch.randint(2 ** 62, (1,), generator=torch.Generator().manual_seed(seed)))


def check_plain(model: Any) -> None:
    """Raise ``ValueError`` if fxprop cannot run ``model`` (a ModelPatcher: see
    :func:`~fxprop.clients.comfyui.patch.refusal`) or it does not sample as its captured UNet would:
    patched by fxprop, or with other nodes' diffusion-model wrappers or attention patches (a
    captured graph would skip them)."""
    reason = refusal(model)
    if reason is not None:
        raise ValueError(f"cannot calibrate: {reason}")
    from comfy.patcher_extension import WrappersMP

    if model.get_wrappers(WrappersMP.OUTER_SAMPLE, KEY):
        raise ValueError("calibration measures plain sampling, and this model is patched by an "
                         "fxprop node: connect the model from before that node")
    beneath = model.get_all_wrappers(WrappersMP.DIFFUSION_MODEL)
    patches = attention_patches(model.model_options.get("transformer_options", {}))
    if beneath or patches:
        raise ValueError(f"this model runs other nodes' wrappers or attention patches "
                         f"({(beneath + patches)[:3]}), which fxprop's captured graphs would "
                         "skip: calibrate and accelerate the model before those nodes")


def comfy_source(model: Any, sampling: ComfySampling) -> Source:
    """The :class:`~fxprop.calibration.sources.Source` of plain KSampler runs of ``model``; its
    calls are seeds."""
    import comfy.samplers

    check_plain(model)
    unet = model.model.diffusion_model
    sigmas = comfy.samplers.KSampler(
        model, steps=sampling.steps, device=model.load_device, sampler=sampling.sampler_name,
        scheduler=sampling.scheduler, denoise=sampling.denoise,
        model_options=model.model_options).sigmas
    grid = tuple(float(s) for s in sigmas.float().cpu())
    digest: list[tuple] = []

    def on_step(*_: Any) -> None:
        """ComfyUI's step callback: the model is loaded (and LoRA patched in) by now."""
        if not digest:
            reason = lowvram_reason(unet, model.model)
            if reason is not None:
                raise ValueError(f"cannot calibrate: {reason}")
            digest.append(weights_digest(unet))

    forward = type(unet).forward.__get__(unet)  # calls stripped of wrappers: the UNet itself
    return Source(
        unet, None, _runs(model, sampling, on_step),
        sampler_name(comfy.samplers.sampler_object(sampling.sampler_name)), other=other_seed,
        forward=forward, flatten=lambda args, kwargs: comfy_call(forward, args, kwargs).flat,
        positions=lambda n: {"step": [float(i) for i in range(n)],
                             "signal": sigma_signal(grid[:n])},
        calls_per_run=len(grid) - 1, why=ONE_CALL, sigmas=grid,
        digest=lambda: digest[0] if digest else weights_digest(unet),
        num_inference_steps=sampling.steps)


def _runs(model: Any, sampling: ComfySampling, callback: Any) -> Any:
    """``make_run(seed)`` of :func:`comfy_source`: KSampler's noise for the seed, then
    ``comfy.sample.sample``."""
    import comfy.sample

    latent = comfy.sample.fix_empty_latent_channels(model, sampling.latent["samples"])

    def make_run(seed: Any) -> Any:
        noise = comfy.sample.prepare_noise(latent, check_seed(seed),
                                           sampling.latent.get("batch_index"))
        return lambda: comfy.sample.sample(
            model, noise, sampling.steps, sampling.cfg, sampling.sampler_name,
            sampling.scheduler, sampling.positive, sampling.negative, latent,
            denoise=sampling.denoise, noise_mask=sampling.latent.get("noise_mask"),
            callback=callback, disable_pbar=True, seed=seed)
    return make_run


def calibrate_comfy(model: Any, sampling: ComfySampling, seeds: Sequence[int], *,
                    target_speedup: float | None = None, max_error: float | None = None,
                    verify: int = 4, **settings: Any) -> Calibration:
    """Calibrate ComfyUI ``model`` (a ModelPatcher) on plain runs of ``sampling`` from
    ``seeds``: :func:`fxprop.calibrate` with its budget (``target_speedup`` or ``max_error``),
    ``verify`` and measurement ``settings`` (``probes``, ``max_interval``, ``orders`` ...)."""
    if not isinstance(seeds, (list, tuple)) or not seeds:
        raise ValueError(f"seeds must be a non-empty list of ints, got {seeds!r}")
    return calibrate(comfy_source(model, sampling), list(seeds), target_speedup=target_speedup,
                     max_error=max_error, verify=verify, **settings)
