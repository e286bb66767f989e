"""The Calibrate node's choice against every hand-set DeepCache node setting, on the ComfyUI
digits twin, with paired intervals (#30; not a test).

    HF_HUB_OFFLINE=1 python tools/comfy_calibration_paired.py            # 1.5x .. 6x
    HF_HUB_OFFLINE=1 python tools/comfy_calibration_paired.py --targets 2.5 3 --seeds 3

The twin of ``tools/bench_comfyui.py`` (trained there first if missing), ComfyUI's KSampler
(euler, 50 steps, CFG 1.5) over the ten digits. Per FLOP-ideal target, ``calibrate_comfy``
calibrates as the Calibrate node does (2 runs at seeds 1000-1001, ``held_out`` 4, ``verify``
4). Every hand-set setting of fxprop's DeepCache node (every N-th step, branch 0, forecast 0
as DeepCache and 1 as the node's default, N = 2 .. ``--max-interval``) and every calibrated
schedule then run on ``--seeds`` runs of the ten digits no calibration saw (seeds 1, 2 ...),
scored per sample by the relative error of its final latent against plain KSampler (in dB:
``-20 log10``). FLOP-ideal: plain's FLOPs over the run's (``FlopCounterMode``). Per target it
prints the calibrated schedule against the best hand-set setting at or below its FLOPs, with
the paired gain and its 95% bootstrap interval, and the verdict (above, tie, BELOW).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools")]

import bench_comfyui as bench  # noqa: E402  (puts the repository and tests on sys.path)
from common import flops, verdict  # noqa: E402
from fxprop.calibration.choice import row_errors  # noqa: E402
from fxprop.calibration.significance import mean_db, paired_gain  # noqa: E402
from fxprop.clients.comfyui.calibrate import ComfySampling, calibrate_comfy  # noqa: E402
from fxprop.clients.comfyui.calibrated import CalibratedRunner  # noqa: E402
from fxprop.clients.comfyui.calibration_nodes import HELD_OUT  # noqa: E402
from fxprop.clients.comfyui.patch import patch_model  # noqa: E402
from fxprop.clients.comfyui.runner import ComfyRunner  # noqa: E402
from fxprop.plan.policies import make_policy  # noqa: E402

CALIBRATION_SEEDS = [1000, 1001]
STEPS = 50


def _sampling(embedding: torch.nn.Embedding) -> ComfySampling:
    labels = torch.arange(10)
    with torch.no_grad():
        positive = [[embedding(labels).unsqueeze(1), {}]]
        negative = [[embedding(torch.full_like(labels, bench.NULL)).unsqueeze(1), {}]]
    return ComfySampling(positive, negative, {"samples": torch.zeros(10, 1, 16, 16)}, STEPS,
                         1.5, "euler", "normal")


def _runner(comfy, sampling: ComfySampling):
    """``run(model, seed)``: the final latent of one KSampler run of the ten digits."""
    import comfy.sample

    def run(model, seed: int) -> torch.Tensor:
        latent = sampling.latent["samples"]
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(model, noise, STEPS, sampling.cfg, sampling.sampler_name,
                                   sampling.scheduler, sampling.positive, sampling.negative,
                                   latent, seed=seed, disable_pbar=True).double()
    return run


def _rows(model, sampling, args) -> dict:
    """name -> patched model: every hand-set setting, and the calibrated schedule per
    target (its calibration printed)."""
    rows = {}
    for order in (0, 1):
        for n in range(2, args.max_interval + 1):
            policy = make_policy("deep", key_steps=n, forecast=order, prior_noise=0.0)
            rows[f"every {n} f{order}"] = patch_model(model, ComfyRunner(policy))
    for target in args.targets:
        start = time.perf_counter()
        try:
            calibration = calibrate_comfy(model, sampling, CALIBRATION_SEEDS,
                                          target_speedup=target, held_out=HELD_OUT,
                                          progress=False)
        except ValueError as err:
            print(f"{target:g}x: {err}")
            continue
        print(f"calibrated for {target:g}x in {time.perf_counter() - start:.0f} s:\n"
              f"{calibration}", flush=True)
        rows[f"calibrated {target:g}x"] = patch_model(model, CalibratedRunner(calibration))
    return rows


def _report(errors: dict, speed: dict, targets: list[float]) -> None:
    print(f"\n{'policy':<18}{'FLOP-ideal':>11}{'dB':>8}")
    for name in errors:
        print(f"{name:<18}{speed[name]:>11.2f}{-mean_db(errors[name]):>8.2f}")
    print()
    for target in targets:
        name = f"calibrated {target:g}x"
        if name not in errors:
            continue
        fit = [h for h in errors if h.startswith("every") and speed[h] >= speed[name] * 0.999]
        if not fit:
            print(f"{name}: no hand-set setting at or below its FLOPs")
            continue
        best = min(fit, key=lambda h: mean_db(errors[h]))
        gain = paired_gain(errors[name], errors[best])
        print(f"{name:<16} {speed[name]:.2f}x {-mean_db(errors[name]):6.2f} dB  vs {best:<12} "
              f"{speed[best]:.2f}x {-mean_db(errors[best]):6.2f} dB: {gain.mean:+.2f} dB "
              f"[{gain.low:+.2f}, {gain.high:+.2f}] {verdict(gain)}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0, 2.5, 3.0, 4.0, 6.0])
    p.add_argument("--seeds", type=int, default=5, help="held-out runs of ten digits")
    p.add_argument("--max-interval", type=int, default=25, help="longest hand-set interval")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    comfy = bench.load_comfy()
    model, embedding = bench.load(comfy, 500, bench.CACHE)
    sampling = _sampling(embedding)
    run = _runner(comfy, sampling)
    rows = _rows(model, sampling, args)
    plain_flops = flops(lambda: run(model, 0))
    speed = {name: plain_flops / flops(lambda: run(m, 0)) for name, m in rows.items()}
    floor = min(args.targets) * (1 - 1e-9)   # slower hand-set settings compare with none
    rows = {name: m for name, m in rows.items()
            if not name.startswith("every") or speed[name] >= floor}
    errors = {name: [] for name in rows}
    for seed in range(1, args.seeds + 1):
        plain = run(model, seed)
        for name, patched in rows.items():
            errors[name] += row_errors(run(patched, seed), plain)
        print(f"seed {seed}: {len(errors[name])} samples", flush=True)
    _report(errors, speed, args.targets)


if __name__ == "__main__":
    main()
