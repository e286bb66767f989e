"""The core needs only torch: a bare UNet (the real LDM UNetModel) accelerates in a process
where diffusers, transformers, accelerate and peft cannot be imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = r'''
import importlib.abc, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"diffusers", "transformers", "accelerate", "peft"}:
            raise ImportError(f"{name} is not installed here")

sys.meta_path.insert(0, Absent())
import torch
torch.set_num_threads(1)
import fxprop
from real_unets import ldm_unet

unet = ldm_unet()
x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
timesteps = torch.tensor([999, 700, 400, 100])

def loop(model, set_plan):
    if set_plan:
        model.set_timesteps(timesteps)
    with torch.no_grad():
        return torch.stack([model(x + i, t.expand(2), context=context)
                            for i, t in enumerate(timesteps)])

plain = loop(unet, False)
every = loop(fxprop.accelerate(unet, key_steps=1, reuse="deep"), True)
torch.testing.assert_close(every, plain, atol=1e-5, rtol=0)
sparse = loop(fxprop.accelerate(unet, key_steps=[0, 2], reuse="deep"), True)
assert (sparse - plain).abs().max() > 1e-4, "features were not reused"
loaded = [m for m in sys.modules if m.split(".")[0] in {"diffusers", "transformers", "accelerate"}]
assert not loaded, loaded
print("ok")
'''


def test_a_bare_unet_accelerates_without_diffusers():
    tests = Path(__file__).parent
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", SCRIPT],
                          cwd=tests, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_a_bare_unet_copies_pickles_and_restores_plain():
    import copy
    import io

    import torch

    import fxprop
    from conftest import assert_differs
    from test_stacks import TwoNames
    torch.manual_seed(0)
    unet = TwoNames().eval()
    x, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([900, 500, 100])
    acc = fxprop.accelerate(unet, key_steps=[0], prior_noise=0)
    acc.set_timesteps(timesteps)
    with torch.no_grad():
        sparse = [acc(x, t) for t in timesteps]
        plain = [unet(x, t) for t in timesteps]  # no scope: the intercepted UNet runs plainly
    assert_differs(sparse[1], plain[1], 1e-4)  # the runtime did reuse features
    buffer = io.BytesIO()
    torch.save(unet, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(unet), torch.load(buffer, weights_only=False)):
        # plain, holding nothing of fxprop's
        assert fxprop.runtime.intercept.intercepted(twin) is None
        with torch.no_grad():
            torch.testing.assert_close(twin(x, timesteps[1]), plain[1], atol=0, rtol=0)
    fxprop.restore(acc)
    assert "forward" not in unet.__dict__ and fxprop.runtime.intercept.intercepted(unet) is None
