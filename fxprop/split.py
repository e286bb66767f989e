"""Split a captured graph at a frontier into the parts a cached sampler runs.

A *frontier* is a list of nodes whose values are kept across steps. From it we build three
GraphModules that share the UNet's parameters:

* ``full(*inputs) -> (*outputs, *frontier)``: the whole UNet, also returning the frontier,
  run at a key step (costs exactly one UNet call);
* ``key(*key_inputs) -> frontier``: only what the frontier needs (parallel mode);
* ``step(*step_inputs, *frontier) -> outputs``: what runs at the other steps.

Each part is made by one pass, :func:`extract`, which copies the nodes needed to compute some
outputs from some inputs and fails, naming the node, if a value outside those inputs is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .capture import Captured
from .graph import needed, output_nodes, placeholders

__all__ = ["Parts", "extract", "split", "check_split"]


def extract(graph: fx.Graph, inputs: list[fx.Node], outputs: list[fx.Node]) -> fx.Graph:
    """A new graph with ``inputs`` as placeholders that computes ``outputs`` as a tuple."""
    stop = set(inputs)
    keep = needed(outputs, stop)
    leaked = [n for n in keep if n.op == "placeholder" and n not in stop]
    if leaked:
        raise ValueError(
            f"the part computing {[o.name for o in outputs][:4]} also reads the inputs "
            f"{[n.name for n in leaked]}, which it was not given"
        )
    new, env = fx.Graph(), {}
    for node in inputs:
        env[node] = new.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node in graph.nodes:
        if node in keep and node not in stop:
            env[node] = new.node_copy(node, lambda a: env[a])
    new.output(tuple(env[o] for o in outputs))
    new.lint()
    return new


@dataclass
class Parts:
    """The three parts of one cut, and which call inputs each reads (by index)."""

    full: fx.GraphModule
    key: fx.GraphModule
    step: fx.GraphModule
    key_inputs: list[int]
    step_inputs: list[int]
    num_outputs: int


def split(captured: Captured, frontier: list[fx.Node]) -> Parts:
    """Cut ``captured`` at ``frontier``; the parts share the captured module's parameters."""
    graph = captured.graph
    inputs, outputs = placeholders(graph), output_nodes(graph)
    # 1. Inputs each part reads: walk back from its outputs, stopping at the frontier.
    key_reads = needed(frontier, set(inputs))
    step_reads = needed(outputs, set(frontier) | set(inputs))
    key_inputs = [i for i, p in enumerate(inputs) if p in key_reads]
    step_inputs = [i for i, p in enumerate(inputs) if p in step_reads]
    # 2. Build each part with the same pass; frontier nodes become the step part's inputs.
    root = captured.module

    def module(g: fx.Graph) -> fx.GraphModule:
        return fx.GraphModule(root, g)

    full = module(extract(graph, inputs, outputs + frontier))
    key = module(extract(graph, [inputs[i] for i in key_inputs], frontier))
    step = module(extract(graph, [inputs[i] for i in step_inputs] + frontier, outputs))
    return Parts(full, key, step, key_inputs, step_inputs, len(outputs))


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
