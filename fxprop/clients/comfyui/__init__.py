"""fxprop inside ComfyUI: the nodes (encoder propagation, deep-feature caching, calibrated
schedules), the runner they register as ModelPatcher wrappers, and ComfyUI's calibration source.

ComfyUI itself is imported only when a node lists its inputs or runs, so this package imports
without it. ComfyUI loads the nodes through :mod:`fxprop.comfyui`.
"""
