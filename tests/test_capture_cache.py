"""The capture cache on its own (issue 33): a run keeps every graph it uses, a warm run of the
same workflow captures nothing, and a capture that failed is not tried again. Captures here
are tiny traced modules: what is tested is what the cache keeps and when it calls capture."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from fxprop.graph.cache import CaptureCache, TooManySignatures
from fxprop.graph.capture import Captured


class Recorder:
    """``capture()`` callables that count what they were asked for."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, key: str):
        def capture() -> Captured:
            self.calls.append(key)
            return Captured(fx.symbolic_trace(nn.Identity()), None)
        return capture


def run(cache: CaptureCache, made: Recorder, keys: list[str], state: str = "s") -> None:
    """One run (a generation or a sampler run) calling with these signatures, in order."""
    cache.begin_run()
    for key in keys:
        cache.entry(state, key, made(key))


def test_a_run_keeps_every_graph_it_uses_and_a_warm_run_captures_none():
    cache, made = CaptureCache(size=2), Recorder()
    shapes = ["a", "b", "c", "d", "a", "b", "c", "d"]   # four shapes a step, two steps
    run(cache, made, shapes)
    assert made.calls == ["a", "b", "c", "d"]          # each once: none evicted mid-run
    run(cache, made, shapes)
    assert made.calls == ["a", "b", "c", "d"] and len(cache) == 4


def test_older_runs_are_evicted_least_recently_used_first():
    cache, made = CaptureCache(size=2), Recorder()
    run(cache, made, ["a", "b"])
    run(cache, made, ["c"])                # evicts a, the least recently used
    run(cache, made, ["b"])                # still there
    assert made.calls == ["a", "b", "c"] and len(cache) == 2
    run(cache, made, ["a"])                # gone: captured again
    assert made.calls == ["a", "b", "c", "a"]


def test_a_failed_capture_is_remembered_but_running_out_of_memory_is_not():
    cache, tried = CaptureCache(), []

    def failing() -> Captured:
        tried.append(1)
        raise RuntimeError("reads a tensor's value")

    for _ in range(3):
        cache.begin_run()
        with pytest.raises(RuntimeError, match="reads a tensor's value"):
            cache.entry("s", "k", failing)
    assert len(tried) == 1

    def out_of_memory() -> Captured:
        tried.append(1)
        raise torch.OutOfMemoryError("no room")

    for _ in range(2):
        with pytest.raises(torch.OutOfMemoryError):
            cache.entry("s", "other", out_of_memory)
    assert len(tried) == 3   # tried again: memory may be free next time


def test_a_run_with_more_signatures_than_its_limit_is_refused():
    cache, made = CaptureCache(size=2, limit=3), Recorder()
    with pytest.raises(TooManySignatures, match="more than 3 input signatures"):
        run(cache, made, ["a", "b", "c", "d"])
    assert made.calls == ["a", "b", "c"]
    run(cache, made, ["a", "b", "c"])      # what fits still runs from the cache
    assert made.calls == ["a", "b", "c"]
    with pytest.raises(ValueError, match="run limit"):
        CaptureCache(size=4, limit=2)
