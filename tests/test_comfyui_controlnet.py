"""ControlNets at key steps only in ComfyUI (``fxprop/clients/comfyui/control.py``), with a real
``comfy.cldm`` ControlNet (random weights, its zero convs too) applied by ComfyUI's own
ControlNetApplyAdvanced node, on the tiny UNet of ``tests/comfy_env.py``.

The reference for sparse key steps is independent of fxprop's ControlNet code: the same fxprop
runner without its ``CALC_COND_BATCH`` wrapper (the ControlNet runs every step, as ComfyUI runs
it) under a ``DIFFUSION_MODEL`` wrapper written here, outside fxprop's, that replaces the
residuals of every non-key step by the key steps' (linear forecast, in the policy's variable,
through the last two key steps whose ControlNets were active alike, as the UNet's frontier is
forecast), except at the steps the test says run the ControlNet.
"""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
import torch.utils._pytree as pytree

from comfy_env import conditioning, require_comfy, tiny_controlnet, tiny_patcher, \
    torchvision_stand_ins
from conftest import assert_differs

COMFY = require_comfy()
if COMFY.patcher_extension is None:
    pytest.skip("this ComfyUI predates model wrappers: fxprop refuses it (test_comfyui.py)",
                allow_module_level=True)

from fxprop.clients.comfyui.patch import KEY, patch_model  # noqa: E402
from fxprop.clients.comfyui.runner import ComfyRunner  # noqa: E402
from fxprop.plan.policies import make_policy  # noqa: E402

WRAPPERS = COMFY.patcher_extension.WrappersMP
STEPS, CFG, SHAPE, KEYS = 8, 3.0, (1, 4, 8, 8), (0, 3, 6)   # every 3rd step a key step


@pytest.fixture(scope="module")
def env():
    """The model, a ControlNet counting its runs, ComfyUI's apply node and the run's sigmas."""
    with torchvision_stand_ins():
        import nodes
    model, control = tiny_patcher(COMFY), tiny_controlnet(COMFY)
    runs: list = []
    control.control_model.register_forward_hook(lambda *_: runs.append(1))
    sampling = model.get_model_object("model_sampling")
    sigmas = COMFY.samplers.calculate_sigmas(sampling, "normal", STEPS)
    return dict(model=model, control=control, runs=runs, apply=nodes.ControlNetApplyAdvanced(),
                sampling=sampling, sigmas=sigmas.tolist())


def hint(seed: int) -> torch.Tensor:
    return torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(seed))


def controlled(env, ranges=((0.0, 1.0),), positive=None, negative=None, uncond=True):
    """Conditionings with one ControlNet per ``(start, end)`` range, chained in order (each
    applies after the previous one); ``uncond=False``: on the positive prompt only."""
    positive = positive or conditioning(1)
    negative = negative or conditioning(2)
    for i, (start, end) in enumerate(ranges):
        pos, neg = env["apply"].apply_controlnet(positive, negative, env["control"], hint(i),
                                                 1.0, start, end)
        positive, negative = pos, (neg if uncond else negative)
    return positive, negative


def sample(model, conds) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return COMFY.sample.sample(model, torch.randn(SHAPE, generator=g), STEPS, CFG, "euler",
                               "normal", *conds, torch.zeros(SHAPE), seed=0, disable_pbar=True)


def fxprop(model, reuse, interval=3, gated=True, spy=None):
    """``model`` patched by fxprop (DeepCache or encoder propagation, linear forecast);
    ``gated=False``: without its ControlNet wrapper; ``spy(runner)`` may wrap its methods."""
    runner = ComfyRunner(make_policy(reuse, key_steps=interval, forecast=1, prior_noise=0.0))
    if spy is not None:
        spy(runner)
    patched = patch_model(model, runner)
    if not gated:
        patched.remove_wrappers_with_key(WRAPPERS.CALC_COND_BATCH, KEY)
    return patched


def oracle(env, reuse, patterns=None, fresh=(), spy=None):
    """The reference for sparse key steps (see the module docstring): ``patterns``, which
    ControlNets are active at each step (None: the same every step); ``fresh``, the non-key
    steps that run the ControlNet."""
    sigmas, kept = env["sigmas"], {}
    patterns = patterns or [()] * STEPS
    variable = make_policy(reuse, key_steps=3, forecast=1).forecast_in   # deep: signal level
    x = [float(i) if variable == "step" else (1 + s * s) ** -0.5 for i, s in enumerate(sigmas)]

    def substitute(executor, *args, **kwargs):
        call = inspect.signature(executor.original).bind(*args, **kwargs)
        options, control = call.arguments["transformer_options"], call.arguments["control"]
        step = min(range(STEPS), key=lambda i: abs(sigmas[i] - float(options["sigmas"][0])))
        chunk = tuple(options["cond_or_uncond"])
        if control is not None and step in KEYS:
            leaves, spec = pytree.tree_flatten(control)
            kept.setdefault(chunk, []).append((step, leaves, spec))
        elif control is not None and step not in fresh:
            alike = [e for e in kept[chunk] if patterns[e[0]] == patterns[kept[chunk][-1][0]]]
            (k, now, spec), before = alike[-1], alike[-2:-1]
            if before:
                k0, then, _ = before[0]
                w = (x[step] - x[k]) / (x[k] - x[k0])
                now = [f + w * (f - f0) for f, f0 in zip(now, then)]
            call.arguments["control"] = pytree.tree_unflatten(now, spec)
        return executor(*call.args, **call.kwargs)

    model = env["model"].clone()
    model.add_wrapper_with_key(WRAPPERS.DIFFUSION_MODEL, "oracle", substitute)  # outside fxprop's
    return fxprop(model, reuse, gated=False, spy=spy)


def percent_at(sampling, sigma: float) -> float:
    """The sampling percent whose sigma is ``sigma`` (ComfyUI's percent_to_sigma, inverted)."""
    low, high = 0.0, 1.0
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if sampling.percent_to_sigma(mid) > sigma else (low, mid)
    return (low + high) / 2


def close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reuse", ["deep", "encoder"])
def test_every_key_step_equals_plain_with_a_controlnet(env, reuse):
    conds = controlled(env)
    plain = sample(env["model"], conds)
    assert_differs(plain, sample(env["model"], (conditioning(1), conditioning(2))), 1e-3)
    env["runs"].clear()
    torch.testing.assert_close(sample(fxprop(env["model"], reuse, interval=1), conds), plain,
                               atol=1e-5, rtol=0)
    assert len(env["runs"]) == STEPS


@pytest.mark.parametrize("reuse, uncond", [("deep", True), ("encoder", True),
                                           ("deep", False)])
def test_the_controlnet_runs_at_key_steps_only(env, reuse, uncond):
    """Batched cond and uncond with one ControlNet; or the ControlNet on the positive prompt
    only (cond and uncond then run as separate calls, the uncond one without control).
    DeepCache's shallow branch reads the residual of the shallowest skip, so serving it
    changes the output; encoder propagation's decoder reads none (ComfyUI adds the residuals
    to the skips, which are cached with them), so the output is the same as when the
    ControlNet runs every step."""
    conds = controlled(env, uncond=uncond)
    env["runs"].clear()
    out = sample(fxprop(env["model"], reuse), conds)
    assert len(env["runs"]) == len(KEYS)
    close(out, sample(oracle(env, reuse), conds))
    every_step = sample(fxprop(env["model"], reuse, gated=False), conds)
    if reuse == "encoder":
        assert torch.equal(out, every_step)
    else:
        assert_differs(out, every_step, 1e-3)


def test_chained_controlnets_whose_ranges_start_and_end_between_key_steps(env):
    """Chain A (whole run) -> B (steps 0-1) -> C (steps 4-7): steps 2, 4 and 5 have other
    ControlNets active than their key step, so they run them; steps 1 and 7 are served."""
    sampling, sigmas = env["sampling"], env["sigmas"]
    b_end = percent_at(sampling, (sigmas[1] + sigmas[2]) / 2)
    c_start = percent_at(sampling, (sigmas[3] + sigmas[4]) / 2)
    conds = controlled(env, [(0.0, 1.0), (0.0, b_end), (c_start, 1.0)])
    patterns = [(i >= 4, i <= 1, True) for i in range(STEPS)]   # active: (C, B, A)
    fresh = {i for i in range(STEPS) if i not in KEYS
             and patterns[i] != patterns[max(k for k in KEYS if k <= i)]}
    assert fresh == {2, 4, 5}
    env["runs"].clear()
    out = sample(fxprop(env["model"], "deep"), conds)
    assert len(env["runs"]) == sum(sum(patterns[i]) for i in sorted(set(KEYS) | fresh))
    close(out, sample(oracle(env, "deep", patterns, fresh), conds))


def leave_the_plan_at_4(runner):
    """From step 4 on, the whole UNet runs (as after a refusal)."""
    real = runner.run_planned

    def run_planned(gen, call, parts):
        if gen.step == 4:
            gen.leave_plan()
            return None
        return real(gen, call, parts)
    runner.run_planned = run_planned


def forget_the_frontier_at_4(runner):
    """Step 4's call finds no frontier (as a call signature first seen there): it runs whole
    and keeps its own."""
    real = runner.parts_for

    def parts_for(*args):
        gen = runner.follow_state().generation
        if gen.step == 4:
            gen.slots.clear()
        return real(*args)
    runner.parts_for = parts_for


@pytest.mark.parametrize("spy, fresh", [(leave_the_plan_at_4, {4, 5, 6, 7}),
                                        (forget_the_frontier_at_4, {4})])
def test_a_step_that_runs_the_whole_unet_gets_fresh_residuals(env, spy, fresh):
    """A non-key step whose call runs the whole UNet after all runs the ControlNet for it
    rather than the served residuals."""
    conds = controlled(env)
    env["runs"].clear()
    out = sample(fxprop(env["model"], "deep", spy=spy), conds)
    assert len(env["runs"]) == len(set(KEYS) | fresh)
    close(out, sample(oracle(env, "deep", fresh=fresh, spy=spy), conds))


def test_another_packs_controlnet_class_runs_every_step_with_one_log_line(env, caplog):
    base = env["control"]

    class Other(COMFY.controlnet.ControlNet):   # as a node pack subclasses ComfyUI's
        def copy(self):
            c = Other(None, load_device=base.load_device)
            c.control_model, c.control_model_wrapped = base.control_model, \
                base.control_model_wrapped
            self.copy_to(c)
            return c

    other = Other(base.control_model, load_device=base.load_device)
    conds = env["apply"].apply_controlnet(conditioning(1), conditioning(2), other, hint(0), 1.0,
                                          0.0, 1.0)
    model = fxprop(env["model"], "deep")
    env["runs"].clear()
    with caplog.at_level(logging.WARNING, "fxprop.comfyui"):
        out = sample(model, conds)
        again = sample(model, conds)
    assert len(env["runs"]) == 2 * STEPS
    lines = [r.message for r in caplog.records if "ControlNet residuals" in r.message]
    assert len(lines) == 1 and "Other is not one of ComfyUI's own" in lines[0]
    close(out, sample(fxprop(env["model"], "deep", gated=False), conds))
    assert torch.equal(out, again)
