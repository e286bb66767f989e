"""ComfyUI nodes (the classic node API: ``INPUT_TYPES``, ``RETURN_TYPES``, ``FUNCTION``,
``CATEGORY``): MODEL in, a patched clone out.

Key steps count the steps of each sampler run (KSampler's steps; KSamplerAdvanced's and
img2img's steps from the first one run): every ``interval``-th from the first is a key step
(or the optional ``key_steps``: a list, or a preset such as ``faster-diffusion``), and so is
every step outside ``start_percent`` .. ``end_percent`` of the sampling range.
Defaults are the settings measured best in fxprop's benchmarks (README, "Forecasting"):
interval 3 and a linear forecast of the cached features.
"""

from __future__ import annotations

from typing import Any

from ...plan.policies import make_policy
from .calibration_nodes import FxpropCalibrate, FxpropCalibrated
from .patch import patch_model
from .runner import ComfyRunner

__all__ = ["FxpropEncoderPropagation", "FxpropDeepCache", "NODE_CLASS_MAPPINGS",
           "NODE_DISPLAY_NAME_MAPPINGS"]

CATEGORY = "model_patches/fxprop"


def _common() -> dict:
    """Inputs both nodes take."""
    return {
        "interval": ("INT", {"default": 3, "min": 1, "max": 100,
                             "tooltip": "every N-th step of a run is a key step (1: all)"}),
        "forecast": ("INT", {"default": 1, "min": 0, "max": 2,
                             "tooltip": "0: reuse the cached features; 1: linear, 2: "
                                        "quadratic extrapolation through the last key steps"}),
        "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "every step before this point is a key step"}),
        "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "every step after this point is a key step"}),
    }


def _optional() -> dict:
    """Inputs both nodes may take."""
    return {"key_steps": ("STRING", {
        "default": "", "tooltip": "instead of interval: key steps as a list ('0,1,2,3,5,10') "
                                  "or a preset ('faster-diffusion'); empty: every interval-th"})}


def _key_steps(interval: int, text: str = "") -> Any:
    """``key_steps`` of a policy from the nodes' inputs: ``text`` (a comma-separated list of
    steps or a preset name) if given, else ``interval``."""
    text = text.strip()
    if not text:
        return interval
    if text[0].isdigit():
        try:
            return [int(step) for step in text.replace(" ", "").split(",") if step]
        except ValueError:
            raise ValueError(f"key_steps must be comma-separated step numbers (0,1,2,3,5,10) or "
                             f"a preset name, got {text!r}") from None
    return text


class _FxpropNode:
    """What both nodes share: MODEL in, a clone patched with a runner of the node's ``reuse``
    out; ``own`` are the node's own inputs, passed on as policy options."""

    reuse: str
    own: dict
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model": ("MODEL",), **_common(), **cls.own},
                "optional": _optional()}

    def patch(self, model: Any, interval: int, forecast: int, start_percent: float,
              end_percent: float, key_steps: str = "", **own: Any) -> tuple:
        policy = make_policy(self.reuse, key_steps=_key_steps(interval, key_steps),
                             forecast=forecast, **own)
        return (patch_model(model, ComfyRunner(policy, start_percent, end_percent)),)


class FxpropEncoderPropagation(_FxpropNode):
    """Faster Diffusion's encoder propagation: the encoder runs at key steps only, the decoder
    every step on the cached skip features."""

    reuse = "encoder"
    own = {"prior_noise": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.1, "step": 0.001,
                                     "tooltip": "weight of the initial noise added to the UNet "
                                                "input at steps with t < T/2 (paper: 0.003)"}),
           "parallel": ("BOOLEAN", {"default": False,
                                    "tooltip": "run the decoder of a segment's steps as one "
                                               "batched call (same output; faster where a "
                                               "batch is cheaper than its calls)"})}
    DESCRIPTION = "fxprop: encoder propagation (Faster Diffusion) as a cut of the captured UNet."


class FxpropDeepCache(_FxpropNode):
    """DeepCache's deep-feature caching: the whole UNet at key steps, only the shallow branch
    on the cached deep feature at the others."""

    reuse = "deep"
    own = {"branch": ("INT", {"default": 0, "min": 0, "max": 11,
                              "tooltip": "the skip connection whose deep feature is cached "
                                         "(0: the shallowest, fastest)"})}
    DESCRIPTION = "fxprop: deep-feature caching (DeepCache) as a cut of the captured UNet."


NODE_CLASS_MAPPINGS = {"FxpropEncoderPropagation": FxpropEncoderPropagation,
                       "FxpropDeepCache": FxpropDeepCache,
                       "FxpropCalibrate": FxpropCalibrate,
                       "FxpropCalibrated": FxpropCalibrated}
NODE_DISPLAY_NAME_MAPPINGS = {"FxpropEncoderPropagation": "fxprop Encoder Propagation",
                              "FxpropDeepCache": "fxprop DeepCache",
                              "FxpropCalibrate": "fxprop Calibrate",
                              "FxpropCalibrated": "fxprop Calibrated Schedule"}
