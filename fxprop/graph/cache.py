"""The captured graphs of one UNet, keyed by the state they were taken in and the call signature.

One :class:`CaptureCache` belongs to each intercepted UNet (:mod:`fxprop.runtime.intercept`; in
ComfyUI the UNet module owns it: :func:`owned_cache`), so every runtime of that UNet shares it:
two pipelines built from the same components, a pipeline accelerated again with another policy,
a ``from_pipe`` copy per request. An entry is valid for one :meth:`~CaptureCache.state` (the
UNet's :func:`~fxprop.graph.fingerprint.fingerprint` and the grad and autocast modes, read at
the call that captures it) and one :class:`~fxprop.graph.capture.CallKey`; what the runtimes
derive from it (the parts of a cut, compiled or not) is kept with it, and so is a capture that
failed (it would fail again: it is not traced again). The cache is an LRU that never evicts
what the current run uses: a UNet that changes often (LoRA load/unload, PAG's processor swap)
keeps its last :data:`CAPTURE_CACHE_SIZE` captures, a run with more call signatures than that
keeps all of its own (up to :data:`RUN_LIMIT`), so a warm run captures nothing, and the graphs
of states it left are dropped with the tensors they hold. A graph holds the UNet's parameters it
read (shared, not copied); when a new graph is captured, the graphs holding tensors that are no
longer the UNet's (replaced by ``load_state_dict(assign=True)``, unloaded LoRA layers) are
dropped, so a checkpoint swap does not keep the old weights alive.
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

__all__ = ["CaptureCache", "Entry", "CAPTURE_CACHE_SIZE", "RUN_LIMIT", "TooManySignatures",
           "owned_cache"]


class TooManySignatures(ValueError):
    """A run needs more captured graphs than one run may hold (:data:`RUN_LIMIT`)."""


#: Captured graphs kept per UNet (distinct model states x call signatures, batched ones of
#: parallel mode included). A generation uses one or two; a few more let a pipeline switch
#: between states (PAG on and off, two LoRA sets) without capturing again.
CAPTURE_CACHE_SIZE = 8
#: The most signatures one run may capture: a run with more refuses (runs plain) rather than
#: holding graphs without bound (ComfyUI's area conditionings give a call shape each).
RUN_LIMIT = 64
#: The attribute under which a module owns its :class:`CaptureCache` (see :func:`owned_cache`;
#: the fingerprint leaves out ``_fxprop*`` attributes: they say nothing of what a module is).
OWNED = "_fxprop_captures"


@dataclass
class Entry:
    """One captured graph and what runtimes derived from it (parts per cut and options)."""

    captured: Captured | None
    derived: dict[Hashable, Any] = field(default_factory=dict)
    held: frozenset[int] = frozenset()  # ids of the UNet's tensors it holds (alive with it)
    refused: Exception | None = None  # why it cannot be captured (not traced again)
    run: int = 0                        # the last run (see CaptureCache.begin_run) that used it

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        if key not in self.derived:
            self.derived[key] = make()
        return self.derived[key]


class CaptureCache:
    """LRU of :class:`Entry` by ``(model state, call key)``; safe to share between threads (a
    capture runs under a lock: torch.export is not reentrant, and two threads that miss at once
    would capture the same graph twice)."""

    def __init__(self, size: int = CAPTURE_CACHE_SIZE, limit: int = RUN_LIMIT) -> None:
        if size < 1 or limit < size:
            raise ValueError(f"a capture cache holds at least 1 graph and its run limit at "
                             f"least as many, got size={size}, limit={limit}")
        self.size, self.limit = size, limit
        self._entries: OrderedDict[tuple[Hashable, CallKey], Entry] = OrderedDict()
        self._lock = threading.RLock()
        self._fingerprint = Fingerprinter()
        self._run = 0    # the current run
        self._used = 0   # entries the current run used
        self._most = 0   # the most entries one run used: the cache keeps at least as many

    def begin_run(self) -> None:
        """A new generation or sampler run starts: the entries it uses are kept while it runs,
        however many signatures it has (up to ``limit``), so its calls never evict each other's
        graphs; the entries of earlier runs are evicted least recently used first."""
        with self._lock:
            self._run, self._used = self._run + 1, 0

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
            if found is None:
                found = self._entries[state, key] = self._capture(capture, owner)
            if found.run != self._run:
                found.run, self._used = self._run, self._used + 1
                self._most = max(self._most, self._used)
            self._entries.move_to_end((state, key))
            self._evict()
            if found.refused is not None:
                raise found.refused.with_traceback(None)
            return found

    def _capture(self, capture: Callable[[], Captured], owner: nn.Module | None) -> Entry:
        """A new entry; a capture that fails for a reason that stays (the same state and
        signature fail again) is remembered as refused, and never traced again."""
        if self._used >= self.limit:
            raise TooManySignatures(f"this run calls the UNet with more than {self.limit} "
                                    "input signatures (shapes, options): fxprop keeps no more "
                                    "captured graphs for one run")
        try:
            captured = capture()
        except (MemoryError, torch.OutOfMemoryError):
            raise  # may pass: try again next time
        except Exception as err:
            return Entry(None, refused=err)
        owned = set() if owner is None else _tensor_ids(owner)
        if owner is not None:
            self._drop_stale(owned)
        return Entry(captured, held=_held(captured, owned))

    def _evict(self) -> None:
        """Drop the least recently used entries beyond ``size`` (or beyond what one run used,
        if more: the next run of the same workflow finds all of its graphs), none that this
        run used."""
        while len(self._entries) > max(self.size, self._most):
            old = next((k for k, e in self._entries.items() if e.run != self._run), None)
            if old is None:
                return
            del self._entries[old]

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
