"""Parallel encoder propagation in ComfyUI: the glue between ComfyUI's calls and the grid's
segment batching (:mod:`fxprop.runtime.gridparallel`).

What the every-step part of a captured call reads, the split says (``Parts.step_inputs``).
For ComfyUI's UNetModel it is the timestep and the text conditioning beside the frontier:
ControlNet's residuals are added to the skips before the decoder reads them, so they travel
with the frontier (taken at key steps, as in sequential mode). What changes every step is
known here: the latent, the call's sigma (``transformer_options["sigmas"]``, which a patch
may read) and ControlNet's residuals (computed from the latent). A part that reads one of them
runs sequentially.

Future steps' timesteps are ``model_sampling.timestep`` of their grid sigma, as ComfyUI's
``BaseModel`` makes them. The batched call is captured at ``L`` x the call's batch, with
``cond_or_uncond`` (kept only where patches may read it) repeated ``L`` times, as ``L``
calls of the same conditionings side by side; the cache keys it by the call's signature and
``L``. Inputs the captured graph does not read (the sigma, unless a patch reads it) keep
their shape, so the batch of ``L`` split calls shares the capture of a batched CFG call.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Collection

import torch
import torch.utils._pytree as pytree

from ...graph.cache import owned_cache
from ...graph.capture import TENSOR, FlatCall, capture, flatten_call
from ...runtime.gridparallel import GridSegments, TimestepOf
from ...runtime.parallel import check_batched, repeated_call
from .calls import CHUNK_OPTION, ComfyCall

__all__ = ["ComfyParallel", "comfy_timestep_of", "repeated_comfy_call"]


def comfy_timestep_of(sampling: Any) -> TimestepOf:
    """How ComfyUI's ``BaseModel`` makes the UNet's timesteps from sigmas."""
    return lambda sigmas: sampling.timestep(sigmas).float()


def repeated_comfy_call(forward: Callable, flat: FlatCall, times: int, t_index: int,
                        timesteps: torch.Tensor, unread: Collection[int] = ()) -> FlatCall:
    """``flat`` at ``times`` x its batch (:func:`~fxprop.runtime.parallel.repeated_call`), its
    ``cond_or_uncond`` repeated ``times`` times when the call carries it."""
    repeated = repeated_call(forward, flat, times, t_index, timesteps, unread)
    tensors = iter(repeated.tensors)
    leaves = [next(tensors) if leaf is TENSOR else leaf for leaf in repeated.template]
    arguments = pytree.tree_unflatten(leaves, repeated.spec)
    options = arguments.get("transformer_options") or {}
    if CHUNK_OPTION not in options:
        return repeated
    options[CHUNK_OPTION] = list(options[CHUNK_OPTION]) * times
    return flatten_call(forward, (), arguments)


class ComfyParallel(GridSegments):
    """:class:`~fxprop.runtime.gridparallel.GridSegments` for ComfyUI calls (a mixin of
    :class:`~fxprop.clients.comfyui.runner.ComfyRunner`)."""

    def _timestep_index(self, call: ComfyCall) -> int:
        name = list(inspect.signature(call.forward).parameters)[1]
        return call.flat.names.index(name)

    def _varying(self, call: ComfyCall) -> set[int]:
        """The latent, the call's sigma and ControlNet residuals (see the module docstring)."""
        names = call.flat.names
        return {0} | {i for i, x in enumerate(call.tensors)
                      if x is call.sigma or names[i].split("_")[0] == "control"}

    def _batched_grid_parts(self, gen: Any, call: ComfyCall, parts: Any, times: int,
                            timesteps: torch.Tensor) -> Any:
        """Parts of the UNet captured at ``times`` x the call's batch (cached with its graph)."""
        forward, flat = call.forward, call.flat
        unet = forward.__self__
        entry = owned_cache(unet).entry(gen.model_state, flat.key,
                                        lambda: capture(unet, flat, forward), owner=unet)
        options = getattr(self.follow_state(), "compile", None)

        def make() -> Any:
            read = {0, *parts.key_inputs, *parts.step_inputs}
            unread = [i for i in range(len(flat.tensors)) if i not in read]
            repeated = repeated_comfy_call(forward, flat, times, self._timestep_index(call),
                                           timesteps, unread)
            batched = self.parts_for(unet, forward, repeated, gen.model_state)[1]
            check_batched(parts, batched, 0, times)
            return batched

        return entry.get(("batched", self.policy.cut_id, repr(options), times), make)
