"""fxprop: training-free acceleration of diffusion UNets as torch.fx graph transformations."""

from .api import accelerate, restore
from .calibration.calibrate import calibrate
from .calibration.data import Calibration
from .graph.deep import branches
from .graph.fingerprint import fingerprint
from .plan.forecast import signal_levels
from .plan.plans import Plan, Segment, make_plan
from .plan.policies import DeepCache, EncoderPropagation, Policy
from .plan.schedules import (PRESETS, deepcache_nonuniform, every, faster_diffusion,
                             key_step_schedule)
from .runtime.accelerated import AcceleratedUNet
from .runtime.attach import runtime_of
from .runtime.compile import CompileOptions
from .runtime.export import LoadedUNet, export, load

__all__ = ["accelerate", "restore", "AcceleratedUNet", "EncoderPropagation", "DeepCache", "Policy",
           "branches", "Plan",
           "Segment", "make_plan", "PRESETS", "every", "faster_diffusion", "deepcache_nonuniform",
           "key_step_schedule", "CompileOptions", "export", "load",
           "LoadedUNet", "signal_levels", "fingerprint", "runtime_of", "calibrate", "Calibration"]
__version__ = "0.1.0"
