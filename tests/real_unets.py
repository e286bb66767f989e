"""The real third-party UNets that pip installs, built small with random weights.

- ``ldm_unet`` / ``ldm_sd2_unet``: the original LDM ``UNetModel`` (CompVis / Stability code, as
  A1111 and Forge run it), from pip's ``stable-diffusion-sdkit`` (``ldm.modules
  .diffusionmodules.openaimodel``), in SD 1.x's and SD 2.x's configurations.
- ``lucid_unet``: lucidrains' ``denoising_diffusion_pytorch.Unet``.

Both packages are installed with ``--no-deps`` (README's test command): their training stacks
are not needed. ``denoising_diffusion_pytorch`` imports ``torchvision`` (transforms, image
utils) for its trainer, whose wheel would replace the CPU torch: empty stand-ins are in
``sys.modules`` while it imports, only if torchvision is not installed. LDM zero-initialises
its output layers (``zero_module``), which makes an untrained UNet output zero whatever fxprop
does: those layers get random weights here (:func:`zero_init_layers` names them, a test
checks them).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from typing import Iterator

import torch
from torch import nn

#: Text conditioning width of the tiny LDM UNets (tests' ``TEXT_DIM``).
CONTEXT_DIM = 32


def ldm_unet(seed: int = 0, **overrides) -> nn.Module:
    """An SD-1.x-shaped LDM ``UNetModel``: two levels of 32 and 64 channels (LDM's group norm
    takes 32 groups), two res blocks per level, attention at the first level, a mid block of
    res/attention/res."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    torch.manual_seed(seed)
    config = dict(image_size=16, in_channels=4, out_channels=4, model_channels=32,
                  num_res_blocks=2, attention_resolutions=[1], channel_mult=[1, 2],
                  num_heads=2, use_spatial_transformer=True, transformer_depth=1,
                  context_dim=CONTEXT_DIM, legacy=False)
    unet = UNetModel(**{**config, **overrides}).eval()
    randomise(zero_init_layers(unet))
    return unet


def ldm_sd2_unet(seed: int = 0) -> nn.Module:
    """SD 2.x's LDM configuration: linear projections in and out of the transformers."""
    return ldm_unet(seed, use_linear_in_transformer=True, num_head_channels=16, num_heads=-1)


def zero_init_layers(unet: nn.Module) -> list[nn.Module]:
    """The layers LDM zero-initialises: ``out``'s conv, each ResBlock's last conv and each
    transformer's ``proj_out`` (recognised by those attribute names)."""
    layers = [unet.out[-1]]
    for module in unet.modules():
        if hasattr(module, "out_layers"):
            layers.append(module.out_layers[-1])
        elif hasattr(module, "transformer_blocks") and hasattr(module, "proj_out"):
            layers.append(module.proj_out)
    return layers


def randomise(layers: list[nn.Module], std: float = 0.05) -> None:
    with torch.no_grad():
        for layer in layers:
            nn.init.normal_(layer.weight, std=std)
            if layer.bias is not None:
                nn.init.normal_(layer.bias, std=std)


def lucid_unet(seed: int = 0) -> nn.Module:
    """``denoising_diffusion_pytorch.Unet`` with two levels of 8 and 16 channels."""
    with _stand_ins("torchvision", "torchvision.transforms", "torchvision.utils"):
        from denoising_diffusion_pytorch import Unet
    torch.manual_seed(seed)
    return Unet(dim=8, dim_mults=(1, 2), channels=3).eval()


#: The regions of lucidrains' ``Unet`` for ``fxprop.accelerate(..., regions=...)``.
LUCID_REGIONS = {"encoder": ["init_conv", "downs"],
                 "mid": ["mid_block1", "mid_attn", "mid_block2"],
                 "decoder": ["ups", "final_res_block"], "output": ["final_conv"]}


@contextlib.contextmanager
def _stand_ins(*names: str) -> Iterator[None]:
    """Empty modules for ``names`` while the block imports, unless the real package is
    installed; taken out of ``sys.modules`` after it (diffusers would take them for the real
    torchvision)."""
    if importlib.util.find_spec(names[0]) is not None:
        yield
        return
    added = [name for name in names if name not in sys.modules]
    for name in added:
        sys.modules[name] = types.ModuleType(name)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)
