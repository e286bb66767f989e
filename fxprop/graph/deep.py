"""The deep cut: DeepCache's deep-feature caching as a frontier of the captured graph.

DeepCache (Ma et al., arXiv 2312.00858) runs the whole UNet at key steps and caches the deep
hidden state that meets one skip connection (a *branch*); at the other steps only the shallow
branch (conv_in, the first down layers, the last up layers, conv_out) runs on the current
latent. Here that is one more cut ``(captured, layout) -> frontier``, found from the graph's
structure, as :mod:`fxprop.graph.cuts` finds the skips of the encoder cut:

* the *center* is where the deep part ends: the last latent-path node of the mid block (else of
  the encoder) of a named layout, or, for a UNet without names, the input of its first
  upsampling (:func:`~fxprop.graph.cuts.find_bottleneck`);
* a *merge* is a concatenation or addition after the center that meets a *skip* (an input that
  depends on the latent but not on the center) with the *deep hidden state* (an input that
  depends on the center);
* branches count merges from the shallowest: the merge that runs last is the shallowest;
* a branch's frontier is the deep input of its merge. Glue of the UNet's own forward in front of
  it (ControlNet's mid residual) runs every step, as in DeepCache, which caches module outputs;
* the every-step part must not reach the center, else the UNet has no shallow branch (score-SDE
  skip blocks sum a projection of every up block into the output) and the cut raises.

Branch ids. Where every merge sits in diffusers' ``up_blocks.K``, ids are DeepCache's
``cache_branch_id``, so settings port 1:1: ``block = branch // 3`` counts up blocks from the
shallowest, ``layer = branch % 3`` a block's merges (its resnets) from its last one. SD 1.x/2.x
have 0-11, SDXL 0-8, ``UNet2DModel(layers_per_block=1)`` 0, 1, 3, 4, ... (a fourth resnet of a
block has no id). Every other UNet (LDM ``UNetModel``, user-written) has dense ids ``0..n-1``,
shallowest first: LDM's branch ``b`` caches the hidden state entering ``output_blocks[-1 - b]``.
Without names, merges at the lowest resolution (before the first upsampling) belong to the deep
part and are no branches; ``regions=`` (naming the mid) makes them branches.
:func:`branches` lists the branches of any UNet.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .capture import Captured, capture, flatten_call
from .cuts import find_bottleneck, latent_path
from .nodes import descendants, needed, output_nodes, placeholders
from .regions import DIFFUSERS, Layout, Region, label_nodes, module_path, resolve_layout

__all__ = ["Branch", "branches", "find_branches", "deep_center", "valid_branches",
           "branch_target", "check_branch", "deep_cut"]

#: Layers per block in DeepCache's ids (SD up blocks have 3 resnets).
LAYERS_PER_ID = 3
#: The ops that meet a skip with a deep hidden state.
_MERGES = (torch.ops.aten.cat.default, torch.ops.aten.add.Tensor)
_UP_BLOCK = re.compile(rf"{DIFFUSERS.up}\.(\d+)(\.|$)")


@dataclass(frozen=True)
class Branch:
    """One skip connection of a captured UNet, as a place to cut."""

    id: int                      # DeepCache's cache_branch_id on diffusers, else shallowest-first
    merge: fx.Node               # the cat/add that meets the skip with the deep hidden state
    deep: tuple[fx.Node, ...]    # the frontier: the deep values entering the merge
    layer: str                   # where the merge runs (module path)

    def __str__(self) -> str:
        return f"branch {self.id}: {self.layer} ({self.merge.name})"


def deep_center(captured: Captured, layout: Layout) -> fx.Node:
    """The last node of the deep part (see the module docstring)."""
    path = latent_path(captured)
    if not layout.is_structural:
        labels = label_nodes(captured.graph, layout)
        for region in (Region.MID, Region.ENCODER):
            nodes = [n for n in captured.graph.nodes if n in path and labels[n] is region]
            if nodes:
                return nodes[-1]
    upsample = find_bottleneck(captured).upsample
    return next(a for a in upsample.all_input_nodes if a in path)


def _module_outputs(node: fx.Node, deep: set[fx.Node]) -> list[fx.Node]:
    """``node``, or, if it is glue of the UNet's own forward, the deep module outputs it
    combines (that glue runs every step, as in DeepCache, which caches module outputs)."""
    if node not in deep or node.op == "placeholder":
        return []
    if node.op == "call_function" and module_path(node) == "":
        return [m for a in node.all_input_nodes for m in _module_outputs(a, deep)]
    return [node]


def _layer(merge: fx.Node) -> str:
    """Module path of a merge, or of the layer it feeds if it is glue."""
    if module_path(merge):
        return module_path(merge)
    fed = next((module_path(u) for u in merge.users if module_path(u)), "")
    return f"forward, into {fed}" if fed else "forward"


def _merges(captured: Captured, center: fx.Node) -> list[tuple[fx.Node, list[fx.Node]]]:
    """Every merge after ``center`` in execution order, with its deep inputs."""
    deep = descendants([center])
    latent = descendants(placeholders(captured.graph)[:1])
    found = []
    for node in captured.graph.nodes:
        if node.op != "call_function" or node.target not in _MERGES or node not in deep:
            continue
        hidden = [a for a in node.all_input_nodes if a in deep]
        if hidden and any(a in latent and a not in deep for a in node.all_input_nodes):
            found.append((node, hidden))
    return found


def _deepcache_ids(merges: list[fx.Node], graph: fx.Graph) -> list[int | None] | None:
    """DeepCache's ids of merges given shallowest first, if all are in diffusers' up blocks
    (None for a merge past a block's third, which DeepCache cannot name)."""
    blocks = [_UP_BLOCK.match(module_path(m)) for m in merges]
    if not merges or not all(blocks):
        return None
    count = 1 + max(int(m[1]) for n in graph.nodes if (m := _UP_BLOCK.match(module_path(n))))
    ids, seen = [], Counter()
    for match in blocks:
        k = int(match[1])
        layer, seen[k] = seen[k], seen[k] + 1
        ids.append(LAYERS_PER_ID * (count - 1 - k) + layer if layer < LAYERS_PER_ID else None)
    return ids


def find_branches(captured: Captured, layout: Layout) -> list[Branch]:
    """The branches of a captured UNet, shallowest first (ids as in the module docstring)."""
    center = deep_center(captured, layout)
    found = _merges(captured, center)[::-1]
    if not found:
        raise ValueError(f"reuse='deep' found no skip connection meeting the deep hidden state "
                         f"after {center.format_node()} of {module_path(center) or 'forward'} "
                         "(where the deep part ends); is this a UNet?")
    merges = [m for m, _ in found]
    ids = _deepcache_ids(merges, captured.graph) or list(range(len(found)))
    deep = descendants([center])
    return [Branch(i, m, tuple(dict.fromkeys(x for a in inputs for x in _module_outputs(a, deep))),
                   _layer(m)) for i, (m, inputs) in zip(ids, found) if i is not None]


def branches(unet: nn.Module, *args: Any, regions: Any = None, **kwargs: Any) -> list[Branch]:
    """The branches of ``unet`` called as ``unet(*args, **kwargs)`` (captures it once), e.g.
    ``[str(b) for b in fxprop.graph.deep.branches(unet, x, t, encoder_hidden_states=e)]``."""
    captured = capture(unet, flatten_call(unet.forward, args, kwargs))
    return find_branches(captured, resolve_layout(unet, regions))


def _ranges(ids: list[int]) -> str:
    """``[0, 1, 2, 4]`` as ``"0-2, 4"``."""
    spans: list[list[int]] = []
    for i in ids:
        if spans and spans[-1][1] == i - 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def valid_branches(resnets: Sequence[int]) -> list[int]:
    """DeepCache's ids of a diffusers UNet, given the resnet count of every up block."""
    blocks = len(resnets)
    return [LAYERS_PER_ID * b + l for b in range(blocks)
            for l in range(min(LAYERS_PER_ID, resnets[blocks - 1 - b]))]


def branch_target(branch: int, resnets: Sequence[int]) -> tuple[int, int]:
    """``(k, r)``: in diffusers' layout, ``branch`` caches what enters
    ``up_blocks[k].resnets[r]``."""
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


def check_branch(unet: nn.Module, branch: int) -> None:
    """Raise ``ValueError`` for a ``branch`` that cannot be valid for ``unet`` (before capture).

    Only diffusers' up blocks tell the ids without a capture; other UNets are checked when they
    are cut, against the branches :func:`find_branches` finds."""
    if type(unet).forward is nn.Module.forward:
        raise ValueError(f"reuse='deep' needs a UNet to capture, and {type(unet).__name__} "
                         "has no forward")
    blocks = getattr(unet, DIFFUSERS.up, None)
    if isinstance(blocks, nn.ModuleList) and all(hasattr(b, "resnets") for b in blocks):
        branch_target(branch, [len(b.resnets) for b in blocks])


def _check_shallow(captured: Captured, branch: Branch, center: fx.Node) -> None:
    """Raise unless the outputs need only the cached values from the deep part."""
    shallow = needed(output_nodes(captured.graph), set(branch.deep))
    if center not in shallow - set(branch.deep):
        return
    leaks = shallow & (descendants([center]) - descendants(branch.deep))
    leak = [n for n in captured.graph.nodes if n in leaks][-1]
    raise ValueError(
        f"reuse='deep' finds no shallow branch for branch={branch.id} ({branch.layer}): the "
        "outputs read the deep part not only through the cached value entering that merge "
        "(score-SDE skip blocks, for one, sum a projection of every up block into the output);"
        f" they read {leak.format_node()} of {module_path(leak) or 'forward'}, which needs "
        f"{center.format_node()} of {module_path(center) or 'forward'}, where the deep part ends")


def deep_cut(captured: Captured, layout: Layout, branch: int = 0) -> list[fx.Node]:
    """DeepCache's cut: the deep hidden state that meets the skip of ``branch``."""
    found = {b.id: b for b in find_branches(captured, layout)}
    if branch not in found:
        raise ValueError(
            f"branch={branch} is out of range for this UNet: valid branches are "
            f"{_ranges(sorted(found))} ({'; '.join(map(str, found.values()))}); list them "
            "with fxprop.graph.deep.branches(unet, *example_inputs)")
    chosen = found[branch]
    _check_shallow(captured, chosen, deep_center(captured, layout))
    return list(chosen.deep)
