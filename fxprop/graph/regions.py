"""Label the nodes of a captured UNet graph by region, from the module that produced them.

Every node of a ``torch.export`` graph carries ``nn_module_stack``: the chain of modules whose
``forward`` was running when the op was recorded. The innermost path (``down_blocks.1.resnets.0
.conv1``) tells which part of the UNet a node belongs to. A *layout* maps top-level module
names to regions; diffusers' and the original LDM code's names are built in. A user's own
names come in as ``regions={"encoder": [...], "decoder": [...], ...}``
(:func:`layout_from_regions`); a UNet with neither gets :data:`STRUCTURAL`, whose cut is found
from the graph's shape (:func:`fxprop.graph.cuts.structural_cut`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from .capture import ROOT

__all__ = ["Region", "Layout", "LAYOUTS", "STRUCTURAL", "REGION_NAMES", "find_layout",
           "layout_from_regions", "resolve_layout", "module_path", "label_nodes"]


class Region(enum.Enum):
    TIME = "time"          # time / class / added-condition embeddings
    ENCODER = "encoder"    # conv_in and the down blocks
    MID = "mid"            # the bottleneck
    DECODER = "decoder"    # the up blocks
    OUTPUT = "output"      # final norm, activation, conv_out
    GLUE = "glue"          # ops in the UNet's own forward, between blocks


@dataclass(frozen=True)
class Layout:
    """Module path prefixes of one UNet family, by region (unnamed modules are TIME)."""

    name: str
    encoder: tuple[str, ...]
    mid: tuple[str, ...]
    decoder: tuple[str, ...]
    output: tuple[str, ...]
    down: str      # the ModuleList of down blocks ("" if there is none)
    up: str        # the ModuleList of up blocks ("" if there is none)

    def region_of(self, path: str) -> Region:
        """Region of a module path (or top-level name): the one of its longest named prefix."""
        best, found = -1, Region.TIME
        for region, names in ((Region.ENCODER, self.encoder), (Region.MID, self.mid),
                              (Region.DECODER, self.decoder), (Region.OUTPUT, self.output)):
            for name in names:
                if len(name) > best and (path == name or path.startswith(name + ".")):
                    best, found = len(name), region
        return found

    @property
    def required(self) -> tuple[str, ...]:
        """What :func:`find_layout` looks for (a mid block may be absent: ``mid_block=None``)."""
        return (self.down, self.up)

    @property
    def is_structural(self) -> bool:
        """No decoder names: the cut is found from the graph's structure."""
        return not self.decoder


DIFFUSERS = Layout(
    name="diffusers",
    encoder=("conv_in", "transformer_in", "down_blocks"),  # transformer_in: UNet3D
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
#: A UNet without known names: :func:`fxprop.graph.cuts.encoder_cut` finds its bottleneck instead.
STRUCTURAL = Layout(name="structural", encoder=(), mid=(), decoder=(), output=(), down="",
                    up="")
#: The keys of ``regions=``.
REGION_NAMES = ("encoder", "mid", "decoder", "output")


def find_layout(unet: nn.Module) -> Layout:
    """The first layout whose down and up modules both exist on ``unet``."""
    children = {name for name, _ in unet.named_children()}
    for layout in LAYOUTS:
        if set(layout.required) <= children:
            return layout
    wanted = " or ".join(f"({', '.join(layout.required)})" for layout in LAYOUTS)
    raise ValueError(
        f"fxprop cannot find the regions of {type(unet).__name__}: it looked for the "
        f"top-level modules {wanted} and found {sorted(children)}; name its regions with "
        "regions={'encoder': [...], 'mid': [...], 'decoder': [...], 'output': [...]}"
    )


def layout_from_regions(unet: nn.Module, regions: Mapping[str, Any]) -> Layout:
    """A layout from the user's module prefixes, e.g. ``{"encoder": ["enc1", "enc2"],
    "mid": ["bottleneck"], "decoder": ["dec1", "dec2"], "output": ["head"]}``.

    Prefixes are dotted module paths (``"downs"``, ``"downs.0"``); ``"decoder"`` is required,
    the others only label nodes. Everything that reads the latent and does not come after a
    decoder or output module is cached at key steps.
    """
    if isinstance(regions, Layout):
        return regions
    if not isinstance(regions, Mapping):
        raise ValueError(f"regions must be a dict of {REGION_NAMES} to module prefixes, "
                         f"got {type(regions).__name__}")
    unknown = sorted(set(regions) - set(REGION_NAMES))
    if unknown:
        raise ValueError(f"regions has unknown keys {unknown}; the keys are {list(REGION_NAMES)}")
    named = {k: (v,) if isinstance(v, str) else tuple(v or ()) for k, v in regions.items()}
    if not named.get("decoder"):
        raise ValueError("regions must name the decoder, e.g. regions={'decoder': ['dec1', "
                         "'dec2'], 'output': ['head']}: the modules that run at every step")
    modules = {name for name, _ in unet.named_modules() if name}
    missing = [p for v in named.values() for p in v if p not in modules]
    if missing:
        children = sorted(name for name, _ in unet.named_children())
        raise ValueError(f"regions names {missing}, which {type(unet).__name__} does not have;"
                         f" its top-level modules are {children}")
    encoder, decoder = named.get("encoder", ()), named["decoder"]
    return Layout(name="regions", encoder=encoder, mid=named.get("mid", ()), decoder=decoder,
                  output=named.get("output", ()), down=encoder[0] if encoder else "",
                  up=decoder[0])


def resolve_layout(unet: nn.Module, regions: Mapping[str, Any] | Layout | None = None) -> Layout:
    """The user's ``regions`` if given, else a built-in layout, else :data:`STRUCTURAL`."""
    if regions is not None:
        return layout_from_regions(unet, regions)
    try:
        return find_layout(unet)
    except ValueError as err:
        if type(unet).forward is nn.Module.forward:  # nothing to capture a structure from
            raise ValueError(f"{type(unet).__name__} has no forward: {err}") from None
        return STRUCTURAL


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
        labels[node] = layout.region_of(path) if path else Region.GLUE
    return labels
