"""The deep cut: DeepCache's deep-feature caching as a frontier of the captured graph.

DeepCache (Ma et al., arXiv 2312.00858) runs the whole UNet at key steps and caches the
hidden state entering one shallow up layer (a *branch*); at the other steps only the shallow
branch runs on the current latent. Here that is one more cut ``(captured, layout) -> frontier``:
the frontier is the hidden state entering the chosen up resnet, before its concatenation with
the skip tensor, and :mod:`fxprop.split` makes the shallow every-step part from it.

Branch ids are DeepCache's ``cache_branch_id``: ``block = branch // 3`` counts up blocks from
the shallowest (``up_blocks[-1 - block]``) and ``layer = branch % 3`` counts that block's
resnets from its last one (``resnets[-1 - layer]``). The cache holds what enters that resnet:
the previous attention or resnet output of the block, or for its first resnet the output of
the deeper up block (the mid block's output for the deepest block). Ids port 1:1 wherever up
blocks have 3 resnets (``layers_per_block=2``):

* SD 1.x / 2.x: 4 up blocks, branches 0-11 (0 is DeepCache's fastest, most shallow branch);
* SDXL: 3 up blocks, branches 0-8;
* ``UNet2DModel`` (DDPM): ``len(up_blocks)`` blocks, ids ``3 * block + layer`` with
  ``layer <= layers_per_block``: with ``layers_per_block=1`` the valid ids are 0, 1, 3, 4, ...

Only diffusers' layout (``up_blocks.K.resnets.R``) has the up resnets the ids name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import fx, nn

from .capture import Captured
from .cuts import descendants
from .regions import Layout, module_path
from .split import needed

__all__ = ["branch_target", "valid_branches", "check_branch", "deep_cut"]

#: Layers per branch block in DeepCache's ids (SD up blocks have 3 resnets).
LAYERS_PER_ID = 3


def valid_branches(resnets: Sequence[int]) -> list[int]:
    """Branch ids that name an up resnet, given the resnet count of every up block."""
    blocks = len(resnets)
    return [LAYERS_PER_ID * b + l for b in range(blocks)
            for l in range(min(LAYERS_PER_ID, resnets[blocks - 1 - b]))]


def branch_target(branch: int, resnets: Sequence[int]) -> tuple[int, int]:
    """``(k, r)``: the branch caches what enters ``up_blocks[k].resnets[r]``."""
    valid = valid_branches(resnets)
    if branch not in valid:
        raise ValueError(
            f"branch={branch} is out of range for this UNet ({len(resnets)} up blocks with "
            f"{list(resnets)} resnets): valid branches are {_ranges(valid)} (block = branch // "
            f"{LAYERS_PER_ID} < {len(resnets)}, layer = branch % {LAYERS_PER_ID} < the resnets "
            "of that up block)")
    block, layer = divmod(branch, LAYERS_PER_ID)
    k = len(resnets) - 1 - block
    return k, resnets[k] - 1 - layer


def _ranges(ids: list[int]) -> str:
    """``[0, 1, 2, 4]`` as ``"0-2, 4"``."""
    spans: list[list[int]] = []
    for i in ids:
        if spans and spans[-1][1] == i - 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def check_branch(unet: nn.Module, branch: int) -> None:
    """Raise ``ValueError`` unless ``branch`` names an up resnet of ``unet`` (before capture)."""
    blocks = getattr(unet, "up_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not all(hasattr(b, "resnets") for b in blocks):
        raise ValueError(f"reuse='deep' needs diffusers' up_blocks[k].resnets, which "
                         f"{type(unet).__name__} does not have")
    branch_target(branch, [len(b.resnets) for b in blocks])


def _up_resnets(graph: fx.Graph, up: str) -> list[int]:
    """Resnet count of every up block, read from the module paths of the graph's nodes."""
    pattern = re.compile(rf"{re.escape(up)}\.(\d+)\.resnets\.(\d+)(\.|$)")
    counts: dict[int, int] = {}
    for node in graph.nodes:
        match = pattern.match(module_path(node))
        if match:
            k, r = int(match[1]), int(match[2])
            counts[k] = max(counts.get(k, 0), r + 1)
    if not counts or sorted(counts) != list(range(len(counts))):
        raise ValueError(f"reuse='deep' found no up resnets ({up or 'up_blocks'}.K.resnets.R) "
                         "in the captured graph; it needs diffusers' UNet layout")
    return [counts[k] for k in range(len(counts))]


def _entering(graph: fx.Graph, up: str, k: int, r: int) -> fx.Node:
    """The hidden state concatenated with the skip tensor in front of resnet ``r`` of block k."""
    block, resnet = f"{up}.{k}", f"{up}.{k}.resnets.{r}"
    for node in graph.nodes:
        if (node.target is torch.ops.aten.cat.default and module_path(node) == block
                and any(module_path(u).startswith(resnet + ".") or module_path(u) == resnet
                        for u in node.users)):
            return node.args[0][0]
    raise ValueError(f"no concatenation in {block} feeds {resnet}; reuse='deep' expects "
                     "diffusers' up blocks (cat of hidden state and skip, then a resnet)")


def _module_outputs(node: fx.Node, deep: set[fx.Node]) -> list[fx.Node]:
    """``node``, or, if it is glue of the UNet's own forward, the latent-dependent module
    outputs it combines: glue (ControlNet's mid residual add) runs every step, as in DeepCache,
    which caches module outputs only."""
    if node not in deep or node.op == "placeholder":
        return []
    if node.op == "call_function" and module_path(node) == "":
        return [m for a in node.all_input_nodes for m in _module_outputs(a, deep)]
    return [node]


def deep_cut(captured: Captured, layout: Layout, branch: int = 0) -> list[fx.Node]:
    """DeepCache's cut: the deep feature entering the up resnet that ``branch`` names."""
    graph = captured.graph
    k, r = branch_target(branch, _up_resnets(graph, layout.up))
    latent = [n for n in graph.nodes if n.op == "placeholder"][:1]  # first input (see capture)
    deep = descendants(latent)
    frontier = list(dict.fromkeys(_module_outputs(_entering(graph, layout.up, k, r), deep)))
    if not frontier:
        raise ValueError(f"the deep cut at branch={branch} is empty: nothing deep enters "
                         f"{layout.up}.{k}.resnets.{r}")
    # The shallow part must not reach the mid block: that is the point of the cut.
    outputs = list(next(n for n in graph.nodes if n.op == "output").args[0])
    for node in needed(outputs, set(frontier)) - set(frontier):
        if any(module_path(node) == m or module_path(node).startswith(m + ".")
               for m in layout.mid):
            raise ValueError(f"the deep cut at branch={branch} leaves {node.format_node()} of "
                             f"{module_path(node)} in the every-step part")
    return frontier
