"""ComfyUI workflows for the tests: the UI-format workflows users load (``example_workflows/``)
converted to the API format ComfyUI's executor runs, and a runner of API prompts through
``execution.PromptExecutor``.

:func:`ui_to_api` does what ComfyUI's frontend does when it queues a workflow
(``graphToPrompt``): links become ``[node id, output slot]``, ``widgets_values`` are matched in
order to the node's widget inputs from its ``INPUT_TYPES`` (skipping the values of the widgets
the frontend adds: a seed's "control after generate", an image combo's upload button), notes are
left out, muted nodes (mode 2) dropped and bypassed ones (mode 4) passed through: each input
linked to one of their outputs takes the input of the same type the bypassed node had. A value
left over or missing is a ``ValueError`` naming the node, so a workflow file that no longer fits
its nodes fails here rather than running with shifted values.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import safetensors.torch
import torch

from comfy_env import UNET_CONFIG, init_weights, torchvision_stand_ins

#: Input types the frontend draws as widgets (a list of options is a combo too).
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
#: Frontend-only nodes, never sent to the server.
VIRTUAL_NODES = ("Note", "MarkdownNote")
MUTED, BYPASSED = 2, 4


def widget_names(node_class: Any) -> list[tuple[str, int]]:
    """The node's widget inputs in the order of its ``widgets_values``, each with the count of
    values the frontend saves for it (2 where it adds a control widget after it)."""
    found = []
    types = node_class.INPUT_TYPES()
    for group in ("required", "optional"):
        for name, spec in types.get(group, {}).items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
            if not (isinstance(kind, list) or kind in WIDGET_TYPES) or options.get("forceInput"):
                continue
            control = (kind == "INT" and (name in ("seed", "noise_seed")
                                          or options.get("control_after_generate")))
            found.append((name, 2 if control or options.get("image_upload") else 1))
    return found


def _widget_inputs(node: dict, node_class: Any) -> dict:
    """``node``'s widget values by input name."""
    values = node.get("widgets_values") or []
    if isinstance(values, dict):
        return dict(values)
    found, at = {}, 0
    for name, count in widget_names(node_class):
        if at >= len(values):
            raise ValueError(f"node {node['id']} ({node['type']}): no value for widget {name!r} "
                             f"in widgets_values {values!r}")
        found[name], at = values[at], at + count
    if at != len(values):
        raise ValueError(f"node {node['id']} ({node['type']}): widgets_values {values!r} has "
                         f"{len(values) - at} value(s) more than its widgets {list(found)}")
    return found


def ui_to_api(workflow: dict, node_classes: dict) -> dict:
    """The API-format prompt ComfyUI's frontend queues for the UI-format ``workflow``;
    ``node_classes``: ``nodes.NODE_CLASS_MAPPINGS``."""
    nodes = {node["id"]: node for node in workflow["nodes"] if node["type"] not in VIRTUAL_NODES}
    links = {row[0]: (row[1], row[2]) for row in workflow["links"]}
    prompt = {}
    for node in nodes.values():
        if node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        if node["type"] not in node_classes:
            raise ValueError(f"node {node['id']}: no node class {node['type']!r} in this ComfyUI")
        inputs = _widget_inputs(node, node_classes[node["type"]])
        for slot in node.get("inputs", []):
            source = _source(nodes, links, slot.get("link"), slot["type"])
            if source is not None:
                inputs[slot["name"]] = [str(source[0]), source[1]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _source(nodes: dict, links: dict, link: int | None, kind: str) -> tuple | None:
    """The (node id, output slot) that feeds ``link``, through bypassed nodes; None if unlinked
    or fed by a muted node."""
    while link is not None:
        origin, slot = links[link]
        node = nodes[origin]
        if node.get("mode", 0) == MUTED:
            return None
        if node.get("mode", 0) != BYPASSED:
            return origin, slot
        passed = [i for i in node.get("inputs", []) if i["type"] == kind]
        if not passed:
            raise ValueError(f"bypassed node {origin} ({node['type']}) has no {kind} input to "
                             f"pass on")
        link = passed[0].get("link")
    return None


def with_mode(workflow: dict, node_type: str, mode: int) -> dict:
    """A copy of ``workflow`` with every node of ``node_type`` in ``mode`` (4: bypassed)."""
    nodes = [dict(node, mode=mode) if node["type"] == node_type else node
             for node in workflow["nodes"]]
    return {**workflow, "nodes": nodes}


class Server:
    """What the executor tells a UI: nothing here."""

    client_id = last_node_id = last_prompt_id = None

    def send_sync(self, *args, **kwargs) -> None:
        pass


class Keep:
    """An output node that keeps the sampled latents."""

    RETURN_TYPES, FUNCTION, CATEGORY, OUTPUT_NODE = (), "keep", "testing", True
    kept: list = []

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"samples": ("LATENT",)}}

    def keep(self, samples: dict) -> dict:
        Keep.kept.append(samples["samples"].clone())
        return {}


@contextlib.contextmanager
def prompt_executor(added: dict) -> Iterator[Callable[[dict], tuple[torch.Tensor, list]]]:
    """``run(prompt)``: an API-format prompt validated and run by one ``PromptExecutor`` (the
    test nodes ``added`` and :class:`Keep` registered while the block runs); returns the latent
    the prompt's Keep node kept and the ids of the nodes ComfyUI's cache served."""
    with torchvision_stand_ins():
        import execution
        import nodes
    added = {**added, "Keep": Keep}
    before = {name: nodes.NODE_CLASS_MAPPINGS.get(name) for name in added}
    nodes.NODE_CLASS_MAPPINGS.update(added)
    # ComfyUI's default, classic cache; 0.3.75 reads cache_args after each node (0.3.64 has none)
    takes = inspect.signature(execution.PromptExecutor).parameters
    extra = {"cache_args": {"ram": 0.0, "lru": 0}} if "cache_args" in takes else {}
    executor = execution.PromptExecutor(Server(), **extra)
    count = iter(range(1000))

    def run(prompt: dict) -> tuple[torch.Tensor, list]:
        prompt_id = str(next(count))
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        assert valid[0], valid[1:]
        executor.execute(prompt, prompt_id, {}, valid[2])
        assert executor.success, executor.status_messages[-1]
        cached = next(data["nodes"] for event, data in executor.status_messages
                      if event == "execution_cached")
        return Keep.kept[-1], cached

    try:
        yield run
    finally:
        for name, node_class in before.items():
            if node_class is None:
                del nodes.NODE_CLASS_MAPPINGS[name]
            else:
                nodes.NODE_CLASS_MAPPINGS[name] = node_class


#: An SD1.5 UNet as ComfyUI's model detection recognises one (it matches SD15 on
#: model_channels 320 and context_dim 768), one level deep: a call takes about 0.1 s on one CPU
#: thread at a 4x4 latent.
CHECKPOINT_UNET = dict(UNET_CONFIG, model_channels=320, num_res_blocks=[1], channel_mult=[1],
                       transformer_depth=[1], transformer_depth_output=[1, 1])


def save_checkpoint(comfy: types.SimpleNamespace, path: Path, seed: int = 0) -> None:
    """A checkpoint as CheckpointLoaderSimple loads one, random weights: the UNet of
    :data:`CHECKPOINT_UNET` and a TAESD as its VAE (ComfyUI builds the VAE from the taesd keys;
    SD's own VAE has 83M parameters). No text encoder: SD's has 123M parameters, and
    CheckpointLoaderSimple then gives no CLIP (the tests condition with a test node)."""
    unet = comfy.supported_models.SD15(dict(CHECKPOINT_UNET)).get_model({}).diffusion_model
    init_weights(unet, seed)
    vae = importlib.import_module("comfy.taesd.taesd").TAESD(latent_channels=4)
    init_weights(vae.taesd_encoder, seed + 1)
    init_weights(vae.taesd_decoder, seed + 2)
    state = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    safetensors.torch.save_file(state, str(path))


def save_controlnet(comfy: types.SimpleNamespace, path: Path, seed: int = 3) -> None:
    """A ControlNet for the UNet of :func:`save_checkpoint` in the layout of the SD1.5
    ControlNet files (``control_model.`` keys), random weights, its zero convolutions too (zero,
    a ControlNet would change nothing)."""
    config = {k: v for k, v in CHECKPOINT_UNET.items() if k != "out_channels"}
    net = importlib.import_module("comfy.cldm.cldm").ControlNet(
        hint_channels=3, num_heads=8, num_head_channels=-1, **config)
    init_weights(net, seed)
    safetensors.torch.save_file({f"control_model.{k}": v for k, v in net.state_dict().items()},
                                str(path))
