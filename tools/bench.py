"""Benchmark fxprop against plain sampling and the DeepCache package, side by side (not a test).

    python tools/bench.py                                  # SD-1.5-architecture UNet x0.25
    python tools/bench.py --model tiny --modes plain encoder parallel
    python tools/bench.py --compile                        # compiled plain vs compiled fxprop
    python tools/bench.py --modes deep-3 deep-3-f1 deep-5 deep-5-f1 encoder encoder-f1
    python tools/bench.py --quality                        # policy sweep on the shipped model

A StableDiffusionPipeline around a UNet with random weights (``--model sd15``: diffusers' SD-1.5
UNet config with every block width scaled by ``--scale``; ``tiny``: the tests' UNet) samples a
latent with classifier-free guidance (UNet batch 2) for 50 DDIM steps. Every mode is warmed up
once (capture, compile), then the modes run interleaved, ``--repeats`` rounds, and the median is
reported with: the speedup over plain; the FLOP-ideal speedup, plain FLOPs / the mode's FLOPs of
one whole generation (``torch.utils.flop_counter``); their ratio, the efficiency; the time ratio
to the reference DeepCache package at equal settings (for a forecasting mode ``*-f1``: to the
reuse mode of the same key steps, so it is the forecast's cost); the max abs difference of the
final latent from plain's (and, for ``deepcache-N`` and ``*-f1``, from the mode named in "vs").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import fxprop  # noqa: E402
from common import flops, timed_rounds  # noqa: E402
from workloads import WORKLOADS, generation, pipeline, sd15_unet  # noqa: E402


@dataclass(frozen=True)
class Mode:
    """``options`` for fxprop.accelerate (None: plain), or a DeepCache (interval, branch)."""

    options: dict | None = None
    deepcache: tuple[int, int] | None = None
    compile: bool = False
    compare_to: str = "plain"


MODES: dict[str, Mode] = {
    "plain": Mode(),
    "every-key": Mode(dict(key_steps=1, prior_noise=0)),
    "encoder": Mode(dict(key_steps="faster-diffusion")),
    "parallel": Mode(dict(key_steps="faster-diffusion", parallel=True), compare_to="encoder"),
    "deep-3": Mode(dict(reuse="deep", key_steps=3, branch=0)),
    "deep-5": Mode(dict(reuse="deep", key_steps=5, branch=0)),
    "deepcache-3": Mode(deepcache=(3, 0), compare_to="deep-3"),
    "deepcache-5": Mode(deepcache=(5, 0), compare_to="deep-5"),
    # forecasting: same key steps and FLOPs as the reuse mode it is compared to
    "encoder-f1": Mode(dict(key_steps="faster-diffusion", forecast=1), compare_to="encoder"),
    "deep-3-f1": Mode(dict(reuse="deep", key_steps=3, branch=0, forecast=1),
                      compare_to="deep-3"),
    "deep-5-f1": Mode(dict(reuse="deep", key_steps=5, branch=0, forecast=1),
                      compare_to="deep-5"),
}
COMPILED_MODES: dict[str, Mode] = {
    "plain": Mode(compile=True),
    "encoder": Mode(dict(key_steps="faster-diffusion"), compile=True),
    "deep-3": Mode(dict(reuse="deep", key_steps=3, branch=0), compile=True),
}


@dataclass
class Candidate:
    """One mode's pipeline: ``run`` between ``enter`` and ``exit`` (DeepCache wraps modules)."""

    run: Callable[[], torch.Tensor]
    enter: Callable[[], None] = lambda: None
    exit: Callable[[], None] = lambda: None
    first: float = 0.0
    output: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        self.enter()
        try:
            return self.run()
        finally:
            self.exit()


def candidate(unet: torch.nn.Module, workload: Any, mode: Mode, steps: int,
              inductor: dict | None = None) -> Candidate:
    pipe = pipeline(unet)
    if mode.compile and mode.options is None:
        pipe.unet = torch.compile(unet, fullgraph=True, options=inductor)
    if mode.options is not None:
        compile = {"options": inductor} if mode.compile else False
        fxprop.accelerate(pipe, **mode.options, compile=compile)
    run = generation(pipe, workload, steps)
    if mode.deepcache is None:
        return Candidate(run)
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=mode.deepcache[0], cache_branch_id=mode.deepcache[1])
    return Candidate(run, helper.enable, helper.disable)


def warm_up(candidates: dict[str, Candidate]) -> None:
    """Run every candidate once (timed: it captures and compiles) and keep its output."""
    for c in candidates.values():
        start = time.perf_counter()
        c.output = c()
        c.first = time.perf_counter() - start


def report(candidates: dict[str, Candidate], seconds: dict[str, float], modes: dict[str, Mode],
           ideal: dict[str, float], compiled: bool) -> None:
    """One line per mode: its median time (``seconds``), speedups and difference."""
    plain = seconds["plain"]
    head = f"{'mode':<13}{'median s':>9}{'speedup':>9}{'FLOP-ideal':>11}{'effic.':>8}"
    head += f"{'first s':>9}" if compiled else f"{'vs ref':>8}"
    print(head + f"{'max|diff|':>11}  vs")
    for name, c in candidates.items():
        median, mode = seconds[name], modes[name]
        line = f"{name:<13}{median:>9.3f}{plain / median:>9.2f}{ideal[name]:>11.2f}"
        line += f"{plain / median / ideal[name]:>8.2f}"
        if compiled:
            line += f"{c.first:>9.1f}"
        else:
            ref = (mode.compare_to if name.endswith("-f1")  # forecast: time vs its reuse mode
                   else f"deepcache-{name.split('-')[1]}" if name.startswith("deep-") else None)
            ratio = median / seconds[ref] if ref in seconds else None
            line += f"{ratio:>8.2f}" if ratio else f"{'':>8}"
        other = candidates.get(mode.compare_to, candidates["plain"])
        diff = (c.output - other.output).abs().max().item()
        print(line + f"{diff:>11.2e}  {mode.compare_to}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(WORKLOADS), default="sd15")
    parser.add_argument("--scale", type=float, default=0.25, help="SD-1.5 width scale")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=None, help=f"of {list(MODES)}")
    parser.add_argument("--compile", action="store_true", help="compiled modes (inductor)")
    parser.add_argument("--freeze", action="store_true", help="with --compile: inductor's "
                        "freezing (weights as constants, prepacked; the usual CPU inference setting)")
    parser.add_argument("--quality", action="store_true", help="run tools/bench_quality.py")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args, rest = parser.parse_known_args(argv)
    if args.quality:
        import bench_quality

        return bench_quality.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {rest}")
    torch.set_num_threads(args.threads)
    modes = COMPILED_MODES if args.compile else MODES
    names = ["plain"] + [m for m in (args.modes or modes) if m != "plain"]
    unknown = [m for m in names if m not in modes]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(modes)}")
    workload = WORKLOADS[args.model]
    unet = sd15_unet(args.scale) if args.model == "sd15" else workload.make_unet()
    print(f"{workload.name} (scale {args.scale if args.model == 'sd15' else '-'}): "
          f"{sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M params, {args.steps} DDIM "
          f"steps, {workload.size}x{workload.size} latent, CFG batch 2, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}"
          + (", compiled with inductor" if args.compile else "")
          + (" (freezing)" if args.freeze else ""))
    inductor = {"freezing": True} if args.freeze else None
    candidates = {n: candidate(unet, workload, modes[n], args.steps, inductor) for n in names}
    warm_up(candidates)
    eager = candidates
    if args.compile:  # count the FLOPs of the same modes run eagerly
        eager = {n: candidate(unet, workload, MODES[n], args.steps) for n in names}
        warm_up(eager)
    counts = {n: flops(c) for n, c in eager.items()}
    ideal = {n: counts["plain"] / counts[n] for n in names}
    seconds = timed_rounds(candidates, args.repeats)   # interleaved: drifts hit all alike
    report(candidates, seconds, {n: modes[n] for n in names}, ideal, args.compile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
