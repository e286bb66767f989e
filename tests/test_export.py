"""fxprop.export / fxprop.load: the loaded parts reproduce eager fxprop without the UNet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxprop
from conftest import (DECODER_ATTN, LOOP_TIMESTEPS, QUICK_BUILD, decoder_attn_unet,
                      loop_inputs, one_level_unet, run_loop, sdxl_unet)

TOLERANCE = 1e-4
KEYS = [0, 2, 3]


@pytest.fixture(scope="module")
def unet():
    return decoder_attn_unet()  # not changed by any test here


def _export(acc, path, aoti: bool = False):
    latents, kwargs = loop_inputs()
    return fxprop.export(acc, path, latents[0], LOOP_TIMESTEPS[0], aoti=aoti, **kwargs)


@pytest.fixture(scope="module")
def exported(unet, tmp_path_factory):
    """An encoder-propagation runtime and its export (shared: one capture, one export)."""
    acc = fxprop.accelerate(unet, key_steps=KEYS)
    return acc, _export(acc, tmp_path_factory.mktemp("export"))


def _assert_reproduces(loaded, acc, seed: int = 1):
    """The loaded parts and eager fxprop agree on a generation (other values, same shapes)."""
    latents, kwargs = loop_inputs(seed)
    torch.testing.assert_close(run_loop(loaded, latents, kwargs), run_loop(acc, latents, kwargs),
                               rtol=0, atol=TOLERANCE)


def test_loaded_export_reproduces_eager_fxprop(exported):
    acc, path = exported
    loaded = fxprop.load(path)
    assert {p.name for p in path.iterdir()} == {"full.pt2", "step.pt2", "fxprop.json"}
    _assert_reproduces(loaded, acc)


@pytest.mark.slow  # ~7 s; the encoder export stays
def test_loaded_deep_export_reproduces_eager_fxprop(unet, tmp_path):
    acc = fxprop.accelerate(unet, reuse="deep", key_steps=2, branch=0)
    loaded = fxprop.load(_export(acc, tmp_path))
    assert {p.name for p in tmp_path.iterdir()} == {"full.pt2", "step.pt2", "fxprop.json"}
    assert loaded.meta["reuse"] == "deep"
    _assert_reproduces(loaded, acc)


@pytest.mark.slow
def test_sdxl_conditioning_is_passed_by_the_same_names(tmp_path):
    acc = fxprop.accelerate(sdxl_unet(**DECODER_ATTN), key_steps=[0, 3])
    latents, kwargs = loop_inputs()
    kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    fxprop.export(acc, tmp_path, latents[0], LOOP_TIMESTEPS[0], **kwargs)
    loaded = fxprop.load(tmp_path)
    torch.testing.assert_close(run_loop(loaded, latents, kwargs), run_loop(acc, latents, kwargs),
                               rtol=0, atol=TOLERANCE)


@pytest.mark.slow
def test_load_needs_neither_the_unet_class_nor_diffusers(exported, tmp_path):
    """A fresh interpreter (about 20 s: it imports torch) loads and runs the export."""
    acc, path = exported
    latents, kwargs = loop_inputs()
    torch.save({"latents": latents, **kwargs}, tmp_path / "inputs.pt")
    torch.save(run_loop(acc, latents, kwargs), tmp_path / "expected.pt")
    script = f"""
import sys, torch
import fxprop
d = torch.load({str(tmp_path / 'inputs.pt')!r})
timesteps = torch.tensor({LOOP_TIMESTEPS.tolist()})
loaded = fxprop.load({str(path)!r})
loaded.set_timesteps(timesteps)
with torch.no_grad():
    out = torch.stack([loaded(d["latents"][i], t, encoder_hidden_states=d["encoder_hidden_states"])[0]
                       for i, t in enumerate(timesteps)])
assert "diffusers" not in sys.modules, "diffusers was imported"
torch.testing.assert_close(out, torch.load({str(tmp_path / 'expected.pt')!r}), rtol=0,
                           atol={TOLERANCE!r})
print("reproduced")
"""
    env = {**os.environ, "PYTHONPATH": str(Path(fxprop.__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "reproduced"


def test_bad_exports_and_calls_are_explained(unet, exported, tmp_path):
    latents, kwargs = loop_inputs()
    with pytest.raises(TypeError, match="accelerate it first"):
        fxprop.export(unet, tmp_path, latents[0], LOOP_TIMESTEPS[0], **kwargs)
    with pytest.raises(ValueError, match="parallel=False"):
        fxprop.export(fxprop.accelerate(unet, parallel=True), tmp_path, latents[0],
                      LOOP_TIMESTEPS[0], **kwargs)
    with pytest.raises(ValueError, match="no fxprop export"):
        fxprop.load(tmp_path)
    loaded = fxprop.load(exported[1])
    loaded.set_timesteps(LOOP_TIMESTEPS)
    assert loaded.meta["dtypes"][1] == "int64"  # a Python float timestep is converted
    assert loaded(latents[0], 999.0, encoder_hidden_states=kwargs["encoder_hidden_states"])[0].shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"sample is \[1, 4, 8, 8\].*\[2, 4, 8, 8\]"):
        loaded(latents[0][:1], LOOP_TIMESTEPS[0],
               encoder_hidden_states=kwargs["encoder_hidden_states"][:1])
    with pytest.raises(TypeError, match="takes the tensors"):
        loaded(latents[0], LOOP_TIMESTEPS[0])
    with pytest.raises(ValueError, match="no AOTInductor packages"):
        fxprop.load(exported[1], aoti=True)


@pytest.mark.slow
def test_aotinductor_packages_reproduce_eager_fxprop(tmp_path):
    """AOTInductor compiles both parts to a shared library. Its cost is inductor's codegen and
    the C++ build of every kernel, so this uses a one-level UNet (cross-attention in its
    decoder: the every-step part still reads the conditioning) and scalar kernels."""
    acc = fxprop.accelerate(one_level_unet(), key_steps=KEYS)
    with torch._inductor.config.patch(QUICK_BUILD):
        loaded = fxprop.load(_export(acc, tmp_path, aoti=True))
    assert type(loaded.full_part).__name__ == "AOTICompiledModel"
    _assert_reproduces(loaded, acc, seed=0)
