"""Walks and lookups over a ``torch.fx.Graph``, shared by every pass of fxprop.

Cuts and splits ask the same few questions of a captured graph: what depends on these nodes,
what do they depend on (optionally not looking behind a stop set), which cached values are read
outside the cache, and where the inputs and outputs are. They are answered here once, on top of
``Graph.find_nodes`` and ``Graph.output_node``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import fx

__all__ = ["placeholders", "output_nodes", "positions", "descendants", "ancestors", "needed",
           "frontier_of"]


def placeholders(graph: fx.Graph) -> list[fx.Node]:
    """The graph's inputs, in signature order."""
    return list(graph.find_nodes(op="placeholder"))


def output_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The nodes the graph returns, in the order of its (possibly nested) output value."""
    found: list[fx.Node] = []
    fx.map_arg(graph.output_node().args[0], found.append)
    return found


def positions(graph: fx.Graph) -> dict[fx.Node, int]:
    """Every node's index in execution order (to compare "before" and "after")."""
    return {node: i for i, node in enumerate(graph.nodes)}


def _closure(roots: Iterable[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]],
             stop: frozenset[fx.Node] | set[fx.Node] = frozenset()) -> set[fx.Node]:
    """``roots`` and everything reached from them by ``step``, not stepping out of ``stop``."""
    seen: set[fx.Node] = set()
    todo = list(roots)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            if node not in stop:
                todo.extend(step(node))
    return seen


def descendants(roots: Iterable[fx.Node]) -> set[fx.Node]:
    """``roots`` and every node that depends on one of them (the output node included)."""
    return _closure(roots, lambda n: n.users)


def ancestors(roots: Iterable[fx.Node]) -> set[fx.Node]:
    """``roots`` and every node they depend on."""
    return _closure(roots, lambda n: n.all_input_nodes)


def needed(outputs: Iterable[fx.Node], stop: set[fx.Node]) -> set[fx.Node]:
    """What computing ``outputs`` runs when the values of ``stop`` are given: their ancestors,
    not looking behind ``stop`` (the stop nodes reached are included)."""
    return _closure(outputs, lambda n: n.all_input_nodes, stop)


def frontier_of(graph: fx.Graph, cached: set[fx.Node]) -> list[fx.Node]:
    """Nodes of ``cached`` read by a node outside it, in graph order: what a cache must keep."""
    return [n for n in graph.nodes if n in cached and any(u not in cached for u in n.users)]
