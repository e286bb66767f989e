"""A ComfyUI runner that follows a saved calibration, only where it was calibrated.

The calibration's cut, forecast and key steps make the policy; every run must be the one it
was measured on: the same sampler and sigma grid (checked when the run starts) and the same
model and weights as loaded for the run (checked at its first planned call, after ComfyUI has
patched LoRA weights in). Anything else raises ``ValueError``, which ComfyUI shows as the
node's error: a calibrated schedule on another grid or model is not what was measured.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...calibration.data import Calibration
from ...plan.policies import make_policy
from ...runtime.grid import host_floats
from .calibrate import sampler_name
from .runner import ComfyRunner

__all__ = ["CalibratedRunner"]


class CalibratedRunner(ComfyRunner):
    """:class:`~fxprop.clients.comfyui.runner.ComfyRunner` of a :class:`~fxprop.Calibration` made in
    ComfyUI (:func:`fxprop.clients.comfyui.calibrate.calibrate_comfy`)."""

    def __init__(self, calibration: Calibration, compile: Any = None) -> None:
        if not isinstance(calibration, Calibration):
            raise TypeError(f"calibration must be an fxprop Calibration, got "
                            f"{type(calibration).__name__}")
        if not calibration.sigmas:
            raise ValueError(f"this calibration was made for {calibration.scheduler}, not in "
                             "ComfyUI (it names no sigma grid): calibrate with fxprop's "
                             "calibrate node")
        options = calibration.accelerate_options(calibration.num_steps, calibration.scheduler)
        super().__init__(make_policy(**options), compile=compile)
        self.calibration = calibration

    def outer_sample(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        """Check the run's sampler and sigmas against the calibration, then run it planned."""
        sampler = args[2] if len(args) > 2 else kwargs["sampler"]
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        self.calibration.check_grid(sampler_name(sampler), host_floats(sigmas))
        return super().outer_sample(executor, *args, **kwargs)

    def check_model(self, unet: nn.Module) -> None:
        self.calibration.check_model(unet)
