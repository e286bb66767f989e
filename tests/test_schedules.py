"""Key-step schedules and plans: plain data, validated once."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from fxprop.plan.plans import make_plan
from fxprop.plan.schedules import faster_diffusion, key_step_schedule


def test_faster_diffusion_preset_is_the_papers_set_at_50_steps():
    assert key_step_schedule("faster-diffusion")(50) == (0, 1, 2, 3, 5, 10, 15, 25, 35)


def test_faster_diffusion_scales_with_the_number_of_steps():
    assert faster_diffusion(25) == (0, 1, 2, 3, 5, 8, 13, 18)
    assert faster_diffusion(100) == (0, 2, 4, 6, 10, 20, 30, 50, 70)
    assert faster_diffusion(1) == (0,)


@given(st.integers(1, 200))
def test_every_preset_result_is_a_valid_key_set(n):
    steps = faster_diffusion(n)
    assert steps[0] == 0 and list(steps) == sorted(set(steps)) and steps[-1] < n


def test_interval_and_list():
    assert key_step_schedule(3)(10) == (0, 3, 6, 9)
    assert key_step_schedule([0, 4, 20])(10) == (0, 4)  # entries past the last step ignored


@pytest.mark.parametrize("bad, error, words", [
    ([], ValueError, "must not be empty"),
    ([0, -1], ValueError, "non-negative, got [-1]"),
    ([0, 3, 2], ValueError, "sorted ascending, got 3 before 2"),
    ([0, 2, 2], ValueError, "repeat a step, got [2]"),
    ([1, 2], ValueError, "must contain step 0"),
    ([0, 1.5], TypeError, "ints only"),
    (0, ValueError, "interval must be >= 1, got 0"),
    ("fast", ValueError, "unknown key_steps preset 'fast'; known presets: ['faster-diffusion']"),
    (2.0, TypeError, "got float"),
])
def test_bad_key_steps_name_the_rule_and_value(bad, error, words):
    with pytest.raises(error) as info:
        key_step_schedule(bad)
    assert words in str(info.value)


def test_user_schedule_function_is_validated_at_plan_time():
    schedule = key_step_schedule(lambda n: [1, 2])
    with pytest.raises(ValueError, match="must contain step 0"):
        schedule(10)


def test_plan_segments_and_injection():
    plan = make_plan([999, 800, 600, 400, 200], key_step_schedule([0, 3]), 1000)
    assert plan.is_key == (True, False, False, True, False)
    assert [(s.start, s.stop) for s in plan.segments] == [(0, 3), (3, 5)]
    assert plan.inject == (False, False, False, True, True)
    assert plan.segment_of(4).start == 3
