"""Wrappers compose: shared components, accelerate's hooks, nn.Module hooks, torch.compile,
pipelines rebuilt from accelerated components. Each either equals the plain pipeline in the
same state or is refused at accelerate() with advice."""

from __future__ import annotations

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

import fxprop
from conftest import assert_differs, controlnet_pipeline, decoder_attn_unet, sd_pipeline
from test_workflows import Same, accelerated_and_plain, run


class Counting(ModelHook):
    """An accelerate hook like model offload's: its pre_forward must run on every call."""

    def __init__(self) -> None:
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


@pytest.mark.parametrize("order", ["hook first", "accelerate first"])
def test_accelerate_hooks_on_the_unet_run_on_every_call(order):
    pipe = sd_pipeline(unet=decoder_attn_unet())
    plain = type(pipe)(**pipe.components)
    hook = Counting()
    if order == "hook first":
        add_hook_to_module(pipe.unet, hook)
    fxprop.accelerate(pipe, key_steps=[0, 2], prior_noise=0)
    if order == "accelerate first":
        add_hook_to_module(pipe.unet, hook)
    for generation in range(2):
        run(pipe)
        assert hook.calls == STEPS_OF(pipe) * (generation + 1)  # never skipped by the graph
    fxprop.accelerate(pipe, key_steps=1, prior_noise=0)
    Same(pipe, plain).check("an accelerate hook")
    remove_hook_from_module(pipe.unet)
    fxprop.restore(pipe)
    assert ("forward" not in vars(pipe.unet)
            or fxprop.runtime.intercept.intercepted(pipe.unet) is None)


def STEPS_OF(pipe) -> int:
    from test_workflows import STEPS
    return STEPS


def test_forward_hooks_of_the_unet_run_and_hooks_of_submodules_are_refused():
    pipe, plain = accelerated_and_plain()
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(1))
    run(pipe)
    assert len(seen) == STEPS_OF(pipe)
    handle.remove()
    sub = pipe.unet.up_blocks[1].register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match=r"would not run: \['up_blocks\.1: forward hooks'\]"):
        run(pipe)  # added after accelerate(): refused at the next capture, naming it
    sub.remove()
    Same(pipe, plain).check("the hook's removal")
    sub = pipe.unet.conv_in.register_forward_pre_hook(lambda *a: None)
    with pytest.raises(ValueError, match=r"conv_in: forward pre-hooks"):
        fxprop.accelerate(sd_pipeline(unet=pipe.unet))
    sub.remove()


def test_compiled_unet_is_refused_with_the_right_advice():
    unet = decoder_attn_unet()
    with pytest.raises(ValueError, match=r"torch.compile'd.*unet._orig_mod\) and compile=True"):
        fxprop.accelerate(torch.compile(unet))


def test_pipeline_built_from_accelerated_components():
    pipe, plain = accelerated_and_plain()
    Same(pipe, plain).check("accelerate")
    rebuilt = StableDiffusionPipeline(**pipe.components)
    assert fxprop.runtime_of(rebuilt) is None
    torch.testing.assert_close(run(rebuilt), run(plain), rtol=0, atol=0)  # plain: no scope
    fxprop.accelerate(rebuilt, key_steps=1, prior_noise=0)
    captures = fxprop.runtime_of(pipe).captures
    Same(rebuilt, plain).check("accelerating the rebuilt pipeline")
    assert fxprop.runtime_of(rebuilt).captures == captures  # the UNet's graphs are shared
    fxprop.restore(pipe)
    Same(rebuilt, plain).check("restoring the other pipeline", changed=False)
    fxprop.restore(rebuilt)
    assert fxprop.runtime.intercept.intercepted(pipe.unet) is None  # the last runtime released it


@pytest.mark.slow  # ~6 s
def test_two_controlnet_pipelines_sharing_a_controlnet_in_any_order():
    first = controlnet_pipeline(decoder_attn_unet())  # the UNet's attention does not matter
    plain = StableDiffusionControlNetPipeline(**first.components)
    second = StableDiffusionControlNetPipeline(**first.components)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    fxprop.accelerate(first, key_steps=[0, 2], prior_noise=0)
    fxprop.accelerate(second, key_steps=1, prior_noise=0)
    reference = run(plain, image=image)
    torch.testing.assert_close(run(second, image=image), reference, rtol=0, atol=1e-5)
    sparse = run(first, image=image)
    assert_differs(sparse, reference, 1e-4, "sparse and plain")
    fxprop.restore(second)  # restore in the other order than accelerated
    torch.testing.assert_close(run(first, image=image), sparse, rtol=0, atol=1e-6)
    fxprop.restore(first)
    torch.testing.assert_close(run(first, image=image), reference, rtol=0, atol=1e-6)
    assert fxprop.runtime.intercept.intercepted(first.controlnet) is None


def test_a_replaced_forward_beneath_fxprop_is_refused():
    unet = decoder_attn_unet()
    original = unet.forward
    unet.forward = lambda *args, **kwargs: original(*args, **kwargs)  # someone's wrapper
    with pytest.raises(ValueError, match="forward is replaced by .*accelerate the module before "
                                         "wrapping it"):
        fxprop.accelerate(unet)


@pytest.mark.parametrize("order", ["offload first", "accelerate first"])
def test_model_cpu_offload_keeps_fxprop_and_its_captures(order):
    """enable_model_cpu_offload re-installs accelerate's hooks at every call (diffusers'
    maybe_free_model_hooks): fxprop stays beneath them and its graphs stay valid."""
    pipe, plain = accelerated_and_plain(key_steps=[0, 2])
    sparse = run(pipe)  # the reference: accelerated, no offload
    fxprop.restore(pipe)
    if order == "offload first":
        pipe.enable_model_cpu_offload(device="cpu")
    fxprop.accelerate(pipe, key_steps=[0, 2], prior_noise=0)
    if order == "accelerate first":
        pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):
        torch.testing.assert_close(run(pipe), sparse, rtol=0, atol=1e-6)
    assert fxprop.runtime_of(pipe).captures == 1
    assert_differs(sparse, run(plain), 1e-4, "sparse and plain")


def test_sequential_cpu_offload_is_refused_naming_its_hooks():
    pipe, _ = accelerated_and_plain()
    pipe.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match=r"would not run: \['conv_in: accelerate AlignDevicesHook"):
        run(pipe)


def test_controlnet_gate_stays_beneath_model_cpu_offload():
    """diffusers re-installs offload hooks after every call: the ControlNet's key-step gate
    must survive that (it sits beneath accelerate's hook, like the UNet's interception)."""
    pipe = controlnet_pipeline(decoder_attn_unet())
    calls = []
    pipe.controlnet.conv_in.register_forward_hook(lambda m, a, o: calls.append(1))
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    pipe.enable_model_cpu_offload(device="cpu")
    fxprop.accelerate(pipe, key_steps=[0, 2], prior_noise=0)
    outs = [run(pipe, image=image) for _ in range(2)]
    assert len(calls) == 2 * 2  # key steps only, in both generations
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    fxprop.restore(pipe)
    calls.clear()
    run(pipe, image=image)
    assert len(calls) == STEPS_OF(pipe)
