"""fxprop's nodes run by ComfyUI's own executor (issue 31, item 1, in part): API-format prompts
through ``execution.PromptExecutor``, validated against the nodes' ``INPUT_TYPES``, with
ComfyUI's output cache handing the same patched MODEL clone to the next prompt (other seed,
other step count). The model and conditioning come from two small test nodes (the tiny model
of the tests; no checkpoint, CLIP or VAE is needed for what is tested here)."""

from __future__ import annotations

import pytest
import torch

from comfy_env import conditioning, require_comfy, tiny_patcher
from comfy_workflows import prompt_executor

COMFY = require_comfy()
pytestmark = [pytest.mark.slow,  # ComfyUI's nodes.py and execution.py import most of ComfyUI
              pytest.mark.skipif(COMFY.patcher_extension is None,
                                 reason="this ComfyUI has no wrappers (fxprop refuses it)")]

from fxprop.comfyui import NODE_CLASS_MAPPINGS  # noqa: E402


class TinyModel:
    """MODEL: the tests' tiny random-weight SD1.5-shaped model (a checkpoint loader's stand-in)."""

    RETURN_TYPES, FUNCTION, CATEGORY = ("MODEL",), "load", "testing"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"seed": ("INT", {"default": 0})}}

    def load(self, seed: int) -> tuple:
        return (tiny_patcher(COMFY, seed=seed),)


class TinyConditioning:
    """CONDITIONING: one random text embedding (a text encoder's stand-in)."""

    RETURN_TYPES, FUNCTION, CATEGORY = ("CONDITIONING",), "make", "testing"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"seed": ("INT", {"default": 1})}}

    def make(self, seed: int) -> tuple:
        return (conditioning(seed),)


def workflow(seed: int, steps: int, interval: int | None) -> dict:
    """KSampler on the tiny model, through fxprop DeepCache unless ``interval`` is None."""
    prompt = {
        "model": {"class_type": "TinyModel", "inputs": {"seed": 0}},
        "positive": {"class_type": "TinyConditioning", "inputs": {"seed": 1}},
        "negative": {"class_type": "TinyConditioning", "inputs": {"seed": 2}},
        "latent": {"class_type": "EmptyLatentImage",
                   "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["model", 0] if interval is None else ["fxprop", 0], "seed": seed,
            "steps": steps, "cfg": 3.0, "sampler_name": "euler", "scheduler": "karras",
            "positive": ["positive", 0], "negative": ["negative", 0],
            "latent_image": ["latent", 0], "denoise": 1.0}},
        "keep": {"class_type": "Keep", "inputs": {"samples": ["sampler", 0]}},
    }
    if interval is not None:
        prompt["fxprop"] = {"class_type": "FxpropDeepCache", "inputs": {
            "model": ["model", 0], "interval": interval, "forecast": 1, "start_percent": 0.0,
            "end_percent": 1.0, "branch": 0}}
    return prompt


@pytest.fixture(scope="module")
def execute():
    """Run an API-format prompt through one PromptExecutor; its latent and cached nodes."""
    added = {"TinyModel": TinyModel, "TinyConditioning": TinyConditioning}
    with prompt_executor({**added, **NODE_CLASS_MAPPINGS}) as run:
        yield run


def test_the_executor_runs_the_node_and_reuses_its_model_in_the_next_prompt(execute):
    first, _ = execute(workflow(0, 6, interval=1))
    second, cached = execute(workflow(5, 8, interval=1))   # another seed and step count
    assert "fxprop" in cached   # the same patched clone, from ComfyUI's output cache
    torch.testing.assert_close(first, execute(workflow(0, 6, None))[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(second, execute(workflow(5, 8, None))[0], atol=1e-5, rtol=0)
    sparse, _ = execute(workflow(5, 8, interval=3))
    assert (sparse - second).abs().max() > 1e-3   # features were reused
