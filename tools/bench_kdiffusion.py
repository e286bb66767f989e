"""fxprop inside k-diffusion samplers: per sampler, the every-key error and the sparse speed-up.

For every fixed-grid sampler of ``k_diffusion.sampling`` (loaded as tests/test_kdiffusion.py
does) on a ``CompVisDenoiser``-wrapped UNet of tools/workloads.py: the max |difference| of an
every-key-step generation from plain (should be ~1e-6), how many UNet calls a generation
makes, and the time of sparse key steps over every key step (after a warm-up, interleaved
repeats, median). Run: ``python tools/bench_kdiffusion.py [--workload sd15] [--reuse encoder]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

import fxprop  # noqa: E402
from test_kdiffusion import EXTERNAL, K, SAMPLERS, CompVisModel, sample  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="sd15")
    parser.add_argument("--reuse", choices=["encoder", "deep"], default="encoder")
    parser.add_argument("--steps", type=int, default=10, help="sigma grid steps (karras)")
    parser.add_argument("--key-steps", type=int, default=3, help="sparse: every N-th step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = WORKLOADS[args.workload]
    unet = work.make_unet()
    plain = EXTERNAL.CompVisDenoiser(CompVisModel(unet))
    acc = fxprop.accelerate(unet, reuse=args.reuse, key_steps=1, prior_noise=0.0)
    wrapped = EXTERNAL.CompVisDenoiser(CompVisModel(acc))
    sigmas = K.get_sigmas_karras(args.steps, plain.sigma_min.item(), plain.sigma_max.item())
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 4, work.size, work.size, generator=g) * sigmas[0],
              torch.randn(1, work.tokens, unet.config.cross_attention_dim, generator=g))
    calls = []
    unet.register_forward_pre_hook(lambda *_: calls.append(1))

    def accelerated(name: str, key_steps: int) -> tuple[torch.Tensor, float]:
        acc.policy = dataclasses.replace(acc.policy, key_steps=key_steps)
        acc.set_sigmas(sigmas, wrapped)
        start = time.perf_counter()
        out = sample(name, wrapped, sigmas, inputs)
        return out, time.perf_counter() - start

    print(f"{work.name}, reuse={args.reuse}, {args.steps} karras sigmas, sparse key steps "
          f"every {args.key_steps}, {args.threads} threads, median of {args.repeats}")
    print("| sampler | UNet calls | every-key max diff | all-key s | sparse s | sparse/all |")
    print("|---|---|---|---|---|---|")
    for name in SAMPLERS:
        calls.clear()
        reference = sample(name, plain, sigmas, inputs)
        n_calls = len(calls)
        every, _ = accelerated(name, 1)  # also the warm-up of both
        accelerated(name, args.key_steps)
        diff = (every - reference).abs().max().item()
        full, sparse = [], []
        for _ in range(args.repeats):
            full.append(accelerated(name, 1)[1])
            sparse.append(accelerated(name, args.key_steps)[1])
        a, b = statistics.median(full), statistics.median(sparse)
        print(f"| {name} | {n_calls} | {diff:.1e} | {a:.3f} | {b:.3f} | {b / a:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
