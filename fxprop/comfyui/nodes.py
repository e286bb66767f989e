"""ComfyUI nodes (the classic node API: ``INPUT_TYPES``, ``RETURN_TYPES``, ``FUNCTION``,
``CATEGORY``): MODEL in, a patched clone out.

Key steps count the steps of each sampler run (KSampler's steps; KSamplerAdvanced's and
img2img's steps from the first one run): every ``interval``-th from the first is a key step,
and so is every step outside ``start_percent`` .. ``end_percent`` of the sampling range.
Defaults are the settings measured best in fxprop's benchmarks (README, "Forecasting"):
interval 3 and a linear forecast of the cached features.
"""

from __future__ import annotations

from typing import Any

from ..config import make_policy
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


def _patch(model: Any, reuse: str, interval: int, start_percent: float, end_percent: float,
           **options: Any) -> tuple:
    policy = make_policy(reuse, key_steps=interval, **options)
    return (patch_model(model, ComfyRunner(policy, start_percent, end_percent)),)


class FxpropEncoderPropagation:
    """Faster Diffusion's encoder propagation: the encoder runs at key steps only, the decoder
    every step on the cached skip features."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL",), **_common(),
            "prior_noise": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.1, "step": 0.001,
                                      "tooltip": "weight of the initial noise added to the UNet"
                                                 " input at steps with t < T/2 (paper: 0.003)"}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY
    DESCRIPTION = "fxprop: encoder propagation (Faster Diffusion) as a cut of the captured UNet."

    def patch(self, model: Any, interval: int, forecast: int, start_percent: float,
              end_percent: float, prior_noise: float) -> tuple:
        return _patch(model, "encoder", interval, start_percent, end_percent,
                      forecast=forecast, prior_noise=prior_noise)


class FxpropDeepCache:
    """DeepCache's deep-feature caching: the whole UNet at key steps, only the shallow branch
    on the cached deep feature at the others."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL",), **_common(),
            "branch": ("INT", {"default": 0, "min": 0, "max": 11,
                               "tooltip": "the skip connection whose deep feature is cached "
                                          "(0: the shallowest, fastest)"}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY
    DESCRIPTION = "fxprop: deep-feature caching (DeepCache) as a cut of the captured UNet."

    def patch(self, model: Any, interval: int, forecast: int, start_percent: float,
              end_percent: float, branch: int) -> tuple:
        return _patch(model, "deep", interval, start_percent, end_percent,
                      forecast=forecast, branch=branch)


NODE_CLASS_MAPPINGS = {"FxpropEncoderPropagation": FxpropEncoderPropagation,
                       "FxpropDeepCache": FxpropDeepCache}
NODE_DISPLAY_NAME_MAPPINGS = {"FxpropEncoderPropagation": "fxprop Encoder Propagation",
                              "FxpropDeepCache": "fxprop DeepCache"}
