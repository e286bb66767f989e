"""ComfyUI workflows that kept models alive or made fxprop slower than plain (issue 32, row
1; issue 33), run in ComfyUI itself on the tests' tiny model: an unloaded model is freed,
many call shapes capture once, a capture that fails is not tried again and is named once, and
TorchCompileModel composes with the nodes in either order."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from comfy_env import area_conditionings, conditioning, require_comfy, tiny_patcher

COMFY = require_comfy()

import fxprop.clients.comfyui.runner as runner_module  # noqa: E402  (after the skip above)
from fxprop.clients.comfyui.runner import ComfyRunner  # noqa: E402
from fxprop.comfyui import NODE_CLASS_MAPPINGS  # noqa: E402
from fxprop.graph.cache import owned_cache  # noqa: E402
from test_comfyui import (CFG, STEPS, accelerated, accelerates, count_captures,  # noqa: E402
                          sample)


@pytest.fixture(scope="module")
def model():
    """The tiny model's ModelPatcher, shared by every test of the file."""
    return tiny_patcher(COMFY)


# -- lifetimes ------------------------------------------------------------------------------------

def _load_run_unload(patch) -> "weakref.ref":
    """Load a model (a checkpoint), run it through ``patch``, unload it as switching checkpoints
    does (ComfyUI drops its loaded models); a weak reference to its UNet."""
    patcher = tiny_patcher(COMFY, seed=7)
    sample(patch(patcher), steps=4)
    unet = weakref.ref(patcher.model.diffusion_model)
    COMFY.model_management.unload_all_models()
    COMFY.model_management.cleanup_models()
    return unet


@accelerates
def test_an_unloaded_model_is_freed_with_its_captures():
    """Issue 32, row 1: three models loaded, accelerated and unloaded stayed alive (a weakly
    keyed capture cache whose graphs refer to their key); now they go, as plain ones do."""
    node = NODE_CLASS_MAPPINGS["FxpropDeepCache"]()
    plain = [_load_run_unload(lambda p: p) for _ in range(3)]
    accelerated_ = [_load_run_unload(lambda p: node.patch(p, 2, 1, 0.0, 1.0, branch=0)[0])
                    for _ in range(3)]
    gc.collect()
    assert [r() is None for r in plain] == [True] * 3        # what ComfyUI itself frees
    assert [r() is None for r in accelerated_] == [True] * 3


# -- no speed cliffs (issue 33) ---------------------------------------------------------------

def _with_areas(model, positive) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    latent = torch.zeros(1, 4, 16, 16)
    return COMFY.sample.sample(model, torch.randn(latent.shape, generator=g), 4, CFG, "euler",
                               "normal", positive, conditioning(2), latent, seed=0,
                               disable_pbar=True)


@pytest.mark.slow  # 4 captures
@accelerates
def test_more_call_shapes_than_the_cache_holds_capture_once(model, monkeypatch):
    """Row 1: 9 area conditionings of different sizes (10 call shapes a step) cycled through the
    8-graph LRU, capturing at every call of every run. A run keeps the graphs it uses: the
    first run captures each shape once, a warm run none; every key step equals plain. (Here
    the cache holds 2 graphs and 3 areas make more shapes than that: fewer captures.)"""
    positive = area_conditionings(3)
    keys: list = []
    real = runner_module.capture
    monkeypatch.setattr(runner_module, "capture",
                        lambda unet, call, forward: keys.append(call.key) or real(unet, call,
                                                                                  forward))
    cache = owned_cache(model.model.diffusion_model)
    monkeypatch.setattr(cache, "size", 2)
    every, _, record = accelerated(model, "deep")
    torch.testing.assert_close(_with_areas(every, positive), _with_areas(model, positive),
                               atol=1e-5, rtol=0)
    assert len(keys) > cache.size and len(set(keys)) == len(keys)   # each shape once
    assert record and all(is_key for _, is_key in record)
    captured = len(keys)
    _with_areas(every, positive)
    assert len(keys) == captured


@accelerates
def test_a_capture_that_fails_is_not_tried_again_and_says_why_once(model, monkeypatch, caplog,
                                                                     capfd):
    """Row 2: Deep Shrink (PatchModelAddDownscale) compares the call's sigma in Python, which
    no single graph can do: refused, ComfyUI's output, one log line naming the code, no graph
    dump; the next runs do not capture again and log nothing new."""
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale
    shrunk = PatchModelAddDownscale.execute(model, 1, 2.0, 0.0, 0.35, True, "bicubic",
                                            "bicubic")[0]
    plain = sample(shrunk)
    made = count_captures(monkeypatch)
    sparse, _, _ = accelerated(shrunk, "deep", interval=2)
    for _ in range(3):
        with pytest.warns(UserWarning, match="reads the value of a call input"):
            torch.testing.assert_close(sample(sparse), plain, atol=1e-5, rtol=0)
    logged = [r.getMessage() for r in caplog.records if r.name == "fxprop.comfyui"]
    assert len(made) == 1 and len(logged) == 1, (made, logged)
    assert "nodes_model_downscale.py" in logged[0] and "input_block_patch" in logged[0]
    assert "def forward(self" not in capfd.readouterr().err   # export's partial graph


@pytest.mark.slow  # dynamo traces the tiny UNet (backend "eager": no inductor)
@accelerates
def test_torch_compile_model_composes_in_either_order(model):
    """Row 3: with TorchCompileModel, dynamo traced fxprop's runtime (graph breaks at every
    lookup, the recompile limit: warm runs 15x slower than compiled plain). fxprop's wrapper is
    kept out of dynamo, and its parts compile with the options the model asks for: in either
    order of the nodes, every key step equals plain and no frame of fxprop's runtime is
    compiled."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    def compiled(m):
        m = m.clone()
        set_torch_compile_wrapper(m, backend="eager")
        return m

    node = NODE_CLASS_MAPPINGS["FxpropDeepCache"]()
    plain = sample(model)
    for patched in (node.patch(compiled(model), 1, 0, 0.0, 1.0, branch=0)[0],
                    compiled(node.patch(model, 1, 0, 0.0, 1.0, branch=0)[0])):
        torch.testing.assert_close(sample(patched, steps=STEPS), plain, atol=1e-5, rtol=0)
    for code in (ComfyRunner.planned.__code__, ComfyRunner.run_planned.__code__):
        assert _debug_get_cache_entry_list(code) == [], code.co_qualname
