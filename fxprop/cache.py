"""The captured graphs of one UNet, keyed by the state they were taken in and the call signature.

One :class:`CaptureCache` belongs to each intercepted UNet (:mod:`fxprop.intercept`), so every
runtime of that UNet shares it: two pipelines built from the same components, a pipeline
accelerated again with another policy, a ``from_pipe`` copy per request. An entry is valid for
one :meth:`~CaptureCache.state` (the UNet's :func:`~fxprop.fingerprint.fingerprint` and the
grad and autocast modes, read at the call that captures it) and one
:class:`~fxprop.capture.CallKey`; what the runtimes derive from it (the parts of a cut,
compiled or not) is kept with it. The
cache is a bounded LRU: a UNet that changes often (LoRA load/unload, PAG's processor swap) keeps
its last :data:`CAPTURE_CACHE_SIZE` captures, and the graphs of states it left are dropped with
the tensors they hold.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch
from torch import nn

from .capture import CallKey, Captured
from .fingerprint import Fingerprinter, trace_modes

__all__ = ["CaptureCache", "Entry", "CAPTURE_CACHE_SIZE"]

#: Captured graphs kept per UNet (distinct model states x call signatures, batched ones of
#: parallel mode included). A generation uses one or two; a few more let a pipeline switch
#: between states (PAG on and off, two LoRA sets) without capturing again.
CAPTURE_CACHE_SIZE = 8


@dataclass
class Entry:
    """One captured graph and what runtimes derived from it (parts per cut and options)."""

    captured: Captured
    derived: dict[Hashable, Any] = field(default_factory=dict)

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
        at every planned call: about 3 ms for SD-1.5's 709 modules on one CPU thread, where
        nothing changed)."""
        return (self._fingerprint(unet), trace_modes(sample.device.type))

    def entry(self, state: Hashable, key: CallKey, capture: Callable[[], Captured]) -> Entry:
        """The entry of ``(state, key)``, captured by ``capture()`` on a miss."""
        with self._lock:
            found = self._entries.get((state, key))
            if found is None:
                found = self._entries[state, key] = Entry(capture())
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
            self._entries.move_to_end((state, key))
            return found

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
