"""Workflows that made fxprop slower than plain ComfyUI (issue 33), timed side by side (not a
test).

    python tools/bench_comfyui.py --cliffs            # or python tools/comfy_cliffs.py

On the tiny random-weight SD1.5-shaped model of the tests (tests/comfy_env.py; timing needs no
trained weights), each row runs a workflow plain and with the fxprop DeepCache node at its
defaults (every 3rd step, linear forecast): one warm-up run each (captures, compiles), then the
median of ``--repeats`` rounds that run every variant in turn. Rows:

- 9 area conditionings of different sizes (10 call shapes a step, more than the cache's 8);
- Deep Shrink (PatchModelAddDownscale), which fxprop refuses: the warm run should cost plain's;
- TorchCompileModel (inductor), compiled plain against fxprop after it and before it.

It prints each row's warm time, plain's, their ratio, and the captures and log lines of the
warm runs (both should be 0).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from common import timed_rounds  # noqa: E402
from comfy_env import area_conditionings, conditioning, load_comfy, tiny_patcher  # noqa: E402


def workflows(comfy: Any, steps: int) -> dict[str, tuple[Any, Callable[[Any], Any]]]:
    """Each row's model patch (ComfyUI's own node, or none) and sampler run."""
    areas = area_conditionings(9)   # imports ComfyUI's nodes.py (behind torchvision stand-ins)
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    def sampled(positive: Any, size: int = 16) -> Callable[[Any], Any]:
        def run(model: Any) -> Any:
            g = torch.Generator().manual_seed(0)
            latent = torch.zeros(1, 4, size, size)
            return comfy.sample.sample(model, torch.randn(latent.shape, generator=g), steps,
                                       3.0, "euler", "normal", positive, conditioning(2),
                                       latent, seed=0, disable_pbar=True)
        return run

    def compiled(model: Any) -> Any:
        model = model.clone()
        set_torch_compile_wrapper(model, backend="inductor")
        return model

    def shrunk(model: Any) -> Any:
        return PatchModelAddDownscale.execute(model, 1, 2.0, 0.0, 0.35, True, "bicubic",
                                              "bicubic")[0]

    return {"9 area conditionings": (None, sampled(areas)),
            "Deep Shrink (refused)": (shrunk, sampled(conditioning(1))),
            "TorchCompileModel": (compiled, sampled(conditioning(1)))}


def counted(comfy: Any) -> dict[str, int]:
    """Counters of fxprop's captures and log lines (for the warm runs)."""
    import fxprop.clients.comfyui.runner as runner

    counts = {"captures": 0, "log lines": 0}
    real = runner.capture

    def capture(*args: Any, **kwargs: Any) -> Any:
        counts["captures"] += 1
        return real(*args, **kwargs)

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            counts["log lines"] += 1

    runner.capture = capture
    logging.getLogger("fxprop.comfyui").addHandler(Count())
    return counts


def row(name: str, variants: dict[str, Callable[[], Any]], counts: dict, repeats: int) -> None:
    for run in variants.values():   # warm-up: captures, compiles
        start = time.perf_counter()
        run()
        print(f"  {name}: warm-up {time.perf_counter() - start:.1f} s", flush=True)
    before = dict(counts)
    seconds = timed_rounds(variants, repeats)
    plain = seconds["plain"]
    new = {k: counts[k] - before[k] for k in counts}
    for variant, value in seconds.items():
        print(f"{name:<24}{variant:<26}{value:>8.3f}{value / plain:>10.2f}"
              + (f"   {new}" if variant == "plain" else ""), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    comfy = load_comfy()
    from fxprop.comfyui import NODE_CLASS_MAPPINGS
    node, counts = NODE_CLASS_MAPPINGS["FxpropDeepCache"](), counted(comfy)
    base = tiny_patcher(comfy)

    def fxprop_(model: Any) -> Any:
        return node.patch(model, 3, 1, 0.0, 1.0, branch=0)[0]

    print(f"tiny SD1.5-shaped UNet, euler {args.steps} steps, median of {args.repeats} "
          f"interleaved rounds after a warm-up; torch {torch.__version__}")
    print(f"{'workflow':<24}{'variant':<26}{'time s':>8}{'vs plain':>10}   warm runs' counts")
    for name, (patch, run) in workflows(comfy, args.steps).items():
        model = base if patch is None else patch(base)
        variants = {"plain": lambda m=model: run(m), "fxprop": lambda m=fxprop_(model): run(m)}
        if name == "TorchCompileModel":
            variants["fxprop, then compile"] = lambda m=patch(fxprop_(base)): run(m)
        row(name, variants, counts, args.repeats)


if __name__ == "__main__":
    main()
