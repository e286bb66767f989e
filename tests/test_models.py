"""Any UNet: LDM layout, video, IF, SD-2, UNet2DModel variants, LoRA and user-written UNets.

The original LDM ``UNetModel`` and lucidrains' ``Unet`` are the real classes that pip installs
(``tests/real_unets.py``); only the SDXL-shaped LDM UNet, which pip's LDM code lacks, is a copy
written here (``tests/ldm_unet.py``).

``MODELS`` is the list of tiny model builders that ``tools/support_table.py`` also runs. For each
model the split composes to the whole UNet and a generation with every step a key step equals
plain sampling; sparse plans never read the current latent at non-key steps.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from diffusers import (MotionAdapter, UNet2DModel, UNet3DConditionModel, UNetMotionModel,
                       UNetSpatioTemporalConditionModel)
from torch import nn

import fxprop
import fxprop.graph.capture
from conftest import (TEXT_DIM, assert_differs, fast_params, make_scheduler, sample_of, sd_unet,
                      text_embeds, tiny_vae)
from fxprop.graph.capture import Captured, flatten_call
from fxprop.graph.cuts import encoder_cut, find_bottleneck
from fxprop.graph.regions import module_path, resolve_layout
from fxprop.graph.split import check_split
from fxprop.graph.nodes import placeholders
from ldm_unet import SDXL_ADM_CHANNELS, ldm_sdxl_unet
from real_unets import LUCID_REGIONS, ldm_sd2_unet, ldm_unet, lucid_unet

TIMESTEPS = torch.tensor([900, 600, 300, 100])
#: The real LDM UNetModel (pip's stable-diffusion-sdkit) and lucidrains' Unet, by their rows.
LDM_SD1 = "LDM UNetModel, SD 1.x (stable-diffusion-sdkit: input_blocks/output_blocks)"
LUCID = "lucidrains Unet (denoising-diffusion-pytorch)"


@dataclass
class Model:
    """A tiny UNet and one call of it: ``unet(x, t, *args, **kwargs)``."""

    build: Callable[[], nn.Module]
    latent: tuple                       # shape of the first forward argument
    args: Callable[[], tuple] = tuple   # the arguments after the timestep
    kwargs: Callable[[], dict] = dict
    regions: dict | None = None         # fxprop.accelerate(..., regions=...)
    out_channels: int = 0               # channels of the output the latent is moved by (0: all)
    channel_dim: int = 1
    time_per_sample: bool = False       # forward takes one timestep per sample, not a scalar

    def call(self, seed: int = 0) -> tuple[torch.Tensor, tuple, dict]:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.latent, generator=g), self.args(), self.kwargs()

    def advance(self, x: torch.Tensor, out: Any) -> torch.Tensor:
        """One toy sampler step: move the latent's first channels against the output."""
        eps = sample_of(out)
        n = self.out_channels or x.shape[self.channel_dim]
        head, tail = x.split([n, x.shape[self.channel_dim] - n], self.channel_dim)
        return torch.cat([head - 0.2 * eps.narrow(self.channel_dim, 0, n), tail],
                         self.channel_dim)


def _randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _text(batch: int = 2, tokens: int = 5, dim: int = TEXT_DIM) -> Callable[[], tuple]:
    return lambda: (_randn(batch, tokens, dim),)


# -- builders ----------------------------------------------------------------------------------

def sd2_unet():
    return sd_unet(use_linear_projection=True, attention_head_dim=(2, 4))


def if_unet():
    """DeepFloyd-IF-II-like: text projection, text addition embedding, noise-level classes."""
    return sd_unet(in_channels=3, out_channels=6, encoder_hid_dim=24, addition_embed_type="text",
                   class_embed_type="timestep", mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                   down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                   up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                   resnet_time_scale_shift="scale_shift", act_fn="gelu",
                   addition_embed_type_num_heads=2)


def unet2d(down, up, seed=0, channels=(16, 32), **extra):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=channels, norm_num_groups=8, attention_head_dim=8,
                       down_block_types=down, up_block_types=up, **extra).eval()


def lora_unet(fused: bool = False):
    from peft import LoraConfig
    unet = sd_unet(seed=4)
    torch.manual_seed(5)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if fused:
        unet.fuse_lora()
    return unet.eval()


def unet3d():
    torch.manual_seed(0)
    return UNet3DConditionModel(sample_size=8, layers_per_block=1, block_out_channels=(16, 32),
                                norm_num_groups=8, attention_head_dim=4,
                                cross_attention_dim=TEXT_DIM,
                                down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D")).eval()


def svd_unet():
    torch.manual_seed(0)
    return UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 32), num_attention_heads=(2, 2), cross_attention_dim=TEXT_DIM,
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=12, num_frames=2,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal")).eval()


def motion_unet():
    torch.manual_seed(0)
    adapter = MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1,
                            motion_num_attention_heads=2, motion_norm_num_groups=8,
                            motion_max_seq_length=8)
    return UNetMotionModel.from_unet2d(sd_unet(seed=6), adapter).eval()


class HandUNet(nn.Module):
    """A user-written UNet: names no layout knows, skips kept in local variables."""

    def __init__(self, c: int = 8, emb: int = 16) -> None:
        super().__init__()
        self.time = nn.Sequential(nn.Linear(emb, emb), nn.SiLU())
        self.enc1 = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.GroupNorm(4, c), nn.SiLU())
        self.enc2 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.SiLU())
        self.bottleneck = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(2 * c, 2 * c, 3, padding=1),
                                        nn.SiLU())
        self.dec2 = Up(2 * c, 2 * c, c, emb)
        self.dec1 = Up(c, c, c, emb)
        self.head = nn.Conv2d(c, 3, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        half = torch.arange(8, dtype=torch.float32) / 8
        angles = torch.as_tensor(t).reshape(-1, 1).float() * torch.exp(-math.log(1e4) * half)
        emb = self.time(torch.cat([angles.sin(), angles.cos()], -1))
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        h = self.bottleneck(e2 + emb[:, : e2.shape[1], None, None])
        return self.head(self.dec1(self.dec2(h, e2, emb), e1, emb))


class Up(nn.Module):
    def __init__(self, c_in: int, c_skip: int, c_out: int, emb: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_in, 2, stride=2)
        self.conv = nn.Conv2d(c_in + c_skip, c_out, 3, padding=1)
        self.emb = nn.Linear(emb, c_out)

    def forward(self, x, skip, emb):
        h = self.conv(torch.cat([self.up(x), skip], 1)) + self.emb(emb)[..., None, None]
        return F.silu(h)


def hand_unet():
    torch.manual_seed(0)
    return HandUNet().eval()


HAND_REGIONS = {"encoder": ["enc1", "enc2"], "mid": ["bottleneck"], "decoder": ["dec2", "dec1"],
                "output": ["head"]}

MODELS: dict[str, Model] = {
    "SD-1.5 (UNet2DConditionModel)": Model(sd_unet, (2, 4, 8, 8), _text()),
    "SD-2.x (linear projection, head dims per block)": Model(sd2_unet, (2, 4, 8, 8), _text()),
    "DeepFloyd-IF (text embeds, SimpleCrossAttn)": Model(
        if_unet, (2, 3, 8, 8), _text(dim=24), lambda: {"class_labels": torch.tensor([20, 20])},
        out_channels=3),
    "LoRA (peft, unfused)": Model(lora_unet, (2, 4, 8, 8), _text()),
    "LoRA (peft, fused)": Model(lambda: lora_unet(fused=True), (2, 4, 8, 8), _text()),
    "UNet2DModel (DDPM, AttnDownBlock2D)": Model(
        lambda: unet2d(("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D")),
        (2, 3, 8, 8)),
    "UNet2DModel (ResnetDownsample/ResnetUpsample)": Model(
        lambda: unet2d(("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
                       ("AttnUpBlock2D", "ResnetUpsampleBlock2D"),
                       resnet_time_scale_shift="scale_shift"), (2, 3, 8, 8)),
    "UNet2DModel (score-SDE skip blocks, Fourier time)": Model(
        lambda: unet2d(("SkipDownBlock2D", "AttnSkipDownBlock2D"),
                       ("AttnSkipUpBlock2D", "SkipUpBlock2D"), channels=(32, 32),
                       time_embedding_type="fourier"),  # skip blocks norm with 32 groups
        (2, 3, 8, 8)),
    LDM_SD1: Model(ldm_unet, (2, 4, 16, 16), _text(), time_per_sample=True),
    "LDM UNetModel, SD 2.x (stable-diffusion-sdkit, linear projections)": Model(
        ldm_sd2_unet, (2, 4, 16, 16), _text(), time_per_sample=True),
    "LDM UNetModel, SDXL-shaped (copy written here: 3 levels, depth per level, label "
    "embedding)": Model(ldm_sdxl_unet, (2, 4, 16, 16), _text(),
                        lambda: {"y": _randn(2, SDXL_ADM_CHANNELS)}),
    LUCID + ", structural": Model(lucid_unet, (2, 3, 16, 16), time_per_sample=True),
    LUCID + ", regions=": Model(lucid_unet, (2, 3, 16, 16), regions=LUCID_REGIONS,
                                time_per_sample=True),
    "UNet3DConditionModel (text-to-video)": Model(unet3d, (1, 4, 2, 8, 8), _text(1)),
    "UNetSpatioTemporalConditionModel (SVD)": Model(
        svd_unet, (1, 2, 8, 8, 8), _text(1, 1), lambda: {"added_time_ids": _randn(1, 3)},
        out_channels=4, channel_dim=2),
    # AnimateDiff's pipeline repeats the text embeddings per frame before calling the UNet
    "UNetMotionModel (AnimateDiff)": Model(motion_unet, (1, 4, 2, 8, 8), _text(2)),
    "user-written, structural fallback": Model(hand_unet, (2, 3, 16, 16)),
    "user-written, regions=": Model(hand_unet, (2, 3, 16, 16), regions=HAND_REGIONS),
}


# -- helpers shared with tools/support_table.py ------------------------------------------------

def accelerate(unet: nn.Module, regions: dict | None = None, **options: Any):
    """``fxprop.accelerate(unet, regions=..., ...)`` (``regions`` only when given)."""
    return fxprop.accelerate(unet, **options, **({"regions": regions} if regions else {}))


@torch.no_grad()
def generate(model: Model, unet: nn.Module, timesteps: torch.Tensor = TIMESTEPS,
             feed: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> list:
    """The outputs of a toy sampling loop; ``feed(step, x)`` is what the UNet is given."""
    x, args, kwargs = model.call()
    if isinstance(unet, fxprop.AcceleratedUNet):
        unet.set_timesteps(timesteps)
    outs = []
    for i, t in enumerate(timesteps):
        t = t.expand(x.shape[0]) if model.time_per_sample else t
        out = sample_of(unet(feed(i, x) if feed else x, t, *args, **kwargs))
        outs.append(out)
        x = model.advance(x, out)
    return outs


def max_diff(a: list, b: list) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


class Check(NamedTuple):
    split_error: float
    generation_error: float
    captured: Captured


@torch.no_grad()
def check_model(model: Model, unet: nn.Module, timesteps: torch.Tensor = TIMESTEPS,
                **options: Any) -> Check:
    """Split and every-step-key generation errors of ``model``; raises past 1e-5."""
    acc = accelerate(unet, model.regions, key_steps=1, **options)
    x, args, kwargs = model.call()
    call = flatten_call(unet.forward, (x, timesteps[0], *args), kwargs)
    captured, parts = acc.parts_for(call)
    if options.get("reuse", "encoder") == "encoder":
        assert 0 not in parts.step_inputs, "the every-step part reads the latent"
    split_error = check_split(parts, captured, call.tensors)
    generation_error = max_diff(generate(model, acc, timesteps), generate(model, unet, timesteps))
    assert generation_error <= 1e-5, f"every-step-key generation differs by {generation_error}"
    return Check(split_error, generation_error, captured)


@torch.no_grad()
def parts_of(acc, model: Model, unet: nn.Module) -> tuple:
    """Captured graph and parts of ``model``'s call, from the UNet's capture cache: without
    grad, as the generations run (the grad mode is part of a capture's state, so a call with
    grad would capture the UNet again)."""
    x, args, kwargs = model.call()
    return acc.parts_for(flatten_call(unet.forward, (x, TIMESTEPS[0], *args), kwargs))


def sparse_generation(model: Model, unet: nn.Module, keys: list[int],
                      timesteps: torch.Tensor = TIMESTEPS, **options: Any) -> list:
    """A generation with key steps ``keys`` that must not fall back to the whole UNet."""
    acc = accelerate(unet, model.regions, key_steps=keys, **options)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fxprop:")
        return generate(model, acc, timesteps)


# -- tests -------------------------------------------------------------------------------------

_UNETS: dict = {}


def unet_of(model: Model) -> nn.Module:
    """One UNet per builder, so that models sharing one also share its captures."""
    if model.build not in _UNETS:
        _UNETS[model.build] = model.build()
    return _UNETS[model.build]


@pytest.mark.parametrize("name", fast_params(MODELS, (  # inner loop: one of each layout family
    "SD-1.5 (UNet2DConditionModel)", LDM_SD1,
    "UNet2DModel (DDPM, AttnDownBlock2D)", "user-written, structural fallback",
    "user-written, regions=")))
def test_split_composes_and_every_step_key_equals_plain(name):
    model = MODELS[name]
    assert check_model(model, unet_of(model)).split_error <= 1e-5


@pytest.mark.parametrize("name", [LDM_SD1,
                                  "user-written, structural fallback",
                                  pytest.param("UNetSpatioTemporalConditionModel (SVD)",
                                               marks=pytest.mark.slow)])
def test_non_key_steps_never_read_the_latent(name):
    model, keys = MODELS[name], [0, 2]
    unet = unet_of(model)
    acc = accelerate(unet, model.regions, key_steps=keys)
    sparse = sparse_generation(model, unet, keys)
    captured, parts = parts_of(acc, model, unet)
    step_inputs = [n.name for n in placeholders(parts.step.graph)]
    assert placeholders(captured.graph)[0].name not in step_inputs and 0 not in parts.step_inputs
    garbage = generate(model, acc, feed=lambda i, x: x if i in keys else torch.full_like(x, 7.0))
    assert max_diff(sparse, garbage) == 0.0
    assert max_diff(sparse, generate(model, unet)) > 1e-4  # features really were reused


def test_ldm_is_found_by_name_and_caches_the_encoder():
    unet = unet_of(MODELS[LDM_SD1])
    assert resolve_layout(unet).name == "ldm"
    _, parts = parts_of(accelerate(unet, key_steps=1), MODELS[LDM_SD1], unet)
    paths = {module_path(n).split(".")[0] for n in parts.step.graph.nodes
             if n.op != "placeholder"}
    assert {"output_blocks", "out", "time_embed"} <= paths
    assert not paths & {"input_blocks", "middle_block"}


def test_structural_fallback_finds_the_cut_the_user_would_name():
    unet = unet_of(MODELS["user-written, structural fallback"])
    x, *_ = MODELS["user-written, structural fallback"].call()
    captured = fxprop.graph.capture.capture(unet, flatten_call(unet.forward, (x, TIMESTEPS[0]), {}))
    neck = find_bottleneck(captured)
    assert module_path(neck.first).startswith("bottleneck") and neck.resolution == 16
    assert module_path(neck.upsample) == "dec2.up"
    structural = encoder_cut(captured, resolve_layout(unet))
    named = encoder_cut(captured, resolve_layout(unet, HAND_REGIONS))
    assert structural == named
    assert [module_path(n) for n in named] == ["enc1.2", "enc2.1", "bottleneck.2"]


class Plain(nn.Sequential):
    """Not a UNet: no downsampling, no skips."""

    def forward(self, x, t):
        return super().forward(x)


def test_without_names_or_bottleneck_the_error_says_how_to_fix_it():
    plain = Plain(OrderedDict(a=nn.Conv2d(3, 8, 3, padding=1), b=nn.Conv2d(8, 3, 3, padding=1)))
    acc = accelerate(plain, key_steps=1)
    acc.set_timesteps(TIMESTEPS)
    with pytest.raises(ValueError, match=r"top-level modules \['a', 'b'\].*found no downsampling"
                                         r".*regions=\{'encoder'"):
        acc(torch.randn(1, 3, 8, 8), TIMESTEPS[0])


def test_bad_regions_are_named():
    unet = hand_unet()
    with pytest.raises(ValueError, match=r"\['dec3'\], which HandUNet does not have; its "
                                         r"top-level modules are \['bottleneck', 'dec1'"):
        accelerate(unet, {"decoder": ["dec3"]})
    with pytest.raises(ValueError, match="regions must name the decoder"):
        accelerate(unet, {"encoder": ["enc1"]})
    with pytest.raises(ValueError, match=r"unknown keys \['up'\]"):
        accelerate(unet, {"decoder": ["dec1"], "up": ["dec1"]})
    acc = accelerate(unet, {"encoder": ["dec1"], "decoder": ["dec2"]}, key_steps=1)
    acc.set_timesteps(TIMESTEPS)
    with pytest.raises(ValueError, match=r"of dec1\.\w+ \(encoder in the regions layout\) runs "
                                         "after the decoder"):
        acc(torch.randn(1, 3, 16, 16), TIMESTEPS[0])


# -- a video pipeline end to end ---------------------------------------------------------------

def video_pipeline():
    from diffusers import TextToVideoSDPipeline
    return TextToVideoSDPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None,
                                 unet=unet3d(), scheduler=make_scheduler("ddim"))


def run_video(pipe) -> torch.Tensor:
    return pipe(**text_embeds(1), num_frames=2, height=16, width=16, num_inference_steps=4,
                guidance_scale=5.0, output_type="latent",
                generator=torch.Generator().manual_seed(0)).frames


@pytest.mark.slow  # ~9 s; the video UNets' splits stay
def test_text_to_video_pipeline():
    plain = video_pipeline()
    reference = run_video(plain)
    pipe = type(plain)(**plain.components)
    fxprop.accelerate(pipe, key_steps=1, prior_noise=0)
    torch.testing.assert_close(run_video(pipe), reference, rtol=0, atol=1e-5)
    fxprop.accelerate(pipe, key_steps=[0, 2], prior_noise=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fxprop:")  # no fallback to the whole UNet
        sparse = run_video(pipe)
    assert sparse.shape == reference.shape and torch.isfinite(sparse).all()
    assert_differs(sparse, reference, 1e-4)


#: Models whose call has the same signature and block kinds as another's here: parallel mode
#: batches the same decoder inputs (left out of the parallel test for CI's time; their splits
#: and every-step-a-key-step runs stay).
PARALLEL_SIBLINGS = {"SD-2.x (linear projection, head dims per block)", "LoRA (peft, unfused)",
                     "LoRA (peft, fused)", "UNet2DModel (ResnetDownsample/ResnetUpsample)",
                     "LDM UNetModel, SD 2.x (stable-diffusion-sdkit, linear projections)"}


@pytest.mark.parametrize("name", fast_params([m for m in MODELS if m not in PARALLEL_SIBLINGS], (
    # inner loop: test_parallel.py and these
    "SD-1.5 (UNet2DConditionModel)", LDM_SD1,
    "UNet2DModel (DDPM, AttnDownBlock2D)", "user-written, structural fallback")))
def test_parallel_mode_equals_sequential(name):
    """A segment's decoder passes batched into one call give the sequential predictions."""
    model = MODELS[name]
    sequential = sparse_generation(model, unet_of(model), [0])
    parallel = sparse_generation(model, unet_of(model), [0], parallel=True)
    torch.testing.assert_close(parallel, sequential, rtol=0, atol=1e-5)
