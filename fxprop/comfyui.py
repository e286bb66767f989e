"""ComfyUI's entry point to fxprop: the node mappings a custom-node folder exports, and
calibration from Python.

Install in ComfyUI (with fxprop installed in ComfyUI's Python): a file
``custom_nodes/fxprop_nodes.py`` holding the line
``from fxprop.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS``. The code lives
in :mod:`fxprop.clients.comfyui`; ComfyUI itself is imported only when a node lists its inputs
or runs, so this module imports without it.
"""

from .clients.comfyui.calibrate import ComfySampling, calibrate_comfy
from .clients.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "ComfySampling", "calibrate_comfy"]
