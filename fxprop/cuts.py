"""Cuts: which values of a captured UNet are cached across steps (the frontier).

A cut is a function ``(captured, layout) -> frontier nodes``. Encoder propagation and
deep-feature caching are two cuts of the same graph; :mod:`fxprop.split` does the rest.
"""

from __future__ import annotations

from typing import Callable, Iterable

from torch import fx

from .capture import Captured
from .regions import Layout, Region, label_nodes

__all__ = ["Cut", "descendants", "frontier_of", "encoder_cut", "RESIDUAL_INPUTS"]

Cut = Callable[[Captured, Layout], list[fx.Node]]

#: Inputs that are added to encoder features (ControlNet / T2I-Adapter residuals).
RESIDUAL_INPUTS = ("down_block_additional_residuals", "mid_block_additional_residual",
                   "down_intrablock_additional_residuals", "control")


def descendants(roots: Iterable[fx.Node]) -> set[fx.Node]:
    """``roots`` and every node that depends on one of them."""
    seen: set[fx.Node] = set()
    todo = list(roots)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(node.users)
    return seen


def frontier_of(graph: fx.Graph, cached: set[fx.Node]) -> list[fx.Node]:
    """Cached nodes read by uncached ones, in graph order."""
    return [n for n in graph.nodes if n in cached and any(u not in cached for u in n.users)]


def _latent_inputs(captured: Captured) -> list[fx.Node]:
    placeholders = [n for n in captured.graph.nodes if n.op == "placeholder"]
    latent = [placeholders[0]]  # the first forward argument is the latent (see capture)
    latent += [p for p in placeholders[1:] if p.name.startswith(RESIDUAL_INPUTS)]
    return latent


def encoder_cut(captured: Captured, layout: Layout) -> list[fx.Node]:
    """Faster Diffusion's cut: everything that reads the latent, up to the decoder.

    The cached set is every node that depends on the latent (or on ControlNet residuals,
    which are added to encoder features) and does not come after a decoder or output node.
    Its frontier is the skip tensors and the mid-block output. The time embedding does not
    depend on the latent, so the every-step part recomputes it for the current timestep.
    """
    graph = captured.graph
    labels = label_nodes(graph, layout)
    decoder = [n for n, r in labels.items() if r in (Region.DECODER, Region.OUTPUT)]
    if not any(labels[n] is Region.DECODER for n in decoder):
        raise ValueError(f"no op of the {layout.name} decoder ({layout.up}) was found in the "
                         "captured graph; is this a UNet?")
    cached = descendants(_latent_inputs(captured)) - descendants(decoder)
    frontier = frontier_of(graph, cached)
    if not frontier:
        raise ValueError("the encoder cut is empty: no value flows from the latent to the decoder")
    return frontier
