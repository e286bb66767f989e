"""One generation's state belongs to that generation: threads, per-request pipelines, inputs
that change inside a generation, and nothing held once it ends."""

from __future__ import annotations

import threading

import pytest
import torch
from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

import fxprop
from conftest import (assert_differs, controlnet_pipeline, decoder_attn_unet,
                      live_tensor_bytes, loop_inputs, run_loop, sd_pipeline, text_embeds)
from test_workflows import Same, run

KEYS = [0, 2, 3]


@pytest.fixture(scope="module")
def unet():
    """One UNet for the tests that only run it (no LoRA, processor or parameter change): they
    share its captured graphs, and each still builds its own pipeline and runtime."""
    return decoder_attn_unet()


def _in_lockstep(generate, seeds):
    """``generate(seed, callback)`` in one thread per seed, every step end a barrier: the
    threads' UNet calls interleave step by step."""
    barrier, outs, errors = threading.Barrier(len(seeds), timeout=120), {}, []

    def step_end(pipe, i, t, kwargs):
        barrier.wait()
        return {}

    def work(seed):
        try:
            outs[seed] = generate(seed, step_end)
        except Exception as err:  # surfaced below, with the thread's traceback
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [outs[seed] for seed in seeds]


@pytest.mark.parametrize("parallel", [False, True])
def test_two_threads_on_one_pipeline_equal_each_alone(unet, parallel):
    pipe = fxprop.accelerate(sd_pipeline(unet=unet), key_steps=KEYS,
                             parallel=parallel)  # default prior noise: z_T is per call too

    def generate(seed, callback=None):
        return run(pipe, seed, **text_embeds(1, seed=seed), callback_on_step_end=callback)

    alone = [generate(seed) for seed in (1, 2)]
    together = _in_lockstep(generate, [1, 2])
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert_differs(alone[0], alone[1], 1e-3, "the two requests")


def test_from_pipe_per_request(unet):
    pipe = fxprop.accelerate(sd_pipeline(unet=unet), key_steps=KEYS)
    alone = run(pipe, 1)
    captures = fxprop.runtime_of(pipe).captures
    plain_copy = StableDiffusionPipeline.from_pipe(pipe)  # not accelerated: runs plainly
    assert fxprop.runtime_of(plain_copy) is None
    plain = StableDiffusionPipeline(**pipe.components)
    torch.testing.assert_close(run(plain_copy, 1), run(plain, 1), rtol=0, atol=0)

    def generate(seed, callback):
        request = fxprop.accelerate(StableDiffusionPipeline.from_pipe(pipe), key_steps=KEYS)
        return run(request, seed, callback_on_step_end=callback)

    for out in _in_lockstep(generate, [1, 1]):
        torch.testing.assert_close(out, alone, rtol=0, atol=1e-6)
    assert fxprop.runtime_of(pipe).captures == captures  # requests reuse the UNet's graphs


def test_two_threads_on_one_bare_runtime(unet):
    runtime = fxprop.accelerate(unet, key_steps=KEYS)
    inputs = {seed: loop_inputs(seed) for seed in (1, 2)}
    alone = {seed: run_loop(runtime, *inputs[seed]) for seed in inputs}
    barrier = threading.Barrier(2, timeout=120)

    def generate(seed, _callback):
        return run_loop(runtime, *inputs[seed], edit=lambda i, e: (barrier.wait(), e)[1])

    outs = _in_lockstep(generate, [1, 2])
    for seed, out in zip((1, 2), outs):
        torch.testing.assert_close(out, alone[seed], rtol=0, atol=1e-6)


def _cfg_cutoff(step: int):
    """The documented callback that drops classifier-free guidance after ``step``."""

    def callback(pipe, i, t, kwargs):
        if i == step:
            pipe._guidance_scale = 0.0
            return {name: kwargs[name].chunk(2)[-1] for name in ("prompt_embeds", "image")}
        return {}

    return callback


@pytest.mark.slow  # ~7 s; ControlNet per step is in test_api
def test_controlnet_with_cfg_cut_by_a_callback_recomputes_its_residuals():
    """Keys [0, 3], CFG dropped after step 1: step 2 (batch 1) leaves the plan and runs the
    whole UNet with fresh residuals; it equals keys [0, 2, 3, ...] where step 2 is a key step."""
    pipe = controlnet_pipeline(decoder_attn_unet())
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(image=image, callback_on_step_end=_cfg_cutoff(1),
                  callback_on_step_end_tensor_inputs=["prompt_embeds", "image"])
    fxprop.accelerate(pipe, key_steps=[0, 2, 3], prior_noise=0)
    reference = run(pipe, **kwargs)
    fxprop.accelerate(pipe, key_steps=[0, 3], prior_noise=0)
    with pytest.warns(UserWarning, match="UNet call 2 has other inputs than its key step"):
        candidate = run(pipe, **kwargs)
    torch.testing.assert_close(candidate, reference, rtol=0, atol=1e-5)
    plain = StableDiffusionControlNetPipeline(**pipe.components)
    assert_differs(candidate, run(plain, **kwargs), 1e-4, "reuse and plain")


def test_parallel_mode_sees_in_place_edits_under_inference_mode(unet):
    def brighten(pipe, i, t, kwargs):
        if i == 0:
            kwargs["prompt_embeds"].add_(0.5)  # in place: no version counter to tell
        return {}

    pipe = sd_pipeline(unet=unet)
    outs = {}
    for parallel in (False, True):
        fxprop.accelerate(pipe, key_steps=[0], prior_noise=0, parallel=parallel)
        with torch.inference_mode():
            outs[parallel] = run(pipe, callback_on_step_end=brighten,
                                 callback_on_step_end_tensor_inputs=["prompt_embeds"])
    torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=1e-4)
    with torch.inference_mode():
        assert_differs(outs[True], run(pipe), 1e-4, "with and without the edit")


def test_pag_captures_once_per_processor_state():
    from diffusers import StableDiffusionPAGPipeline
    components = sd_pipeline(unet=decoder_attn_unet()).components
    pipe, plain = (StableDiffusionPAGPipeline(**components, pag_applied_layers=["up"])
                   for _ in range(2))
    fxprop.accelerate(pipe, key_steps=1, prior_noise=0)
    same = Same(pipe, plain, pag_scale=2.0)
    same.check("accelerate")
    captures = fxprop.runtime_of(pipe).captures
    same.check("a second generation", changed=False)
    assert fxprop.runtime_of(pipe).captures == captures


# -- nothing held after a generation ------------------------------------------------------------

@pytest.mark.slow  # ~20 s: captures at 64x64 and five scans of the whole heap
def test_nothing_is_held_after_a_generation():
    pipe = fxprop.accelerate(sd_pipeline(unet=decoder_attn_unet()), key_steps=[0, 3])
    big = dict(height=64, width=64)
    run(pipe, **big)  # captures
    baseline, during = live_tensor_bytes(), []

    def measure(p, i, t, kwargs):
        if i == 1:
            during.append(live_tensor_bytes())
        return {}

    run(pipe, callback_on_step_end=measure, **big)
    assert during[0] - baseline > 30_000  # mid-generation the frontier is there: it is seen
    assert live_tensor_bytes() - baseline <= 1024
    runtime = fxprop.accelerate(decoder_attn_unet(), key_steps=[0, 3])
    run_loop(runtime, *loop_inputs())
    baseline = live_tensor_bytes()
    run_loop(runtime, *loop_inputs())
    assert live_tensor_bytes() - baseline <= 1024 and runtime.plan is not None


@pytest.mark.slow
def test_soak_100_generations_across_policies_and_lora(lora_dir):
    """Memory stays flat across policy changes, two LoRA load/unload cycles and 100
    generations."""
    pipe = sd_pipeline(unet=decoder_attn_unet())
    policies = [dict(key_steps=[0, 2]), dict(key_steps=1, parallel=True),
                dict(reuse="deep", key_steps=2)]
    sizes = []
    for generation in range(100):
        if generation % 10 == 0:
            fxprop.accelerate(pipe, **policies[generation // 10 % len(policies)])
        if generation % 25 == 0:
            if generation % 50:
                pipe.unload_lora_weights()
            else:
                pipe.load_lora_weights(lora_dir, adapter_name=f"a{generation}")
        run(pipe, generation, num_inference_steps=3, height=32, width=32)
        if generation in (49, 99):
            sizes.append(live_tensor_bytes())
    assert fxprop.runtime_of(pipe).captures <= fxprop.graph.cache.CAPTURE_CACHE_SIZE
    assert sizes[1] - sizes[0] <= 256 * 1024, sizes
