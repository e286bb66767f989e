"""Captures and lifetimes touch no shared objects (issue 25, cause 3): copies of accelerated
objects are plain, a replaced UNet is followed, dropped per-request pipelines are freed, and
captures hold no parameters the UNet no longer has."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import weakref

import pytest
import torch
from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

import fxprop
from conftest import controlnet_pipeline, decoder_attn_unet, sd_pipeline
from fxprop.graph.cache import owned_cache
from fxprop.graph.fingerprint import fingerprint, portable_fingerprint
from fxprop.runtime.intercept import intercepted
from test_workflows import accelerated_and_plain, run


@pytest.fixture(scope="module")
def pipes():
    """An accelerated pipeline (every step a key step, captured once) and its plain twin."""
    pipe, plain = accelerated_and_plain()
    run(pipe)
    return pipe, plain


def _unpickled(obj):
    return pickle.loads(pickle.dumps(obj))


def _torch_loaded(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", [copy.deepcopy, _unpickled, _torch_loaded])
def test_a_copy_of_an_accelerated_unet_is_the_plain_unet(pipes, how):
    """Row 9: deepcopy, pickle and torch.save raised ``cannot pickle '_thread.RLock'``."""
    pipe, plain = pipes
    unet = how(pipe.unet)
    assert intercepted(unet) is None and "_diffusers_hook" not in unet.__dict__
    assert "forward" not in unet.__dict__ and "__reduce_ex__" not in unet.__dict__
    ours = {p.data_ptr() for p in pipe.unet.parameters()}
    assert not ours & {p.data_ptr() for p in unet.parameters()}  # its own weights
    copied = run(StableDiffusionPipeline(**{**plain.components, "unet": unet}))
    torch.testing.assert_close(copied, run(plain), rtol=0, atol=0)
    assert intercepted(pipe.unet) is not None  # the original stays accelerated
    torch.testing.assert_close(run(pipe), run(plain), rtol=0, atol=1e-5)


@pytest.mark.parametrize("how", [copy.deepcopy, _unpickled])
def test_a_copy_of_an_accelerated_pipeline_is_a_plain_pipeline(pipes, how):
    pipe, plain = pipes
    copied = how(pipe)
    assert type(copied) is StableDiffusionPipeline and fxprop.runtime_of(copied) is None
    assert intercepted(copied.unet) is None and copied.unet is not pipe.unet
    torch.testing.assert_close(run(copied), run(plain), rtol=0, atol=1e-6)
    fxprop.accelerate(copied, key_steps=1, prior_noise=0)  # and it accelerates anew
    torch.testing.assert_close(run(copied), run(plain), rtol=0, atol=1e-5)


def test_a_copy_of_a_gated_controlnet_pipeline_is_plain():
    pipe = fxprop.accelerate(controlnet_pipeline(decoder_attn_unet()), key_steps=[0, 2])
    copied = copy.deepcopy(pipe)
    for name in ("unet", "controlnet"):
        module = getattr(copied, name)
        assert "_diffusers_hook" not in module.__dict__ and "forward" not in module.__dict__
    fxprop.restore(pipe)
    assert "__reduce_ex__" not in pipe.unet.__dict__
    assert "__reduce_ex__" not in pipe.controlnet.__dict__


def test_a_replaced_unet_is_followed(pipes):
    """Row 12: ``pipe.unet = other`` after accelerate ran unaccelerated, silently."""
    pipe, plain = pipes
    old, other = pipe.unet, decoder_attn_unet(seed=1)
    pipe.unet = plain.unet = other
    try:
        out = run(pipe)
        assert fxprop.runtime_of(pipe).unet is other and fxprop.runtime_of(pipe).captures
        assert intercepted(old) is None  # no runtime of it is left
        torch.testing.assert_close(out, run(plain), rtol=0, atol=1e-5)
    finally:
        pipe.unet = plain.unet = old
    run(pipe)
    assert fxprop.runtime_of(pipe).unet is old


def test_dropped_per_request_pipelines_are_freed_and_restore_undoes_everything():
    """Row 7: per-request ``accelerate(from_pipe(pipe))`` pipelines stayed alive (the ControlNet
    gate's dict held each runtime through its adapter), so after ``restore(base)`` the UNet was
    still intercepted and the ControlNet still gated."""
    base = fxprop.accelerate(controlnet_pipeline(decoder_attn_unet()), key_steps=[0, 2])
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    run(base, image=image)
    requests = []
    for seed in range(3):
        request = fxprop.accelerate(StableDiffusionControlNetPipeline.from_pipe(base),
                                    key_steps=[0, 2])
        run(request, seed, image=image)
        requests.append((weakref.ref(request), weakref.ref(fxprop.runtime_of(request))))
        del request
    assert all(p() is None and r() is None for p, r in requests)  # freed at once, no gc needed
    fxprop.restore(base)
    assert intercepted(base.unet) is None
    assert not getattr(base.controlnet, "_diffusers_hook", None) or not \
        base.controlnet._diffusers_hook.hooks


def test_captures_hold_no_weights_the_unet_no_longer_has():
    """Row 8: checkpoint swaps with ``load_state_dict(assign=True)``; the captures of earlier
    swaps held every old set of weights (6 swaps: 6x the UNet's weights)."""
    pipe, plain = accelerated_and_plain()
    old = []
    for seed in range(3):
        weights = decoder_attn_unet(seed=seed + 1).state_dict()
        old.append(weakref.ref(pipe.unet.conv_in.weight))
        pipe.unet.load_state_dict(weights, assign=True)
        del weights
        torch.testing.assert_close(run(pipe), run(plain), rtol=0, atol=1e-5)
    gc.collect()
    assert all(ref() is None for ref in old)



def test_a_cache_the_module_owns_is_not_what_the_module_is_and_is_not_copied():
    """``owned_cache`` (ComfyUI's captures) lives in the module: the fingerprint leaves it out,
    and copies and pickles of the module get an empty cache of their own."""
    module = torch.nn.Sequential(torch.nn.Linear(2, 2))
    before = fingerprint(module), portable_fingerprint(module)
    cache = owned_cache(module)
    cache._entries["state", "key"] = "a captured graph"
    assert owned_cache(module) is cache
    assert (fingerprint(module), portable_fingerprint(module)) == before
    for copied in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert len(owned_cache(copied)) == 0 and owned_cache(copied) is not cache
    dropped = weakref.ref(module)
    del module, cache
    gc.collect()
    assert dropped() is None
