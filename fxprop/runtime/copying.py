"""What a copy of something fxprop changed is: the plain object (``copy.deepcopy``, ``pickle``,
``torch.save``).

fxprop intercepts a UNet (and gates a ControlNet) with diffusers' hook registry, which replaces
the module's ``forward`` by a closure over the original module: a deep copy would keep calling
the *original* module's hook and weights, and pickling fails on the closure and on the capture
cache's lock. So an intercepted module reduces to its state without fxprop's hooks (as after
:func:`fxprop.restore`): the copy is a plain module, never a second runtime sharing captures of
another module's parameters. An accelerated pipeline reduces to its original class without its
adapter. Accelerate the copy again to accelerate it.

The reduction is an instance attribute ``__reduce_ex__`` (pickle and copy look it up on the
instance), set while fxprop's hook is installed and removed with it, so the user's class is
never touched. It never raises: wrappers above fxprop's (accelerate's offload hook, other
diffusers hooks) are left out of the copy too, which is the bare module.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

__all__ = ["copies_plain", "forget", "plain_reduce"]

_REDUCE = "__reduce_ex__"
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

