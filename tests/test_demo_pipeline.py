"""Tests of the shipped demo model in fxprop/demo/digits/ (offline, CPU, fast)."""

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from fxprop.demo import DIGITS_DIR, load_digits_pipeline  # noqa: E402
from fxprop.demo.classifier import classify, frechet_distance, load_classifier, load_heldout  # noqa: E402
from fxprop.demo.pipeline import DigitsPipeline, LabelEmbedding  # noqa: E402

STEPS = 8


@pytest.fixture(scope="module")
def pipe():
    pipe = load_digits_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, labels, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "pt")
    return pipe(labels, generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_loads_offline_with_expected_components(pipe):
    assert isinstance(pipe, DigitsPipeline)
    assert isinstance(pipe.label_embedding, LabelEmbedding)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.unet.config.in_channels == 1 and pipe.unet.config.sample_size == 16
    assert pipe.label_embedding.null_label == 10


def test_shipped_folder_is_small():
    size = sum(p.stat().st_size for p in DIGITS_DIR.rglob("*") if p.is_file())
    assert size < 20 * 2**20


@pytest.mark.parametrize("output_type", ["pt", "np", "pil"])
def test_output_shapes_and_range(pipe, output_type):
    images = run(pipe, [3, 7], output_type=output_type)
    if output_type == "pil":
        assert len(images) == 2 and all(isinstance(im, Image.Image) and im.size == (16, 16) for im in images)
        return
    shape = (2, 1, 16, 16) if output_type == "pt" else (2, 16, 16, 1)
    assert tuple(images.shape) == shape
    assert images.min() >= 0 and images.max() <= 1


def test_single_int_label_and_no_guidance(pipe):
    assert run(pipe, 5, guidance_scale=1.0).shape == (1, 1, 16, 16)


def test_deterministic_for_fixed_generator(pipe):
    a, b = run(pipe, [0, 1, 2], seed=3), run(pipe, [0, 1, 2], seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, run(pipe, [0, 1, 2], seed=4))


def test_callback_sees_every_step_and_can_replace_latents(pipe):
    seen = []

    def callback(p, i, t, kwargs):
        assert p is pipe and kwargs["latents"].shape == (2, 1, 16, 16)
        seen.append((i, int(t)))
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == STEPS - 1 else {}

    images = run(pipe, [4, 9], callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
    assert [i for i, _ in seen] == list(range(STEPS))
    assert [t for _, t in seen] == pipe.scheduler.timesteps.tolist()
    # zero latents -> mid grey (the tolerances of torch.allclose)
    torch.testing.assert_close(images, torch.full_like(images, 0.5), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("bad", [10, -1, 3.5, "7", True])
def test_bad_labels_raise_value_error_naming_the_value(pipe, bad):
    with pytest.raises(ValueError, match=str(bad) if not isinstance(bad, str) else "'7'"):
        pipe([1, bad], num_inference_steps=1)


def test_classifier_accuracy_on_heldout_digits():
    heldout = load_heldout()
    assert heldout["images"].shape[1:] == (1, 16, 16) and len(heldout["labels"]) > 200
    preds, feats = classify(load_classifier(), heldout["images"])
    assert (preds == heldout["labels"]).float().mean() >= 0.9
    assert feats.ndim == 2 and frechet_distance(feats, feats) == pytest.approx(0, abs=1e-3)


@pytest.mark.slow  # ~5 s of 50-step sampling
def test_samples_are_mostly_recognised(pipe):
    labels = list(range(10)) * 2
    images = run(pipe, labels, num_inference_steps=20) * 2 - 1
    preds, _ = classify(load_classifier(), images)
    assert (preds == torch.tensor(labels)).float().mean() >= 0.7
    assert np.isfinite(images.numpy()).all()


@pytest.mark.slow
def test_demo_command_runs_every_policy_and_writes_the_grid(tmp_path, capsys, monkeypatch):
    """`python -m fxprop demo`, shortened: every policy row (the calibrated one calibrated
    anew, as the shipped calibration is for 50 steps), the grid and the Pareto plot."""
    from fxprop import cli

    monkeypatch.setattr(cli, "calibration_calls", lambda: [dict(  # one small call: faster
        labels=[3, 7], generator=torch.Generator().manual_seed(0), output_type="pt")])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the command keeps the suite's 1 thread
    out = tmp_path / "grid.png"
    assert cli.main(["demo", "--per-digit", "1", "--steps", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name, _ in cli.POLICIES)
    assert "the shipped calibration is for 50 steps: calibrating for 6" in printed
    with Image.open(out) as grid:
        assert grid.size[1] == len(cli.POLICIES) * 64
    if importlib.util.find_spec("matplotlib") is None:  # the demo extra; CI installs dev's
        assert "no Pareto plot: matplotlib is not installed" in printed
        return
    with Image.open(tmp_path / "grid-pareto.png") as plot:
        assert plot.size[0] > 400


@pytest.mark.slow
def test_every_key_step_on_the_digits_pipeline_equals_plain(pipe):
    import fxprop

    plain = run(pipe, [3, 7])
    accelerated = fxprop.accelerate(type(pipe)(**pipe.components), key_steps=1, prior_noise=0)
    torch.testing.assert_close(run(accelerated, [3, 7]), plain, rtol=0, atol=1e-5)
