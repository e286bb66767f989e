"""The node pack's example workflows (``example_workflows/``, in ComfyUI's UI format: what
ComfyUI's template browser lists for a custom node) run by ComfyUI's own executor (issue 31,
item 1). Each file is converted to the API format as ComfyUI's frontend queues it
(:func:`comfy_workflows.ui_to_api`) and run through ``execution.PromptExecutor`` with its own
loader nodes: CheckpointLoaderSimple loads a tiny SD1.5-detected checkpoint saved under the
file name the workflow names, ControlNetLoader a ControlNet for it, LoadImage the control image,
VAEDecode decodes and SaveImage saves. One substitution: the checkpoint has no text encoder
(SD's has 123M parameters), so each CLIPTextEncode becomes a test node that turns its text into
a random embedding. The plain run is the same file with the fxprop node bypassed, as Ctrl+B does
in the UI."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch

from comfy_env import conditioning, require_comfy, torchvision_stand_ins
from comfy_workflows import (BYPASSED, prompt_executor, save_checkpoint, save_controlnet,
                             ui_to_api, with_mode)

COMFY = require_comfy()
pytestmark = [pytest.mark.slow,  # ComfyUI's nodes.py and execution.py import most of ComfyUI
              pytest.mark.skipif(COMFY.patcher_extension is None,
                                 reason="this ComfyUI has no wrappers (fxprop refuses it)")]

from fxprop.comfyui import NODE_CLASS_MAPPINGS  # noqa: E402

WORKFLOWS = sorted((Path(__file__).resolve().parent.parent / "example_workflows").glob("*.json"))
NODE = "FxpropDeepCache"
SIZE = 32   # pixels: a 4x4 latent


class TextConditioning:
    """CONDITIONING from a prompt's text without a text encoder (CLIPTextEncode's stand-in)."""

    RETURN_TYPES, FUNCTION, CATEGORY = ("CONDITIONING",), "encode", "testing"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"text": ("STRING", {"multiline": True})}}

    def encode(self, text: str) -> tuple:
        return (conditioning(zlib.crc32(text.encode())),)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """ComfyUI's model, input and output folders in a temporary directory, holding the files the
    example workflows name (a tiny checkpoint, a ControlNet and a control image)."""
    with torchvision_stand_ins():
        import folder_paths
    from PIL import Image
    root = tmp_path_factory.mktemp("comfyui")
    loaders = ("CheckpointLoaderSimple", "ControlNetLoader", "LoadImage")
    names = {node["type"]: node["widgets_values"][0] for path in WORKFLOWS
             for node in json.loads(path.read_text())["nodes"] if node["type"] in loaders}
    paths = {kind: root / kind for kind in ("checkpoints", "controlnet", "input", "output")}
    for path in paths.values():
        path.mkdir()
    save_checkpoint(COMFY, paths["checkpoints"] / names["CheckpointLoaderSimple"])
    save_controlnet(COMFY, paths["controlnet"] / names["ControlNetLoader"])
    pixels = torch.randint(0, 256, (SIZE, SIZE, 3), generator=torch.Generator().manual_seed(4))
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(paths["input"] / names["LoadImage"])
    saved = {kind: folder_paths.folder_names_and_paths[kind] for kind in ("checkpoints",
                                                                          "controlnet")}
    directories = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    for kind in saved:
        folder_paths.folder_names_and_paths[kind] = ([str(paths[kind])], saved[kind][1])
        folder_paths.filename_list_cache.pop(kind, None)
    folder_paths.set_input_directory(str(paths["input"]))
    folder_paths.set_output_directory(str(paths["output"]))
    yield paths
    folder_paths.folder_names_and_paths.update(saved)
    for kind in saved:
        folder_paths.filename_list_cache.pop(kind, None)
    folder_paths.set_input_directory(directories[0])
    folder_paths.set_output_directory(directories[1])


@pytest.fixture(scope="module")
def execute(folders):
    with prompt_executor({**NODE_CLASS_MAPPINGS, "TextConditioning": TextConditioning}) as run:
        yield run


def node_id(prompt: dict, class_type: str) -> str:
    (found,) = [key for key, node in prompt.items() if node["class_type"] == class_type]
    return found


def prompt_of(workflow: dict) -> dict:
    """``workflow`` in API format, text encoded by the test node and the image :data:`SIZE`
    square, with a Keep node on the sampled latent."""
    with torchvision_stand_ins():
        import nodes
    prompt = ui_to_api(workflow, nodes.NODE_CLASS_MAPPINGS)
    for node in prompt.values():
        if node["class_type"] == "CLIPTextEncode":
            node["class_type"] = "TextConditioning"
            del node["inputs"]["clip"]
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=SIZE, height=SIZE)
    prompt["keep"] = {"class_type": "Keep", "inputs": {"samples": [node_id(prompt, "KSampler"), 0]}}
    return prompt


def changed(prompt: dict, class_type: str, **inputs) -> dict:
    """A copy of ``prompt`` with ``inputs`` set on its node of ``class_type``."""
    prompt = json.loads(json.dumps(prompt))
    prompt[node_id(prompt, class_type)]["inputs"].update(inputs)
    return prompt


def test_the_example_workflows_are_the_two_of_issue_31():
    names = {path.stem for path in WORKFLOWS}
    assert names == {"fxprop_deepcache_text_to_image", "fxprop_deepcache_controlnet"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_an_example_workflow_runs_in_comfyui_and_equals_plain_at_every_key_step(
        path, execute, folders):
    workflow = json.loads(path.read_text())
    accelerated = prompt_of(workflow)
    plain = prompt_of(with_mode(workflow, NODE, BYPASSED))
    assert NODE not in {node["class_type"] for node in plain.values()}
    defaults = {k: v[1]["default"] for k, v in NODE_CLASS_MAPPINGS[NODE].INPUT_TYPES()["required"].items()
                if k != "model"}
    assert {k: accelerated[node_id(accelerated, NODE)]["inputs"][k] for k in defaults} == defaults
    every = changed(accelerated, NODE, interval=1)
    before = set(folders["output"].iterdir())

    first, _ = execute(changed(every, "KSampler", seed=0, steps=3))
    second, cached = execute(changed(every, "KSampler", seed=5, steps=4))
    assert node_id(every, NODE) in cached   # the same patched clone, from ComfyUI's output cache
    torch.testing.assert_close(first, execute(changed(plain, "KSampler", seed=0, steps=3))[0],
                               atol=1e-5, rtol=0)
    plain_second, _ = execute(changed(plain, "KSampler", seed=5, steps=4))
    torch.testing.assert_close(second, plain_second, atol=1e-5, rtol=0)
    sparse, _ = execute(changed(accelerated, "KSampler", seed=5, steps=4))   # interval 3
    assert torch.isfinite(sparse).all() and (sparse - plain_second).abs().max() > 1e-3

    saved = set(folders["output"].iterdir()) - before   # SaveImage ran for each prompt
    assert len(saved) == 5 and all(p.suffix == ".png" for p in saved)


def test_the_converter_refuses_widget_values_that_do_not_fit_the_node():
    with torchvision_stand_ins():
        import nodes
    workflow = json.loads(WORKFLOWS[0].read_text())
    sampler = next(node for node in workflow["nodes"] if node["type"] == "KSampler")
    for values in (sampler["widgets_values"] + [1], sampler["widgets_values"][:-1]):
        sampler["widgets_values"] = values
        with pytest.raises(ValueError, match=rf"node {sampler['id']} \(KSampler\)"):
            ui_to_api(workflow, nodes.NODE_CLASS_MAPPINGS)
