"""A ComfyUI diffusion-model call as fxprop's runtime sees it: what keys its capture, what keys
its frontiers, which sigma it carries, and the forward it calls.

ComfyUI calls ``diffusion_model(x, timesteps, context=, y=, control=, transformer_options=,
**kwargs)``. ``transformer_options`` holds, beside what the UNet reads (``patches``,
``patches_replace`` ...), values that change every run and that the UNet never reads: a fresh
``uuids`` per run, the run's ``sample_sigmas`` (shaped by its step count) and the wrappers
themselves. Left in, each would make a new capture every run, so they are dropped from the call
fxprop captures and runs (the original call, for fallbacks, keeps them). Which conditionings a
call batches (``cond_or_uncond``, and ``uuids``: one per conditioning entry of the run) keys
the call's frontiers, and, without patches (which might read it), only them: cond and uncond
run as separate calls of one shape share one capture, and each call reuses the frontier of the
conditionings it computes, never another's of the same shape.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

from ...graph.capture import FlatCall, flatten_call

__all__ = ["ComfyCall", "comfy_call", "attention_patches", "RUN_OPTIONS", "CHUNK_OPTION"]

#: transformer_options entries that change per run and that the UNet never reads
RUN_OPTIONS = ("uuids", "sample_sigmas", "wrappers", "callbacks")
#: which conditionings (0: cond, 1: uncond) the call batches, in order
CHUNK_OPTION = "cond_or_uncond"
#: transformer_options entries with callables the UNet runs (they may read any option)
PATCHES = ("patches", "patches_replace")
#: patches around or in place of attention: where nodes keep Python state across calls
#: (attention stores, self-attention guidance), which a captured graph would run only once
ATTENTION_PATCHES = ("attn1_patch", "attn2_patch", "attn1_output_patch", "attn2_output_patch")


@dataclass
class ComfyCall:
    """One diffusion-model call: the flat call captured and run, the key of its frontiers, its
    sigma (None if ComfyUI did not pass one) and its transformer_options as they came."""

    flat: FlatCall
    slot: Hashable
    sigma: torch.Tensor | None
    options: dict
    forward: Callable | None = None   # the UNet's ``_forward`` it calls

    @property
    def key(self) -> Hashable:
        """The key of its frontiers (what :meth:`PlanFollower.run_planned` reads)."""
        return self.slot

    @property
    def tensors(self) -> list[torch.Tensor]:
        return self.flat.tensors


def comfy_call(forward: Callable, args: tuple, kwargs: dict) -> ComfyCall:
    """The :class:`ComfyCall` of ``forward(*args, **kwargs)`` (``forward``: the UNet's
    ``_forward``, what a capture traces)."""
    bound = inspect.signature(forward).bind(*args, **kwargs)
    options = bound.arguments.get("transformer_options")
    if not isinstance(options, dict):
        raise TypeError(f"a ComfyUI diffusion model call passes transformer_options as a dict, "
                        f"got {type(options).__name__}")
    kept = {k: v for k, v in options.items() if k not in RUN_OPTIONS}
    chunk = (tuple(options.get(CHUNK_OPTION) or ()), tuple(options.get("uuids") or ()))
    if not any(options.get(name) for name in PATCHES):
        kept.pop(CHUNK_OPTION, None)
    bound.arguments["transformer_options"] = kept
    flat = flatten_call(forward, bound.args, bound.kwargs)
    sigma = options.get("sigmas")
    return ComfyCall(flat, (flat.key, chunk), sigma if isinstance(sigma, torch.Tensor) else None,
                     options, forward)


def attention_patches(options: dict) -> list[str]:
    """The attention patches and replacements in ``transformer_options`` (see
    :data:`ATTENTION_PATCHES`), by name; a captured graph cannot run them faithfully."""
    found = [name for name in ATTENTION_PATCHES if (options.get("patches") or {}).get(name)]
    for kind, blocks in (options.get("patches_replace") or {}).items():
        found += [f"{kind} {block}" for block in blocks]
    return found
