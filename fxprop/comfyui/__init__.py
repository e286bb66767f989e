"""fxprop's ComfyUI nodes: encoder propagation, deep-feature caching and calibrated schedules
for ComfyUI's UNets.

Install in ComfyUI (with fxprop installed in ComfyUI's Python): a file
``custom_nodes/fxprop_nodes.py`` holding the line
``from fxprop.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS``. ComfyUI itself is
imported only when a node lists its inputs or runs, so this package imports without it.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
