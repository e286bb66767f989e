"""fxprop: training-free acceleration of diffusion UNets as torch.fx graph transformations."""

from .api import accelerate, restore
from .config import EncoderPropagation
from .plan import Plan, Segment, make_plan
from .runtime import AcceleratedUNet
from .schedules import PRESETS, every, faster_diffusion, key_step_schedule

__all__ = ["accelerate", "restore", "AcceleratedUNet", "EncoderPropagation", "Plan", "Segment",
           "make_plan", "PRESETS", "every", "faster_diffusion", "key_step_schedule"]
__version__ = "0.1.0"
