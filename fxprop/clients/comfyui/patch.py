"""Put a :class:`~fxprop.clients.comfyui.runner.ComfyRunner` on a clone of a ComfyUI
``ModelPatcher``.

The clone gets three wrappers under one key (:data:`KEY`): ``OUTER_SAMPLE`` per sampler run,
``CALC_COND_BATCH`` per model evaluation (ControlNets at key steps only:
:mod:`fxprop.clients.comfyui.control`) and ``DIFFUSION_MODEL`` per UNet call. A later fxprop node on the same model path replaces the
earlier one's wrappers (two cuts of one UNet do not nest). The wrappers are plain closures over
the runner: ComfyUI deep-copies ``model_options`` (and, in some versions, the wrappers with
them), and a closure is copied as itself, so every clone shares the runner and no runtime state
is copied. What cannot be accelerated is refused in ComfyUI's log and the model comes back as
it was.

A ComfyUI without the wrapper API (before December 2024) is refused, not served through its
older ``ModelPatcher.set_model_unet_function_wrapper``: that slot wraps single model calls, and
nothing in such a ComfyUI tells the model the run's sigma grid, where a run starts and ends, or
which conditioning entries a call computes (its sampler gives each call its sigma and whether
it batches cond or uncond; the grid, ``sample_sigmas``, and the entries, ``uuids``, came with
the wrapper API). A grid guessed from the calls would misplace the midpoint calls of DPM2 or
DPM++ SDE, and two prompts run as separate calls of one shape would share a frontier.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from .control import calc_cond_batch
from .runner import ComfyRunner

__all__ = ["KEY", "patch_model", "refusal"]

LOG = logging.getLogger("fxprop.comfyui")
#: The wrapper key of fxprop's wrappers on a ModelPatcher.
KEY = "fxprop"


def refusal(model: Any) -> str | None:
    """Why fxprop cannot accelerate ComfyUI ``model`` (a ModelPatcher), or None."""
    if not hasattr(model, "add_wrapper_with_key"):
        return ("this ComfyUI has no model wrappers (ModelPatcher.add_wrapper_with_key, in "
                "ComfyUI since its ModelPatcher overhaul of December 2024): its sampler tells "
                "the model each call's sigma but neither the run's sigma grid nor where a run "
                "starts and ends, which fxprop plans by; update ComfyUI")
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if type(unet).__name__ != "UNetModel" or not hasattr(unet, "_forward"):
        return (f"fxprop accelerates ComfyUI's UNetModel (SD 1.x/2.x, SDXL and their "
                f"relatives), not {type(unet).__name__}")
    return None


def patch_model(model: Any, runner: ComfyRunner) -> Any:
    """A clone of ``model`` whose sampler runs follow ``runner``'s plans (``model`` itself,
    unchanged, if fxprop refuses it: see :func:`refusal`)."""
    reason = refusal(model)
    if reason is not None:
        LOG.warning("fxprop: %s; the model runs as it was", reason)
        warnings.warn(f"fxprop: {reason}; the model runs as it was (correct, not accelerated)",
                      stacklevel=2)
        return model
    from comfy.patcher_extension import WrappersMP  # ComfyUI's, present when the API is

    def outer_sample(executor: Any, *args: Any, **kwargs: Any) -> Any:
        return runner.outer_sample(executor, *args, **kwargs)

    @torch.compiler.disable  # TorchCompileModel's dynamo must not trace fxprop's runtime
    def diffusion_model(executor: Any, *args: Any, **kwargs: Any) -> Any:
        return runner.diffusion_model(executor, *args, **kwargs)

    def control(executor: Any, *args: Any, **kwargs: Any) -> Any:
        return calc_cond_batch(runner, executor, *args, **kwargs)

    patched = model.clone()
    for kind, wrapper in ((WrappersMP.OUTER_SAMPLE, outer_sample),
                          (WrappersMP.CALC_COND_BATCH, control),
                          (WrappersMP.DIFFUSION_MODEL, diffusion_model)):
        patched.remove_wrappers_with_key(kind, KEY)
        patched.add_wrapper_with_key(kind, KEY, wrapper)
    return patched
