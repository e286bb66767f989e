"""A capture must not disturb other threads (fxprop.graph.calls, fxprop.graph.twin): while
torch.export traces, torch.fx patches nn.Module for the whole process and export swaps fake tensors
into the module it traces, so plain calls of the same UNet in another thread broke the capture
and computed on fakes or with other kernels."""

from __future__ import annotations

import threading

import torch

import fxprop
import fxprop.graph.capture
from test_stacks import TwoNames

TIMESTEPS = torch.tensor([900, 500, 100])


def _unet_and_input():
    torch.manual_seed(0)
    return TwoNames().eval(), torch.randn(2, 4, 8, 8)


def _generate(acc, x) -> list:
    acc.set_timesteps(TIMESTEPS)
    with torch.no_grad():
        return [acc(x, t) for t in TIMESTEPS]


def _in_thread(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_plain_calls_in_another_thread_while_a_capture_runs():
    unet, x = _unet_and_input()
    with torch.no_grad():
        expected = unet(x, TIMESTEPS[1])
        plain = [unet(x, t) for t in TIMESTEPS]
    acc = fxprop.accelerate(unet, key_steps=1, reuse="deep")  # intercepted from here on
    outputs, errors, started, stop = [], [], threading.Event(), threading.Event()

    def plain_calls():
        while not stop.is_set():
            try:
                with torch.no_grad():
                    outputs.append(unet(x, TIMESTEPS[1]))
            except Exception as err:  # what the race raised before: recorded, asserted below
                errors.append(err)
            started.set()

    thread = _in_thread(plain_calls)
    started.wait(10)
    try:
        accelerated = _generate(acc, x)  # its first call captures
    finally:
        stop.set()
        thread.join(10)
    assert not errors, errors[:2]
    assert acc.captures >= 1 and len(outputs) > 1
    for out in outputs:
        torch.testing.assert_close(out, expected, atol=0, rtol=0)  # same kernels, real weights
    torch.testing.assert_close(accelerated, plain, atol=1e-5, rtol=0)


def test_two_threads_capturing_the_same_unet_at_once():
    unet, x = _unet_and_input()
    with torch.no_grad():
        plain = [unet(x, t) for t in TIMESTEPS]
    results, errors = {}, []
    runtimes = [fxprop.accelerate(unet, key_steps=1, reuse=r) for r in ("encoder", "deep")]

    def generate(i):
        try:
            results[i] = _generate(runtimes[i], x)
        except Exception as err:
            errors.append(err)

    threads = [_in_thread(lambda i=i: generate(i)) for i in range(2)]
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads), "the captures wait for each other"
    assert not errors, errors[:2]
    for i in range(2):
        torch.testing.assert_close(results[i], plain, atol=1e-5, rtol=0)


class Peeking(TwoNames):
    """Records, while it runs, what the user's own module holds as its output conv's weight."""

    seen: list = []

    def forward(self, x, t):
        Peeking.seen.append(type(LIVE[0].out.weight))
        return super().forward(x, t)


LIVE: list = []


def test_a_capture_leaves_the_users_module_its_own_tensors():
    torch.manual_seed(0)
    unet = Peeking().eval()
    LIVE[:] = [unet]
    Peeking.seen.clear()
    call = fxprop.graph.capture.flatten_call(unet.forward, (torch.randn(2, 4, 8, 8), TIMESTEPS[0]),
                                             {})
    captured = fxprop.graph.capture.capture(unet, call, unet.forward)
    assert Peeking.seen and set(Peeking.seen) == {torch.nn.Parameter}  # never a fake tensor
    weights = {id(t) for t in captured.module.parameters()}
    assert id(unet.out.weight) in weights  # the graph reads the user's own parameters
