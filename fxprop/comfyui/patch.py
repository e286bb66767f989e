"""Put a :class:`~fxprop.comfyui.runner.ComfyRunner` on a clone of a ComfyUI ``ModelPatcher``.

The clone gets two wrappers under one key (:data:`KEY`): ``OUTER_SAMPLE`` per sampler run and
``DIFFUSION_MODEL`` per UNet call. A later fxprop node on the same model path replaces the
earlier one's wrappers (two cuts of one UNet do not nest). The wrappers are plain closures over
the runner: ComfyUI deep-copies ``model_options`` (and, in some versions, the wrappers with
them), and a closure is copied as itself, so every clone shares the runner and no runtime state
is copied. What cannot be accelerated is refused in ComfyUI's log and the model comes back as
it was.
"""

from __future__ import annotations

import logging
from typing import Any

from .runner import ComfyRunner

__all__ = ["KEY", "patch_model", "refusal"]

LOG = logging.getLogger("fxprop.comfyui")
#: The wrapper key of fxprop's wrappers on a ModelPatcher.
KEY = "fxprop"


def refusal(model: Any) -> str | None:
    """Why fxprop cannot accelerate ComfyUI ``model`` (a ModelPatcher), or None."""
    if not hasattr(model, "add_wrapper_with_key"):
        return ("this ComfyUI has no model wrappers (ModelPatcher.add_wrapper_with_key, "
                "ComfyUI 0.3.10 and later); update ComfyUI")
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
        return model
    from comfy.patcher_extension import WrappersMP  # ComfyUI's, present when the API is

    def outer_sample(executor: Any, *args: Any, **kwargs: Any) -> Any:
        return runner.outer_sample(executor, *args, **kwargs)

    def diffusion_model(executor: Any, *args: Any, **kwargs: Any) -> Any:
        return runner.diffusion_model(executor, *args, **kwargs)

    patched = model.clone()
    for kind, wrapper in ((WrappersMP.OUTER_SAMPLE, outer_sample),
                          (WrappersMP.DIFFUSION_MODEL, diffusion_model)):
        patched.remove_wrappers_with_key(kind, KEY)
        patched.add_wrapper_with_key(kind, KEY, wrapper)
    return patched
