"""Who is running a UNet now: its calls share it, a capture of it runs alone.

While ``torch.export`` traces, torch.fx patches ``nn.Module.__call__`` and ``__getattr__`` for
the whole process and export switches the mkldnn, nnpack and cudnn backends off: a call of the
same UNet made meanwhile by another thread is recorded into the trace (which then fails) and
computes with other kernels. So every call of an intercepted UNet runs inside
:func:`running`, and a capture inside :func:`capturing`, which waits until no other thread
runs the UNet and holds new calls back until it is done. A thread that waits for a lock a
capturing thread may hold (the capture cache's) says so with :func:`waiting_for`, so the two
never wait for each other. Calls of *other* modules in other threads are not held back: warm up
(capture) before such threads start (README, Limits).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import Counter
from typing import Iterator

from torch import nn

__all__ = ["running", "capturing", "waiting_for"]

_CHANGED = threading.Condition()
_RUNNING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()    # unet -> Counter(thread)
_CAPTURING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # unet -> thread
_WAITING: set[int] = set()


@contextlib.contextmanager
def running(unet: nn.Module) -> Iterator[None]:
    """A call of ``unet`` (waits while another thread captures it)."""
    me = threading.get_ident()
    with _CHANGED:
        _CHANGED.wait_for(lambda: _CAPTURING.get(unet) in (None, me))
        _RUNNING.setdefault(unet, Counter())[me] += 1
    try:
        yield
    finally:
        with _CHANGED:
            threads = _RUNNING[unet]
            threads[me] -= 1
            if not threads[me]:
                del threads[me]
            _CHANGED.notify_all()


@contextlib.contextmanager
def capturing(unet: nn.Module) -> Iterator[None]:
    """A capture of ``unet``: no other thread runs it meanwhile."""
    me = threading.get_ident()
    with _CHANGED:
        _CHANGED.wait_for(lambda: _CAPTURING.get(unet) in (None, me) and all(
            t == me or t in _WAITING for t in _RUNNING.get(unet, ())))
        outer = _CAPTURING.get(unet)
        _CAPTURING[unet] = me
    try:
        yield
    finally:
        with _CHANGED:
            if outer is None:
                del _CAPTURING[unet]
            _CHANGED.notify_all()


@contextlib.contextmanager
def waiting_for(lock: threading.RLock) -> Iterator[None]:
    """Hold ``lock``, not counting as running any UNet while it is being acquired."""
    me = threading.get_ident()
    if not lock.acquire(blocking=False):
        with _CHANGED:
            _WAITING.add(me)
            _CHANGED.notify_all()
        try:
            lock.acquire()
        finally:
            with _CHANGED:
                _WAITING.discard(me)
    try:
        yield
    finally:
        lock.release()
