"""How a ComfyUI calibration's schedule fares on noise it was not verified on (not a test).

    HF_HUB_OFFLINE=1 python tools/comfy_calibration_seeds.py --target 2.5

Calibrates the ComfyUI digits twin of ``tools/bench_comfyui.py`` as its calibrated rows do
(``calibrate_comfy``, euler 50 steps, CFG 1.5, two runs of the ten digits at seeds 1000-1001)
and prints, per seed, the relative error of the final latent against plain KSampler for the
calibrated schedule and for fxprop's deep node every 3rd and every 4th step (linear forecast):
first the two held-out seeds verification judged on, then ``--seeds`` others.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools")]

import bench_comfyui as bench  # noqa: E402  (puts the repository and tests on sys.path)
from fxprop.clients.comfyui.calibrate import (ComfySampling, calibrate_comfy,  # noqa: E402
                                               other_seed)
from fxprop.clients.comfyui.calibrated import CalibratedRunner  # noqa: E402
from fxprop.clients.comfyui.patch import patch_model  # noqa: E402
from fxprop.clients.comfyui.runner import ComfyRunner  # noqa: E402
from fxprop.plan.policies import make_policy  # noqa: E402

CALIBRATION_SEEDS = [1000, 1001]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=float, default=2.5, help="FLOP-ideal target")
    p.add_argument("--seeds", type=int, nargs="+", default=[5, 6, 7, 8])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    comfy = bench.load_comfy()
    import comfy.sample
    model, embedding = bench.load(comfy, 500, bench.CACHE)
    labels = torch.arange(10)
    with torch.no_grad():
        positive = [[embedding(labels).unsqueeze(1), {}]]
        negative = [[embedding(torch.full_like(labels, bench.NULL)).unsqueeze(1), {}]]
    latent = torch.zeros(10, 1, 16, 16)
    sampling = ComfySampling(positive, negative, {"samples": latent}, 50, 1.5, "euler", "normal")
    calibration = calibrate_comfy(model, sampling, CALIBRATION_SEEDS,
                                  target_speedup=args.target, progress=False)
    print(calibration)
    rows = {"calibrated": patch_model(model, CalibratedRunner(calibration))}
    for n in (3, 4):
        policy = make_policy("deep", key_steps=n, forecast=1, prior_noise=0.0)
        rows[f"deep N={n} f1"] = patch_model(model, ComfyRunner(policy))

    def run(patched, seed):
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(patched, noise, 50, 1.5, "euler", "normal", positive,
                                   negative, latent, seed=seed, disable_pbar=True).double()

    print(f"{'seed':<22}" + "".join(f"{name:>16}" for name in rows))
    held_out = [other_seed(s) for s in CALIBRATION_SEEDS]
    for seed in held_out + args.seeds:
        plain = run(model, seed)
        errors = [float((run(m, seed) - plain).norm() / plain.norm()) for m in rows.values()]
        kind = "held out" if seed in held_out else "other"
        print(f"{kind} {seed:<13}" + "".join(f"{e:>16.4f}" for e in errors), flush=True)


if __name__ == "__main__":
    main()
