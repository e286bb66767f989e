"""Split a captured graph at a frontier into the parts a cached sampler runs.

A *frontier* is a list of nodes whose values are kept across steps. From it we build three
GraphModules that share the UNet's parameters:

* ``full(*inputs) -> (*outputs, *frontier)``: the whole UNet, also returning the frontier,
  run at a key step (costs exactly one UNet call);
* ``key(*key_inputs) -> frontier``: only what the frontier needs (parallel mode);
* ``step(*step_inputs, *frontier) -> outputs``: what runs at the other steps.

Each part is made as :func:`extract` makes a graph: the nodes needed to compute some outputs
from some inputs, which fails, naming the node, if a value outside those inputs is read. That
check runs in :func:`split`; the copy and its GraphModule are made when the part is first read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from .capture import Captured
from .nodes import needed, output_nodes, placeholders

__all__ = ["Parts", "extract", "split", "check_split"]


def _kept(inputs: list[fx.Node], outputs: list[fx.Node]) -> set[fx.Node]:
    """The nodes computing ``outputs`` from ``inputs``; raises ``ValueError`` if they read a
    placeholder that is not one of ``inputs``."""
    stop = set(inputs)
    keep = needed(outputs, stop)
    leaked = [n for n in keep if n.op == "placeholder" and n not in stop]
    if leaked:
        raise ValueError(
            f"the part computing {[o.name for o in outputs][:4]} also reads the inputs "
            f"{[n.name for n in leaked]}, which it was not given"
        )
    return keep


def _copy(graph: fx.Graph, inputs: list[fx.Node], outputs: list[fx.Node],
          keep: set[fx.Node]) -> fx.Graph:
    new, env = fx.Graph(), {}
    for node in inputs:
        env[node] = new.placeholder(node.name)
        env[node].meta = dict(node.meta)
    stop = set(inputs)
    for node in graph.nodes:
        if node in keep and node not in stop:
            env[node] = new.node_copy(node, lambda a: env[a])
    new.output(tuple(env[o] for o in outputs))
    new.lint()
    return new


def extract(graph: fx.Graph, inputs: list[fx.Node], outputs: list[fx.Node]) -> fx.Graph:
    """A new graph with ``inputs`` as placeholders that computes ``outputs`` as a tuple."""
    return _copy(graph, inputs, outputs, _kept(inputs, outputs))


class Parts:
    """The three parts of one cut, and which call inputs each reads (by index).

    Each part is built (graph copied, GraphModule generated: a tenth of a second on a small
    UNet) when first read: sequential mode never runs ``key``, and calibration splits one
    capture at every candidate cut but runs only the step parts. Whether each part can be
    built is checked by :func:`split`, up front.
    """

    def __init__(self, build: Callable[[str], Any], key_inputs: list[int],
                 step_inputs: list[int], num_outputs: int) -> None:
        self._build, self._built = build, {}
        self.key_inputs, self.step_inputs, self.num_outputs = key_inputs, step_inputs, num_outputs

    def _part(self, name: str) -> Any:
        if name not in self._built:
            self._built.setdefault(name, self._build(name))  # two threads: one part kept
        return self._built[name]

    full = property(lambda self: self._part("full"),
                    doc="all inputs -> (*outputs, *frontier): a key step")
    key = property(lambda self: self._part("key"),
                   doc="key inputs -> frontier (parallel mode)")
    step = property(lambda self: self._part("step"),
                    doc="(*step inputs, *frontier) -> outputs: the other steps")

    def map(self, wrap: Callable[[Any], Any]) -> Parts:
        """The same parts, each ``wrap(part)`` (built when first read, as here)."""
        return Parts(lambda name: wrap(self._part(name)), self.key_inputs, self.step_inputs,
                     self.num_outputs)


def split(captured: Captured, frontier: list[fx.Node]) -> Parts:
    """Cut ``captured`` at ``frontier``; the parts share the captured module's parameters."""
    graph = captured.graph
    inputs, outputs = placeholders(graph), output_nodes(graph)
    # 1. Inputs each part reads: walk back from its outputs, stopping at the frontier.
    key_reads = needed(frontier, set(inputs))
    step_reads = needed(outputs, set(frontier) | set(inputs))
    key_inputs = [i for i, p in enumerate(inputs) if p in key_reads]
    step_inputs = [i for i, p in enumerate(inputs) if p in step_reads]
    # 2. Each part's inputs and outputs; frontier nodes become the step part's inputs. What
    # each computes is checked now; its graph and module are made when first used.
    ends = {"full": (inputs, outputs + frontier),
            "key": ([inputs[i] for i in key_inputs], frontier),
            "step": ([inputs[i] for i in step_inputs] + frontier, outputs)}
    kept = {name: _kept(*io) for name, io in ends.items()}

    def build(name: str) -> fx.GraphModule:
        return fx.GraphModule(captured.module, _copy(graph, *ends[name], kept[name]))
    return Parts(build, key_inputs, step_inputs, len(outputs))


@torch.no_grad()
def check_split(parts: Parts, captured: Captured, tensors: list[torch.Tensor],
                atol: float = 1e-5) -> float:
    """Max abs difference between the composed parts and the whole graph on ``tensors``.

    Checks ``step(key(x)) == full(x)[:n] == whole(x)`` and raises if it exceeds ``atol``.
    """
    whole = captured.module(*tensors)
    full = parts.full(*tensors)
    frontier = parts.key(*[tensors[i] for i in parts.key_inputs])
    step = parts.step(*[tensors[i] for i in parts.step_inputs], *frontier)
    worst = 0.0
    for reference, *candidates in zip(whole, full[: parts.num_outputs], step):
        for candidate in candidates:
            worst = max(worst, (reference - candidate).abs().max().item())
    if worst > atol:
        raise AssertionError(f"split parts differ from the whole UNet by {worst:.3g} > {atol}")
    return worst
