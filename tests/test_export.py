"""fxprop.export / fxprop.load: the loaded parts reproduce eager fxprop without the UNet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxprop
from conftest import sd_unet, sdxl_unet

TIMESTEPS = torch.tensor([999, 799, 599, 399, 199, 99])
TOLERANCE = 1e-4


def _small_unet():
    return sd_unet(down_block_types=("DownBlock2D", "DownBlock2D"),
                   mid_block_type="UNetMidBlock2D",
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def _inputs(seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(len(TIMESTEPS), batch, 4, 8, 8, generator=g),
            {"encoder_hidden_states": torch.randn(batch, 5, 32, generator=g)})


def _loop(model, latents, kwargs) -> torch.Tensor:
    model.set_timesteps(TIMESTEPS)
    with torch.no_grad():
        outs = [model(latents[i], t, **kwargs, return_dict=False)[0]
                if isinstance(model, fxprop.AcceleratedUNet) else model(latents[i], t, **kwargs)[0]
                for i, t in enumerate(TIMESTEPS)]
    return torch.stack(outs)


@pytest.mark.parametrize("options", [dict(key_steps=[0, 2, 3]),
                                     dict(reuse="deep", key_steps=2, branch=0)])
def test_loaded_export_reproduces_eager_fxprop(tmp_path, options):
    acc = fxprop.accelerate(_small_unet(), **options)
    latents, kwargs = _inputs()
    fxprop.export(acc, tmp_path, latents[0], TIMESTEPS[0], **kwargs)
    loaded = fxprop.load(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"full.pt2", "step.pt2", "fxprop.json"}
    latents, kwargs = _inputs(seed=1)  # other values, same shapes
    assert (_loop(loaded, latents, kwargs) - _loop(acc, latents, kwargs)).abs().max() <= TOLERANCE


def test_sdxl_conditioning_is_passed_by_the_same_names(tmp_path):
    acc = fxprop.accelerate(sdxl_unet(), key_steps=[0, 3])
    latents, kwargs = _inputs()
    kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    fxprop.export(acc, tmp_path, latents[0], TIMESTEPS[0], **kwargs)
    loaded = fxprop.load(tmp_path)
    assert (_loop(loaded, latents, kwargs) - _loop(acc, latents, kwargs)).abs().max() <= TOLERANCE


def test_load_needs_neither_the_unet_class_nor_diffusers(tmp_path):
    acc = fxprop.accelerate(_small_unet(), key_steps=[0, 3])
    latents, kwargs = _inputs()
    fxprop.export(acc, tmp_path, latents[0], TIMESTEPS[0], **kwargs)
    torch.save({"latents": latents, **kwargs}, tmp_path / "inputs.pt")
    torch.save(_loop(acc, latents, kwargs), tmp_path / "expected.pt")
    script = f"""
import sys, torch
import fxprop
d = torch.load({str(tmp_path / 'inputs.pt')!r})
loaded = fxprop.load({str(tmp_path)!r})
loaded.set_timesteps(torch.tensor({TIMESTEPS.tolist()}))
with torch.no_grad():
    out = torch.stack([loaded(d["latents"][i], t, encoder_hidden_states=d["encoder_hidden_states"])[0]
                       for i, t in enumerate(torch.tensor({TIMESTEPS.tolist()}))])
assert "diffusers" not in sys.modules, "diffusers was imported"
print((out - torch.load({str(tmp_path / 'expected.pt')!r})).abs().max().item())
"""
    env = {**os.environ, "PYTHONPATH": str(Path(fxprop.__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) <= TOLERANCE


def test_bad_exports_and_calls_are_explained(tmp_path):
    unet = _small_unet()
    latents, kwargs = _inputs()
    with pytest.raises(TypeError, match="accelerate it first"):
        fxprop.export(unet, tmp_path, latents[0], TIMESTEPS[0], **kwargs)
    with pytest.raises(ValueError, match="parallel=False"):
        fxprop.export(fxprop.accelerate(unet, parallel=True), tmp_path, latents[0], TIMESTEPS[0],
                      **kwargs)
    with pytest.raises(ValueError, match="no fxprop export"):
        fxprop.load(tmp_path)
    fxprop.export(fxprop.accelerate(unet, key_steps=2), tmp_path, latents[0], TIMESTEPS[0],
                  **kwargs)
    loaded = fxprop.load(tmp_path)
    loaded.set_timesteps(TIMESTEPS)
    assert loaded.meta["dtypes"][1] == "int64"  # a Python float timestep is converted
    assert loaded(latents[0], 999.0, encoder_hidden_states=kwargs["encoder_hidden_states"])[0].shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"sample is \[1, 4, 8, 8\].*\[2, 4, 8, 8\]"):
        loaded(latents[0][:1], TIMESTEPS[0], encoder_hidden_states=kwargs["encoder_hidden_states"][:1])
    with pytest.raises(TypeError, match="takes the tensors"):
        loaded(latents[0], TIMESTEPS[0])
    with pytest.raises(ValueError, match="no AOTInductor packages"):
        fxprop.load(tmp_path, aoti=True)


def test_aotinductor_packages_reproduce_eager_fxprop(tmp_path):
    """AOTInductor compiles both parts to a shared library (about a minute here)."""
    acc = fxprop.accelerate(_small_unet(), key_steps=[0, 2, 3])
    latents, kwargs = _inputs()
    fxprop.export(acc, tmp_path, latents[0], TIMESTEPS[0], aoti=True, **kwargs)
    loaded = fxprop.load(tmp_path)
    assert type(loaded.full_part).__name__ == "AOTICompiledModel"
    assert (_loop(loaded, latents, kwargs) - _loop(acc, latents, kwargs)).abs().max() <= TOLERANCE
