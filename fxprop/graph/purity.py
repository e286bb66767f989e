"""User code a trace runs once, where the UNet would run it at every step: side effects.

A capture runs the UNet's Python once, on fake tensors, and keeps only the tensor operations.
An attention processor (or a module's ``forward``) that also changes Python state, such as a
prompt-to-prompt style step counter or an attention store (Attend-and-Excite's), would do that
once, with fake tensors, instead of at every step with real ones. Nothing in a class says
whether it does; a trace shows it:

* the trace runs on a twin of the module tree (:func:`fxprop.graph.twin.twin`) in which every
  processor-like object (a callable attribute value that is not a module or a function) of a
  class from outside ``diffusers.models`` is a deep copy (:func:`isolate_processors`), so its
  side effects land on the copy, not on the user's object;
* after the trace, :func:`side_effects` compares the twin and the live UNet each with itself
  before the trace (:func:`~fxprop.graph.fingerprint.portable_digests`, module by module: counters,
  stored tensors, fake tensors that escaped), and names what changed.

diffusers' own processors (``diffusers.models``) are not copied: they are the ones known to
compute only tensors (a list by package, since a class cannot be proven pure by reading it);
the comparison still covers them.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .fingerprint import portable_digests

__all__ = ["SideEffects", "isolated", "isolate_processors", "side_effects",
           "check_no_side_effects"]

_OWN = frozenset({"_parameters", "_buffers", "_modules"})

#: Packages whose callable objects are known to compute only tensors.
PURE_PACKAGES = ("diffusers.models.", "torch.")


class SideEffects(ValueError):
    """A trace of the UNet changed Python state: a captured graph would not repeat it."""


def isolated(value: Any, memo: dict) -> Any:
    """``value``, or a deep copy of it (``memo`` shared across a tree: objects shared between
    processors stay shared) if it is a processor-like object of unknown purity."""
    if (isinstance(value, (nn.Module, type)) or not callable(value)
            or not hasattr(value, "__dict__") or _known_pure(type(value))):
        return value
    trial = dict(memo)  # a failed copy must leave no half-made objects in the shared memo
    try:
        copied = copy.deepcopy(value, trial)
    except Exception:  # not copyable (tensors with autograd history): traced as it is; its
        return value   # side effects, if any, are still found (on the live UNet)
    memo.update(trial)
    return copied


def isolate_processors(tree: nn.Module) -> nn.Module:
    """``tree`` (a twin: its modules' dicts are its own) with each module attribute replaced by
    :func:`isolated` (one memo for the tree); returned."""
    memo: dict = {}
    for module in tree.modules():
        state = module.__dict__
        for name, value in list(state.items()):
            if name not in _OWN:
                state[name] = isolated(value, memo)
    return tree


def _known_pure(cls: type) -> bool:
    return (getattr(cls, "__module__", "") or "").startswith(PURE_PACKAGES)


def side_effects(live: nn.Module, tree: nn.Module,
                 before: tuple[dict[str, tuple], dict[str, tuple]]) -> list[str]:
    """What a trace of ``tree`` (a twin of ``live``) changed: ``"path (what)"`` for each module
    of either whose portable digest differs from its own before the trace (``before``: the
    digests of ``live`` and of ``tree``; a twin may differ from its original from the start,
    e.g. modules whose copy protocol re-runs ``__init__``)."""
    changed = []
    for module, earlier in zip((live, tree), before):
        for path, digest in portable_digests(module).items():
            if earlier.get(path) != digest and path not in changed:
                changed.append(path)
    return [_describe(live, path) for path in changed]


def _describe(live: nn.Module, path: str) -> str:
    module = live.get_submodule(path)
    processor = module.__dict__.get("processor")
    what = type(processor).__name__ if processor is not None else type(module).__name__
    return f"{path or type(live).__name__} ({what})"


def check_no_side_effects(live: nn.Module, tree: nn.Module,
                          before: tuple[dict[str, tuple], dict[str, tuple]]) -> None:
    """Raise :class:`SideEffects` naming what a trace changed, if anything."""
    changed = side_effects(live, tree, before)
    if changed:
        raise SideEffects(
            f"tracing {type(live).__name__} changed Python state of {changed[:3]}"
            f"{' ...' if len(changed) > 3 else ''} (an attention processor or module that "
            "counts calls or stores tensors): a captured graph would not do that at every "
            "step, so fxprop cannot accelerate it; use processors that only compute tensors")
