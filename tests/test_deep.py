"""Deep-feature caching (reuse="deep"): the deep cut, its schedules, and agreement with the
``deepcache`` package (DeepCacheSDHelper) on tiny pipelines."""

from __future__ import annotations

import functools
import re
import warnings

import numpy as np
import pytest
import torch
from DeepCache import DeepCacheSDHelper

import fxprop
import fxprop.graph.capture
from conftest import (TEXT_DIM, assert_differs, controlnet_pipeline, ddpm_pipeline, sd_pipeline,
                      sd_unet, sdxl_unet, text_embeds)
from fxprop.plan.policies import DeepCache, make_policy
from fxprop.graph.deep import branch_target, deep_cut, valid_branches
from fxprop.graph.regions import find_layout, module_path
from fxprop.plan.schedules import deepcache_nonuniform, key_step_schedule
from fxprop.graph.split import check_split, split

STEPS = 7


# -- schedules ------------------------------------------------------------------------------


def reference_quad_center(total_numbers, n_samples, center, pow=1.2):
    """``sample_from_quad_center``, verbatim from DeepCache/sd/pipeline_stable_diffusion.py
    (that module does not import with this diffusers version)."""
    while pow > 1:
        x_values = np.linspace((-center)**(1/pow), (total_numbers-center)**(1/pow), n_samples+1)
        indices = [0] + [x+center for x in np.unique(np.int32(x_values**pow))[1:-1]]
        if len(indices) == n_samples:
            break
        pow -= 0.02
    if pow <= 1:
        raise ValueError("Cannot find suitable pow. Please adjust n_samples or decrease center.")
    return indices, pow


def test_nonuniform_examples():
    assert deepcache_nonuniform(5, 15, 1.4)(50) == (0, 5, 9, 13, 17, 21, 26, 31, 37, 43)
    assert deepcache_nonuniform(3, 5, 1.4)(10) == (0, 3, 5, 7)
    assert deepcache_nonuniform(1)(4) == (0, 1, 2, 3)
    assert DeepCache(key_steps=deepcache_nonuniform(5)).schedule(50)[:3] == (0, 5, 9)


@pytest.mark.parametrize("steps", [10, 25, 50])
def test_nonuniform_matches_deepcache_formula(steps):
    for interval in (2, 3, 5):
        for center in (0, 5, 8):
            for power in (1.2, 1.4, 1.6):
                n = steps // interval + (steps % interval != 0)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
                    try:
                        expected = tuple(sorted({int(i) for i in reference_quad_center(
                            steps, n, center, power)[0]}))
                    except ValueError:
                        expected = None
                schedule = key_step_schedule(deepcache_nonuniform(interval, center, power))
                if expected is None:
                    with pytest.raises(ValueError, match="no power"):
                        schedule(steps)
                else:
                    assert schedule(steps) == expected, (interval, center, power)


@pytest.mark.parametrize("args", [(0,), (2, -1), (2, 5, 1.0), (True,), (2, 1.5)])
def test_nonuniform_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        deepcache_nonuniform(*args)


# -- policy ---------------------------------------------------------------------------------


def test_policy_defaults_and_options():
    policy = make_policy("deep", key_steps=None, prior_noise=None, parallel=None)
    assert policy == DeepCache(key_steps=3, branch=0, prior_noise=0.0)
    assert policy.reuse == "deep" and policy.schedule(7) == (0, 3, 6)
    assert DeepCache(prior_noise=0.003).prior_noise == 0.003
    with pytest.raises(ValueError, match="parallel is only valid with reuse='encoder'"):
        fxprop.accelerate(sd_unet(), reuse="deep", parallel=True)
    with pytest.raises(ValueError, match="branch is only valid with reuse='deep'"):
        make_policy("encoder", branch=1)
    for bad in (-1, True, 1.0):
        with pytest.raises(ValueError, match="branch must be"):
            DeepCache(branch=bad)


def test_out_of_range_branch_names_the_valid_range():
    assert valid_branches([3, 3, 3, 3]) == list(range(12))
    assert valid_branches([2, 2]) == [0, 1, 3, 4]
    assert branch_target(0, [3, 3]) == (1, 2) and branch_target(5, [3, 3]) == (0, 0)
    with pytest.raises(ValueError, match=r"valid branches are 0-1, 3-4"):
        DeepCache(branch=2).validate(sd_unet())
    with pytest.raises(ValueError, match=r"valid branches are 0-5"):
        DeepCache(branch=6).validate(sd_unet(layers_per_block=2))
    with pytest.raises(ValueError, match="Module has no forward"):
        DeepCache().validate(torch.nn.Module())
    unet, args, kwargs = _tiny("sd")
    with pytest.raises(ValueError, match=r"branch=6 is out of range"):
        # raised by accelerate() once the runtime calls policy.validate, else at the first call
        accelerated = fxprop.accelerate(unet, key_steps=2, reuse="deep", branch=6)
        accelerated.set_timesteps(torch.tensor([10, 5]))
        accelerated(*args, **kwargs)


# -- the cut --------------------------------------------------------------------------------


@functools.cache
def _tiny(kind):
    """A tiny UNet and the inputs its pipeline calls it with below (cached: one capture)."""
    g = torch.Generator().manual_seed(0)
    t = torch.tensor(10)
    if kind == "unet2d":
        return ddpm_pipeline().unet, (torch.randn(2, 3, 8, 8, generator=g), t), {}
    unet = sd_unet(layers_per_block=2) if kind == "sd" else sdxl_unet()
    kwargs = {"encoder_hidden_states": torch.randn(2, 5, TEXT_DIM, generator=g),
              "timestep_cond": None, "cross_attention_kwargs": None, "added_cond_kwargs": None,
              "return_dict": False}
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, TEXT_DIM, generator=g),
                                       "time_ids": torch.randn(2, 6, generator=g)}
    return unet, (torch.randn(2, 4, 8, 8, generator=g), t), kwargs


def _skipped(path, k, r, branch):
    """Whether DeepCache skips the module at ``path`` at a cached step of ``branch``."""
    block, layer = divmod(branch, 3)
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)(?:\.(resnets|attentions|downsamplers)\.(\d+))?",
                 path)
    if path.startswith("mid_block"):
        return True
    if not m:
        return False
    i, sub = int(m[2]), m[3]
    if m[1] == "down_blocks":
        return i > block or (i == block and sub is not None
                             and (sub == "downsamplers" or int(m[4]) >= layer))
    return i < k or (i == k and sub is not None and int(m[4]) < r)


@pytest.mark.parametrize("kind", ["sd", "sdxl", "unet2d"])
def test_deep_split_composes_for_every_branch(kind):
    unet, args, kwargs = _tiny(kind)
    call = fxprop.graph.capture.flatten_call(unet.forward, args, kwargs)
    captured, layout = fxprop.graph.capture.capture(unet, call), find_layout(unet)
    resnets = [len(b.resnets) for b in unet.up_blocks]
    for branch in valid_branches(resnets):
        parts = split(captured, deep_cut(captured, layout, branch))
        assert check_split(parts, captured, call.tensors) <= 1e-5
        k, r = branch_target(branch, resnets)
        paths = {module_path(n) for n in parts.step.graph.nodes if n.op != "placeholder"}
        assert 0 in parts.step_inputs and "conv_in" in paths  # the step part reads the latent
        assert not any(p.startswith("mid_block") for p in paths)
        assert f"{layout.up}.{k}.resnets.{r}.conv1" in paths
        wrong = [p for p in paths if _skipped(p, k, r, branch)]
        assert not wrong, f"branch {branch}: the step part runs {wrong[:3]}"


# -- pipelines against the deepcache package ----------------------------------------------


def _reference(pipe, run, interval, branch):
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return run(pipe)
    finally:
        helper.disable()


def _sd_run(pipe):
    out = pipe(**text_embeds(1), guidance_scale=5.0, height=16, width=16, output_type="latent",
               num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
    return out.images


def _pair(factory, unet):
    """A reference pipeline and one with the same components but its own identical UNet (the
    reference helper rebinds ``forward`` of the shared UNet's blocks)."""
    reference = factory()
    candidate = type(reference)(**{**reference.components, "unet": unet()})
    for pipe in (reference, candidate):
        pipe.set_progress_bar_config(disable=True)
    return reference, candidate


@pytest.fixture(scope="module")
def sd_pair():
    return _pair(lambda: sd_pipeline(unet=sd_unet(layers_per_block=2)), lambda: _tiny("sd")[0])


@pytest.mark.parametrize("interval", [2, 3])
@pytest.mark.parametrize("branch", range(6))
def test_sd_matches_deepcache(sd_pair, branch, interval):
    reference, candidate = sd_pair
    expected = _reference(reference, _sd_run, interval, branch)
    fxprop.accelerate(candidate, key_steps=interval, reuse="deep", branch=branch)
    torch.testing.assert_close(_sd_run(candidate), expected, rtol=0, atol=1e-4)


def test_sd_every_step_key_equals_plain(sd_pair):
    reference, candidate = sd_pair
    plain = _sd_run(reference)
    for branch in (0, 5):
        fxprop.accelerate(candidate, key_steps=1, reuse="deep", branch=branch)
        torch.testing.assert_close(_sd_run(candidate), plain, rtol=0, atol=1e-5)


def test_sd_prior_noise_can_be_turned_on(sd_pair):
    _, candidate = sd_pair
    fxprop.accelerate(candidate, key_steps=2, reuse="deep")
    without = _sd_run(candidate)
    fxprop.accelerate(candidate, key_steps=2, reuse="deep", prior_noise=0.003)
    assert_differs(_sd_run(candidate), without, 1e-4)


@pytest.fixture(scope="module")
def controlnet_pair():
    """ControlNet's output convs start at zero; random ones make its residuals matter."""
    reference, candidate = _pair(controlnet_pipeline, sd_unet)
    g = torch.Generator().manual_seed(7)
    controlnet = reference.controlnet  # shared by both pipelines
    with torch.no_grad():
        for zero in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
            for p in zero.parameters():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return reference, candidate


@pytest.mark.parametrize("branch", [0, 4])  # 4: the mid block's output, without the residual
def test_controlnet_runs_every_step_and_matches_deepcache(controlnet_pair, branch):
    reference, candidate = controlnet_pair
    image = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)).clamp(-1, 1)

    def run(pipe):
        return pipe(**text_embeds(1), image=image, guidance_scale=5.0, height=16, width=16,
                    num_inference_steps=STEPS, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    expected = _reference(reference, run, 2, branch)
    controlnet_class = type(candidate.controlnet)
    fxprop.accelerate(candidate, key_steps=2, reuse="deep", branch=branch)
    assert type(candidate.controlnet) is controlnet_class  # not gated to key steps
    torch.testing.assert_close(run(candidate), expected, rtol=0, atol=1e-4)


def test_ddpm_pipeline_matches_deepcache():
    reference, candidate = _pair(ddpm_pipeline, lambda: _tiny("unet2d")[0])

    def run(pipe):
        return pipe(batch_size=2, num_inference_steps=STEPS, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    plain = run(reference)
    fxprop.accelerate(candidate, key_steps=1, reuse="deep", branch=4)
    torch.testing.assert_close(run(candidate), plain, rtol=0, atol=1e-5)
    for branch in (0, 1, 3, 4):
        expected = _reference(reference, run, 2, branch)
        fxprop.accelerate(candidate, key_steps=2, reuse="deep", branch=branch)
        torch.testing.assert_close(run(candidate), expected, rtol=0, atol=1e-4)
