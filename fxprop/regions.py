"""Label the nodes of a captured UNet graph by region, from the module that produced them.

Every node of a ``torch.export`` graph carries ``nn_module_stack``: the chain of modules whose
``forward`` was running when the op was recorded. The innermost path (``down_blocks.1.resnets.0
.conv1``) tells which part of the UNet a node belongs to. A *layout* maps top-level module
names to regions; diffusers' and the original LDM code's names are built in.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from torch import fx, nn

from .capture import ROOT

__all__ = ["Region", "Layout", "LAYOUTS", "find_layout", "module_path", "label_nodes"]


class Region(enum.Enum):
    TIME = "time"          # time / class / added-condition embeddings
    ENCODER = "encoder"    # conv_in and the down blocks
    MID = "mid"            # the bottleneck
    DECODER = "decoder"    # the up blocks
    OUTPUT = "output"      # final norm, activation, conv_out
    GLUE = "glue"          # ops in the UNet's own forward, between blocks


@dataclass(frozen=True)
class Layout:
    """Top-level module names of one UNet family, by region."""

    name: str
    encoder: tuple[str, ...]
    mid: tuple[str, ...]
    decoder: tuple[str, ...]
    output: tuple[str, ...]
    down: str      # the ModuleList of down blocks
    up: str        # the ModuleList of up blocks

    def region_of(self, top: str) -> Region:
        for region, names in ((Region.ENCODER, self.encoder), (Region.MID, self.mid),
                              (Region.DECODER, self.decoder), (Region.OUTPUT, self.output)):
            if top in names:
                return region
        return Region.TIME

    @property
    def required(self) -> tuple[str, ...]:
        return (self.down, *self.mid, self.up)


DIFFUSERS = Layout(
    name="diffusers",
    encoder=("conv_in", "down_blocks"),
    mid=("mid_block",),
    decoder=("up_blocks",),
    output=("conv_norm_out", "conv_act", "conv_out"),
    down="down_blocks",
    up="up_blocks",
)
LDM = Layout(
    name="ldm",
    encoder=("input_blocks",),
    mid=("middle_block",),
    decoder=("output_blocks",),
    output=("out",),
    down="input_blocks",
    up="output_blocks",
)
LAYOUTS = (DIFFUSERS, LDM)


def find_layout(unet: nn.Module) -> Layout:
    """The first layout whose down, mid and up modules all exist on ``unet``."""
    children = {name for name, _ in unet.named_children()}
    for layout in LAYOUTS:
        if set(layout.required) <= children:
            return layout
    wanted = " or ".join(f"({', '.join(layout.required)})" for layout in LAYOUTS)
    raise ValueError(
        f"fxprop cannot find the regions of {type(unet).__name__}: it looked for the "
        f"top-level modules {wanted} and found {sorted(children)}"
    )


def module_path(node: fx.Node) -> str:
    """The innermost module path of ``node`` relative to the UNet, or "" for glue."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        if path == ROOT:
            return ""
        if path.startswith(ROOT + "."):
            return path[len(ROOT) + 1:]
    return ""


def label_nodes(graph: fx.Graph, layout: Layout) -> dict[fx.Node, Region]:
    """Region of every node; nodes outside any submodule are GLUE."""
    labels = {}
    for node in graph.nodes:
        path = module_path(node)
        labels[node] = layout.region_of(path.split(".")[0]) if path else Region.GLUE
    return labels
