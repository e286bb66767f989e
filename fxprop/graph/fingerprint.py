"""What a captured graph depends on, derived from the module itself.

A captured graph bakes in everything about the UNet that is not a parameter value: its module
tree, the attention processors and their settings (IP-Adapter and LoRA scales, PAG layers,
slicing), adapters (active set, scales, merged or not), FreeU factors, hooks, dtype and device,
and which tensor objects are its parameters. :func:`fingerprint` hashes exactly that, read from
every module's attributes, so no list of methods that change a UNet has to be kept in step
with diffusers: a capture is reused only while the fingerprint is unchanged. Parameter *values*
are not part of it: captured graphs read the live parameters, so in-place edits need no new
capture. The grad and autocast modes a trace also bakes in are read by :func:`trace_modes`.

:class:`Fingerprinter` reads the fingerprint again at every UNet call at a fraction of its cost
(only modules whose attributes changed are digested again); :func:`portable_fingerprint` is
its information without object identities, which processes compare.

:func:`skipped_hooks` names the hooks a captured graph would not run: those of submodules
(the graph inlines them) such as accelerate's sequential offload.
"""

from __future__ import annotations

import functools
import hashlib
import operator
import types
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["fingerprint", "Fingerprinter", "portable_fingerprint", "portable_digests",
           "weights_digest",
           "trace_modes", "skipped_hooks", "replaced_forward"]

#: Module attributes digested on their own (parameters and buffers by identity, dtype and
#: device; submodules by the walk itself).
_OWN = frozenset({"_parameters", "_buffers", "_modules"})
#: The root module's call wrappers (its hooks, accelerate's and diffusers' hook registries, a
#: replaced ``forward``): they run around the captured forward, not inside it, and accelerate's
#: model offload makes them anew at every pipeline call.
_CALL_WRAPPERS = frozenset({"forward", "_old_forward", "_hf_hook", "_diffusers_hook",
                            "__reduce_ex__"})  # the last: how fxprop's copies reduce
#: How deep plain objects (attention processors, hook objects) are digested by value.
_DEPTH = 2
#: Functions are digested by identity (processors, which are callable objects, by value).
_FUNCTIONS = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial)


def fingerprint(module: nn.Module) -> int:
    """A hash of what a graph captured from ``module`` depends on (see the module docstring).

    Costs one walk over the module tree (about 20 ms for an SD-1.5 UNet on one CPU thread);
    :class:`Fingerprinter` gives the same value at a fraction of that when little changed.
    """
    root = hash(_root_digest(module))
    return hash((root, *(hash(_module_digest(m)) for m in module.modules() if m is not module)))


def _root_skip(key: str) -> bool:
    """Whether a root attribute is left out: call wrappers, hooks, and what fxprop keeps on the
    module (``_fxprop*``: its captures, which say nothing of what the module is)."""
    return key in _CALL_WRAPPERS or key.startswith(
        ("_forward_hooks", "_forward_pre_hooks", "_backward", "_fxprop"))


def _root_digest(module: nn.Module) -> tuple:
    return _module_digest(module, _root_skip)


def trace_modes(device_type: str) -> tuple:
    """The process state a trace bakes in besides the module: grad and inference mode, and
    autocast (enabled, dtype) for the CPU and ``device_type`` (a graph captured under bf16
    autocast computes in bf16 whatever the mode it later runs under)."""
    types = sorted({"cpu", device_type})
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            tuple((t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in types))


class Fingerprinter:
    """:func:`fingerprint` of one module tree, read again cheaply: each module's digest is kept
    with the identity of its attribute values and the digests of its mutable ones (containers,
    processors, tensors' metadata), and recomputed only when those differ. Identity suffices for
    the rest: an immutable value held by the module cannot change while it is held. Cheap
    enough to read at every UNet call (see tools/bench_fingerprint.py), so a capture is keyed by
    the state it is taken in, and a change made by a callback mid-generation is seen."""

    def __init__(self) -> None:
        self._last: tuple[nn.Module | None, dict[int, _Memo]] = (None, {})

    def __call__(self, module: nn.Module) -> int:
        root, memo = self._last  # one tuple: threads may read at once, each sees a whole memo
        entries = list(memo.values())
        # every module valid, children lists included: the same tree, the same digests
        if root is not module or not all(e.valid() for e in entries):
            entries = [_current(memo.get(id(m)), m, m is module) for m in module.modules()]
            self._last = (module, {id(e.module): e for e in entries})
        return hash(tuple(e.hash for e in entries))


_CONTAINERS = (dict, list, set, tuple, frozenset)
_IMMUTABLE = frozenset({type(None), bool, int, float, str, bytes, torch.dtype, torch.device,
                        type})


def _current(entry: "_Memo | None", module: nn.Module, root: bool) -> "_Memo":
    return entry if entry is not None and entry.module is module and entry.valid() else _Memo(
        module, root)


class _Memo:
    """One module's digest and what it was computed from (see :class:`Fingerprinter`)."""

    __slots__ = ("module", "type", "keys", "values", "empty", "full", "state", "digest", "hash")

    def __init__(self, module: nn.Module, root: bool) -> None:
        skip = _root_skip if root else None
        self.module, self.type = module, type(module)
        attributes = module.__dict__
        self.keys, self.values = tuple(attributes), tuple(attributes.values())
        mutable = [v for k, v in attributes.items() if not (skip and skip(k)) and _mutable(v)]
        # most are empty hook dicts: one C-level any() tells whether one was filled
        self.empty = tuple(v for v in mutable if isinstance(v, _CONTAINERS) and not v)
        full = [v for v in mutable if not (isinstance(v, _CONTAINERS) and not v)]
        # dicts of tensors and modules (parameters, buffers, children) by identity and meta
        self.full = tuple((v, _of_tensors(v)) for v in full)
        self.state = self._state()
        self.digest = (_root_digest(module) if root else _module_digest(module))
        self.hash = hash(self.digest)  # tuples do not cache their hash: nested ones cost

    def _state(self) -> tuple:
        return tuple(_shallow(v) if quick else _digest(v, 0) for v, quick in self.full)

    def valid(self) -> bool:
        """Whether the module's digest is still :attr:`digest`."""
        attributes = self.module.__dict__
        return (type(self.module) is self.type and tuple(attributes) == self.keys
                and all(map(operator.is_, attributes.values(), self.values))
                and not any(self.empty) and self._state() == self.state)


def _of_tensors(value: Any) -> bool:
    return isinstance(value, dict) and all(
        v is None or isinstance(v, (torch.Tensor, nn.Module)) for v in value.values())


def _shallow(items: dict) -> tuple:
    """A dict of tensors and modules: keys, values' identities and tensors' metadata (no
    references kept: a captured graph keeps the tensors it holds alive, so their ids are not
    reused while a capture keyed by them exists)."""
    return (tuple(items), tuple(map(id, items.values())),
            tuple((t.dtype, t.device, t.shape) for t in items.values()
                  if isinstance(t, torch.Tensor)))


def _mutable(value: Any) -> bool:
    """Whether ``value`` can change while the same object (a tuple only through its items)."""
    kind = type(value)
    if kind in _IMMUTABLE or isinstance(value, (nn.Module, *_FUNCTIONS)):
        return False
    if kind is tuple or kind is frozenset:
        return not all(type(v) in _IMMUTABLE for v in value)
    # diffusers' configs (FrozenDict) refuse every change once made; register_to_config sets
    # a new one. The one class of a library named here: 17 of them cost a third of a read.
    return not _frozen(value)


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


def portable_fingerprint(module: nn.Module) -> int:
    """What :func:`fingerprint` reads, without object identities or device indices: equal in
    two processes holding equal modules (the ranks of a process group compare it), whatever
    their string-hash seeds: sets and dicts are read in a sorted order, and diffusers configs
    without their private entries. A full walk (tens of ms for SD-1.5): read once per
    distributed generation. A 48-bit integer."""
    sha = hashlib.sha1()
    for digest in portable_digests(module).items():
        sha.update(repr(digest).encode())
    return int(sha.hexdigest()[:12], 16)


def portable_digests(module: nn.Module) -> dict[str, tuple]:
    """Each submodule's part of :func:`portable_fingerprint`, by path: two module trees
    compare module by module (a trace's side effects are found this way)."""
    found = {}
    for path, sub in module.named_modules():
        skip = _root_skip if sub is module else None
        attributes = tuple((k, _portable(v, 0)) for k, v in sub.__dict__.items()
                           if k not in _OWN and not (skip and skip(k)))
        tensors = tuple((k, _portable(t, 0)) for k, t in (*sub._parameters.items(),
                                                           *sub._buffers.items()))
        found[path] = (_qualname(type(sub)), attributes, tensors)
    return found


def _portable(value: Any, depth: int) -> Any:
    """:func:`_digest` with names for identities (see :func:`portable_fingerprint`)."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype)):
        return value
    if isinstance(value, torch.device):
        return value.type
    if isinstance(value, torch.Tensor):
        kind = "fake tensor" if isinstance(value, FakeTensor) else "tensor"
        return (kind, value.dtype, tuple(value.shape), value.device.type)
    if isinstance(value, type):
        return _qualname(value)
    if isinstance(value, nn.Module):
        return ("module", _qualname(type(value)))
    if isinstance(value, _FUNCTIONS):
        return ("function", _name(value))
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_portable(v, depth) for v in value]
        return (type(value).__name__, tuple(sorted(items, key=repr) if isinstance(
            value, (set, frozenset)) else items))
    if isinstance(value, dict):
        items = ((_portable(k, depth), _portable(v, depth)) for k, v in value.items()
                 if not (_frozen(value) and isinstance(k, str) and k.startswith("_")))
        return ("dict", tuple(sorted(items, key=repr)))  # dicts are equal in any order
    attributes = getattr(value, "__dict__", None)
    if depth < _DEPTH and attributes is not None:
        return (_qualname(type(value)), tuple((k, _portable(v, depth + 1))
                                              for k, v in attributes.items()))
    return _qualname(type(value))


def _frozen(value: Any) -> bool:
    """Whether ``value`` is a diffusers config (a ``FrozenDict``, frozen once made). Its private
    entries say how it was made and saved, not what the model is: ``_use_default_values`` is a
    list made from a set, in an order that follows the process's string-hash seed, and
    ``_name_or_path`` the folder it was loaded from."""
    return bool(getattr(value, "_FrozenDict__frozen", False))


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


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


#: Groups of parameters in :func:`weights_digest`, and values sampled from each parameter.
DIGEST_GROUPS, DIGEST_SAMPLES = 16, 64


def weights_digest(unet: nn.Module) -> tuple[float, ...]:
    """A cheap digest of the UNet's weights, the same in any dtype or device: the parameters in
    :data:`DIGEST_GROUPS` groups (in order); a group's value is ``sum(s_k * w_k) / sum(|w_k|)``
    over :data:`DIGEST_SAMPLES` evenly strided values of each of its parameters, with
    alternating signs ``s_k``, so weights drawn independently (another checkpoint, another
    seed) give values about 0.03 apart while a rounding of the same weights moves them by
    about 1e-4. Parameters on the meta device (not loaded) are left out."""
    tensors = [p.detach() for p in unet.parameters() if p.device.type != "meta"]
    sums = torch.zeros(2, DIGEST_GROUPS, dtype=torch.float64)
    for i, tensor in enumerate(tensors):
        flat = tensor.reshape(-1)
        sample = flat[::max(1, flat.numel() // DIGEST_SAMPLES)][:DIGEST_SAMPLES]
        sample = sample.to("cpu", torch.float64)
        signs = 1 - 2 * (torch.arange(len(sample)) % 2)
        group = i * DIGEST_GROUPS // max(len(tensors), 1)
        sums[0, group] += (sample * signs).sum()
        sums[1, group] += sample.abs().sum()
    return tuple(round(v, 6) for v in (sums[0] / sums[1].clamp_min(1e-30)).tolist())
