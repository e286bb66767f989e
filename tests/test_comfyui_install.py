"""The repository as a ComfyUI node pack (issue 31, item 1, in part): its root copied into a
ComfyUI's ``custom_nodes/`` as ComfyUI-Manager's "Install via Git URL" clones it, loaded by
ComfyUI's own loader in a fresh interpreter where fxprop was never imported, and its DeepCache
node run in KSampler's ``common_ksampler``: every key step equal to plain, sparse ones not."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from comfy_env import comfy_path, require_comfy

COMFY = require_comfy()
ROOT = Path(__file__).resolve().parent.parent
#: What a clone of the repository holds that ComfyUI reads (tests and tools need not be copied).
NODE_PACK = ("__init__.py", "requirements.txt", "pyproject.toml", "fxprop")

RUN = """
import asyncio, inspect, json, sys
sys.path.insert(0, {tests!r})
import torch
from comfy_env import conditioning, load_comfy, tiny_patcher, torchvision_stand_ins
comfy = load_comfy()
with torchvision_stand_ins():
    import nodes
assert "fxprop" not in sys.modules
loaded = nodes.load_custom_node({node_dir!r})
assert (asyncio.run(loaded) if inspect.isawaitable(loaded) else loaded) is not False
import fxprop
node = nodes.NODE_CLASS_MAPPINGS["FxpropDeepCache"]()
model = tiny_patcher(comfy)

def ksampler(m):
    latent = {{"samples": torch.zeros(1, 4, 8, 8)}}
    return nodes.common_ksampler(m, 0, 8, 3.0, "euler", "karras", conditioning(1),
                                 conditioning(2), latent)[0]["samples"]

plain = ksampler(model)
every = ksampler(node.patch(model, 1, 0, 0.0, 1.0, branch=0)[0])
sparse = ksampler(node.patch(model, 3, 1, 0.0, 1.0, branch=0)[0])
print(json.dumps({{"fxprop": fxprop.__file__, "every": float((every - plain).abs().max()),
                  "sparse": float((sparse - plain).abs().max()),
                  "display": nodes.NODE_DISPLAY_NAME_MAPPINGS["FxpropDeepCache"]}}))
"""


def test_the_node_pack_files_ask_for_no_second_torch():
    requirements = (ROOT / "requirements.txt").read_text().splitlines()
    names = [line.split("#")[0].strip() for line in requirements]
    assert not any(n.lower().startswith("torch") for n in names if n)
    comfy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "Icon"} <= set(comfy)


@pytest.mark.slow  # a fresh interpreter imports torch and ComfyUI (~10 s)
@pytest.mark.skipif(COMFY.patcher_extension is None, reason="this ComfyUI has no wrappers")
def test_the_repository_cloned_into_custom_nodes_loads_and_runs(tmp_path):
    node_dir = tmp_path / "ComfyUI" / "custom_nodes" / "fxprop"
    node_dir.mkdir(parents=True)
    for name in NODE_PACK:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, node_dir / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, node_dir / name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if comfy_path() is not None:
        env["FXPROP_COMFYUI_PATH"] = str(comfy_path())
    script = RUN.format(tests=str(ROOT / "tests"), node_dir=str(node_dir))
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(found["fxprop"]).is_relative_to(node_dir)   # the clone's package, not another
    assert found["every"] <= 1e-5 and found["sparse"] > 1e-3
    assert found["display"] == "fxprop DeepCache"
