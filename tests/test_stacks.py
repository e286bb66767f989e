"""Module paths that survive any module tree (fxprop.graph.stacks): a module registered under two
names, one shared by two blocks, paths spelled from the traced wrapper or from the UNet."""

from __future__ import annotations

import torch
from torch import fx, nn

from fxprop.graph.capture import ROOT, capture, flatten_call
from fxprop.graph.regions import LDM, Region, label_nodes, module_path
from fxprop.graph.stacks import canonical_stacks, class_name


class Block(nn.Module):
    """LDM's ResBlock quirk: one module under two names (``h_upd = x_upd``)."""

    def __init__(self, ch: int, conv: nn.Conv2d | None = None) -> None:
        super().__init__()
        self.conv = conv or nn.Conv2d(ch, ch, 3, padding=1)
        self.h_upd = self.x_upd = nn.Identity()

    def forward(self, x):
        return self.x_upd(x) + self.h_upd(self.conv(x)).relu()


class TwoNames(nn.Module):
    """A two-level UNet in LDM's names whose encoder and decoder share one conv."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.Conv2d(4, 4, 3, padding=1)
        self.input_blocks = nn.ModuleList([Block(4, shared), Block(4)])
        self.middle_block = Block(4)
        self.output_blocks = nn.ModuleList([Block(8), Block(8)])
        self.proj = nn.ModuleList([nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)])
        self.shared_late = Block(4, shared)  # the same conv, run in the decoder's tail
        self.out = nn.Conv2d(4, 4, 1)

    def forward(self, x, t):
        hs = []
        for block in self.input_blocks:
            x = block(x)
            hs.append(x)
        x = self.middle_block(x) * t.reshape(-1, 1, 1, 1)
        for block, proj in zip(self.output_blocks, self.proj):
            x = proj(block(torch.cat([x, hs.pop()], 1)))
        return self.out(self.shared_late(x))


def _captured():
    torch.manual_seed(0)
    unet = TwoNames().eval()
    call = flatten_call(unet.forward, (torch.randn(2, 4, 8, 8), torch.tensor(3.0)), {})
    return unet, call, capture(unet, call, unet.forward)  # a forward outside the tree


def test_a_module_registered_twice_keeps_every_path_in_the_unet():
    unet, call, captured = _captured()
    ops = [n for n in captured.graph.nodes if n.op == "call_function"]
    names = dict(unet.named_modules(remove_duplicate=False))
    paths = {module_path(n) for n in ops} - {""}
    assert paths and paths <= set(names), sorted(paths - set(names))
    convs = {module_path(n) for n in ops if "conv" in str(n.target)}
    # the shared conv keeps the block it ran in: encoder's first block and the tail
    assert {"input_blocks.0.conv", "shared_late.conv", "out"} <= convs
    labels = label_nodes(captured.graph, LDM)
    assert any(labels[n] is Region.DECODER for n in ops)
    assert {labels[n] for n in ops if module_path(n).startswith("output_blocks")} == {
        Region.DECODER}
    torch.testing.assert_close(captured.module(*call.tensors)[0], unet(*call.tensors))


def _node_with(graph: fx.Graph, stack: dict) -> fx.Node:
    node = graph.call_function(torch.relu, (graph.placeholder(f"x{len(graph.nodes)}"),))
    node.meta["nn_module_stack"] = stack
    return node


def test_each_spelling_resolves_to_the_module_it_names():
    unet = TwoNames()
    wrapper = nn.Module()
    setattr(wrapper, ROOT, unet)
    block, conv = class_name(Block), class_name(nn.Conv2d)
    graph = fx.Graph()
    rooted = _node_with(graph, {"a": ("", "wrapper.Class"), "b": (f"{ROOT}.output_blocks.1",
                                                                   block)})
    relative = _node_with(graph, {"a": ("output_blocks.0", block),
                                  "b": ("output_blocks.0.x_upd", class_name(nn.Identity))})
    wrong_class = _node_with(graph, {"a": ("output_blocks.0", conv)})
    missing = _node_with(graph, {"a": ("input_blocks.7.conv", conv),
                                 "b": ("input_blocks.slice(None, 1, None)", block)})
    canonical_stacks(graph, unet, ((wrapper, ROOT), (unet, "")), ROOT)
    assert list(rooted.meta["nn_module_stack"].values()) == [(f"{ROOT}.output_blocks.1", block)]
    assert [p for p, _ in relative.meta["nn_module_stack"].values()] == [
        f"{ROOT}.output_blocks.0", f"{ROOT}.output_blocks.0.x_upd"]
    assert wrong_class.meta["nn_module_stack"] == {} and missing.meta["nn_module_stack"] == {}
    assert module_path(relative) == "output_blocks.0.x_upd" and module_path(missing) == ""
