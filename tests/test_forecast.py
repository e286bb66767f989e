"""Forecasting the frontier: plan weights, the key-frontier store, and equality with an
independent eager oracle (forward hooks that replace the frontier modules' outputs)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st

import fxprop
from conftest import assert_differs, make_scheduler, sd_unet
from diffusers import DDIMScheduler
from fxprop.plan.forecast import KeyFrontiers, check_forecast, forecast_weights, lagrange
from fxprop.plan.plans import make_plan
from fxprop.plan.schedules import key_step_schedule

TIMESTEPS = torch.tensor([999, 874, 749, 624, 499, 374, 249, 124])
KEYS = [0, 2, 3, 6]     # segments [0 1] [2] [3 4 5] [6 7]: orders 0, 1 and 2 all occur
#: sqrt(alpha_bar) of SD's betas at TIMESTEPS: the deep policy's default forecast variable
SIGNAL = DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                       beta_schedule="scaled_linear").alphas_cumprod[TIMESTEPS].sqrt().tolist()


# -- plan data ---------------------------------------------------------------------------------

def test_order_one_is_the_linear_step_of_the_definition():
    k_prev, k, j = 3, 6, 8
    (w_k, w_prev) = lagrange([k, k_prev], j)
    f_k, f_prev = 2.0, 5.0
    assert w_k * f_k + w_prev * f_prev == pytest.approx(f_k + (j - k) / (k - k_prev)
                                                         * (f_k - f_prev))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=25), st.sampled_from([0, 1, 2]),
       st.lists(st.floats(-3, 3), min_size=3, max_size=3))
def test_weights_extrapolate_polynomials_of_their_order_exactly(rest, order, coefficients):
    """A key step reads its own frontier; another step's weights reproduce every polynomial
    of the plan's order (so they sum to 1) and read only the last key steps before it, at
    most order + 1 of them."""
    is_key = [True, *rest]
    keys = [i for i, k in enumerate(is_key) if k]
    poly = np.polynomial.Polynomial(coefficients[: order + 1])
    for step, weights in enumerate(forecast_weights(is_key, order)):
        if is_key[step]:
            assert weights == ((step, 1.0),)
            continue
        used = [k for k, _ in weights]
        before = [k for k in keys if k <= step][::-1]
        assert used == before[: order + 1]
        degree = min(order, len(used) - 1)
        exact = np.polynomial.Polynomial(coefficients[: degree + 1])
        assert sum(w * exact(k) for k, w in weights) == pytest.approx(exact(step), abs=1e-6)
        if degree == order:
            assert sum(w * poly(k) for k, w in weights) == pytest.approx(poly(step), abs=1e-6)


@pytest.mark.parametrize("bad", [3, -1, True, 1.0, "1", None])
def test_forecast_outside_0_1_2_raises_naming_the_value(bad):
    with pytest.raises(ValueError, match=f"forecast must be one of .*got {bad!r}"):
        check_forecast(bad)
    if bad is not None:  # None takes the default through accelerate
        with pytest.raises(ValueError, match="forecast must be one of"):
            fxprop.accelerate(torch.nn.Linear(1, 1), key_steps=2, forecast=bad)


def test_plan_carries_the_weights_of_its_order():
    plan = make_plan(TIMESTEPS, key_step_schedule(KEYS), 1000, forecast=2)
    assert plan.forecast == 2
    assert plan.weights[2] == ((2, 1.0),)
    assert [k for k, _ in plan.weights[1]] == [0]
    assert [k for k, _ in plan.weights[5]] == [3, 2, 0]
    assert [k for k, _ in plan.weights[7]] == [6, 3, 2]


def test_signal_levels_agree_across_parameterisations():
    """sqrt(alpha_bar) from DDIM's alphas_cumprod equals 1 / sqrt(1 + sigma^2) from
    DPM-Solver's sigmas at its (integer) timesteps, and from Euler's up to its interpolation of
    sigmas between integer timesteps; Heun's paired calls share a level and count once."""
    ddim, dpm, euler, heun = (make_scheduler(n) for n in ("ddim", "dpm++", "euler", "heun"))
    for scheduler in (ddim, dpm, euler, heun):
        scheduler.set_timesteps(6)
    for sigmas, tolerance in ((dpm, 1e-6), (euler, 5e-3)):
        torch.testing.assert_close(torch.tensor(fxprop.signal_levels(sigmas)),
                                   torch.tensor(fxprop.signal_levels(ddim, sigmas.timesteps)),
                                   rtol=tolerance, atol=0)
    levels = fxprop.signal_levels(heun)
    assert levels[1] == levels[2] and len(levels) == len(heun.timesteps)
    is_key = [i in (0, 1, 2) for i in range(len(levels))]
    assert [k for k, _ in forecast_weights(is_key, 2, levels)[3]] == [2, 0]
    with pytest.raises(ValueError, match="neither sigmas nor alphas_cumprod"):
        fxprop.signal_levels(object.__new__(type("Flow", (), {"timesteps": TIMESTEPS})))


def test_a_signal_forecast_without_signal_levels_is_refused(unet):
    acc = fxprop.accelerate(unet, reuse="deep", forecast=1)
    with pytest.raises(ValueError, match="forecast_in='signal' needs the signal level"):
        acc.set_timesteps(TIMESTEPS)
    assert len(_with(acc, forecast_in="step").set_timesteps(TIMESTEPS)) == len(TIMESTEPS)


@pytest.mark.parametrize("name, bad", [("forecast_in", "sigma"), ("forecast_reach", 0),
                                       ("forecast_reach", float("nan")), ("forecast_reach", True)])
def test_bad_forecast_fields_raise_naming_them(name, bad):
    with pytest.raises(ValueError, match=name):
        fxprop.DeepCache(forecast=1, **{name: bad})


# -- the key-frontier store --------------------------------------------------------------------

def _frontier(value: float) -> tuple[torch.Tensor, ...]:
    return (torch.full((2, 3), value), torch.full((2, 1, 4), -value))


def test_key_frontiers_keep_order_plus_one_and_forecast_like_the_definition():
    store = KeyFrontiers(depth=2)
    for step, value in [(0, 1.0), (3, 4.0), (6, 10.0)]:
        store.add(step, "sig", _frontier(value))
    assert store.steps == (3, 6)                # depth bounds what is kept
    out = store.at(8, tuple(zip([6, 3], lagrange([6, 3], 8))))
    expected = 10.0 + (8 - 6) / (6 - 3) * (10.0 - 4.0)
    torch.testing.assert_close(out[0], torch.full((2, 3), expected))
    torch.testing.assert_close(out[1], torch.full((2, 1, 4), -expected))


def test_batched_frontiers_stack_each_steps_forecast():
    store = KeyFrontiers(depth=3)
    for step, value in [(0, 1.0), (2, 2.0), (3, 5.0)]:
        store.add(step, "sig", _frontier(value))
    weights = forecast_weights([True, False, True, True, False, False], 2)
    steps = range(3, 6)
    batched = store.batched(steps, [weights[s] for s in steps])
    for p in range(2):
        expected = torch.cat([store.at(s, weights[s])[p] for s in steps])
        torch.testing.assert_close(batched[p], expected)


def test_a_new_call_signature_drops_the_older_frontiers():
    store = KeyFrontiers(depth=3)
    store.add(0, "batch 2", _frontier(1.0))
    store.add(2, "batch 1", _frontier(2.0))
    assert store.has("batch 1") and not store.has("batch 2")
    out = store.at(3, tuple(zip([2, 0], lagrange([2, 0], 3))))  # step 0's frontier is gone
    torch.testing.assert_close(out[0], torch.full((2, 3), 2.0))


# -- the oracle: forward hooks that replace the frontier modules' outputs ----------------------

def _oracle_weights(xs: list[float], at: float) -> np.ndarray:
    """Weights of the interpolating polynomial through ``xs`` at ``at``, from a Vandermonde
    solve (not fxprop's product formula)."""
    xs = np.array(xs, dtype=np.float64)
    return np.linalg.solve(np.vander(xs, increasing=True).T, at ** np.arange(len(xs)))


class ForecastOracle:
    """At key steps records the outputs of ``modules``; at other steps replaces them by the
    polynomial through the last ``order + 1`` recorded outputs at ``positions``, evaluated at
    the step's position, moved at most ``reach`` times the last key spacing past the last."""

    def __init__(self, modules: list[torch.nn.Module], keys: list[int], order: int,
                 positions: list[float], reach: float) -> None:
        self.keys, self.order, self.step = set(keys), order, 0
        self.positions, self.reach = positions, reach
        self.records: dict[int, list] = {id(m): [] for m in modules}
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module, args, output):
        records = self.records[id(module)]
        if self.step in self.keys:
            records.append((self.step, pytree.tree_map(torch.clone, output)))
            return None
        last = records[-(self.order + 1):][::-1]
        xs = [self.positions[s] for s, _ in last]
        at = self.positions[self.step]
        if len(xs) > 1:
            limit = self.reach * abs(xs[0] - xs[1])
            at = float(np.clip(at, xs[0] - limit, xs[0] + limit))
        weights = _oracle_weights(xs, at)
        leaves = [pytree.tree_flatten(o)[0] for _, o in last]
        mixed = [sum(float(w) * ls[i] for w, ls in zip(weights, leaves))
                 for i in range(len(leaves[0]))]
        return pytree.tree_unflatten(mixed, pytree.tree_flatten(output)[1])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.fixture(scope="module")
def unet():
    return sd_unet(seed=3)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(len(TIMESTEPS), 2, 4, 8, 8, generator=g),
            torch.randn(2, 5, 32, generator=g))


@torch.no_grad()
def _loop(model, oracle: ForecastOracle | None = None) -> torch.Tensor:
    latents, context = _inputs()
    if hasattr(model, "set_timesteps"):
        model.set_timesteps(TIMESTEPS, signal=SIGNAL)
    outs = []
    for i, t in enumerate(TIMESTEPS):
        if oracle is not None:
            oracle.step = i
        outs.append(model(latents[i], t, encoder_hidden_states=context).sample)
    return torch.stack(outs)


def _oracle(unet, modules, keys, policy) -> torch.Tensor:
    positions = SIGNAL if policy.forecast_in == "signal" else list(range(len(TIMESTEPS)))
    oracle = ForecastOracle(modules, keys, policy.forecast, positions, policy.forecast_reach)
    try:
        return _loop(unet, oracle)
    finally:
        oracle.remove()


def _encoder_modules(unet):
    return [unet.conv_in, *unet.down_blocks, unet.mid_block]


def _deep_module(unet, branch: int):
    """What enters the up resnet of DeepCache's ``branch`` on this UNet (2 resnets per up
    block): the block's previous layer, or for its first resnet the deeper up block."""
    block = unet.up_blocks[-1 - branch // 3]
    r = len(block.resnets) - 1 - branch % 3
    if r == 0:
        return unet.up_blocks[len(unet.up_blocks) - 2 - branch // 3]
    return block.attentions[r - 1] if hasattr(block, "attentions") else block.resnets[r - 1]


@pytest.fixture(scope="module")
def runtimes(unet):
    """One runtime per cut, so every order and mode reuses its captures."""
    return {"encoder": fxprop.accelerate(unet, key_steps=KEYS, prior_noise=0),
            0: fxprop.accelerate(unet, reuse="deep", key_steps=KEYS, branch=0),
            1: fxprop.accelerate(unet, reuse="deep", key_steps=KEYS, branch=1),
            3: fxprop.accelerate(unet, reuse="deep", key_steps=KEYS, branch=3)}


def _with(runtime, **changes):
    runtime.policy = dataclasses.replace(runtime.policy, **changes)
    return runtime


@pytest.mark.parametrize("order, variable, reach", [(1, "step", 1.0), (2, "step", math.inf),
                                                    (2, "signal", 1.0)])
@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_encoder_forecast_equals_the_oracle(unet, runtimes, order, variable, reach, parallel):
    acc = _with(runtimes["encoder"], forecast=order, forecast_in=variable, forecast_reach=reach,
                parallel=parallel, max_batch=4 if parallel else None)  # chunks: 2 steps
    expected = _oracle(unet, _encoder_modules(unet), KEYS, acc.policy)
    torch.testing.assert_close(_loop(acc), expected, rtol=0, atol=1e-5)
    reuse = _loop(_with(acc, forecast=0, parallel=False, max_batch=None))
    assert_differs(reuse, expected, 1e-3, "reuse and forecast")


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("branch", [0, 1, 3])
def test_deep_forecast_equals_the_oracle(unet, runtimes, order, branch):
    acc = _with(runtimes[branch], forecast=order, forecast_in="signal" if branch else "step")
    expected = _oracle(unet, [_deep_module(unet, branch)], KEYS, acc.policy)
    torch.testing.assert_close(_loop(acc), expected, rtol=0, atol=1e-5)
    assert_differs(_loop(_with(acc, forecast=0)), expected, 1e-3, "reuse and forecast")


@pytest.mark.parametrize("cut", ["encoder", 0])
def test_every_step_a_key_step_equals_plain_for_any_order(unet, runtimes, cut):
    plain = _loop(unet)
    for order in (1, 2):
        acc = _with(runtimes[cut], forecast=order, key_steps=1)
        torch.testing.assert_close(_loop(acc), plain, rtol=0, atol=1e-5)
    _with(runtimes[cut], key_steps=KEYS)


# -- everywhere reuse works: pipelines, 2nd-order schedulers, ControlNet, compile, export -------

@pytest.mark.parametrize("case, scheduler, reuse", [
    ("sd-cfg", "heun", "deep"),
    pytest.param("controlnet", "ddim", "encoder", marks=pytest.mark.slow)])  # ~12 s
def test_pipelines_with_forecast(case, scheduler, reuse):
    """Every key step equals plain for order 2; sparse key steps follow the plan (a fallback
    warning fails this suite), with the pipeline's signal levels (Heun: two calls per step)
    and, for encoder propagation, in parallel mode too."""
    from test_pipelines import CASES, _run
    factory, kwargs = CASES[case]
    plain = factory()
    accelerated = fxprop.accelerate(type(plain)(**plain.components), key_steps=1,
                                    prior_noise=0, forecast=2, reuse=reuse)
    runtime = fxprop.runtime_of(accelerated)
    reference = _run(plain, kwargs(), scheduler)
    torch.testing.assert_close(_run(accelerated, kwargs(), scheduler), reference,
                               rtol=0, atol=1e-5)
    _with(runtime, key_steps=[0, 2, 3], forecast=1)
    sequential = _run(accelerated, kwargs(), scheduler)
    assert_differs(sequential, reference, 1e-4)
    _with(runtime, forecast=0)
    assert_differs(sequential, _run(accelerated, kwargs(), scheduler), 1e-4)
    if reuse == "encoder":
        _with(runtime, forecast=1, parallel=True)
        torch.testing.assert_close(_run(accelerated, kwargs(), scheduler), sequential,
                                   rtol=0, atol=1e-4)


@pytest.fixture
def fresh_dynamo():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.mark.slow  # ~8 s of inductor; compile is in test_compile
def test_compiled_forecast_has_no_graph_break_and_no_recompile(fresh_dynamo):
    """The weights are plan data applied between the parts, so every step runs one of the
    same two compiled graphs (full, step) whatever its weights."""
    unet = sd_unet(down_block_types=("DownBlock2D", "DownBlock2D"),
                   mid_block_type="UNetMidBlock2D",
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    options = dict(reuse="deep", key_steps=KEYS, forecast=2)
    compiled = fxprop.accelerate(unet, **options, compile={"backend": "aot_eager"})
    eager = fxprop.accelerate(unet, **options)
    torch.testing.assert_close(_loop(compiled), _loop(eager), rtol=0, atol=1e-4)
    assert not fresh_dynamo["graph_break"], dict(fresh_dynamo["graph_break"])
    assert fresh_dynamo["stats"]["unique_graphs"] == 2


@pytest.mark.slow  # ~9 s; export is in test_export
def test_export_follows_the_same_forecast(unet, runtimes, tmp_path):
    acc = _with(runtimes[0], forecast=2, forecast_in="step")  # the loop passes no signal levels
    latents, context = _inputs()
    fxprop.export(acc, tmp_path, latents[0], TIMESTEPS[0], encoder_hidden_states=context)
    loaded = fxprop.load(tmp_path)
    with torch.no_grad():
        loaded.set_timesteps(TIMESTEPS)
        out = torch.stack([loaded(latents[i], t, encoder_hidden_states=context)[0]
                           for i, t in enumerate(TIMESTEPS)])
    torch.testing.assert_close(out, _loop(acc), rtol=0, atol=1e-5)
