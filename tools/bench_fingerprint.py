"""What it costs to tell whether a UNet changed: fingerprint time against a UNet step.

fxprop reads ``fxprop.fingerprint(unet)`` once per generation (captures are keyed by it). Its
cost depends on the number of modules and attributes, not on widths or resolution, so the
SD-1.5-arch UNet at a quarter of the widths has SD-1.5's full module tree. Prints the
fingerprint time (median), the UNet's step time (median; batch 2 as with CFG), both measured
interleaved after a warm-up, and the fingerprint's share of one step and of a generation.

    python tools/bench_fingerprint.py [--repeats 20] [--steps 50] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fxprop  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50, help="steps of a generation")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workload = WORKLOADS["sd15"]
    unet = workload.make_unet()
    fxprop.accelerate(unet, key_steps=1)  # intercepted, as in use: the hook is fingerprinted
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, workload.size, workload.size, generator=g)
    text = torch.randn(2, workload.tokens, unet.config.cross_attention_dim, generator=g)

    def step() -> None:
        with torch.no_grad():
            unet(x, 999, encoder_hidden_states=text)

    step(), fxprop.fingerprint(unet)  # warm-up
    prints, steps = [], []
    for _ in range(args.repeats):
        prints.append(_seconds(lambda: fxprop.fingerprint(unet)))
        if len(steps) < 5:  # a step costs seconds on CPU: five medians are enough
            steps.append(_seconds(step))
    fp, st = statistics.median(prints), statistics.median(steps)
    modules = sum(1 for _ in unet.modules())
    print(f"{workload.name}: {modules} modules, {len(list(unet.parameters()))} parameters, "
          f"{args.threads} threads")
    print(f"fingerprint       {fp * 1e3:8.2f} ms (median of {len(prints)})")
    print(f"UNet step         {st * 1e3:8.2f} ms (median of {len(steps)}, batch 2, "
          f"{workload.size}x{workload.size} latent)")
    print(f"fingerprint/step  {fp / st:8.2%}  (read once per generation)")
    print(f"per generation    {fp / (args.steps * st):8.3%}  of {args.steps} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
