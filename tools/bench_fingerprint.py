"""What it costs to tell whether a UNet changed: fingerprint time against a UNet step.

fxprop reads the state captures are keyed by (the UNet's fingerprint and the grad/autocast
modes, ``CaptureCache.state``) at every planned UNet call, through a
:class:`~fxprop.graph.fingerprint.Fingerprinter` that recomputes only the digests of modules whose
attributes changed. Its cost depends on the number of modules and attributes, not on widths or
resolution, so the SD-1.5-arch UNet at a quarter of the widths has SD-1.5's full module tree.
Prints the full fingerprint (a cold read), the per-step read of an unchanged UNet and of one
just changed (FreeU toggled), the UNet's step time (batch 2 as with CFG), all medians measured
interleaved after a warm-up, and the per-step read's share of one step.

    python tools/bench_fingerprint.py [--repeats 20] [--threads 2]
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


def _timings(unet: torch.nn.Module, cache, step, x: torch.Tensor,
             repeats: int) -> dict[str, list[float]]:
    """Seconds of a full fingerprint, a per-step state read, a read after FreeU was toggled,
    and a UNet step (five: a step costs seconds on CPU), interleaved after a warm-up."""
    freeu = [True]

    def toggle_and_read() -> None:
        unet.enable_freeu(0.9, 0.2, 1.4, 1.6) if freeu[0] else unet.disable_freeu()
        freeu[0] = not freeu[0]
        cache.state(unet, x)

    step(), fxprop.fingerprint(unet), cache.state(unet, x)  # warm-up
    found: dict[str, list[float]] = {"full": [], "read": [], "changed": [], "step": []}
    for _ in range(repeats):
        found["full"].append(_seconds(lambda: fxprop.fingerprint(unet)))
        found["read"].append(_seconds(lambda: cache.state(unet, x)))
        found["changed"].append(_seconds(toggle_and_read))
        if len(found["step"]) < 5:
            found["step"].append(_seconds(step))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workload = WORKLOADS["sd15"]
    unet = workload.make_unet()
    acc = fxprop.accelerate(unet, key_steps=1)  # intercepted, as in use: the hook is read
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, workload.size, workload.size, generator=g)
    text = torch.randn(2, workload.tokens, unet.config.cross_attention_dim, generator=g)

    def step() -> None:
        with torch.no_grad():
            unet(x, 999, encoder_hidden_states=text)

    found = _timings(unet, acc._intercept.captures, step, x, args.repeats)
    fp, read, toggled, st = (statistics.median(found[k])
                             for k in ("full", "read", "changed", "step"))
    modules = sum(1 for _ in unet.modules())
    print(f"{workload.name}: {modules} modules, {len(list(unet.parameters()))} parameters, "
          f"{args.threads} threads")
    print(f"full fingerprint  {fp * 1e3:8.2f} ms (median of {args.repeats}; a cold read)")
    print(f"per-step read     {read * 1e3:8.2f} ms (unchanged UNet; fingerprint + modes)")
    print(f"after a change    {toggled * 1e3:8.2f} ms (FreeU toggled, then read)")
    print(f"UNet step         {st * 1e3:8.2f} ms (median of {len(found['step'])}, batch 2, "
          f"{workload.size}x{workload.size} latent)")
    print(f"per-step read     {read / st:8.2%}  of a UNet step (read at every planned call)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
