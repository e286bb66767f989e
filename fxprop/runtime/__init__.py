"""Layer 3, running a plan: a sampler's UNet calls followed step by step.

One generation's state (:mod:`.generation`) and the step function that follows a plan
(:mod:`.follow`), sigma grids (:mod:`.grid`), the runtime module
(:mod:`.accelerated`, :class:`~fxprop.AcceleratedUNet`), the interception of the user's UNet
(:mod:`.intercept`), plain copies (:mod:`.copying`), parallel mode and torch.distributed
(:mod:`.parallel`, :mod:`.distributed`), compile (:mod:`.compile`), export (:mod:`.export`)
and where a client keeps its adapter (:mod:`.attach`). Imports only the layers below.
"""
