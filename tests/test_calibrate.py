"""Calibrated schedules: the exact optimiser against brute force, the Calibration data, and the
measured errors against the output differences of real accelerated generations."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxprop
from conftest import decoder_attn_unet, make_scheduler, sample_of
from fxprop.calibration.calibrate import (MAX_INTERVAL, calibrate, held_out_for,
                                          longest_segment, measure)
from fxprop.calibration.choice import final_errors
from fxprop.calibration.data import FORMAT_VERSION, Calibration
from fxprop.calibration.measure import output_errors, states
from fxprop.calibration.optimise import (Option, check_budget, choose, options, pareto,
                                         schedule_error)
from fxprop.calibration.significance import MIN_SAMPLES
from fxprop.calibration.sources import other_noise

torch.set_num_threads(1)
STEPS = 8


# -- the optimiser -------------------------------------------------------------------------------

@st.composite
def tables(draw):
    """A random error table over ``n <= 7`` steps, some entries missing (infeasible)."""
    n, order = draw(st.integers(1, 7)), draw(st.sampled_from([0, 1, 2]))
    table = {}
    for j in range(n):
        for s in states(j, [order], max_interval=n):
            if draw(st.integers(0, 5)):
                table[s, j] = draw(st.floats(0, 1, allow_nan=False))
    return n, order, table


@settings(max_examples=150, deadline=None)
@given(tables())
def test_pareto_equals_brute_force_for_every_key_step_count(case):
    n, order, table = case
    found = pareto(table, n, order)
    for count in range(n + 1):
        sets = [(0, *rest) for rest in itertools.combinations(range(1, n), count - 1)] \
            if count else []
        brute = min((schedule_error(table, keys, n, order) for keys in sets), default=math.inf)
        if math.isinf(brute):
            assert found[count] is None
            continue
        error, keys = found[count]
        assert len(keys) == count and keys[0] == 0
        assert error == pytest.approx(brute, abs=1e-9)
        assert schedule_error(table, keys, n, order) == pytest.approx(error, abs=1e-9)


def test_states_read_order_plus_one_key_steps_unless_they_reach_step_0():
    for j in range(12):
        found = states(j, [0, 2], max_interval=4)
        assert len(found) == len(set(found))
        for s in found:
            assert list(s) == sorted(s, reverse=True)
            assert len(s) in (1, 3) or s == (s[0], 0)
            assert j - s[0] < 4 and all(a - b <= 4 for a, b in zip(s, s[1:]))
        assert {s for s in found if len(s) == 1} == {(k,) for k in range(max(0, j - 3), j)}


def _options():
    table = {((0,), 1): 0.2, ((0,), 2): 0.5, ((1, 0), 2): 0.1, ((2, 0), 3): 0.3}
    return options(table, 4, 1, ("deep", 0), step_cost=0.1)


def test_choose_picks_least_error_at_a_speed_and_fastest_within_an_error():
    found = _options()
    assert choose(found, target_speedup=1.5).key_steps == (0, 2)
    assert choose(found, max_error=0.12).key_steps == (0, 1, 3)
    assert choose(found, max_error=1.0).key_steps == (0, 2)


@pytest.mark.parametrize("speed, error, message", [
    (1.0, None, "target_speedup must be a number > 1"),
    (True, None, "target_speedup must be a number > 1"),
    (None, None, "give exactly one budget"),
    (2.0, 0.1, "give exactly one budget"),
    (None, -1.0, "max_error must be a finite number >= 0"),
    (None, math.nan, "max_error must be a finite number >= 0"),
])
def test_bad_budgets_raise_naming_the_rule(speed, error, message):
    with pytest.raises(ValueError, match=message):
        check_budget(speed, error)


def test_unreachable_budgets_say_what_is_reachable():
    found = _options()
    with pytest.raises(ValueError, match=r"target_speedup=9.*best reachable .* is 1\.818"):
        choose(found, target_speedup=9)
    with pytest.raises(ValueError, match=r"max_error=0.0.*least .* error .* is 0\.1 "):
        choose([o for o in found if o.error > 0], max_error=0.0)


def test_segments_are_as_long_as_the_target_needs_with_room_to_place_key_steps():
    """max_interval=None measures 5-step segments, longer where no cut reaches the target
    with them: at 6x a cut costing 12% of a step needs 2 key steps of 50 (every 25th), and
    gets half as long again to place them."""
    cuts = [SimpleNamespace(step_cost=0.62), SimpleNamespace(step_cost=0.118)]
    assert longest_segment(None, 50, cuts) == longest_segment(2.0, 50, cuts) == MAX_INTERVAL
    assert longest_segment(6.0, 50, cuts) == 38    # 1.5 x 25
    assert longest_segment(4.0, 50, cuts) == 12    # every 8th: 7 key steps, 4.14x
    assert longest_segment(9.0, 50, cuts) == 50    # none reaches: measure every segment


def test_held_out_generations_are_enough_for_a_significant_difference_by_default():
    """held_out=None: as many plain generations on other noise per call as give the 8 paired
    samples a fitted schedule needs to be chosen (two calls of one image: 4 each)."""
    assert held_out_for(torch.zeros(1, 4, 8, 8), 2) == 4
    assert held_out_for(torch.zeros(1, 4, 8, 8), 1) == MIN_SAMPLES
    assert held_out_for(torch.zeros(3, 4, 8, 8), 2) == 2
    assert held_out_for(torch.zeros(10, 4, 8, 8), 2) == 1


# -- Calibration as data ---------------------------------------------------------------------

def hand_made(**changes) -> Calibration:
    fields = dict(reuse="deep", branch=0, forecast=1, forecast_in="signal",
                  forecast_reach=math.inf, key_steps=(0, 2, 3), num_steps=5,
                  num_inference_steps=5, scheduler="DDIMScheduler", model="M:0",
                  predicted_speedup=1.8, predicted_error=0.01,
                  error_curve=(0.0, 0.02, 0.0, 0.0, 0.03),
                  budget={"target_speedup": 1.5},
                  alternatives=(("deep", 0, 0, 1.8, 0.02),))
    return Calibration(**{**fields, **changes})


def test_calibration_saves_and_loads_as_json(tmp_path):
    calibration = hand_made()
    calibration.save(tmp_path / "c.json")
    assert Calibration.load(tmp_path / "c.json") == calibration
    text = str(calibration)
    for shown in ("deep, branch 0", "forecast:   1 (linear", "[0, 2, 3]", "1.80x", "0.0100"):
        assert shown in text


def test_calibration_of_another_version_or_no_calibration_is_refused(tmp_path):
    data = hand_made().to_json()
    (tmp_path / "v.json").write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(ValueError, match="format version 99 is not supported"):
        Calibration.load(tmp_path / "v.json")
    (tmp_path / "x.json").write_text(json.dumps({"version": FORMAT_VERSION, "reuse": "deep"}))
    with pytest.raises(ValueError, match="not a calibration: missing"):
        Calibration.load(tmp_path / "x.json")


def test_a_format_3_calibration_reads_as_one_for_any_grid(tmp_path):
    """Format 3 predates ``sigmas``; its files (the demo ships one) load with an empty grid,
    which ``check_grid`` does not compare, while a grid given is compared."""
    data = {k: v for k, v in hand_made().to_json().items() if k != "sigmas"}
    (tmp_path / "v3.json").write_text(json.dumps({**data, "version": 3}))
    loaded = Calibration.load(tmp_path / "v3.json")
    assert loaded == hand_made() and loaded.sigmas == () and loaded.version == FORMAT_VERSION
    loaded.check_grid("DDIMScheduler", [1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="for DDIMScheduler, not EulerDiscreteScheduler"):
        loaded.check_grid("EulerDiscreteScheduler", [1.0, 0.0])
    gridded = hand_made(sigmas=(2.0, 1.0, 0.0))
    gridded.check_grid("DDIMScheduler", [2.0, 1.00005, 0.0])
    with pytest.raises(ValueError, match="for 2 steps, not 3"):
        gridded.check_grid("DDIMScheduler", [3.0, 2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"for the sigmas \[2, 1, 0\], not \[2, 1.1, 0\]"):
        gridded.check_grid("DDIMScheduler", [2.0, 1.1, 0.0])


def test_accelerate_options_only_for_the_steps_and_scheduler_calibrated():
    calibration = hand_made()
    options = calibration.accelerate_options(5, make_scheduler("ddim"))
    assert options == dict(reuse="deep", key_steps=[0, 2, 3], forecast=1, forecast_in="signal",
                           forecast_reach=math.inf, prior_noise=0, branch=0)
    assert "branch" not in hand_made(reuse="encoder", branch=None).accelerate_options(
        5, "DDIMScheduler")
    with pytest.raises(ValueError, match="for 5 steps .*not 6"):
        calibration.accelerate_options(6, make_scheduler("ddim"))
    with pytest.raises(ValueError, match="for DDIMScheduler, not EulerDiscreteScheduler"):
        calibration.accelerate_options(5, make_scheduler("euler"))


# -- calibration of the shipped digits model ---------------------------------------------------

LABELS = [3, 7]


def _call(seed: int) -> dict:
    return dict(labels=LABELS, generator=torch.Generator().manual_seed(seed), output_type="pt")


@pytest.fixture(scope="module")
def digits():
    from fxprop.demo import load_digits_pipeline

    pipe = load_digits_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def calibration(digits):
    return calibrate(digits, [_call(0)], STEPS, target_speedup=1.6, orders=(0, 1), verify=1,
                     held_out=1, max_interval=3, progress=False)


def test_verification_calls_are_the_calls_on_other_noise():
    call = dict(labels=LABELS, generator=[torch.Generator().manual_seed(5)], guidance_scale=2.0)
    other = other_noise(call)
    assert other is not call and other["labels"] == LABELS and other["guidance_scale"] == 2.0
    seeds = [g.initial_seed() for g in (call["generator"][0], other["generator"][0])]
    assert seeds[0] == 5 and seeds[1] not in (5, 6)   # not the next call's usual seed either
    assert other_noise(call)["generator"][0].initial_seed() == seeds[1]  # deterministic
    assert call["generator"][0].initial_seed() == 5 and torch.Generator().manual_seed(5).get_state(
        ).equal(call["generator"][0].get_state())  # the user's generator is not advanced
    loop = lambda unet: None  # noqa: E731  (a bare UNet's loop seeds its own noise)
    assert other_noise(loop) is loop


def _outputs(pipe, model, seed: int, add: tuple | None = None):
    """The UNet output of every step of one generation (a forward hook on ``model``, which
    adds ``add = (step, delta)`` to that step's output) and the final sample."""
    outs, final = [], []

    def hook(module, args, out):
        if add is not None and len(outs) == add[0]:
            out = (out[0] + add[1], *out[1:]) if isinstance(out, tuple) else \
                type(out)(sample=out.sample + add[1])
        outs.append(sample_of(out).clone())
        return out

    def last(pipe_, i, t, kwargs):
        final[:] = [kwargs["latents"].clone()]
        return {}

    handle = model.register_forward_hook(hook)
    try:
        pipe(**_call(seed), num_inference_steps=STEPS, callback_on_step_end=last)
    finally:
        handle.remove()
    return outs, final[0]


@pytest.mark.slow  # the calibration fixture (~20 s)
def test_calibration_meets_its_budget_and_describes_itself(digits, calibration):
    assert calibration.predicted_speedup >= 1.6
    assert calibration.key_steps[0] == 0 and len(calibration.key_steps) < STEPS
    assert calibration.num_steps == STEPS and calibration.scheduler == "DDIMScheduler"
    assert len(calibration.error_curve) == STEPS
    assert calibration.predicted_error == pytest.approx(math.sqrt(sum(calibration.error_curve)))
    assert all(calibration.error_curve[k] == 0 for k in calibration.key_steps)
    assert calibration.verified_error is not None and calibration.verified_error > 0
    calibration.check_model(digits.unet)


def test_measured_error_is_the_output_difference_as_it_reaches_the_final_sample(digits,
                                                                                 calibration):
    """At the first non-key step ``j`` every earlier step was a key step, so the accelerated
    output differs from plain's there only by the reuse error; calibration's entry is that
    difference times the gain of step ``j`` (recomputed here by a full perturbed plain run,
    not a replay), squared, relative to the final sample."""
    plain, final = _outputs(digits, digits.unet, 0)
    pipe = type(digits)(**digits.components)
    pipe.set_progress_bar_config(disable=True)
    fxprop.accelerate(pipe, **calibration.accelerate_options(STEPS, pipe.scheduler))
    fast, _ = _outputs(pipe, pipe.unet, 0)
    j = next(i for i in range(STEPS) if i not in calibration.key_steps)
    torch.testing.assert_close(fast[j - 1], plain[j - 1], rtol=1e-5, atol=1e-5)
    delta = plain[j] - plain[j - 1]
    _, moved = _outputs(digits, digits.unet, 0, add=(j, delta))
    gain = ((moved - final).double().norm() / delta.double().norm()).item()
    error = output_errors([fast[j]], [plain[j]])
    assert error > 1e-4  # the step really reused features
    expected = (gain * error / final.double().norm().item()) ** 2
    assert calibration.error_curve[j] == pytest.approx(expected, rel=2e-3)


def _bare_loop(steps: int) -> tuple:
    """``(unet, scheduler, loop)``: a tiny UNet and a user's DDIM loop of ``steps`` steps over
    it (a bare UNet's loop seeds its own noise)."""
    unet, scheduler = decoder_attn_unet(), make_scheduler("ddim")
    text = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))

    def loop(model):
        scheduler.set_timesteps(steps)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t, encoder_hidden_states=text).sample, t, x).prev_sample
    return unet, scheduler, loop


@pytest.mark.slow  # a measurement of a tiny UNet, 6 steps
def test_a_cut_and_order_per_segment_is_the_uniform_run_where_every_segment_is_the_same():
    """``segments`` (tools/mixed_cuts.py runs schedules with a cut and order per segment on
    the measurement's graphs): naming the schedule's own cut and order for every segment runs
    exactly what no ``segments`` runs; another cut for one segment runs something else."""
    unet, scheduler, loop = _bare_loop(6)
    measured = measure(unet, [loop], scheduler=scheduler, max_interval=3, progress=False)
    first, last = measured.cuts[0].id, measured.cuts[-1].id
    option = Option(first, 1, (0, 3), 6, 0.0, 0.0)
    uniform = final_errors(measured, option)
    assert final_errors(measured, option, segments={0: (first, 1), 3: (first, 1)}) == uniform
    assert final_errors(measured, option, segments={3: (last, 0)}) != uniform


@pytest.mark.slow  # ~9 s: a calibration
def test_bare_unet_is_calibrated_from_the_users_loop():
    unet, scheduler, loop = _bare_loop(5)
    found = calibrate(unet, [loop], scheduler=scheduler, max_error=10.0, max_interval=3,
                      progress=False)
    assert found.num_steps == 5 and found.num_inference_steps is None
    assert found.predicted_speedup > 1 and found.predicted_error <= 10.0


def test_calibration_refuses_bad_input(digits):
    with pytest.raises(ValueError, match="calls must be a non-empty list"):
        calibrate(digits, [], STEPS, target_speedup=2.0)
    with pytest.raises(ValueError, match="give exactly one budget"):
        calibrate(digits, [_call(0)], STEPS)
    with pytest.raises(ValueError, match="needs scheduler="):
        calibrate(decoder_attn_unet(), [lambda unet: None], max_error=0.1)
    accelerated = type(digits)(**digits.components)
    fxprop.accelerate(accelerated, reuse="deep")
    with pytest.raises(ValueError, match="fxprop.restore"):
        calibrate(accelerated, [_call(0)], STEPS, target_speedup=2.0)
    with pytest.raises(ValueError, match="best reachable FLOP-ideal speedup"):
        calibrate(digits, [_call(0)], STEPS, target_speedup=50.0, progress=False)


@pytest.mark.slow  # the calibration fixture (~20 s)
def test_accelerate_applies_a_calibration_and_refuses_other_steps(digits, calibration):
    pipe = type(digits)(**digits.components)
    pipe.set_progress_bar_config(disable=True)
    fxprop.accelerate(pipe, calibration)
    policy = fxprop.runtime_of(pipe).policy
    assert (policy.reuse, policy.forecast) == (calibration.reuse, calibration.forecast)
    by_options = type(digits)(**digits.components)
    fxprop.accelerate(by_options, **calibration.accelerate_options(STEPS, pipe.scheduler))
    runs = [p(**_call(3), num_inference_steps=STEPS).images for p in (pipe, by_options)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"this calibration is for {STEPS} steps"):
        pipe(**_call(3), num_inference_steps=STEPS + 1)
    other = type(digits)(**digits.components)
    other.scheduler = make_scheduler("euler")
    with pytest.raises(ValueError, match="this calibration is for DDIMScheduler, not Euler"):
        fxprop.accelerate(other, calibration)


def test_a_calibration_of_another_model_is_refused(digits):
    other = hand_made(model="UNet2DConditionModel:0000000000000000", num_steps=STEPS)
    with pytest.raises(ValueError, match="calibration is for the model UNet2DConditionModel:0"):
        fxprop.accelerate(type(digits)(**digits.components), other)


def test_the_model_id_is_what_the_model_is_not_where_it_was_loaded_from(digits, tmp_path):
    from fxprop.calibration.data import model_id
    from fxprop.demo import DIGITS_DIR, load_digits_pipeline

    shutil.copytree(DIGITS_DIR, tmp_path / "copy")
    assert model_id(load_digits_pipeline(tmp_path / "copy").unet) == model_id(digits.unet)
    changed = type(digits.unet).from_config({**digits.unet.config, "norm_eps": 1e-3})
    assert model_id(changed) != model_id(digits.unet)


def test_a_generation_that_changes_signature_midway_is_refused(digits):
    def loop(model):
        scheduler = make_scheduler("ddim")
        scheduler.set_timesteps(4)
        x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        for i, t in enumerate(scheduler.timesteps):
            batch = x if i < 2 else torch.cat([x, x])  # the batch doubles at step 2
            out = model(batch, t, encoder_hidden_states=torch.zeros(len(batch), 1, 64)).sample
            x = scheduler.step(out[:2], t, x).prev_sample

    with pytest.raises(ValueError, match="UNet call 2 has other input shapes"):
        calibrate(digits.unet, [loop], scheduler=make_scheduler("ddim"), max_error=1.0,
                  progress=False)


def test_the_shipped_calibration_names_its_weights(digits):
    """Issue 25, row 11: the same config with other weights is another model (it was accepted:
    the id hashed class and config only); the same weights in bf16 are the same model."""
    from fxprop.demo import DIGITS_CALIBRATION

    shipped = Calibration.load(DIGITS_CALIBRATION)
    shipped.check_model(digits.unet)
    other = type(digits.unet).from_config(digits.unet.config)  # its own random weights
    with pytest.raises(ValueError, match="calibration is for other weights of UNet2D"):
        fxprop.accelerate(type(digits)(**{**digits.components, "unet": other}), shipped)
    other.load_state_dict({k: v.bfloat16() for k, v in digits.unet.state_dict().items()})
    shipped.check_model(other.to(torch.bfloat16))


@pytest.mark.slow  # ~9 s: 50-step generations
def test_the_shipped_calibration_loads_and_applies_to_the_demo_pipeline(digits):
    from fxprop.demo import DIGITS_CALIBRATION

    shipped = Calibration.load(DIGITS_CALIBRATION)
    assert (shipped.num_steps, shipped.scheduler) == (50, "DDIMScheduler")
    assert shipped.budget == {"target_speedup": 2.0} and shipped.predicted_speedup >= 2.0
    shipped.check_model(digits.unet)
    pipe = fxprop.accelerate(type(digits)(**digits.components), shipped)
    plain = digits(labels=[3], generator=torch.Generator().manual_seed(5), output_type="pt",
                   num_inference_steps=50).images
    fast = pipe(labels=[3], generator=torch.Generator().manual_seed(5), output_type="pt",
                num_inference_steps=50).images
    assert 0 < float((fast - plain).abs().max()) < 0.5  # accelerated, and still the digit
    with pytest.raises(ValueError, match="this calibration is for 50 steps"):
        pipe(labels=[3], num_inference_steps=STEPS)


@pytest.mark.slow  # the calibration fixture (~20 s)
def test_cli_calibrate_passes_its_options_and_writes_the_calibration(tmp_path, monkeypatch,
                                                                     capsys, calibration):
    """`python -m fxprop calibrate` (the calibration itself stubbed: the fixture's). The
    command runs a thread per core unless OMP_NUM_THREADS says otherwise, and gives the
    caller back its thread count."""
    import os

    from fxprop import cli

    seen = []

    def fake(pipe, calls, steps, **options):
        seen.append((len(calls), steps, options, torch.get_num_threads()))
        return calibration
    monkeypatch.setattr(fxprop, "calibrate", fake)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    out = tmp_path / "c.json"
    assert cli.main(["calibrate", "--steps", "8", "--out", str(out), "--quiet"]) == 0
    assert torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cli.main(["calibrate", "--max-error", "0.05", "--out", str(out)]) == 0
    cores = min(len(os.sched_getaffinity(0)), 4)
    assert seen == [(2, 8, dict(target_speedup=2.0, max_error=None, progress=False), cores),
                    (2, 50, dict(target_speedup=None, max_error=0.05, progress=True), 1)]
    assert Calibration.load(out) == calibration
    assert "Calibration for UNet2DConditionModel" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["calibrate", "--speedup", "2", "--max-error", "0.1"],
                                  ["calibrate", "--steps", "many"]])
def test_cli_calibrate_refuses_bad_arguments(argv, capsys):
    from fxprop.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "not allowed with argument" in err or "invalid int value: 'many'" in err


def test_cli_without_a_command_prints_usage(capsys):
    from fxprop.cli import main

    assert main([]) == 2 and main(["nope"]) == 2
    assert "fxprop calibrate [--speedup X | --max-error E]" in capsys.readouterr().err
