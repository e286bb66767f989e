"""Layer 5, the clients: the glue to the programs that call a UNet.

diffusers pipelines (:mod:`.pipelines`) and ComfyUI (:mod:`.comfyui`). Each is imported only
when it is used, and none of the layers below knows its name. k-diffusion samplers need no
glue of their own: :meth:`fxprop.AcceleratedUNet.set_sigmas` follows their sigma grid
(:mod:`fxprop.runtime.grid`).
"""
