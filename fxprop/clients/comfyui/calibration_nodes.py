"""ComfyUI nodes for calibrated schedules: measure one (``FxpropCalibrate``) and follow a saved
one (``FxpropCalibrated``).

Calibrating runs plain KSampler generations of the model (``runs`` seeds from ``seed``), a few
replays of them, the candidate cuts on their recorded steps and the finalists on another seed:
once, as ComfyUI caches the node's result until an input changes. The
calibration is saved as JSON in ComfyUI's output directory (a path relative to it, or absolute
within it: both nodes refuse one that resolves outside, as ComfyUI's save nodes do) and holds
for that model and weights, sampler and sigma grid (scheduler, steps, denoise) only: a run with
another raises ``ValueError`` (see :mod:`fxprop.clients.comfyui.calibrated`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ...calibration.data import Calibration
from .calibrate import ComfySampling, calibrate_comfy
from .calibrated import CalibratedRunner
from .patch import patch_model

__all__ = ["FxpropCalibrate", "FxpropCalibrated", "calibration_path"]

LOG = logging.getLogger("fxprop.comfyui")
CATEGORY = "model_patches/fxprop"
DEFAULT_FILE = "fxprop/calibration.json"
#: Held-out generations per run the Calibrate node judges finalists on: 2 runs of a batch of 1
#: give the 8 paired samples a significant difference needs (fxprop.calibration.significance).
HELD_OUT = 4


def calibration_path(name: str) -> Path:
    """Where calibration file ``name`` is: relative to ComfyUI's output directory, or absolute
    within it. ``ValueError`` if it resolves (``..`` and symlinks followed) outside it: a
    workflow must not write or read files elsewhere, as ComfyUI's own save nodes refuse."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a calibration file name is needed, got {name!r}")
    import folder_paths  # ComfyUI's

    root = Path(folder_paths.get_output_directory()).resolve()
    path = (root / Path(name.strip()).expanduser()).resolve()
    if root not in path.parents:
        raise ValueError(f"calibration file {name!r} is {path}, not a file inside ComfyUI's "
                         f"output directory {root}: give a path relative to it, or absolute "
                         "within it (no '..' or symlink out of it)")
    return path


class FxpropCalibrate:
    """Measure which cut, forecast and key steps reach ``target_speedup`` with the least error
    on this model and sampling, save that calibration and return the model patched with it."""

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "summary")
    FUNCTION = "calibrate"
    CATEGORY = CATEGORY
    DESCRIPTION = ("fxprop: calibrate a schedule on plain runs of this model and sampler "
                   "(it takes as long as a few dozen plain generations; ComfyUI runs it again "
                   "only when an input changes)")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        import comfy.samplers

        return {"required": {
            "model": ("MODEL",), "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff}),
            "runs": ("INT", {"default": 2, "min": 1, "max": 16,
                             "tooltip": "plain generations measured (seeds seed, seed+1, ...)"}),
            "steps": ("INT", {"default": 20, "min": 2, "max": 10000}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS,),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS,),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            "target_speedup": ("FLOAT", {"default": 2.0, "min": 1.05, "max": 10.0, "step": 0.05,
                                         "tooltip": "FLOP-ideal speedup over plain sampling"}),
            "filename": ("STRING", {"default": DEFAULT_FILE, "tooltip": (
                "where to save it: a path in ComfyUI's output directory (relative to it, or "
                "absolute within it)")}),
        }, "optional": {
            "held_out": ("INT", {"default": HELD_OUT, "min": 1, "max": 64, "tooltip": (
                "generations per run on other seeds that the finalists are judged on; a "
                "fitted schedule replaces the hand-set one only where they show it better at "
                "95% confidence, which needs 8 or more samples (runs x held_out x batch)")}),
        }}

    def calibrate(self, model: Any, positive: Any, negative: Any, latent_image: dict,
                  seed: int, runs: int, steps: int, cfg: float, sampler_name: str,
                  scheduler: str, denoise: float, target_speedup: float,
                  filename: str, held_out: int = HELD_OUT) -> tuple:
        path = calibration_path(filename)  # refused before the long measurement
        sampling = ComfySampling(positive, negative, latent_image, steps, cfg, sampler_name,
                                 scheduler, denoise)
        seeds = [(seed + i) % 2 ** 64 for i in range(runs)]
        calibration = calibrate_comfy(model, sampling, seeds, target_speedup=target_speedup,
                                      held_out=held_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        calibration.save(path)
        LOG.info("fxprop: saved the calibration to %s\n%s", path, calibration)
        return patch_model(model, CalibratedRunner(calibration)), str(calibration)


class FxpropCalibrated:
    """Follow a saved calibration (from ``FxpropCalibrate``): MODEL in, a patched clone out."""

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY
    DESCRIPTION = ("fxprop: the schedule of a saved calibration, for the model, sampler and "
                   "sigmas it was calibrated on")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model": ("MODEL",), "calibration": ("STRING", {
            "default": DEFAULT_FILE,
            "tooltip": ("a calibration JSON file in ComfyUI's output directory (relative to it, "
                        "or absolute within it)")})}}

    def patch(self, model: Any, calibration: str) -> tuple:
        loaded = Calibration.load(calibration_path(calibration))
        return (patch_model(model, CalibratedRunner(loaded)),)
