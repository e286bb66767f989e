"""One rank of tests/test_distributed.py, started as torchrun starts it: a fresh interpreter
with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set (and, here, a PYTHONHASHSEED of its own),
which builds its own models.

Four ranks. The world runs SD with CFG split in halves and shares (cfg_parallel, 2 x 2); the
pairs {0, 1} and {2, 3} run segment parallelism on two pipelines each; every rank runs a group
of one; then the pairs run calls that disagree (steps, seed, shapes, prompt, FreeU on one
rank). Each rank saves, per case, its output, sequential mode's in one process if it computed
it (one rank per group does), the parts it ran and the errors it raised, and the portable
fingerprints of the UNets it built (ranks 0 and 1 also of an LDM ``UNetModel`` and a ComfyUI
model), to ``<out>/rank<r>.pt``; the test compares them.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections import Counter

import torch
import torch.distributed as dist

import fxprop
from comfy_env import comfy_path, load_comfy, tiny_patcher
from conftest import decoder_attn_unet, make_scheduler, part_calls, sd_pipeline, text_embeds
from fxprop.graph.fingerprint import portable_fingerprint
from test_pipelines import CASES

KEY_STEPS = [0, 3]   # 6 steps: two segments of 3, shared 2 + 1 between two ranks
STEPS = 6


class Case:
    """A pipeline of ``case`` accelerated in parallel mode, kept across runs (its UNet's
    captured graphs serve every group: only the policy changes)."""

    def __init__(self, case: str, pipe=None) -> None:
        factory, self.kwargs = CASES[case]
        self.pipe = fxprop.accelerate(pipe or factory(), key_steps=KEY_STEPS, parallel=True)
        self.pipe.set_progress_bar_config(disable=True)
        self.runtime = fxprop.runtime_of(self.pipe)

    def run(self, group=None, scheduler="ddim", seed=0, steps=STEPS, size=None, parallel=True,
            prompt=None, **options):
        """The latents over ``group`` (None: this process alone); ``prompt``: the seed of other
        prompt embeddings."""
        self.runtime.policy = fxprop.EncoderPropagation(key_steps=KEY_STEPS, parallel=parallel,
                                                        group=group, **options)
        self.pipe.scheduler = make_scheduler(scheduler)
        call = self.kwargs() if size is None else {**self.kwargs(), "height": size,
                                                   "width": size}
        if prompt is not None:
            call.update(text_embeds(1, seed=prompt))
        return self.pipe(**call, num_inference_steps=steps, output_type="latent",
                         generator=torch.Generator().manual_seed(seed)).images

    def compare(self, group, reference: bool, **options) -> tuple:
        """Over ``group``; in sequential mode in this process (on one rank of the group: the
        ranks' results are equal), or None; and the parts this rank ran over the group, counted.
        The reference is sequential mode, not parallel mode alone: it needs no capture at a
        batched shape, and parallel mode equals it (test_parallel.py)."""
        alone = {k: v for k, v in options.items() if k not in ("cfg_parallel", "max_batch")}
        with part_calls() as ran:
            distributed = self.run(group, **options)
        return distributed, self.run(None, parallel=False, **alone) if reference else None, ran

    def error(self, group, freeu=False, **options) -> str:
        if freeu:
            self.pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.4, b2=1.6)
        try:
            self.run(group, **options)
        except ValueError as e:
            return str(e)
        finally:
            self.pipe.disable_freeu()
        return "no error"


def main(out: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    ones = [dist.new_group([r]) for r in range(4)]
    pair, first = pairs[rank // 2], rank % 2 == 0
    clock = time.perf_counter()
    pipe = sd_pipeline(unet=decoder_attn_unet())  # a third of the capture time
    built = fingerprints(pipe.unet, rank < 2)     # as built, before anything runs
    sd = Case("sd-cfg", pipe)
    results = {"world: cfg_parallel x 2 shares": sd.compare(dist.group.WORLD, rank == 3,
                                                             cfg_parallel=True)}
    if rank < 2:   # the references on the rank of the shorter share
        results["pair: sd-cfg, euler, forecast"] = sd.compare(
            pair, rank == 1, scheduler="euler", forecast=1)
        # Heun: two UNet calls a scheduler step, each a step of the plan
        results["pair: sd-cfg, heun"] = sd.compare(pair, rank == 0, scheduler="heun")
        results["pair: controlnet, cfg_parallel"] = Case("controlnet").compare(
            pair, rank == 0, cfg_parallel=True)
    else:
        results["pair: sdxl, max_batch"] = Case("sdxl").compare(pair, rank == 3, max_batch=2)
        results["pair: img2img"] = Case("img2img").compare(pair, rank == 3)
    # max_batch=2 at batch 2: chunks of one step, so no capture at a batched shape
    results["one: group of one"] = (sd.run(ones[rank], max_batch=2), sd.run(max_batch=2),
                                    Counter())
    errors = {"steps": sd.error(pair, steps=STEPS if first else STEPS + 1),
              "seed": sd.error(pair, seed=0 if first else 1),
              "shapes": sd.error(pair, size=16 if first else 24),
              "prompt": sd.error(pair, prompt=None if first else 5),
              "freeu": sd.error(pair, freeu=not first)}
    print(f"rank {rank}: {time.perf_counter() - clock:.1f} s", flush=True)
    torch.save({"results": results, "errors": errors, "hash": hash("fxprop"),
                "fingerprints": built},
               os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def fingerprints(unet: torch.nn.Module, others: bool) -> dict[str, int]:
    """What the ranks compare of a UNet, for the diffusers UNet this rank built and (``others``)
    an LDM ``UNetModel`` and a ComfyUI model built here too."""
    found = {"diffusers": portable_fingerprint(unet)}
    if others:
        from real_unets import ldm_unet
        found["ldm"] = portable_fingerprint(ldm_unet())
        if comfy_path() is not None:
            found["comfyui"] = portable_fingerprint(tiny_patcher(load_comfy()).model
                                                    .diffusion_model)
    return found


if __name__ == "__main__":
    os.nice(5)   # four ranks on a shared machine: the test runner's other work goes first
    main(sys.argv[1])
