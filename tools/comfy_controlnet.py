"""fxprop's nodes with a ControlNet in ComfyUI, FLOPs and time side by side (not a test).

    python tools/bench_comfyui.py --controlnet        # or python tools/comfy_controlnet.py

On the tiny random-weight SD1.5-shaped model of the tests (tests/comfy_env.py; FLOPs and time
need no trained weights) and a ``comfy.cldm`` ControlNet of its shape (random weights, zero
convs too) applied by ComfyUI's ControlNetApplyAdvanced node, KSampler's euler runs with
``--steps`` steps on a ``--size`` latent: plain, the fxprop DeepCache and Encoder Propagation
nodes at their defaults (every 3rd step, linear forecast), each without and with the
ControlNet, and the fxprop rows with the ControlNet once more as before fxprop served its
residuals (its ``CALC_COND_BATCH`` wrapper removed: the ControlNet runs every step). FLOPs:
torch's FlopCounterMode over a run; time: one warm-up run each (captures), then the median of
``--repeats`` rounds that run every row in turn. Ratios are against plain of the same
conditioning (with or without the ControlNet); "ControlNet runs" counts its forward calls.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tools")]

from common import flops, timed_rounds  # noqa: E402
from comfy_env import (conditioning, load_comfy, tiny_controlnet, tiny_patcher,  # noqa: E402
                       torchvision_stand_ins)


def patches(comfy: Any) -> dict[str, Callable[[Any], Any]]:
    """Each fxprop variant as a model patch (plain: none)."""
    from fxprop.clients.comfyui.patch import KEY
    from fxprop.comfyui import NODE_CLASS_MAPPINGS

    def node(name: str, served: bool = True) -> Callable[[Any], Any]:
        def patch(model: Any) -> Any:
            cls = NODE_CLASS_MAPPINGS[name]
            required = cls.INPUT_TYPES()["required"]
            defaults = {k: v[1]["default"] for k, v in required.items() if k != "model"}
            patched = getattr(cls(), cls.FUNCTION)(model, **defaults)[0]
            if not served:
                patched.remove_wrappers_with_key(
                    comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, KEY)
            return patched
        return patch

    return {"plain": lambda m: m,
            "fxprop DeepCache": node("FxpropDeepCache"),
            "fxprop encoder propagation": node("FxpropEncoderPropagation"),
            "fxprop DeepCache, every step": node("FxpropDeepCache", served=False),
            "fxprop encoder propagation, every step": node("FxpropEncoderPropagation",
                                                           served=False)}


def rows(comfy: Any, steps: int, size: int) -> tuple[dict[str, tuple[Callable, str]], Any]:
    """Each row's run and the plain row it is compared with; the ControlNet."""
    with torchvision_stand_ins():
        import nodes
    model, control = tiny_patcher(comfy), tiny_controlnet(comfy)
    hint = torch.rand(1, size * 8, size * 8, 3, generator=torch.Generator().manual_seed(3))
    bare = (conditioning(1), conditioning(2))
    with_cn = nodes.ControlNetApplyAdvanced().apply_controlnet(*bare, control, hint, 1.0, 0.0,
                                                               1.0)

    def run(patched: Any, conds: Any) -> Callable[[], Any]:
        def sample() -> Any:
            g = torch.Generator().manual_seed(0)
            latent = torch.zeros(1, 4, size, size)
            return comfy.sample.sample(patched, torch.randn(latent.shape, generator=g), steps,
                                       3.0, "euler", "normal", *conds, latent, seed=0,
                                       disable_pbar=True)
        return sample

    found = {}
    for name, patch in patches(comfy).items():
        base, _, every = name.partition(", ")
        if not every:
            found[name] = (run(patch(model), bare), "plain")
        found[f"{base} + ControlNet {every}".strip()] = (run(patch(model), with_cn),
                                                         "plain + ControlNet")
    return found, control


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=16, help="latent side (the hint is 8x)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    comfy = load_comfy()
    table, control = rows(comfy, args.steps, args.size)
    counted: list = []
    control.control_model.register_forward_hook(lambda *_: counted.append(1))
    measured = {}
    for name, (run, _) in table.items():
        run()                                   # warm-up: captures
        counted.clear()
        measured[name] = (flops(run), len(counted))
    seconds = timed_rounds({name: run for name, (run, _) in table.items()}, args.repeats)
    print(f"euler {args.steps} steps, latent {args.size}x{args.size}, {args.threads} threads, "
          f"median of {args.repeats} interleaved rounds after a warm-up run")
    print(f"{'row':<52}{'FLOPs vs plain':>15}{'time s':>8}{'time vs plain':>15}"
          f"{'ControlNet runs':>17}")
    for name, (_, plain) in table.items():
        run_flops, runs = measured[name]
        print(f"{name:<52}{run_flops / measured[plain][0]:>15.2f}{seconds[name]:>8.3f}"
              f"{seconds[name] / seconds[plain]:>15.2f}{runs:>17}", flush=True)


if __name__ == "__main__":
    main()
