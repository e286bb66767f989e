"""What a copy of something fxprop changed is: the plain object (``copy.deepcopy``, ``pickle``,
``torch.save``).

fxprop intercepts a UNet (and gates a ControlNet) with diffusers' hook registry, which replaces
the module's ``forward`` by a closure over the original module: a deep copy would keep calling
the *original* module's hook and weights, and pickling fails on the closure and on the capture
cache's lock. So an intercepted module reduces to its state without fxprop's hooks (as after
:func:`fxprop.restore`): the copy is a plain module, never a second runtime sharing captures of
another module's parameters. An accelerated pipeline reduces to its original class without its
adapter. Accelerate the copy again to accelerate it.

:func:`shallow_tree` is the other copy fxprop makes: new module objects sharing the parameter
tensors, which a capture traces instead of the live UNet (torch.export swaps fake parameters
into the module it traces; another thread's eager call of the UNet would compute on them).

The reduction is an instance attribute ``__reduce_ex__`` (pickle and copy look it up on the
instance), set while fxprop's hook is installed and removed with it, so the user's class is
never touched. It never raises: wrappers above fxprop's (accelerate's offload hook, other
diffusers hooks) are left out of the copy too, which is the bare module.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

__all__ = ["copies_plain", "forget", "plain_reduce", "shallow_tree", "bound_to"]

_REDUCE = "__reduce_ex__"
_OWN = frozenset({"_parameters", "_buffers", "_modules"})
_REGISTRY = "_diffusers_hook"


class _PlainReduce:
    """``module.__reduce_ex__``: the bare module's reduction (``names``: fxprop's hooks on it,
    which keep this reduction installed until the last is removed)."""

    def __init__(self, module: nn.Module, names: frozenset[str]) -> None:
        self.module, self.names = weakref.ref(module), names

    def __call__(self, protocol: int) -> tuple:
        module = self.module()
        func, args, state, *rest = type(module).__reduce_ex__(module, protocol)
        return (func, args, _without_hooks(dict(state or {})), *rest)


def copies_plain(module: nn.Module, *names: str) -> None:
    """Make copies of ``module`` plain modules without the hooks ``names`` (added to those of
    an earlier call)."""
    earlier = module.__dict__.get(_REDUCE)
    known = earlier.names if isinstance(earlier, _PlainReduce) else frozenset()
    module.__dict__[_REDUCE] = _PlainReduce(module, known | frozenset(names))


def forget(module: nn.Module, *names: str) -> None:
    """Undo :func:`copies_plain` for ``names`` (all of them gone: plain copying as before)."""
    earlier = module.__dict__.get(_REDUCE)
    if not isinstance(earlier, _PlainReduce):
        return
    left = earlier.names - frozenset(names)
    if left:
        module.__dict__[_REDUCE] = _PlainReduce(module, left)
    else:
        del module.__dict__[_REDUCE]


#: The root's call wrappers a copy leaves out: fxprop's (and diffusers') hook registry,
#: accelerate's offload hook, and the instance ``forward`` they install (closures over the
#: original module: a copy keeping them would call the original).
_WRAPPERS = (_REGISTRY, "forward", "_hf_hook", "_old_forward", _REDUCE)


def _without_hooks(state: dict) -> dict:
    """``state`` (a copy of the module's ``__dict__``) as the bare module: its class's
    forward, no hooks on it (accelerate's offload and other diffusers hooks are left out too;
    the copy is a plain module to accelerate, offload or hook again)."""
    for wrapper in _WRAPPERS:
        state.pop(wrapper, None)
    return state


def plain_reduce(obj: Any, cls: type, attribute: str, protocol: int) -> tuple:
    """The reduction of ``obj`` as an instance of ``cls`` without ``obj.<attribute>`` (an
    accelerated pipeline: its original class, no adapter)."""
    func, args, state, *rest = object.__reduce_ex__(obj, protocol)
    if args and args[0] is type(obj):  # pickle checks __newobj__'s class: build it ourselves
        func, args = _new, (cls, *args[1:])
    state = {k: v for k, v in (state or {}).items() if k != attribute}
    return (func, args, state, *rest)


def _new(cls: type, *args: Any) -> Any:
    """An uninitialised ``cls`` (what ``copyreg.__newobj__`` makes; the state follows)."""
    return cls.__new__(cls, *args)


def shallow_tree(root: nn.Module, isolate: Any = None) -> nn.Module:
    """``root``'s module tree as new module objects (each with copies of its parameter, buffer
    and submodule dicts) holding the same tensors and attribute values, without ``root``'s
    call wrappers: a capture that swaps tensors into it leaves the live modules untouched, and
    the graph it records reads the live parameters. About 2 ms for SD-1.5, once per capture;
    measured against a per-UNet lock, it lets other threads keep running the UNet meanwhile.
    ``isolate(value, memo)`` may replace attribute values (one ``memo`` for the tree):
    :func:`fxprop.purity.isolated` copies processors whose side effects must not reach the
    user's objects."""
    copies: dict[int, nn.Module] = {}
    memo: dict = {}

    def copy_of(module: nn.Module) -> nn.Module:
        if id(module) not in copies:
            new = copies[id(module)] = object.__new__(type(module))
            new.__dict__.update(module.__dict__ if isolate is None else {
                k: v if k in _OWN else isolate(v, memo) for k, v in module.__dict__.items()})
            new.__dict__["_parameters"] = dict(module._parameters)
            new.__dict__["_buffers"] = dict(module._buffers)
            new.__dict__["_modules"] = {k: None if m is None else copy_of(m)
                                        for k, m in module._modules.items()}
        return copies[id(module)]

    top = copy_of(root)
    for wrapper in (_REGISTRY, "forward", _REDUCE, "_hf_hook", "_old_forward"):
        top.__dict__.pop(wrapper, None)
    return top


def bound_to(forward: Any, module: nn.Module, original: nn.Module) -> Any:
    """``forward`` (a method of ``original``) as the same method of ``module``, else None."""
    if getattr(forward, "__self__", None) is not original or not hasattr(forward, "__func__"):
        return None
    return forward.__func__.__get__(module)
