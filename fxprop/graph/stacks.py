"""Module stacks of a captured graph, resolved to module objects of the UNet.

``torch.export`` records on every node the modules whose ``forward`` was running
(``nn_module_stack``: key -> (path, class)). How it spells a path depends on the module tree:
normally the path from the traced root (``unet.input_blocks.0``), but when a module is
registered under two names (LDM's and ComfyUI's ``ResBlock``: ``self.h_upd = self.x_upd =
nn.Identity()``) it switches to the attribute path of each access, which starts wherever the
traced code first reached a module: from the UNet itself (``input_blocks.0``) when the traced
function is a ``forward`` bound outside the registered tree. So a recorded path is not trusted
as a string: it is looked up, from each possible root, as the module object it names, and
accepted only if that object is in the UNet and has the recorded class. The path is then
rewritten as that object's path in the UNet along the recorded access (a module shared by two
blocks keeps the block it ran in) under ``capture.ROOT``. Entries that name no module of the
UNet are dropped: their ops belong to the UNet's own forward (glue).
"""

from __future__ import annotations

from typing import Sequence

from torch import fx, nn

__all__ = ["canonical_stacks", "class_name"]


def class_name(cls: type) -> str:
    """A class as ``nn_module_stack`` records it (``module.qualname``)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def canonical_stacks(graph: fx.Graph, unet: nn.Module,
                     roots: Sequence[tuple[nn.Module, str]], prefix: str) -> None:
    """Rewrite every node's ``nn_module_stack`` in place to paths ``prefix.<path in unet>``.

    ``roots``: ``(module, path of unet in it)`` pairs that a recorded path may start from, in
    the order they are tried (the traced wrapper and ``(unet, "")``)."""
    resolved: dict[tuple[str, str], str | None] = {}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        new = {}
        for key, (path, cls) in stack.items():
            if (path, cls) not in resolved:
                resolved[path, cls] = _in_unet(path, cls, unet, roots, prefix)
            if resolved[path, cls] is not None:
                new[key] = (resolved[path, cls], cls)
        node.meta["nn_module_stack"] = new


def _in_unet(path: str, cls: str, unet: nn.Module, roots: Sequence[tuple[nn.Module, str]],
             prefix: str) -> str | None:
    """``prefix.<path in unet>`` of the module ``path`` names from one of ``roots``, if that
    module lies in ``unet`` and is of class ``cls``."""
    for root, base in roots:
        if base and not (path == base or path.startswith(base + ".")):
            continue  # names something of the root outside the UNet
        module = _submodule(root, path)
        if module is not None and class_name(type(module)) == cls:
            inner = path[len(base) + 1:] if base else path
            return f"{prefix}.{inner}" if inner else prefix
    return None


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    """The registered submodule at dotted ``path`` (``""``: ``root``), or None; reads only
    ``_modules``, so no property or ``__getattr__`` of the user's code runs."""
    module = root
    for part in path.split(".") if path else ():
        module = module.__dict__.get("_modules", {}).get(part)
        if module is None:
            return None
    return module
