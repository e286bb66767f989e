"""fxprop as a ComfyUI custom-node folder: this repository cloned into ``ComfyUI/custom_nodes``
(ComfyUI-Manager's "Install via Git URL", or a ``git clone`` there). ComfyUI imports this file
and reads the node mappings; the package itself is the ``fxprop/`` folder beside it, imported
under its own name (an fxprop already imported, e.g. pip-installed, is used as it is), so its
modules are the same whichever way fxprop was installed. Nothing else of the repository is put
on ``sys.path``."""

import importlib.util
import os
import sys


def _fxprop_comfyui():
    """``fxprop.comfyui``, loading the package from the folder beside this file if needed."""
    if "fxprop" not in sys.modules:
        folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fxprop")
        spec = importlib.util.spec_from_file_location(
            "fxprop", os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules["fxprop"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["fxprop"]
            raise
    return importlib.import_module("fxprop.comfyui")


_nodes = _fxprop_comfyui()
NODE_CLASS_MAPPINGS = _nodes.NODE_CLASS_MAPPINGS
NODE_DISPLAY_NAME_MAPPINGS = _nodes.NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
