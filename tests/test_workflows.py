"""What diffusers users do to a pipeline after accelerating it: every change reaches the next
generation, which equals the plain pipeline in the same state.

The oracle is a plain pipeline built from the same components (``type(pipe)(**components)``):
it runs the very same UNet object, so it is in the same state by construction (LoRA, adapters,
processors, FreeU, hooks). Every step is a key step and prior noise is off, where fxprop equals
plain exactly; a stale captured graph would differ. Each change is also checked to matter.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import ModelMixin, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

import fxprop
from conftest import TEXT_DIM, assert_differs, decoder_attn_unet, sd_pipeline, text_embeds

STEPS = 4
CALL = dict(guidance_scale=5.0, height=16, width=16, num_inference_steps=STEPS,
            output_type="latent")


def run(pipe, seed: int = 0, **extra) -> torch.Tensor:
    kwargs = {**text_embeds(1), **CALL, **extra}
    return pipe(**kwargs, generator=torch.Generator().manual_seed(seed)).images


def accelerated_and_plain(pipe=None, **options):
    """``pipe`` accelerated (every step a key step, no prior noise) and a plain pipeline of
    the same components."""
    pipe = pipe or sd_pipeline(unet=decoder_attn_unet())
    plain = type(pipe)(**pipe.components)
    fxprop.accelerate(pipe, **{"key_steps": 1, "prior_noise": 0, **options})
    return pipe, plain


class Same:
    """Checks that an accelerated pipeline equals its plain twin after each change, and that
    each change changed the output."""

    def __init__(self, pipe, plain, **extra) -> None:
        self.pipe, self.plain, self.extra, self.last = pipe, plain, extra, None

    def check(self, what: str, changed: bool = True) -> torch.Tensor:
        reference = run(self.plain, **self.extra)
        torch.testing.assert_close(run(self.pipe, **self.extra), reference, rtol=0, atol=1e-5,
                                   msg=lambda m: f"after {what}: {m}")
        if changed and self.last is not None:
            assert_differs(reference, self.last, 1e-4, f"outputs before and after {what}")
        self.last = reference
        return reference


# -- LoRA, IP-Adapter, processors, FreeU: the UNet stays a diffusers model ---------------------

@pytest.mark.slow  # ~20 s: five LoRA states, a capture each
def test_lora_methods_of_the_pipeline_reach_the_next_generation(lora_dir):
    pipe, plain = accelerated_and_plain()
    assert isinstance(pipe.unet, ModelMixin) and pipe.unet is plain.unet
    same = Same(pipe, plain)
    base = same.check("accelerate")
    pipe.load_lora_weights(lora_dir, adapter_name="a")
    same.check("load_lora_weights")
    pipe.set_adapters(["a"], [0.5])
    same.check("set_adapters")
    pipe.disable_lora()
    same.check("disable_lora")
    pipe.enable_lora()
    same.check("enable_lora")
    pipe.fuse_lora()
    same.check("fuse_lora", changed=False)  # fused equals unfused at scale 1 (up to rounding)
    pipe.unfuse_lora()
    same.check("unfuse_lora", changed=False)
    pipe.unload_lora_weights()
    torch.testing.assert_close(same.check("unload_lora_weights"), base, rtol=0, atol=1e-4)


def ip_adapter_state(unet, clip_dim: int = 16, seed: int = 0) -> dict:
    """An IP-Adapter state dict in the layout ``load_ip_adapter`` reads (random weights)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    image_proj = {"proj.weight": rand(4 * TEXT_DIM, clip_dim), "proj.bias": rand(4 * TEXT_DIM),
                  "norm.weight": torch.ones(TEXT_DIM), "norm.bias": torch.zeros(TEXT_DIM)}
    layers = {}
    for i, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
            layers[f"{i}.to_k_ip.weight"] = rand(hidden, TEXT_DIM)
            layers[f"{i}.to_v_ip.weight"] = rand(hidden, TEXT_DIM)
    return {"image_proj": image_proj, "ip_adapter": layers}


def test_ip_adapter_scale_reaches_the_next_generation():
    pipe = sd_pipeline(unet=decoder_attn_unet())
    pipe.load_ip_adapter(ip_adapter_state(pipe.unet), subfolder=None, weight_name=None,
                         image_encoder_folder=None)
    pipe, plain = accelerated_and_plain(pipe)
    embeds = [torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(4))]
    same = Same(pipe, plain, ip_adapter_image_embeds=embeds)
    same.check("load_ip_adapter")
    for scale in (0.2, 0.0):
        pipe.set_ip_adapter_scale(scale)
        same.check(f"set_ip_adapter_scale({scale})")
    captures = fxprop.runtime_of(pipe).captures
    pipe.set_ip_adapter_scale(0.2)
    same.check("set_ip_adapter_scale(0.2) again")
    assert fxprop.runtime_of(pipe).captures == captures  # a state seen before: no new capture


class Doubled:
    """A custom attention processor: the default one, output doubled."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        from diffusers.models.attention_processor import AttnProcessor
        return 2 * AttnProcessor()(attn, hidden_states, *args, **kwargs)


@pytest.mark.slow  # ~24 s on 2 cores: two pipelines, six UNet states (a capture each)
def test_processors_slicing_and_freeu_reach_every_pipeline_of_the_unet():
    """txt2img and img2img share one UNet: a change made through either reaches both."""
    pipe, plain = accelerated_and_plain()
    img2img, plain_img2img = accelerated_and_plain(
        StableDiffusionImg2ImgPipeline(**{**pipe.components}))
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    txt, img = Same(pipe, plain), Same(img2img, plain_img2img, image=image, strength=0.8)
    for what, change in [("set_attn_processor", lambda: pipe.unet.set_attn_processor(Doubled())),
                         ("enable_attention_slicing", lambda: img2img.enable_attention_slicing(1)),
                         ("enable_freeu", lambda: pipe.enable_freeu(1.2, 0.8, 1.3, 1.1)),
                         ("disable_freeu", lambda: img2img.disable_freeu()),
                         ("fuse_qkv_projections", lambda: pipe.fuse_qkv_projections())]:
        change()
        txt.check(what, changed=what != "fuse_qkv_projections")
        img.check(what, changed=what not in ("fuse_qkv_projections", "enable_attention_slicing"))


def test_parameters_edited_in_place_need_no_new_capture():
    pipe, plain = accelerated_and_plain()
    same = Same(pipe, plain)
    same.check("accelerate")
    captures = fxprop.runtime_of(pipe).captures
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(1.5)
    same.check("an in-place edit of conv_out")
    assert fxprop.runtime_of(pipe).captures == captures  # the graph reads the live weights
    pipe.unet.conv_out.weight = torch.nn.Parameter(pipe.unet.conv_out.weight * 0.5)
    same.check("a new conv_out parameter")


def test_pipe_to_another_dtype_and_save_pretrained(tmp_path):
    pipe, plain = accelerated_and_plain()
    same = Same(pipe, plain)
    same.check("accelerate")
    pipe.to(torch.float64)
    reference = run(plain, prompt_embeds=text_embeds(1)["prompt_embeds"].double(),
                    negative_prompt_embeds=text_embeds(1)["negative_prompt_embeds"].double())
    candidate = run(pipe, prompt_embeds=text_embeds(1)["prompt_embeds"].double(),
                    negative_prompt_embeds=text_embeds(1)["negative_prompt_embeds"].double())
    assert candidate.dtype == torch.float64
    torch.testing.assert_close(candidate, reference, rtol=0, atol=1e-9)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == (
        "StableDiffusionPipeline")
    loaded = StableDiffusionPipeline.from_pretrained(
        tmp_path, text_encoder=None, tokenizer=None, feature_extractor=None, image_encoder=None,
        safety_checker=None, requires_safety_checker=False)
    assert type(loaded) is StableDiffusionPipeline
    assert fxprop.runtime.intercept.intercepted(loaded.unet) is None
