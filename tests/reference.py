"""An eager reference of encoder propagation, written from diffusers' modules (tests only).

``encode`` runs conv_in, the down blocks and the mid block; ``decode`` runs the up blocks and
the output layers on given skip features, with the time embedding of a given timestep. A
non-key step of encoder propagation must equal ``decode(encode(x_key, t_key), t_now)``.
"""

from __future__ import annotations

import torch


def time_embedding(unet, sample, timestep):
    t = torch.as_tensor(timestep).reshape(-1).expand(sample.shape[0])
    return unet.time_embedding(unet.time_proj(t).to(sample.dtype))


def encode(unet, sample, timestep, context):
    emb = time_embedding(unet, sample, timestep)
    h = unet.conv_in(sample)
    skips = (h,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(h, emb, encoder_hidden_states=context)
        else:
            h, res = block(h, emb)
        skips += res
    h = unet.mid_block(h, emb, encoder_hidden_states=context)
    return skips, h


def decode(unet, skips, h, timestep, context):
    emb = time_embedding(unet, h, timestep)
    for i, block in enumerate(unet.up_blocks):
        res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
        size = skips[-1].shape[2:] if i < len(unet.up_blocks) - 1 else None
        if getattr(block, "has_cross_attention", False):
            h = block(h, res, emb, encoder_hidden_states=context, upsample_size=size)
        else:
            h = block(h, res, emb, upsample_size=size)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
