"""A calibration file edited by hand is refused, naming the field (issue 32, row 3): a NaN
compares false with anything, so every later check of a NaN field would pass."""

from __future__ import annotations

import math
import re

import pytest
import torch

from fxprop.calibration.data import Calibration
from test_calibrate import hand_made

#: A valid calibration's JSON with every optional part filled (a grid, a digest, a verification).
VERDICT = dict(chosen="phases 1/2/1, deep b0, forecast 1, 3 key steps", hand_set=False,
               samples=20, confidence=0.95, versus="every 2, deep b0, forecast 1, 3 key steps",
               gain_db=2.5, interval_db=[1.1, 3.9])
VALID = dict(sigmas=(2.0, 1.5, 1.0, 0.5, 0.5, 0.0), weights=(0.1, -0.2),
             verified_error=0.02, verdict=VERDICT)


@pytest.mark.parametrize("changes, named", [
    (dict(sigmas=[2.0, 1.5, math.nan, 0.5, 0.2, 0]), "sigmas[2] must be a finite number, got nan"),
    (dict(sigmas=[math.inf, 1.5, 1.0, 0.5, 0.2, 0]), "sigmas[0] must be a finite number, got inf"),
    (dict(sigmas=[2.0, 1.5, 1.0, 0.5, 0.2, "0"]), "sigmas[5] must be a finite number, got '0'"),
    (dict(sigmas=[2.0, 1.0, 0.0]), "len(sigmas) must be 0 (any grid) or num_steps + 1 = 6"),
    (dict(sigmas=[2.0, 1.5, 1.6, 0.5, 0.2, 0.0]), "sigmas[2] must be <= sigmas[1] = 1.5"),
    (dict(weights=[0.1, math.nan]), "weights[1] must be a finite number, got nan"),
    (dict(weights=[True, 0.2]), "weights[0] must be a finite number, got True"),
    (dict(error_curve=[0.0, math.nan, 0.0, 0.0, 0.03]), "error_curve[1] must be a finite number"),
    (dict(error_curve=[0.0, -0.02, 0.0, 0.0, 0.03]), "error_curve[1] must be a finite number >= 0"),
    (dict(error_curve=[0.0, 0.02, 0.0]), "len(error_curve) must be num_steps = 5"),
    (dict(error_curve=None), "error_curve must be a list of finite numbers, got None"),
    (dict(predicted_speedup=math.nan), "predicted_speedup must be a finite number > 0, got nan"),
    (dict(predicted_error=math.inf), "predicted_error must be a finite number >= 0, got inf"),
    (dict(predicted_error=True), "predicted_error must be a finite number >= 0, got True"),
    (dict(verified_error=math.nan), "verified_error must be None (not verified) or a finite"),
    (dict(forecast_reach=math.nan), "forecast_reach must be a finite number > 0 or None"),
    (dict(forecast_reach=-1.0), "forecast_reach must be a finite number > 0 or None (unbounded), "
                                "got -1.0"),
    (dict(reuse="middle"), "reuse must be \"encoder\" or \"deep\", got 'middle'"),
    (dict(branch=None), "branch must be an int >= 0 for reuse \"deep\", got None"),
    (dict(branch=1.0), "branch must be an int >= 0 for reuse \"deep\", got 1.0"),
    (dict(reuse="encoder", branch=0), "branch must be None (null) for reuse \"encoder\", got 0"),
    (dict(forecast=3), "forecast must be an int in 0..2 (its order), got 3"),
    (dict(forecast=True), "forecast must be an int in 0..2 (its order), got True"),
    (dict(forecast_in="time"), "forecast_in must be \"step\" or \"signal\", got 'time'"),
    (dict(num_steps=0), "num_steps must be an int >= 1, got 0"),
    (dict(num_steps=5.0), "num_steps must be an int >= 1, got 5.0"),
    (dict(key_steps=[1, 2, 3]), "key_steps must be a list starting at 0"),
    (dict(key_steps=[]), "key_steps must be a list starting at 0"),
    (dict(key_steps=[0, 2, 2]), "key_steps must be strictly increasing, got [0, 2, 2]"),
    (dict(key_steps=[0, 3, 2]), "key_steps must be strictly increasing, got [0, 3, 2]"),
    (dict(key_steps=[0, 2, 5]), "key_steps must be steps below num_steps = 5, got [0, 2, 5]"),
    (dict(key_steps=[0, 1.5]), "key_steps must be a list of ints >= 0, got [0, 1.5]"),
    (dict(scheduler=""), "scheduler must be a non-empty string, got ''"),
    (dict(model=None), "model must be a non-empty string, got None"),
    (dict(num_inference_steps=0), "num_inference_steps must be None (a bare UNet) or an int"),
    (dict(budget={"target_speedup": math.nan}), "budget must be a dict of finite numbers"),
    (dict(alternatives=[["deep", 0, 0, math.nan, 0.02]]), "alternatives must be a list of"),
    (dict(verdict={**VERDICT, "interval_db": [math.nan, 3.9]}), "verdict must be None or a dict"),
    (dict(verdict={**VERDICT, "samples": None}), "verdict must be None or a dict"),
    (dict(verdict=[1]), "verdict must be None or a dict"),
])
def test_a_calibration_field_that_breaks_its_rule_is_refused_naming_it(changes, named):
    """Issue 32, row 3: a NaN in ``sigmas`` or ``weights`` loaded, and every check then passed
    (a NaN compares false); each rule is checked at load, one field wrong at a time."""
    data = hand_made(**VALID).to_json()
    assert Calibration.from_json(data) == hand_made(**VALID)  # the rest is valid
    with pytest.raises(ValueError, match=re.escape(named)):
        Calibration.from_json({**data, **changes})


def test_a_hand_edited_nan_in_a_calibration_file_is_refused_at_load(tmp_path):
    """A JSON file holding ``NaN`` (Python's json reads it) is no calibration."""
    hand_made(**VALID).save(tmp_path / "c.json")
    text = (tmp_path / "c.json").read_text()
    (tmp_path / "c.json").write_text(text.replace("-0.2", "NaN"))
    with pytest.raises(ValueError, match=re.escape("weights[1] must be a finite number, got nan")):
        Calibration.load(tmp_path / "c.json")


@pytest.mark.parametrize("sigmas", [[2.0, math.nan, 0.0], [math.nan, 1.0, 0.0],
                                    [2.0, 1.0, math.nan]])
def test_check_grid_refuses_a_nan_sigma_of_the_run(sigmas):
    gridded = hand_made(sigmas=(2.0, 1.0, 0.0))
    with pytest.raises(ValueError, match="for the sigmas"):
        gridded.check_grid("DDIMScheduler", sigmas)


@pytest.mark.parametrize("where", ["model", "calibration"])
def test_check_model_refuses_a_nan_in_either_digest(where):
    """A model whose weights hold NaN, or a calibration made by hand with a NaN digest, is
    not a match (``max`` over the gaps dropped or kept the NaN by its position)."""
    from fxprop.calibration.data import model_id
    from fxprop.graph.fingerprint import weights_digest

    unet = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    digest = weights_digest(unet)
    calibration = hand_made(model=model_id(unet), weights=digest)
    calibration.check_model(unet)
    if where == "model":
        with torch.no_grad():
            unet[1].weight[0, 0] = math.nan
    else:
        calibration = hand_made(model=model_id(unet), weights=(*digest[:-1], math.nan))
    with pytest.raises(ValueError, match="other weights"):
        calibration.check_model(unet)


def test_a_verdict_is_kept_in_the_file_and_shown_and_format_4_reads_without_one(tmp_path):
    calibration = hand_made(**VALID)
    calibration.save(tmp_path / "c.json")
    assert Calibration.load(tmp_path / "c.json").verdict == VERDICT
    assert ("verified:   phases 1/2/1, deep b0, forecast 1, 3 key steps on 20 held-out samples; "
            "+2.50 dB over every 2, deep b0, forecast 1, 3 key steps (95% interval +1.10 to "
            "+3.90 dB)") in str(calibration)
    data = {k: v for k, v in calibration.to_json().items() if k != "verdict"}
    assert Calibration.from_json({**data, "version": 4}).verdict is None
