"""The verified choice: schedule families, paired significance, finalists and the decision rule
(node by node on hand-made tables and errors; the choice on a real measurement is in
test_calibrate.py and test_comfyui_calibrate.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxprop.calibration.choice import race, row_errors, verified_choice
from fxprop.calibration.families import every_n, family_schedules, phase_schedules
from fxprop.calibration.finalists import NEAR_COUNT, NEAR_RATIO, Finalist, finalists
from fxprop.calibration.measure import states
from fxprop.calibration.optimise import Option, speedup
from fxprop.calibration.significance import MIN_SAMPLES, paired_gain


def test_families_at_fifty_steps_and_ten_key_steps():
    found = family_schedules(50, 10)
    assert found["every"] == tuple(range(0, 50, 5))
    assert found["every+last"] == (*range(0, 50, 6), 49)
    assert found["even+last"][0] == 0 and found["even+last"][-1] == 49
    assert len(found["even+last"]) == 10
    gaps = [b - a for a, b in zip(found["dense ends"], found["dense ends"][1:])]
    assert gaps[0] < gaps[len(gaps) // 2] > gaps[-1]   # dense at both ends, sparse between


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 60), st.data())
def test_every_family_schedule_is_a_valid_schedule_within_its_count(n, data):
    count = data.draw(st.integers(1, n))
    for name, keys in {**family_schedules(n, count), **phase_schedules(n, count, 4)}.items():
        assert keys[0] == 0 and list(keys) == sorted(set(keys)), name
        assert keys[-1] < n and len(keys) <= count, name
        if name.startswith("phases"):
            assert keys[-1] == n - 1 and len(keys) >= count - 2


def test_phase_schedules_step_by_their_interval_in_each_third():
    keys = phase_schedules(30, 19, 3)["phases 1/3/2"]
    assert [k for k in keys if k < 10] == list(range(10))
    assert [k for k in keys if 10 <= k < 20] == [10, 13, 16, 19]
    assert [k for k in keys if k >= 20] == [22, 24, 26, 28, 29]   # from where b left off


def test_paired_gain_in_db_and_its_interval():
    base = [0.1 * (1 + i % 5) for i in range(20)]
    halved = paired_gain([e / 2 for e in base], base)
    assert halved.mean == pytest.approx(20 * math.log10(2))
    assert halved.low == pytest.approx(halved.mean) and halved.significant
    same = paired_gain(base, base)
    assert (same.mean, same.low, same.high, same.significant) == (0, 0, 0, False)
    assert not paired_gain([e / 2 for e in base[:MIN_SAMPLES - 1]],
                           base[:MIN_SAMPLES - 1]).significant   # too few to tell


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(1e-4, 1.0), st.floats(1e-4, 1.0)), min_size=2,
                max_size=40))
def test_paired_gain_is_antisymmetric_and_its_interval_holds_the_mean(pairs):
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    forward, back = paired_gain(a, b), paired_gain(b, a)
    assert forward.mean == pytest.approx(-back.mean, abs=1e-9)
    assert forward.low <= forward.mean + 1e-9 and forward.mean <= forward.high + 1e-9


@pytest.mark.parametrize("better, base, message", [
    ([0.1], [0.1, 0.2], "same, non-zero number"), ([], [], "same, non-zero number"),
    ([math.nan], [0.1], "finite")])
def test_paired_gain_refuses_unpaired_or_non_finite_errors(better, base, message):
    with pytest.raises(ValueError, match=message):
        paired_gain(better, base)


def _finalist(keys, family, cut=("deep", 0), order=1, n=12):
    return Finalist(Option(cut, order, keys, n, 2.0, 0.01), family)


def _errors(scale, count=20, wobble=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(count, generator=gen, dtype=torch.float64) * wobble
    return [scale * (1 + i % 4) * (1 + float(x)) for i, x in enumerate(noise)]


def test_a_fitted_schedule_replaces_the_best_hand_set_one_only_where_significantly_better():
    every3, every4 = _finalist((0, 3, 6, 9), "every"), _finalist((0, 4, 8), "every")
    fitted = _finalist((0, 2, 5, 11), "fitted")
    clearly = {every3: _errors(0.02), every4: _errors(0.03), fitted: _errors(0.01)}
    pick, verdict = verified_choice(clearly, [every3, every4])
    assert pick == fitted and not verdict["hand_set"] and verdict["samples"] == 20
    assert verdict["versus"] == every3.describe() and verdict["interval_db"][0] > 0
    # better on average, by less than chance explains: the better hand-set one is kept
    noisy = {every3: _errors(0.02, wobble=1.0, seed=1), every4: _errors(0.03),
             fitted: _errors(0.0195, wobble=1.0, seed=2)}
    if sum(map(math.log, noisy[fitted])) < sum(map(math.log, noisy[every3])):
        pick, verdict = verified_choice(noisy, [every3, every4])
        assert pick == every3 and verdict["hand_set"] and verdict["interval_db"][0] <= 0


def test_the_baseline_is_the_best_hand_set_finalist_even_a_faster_one():
    """On a pretrained UNet at 4x every 8th step beat every 5th: the kept hand-set schedule
    is the best verified, not the one of the most key steps."""
    every5, every8 = _finalist((0, 5, 10), "every"), _finalist((0, 8), "every")
    fitted = _finalist((0, 4, 9), "fitted")
    errors = {every5: _errors(0.03), every8: _errors(0.02, wobble=0.5, seed=3),
              fitted: _errors(0.0199, wobble=0.5, seed=4)}
    assert verified_choice(errors, [every5, every8])[0] in (every8, fitted)
    assert verified_choice({every5: _errors(0.03), every8: _errors(0.02)},
                           [every5, every8])[0] == every8


def test_without_hand_set_finalists_the_nearest_is_chosen():
    a, b = _finalist((0, 4), "fitted"), _finalist((0, 6), "even+last")
    pick, verdict = verified_choice({a: _errors(0.02), b: _errors(0.01)}, [])
    assert pick == b and verdict == {}


def test_the_race_stops_only_finalists_significantly_worse_than_the_leader():
    """Verification runs held-out call by call; a finalist clearly behind the leader after a
    call runs no further, the best of each side always does, and each survivor has every
    call's samples."""
    every3, every4 = _finalist((0, 3, 6, 9), "every"), _finalist((0, 4, 8), "every")
    fitted, near = _finalist((0, 2, 5, 11), "fitted"), _finalist((0, 2, 6, 11), "phases")
    far = _finalist((0, 5, 11), "dense ends")
    scale = {every3: 0.02, every4: 0.05, fitted: 0.01, near: 0.01, far: 0.04}
    order = list(scale)
    ran = []

    def score(finalist, stage):
        ran.append((finalist, stage))
        return _errors(scale[finalist], wobble=0.2, seed=10 * stage + order.index(finalist),
                       count=10)

    errors = race([every3, every4, fitted, near, far], [0, 1, 2], score, progress=False)
    assert set(errors) == {every3, fitted, near}   # best hand-set, leader, and a close one
    assert all(len(e) == 30 for e in errors.values())
    assert sorted(f.family for f, stage in ran if stage == 0) == sorted(
        f.family for f in scale)
    assert {f for f, stage in ran if stage > 0} == {every3, fitted, near}
    # with too few samples to tell, no one is stopped
    assert len(race(list(scale), [0, 1], lambda f, s: score(f, s)[:3], progress=False)) == 5


def test_row_errors_are_per_sample_relative_errors():
    true = torch.ones(3, 2, 2)
    found = true.clone()
    found[1] += 0.5
    assert row_errors(found, true) == pytest.approx([0.0, 0.5, 0.0])


def _fake_measurement(n=12, max_interval=4, orders=(0,)):
    """What :func:`finalists` reads of a measurement: one deep cut at a tenth of the UNet's
    cost, every segment measured with an error growing with its length (and predicted larger
    for a forecast than for reuse)."""
    cut = SimpleNamespace(id=("deep", 0), step_cost=0.1)
    table = {(state, j): 0.001 * (j - state[0]) ** 2 * (1 + j / n) * len(state)
             for j in range(n) for state in states(j, orders, max_interval)}
    return SimpleNamespace(num_steps=n, cuts=[cut], orders=orders, max_interval=max_interval,
                           tables=lambda: {cut.id: table})


def test_finalists_are_hand_set_at_or_below_the_cost_and_the_best_of_each_family():
    measurement, target = _fake_measurement(), 2.5
    fitted = [Option(("deep", 0), 0, (0, 3, 6, 9), 12, speedup(4, 12, 0.1), 0.05)]
    hand, others = finalists(measurement, fitted, target, 4)
    assert len(hand) == 1 and len(others) <= 4   # one cut, one order, one every-N at its cost
    for f in hand:
        assert f.hand_set and f.option.speedup >= target
        gap = f.option.key_steps[1]
        assert f.option.key_steps == every_n(12, gap)
    keys = [(f.option.cut, f.option.order, f.option.key_steps) for f in hand + others]
    assert len(keys) == len(set(keys))
    assert all(f.option.speedup >= target * (1 - 1e-9) for f in others)
    assert {f.family.split()[0] for f in others} <= {"fitted", "every+last", "even+last",
                                                      "dense", "phases"}


def test_every_hand_set_schedule_of_the_best_predicted_ones_cost_is_verified():
    """At long segments several every-N-th schedules have as many key steps (every 10th to
    14th of 30 steps: 3), and the tables do not tell them apart (every 17th and 19th step at
    6x on the digits model): all of them run, not the ones of other costs."""
    measurement = _fake_measurement(n=30, max_interval=30)
    flat = {key: 0.01 for key in measurement.tables()[("deep", 0)]}
    measurement.tables = lambda: {("deep", 0): flat}
    hand, _ = finalists(measurement, [], 5.0, 1)
    assert sorted(f.option.key_steps[1] for f in hand) == [10, 11, 12, 13, 14]


def test_hand_set_schedules_of_fewer_key_steps_predicted_near_the_best_are_verified():
    """A faster every-N-th schedule can be the better (every 8th step beat every 5th on a
    pretrained UNet): up to NEAR_COUNT predicted within NEAR_RATIO run beside the best."""
    measurement = _fake_measurement(max_interval=6)
    flat = {key: 0.01 for key in measurement.tables()[("deep", 0)]}
    measurement.tables = lambda: {("deep", 0): flat}
    hand, _ = finalists(measurement, [], 2.5, 1)
    gaps = [f.option.key_steps[1] for f in hand]
    assert len(hand) == NEAR_COUNT and gaps[:2] == [3, 4]   # every 3rd: 4 key steps, 4th: 3
    assert all(f.option.error <= hand[0].option.error * NEAR_RATIO for f in hand)


def test_finalists_take_the_forecast_orders_in_turn():
    """Predictions rank schedules of one cut and order, not across orders: with reuse predicted
    better throughout, each side still verifies its best forecast schedule."""
    measurement = _fake_measurement(orders=(0, 1))
    fitted = [Option(("deep", 0), order, (0, 3, 6, 9), 12, speedup(4, 12, 0.1), 0.05)
              for order in (0, 1)]
    hand, others = finalists(measurement, fitted, 2.5, 4)
    assert sorted(f.option.order for f in hand) == [0, 1]
    assert {f.option.order for f in others} == {0, 1}
