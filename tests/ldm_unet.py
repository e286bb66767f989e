"""A copy, written here, of the original LDM ``UNetModel`` in SDXL's shape, which pip's LDM lacks.

The real SD 1.x / 2.x ``UNetModel`` is tested from pip's ``stable-diffusion-sdkit``
(``tests/real_unets.py``); its code predates SDXL (no ``adm_in_channels``, one transformer depth
for all levels). This copy follows the structure of Stability's ``openaimodel.py``:
``time_embed``, ``label_emb``, ``input_blocks``, ``middle_block``, ``output_blocks`` and ``out``;
the encoder pushes every input block's output onto a list ``hs`` and the decoder pops them.
``ldm_sdxl_unet()`` has three levels, no attention at the first, transformer depth per level and
a label embedding of the pooled text and size conditioning ``y``. No layer is zero-initialised:
random weights must matter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000):
    """Sinusoidal embedding of a 1-D tensor of timesteps (cos first, as in LDM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None].to(timesteps.device)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(4, channels)


class TimestepBlock(nn.Module):
    """A block whose forward also takes the time embedding."""


class SpatialTransformer(nn.Module):
    """Norm, 1x1 projection in, transformer blocks over the pixels, projection out, residual."""

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int = 1,
                 use_linear: bool = False) -> None:
        super().__init__()
        self.norm, self.use_linear = norm(channels), use_linear
        project = nn.Linear if use_linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = project(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = project(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.use_linear:  # SD 1: 1x1 convs around the pixels-as-tokens reshape
            y = self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)  # b, hw, c
        y = self.proj_in(y) if self.use_linear else y
        for block in self.transformer_blocks:
            y = block(y, context)
        y = self.proj_out(y) if self.use_linear else y
        y = y.transpose(1, 2).reshape(b, c, h, w)
        return x + (y if self.use_linear else self.proj_out(y))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention on the context, GEGLU feed-forward; pre-norm."""

    def __init__(self, dim: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, heads)
        self.attn2 = CrossAttention(dim, heads, context_dim)
        self.ff_in, self.ff_out = nn.Linear(dim, 8 * dim), nn.Linear(4 * dim, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        hidden, gate = self.ff_in(self.norm3(x)).chunk(2, dim=-1)
        return x + self.ff_out(hidden * F.gelu(gate))


class ResBlock(TimestepBlock):
    """GroupNorm-SiLU-conv, plus the projected time embedding, GroupNorm-SiLU-conv, skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(norm(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(norm(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequence that hands the time embedding and the context to the layers that take them."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """The LDM UNet: ``forward(x, timesteps, context) -> eps``."""

    def __init__(self, in_channels=4, model_channels=16, out_channels=4, num_res_blocks=2,
                 attention_resolutions=(1,), channel_mult=(1, 2), num_heads=2,
                 context_dim=32, transformer_depth=1, use_linear_in_transformer=False,
                 adm_in_channels=None) -> None:
        super().__init__()
        self.model_channels = model_channels
        emb = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(),
                                        nn.Linear(emb, emb))
        if adm_in_channels:  # SDXL: pooled text and size conditioning, added to the time
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(adm_in_channels, emb), nn.SiLU(), nn.Linear(emb, emb)))
        depths = ((transformer_depth,) * len(channel_mult) if isinstance(transformer_depth, int)
                  else tuple(transformer_depth))

        def attention(ch: int, level: int) -> list[nn.Module]:
            if ds not in attention_resolutions or not depths[level]:
                return []
            return [SpatialTransformer(ch, num_heads, context_dim, depths[level],
                                       use_linear_in_transformer)]

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb, mult * model_channels)]
                ch = mult * model_channels
                layers += attention(ch, level)
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb), SpatialTransformer(ch, num_heads, context_dim, depths[-1],
                                                  use_linear_in_transformer), ResBlock(ch, emb))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb, mult * model_channels)]
                ch = mult * model_channels
                layers += attention(ch, level)
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        # LDM takes a 1-D tensor of timesteps; a scalar is broadcast to the batch here.
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if y is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb, context)
        return self.out(h)


def ldm_unet(seed: int = 0, **overrides) -> UNetModel:
    """An SD-1.5-shaped LDM UNet with 16 base channels and random weights."""
    torch.manual_seed(seed)
    return UNetModel(**overrides).eval()


#: Channels of SDXL's ``y`` in :func:`ldm_sdxl_unet` (pooled text + size embeddings in SDXL).
SDXL_ADM_CHANNELS = 24


def ldm_sdxl_unet(seed: int = 0) -> UNetModel:
    """SDXL's LDM config in small: 3 levels, attention from the second, depths (0, 1, 2)."""
    return ldm_unet(seed, channel_mult=(1, 2, 4), attention_resolutions=(2, 4),
                    transformer_depth=(0, 1, 2), use_linear_in_transformer=True,
                    adm_in_channels=SDXL_ADM_CHANNELS)
