"""Parallel mode on one process vs over torch.distributed ranks, and the speedup model (not a test).

    python tools/bench_distributed.py                  # SD-1.5-arch UNet x0.25, 2 gloo ranks
    python tools/bench_distributed.py --steps 20 --key-steps 5 --repeats 3

Spawns two ranks (gloo over loopback) of a StableDiffusionPipeline around the SD-1.5-arch UNet
with random weights (CFG, UNet batch 2, DDIM). Rank 0 times, interleaved after a warm-up that
does the captures: plain sampling and fxprop's parallel mode in one process with 2 threads
(rank 1 waits in a barrier), then parallel mode over both ranks with 1 thread each. It then
times the key part against broadcasting its frontier (the alternative to every rank computing
the key part), and prints the FLOP model of the speedup for N devices: per segment of ``L``
steps, the key part ``K`` plus ``ceil(L / N)`` every-step passes ``S`` on each rank, against
``K + L * S`` on one, with the bytes each rank receives from the all_gather.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import fxprop  # noqa: E402
from common import flops  # noqa: E402
from workloads import WORKLOADS, generation, pipeline, sd15_unet  # noqa: E402


def part_flops(fn: Callable, *args: Any) -> int:
    """FLOPs of ``fn(*args)`` without autograd (bench.py's counter)."""
    with torch.no_grad():
        return flops(lambda: fn(*args))


def timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _modes(unet: Any, args: argparse.Namespace) -> dict[str, Callable[[], float]]:
    """Each mode as a function that sets it up and returns one generation's time. Plain
    sampling uses a second pipeline around the same UNet (outside fxprop's scope)."""
    plain = generation(pipeline(unet), WORKLOADS["sd15"], args.steps)
    pipe = fxprop.accelerate(pipeline(unet), key_steps=args.key_steps, parallel=True)
    runtime, run = fxprop.runtime_of(pipe), generation(pipe, WORKLOADS["sd15"], args.steps)

    def mode(group: Any, threads: int, generate: Callable[[], Any] = run) -> Callable[[], float]:
        def once() -> float:
            torch.set_num_threads(threads)
            runtime.policy = fxprop.EncoderPropagation(key_steps=args.key_steps, parallel=True,
                                                       group=group)
            return timed(generate)
        return once

    return {"plain, 1 process x 2 threads": mode(None, 2, plain),
            "parallel, 1 process x 2 threads": mode(None, 2),
            "parallel, 2 ranks x 1 thread": mode(dist.group.WORLD, 1)}


def _timings(modes: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Every mode once (warm-up), then ``repeats`` interleaved rounds. A one-process mode runs
    on rank 0 while rank 1 waits in a barrier; the two-rank mode runs on both."""
    rank, times = dist.get_rank(), {name: [] for name in modes}
    for round_ in range(repeats + 1):
        for name, once in modes.items():
            dist.barrier()
            if "2 ranks" in name or rank == 0:
                took = once()
                if round_ and rank == 0:
                    times[name].append(took)
            dist.barrier()
    return times


def _unet_call(pipe: Any, args: argparse.Namespace) -> Any:
    """One UNet call of the workload's generation, flattened as fxprop captures it."""
    from fxprop.graph.capture import flatten_call

    seen = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda m, a, k: seen.append((a, k)) if not seen else None, with_kwargs=True)
    try:
        generation(pipe, WORKLOADS["sd15"], 1)()
    finally:
        handle.remove()
    return flatten_call(type(pipe.unet).forward.__get__(pipe.unet), *seen[0])


def part_costs(pipe: Any, args: argparse.Namespace) -> dict[str, Any]:
    """FLOPs of the whole UNet, its key part and one every-step pass (batch 2), the frontier
    and its bytes, and a prediction's bytes."""
    call = _unet_call(pipe, args)
    _, parts = fxprop.runtime_of(pipe).parts_for(call)
    key_args = [call.tensors[i] for i in parts.key_inputs]
    with torch.no_grad():
        frontier = list(parts.key(*key_args))
    step_args = [call.tensors[i] for i in parts.step_inputs] + frontier
    return {"full": part_flops(parts.full, *call.tensors),
            "key": part_flops(parts.key, *key_args),
            "step": part_flops(parts.step, *step_args), "frontier": frontier,
            "key_args": key_args, "key_part": parts.key,
            "frontier_bytes": sum(f.numel() * f.element_size() for f in frontier),
            "prediction_bytes": call.tensors[0].numel() * call.tensors[0].element_size()}


def key_vs_broadcast(costs: dict[str, Any], repeats: int) -> tuple[float, float]:
    """Median seconds of the key part (1 thread) and of broadcasting its frontier from rank 0
    (the slower rank's time, both ranks taking part)."""
    torch.set_num_threads(1)
    key, cast = [], []
    for _ in range(repeats):
        with torch.no_grad():
            key.append(timed(lambda: costs["key_part"](*costs["key_args"])))
        dist.barrier()
        took = torch.tensor([timed(lambda: [dist.broadcast(f, 0) for f in costs["frontier"]])])
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        cast.append(float(took))
    return statistics.median(key), statistics.median(cast)


def flop_model(costs: dict[str, Any], lengths: list[int], steps: int) -> list[tuple]:
    """Rows (N, FLOPs per rank / plain, speedup over one device, all_gather MB per rank per
    generation) for N = 1, 2, 4, 8 devices."""
    plain = steps * costs["full"]
    one = sum(costs["key"] + n * costs["step"] for n in lengths)
    rows = []
    for devices in (1, 2, 4, 8):
        per_rank = sum(costs["key"] + math.ceil(n / devices) * costs["step"] for n in lengths)
        received = sum((devices - 1) * math.ceil(n / devices) * costs["prediction_bytes"]
                       for n in lengths if n > 1)
        rows.append((devices, plain / per_rank, one / per_rank, received / 2**20))
    return rows


def report(args: argparse.Namespace, times: dict[str, list[float]], costs: dict[str, Any],
           lengths: list[int], key_cast: tuple[float, float]) -> None:
    plain = statistics.median(times["plain, 1 process x 2 threads"])
    print(f"{'mode':<34}{'median s':>10}{'speedup':>9}")
    for name, values in times.items():
        print(f"{name:<34}{statistics.median(values):>10.3f}"
              f"{plain / statistics.median(values):>9.2f}")
    key, cast = key_cast
    print(f"\nkey step's critical path: every rank computes the key part {key * 1e3:.1f} ms "
          f"(1 thread); one rank computes it and broadcasts the frontier "
          f"({costs['frontier_bytes'] / 2**20:.2f} MB, {cast * 1e3:.1f} ms): "
          f"{(key + cast) * 1e3:.1f} ms")
    print(f"\nFLOP model ({args.steps} steps, key steps {args.key_steps}: segments {lengths}; "
          f"per UNet call: key part {costs['key'] / costs['full']:.2f}, every-step part "
          f"{costs['step'] / costs['full']:.2f} of the whole UNet)")
    print(f"{'devices':>8}{'vs plain':>10}{'vs 1 device':>13}{'all_gather MB/rank':>20}")
    for devices, vs_plain, vs_one, megabytes in flop_model(costs, lengths, args.steps):
        print(f"{devices:>8}{vs_plain:>10.2f}{vs_one:>13.2f}{megabytes:>20.3f}")


def worker(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    unet = sd15_unet(args.scale)
    modes = _modes(unet, args)
    times = _timings(modes, args.repeats)
    pipe = fxprop.accelerate(pipeline(unet), key_steps=args.key_steps, parallel=True)
    costs = part_costs(pipe, args)
    key_cast = key_vs_broadcast(costs, args.repeats)
    if dist.get_rank() == 0:
        plan = fxprop.runtime_of(pipe).policy.plan(list(range(args.steps, 0, -1)), None)
        print(f"SD-1.5-arch UNet x{args.scale}, {args.steps} DDIM steps, CFG batch 2, "
              f"32x32 latent, torch {torch.__version__}, gloo, median of {args.repeats} "
              "interleaved rounds after a warm-up")
        report(args, times, costs, [len(s) for s in plan.segments], key_cast)
    dist.destroy_process_group()


def launch(argv: list[str]) -> int:
    """Run this script on two gloo ranks over loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, *argv], env={**env, "RANK": str(r)})
             for r in range(2)]
    return max(p.wait() for p in procs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=0.25, help="SD-1.5 width scale")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--key-steps", type=int, default=5, help="every N-th step is a key step")
    parser.add_argument("--repeats", type=int, default=3)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        return launch(argv)
    worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
