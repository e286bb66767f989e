"""fxprop: training-free acceleration of diffusion UNets as torch.fx graph transformations."""

from .api import accelerate, restore
from .attach import runtime_of
from .calibrate import calibrate
from .calibration import Calibration
from .compile import CompileOptions
from .config import DeepCache, EncoderPropagation, Policy
from .deep import branches
from .export import LoadedUNet, export, load
from .fingerprint import fingerprint
from .forecast import signal_levels
from .plan import Plan, Segment, make_plan
from .runtime import AcceleratedUNet
from .schedules import (PRESETS, deepcache_nonuniform, every, faster_diffusion,
                        key_step_schedule)

__all__ = ["accelerate", "restore", "AcceleratedUNet", "EncoderPropagation", "DeepCache", "Policy",
           "branches", "Plan",
           "Segment", "make_plan", "PRESETS", "every", "faster_diffusion", "deepcache_nonuniform",
           "key_step_schedule", "CompileOptions", "export", "load",
           "LoadedUNet", "signal_levels", "fingerprint", "runtime_of", "calibrate", "Calibration"]
__version__ = "0.1.0"
