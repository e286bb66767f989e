"""A small UNet in the layout of lucidrains' ``denoising_diffusion_pytorch.Unet`` (v2), for tests.

Written after the structure of that package's ``Unet`` (its pip package pulls torchvision,
accelerate and pytorch-fid, too much for a test dependency): ``init_conv``, ``time_mlp``,
``downs``/``ups`` as lists of ``[ResnetBlock, ResnetBlock, attention, down/upsample]``, a mid
block of resnet/attention/resnet, and ``final_res_block``/``final_conv``. What matters for
fxprop is its wiring, kept as in the original: two skips per level (after the first resnet and
after resnet + attention), attention residuals in the UNet's own forward, a space-to-depth
downsampling (pixel unshuffle, as the original's einops rearrange, then a 1x1 conv), the last
level without down/upsampling, and a last skip ``r = init_conv(x).clone()`` concatenated
before ``final_res_block``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale, self.g = dim ** 0.5, nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.g * self.scale


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int, theta: int = 10000) -> None:
        super().__init__()
        self.dim, self.theta = dim, theta

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        step = -math.log(self.theta) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=t.device) * step)
        angles = t[:, None].float() * freqs[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim_out, 3, padding=1)
        self.norm, self.act = RMSNorm(dim_out), nn.SiLU()

    def forward(self, x, scale_shift=None):
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_emb_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2))
        self.block1, self.block2 = Block(dim, dim_out), Block(dim_out, dim_out)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, time_emb):
        scale_shift = self.mlp(time_emb)[:, :, None, None].chunk(2, dim=1)
        return self.block2(self.block1(x, scale_shift)) + self.res_conv(x)


class Attention(nn.Module):
    """Softmax attention over the pixels with learned memory key/values (``mem_kv``)."""

    def __init__(self, dim: int, heads: int = 2, dim_head: int = 8, num_mem_kv: int = 2) -> None:
        super().__init__()
        self.heads, hidden = heads, heads * dim_head
        self.norm = RMSNorm(dim)
        self.mem_kv = nn.Parameter(torch.randn(2, heads, num_mem_kv, dim_head))
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = (t.reshape(b, self.heads, -1, h * w).transpose(-1, -2)
                   for t in self.to_qkv(self.norm(x)).chunk(3, dim=1))
        mk, mv = (m.expand(b, -1, -1, -1) for m in self.mem_kv)
        out = F.scaled_dot_product_attention(q, torch.cat((mk, k), -2), torch.cat((mv, v), -2))
        return self.to_out(out.transpose(-1, -2).reshape(b, -1, h, w))


def downsample(dim: int, dim_out: int) -> nn.Module:
    """einops' ``b c (h p1) (w p2) -> b (c p1 p2) h w`` (space to depth), then a 1x1 conv."""
    return nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(dim * 4, dim_out, 1))


def upsample(dim: int, dim_out: int) -> nn.Module:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                         nn.Conv2d(dim, dim_out, 3, padding=1))


class Unet(nn.Module):
    def __init__(self, dim: int = 8, dim_mults=(1, 2), channels: int = 3) -> None:
        super().__init__()
        self.init_conv = nn.Conv2d(channels, dim, 7, padding=3)
        dims = [dim, *(dim * m for m in dim_mults)]
        in_out, time_dim = list(zip(dims[:-1], dims[1:])), dim * 4
        self.time_mlp = nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, time_dim), nn.GELU(),
                                      nn.Linear(time_dim, time_dim))
        self.downs, self.ups = nn.ModuleList(), nn.ModuleList()
        for i, (d_in, d_out) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.downs.append(nn.ModuleList([
                ResnetBlock(d_in, d_in, time_dim), ResnetBlock(d_in, d_in, time_dim),
                Attention(d_in),
                downsample(d_in, d_out) if not last else nn.Conv2d(d_in, d_out, 3, padding=1)]))
        self.mid_block1 = ResnetBlock(dims[-1], dims[-1], time_dim)
        self.mid_attn = Attention(dims[-1])
        self.mid_block2 = ResnetBlock(dims[-1], dims[-1], time_dim)
        for i, (d_in, d_out) in enumerate(reversed(in_out)):
            last = i == len(in_out) - 1
            self.ups.append(nn.ModuleList([
                ResnetBlock(d_out + d_in, d_out, time_dim),
                ResnetBlock(d_out + d_in, d_out, time_dim),
                Attention(d_out),
                upsample(d_out, d_in) if not last else nn.Conv2d(d_out, d_in, 3, padding=1)]))
        self.final_res_block = ResnetBlock(dim * 2, dim, time_dim)
        self.final_conv = nn.Conv2d(dim, channels, 1)

    def forward(self, x, time):
        # the original takes one time per sample; a scalar is broadcast to the batch here
        time = torch.as_tensor(time, device=x.device).reshape(-1).expand(x.shape[0])
        x = self.init_conv(x)
        r = x.clone()
        t = self.time_mlp(time)
        h = []
        for block1, block2, attn, down in self.downs:
            x = block1(x, t)
            h.append(x)
            x = block2(x, t)
            x = attn(x) + x
            h.append(x)
            x = down(x)
        x = self.mid_block1(x, t)
        x = self.mid_attn(x) + x
        x = self.mid_block2(x, t)
        for block1, block2, attn, up in self.ups:
            x = block1(torch.cat((x, h.pop()), dim=1), t)
            x = block2(torch.cat((x, h.pop()), dim=1), t)
            x = attn(x) + x
            x = up(x)
        return self.final_conv(self.final_res_block(torch.cat((x, r), dim=1), t))


def lucid_unet(seed: int = 0) -> Unet:
    torch.manual_seed(seed)
    return Unet().eval()


#: The regions of :class:`Unet` for ``fxprop.accelerate(..., regions=...)``.
LUCID_REGIONS = {"encoder": ["init_conv", "downs"],
                 "mid": ["mid_block1", "mid_attn", "mid_block2"],
                 "decoder": ["ups", "final_res_block"], "output": ["final_conv"]}
