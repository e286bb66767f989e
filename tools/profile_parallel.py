"""Plain vs sequential vs parallel encoder propagation, side by side: time, profile, memory.

    python tools/profile_parallel.py                      # tiny and SD-1.5-architecture UNets
    python tools/profile_parallel.py --models sd15 --repeats 5 --max-batch 8

Each workload is a classifier-free-guided DDIM loop (batch 2) over a UNet with random weights,
written out here rather than a pipeline so only UNet calls and the scheduler are timed. Modes
are interleaved within each repeat (the machine is shared, so timings drift) and the median is
reported. :func:`time_modes` is the entry point for ``tools/bench.py``.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import statistics
import time
from collections import defaultdict
from typing import Any

import sys
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch.profiler import ProfilerActivity, profile

import fxprop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import WORKLOADS  # noqa: E402

MODES = ("plain", "sequential", "parallel")


# -- workloads ---------------------------------------------------------------------------------

def sample(model: Any, latents: torch.Tensor, embeds: torch.Tensor, steps: int,
           guidance: float = 7.5) -> torch.Tensor:
    """A CFG DDIM loop: the UNet sees batch 2 * len(latents)."""
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    scheduler.set_timesteps(steps)
    if isinstance(model, fxprop.AcceleratedUNet):
        model.set_timesteps(scheduler.timesteps, scheduler.config.num_train_timesteps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            pred = model(torch.cat([latents] * 2), t, encoder_hidden_states=embeds).sample
            uncond, text = pred.chunk(2)
            latents = scheduler.step(uncond + guidance * (text - uncond), t, latents).prev_sample
    return latents


def inputs(unet: UNet2DConditionModel, size: int, tokens: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, unet.config.in_channels, size, size, generator=g)
    embeds = torch.randn(2, tokens, unet.config.cross_attention_dim, generator=g)
    return latents, embeds


def models(unet: UNet2DConditionModel, modes: tuple[str, ...], key_steps: Any,
           max_batch: int | None) -> dict[str, Any]:
    """The model of each mode; sequential and parallel share one runtime's captured graphs."""
    runtime = fxprop.accelerate(unet, key_steps=key_steps, prior_noise=0)
    parallel = runtime.with_policy(fxprop.EncoderPropagation(
        key_steps=key_steps, prior_noise=0, parallel=True, max_batch=max_batch))
    return {m: {"plain": unet, "sequential": runtime, "parallel": parallel}[m] for m in modes}


# -- timing ------------------------------------------------------------------------------------

def time_modes(unet: UNet2DConditionModel, *, size: int, tokens: int, steps: int = 50,
               key_steps: Any = "faster-diffusion", max_batch: int | None = None,
               repeats: int = 5, modes: tuple[str, ...] = MODES) -> dict[str, dict]:
    """Seconds per generation of each mode: ``{mode: {"median", "times", "max_diff"}}``.

    One untimed warm-up per mode captures the graphs; ``max_diff`` is the largest difference
    of the final latents from sequential mode's (parallel must equal it), else the first's.
    """
    latents, embeds = inputs(unet, size, tokens)
    by_mode = models(unet, modes, key_steps, max_batch)
    results = {m: sample(model, latents, embeds, steps) for m, model in by_mode.items()}
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        for mode, model in by_mode.items():
            start = time.perf_counter()
            sample(model, latents, embeds, steps)
            times[mode].append(time.perf_counter() - start)
    first = results.get("sequential", results[modes[0]])
    return {m: {"median": statistics.median(times[m]), "times": times[m],
                "max_diff": (results[m] - first).abs().max().item()} for m in modes}


def profile_modes(unet: UNet2DConditionModel, *, size: int, tokens: int, steps: int = 50,
                  key_steps: Any = "faster-diffusion", max_batch: int | None = None,
                  modes: tuple[str, ...] = ("sequential", "parallel")) -> dict[str, dict]:
    """Where one (warmed-up) generation spends its time, by fxprop's labels:
    ``{mode: {label: (calls, total seconds)}}``; "total" is the whole loop."""
    latents, embeds = inputs(unet, size, tokens)
    out = {}
    for mode, model in models(unet, modes, key_steps, max_batch).items():
        sample(model, latents, embeds, steps)
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sample(model, latents, embeds, steps)
        total = time.perf_counter() - start
        rows = {e.key: (e.count, e.cpu_time_total / 1e6) for e in prof.key_averages()
                if e.key.startswith("fxprop.")}
        out[mode] = {**rows, "total": (1, total)}
    return out


# -- memory ------------------------------------------------------------------------------------

def _peaks(prof: Any) -> tuple[int, int]:
    """(peak live bytes over the window, largest rise within one ``fxprop.step[xL]`` call),
    from the profiler's allocation events, in time order."""
    events = prof.profiler.kineto_results.events()
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    times = [t for t, _ in memory]
    live = list(itertools.accumulate(n for _, n in memory)) or [0]
    chunk = 0
    for e in events:
        if e.name().startswith("fxprop.step[x"):
            first, last = (bisect.bisect_left(times, e.start_ns()),
                           bisect.bisect_right(times, e.end_ns()))
            before = live[first - 1] if first else 0
            chunk = max(chunk, max(live[first:last], default=before) - before)
    return max(0, max(live)), chunk


def peak_memory(unet: UNet2DConditionModel, *, size: int, tokens: int, steps: int = 50,
                key_steps: Any = "faster-diffusion", max_batches: tuple = (None,),
                ) -> dict[str, tuple[int, int]]:
    """``{variant: (peak, chunk)}``: bytes held by torch's CPU allocator during one generation
    above what was live before it, and the most one batched chunk added (exact: from the
    profiler's allocation events, which RSS and tracemalloc do not see)."""
    latents, embeds = inputs(unet, size, tokens)
    variants = {"plain": unet, "sequential": models(unet, ("sequential",), key_steps, None)
                ["sequential"]}
    for mb in max_batches:
        variants[f"parallel max_batch={mb}"] = models(unet, ("parallel",), key_steps,
                                                      mb)["parallel"]
    peaks = {}
    for name, model in variants.items():
        sample(model, latents, embeds, steps)  # captures happen outside the window
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            sample(model, latents, embeds, steps)
        peaks[name] = _peaks(prof)
    return peaks


# -- report ------------------------------------------------------------------------------------

def _report_times(name: str, results: dict[str, dict]) -> None:
    plain = results.get("plain", {}).get("median")
    seq = results.get("sequential", {}).get("median")
    print(f"\n## {name}: seconds per generation (median; all repeats in brackets)")
    print(f"{'mode':<12}{'median':>9}{'vs plain':>10}{'vs seq':>9}  max|diff| vs seq  times")
    for mode, r in results.items():
        ratio = lambda ref: f"{ref / r['median']:.2f}x" if ref else "-"  # noqa: E731
        times = ", ".join(f"{t:.2f}" for t in r["times"])
        print(f"{mode:<12}{r['median']:>9.3f}{ratio(plain):>10}{ratio(seq):>9}  "
              f"{r['max_diff']:.2e}          [{times}]")


def _report_profile(name: str, profiles: dict[str, dict]) -> None:
    print(f"\n## {name}: profile of one generation (torch.profiler, fxprop labels)")
    print(f"{'mode':<12}{'label':<20}{'calls':>6}{'total s':>9}{'ms/call':>9}{'ms/step':>9}")
    for mode, rows in profiles.items():
        for label, (calls, total) in sorted(rows.items()):
            steps = int(label.split("[x")[1][:-1]) if "[x" in label else 1
            print(f"{mode:<12}{label:<20}{calls:>6}{total:>9.3f}{1e3 * total / calls:>9.1f}"
                  f"{1e3 * total / calls / steps:>9.1f}")


def _report_memory(name: str, peaks: dict[str, tuple[int, int]]) -> None:
    seq = peaks["sequential"][0]
    mib = 2 ** 20
    print(f"\n## {name}: peak torch CPU memory of one generation above its start (MiB)")
    print(f"{'variant':<28}{'peak':>8}{'x seq':>7}{'chunk':>8}{'1.2 seq + chunk':>17}")
    for variant, (peak, chunk) in peaks.items():
        bound = 1.2 * seq + chunk
        verdict = "within" if peak <= bound else "ABOVE"
        print(f"{variant:<28}{peak / mib:>8.1f}{peak / seq:>7.2f}{chunk / mib:>8.1f}"
              f"{bound / mib:>11.1f} {verdict}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,sd15", help="comma list of tiny, sd15")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--key-steps", default="faster-diffusion")
    parser.add_argument("--max-batch", type=int, default=None, help="parallel mode bound")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--memory", default="", help="comma list of max_batch values to "
                        "measure peak memory for ('none' for unbounded)")
    args = parser.parse_args(argv)
    if args.key_steps.replace(",", "").isdigit():  # "3" (interval) or "0,2,3" (list)
        steps = [int(s) for s in args.key_steps.split(",")]
        args.key_steps = steps if "," in args.key_steps else steps[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} DDIM "
          f"steps, CFG batch 2, key steps {args.key_steps!r}, max_batch {args.max_batch}")
    for key in args.models.split(","):
        w = WORKLOADS[key]
        unet = w.make_unet()
        common = dict(size=w.size, tokens=w.tokens, steps=args.steps, key_steps=args.key_steps)
        _report_times(w.name, time_modes(unet, **common, max_batch=args.max_batch,
                                         repeats=args.repeats))
        if not args.no_profile:
            _report_profile(w.name, profile_modes(unet, **common, max_batch=args.max_batch))
        if args.memory:
            bounds = tuple(None if b == "none" else int(b) for b in args.memory.split(","))
            _report_memory(w.name, peak_memory(unet, **common, max_batches=bounds))


if __name__ == "__main__":
    main()
