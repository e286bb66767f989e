"""Cuts: which values of a captured UNet are cached across steps (the frontier).

A cut is a function ``(captured, layout) -> frontier nodes``. Encoder propagation and
deep-feature caching are two cuts of the same graph; :mod:`fxprop.graph.split` does the rest.

The encoder cut finds the decoder by module names (a :class:`~fxprop.graph.regions.Layout`) or, for
a UNet with unknown names, by the graph's structure (:func:`find_bottleneck`):

* the *latent path* is every node that depends on the latent (or ControlNet residuals) and
  reaches an output, in execution order;
* a node's *resolution* is the pixel count (product of the last two dims; the last dim of a
  1-D signal) of the output of a convolution, pooling, upsampling or pixel (un)shuffle on
  the latent path (other ops have none);
* the *bottleneck* runs from the first latent-path node of the lowest resolution to the first
  one of a higher resolution after it (the first upsampling, excluded);
* the cached part is every latent descendant before that upsampling, and its frontier the
  cached values read after it: the bottleneck output plus the *skip tensors*, the long edges
  from before the bottleneck to after it. Without a skip tensor it is not a UNet and the
  fallback raises. Decoder layers that run at the lowest resolution, before the first
  upsampling, are cached with the bottleneck.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx

from .capture import Captured
from .nodes import ancestors, descendants, frontier_of, output_nodes, placeholders, positions
from .regions import Layout, Region, label_nodes, module_path

__all__ = ["Cut", "encoder_cut", "structural_cut", "find_bottleneck", "Bottleneck",
           "latent_inputs", "latent_path", "RESIDUAL_INPUTS"]

Cut = Callable[[Captured, Layout], list[fx.Node]]

#: Inputs that are added to encoder features (ControlNet / T2I-Adapter residuals).
RESIDUAL_INPUTS = ("down_block_additional_residuals", "mid_block_additional_residual",
                   "down_intrablock_additional_residuals", "control")


def latent_inputs(captured: Captured) -> list[fx.Node]:
    """The latent (the first forward argument, see capture) and any encoder residual inputs."""
    latent, *rest = placeholders(captured.graph)
    return [latent] + [p for p in rest if p.name.startswith(RESIDUAL_INPUTS)]


def latent_path(captured: Captured) -> set[fx.Node]:
    """Nodes that depend on the latent inputs and reach an output."""
    return descendants(latent_inputs(captured)) & ancestors(output_nodes(captured.graph))


def encoder_cut(captured: Captured, layout: Layout) -> list[fx.Node]:
    """Faster Diffusion's cut: everything that reads the latent, up to the decoder.

    The cached set is every node that depends on the latent (or on ControlNet residuals,
    which are added to encoder features) and does not come after a decoder or output node.
    Its frontier is the skip tensors and the mid-block output. The time embedding does not
    depend on the latent, so the every-step part recomputes it for the current timestep.
    A layout without decoder names (:data:`~fxprop.graph.regions.STRUCTURAL`) takes
    :func:`structural_cut`.
    """
    if layout.is_structural:
        return structural_cut(captured, layout)
    graph = captured.graph
    labels = label_nodes(graph, layout)
    decoder = [n for n, r in labels.items() if r in (Region.DECODER, Region.OUTPUT)]
    if not any(labels[n] is Region.DECODER for n in decoder):
        raise ValueError(f"no op of the {layout.name} decoder ({', '.join(layout.decoder)}) "
                         "was found in the captured graph; is this a UNet?")
    after = descendants(decoder)
    late = next((n for n in graph.nodes if n in after
                 and labels[n] in (Region.ENCODER, Region.MID)), None)
    if late is not None:
        raise ValueError(f"{late.format_node()} of {module_path(late)} ({labels[late].value} "
                         f"in the {layout.name} layout) runs after the decoder; check the "
                         "module prefixes of regions=")
    cached = descendants(latent_inputs(captured)) - after
    frontier = frontier_of(graph, cached)
    if not frontier:
        raise ValueError("the encoder cut is empty: no value flows from the latent to the decoder")
    return frontier


# -- the structural fallback -------------------------------------------------------------------

#: aten ops whose output size defines a feature map's resolution (conv, pool, resample).
_SPATIAL_OPS = re.compile(r"_?(conv\dd|conv_transpose\dd|convolution|\w*pool\dd\w*|"
                          r"_?upsample_\w+|pixel_(un)?shuffle)")


@dataclass
class Bottleneck:
    """Where a UNet's resolution is lowest: its first node, and the first upsampling after it."""

    resolution: int
    first: fx.Node
    upsample: fx.Node


def _resolution(node: fx.Node) -> int | None:
    """Pixels of a convolution, pooling or resampling output (its last two dims), else None."""
    name = getattr(node.target, "__name__", "").split(".")[0]
    value = node.meta.get("val")
    if (node.op != "call_function" or not _SPATIAL_OPS.fullmatch(name)
            or not isinstance(value, torch.Tensor) or value.ndim < 3):
        return None
    try:  # 1-D signals have one spatial dim; video and volumes count their frames' pixels
        return int(math.prod(value.shape[-2:] if value.ndim > 3 else value.shape[-1:]))
    except (TypeError, RuntimeError):  # a symbolic spatial size
        return None


def find_bottleneck(captured: Captured) -> Bottleneck:
    """The bottleneck of the latent path (defined in this module's docstring)."""
    graph = captured.graph
    path = latent_path(captured)
    spatial = [(n, r) for n in graph.nodes if n in path and (r := _resolution(n)) is not None]
    if not spatial:
        _fail(captured, "found no convolution, pooling or resampling on the latent's path")
    lowest = min(r for _, r in spatial)
    at = next(i for i, (_, r) in enumerate(spatial) if r == lowest)
    if at == 0:
        _fail(captured, f"found no downsampling: the latent's path starts at its lowest "
                        f"resolution ({lowest} pixels, {spatial[0][0].format_node()})")
    up = next((n for n, r in spatial[at:] if r > lowest), None)
    if up is None:
        _fail(captured, f"found the lowest resolution ({lowest} pixels) at "
                        f"{_where(spatial[at][0])} but no upsampling after it")
    return Bottleneck(lowest, spatial[at][0], up)


def structural_cut(captured: Captured, layout: Layout | None = None) -> list[fx.Node]:
    """The encoder cut of a UNet with unknown names: everything before its first upsampling.

    Raises ``ValueError`` naming what it found if the graph has no bottleneck crossed by
    skip tensors.
    """
    graph = captured.graph
    order = positions(graph)
    neck = find_bottleneck(captured)
    cached = {n for n in descendants(latent_inputs(captured))
              if order[n] < order[neck.upsample]}
    frontier = frontier_of(graph, cached)
    if not any(order[n] < order[neck.first] for n in frontier):
        _fail(captured, f"found a bottleneck of {neck.resolution} pixels from "
                        f"{_where(neck.first)} to {_where(neck.upsample)}, but no skip tensor "
                        "crosses it (nothing made before it is read after it)")
    return frontier


def _where(node: fx.Node) -> str:
    return f"{node.name} ({module_path(node) or 'forward'})"


def _fail(captured: Captured, found: str) -> None:
    tops = sorted({module_path(n).split(".")[0] for n in captured.graph.nodes} - {""})
    raise ValueError(
        f"fxprop cannot find the encoder and decoder of this UNet: its top-level modules "
        f"{tops} are not diffusers' (down_blocks, mid_block, up_blocks) or LDM's (input_blocks, "
        f"middle_block, output_blocks), and the structural fallback {found}. Name them with "
        "module prefixes: fxprop.accelerate(unet, regions={'encoder': [...], 'mid': [...], "
        "'decoder': [...], 'output': [...]}) ('decoder' is required)")
