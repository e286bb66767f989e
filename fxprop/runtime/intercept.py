"""Intercept a UNet's ``forward`` in place, beneath every other wrapper of it.

The UNet stays the user's module (in ``pipe.unet``, a diffusers ``ModelMixin`` with all its
methods): :class:`Intercept` replaces only its innermost ``forward``. On a diffusers model it is
registered with diffusers' own :class:`HookRegistry` (so diffusers' and accelerate's hooks
keep their order around it); on any other module (LDM's or ComfyUI's ``UNetModel``, a
user's), where diffusers may not even be installed, it takes the same place itself: the
module's instance ``forward`` over its class's, removed by :func:`release`. When the calling
thread has an active :class:`~fxprop.runtime.follow.Scope` of a runtime of this UNet (a pipeline
call, or a call of an :class:`~fxprop.AcceleratedUNet`), the call runs the runtime's planned step;
otherwise, and whenever the runtime cannot follow its plan, it runs the original forward.
Every call runs under :func:`fxprop.graph.calls.running` (a capture waits for it). Everything that
wraps the UNet above it (its forward hooks and pre-hooks, accelerate's offload hook, later
diffusers hooks) runs on every call as before.

The hook also owns the UNet's :class:`~fxprop.graph.cache.CaptureCache`, so every runtime of the
UNet shares its captured graphs.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable

from torch import nn

from ..graph.cache import CaptureCache
from ..graph.calls import running
from ..graph.fingerprint import replaced_forward, skipped_hooks
from .copying import copies_plain, forget
from .follow import active_scope

__all__ = ["Intercept", "intercept", "release", "intercepted", "registry_of", "as_model_hook",
           "add_beneath", "remove_beneath", "NOT_PLANNED", "NAME"]

#: The hook's name in the UNet's registry.
NAME = "fxprop"
#: Returned by a runtime's planned step when the call must run the original forward.
NOT_PLANNED = object()


@functools.cache
def as_model_hook(cls: type) -> type:
    """``cls`` as a diffusers ``ModelHook`` (diffusers is imported when a module is first
    intercepted, not with fxprop: loading an export needs neither it nor the UNet's class)."""
    from diffusers.hooks import ModelHook
    return type(cls.__name__, (cls, ModelHook), {"__module__": cls.__module__,
                                                 "__qualname__": cls.__qualname__})


def registry_of(module: nn.Module) -> Any:
    """``module``'s diffusers ``HookRegistry`` (made if it has none)."""
    from diffusers.hooks import HookRegistry
    return HookRegistry.check_if_exists_or_initialize(module)


class Intercept:
    """Runs the active runtime's planned step in place of the UNet's original forward (a
    diffusers ``ModelHook``: see :func:`as_model_hook`)."""

    fn_ref: Any

    def __init__(self) -> None:
        super().__init__()
        self.captures = CaptureCache()
        self.users: weakref.WeakSet = weakref.WeakSet()  # the runtimes of this UNet

    @property
    def original_forward(self) -> Callable[..., Any]:
        """The UNet's forward beneath this hook (what captures trace and fallbacks run)."""
        return self.fn_ref.original_forward

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with running(module):  # never while another thread captures it (fxprop.graph.calls)
            scope = active_scope()
            if scope is not None and getattr(scope.follower, "unet", None) is module:
                out = scope.follower.planned(args, kwargs)
                if out is not NOT_PLANNED:
                    return out
            return self.fn_ref.original_forward(*args, **kwargs)


def is_diffusers_model(module: nn.Module) -> bool:
    """Whether ``module`` is a diffusers model (read from its class; imports nothing)."""
    return any(cls.__module__.split(".")[0] == "diffusers" for cls in type(module).__mro__)


def intercepted(unet: nn.Module) -> Intercept | None:
    """The :class:`Intercept` installed on ``unet``, if any."""
    forward = unet.__dict__.get("forward")
    if isinstance(forward, _Forward):
        return forward.hook
    registry = getattr(unet, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(NAME)


class _Forward:
    """``module.forward`` while :class:`Intercept` runs there without diffusers' registry (a
    copy of the module leaves it out, as it leaves out the registry:
    :mod:`fxprop.runtime.copying`)."""

    def __init__(self, hook: Intercept, module: nn.Module) -> None:
        self.hook, self.module = hook, module

    @property
    def original_forward(self) -> Callable[..., Any]:
        return _class_forward(self.module)

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        """What ``inspect.signature`` reads: the module's own forward signature."""
        return self.original_forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.hook.new_forward(self.module, *args, **kwargs)


def _class_forward(module: nn.Module) -> Callable[..., Any]:
    return type(module).forward.__get__(module)


def _install(unet: nn.Module) -> Intercept:
    """:class:`Intercept` as ``unet``'s instance ``forward``, over its class's forward."""
    _check_forward(unet)
    hook = Intercept()
    hook.fn_ref = unet.forward = _Forward(hook, unet)
    return hook


def intercept(unet: nn.Module, user: Any) -> Intercept:
    """Install :class:`Intercept` on ``unet`` for ``user`` (a runtime); once per UNet, later
    runtimes share it.

    Raises:
        ValueError: ``unet`` cannot be intercepted correctly: its submodules have hooks that a
            captured graph would not run, or its forward is already replaced by something
            fxprop cannot run beneath (naming it, and what to do).
    """
    check_hooks(unet)
    hook = intercepted(unet)
    if hook is None and is_diffusers_model(unet):
        hook = as_model_hook(Intercept)()
        add_beneath(unet, hook, NAME, check=_check_forward)
    elif hook is None:
        hook = _install(unet)
    copies_plain(unet, NAME)  # a deep copy or pickle of the UNet is the plain UNet
    hook.users.add(user)
    return hook


def release(unet: nn.Module, user: Any) -> None:
    """``user`` no longer runs ``unet``; the last one removes :class:`Intercept` (and the
    captured graphs with it)."""
    hook = intercepted(unet)
    if hook is None:
        return
    hook.users.discard(user)
    if len(hook.users):
        return
    if isinstance(unet.__dict__.get("forward"), _Forward):
        del unet.forward  # the class's forward again
    else:
        remove_beneath(unet, NAME)
    forget(unet, NAME)


def add_beneath(module: nn.Module, hook: Any, name: str, check: Any = None) -> None:
    """Register ``hook`` in ``module``'s registry beneath accelerate's hook (model offload),
    which is lifted and put back on top: it keeps running around the hook, and diffusers'
    re-installing it at every call (``maybe_free_model_hooks``) keeps the hook in place.
    ``check(module)`` runs with accelerate's hook lifted."""
    offload = _detach_accelerate_hook(module)
    try:
        if check is not None:
            check(module)
        registry_of(module).register_hook(hook, name)
    finally:
        _attach(module, offload)


def remove_beneath(module: nn.Module, name: str) -> None:
    """Remove hook ``name`` added by :func:`add_beneath` (the registry restores ``forward``
    beneath accelerate's hook, not over it)."""
    offload = _detach_accelerate_hook(module)
    try:
        registry_of(module).remove_hook(name, recurse=False)
    finally:
        _attach(module, offload)


def _attach(module: nn.Module, hook: Any) -> None:
    if hook is not None:
        from accelerate.hooks import add_hook_to_module
        add_hook_to_module(module, hook)


def check_hooks(unet: nn.Module) -> None:
    """Raise if submodules of ``unet`` have hooks (a captured graph inlines submodules)."""
    hooks = skipped_hooks(unet)
    if hooks:
        raise ValueError(
            f"fxprop runs {type(unet).__name__} as a captured graph, which computes its "
            f"submodules without calling them, so their hooks would not run: {hooks[:3]}"
            f"{' ...' if len(hooks) > 3 else ''}. Remove them (accelerate's sequential CPU "
            "offload and diffusers' group offloading and block caches install such hooks; "
            "enable_model_cpu_offload works with fxprop)")


def _detach_accelerate_hook(unet: nn.Module) -> Any:
    """Take accelerate's hook (model CPU offload) off ``unet``, to put it back above fxprop."""
    hook = getattr(unet, "_hf_hook", None)
    if hook is None:
        return None
    from accelerate.hooks import remove_hook_from_module
    remove_hook_from_module(unet)
    return hook


def _check_forward(unet: nn.Module) -> None:
    """Raise unless ``unet.forward`` is its class's (or already behind diffusers' registry
    with no hooks): a wrapper beneath fxprop would be skipped by the captured graph."""
    registry = getattr(unet, "_diffusers_hook", None)
    if registry is not None and registry.hooks:
        raise ValueError(f"{type(unet).__name__} already has diffusers hooks "
                         f"{list(registry.hooks)}; fxprop must run beneath them: remove them, "
                         "call fxprop.accelerate, then add them again")
    if not replaced_forward(unet):
        return
    raise ValueError(f"{type(unet).__name__}.forward is replaced by {unet.forward!r}; fxprop "
                     "intercepts the UNet's own forward and would skip that wrapper: accelerate "
                     "the module before wrapping it")
