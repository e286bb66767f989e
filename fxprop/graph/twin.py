"""A twin of a module tree for torch.export to trace: new module objects, the same tensors.

Non-strict ``torch.export`` swaps every parameter and buffer of the module it traces for a
fake tensor while it runs (``_reparametrize_module``). Done on the user's UNet, another thread
that runs the UNet meanwhile computes on fake tensors (errors, or symbolic values returned as
results) and breaks the capture in turn. So captures trace a twin: each module of the tree is
copied shallowly (its own ``__dict__``, ``_parameters``, ``_buffers`` and ``_modules`` dicts;
the same Parameter and buffer objects, processors and other attributes), so export's swaps
land in the twin's dicts, and the graph it makes reads the user's own tensors. A module that
appears twice in the tree (registered under two names) has one twin. An instance ``forward``
bound to the module is bound to its twin; any other (a wrapper of the original, such as
fxprop's own interception or a diffusers hook registry) is left out, so the twin runs its
class's forward and never calls back into the user's module.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

__all__ = ["twin", "rebind"]


def twin(module: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """A shallow twin of ``module``'s tree (see the module docstring)."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    # not copy.copy: a class's copy protocol may re-run __init__ (einops' Rearrange), and an
    # intercepted module's own __reduce_ex__ drops fxprop's hooks (fxprop.runtime.copying)
    double = memo[id(module)] = object.__new__(type(module))
    state = double.__dict__
    state.update(module.__dict__)
    state["_parameters"] = dict(module._parameters)
    state["_buffers"] = dict(module._buffers)
    state["_modules"] = {name: None if child is None else twin(child, memo)
                         for name, child in module._modules.items()}
    forward = state.pop("forward", None)
    if getattr(forward, "__self__", None) is module:  # a method of its own: the twin's
        state["forward"] = forward.__func__.__get__(double)
    return double


def rebind(forward: Callable[..., Any] | None, module: nn.Module,
           double: nn.Module) -> Callable[..., Any]:
    """``forward`` (a method bound to ``module``, or None: ``module`` itself) bound to
    ``double`` instead."""
    if forward is None:
        return double
    if getattr(forward, "__self__", None) is not module:
        raise ValueError(f"fxprop traces a method of the UNet, got {forward!r}")
    return forward.__func__.__get__(double)
