"""Parallel mode: a segment's decoder passes batched into one call give the sequential output.

Captures dominate the cost here (a torch.export per call signature and chunk length), so one
runtime serves both modes: its policy is switched between sequential and parallel, which keeps
its captured graphs (the cut is the same).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxprop
from conftest import (LOOP_TIMESTEPS, SCHEDULERS, assert_differs, ddpm_pipeline,
                      decoder_attn_unet, loop_inputs, make_scheduler, part_calls, run_loop)
from fxprop.graph.capture import flatten_call
from fxprop.runtime.parallel import chunk_at, steps_per_call
from fxprop.plan.plans import Segment
from test_pipelines import CASES, STEPS

KEY_STEPS = [0, 2, 3]
TOLERANCE = 1e-4


def _profiled(generate, profiler: bool = False):
    """``generate()`` and how often each of fxprop's parts ran in it; with ``profiler``, also
    checks that ``torch.profiler`` lists the parts so (what tools/profile_parallel.py reads)."""
    prof = torch.profiler.profile() if profiler else contextlib.nullcontext()
    with part_calls() as calls, prof:
        out = generate()
    calls = Counter({k: n for k, n in calls.items() if k.startswith("fxprop.")})
    if profiler:
        assert calls == {e.key: e.count for e in prof.key_averages()
                         if e.key.startswith("fxprop.")}
    return out, calls


def _predictions(calls: Counter) -> int:
    """UNet outputs the parts computed: a call of ``fxprop.step[xL]`` computes L."""
    return sum(n * (int(k.split("[x")[1][:-1]) if "[x" in k else k != "fxprop.key")
               for k, n in calls.items())


def _both(runtime, generate):
    """``generate()`` with the runtime switched to sequential mode, then in its parallel mode;
    checks that parallel mode computed each prediction once (no fallback to single steps)."""
    parallel = runtime.policy
    runtime.policy = dataclasses.replace(parallel, parallel=False, max_batch=None)
    try:
        reference, sequential = _profiled(generate)
    finally:
        runtime.policy = parallel
    # sequential mode computes each prediction by its own part call: the count of UNet calls
    assert sequential and set(sequential) <= {"fxprop.full", "fxprop.step"}, sequential
    candidate, calls = _profiled(generate)
    assert _predictions(calls) == _predictions(sequential), (calls, sequential)
    return reference, candidate, calls


# -- chunks ------------------------------------------------------------------------------------

def test_chunks_cover_the_segment_in_steps_of_max_batch_over_batch():
    segment = Segment(3, 10)
    assert steps_per_call(None, 2, segment) == 7
    assert steps_per_call(6, 2, segment) == 3
    assert steps_per_call(1, 2, segment) == 1      # never less than one step
    assert steps_per_call(100, 2, segment) == 7    # never more than the segment
    chunks = [chunk_at(segment, s, 3) for s in range(3, 10)]
    assert [c for c in chunks if c is not None] == [range(3, 6), range(6, 9), range(9, 10)]


# -- pipelines ---------------------------------------------------------------------------------

def _batch(case: str) -> int:
    return 4 if case == "sd-nocfg-batch" else 2


#: Schedulers whose timesteps are floats (sigma-unit prior noise, another capture: the timestep's
#: dtype is part of the call signature). Every scheduler runs on SD with CFG; the other
#: pipelines, whose own inputs (batch, SDXL's conditions, ControlNet residuals, img2img's
#: shorter schedule) do not depend on the scheduler, run the integer-timestep ones.
#: The inner loop runs SD with CFG on the integer-timestep schedulers (its captures serve them
#: all: a fraction of a second each after the first).
FLOAT_TIMESTEPS = {"euler", "euler_a", "heun"}
PIPELINE_SCHEDULERS = [
    pytest.param(case, scheduler, id=f"{case}-{scheduler}",
                 marks=() if case == "sd-cfg" and scheduler not in FLOAT_TIMESTEPS
                 else pytest.mark.slow)
    for case in sorted(CASES) for scheduler in SCHEDULERS
    if case == "sd-cfg" or scheduler not in FLOAT_TIMESTEPS]


@pytest.fixture(scope="module")
def pipes():
    """Accelerated pipelines by case, kept across the module's tests so that each captures once
    per signature. (An indirectly parametrized fixture would not do: pytest tears a module
    fixture down whenever the index of its parameter set changes, i.e. at every test here.)"""
    return {}


def _pipe(pipes: dict, case: str):
    """The case's pipeline with a sparse key set, prior noise and chunks of 2 steps."""
    if case not in pipes:
        factory, _ = CASES[case]
        pipes[case] = fxprop.accelerate(factory(), key_steps=KEY_STEPS, parallel=True,
                                        max_batch=2 * _batch(case))
    return pipes[case]


@pytest.mark.parametrize("case, scheduler", PIPELINE_SCHEDULERS)
def test_parallel_equals_sequential_in_pipelines(pipes, case, scheduler):
    pipe, kwargs = _pipe(pipes, case), CASES[case][1]
    pipe.scheduler = make_scheduler(scheduler)

    def generate():
        return pipe(**kwargs(), num_inference_steps=STEPS, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    reference, candidate, calls = _both(fxprop.runtime_of(pipe), generate)
    assert any("[x2]" in label for label in calls)
    torch.testing.assert_close(candidate, reference, rtol=0, atol=TOLERANCE)


@pytest.mark.slow  # ~6 s; the SD pipeline stays
def test_parallel_equals_sequential_in_ddpm_pipeline():
    pipe = ddpm_pipeline()  # has no callback_on_step_end: no prior noise injection
    fxprop.accelerate(pipe, key_steps=KEY_STEPS, prior_noise=0, parallel=True)
    for scheduler in ("ddpm", "ddim"):
        if scheduler == "ddim":
            from diffusers import DDIMScheduler
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

        def generate():
            return pipe(batch_size=2, num_inference_steps=STEPS, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images

        reference, candidate, calls = _both(fxprop.runtime_of(pipe), generate)
        assert "fxprop.step[x2]" in calls and "fxprop.step[x3]" in calls
        torch.testing.assert_close(candidate, reference, rtol=0, atol=TOLERANCE)


# -- the bare UNet -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unet_runtime():
    return fxprop.accelerate(decoder_attn_unet(), key_steps=[0], parallel=True)


def _loop(runtime, batch: int, edit=None):
    """A generation over LOOP_TIMESTEPS; ``edit(step, embeds)`` may change the conditioning."""
    return run_loop(runtime, *loop_inputs(seed=batch, batch=batch), edit=edit)


def _use(runtime, key_steps, max_batch=None):
    runtime.policy = fxprop.EncoderPropagation(key_steps=key_steps, parallel=True,
                                               max_batch=max_batch)


@pytest.mark.slow
@settings(max_examples=10, deadline=None)
@given(keys=st.sets(st.integers(1, len(LOOP_TIMESTEPS) - 1), max_size=3),
       batch=st.sampled_from([1, 2]), max_batch=st.sampled_from([None, 1, 2, 4, 6]))
def test_parallel_equals_sequential_at_unet_level(unet_runtime, keys, batch, max_batch):
    _use(unet_runtime, [0, *sorted(keys)], max_batch)
    reference, candidate, _ = _both(unet_runtime, lambda: _loop(unet_runtime, batch))
    torch.testing.assert_close(candidate, reference, rtol=0, atol=TOLERANCE)


def _calls(runtime, batch=2, profiler=False):
    return _profiled(lambda: _loop(runtime, batch), profiler)[1]


def test_key_part_once_per_segment_and_step_part_once_per_chunk(unet_runtime):
    _use(unet_runtime, [0, 3])
    assert _calls(unet_runtime, profiler=True) == {"fxprop.key": 2, "fxprop.step[x3]": 2}
    _use(unet_runtime, [0, 3], max_batch=4)  # 2 steps per call: [0 1] [2] [3 4] [5]
    assert _calls(unet_runtime) == {"fxprop.key": 2, "fxprop.step[x2]": 2, "fxprop.step": 2}
    _use(unet_runtime, [0, 3], max_batch=1)  # 1 step per call: the sequential parts
    assert _calls(unet_runtime) == {"fxprop.full": 2, "fxprop.step": 4}


@pytest.mark.parametrize("how", ["replaced", "in-place"])
def test_conditioning_changed_mid_segment_is_computed_on_the_frontier(unet_runtime, how):
    def edit(step, embeds):
        if step != 1:
            return embeds
        return embeds + 1 if how == "replaced" else embeds.add_(1)

    _use(unet_runtime, [0, 3])  # the chunk length of the test above: no new capture
    parallel = unet_runtime.policy
    unet_runtime.policy = dataclasses.replace(parallel, parallel=False)
    reference = _loop(unet_runtime, 2, edit)
    unet_runtime.policy = parallel
    candidate, calls = _profiled(lambda: _loop(unet_runtime, 2, edit))
    torch.testing.assert_close(candidate, reference, rtol=0, atol=TOLERANCE)
    # steps 1-2 were computed alone on the frontier, with the new conditioning
    assert calls == {"fxprop.key": 2, "fxprop.step[x3]": 2, "fxprop.step": 2}
    assert_differs(candidate[1], _loop(unet_runtime, 2)[1], 1e-3, "with and without the edit")


def test_with_policy_shares_the_captured_graphs(unet_runtime):
    call = flatten_call(unet_runtime.unet.forward, (torch.randn(2, 4, 8, 8), LOOP_TIMESTEPS[0]),
                        {"encoder_hidden_states": torch.randn(2, 5, 32)})
    other = unet_runtime.with_policy(fxprop.EncoderPropagation(key_steps=2))
    with torch.no_grad():  # as the generations above ran: the graph they captured serves here
        (captured, parts), count = unet_runtime.parts_for(call), unet_runtime.captures
        again = fxprop.accelerate(unet_runtime.unet, key_steps=3, parallel=True)  # a new runtime
        for runtime in (other, again):
            assert runtime.parts_for(call)[0] is captured and runtime.parts_for(call)[1] is parts
    assert again.captures == count


def test_unplanned_timestep_mid_segment_runs_the_whole_unet_and_warns(unet_runtime):
    _use(unet_runtime, [0], max_batch=6)  # call 0 computes steps 0-2 (a chunk length seen above)
    unet_runtime.set_timesteps(LOOP_TIMESTEPS)
    x, e = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        unet_runtime(x, LOOP_TIMESTEPS[0], encoder_hidden_states=e)
        with pytest.warns(UserWarning, match="fxprop: UNet call 1 does not match the plan"):
            out = unet_runtime(x, torch.tensor(5), encoder_hidden_states=e).sample
        plain = unet_runtime.unet(x, torch.tensor(5), encoder_hidden_states=e).sample
    assert torch.equal(out, plain)
