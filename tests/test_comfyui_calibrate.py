"""Calibrated schedules in ComfyUI itself (``tests/comfy_env.py``), on a tiny random-weight
SD1.5 UNet: a calibration measured on plain KSampler runs, followed by the calibrated node.

The independent check: calibration verifies its chosen schedule on its own graphs
(:meth:`Measurement.accelerated` over the recorded calls, on a held-out seed); the node runs
the same schedule through ComfyUI's sampler and fxprop's runner. Both must give the same final
error against plain KSampler. One calibration (cheap settings) serves the file.
"""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch

from comfy_env import conditioning, require_comfy, tiny_patcher

COMFY = require_comfy()
if COMFY.patcher_extension is None:
    pytest.skip("this ComfyUI predates model wrappers, which fxprop refuses (tests/test_comfyui.py "
                "checks the refusal)", allow_module_level=True)

from fxprop.calibration.data import Calibration  # noqa: E402
from fxprop.graph.fingerprint import weights_digest  # noqa: E402
from fxprop.comfyui import NODE_CLASS_MAPPINGS  # noqa: E402
from fxprop.clients.comfyui.calibrate import (ComfySampling, calibrate_comfy,  # noqa: E402
                                               other_seed)
from fxprop.clients.comfyui.calibrated import CalibratedRunner  # noqa: E402
from fxprop.clients.comfyui.patch import patch_model  # noqa: E402
from fxprop.clients.comfyui.runner import ComfyRunner  # noqa: E402
from fxprop.plan.policies import make_policy  # noqa: E402

STEPS, CFG, SHAPE = 8, 3.0, (1, 4, 8, 8)
#: cheap measurement settings (every stacked run at the batch itself: one capture less)
CHEAP = dict(probes=3, max_interval=3, verify=2, max_rows=2, held_out=1, progress=False)


def sampling(steps: int = STEPS, sampler: str = "euler", scheduler: str = "normal",
             denoise: float = 1.0) -> ComfySampling:
    return ComfySampling(conditioning(1), conditioning(2), {"samples": torch.zeros(SHAPE)},
                         steps, CFG, sampler, scheduler, denoise)


def sample(model, seed: int, steps: int = STEPS, sampler: str = "euler",
           scheduler: str = "normal", denoise: float = 1.0) -> torch.Tensor:
    """A KSampler run from ``seed``'s noise, as the calibration runs it."""
    latent = torch.zeros(SHAPE)
    noise = COMFY.sample.prepare_noise(latent, seed)
    return COMFY.sample.sample(model, noise, steps, CFG, sampler, scheduler, conditioning(1),
                               conditioning(2), latent, denoise=denoise, seed=seed,
                               disable_pbar=True)


def relative_error(found: torch.Tensor, plain: torch.Tensor) -> float:
    return float((found.double() - plain.double()).norm() / plain.double().norm())


@pytest.fixture(scope="module")
def model():
    return tiny_patcher(COMFY)


@pytest.fixture(scope="module")
def calibration(model):
    return calibrate_comfy(model, sampling(), [0], target_speedup=1.5, **CHEAP)


@pytest.fixture(scope="module")
def saved(calibration, tmp_path_factory):
    path = tmp_path_factory.mktemp("calibration") / "tiny.json"
    calibration.save(path)
    return path


def test_calibration_names_its_sampler_grid_and_weights(model, calibration, saved):
    sigmas = COMFY.samplers.KSampler(model, STEPS, torch.device("cpu"), "euler", "normal").sigmas
    assert calibration.scheduler == "ComfyUI sample_euler"
    assert calibration.num_steps == STEPS and calibration.num_inference_steps == STEPS
    torch.testing.assert_close(torch.tensor(calibration.sigmas, dtype=torch.float64),
                               sigmas.double())
    assert calibration.weights == weights_digest(model.model.diffusion_model)
    assert 1 < len(calibration.key_steps) < STEPS and calibration.key_steps[0] == 0
    assert Calibration.load(saved) == calibration
    assert "sigmas:     [14.61" in str(calibration)


def test_calibrated_node_gives_the_error_calibration_verified(model, calibration, saved,
                                                              monkeypatch):
    """The node's run on the held-out seed is as far from plain as calibration measured."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "output_directory", str(saved.parent))  # files live there
    node = NODE_CLASS_MAPPINGS["FxpropCalibrated"]()
    assert list(node.INPUT_TYPES()["required"]) == list(inspect.signature(node.patch).parameters)
    (patched,) = node.patch(model, str(saved))
    held_out = other_seed(0)
    plain = sample(model, held_out)
    error = relative_error(sample(patched, held_out), plain)
    assert error > 1e-4  # sparse key steps ran
    torch.testing.assert_close(error, calibration.verified_error, rtol=1e-4, atol=0)


def test_calibrated_node_equals_the_policy_it_names(model, calibration):
    """The calibration's cut, forecast and key steps, run by the plain runner."""
    options = calibration.accelerate_options(STEPS, calibration.scheduler)
    by_hand = patch_model(model, ComfyRunner(make_policy(**options)))
    calibrated = patch_model(model, CalibratedRunner(calibration))
    torch.testing.assert_close(sample(calibrated, 3), sample(by_hand, 3), atol=1e-6, rtol=0)


@pytest.mark.parametrize("run, match", [
    (dict(steps=STEPS + 1), "for 8 steps, not 9"),
    (dict(scheduler="karras"), "for the sigmas"),
    (dict(denoise=0.6), "for the sigmas"),
    (dict(sampler="dpmpp_2m"), "for ComfyUI sample_euler, not ComfyUI sample_dpmpp_2m"),
])
def test_calibrated_runs_refuse_another_grid_or_sampler(model, calibration, run, match):
    patched = patch_model(model, CalibratedRunner(calibration))
    with pytest.raises(ValueError, match=match):
        sample(patched, 0, **run)


def test_calibrated_runs_refuse_other_weights_then_run_again(model, calibration):
    """A LoRA-like weight patch is another model: refused at the run's first call; the runner
    is left ready for the model it was calibrated on."""
    runner = CalibratedRunner(calibration)
    lora = model.clone()
    weight = model.model.diffusion_model.out[2].weight
    lora.add_patches({"diffusion_model.out.2.weight": (torch.randn_like(weight) * 0.2,)}, 1.0)
    with pytest.raises(ValueError, match="other weights"):
        sample(patch_model(lora, runner), 0)
    expected = sample(patch_model(model, ComfyRunner(make_policy(**calibration.accelerate_options(
        STEPS, calibration.scheduler)))), 5)
    torch.testing.assert_close(sample(patch_model(model, runner), 5), expected, atol=1e-6, rtol=0)


def test_calibrate_refuses_what_it_cannot_measure(model, calibration):
    accelerated = patch_model(model, CalibratedRunner(calibration))
    with pytest.raises(ValueError, match="patched by an fxprop node"):
        calibrate_comfy(accelerated, sampling(), [0], target_speedup=1.5, **CHEAP)
    with pytest.raises(ValueError, match="once a step"):
        calibrate_comfy(model, sampling(steps=3, sampler="heun"), [0], target_speedup=1.2,
                        **CHEAP)
    with pytest.raises(ValueError, match="non-empty list"):
        calibrate_comfy(model, sampling(), [], target_speedup=1.5)
    with pytest.raises(TypeError, match="seeds"):
        calibrate_comfy(model, sampling(), [0.5], target_speedup=1.5)
    with pytest.raises(ValueError, match="names no sigma grid"):
        CalibratedRunner(Calibration(**{**calibration.__dict__, "sigmas": ()}))


def test_calibrate_node_on_a_lora_model_saves_a_calibration_for_it(model, tmp_path,
                                                                   monkeypatch):
    """The node measures the weights as ComfyUI loaded them (LoRA patched in), saves the
    calibration where it says, and returns the model following it."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))  # files live there
    lora = model.clone()
    weight = model.model.diffusion_model.out[2].weight
    lora.add_patches({"diffusion_model.out.2.weight": (torch.randn_like(weight) * 0.2,)}, 1.0)
    node = NODE_CLASS_MAPPINGS["FxpropCalibrate"]()
    inputs = node.INPUT_TYPES()  # what ComfyUI passes: the function's parameters
    required = inputs["required"]
    assert [*required, *inputs["optional"]] == list(inspect.signature(node.calibrate).parameters)
    assert {"euler", "heun"} <= set(required["sampler_name"][0])
    assert {"normal", "karras"} <= set(required["scheduler"][0])
    patched, summary = node.calibrate(
        lora, conditioning(1), conditioning(2), {"samples": torch.zeros(SHAPE)}, seed=7, runs=1,
        steps=4, cfg=CFG, sampler_name="euler", scheduler="normal", denoise=1.0,
        target_speedup=1.2, filename=str(tmp_path / "lora.json"), held_out=1)
    saved = Calibration.load(tmp_path / "lora.json")
    assert str(saved) == summary and saved.scheduler == "ComfyUI sample_euler"
    assert saved.verdict["samples"] == 1   # one run, one held-out seed, a batch of 1
    sample(patched, 1, steps=4)  # follows it without a fallback warning
    with pytest.raises(ValueError, match="other weights"):
        sample(patch_model(model, CalibratedRunner(saved)), 1, steps=4)


def test_calibration_files_live_in_comfyuis_output_directory(tmp_path, monkeypatch):
    import folder_paths

    from fxprop.clients.comfyui.calibration_nodes import calibration_path
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    assert calibration_path("fxprop/a.json") == tmp_path / "fxprop" / "a.json"
    assert calibration_path(str(tmp_path / "b.json")) == tmp_path / "b.json"
    with pytest.raises(ValueError, match="calibration file name is needed"):
        calibration_path("  ")


# -- calibration files stay in ComfyUI's output directory (issue 32, row 2) --------------------

@pytest.fixture
def output(tmp_path, monkeypatch):
    """ComfyUI's output directory, in ``tmp_path`` beside a folder ``outside`` it, and a
    symlink from it to that folder."""
    import folder_paths

    (tmp_path / "output").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "output" / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    (tmp_path / "output" / "file.json").symlink_to(tmp_path / "outside" / "file.json")
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    return tmp_path / "output"


@pytest.mark.parametrize("name", ["../escaped/evil.json", "{outside}/evil.json",
                                  "link/evil.json", "file.json", "{output}/../evil.json", "."])
def test_calibration_files_outside_the_output_directory_are_refused(output, name):
    """``..``, an absolute path elsewhere and a symlink out of it (to a folder or a file)
    resolve outside it; the directory itself is no file in it."""
    from fxprop.clients.comfyui.calibration_nodes import calibration_path

    name = name.format(outside=output.parent / "outside", output=output)
    with pytest.raises(ValueError, match="not a file inside ComfyUI's output directory"):
        calibration_path(name)


def test_calibration_files_inside_the_output_directory_are_accepted(output):
    from fxprop.clients.comfyui.calibration_nodes import calibration_path

    assert calibration_path("fxprop/nested/a.json") == output / "fxprop" / "nested" / "a.json"
    assert calibration_path(str(output / "b.json")) == output / "b.json"
    assert calibration_path(str(output / "x" / ".." / "c.json")) == output / "c.json"
    assert calibration_path(" d.json ") == output / "d.json"


def test_calibrate_node_refuses_a_path_outside_before_it_measures(output, model, monkeypatch):
    """The node checks its filename first: nothing is measured, nothing written outside."""
    from fxprop.clients.comfyui import calibration_nodes

    def measure(*args, **kwargs):
        pytest.fail("the Calibrate node measured before it checked its filename")
    monkeypatch.setattr(calibration_nodes, "calibrate_comfy", measure)
    node = NODE_CLASS_MAPPINGS["FxpropCalibrate"]()
    for name in ("../escaped/evil.json", "link/evil.json"):
        with pytest.raises(ValueError, match="not a file inside ComfyUI's output directory"):
            node.calibrate(model, conditioning(1), conditioning(2),
                           {"samples": torch.zeros(SHAPE)}, seed=0, runs=1, steps=4, cfg=CFG,
                           sampler_name="euler", scheduler="normal", denoise=1.0,
                           target_speedup=1.2, filename=name)
    assert not (output.parent / "escaped").exists()
    assert list((output.parent / "outside").iterdir()) == []


def test_calibrated_node_refuses_a_calibration_outside(output, model, calibration):
    calibration.save(output.parent / "outside" / "c.json")
    node = NODE_CLASS_MAPPINGS["FxpropCalibrated"]()
    for name in ("../outside/c.json", str(output.parent / "outside" / "c.json"), "link/c.json"):
        with pytest.raises(ValueError, match="not a file inside ComfyUI's output directory"):
            node.patch(model, name)
    calibration.save(output / "c.json")
    node.patch(model, "c.json")  # the same file inside loads


def test_calibrated_node_refuses_a_calibration_edited_to_hold_nan(output, model, calibration):
    """Issue 32, row 3: a saved calibration with a NaN sigma loaded, and then matched every
    grid (a NaN compares false); the node refuses it naming the field."""
    data = calibration.to_json()
    data["sigmas"] = [*data["sigmas"][:2], math.nan, *data["sigmas"][3:]]
    (output / "nan.json").write_text(json.dumps(data))
    node = NODE_CLASS_MAPPINGS["FxpropCalibrated"]()
    with pytest.raises(ValueError, match=r"sigmas\[2\] must be a finite number, got nan"):
        node.patch(model, "nan.json")
