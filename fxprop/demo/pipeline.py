"""`DigitsPipeline`: a tiny class-conditional pixel-space diffusion pipeline.

It generates 16x16 grey handwritten digits (0-9) with a
`UNet2DConditionModel` conditioned through cross-attention on a learned label
embedding. The denoising loop deliberately follows the structure of stock
diffusers pipelines (StableDiffusionPipeline): `scheduler.set_timesteps`,
`prepare_latents`, one batched UNet call for classifier-free guidance
(unconditional half first), `scheduler.step`, and the `callback_on_step_end`
protocol. That way code written against stock pipelines (hooks on the UNet,
step callbacks, scheduler swaps) works on it unchanged, cheaply, on a CPU.
"""

from __future__ import annotations

import operator
from typing import Callable, Sequence

import torch
from torch import nn

from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor

NUM_DIGITS = 10
#: Guidance scale the shipped model was tuned for (see tools/train_digits.py).
DEFAULT_GUIDANCE_SCALE = 1.5


class LabelEmbedding(ModelMixin, ConfigMixin):
    """Maps integer labels to cross-attention context of shape (B, 1, D).

    Labels 0..num_labels-2 are the classes; the last label is the "null"
    label used for the unconditional branch of classifier-free guidance.
    It is a separate component so diffusers can save and load it.
    """

    @register_to_config
    def __init__(self, num_labels: int = NUM_DIGITS + 1, embedding_dim: int = 64):
        super().__init__()
        self.embedding = nn.Embedding(num_labels, embedding_dim)

    @property
    def null_label(self) -> int:
        """Index of the unconditional (null) label."""
        return self.config.num_labels - 1

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Embed a (B,) tensor of labels as (B, 1, D) `encoder_hidden_states`."""
        return self.embedding(labels).unsqueeze(1)


def check_labels(labels: int | Sequence[int]) -> list[int]:
    """Return `labels` as a list of ints, raising ValueError on any non-digit."""
    items = [labels] if not isinstance(labels, (list, tuple, range)) else list(labels)
    if not items:
        raise ValueError("labels must not be empty")
    out = []
    for value in items:
        try:
            if isinstance(value, bool):
                raise TypeError
            label = operator.index(value)
        except TypeError:
            raise ValueError(f"label {value!r} is not an integer digit 0-9") from None
        if not 0 <= label < NUM_DIGITS:
            raise ValueError(f"label {label} is out of range: digits are 0-9")
        out.append(label)
    return out


class DigitsPipeline(DiffusionPipeline):
    """Class-conditional generation of 16x16 digits with classifier-free guidance.

    Components: `unet` (UNet2DConditionModel, 1 channel, epsilon prediction),
    `scheduler` (DDIM by default), `label_embedding` (LabelEmbedding).
    """

    model_cpu_offload_seq = "label_embedding->unet"
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(self, unet, scheduler, label_embedding: LabelEmbedding):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, label_embedding=label_embedding)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """CFG is on only for guidance_scale > 1 (as in stock pipelines)."""
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    def encode_labels(self, labels: list[int], device) -> torch.Tensor:
        """Context for the UNet: (B,1,D), or (2B,1,D) [uncond; cond] with CFG."""
        ids = torch.tensor(labels, device=device)
        if self.do_classifier_free_guidance:
            null = torch.full_like(ids, self.label_embedding.null_label)
            ids = torch.cat([null, ids])
        return self.label_embedding(ids).to(self.unet.dtype)

    def prepare_latents(self, batch_size, channels, height, width, dtype, device, generator, latents=None):
        """Initial noise (or given `latents`) scaled by the scheduler's init_noise_sigma."""
        shape = (batch_size, channels, height, width)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def postprocess(self, images: torch.Tensor, output_type: str):
        """Map model output in [-1, 1] to "pt" (B,1,H,W), "np" (B,H,W,1) in [0,1], or PIL."""
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        images = images.cpu().permute(0, 2, 3, 1).float().numpy()
        return images if output_type == "np" else self.numpy_to_pil(images)

    def check_inputs(self, labels, output_type, callback_on_step_end, tensor_inputs) -> tuple[list[int], list[str]]:
        """Validate arguments; return (labels as a list, callback tensor input names)."""
        labels = check_labels(labels)
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type {output_type!r} is not one of 'pil', 'np', 'pt'")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback_on_step_end.tensor_inputs
        bad = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback tensor inputs {bad} not in {self._callback_tensor_inputs}")
        return labels, list(tensor_inputs)

    @torch.no_grad()
    def __call__(
        self,
        labels: int | list[int],
        num_inference_steps: int = 50,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ):
        """Generate one image per label (a digit 0-9 or a list of them).

        guidance_scale <= 1 disables classifier-free guidance. `latents`
        optionally gives the initial noise (B, 1, 16, 16). After each step
        `callback_on_step_end(self, i, t, kwargs)` gets the tensors named in
        `callback_on_step_end_tensor_inputs`; any it returns replace them.
        Returns `ImagePipelineOutput` (a 1-tuple if return_dict is False).
        """
        labels, callback_on_step_end_tensor_inputs = self.check_inputs(
            labels, output_type, callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        self._guidance_scale = guidance_scale
        device = self._execution_device
        prompt_embeds = self.encode_labels(labels, device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        size = self.unet.config.sample_size
        latents = self.prepare_latents(
            len(labels), self.unet.config.in_channels, size, size, prompt_embeds.dtype, device, generator, latents
        )

        for i, t in enumerate(self.progress_bar(timesteps)):
            latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
            latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
            noise_pred = self.unet(latent_model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
            if self.do_classifier_free_guidance:
                noise_pred_uncond, noise_pred_cond = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

            if callback_on_step_end is not None:
                step_locals = locals()  # not inside a comprehension: own scope on 3.11
                callback_kwargs = {k: step_locals[k] for k in callback_on_step_end_tensor_inputs}
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                latents = callback_outputs.pop("latents", latents)
                prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)

        images = self.postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
