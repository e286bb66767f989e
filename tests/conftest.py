"""Tiny models and pipelines built from configs with random weights (nothing downloads).

diffusers is imported where a builder needs it, not at the top: pytest's controller process
loads this file as well, before it starts the workers, and importing diffusers' pipelines
costs about 9 s of CPU there (every run of the suite waited for it).
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.fx

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel

torch.set_num_threads(1)  # tiny models: threads cost more than they bring
# torch.export records a Python stack trace on every node it traces: a fifth of a capture's time
# (measured: 1.46 s -> 1.17 s for sd_unet), and nothing in fxprop or its tests reads them. A test
# speed setting, like QUICK_BUILD below; users' captures keep their stack traces.
torch.fx.config.do_not_emit_stack_traces = True

SCHEDULERS = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler", "lcm": "LCMScheduler", "heun": "HeunDiscreteScheduler",
}
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                    beta_schedule="scaled_linear")
TEXT_DIM = 32


def fast_params(names, fast) -> list:
    """``names`` as pytest params, all but ``fast`` marked slow: the inner loop
    (``-m "not slow"``) runs ``fast``, CI runs every one."""
    return [pytest.param(name, marks=() if name in fast else pytest.mark.slow) for name in names]


def scheduler_params(names=SCHEDULERS, fast=("ddim",)) -> list:
    """The inner loop covers each pipeline with DDIM, CI covers every scheduler."""
    return fast_params(names, fast)


def make_scheduler(name: str):
    import diffusers
    extra = {"skip_prk_steps": True} if name == "pndm" else {}
    return getattr(diffusers, SCHEDULERS[name])(**SD_SCHEDULER, **extra)


def sd_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    config = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=4,
                  cross_attention_dim=TEXT_DIM,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def sdxl_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    return sd_unet(seed, **{**dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                                   projection_class_embeddings_input_dim=8 * 6 + TEXT_DIM,
                                   transformer_layers_per_block=(1, 2)), **overrides})


def tiny_vae() -> AutoencoderKL:
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(16, 16), latent_channels=4, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2).eval()


def text_embeds(batch: int = 1, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(batch, 5, TEXT_DIM, generator=g),
            "negative_prompt_embeds": torch.randn(batch, 5, TEXT_DIM, generator=g)}


def sd_pipeline(cls=None, unet=None, **extra):
    """``cls`` (default ``StableDiffusionPipeline``) with the tiny VAE and UNet, no text encoder."""
    from diffusers import StableDiffusionPipeline
    cls = cls or StableDiffusionPipeline
    return cls(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet or sd_unet(),
               scheduler=make_scheduler("ddim"), safety_checker=None, feature_extractor=None,
               requires_safety_checker=False, **extra)


def controlnet_pipeline(unet=None):
    """``unet`` (default ``sd_unet()``) with a ControlNet: ``decoder_attn_unet()`` fits too and
    captures in a third of the time, for tests where the UNet's attention does not matter."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    torch.manual_seed(2)
    controlnet = ControlNetModel(in_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                                 norm_num_groups=8, attention_head_dim=4,
                                 cross_attention_dim=TEXT_DIM,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 conditioning_embedding_out_channels=(8, 16)).eval()
    return sd_pipeline(StableDiffusionControlNetPipeline, unet=unet, controlnet=controlnet)


def sdxl_pipeline(unet=None):
    from diffusers import StableDiffusionXLPipeline
    return StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=None, text_encoder_2=None,
                                     tokenizer=None, tokenizer_2=None, unet=unet or sdxl_unet(),
                                     scheduler=make_scheduler("ddim"))


def sdxl_embeds(batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(3)
    return {**text_embeds(batch), "pooled_prompt_embeds": torch.randn(batch, TEXT_DIM, generator=g),
            "negative_pooled_prompt_embeds": torch.randn(batch, TEXT_DIM, generator=g)}


def ddpm_pipeline():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))


DECODER_ATTN = dict(down_block_types=("DownBlock2D", "DownBlock2D"),
                    mid_block_type="UNetMidBlock2D",
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def decoder_attn_unet(seed: int = 0) -> UNet2DConditionModel:
    """The tiny UNet with cross-attention in its decoder only: a third of ``sd_unet``'s capture
    time, and the every-step part still reads the conditioning."""
    return sd_unet(seed, **DECODER_ATTN)


def one_level_unet() -> UNet2DConditionModel:
    """The tiny UNet at one resolution, cross-attention in its decoder (the every-step part
    still reads the conditioning): the fewest kernels, for tests that build C++ (inductor)."""
    return sd_unet(down_block_types=("DownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                   block_out_channels=(16,), mid_block_type="UNetMidBlock2D")


#: Inductor's C++ builds made quick: scalar kernels (a fraction of the vectorised build time),
#: AOTInductor's wrapper at -O0 (10 s -> 7 s a part). Tests of what fxprop compiles, not of
#: inductor's codegen.
QUICK_BUILD = {"cpp.vec_isa_ok": False, "aot_inductor.compile_wrapper_opt_level": "O0"}


#: Test files by their cost in one worker, heaviest first, as measured (seconds, full suite,
#: 2 workers): distributed 56 (4 ranks, and it slows the other worker), models 88, export 80,
#: comfyui 45, workflows 56, deep_any 20, pipelines 54, parallel 44, generation_state 42. A
#: scheduling hint, nothing depends on it: ``--dist loadfile`` hands files out in this order,
#: so the long ones start first instead of leaving one worker running alone at the end (the
#: others follow in collection order).
HEAVIEST_FIRST = ["test_distributed.py", "test_models.py", "test_export.py", "test_comfyui.py",
                  "test_workflows.py",
                  "test_deep_any_unet.py", "test_pipelines.py", "test_parallel.py",
                  "test_generation_state.py"]


def pytest_configure(config):
    # xdist otherwise orders the files by their number of tests, which puts the few long
    # tests (the distributed ranks, AOTInductor) last
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return HEAVIEST_FIRST.index(name) if name in HEAVIEST_FIRST else len(HEAVIEST_FIRST)
    items.sort(key=rank)  # stable: tests keep their order within a file


@pytest.fixture(autouse=True)
def _threads_unchanged():
    """Fail a test that leaves torch's thread count changed: the rest of its worker would run
    at that count, and two workers at two threads each oversubscribe 2 cores (a 7x slowdown of
    every later test was measured)."""
    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    torch.set_num_threads(before)
    assert after == before, f"the test left torch at {after} threads (was {before})"


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


# -- a hand-written sampling loop on a bare UNet -------------------------------------------------

LOOP_TIMESTEPS = torch.tensor([999, 799, 599, 399, 199, 99])


def loop_inputs(seed: int = 0, batch: int = 2) -> tuple[torch.Tensor, dict]:
    """A latent per step of ``LOOP_TIMESTEPS`` (``sd_unet``'s shape) and the conditioning."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(len(LOOP_TIMESTEPS), batch, 4, 8, 8, generator=g),
            {"encoder_hidden_states": torch.randn(batch, 5, TEXT_DIM, generator=g)})


def sample_of(out):
    """The predicted tensor of any UNet's output (tensor, BaseOutput or tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    return out.sample if hasattr(out, "sample") else out[0]


@torch.no_grad()
def run_loop(model, latents: torch.Tensor, kwargs: dict, edit=None) -> torch.Tensor:
    """One generation over ``LOOP_TIMESTEPS`` with a different latent at every step (non-key
    steps must not read it); ``edit(step, encoder_hidden_states)`` may change the conditioning
    before a step. ``model`` is an AcceleratedUNet or a loaded export."""
    model.set_timesteps(LOOP_TIMESTEPS)
    outs = []
    for i, t in enumerate(LOOP_TIMESTEPS):
        if edit is not None:
            kwargs = {**kwargs, "encoder_hidden_states": edit(i, kwargs["encoder_hidden_states"])}
        outs.append(sample_of(model(latents[i], t, **kwargs)))
    return torch.stack(outs)


@contextlib.contextmanager
def part_calls():
    """Counts the ``record_function`` labels fxprop's runtime enters (``fxprop.key``,
    ``fxprop.step[x3]``, ...): what ``torch.profiler`` would list for fxprop's parts, without
    profiling every op (0.76 s -> 0.06 s a generation; test_parallel checks both agree)."""
    import fxprop.runtime.accelerated
    calls, real = Counter(), fxprop.runtime.accelerated.record_function

    def counted(label):
        calls[label] += 1
        return real(label)

    fxprop.runtime.accelerated.record_function = counted
    try:
        yield calls
    finally:
        fxprop.runtime.accelerated.record_function = real


# -- assertions ------------------------------------------------------------------------------------

def assert_differs(actual, expected, atol: float, what: str = "outputs") -> None:
    """``actual`` and ``expected`` differ by more than ``atol`` somewhere: proves that a
    comparison elsewhere in the test is not vacuous (e.g. features really were reused)."""
    diff = torch.as_tensor(actual - expected).abs().max().item()
    assert diff > atol, f"{what} should differ by more than {atol}, max |diff| is {diff}"


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in the process (after a collection): what a test
    compares before and after a generation to show nothing was kept."""
    import gc
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            try:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # fake tensors of a past capture
                continue
    return sum(storages.values())


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A LoRA for ``decoder_attn_unet`` saved as diffusers writes it (random B: it matters)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    unet = decoder_attn_unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), "a")
    path = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=get_peft_model_state_dict(
        unet, adapter_name="a"))
    return path
