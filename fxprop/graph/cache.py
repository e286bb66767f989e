"""The captured graphs of one UNet, keyed by the state they were taken in and the call signature.

One :class:`CaptureCache` belongs to each intercepted UNet (:mod:`fxprop.runtime.intercept`; in
ComfyUI the UNet module owns it: :func:`owned_cache`), so every runtime of that UNet shares it:
two pipelines built from the same components, a pipeline accelerated again with another policy,
a ``from_pipe`` copy per request. An entry is valid for
one :meth:`~CaptureCache.state` (the UNet's :func:`~fxprop.graph.fingerprint.fingerprint` and the
grad and autocast modes, read at the call that captures it) and one
:class:`~fxprop.graph.capture.CallKey`; what the runtimes derive from it (the parts of a cut,
compiled or not) is kept with it. The
cache is a bounded LRU: a UNet that changes often (LoRA load/unload, PAG's processor swap) keeps
its last :data:`CAPTURE_CACHE_SIZE` captures, and the graphs of states it left are dropped with
the tensors they hold. A graph holds the UNet's parameters it read (shared, not copied); when a
new graph is captured, the graphs holding tensors that are no longer the UNet's (replaced by
``load_state_dict(assign=True)``, unloaded LoRA layers) are dropped, so a checkpoint swap does
not keep the old weights alive.
"""

from __future__ import annotations

import itertools
import operator
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch
from torch import nn

from .calls import waiting_for
from .capture import CallKey, Captured
from .fingerprint import Fingerprinter, trace_modes
from .purity import SideEffects

__all__ = ["CaptureCache", "Entry", "CAPTURE_CACHE_SIZE", "owned_cache"]

#: Captured graphs kept per UNet (distinct model states x call signatures, batched ones of
#: parallel mode included). A generation uses one or two; a few more let a pipeline switch
#: between states (PAG on and off, two LoRA sets) without capturing again.
CAPTURE_CACHE_SIZE = 8
#: The attribute under which a module owns its :class:`CaptureCache` (see :func:`owned_cache`;
#: the fingerprint leaves out ``_fxprop*`` attributes: they say nothing of what a module is).
OWNED = "_fxprop_captures"


@dataclass
class Entry:
    """One captured graph and what runtimes derived from it (parts per cut and options)."""

    captured: Captured | None
    derived: dict[Hashable, Any] = field(default_factory=dict)
    held: frozenset[int] = frozenset()  # ids of the UNet's tensors it holds (alive with it)
    refused: SideEffects | None = None  # the state cannot be captured (not traced again)

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        if key not in self.derived:
            self.derived[key] = make()
        return self.derived[key]


class CaptureCache:
    """LRU of :class:`Entry` by ``(model state, call key)``; safe to share between threads (a
    capture runs under a lock: torch.export is not reentrant, and two threads that miss at once
    would capture the same graph twice)."""

    def __init__(self, size: int = CAPTURE_CACHE_SIZE) -> None:
        if size < 1:
            raise ValueError(f"a capture cache holds at least 1 graph, got size={size}")
        self.size = size
        self._entries: OrderedDict[tuple[Hashable, CallKey], Entry] = OrderedDict()
        self._lock = threading.RLock()
        self._fingerprint = Fingerprinter()

    def __len__(self) -> int:
        return len(self._entries)

    def state(self, unet: nn.Module, sample: torch.Tensor) -> Hashable:
        """What a graph captured from ``unet`` now, for a call with ``sample``, bakes in: its
        fingerprint and the grad and autocast modes of the CPU and the sample's device (read
        at every planned call: about 2.7 ms for SD-1.5's 709 modules on one CPU thread, where
        nothing changed)."""
        return (self._fingerprint(unet), trace_modes(sample.device.type))

    def entry(self, state: Hashable, key: CallKey, capture: Callable[[], Captured],
              owner: nn.Module | None = None) -> Entry:
        """The entry of ``(state, key)``, captured by ``capture()`` from ``owner`` on a miss
        (then entries holding tensors ``owner`` no longer has are dropped)."""
        with waiting_for(self._lock):  # the holder may be capturing: see fxprop.graph.calls
            found = self._entries.get((state, key))
            if found is not None and found.refused is not None:
                raise found.refused
            if found is None:
                try:
                    captured = capture()
                except SideEffects as err:
                    self._entries[state, key] = Entry(None, refused=err)
                    raise
                owned = set() if owner is None else _tensor_ids(owner)
                found = self._entries[state, key] = Entry(captured,
                                                          held=_held(captured, owned))
                if owner is not None:
                    self._drop_stale(owned)
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
            self._entries.move_to_end((state, key))
            return found

    def _drop_stale(self, owned: set[int]) -> None:
        for stale in [k for k, e in self._entries.items() if not e.held <= owned]:
            del self._entries[stale]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __deepcopy__(self, memo: dict) -> "CaptureCache":
        return CaptureCache(self.size)  # captures are of one module object: a copy has none

    def __reduce__(self) -> tuple:
        return CaptureCache, (self.size,)


def owned_cache(module: nn.Module) -> CaptureCache:
    """The capture cache ``module`` owns, in its ``__dict__`` (made on first use): it lives and
    dies with the module. A cache beside the module, weakly keyed by it, never dies: its
    graphs and fingerprint memo refer to the module. Copies and pickles of the module get an
    empty one."""
    cache = module.__dict__.get(OWNED)
    if cache is None:
        cache = module.__dict__[OWNED] = CaptureCache()
    return cache


def _tensor_ids(module: nn.Module) -> set[int]:
    return {id(t) for t in itertools.chain(module.parameters(), module.buffers())}


def _held(captured: Captured, owned: set[int]) -> frozenset[int]:
    """Which of the tensors ``owned`` (by id) ``captured``'s graph holds."""
    graph_module = captured.module
    tensors = [operator.attrgetter(n.target)(graph_module)
               for n in graph_module.graph.find_nodes(op="get_attr")]
    return frozenset(i for i in map(id, tensors) if i in owned)
