"""What a captured graph depends on, derived from the module itself.

A captured graph bakes in everything about the UNet that is not a parameter value: its module
tree, the attention processors and their settings (IP-Adapter and LoRA scales, PAG layers,
slicing), adapters (active set, scales, merged or not), FreeU factors, hooks, dtype and device,
and which tensor objects are its parameters. :func:`fingerprint` hashes exactly that, read from
every module's attributes, so no list of methods that change a UNet has to be kept in step
with diffusers: a capture is reused only while the fingerprint is unchanged. Parameter *values*
are not part of it: captured graphs read the live parameters, so in-place edits need no new
capture.

:func:`skipped_hooks` names the hooks a captured graph would not run: those of submodules
(the graph inlines them) such as accelerate's sequential offload.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from torch import nn

__all__ = ["fingerprint", "skipped_hooks", "replaced_forward"]

#: Module attributes digested on their own (parameters and buffers by identity, dtype and
#: device; submodules by the walk itself).
_OWN = frozenset({"_parameters", "_buffers", "_modules"})
#: The root module's call wrappers (its hooks, accelerate's and diffusers' hook registries, a
#: replaced ``forward``): they run around the captured forward, not inside it, and accelerate's
#: model offload makes them anew at every pipeline call.
_CALL_WRAPPERS = frozenset({"forward", "_old_forward", "_hf_hook", "_diffusers_hook"})
#: How deep plain objects (attention processors, hook objects) are digested by value.
_DEPTH = 2
#: Functions are digested by identity (processors, which are callable objects, by value).
_FUNCTIONS = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial)


def fingerprint(module: nn.Module) -> int:
    """A hash of what a graph captured from ``module`` depends on (see the module docstring).

    Costs one walk over the module tree (about 20 ms for an SD-1.5 UNet on one CPU thread), so
    the runtime computes it once per generation, not per step.
    """
    root = _root_digest(module)
    return hash((root, *(_module_digest(m) for m in module.modules() if m is not module)))


def _root_digest(module: nn.Module) -> tuple:
    return _module_digest(module, lambda k: k in _CALL_WRAPPERS or k.startswith(
        ("_forward_hooks", "_forward_pre_hooks", "_backward")))


def _module_digest(module: nn.Module, skip: Any = None) -> tuple:
    state = module.__dict__
    return (id(module), type(module),
            tuple((k, _digest(v, 0)) for k, v in state.items()
                  if k not in _OWN and not (skip and skip(k))),
            tuple((k, _tensor(p)) for k, p in state["_parameters"].items()),
            tuple((k, _tensor(b)) for k, b in state["_buffers"].items()),
            tuple(state["_modules"]))


def _tensor(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (id(t), t.dtype, t.device, t.shape)


def _digest(value: Any, depth: int) -> Any:
    """A hashable digest of an attribute value: plain values by value, tensors and modules by
    identity, containers item by item, other objects by type and attributes (to ``_DEPTH``),
    so that a new processor object with the same settings digests the same."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype,
                                           torch.device)):
        return value
    if isinstance(value, torch.Tensor):
        return _tensor(value)
    if isinstance(value, nn.Module):
        return ("module", id(value))
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return (type(value).__name__, tuple(_digest(v, depth) for v in items))
    if isinstance(value, dict):
        return ("dict", tuple((_digest(k, depth), _digest(v, depth)) for k, v in value.items()))
    attributes = getattr(value, "__dict__", None)
    if depth < _DEPTH and attributes is not None and not isinstance(value, _FUNCTIONS):
        return (type(value), tuple((k, _digest(v, depth + 1)) for k, v in attributes.items()))
    return (type(value), id(value))


def skipped_hooks(module: nn.Module) -> list[str]:
    """Hooks on submodules of ``module``, as ``"path: what"``: a graph captured from
    ``module`` computes its submodules without calling them, so it would not run these."""
    found = []
    for path, sub in module.named_modules():
        if not path:
            continue  # the module's own hooks run: fxprop intercepts beneath them
        state = sub.__dict__
        for kind, label in (("_forward_hooks", "forward hooks"),
                            ("_forward_pre_hooks", "forward pre-hooks")):
            if state.get(kind):
                found.append(f"{path}: {label}")
        if "_hf_hook" in state:
            found.append(f"{path}: accelerate {type(state['_hf_hook']).__name__}")
        elif replaced_forward(sub):
            found.append(f"{path}: a replaced forward ({_name(state['forward'])})")
    return found


def replaced_forward(module: nn.Module) -> bool:
    """Whether ``module.forward`` is something other than its class's forward."""
    forward = module.__dict__.get("forward")
    if forward is None:
        return False
    return not (getattr(forward, "__self__", None) is module
                and getattr(forward, "__func__", None) is type(module).forward)


def _name(value: Any) -> str:
    return getattr(value, "__qualname__", None) or type(value).__name__
