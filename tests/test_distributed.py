"""Segment and CFG parallelism over torch.distributed (gloo, CPU): equal to one process.

Four ranks are started once as torchrun starts them (tests/distributed_worker.py: separate
interpreters with their own hash seeds, each building its own models) for the equality and
mismatch cases; the rules that need no second process run here, with a gloo group of one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from diffusers.configuration_utils import FrozenDict

import fxprop
from comfy_env import comfy_path
from conftest import decoder_attn_unet, loop_inputs, run_loop
from fxprop.graph.fingerprint import portable_fingerprint
from fxprop.runtime.distributed import Ranks, own_steps, shares

TOLERANCE = 1e-4
WORKER = Path(__file__).with_name("distributed_worker.py")


# -- shares of a chunk -------------------------------------------------------------------------

def test_shares_are_contiguous_balanced_and_cover_the_steps():
    for length in range(0, 9):
        for n in range(1, 5):
            parts = shares(range(3, 3 + length), n)
            assert [s for part in parts for s in part] == list(range(3, 3 + length))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            assert sorted(map(len, parts), reverse=True) == list(map(len, parts))


def test_a_rank_with_an_empty_share_computes_the_last_step():
    ranks = [Ranks(None, 4, r, 1) for r in range(4)]
    assert [own_steps(range(5, 7), r) for r in ranks] == [range(5, 6), range(6, 7),
                                                          range(6, 7), range(6, 7)]
    cfg = [Ranks(None, 4, r, 2) for r in range(4)]
    assert [(r.half, own_steps(range(0, 3), r)) for r in cfg] == [
        (0, range(0, 2)), (1, range(0, 2)), (0, range(2, 3)), (1, range(2, 3))]


# -- rules, with a group of one ----------------------------------------------------------------

@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_group_is_refused_where_it_does_not_belong(world_of_one):
    unet = decoder_attn_unet()
    with pytest.raises(ValueError, match="pass parallel=True"):
        fxprop.accelerate(unet, key_steps=[0, 2], group=world_of_one)
    with pytest.raises(ValueError, match="group is only valid with reuse='encoder'"):
        fxprop.accelerate(unet, reuse="deep", group=world_of_one)
    with pytest.raises(ValueError, match="pass group="):
        fxprop.accelerate(unet, parallel=True, cfg_parallel=True)
    with pytest.raises(ValueError, match="even group size.*got 1"):
        fxprop.accelerate(unet, parallel=True, group=world_of_one, cfg_parallel=True)
    with pytest.raises(TypeError, match="process group"):
        fxprop.accelerate(unet, parallel=True, group="WORLD")


@pytest.mark.slow  # ~9 s; the misuse errors stay in the inner loop
def test_a_group_of_one_is_no_group(world_of_one):
    unet = decoder_attn_unet()
    latents, kwargs = loop_inputs(batch=2)
    alone = fxprop.accelerate(unet, key_steps=[0, 3], parallel=True)
    expected = run_loop(alone, latents, kwargs)
    # a second runtime of the same UNet: it shares the first one's captured graphs
    grouped = fxprop.accelerate(unet, key_steps=[0, 3], parallel=True, group=world_of_one)
    assert grouped.ranks is None
    torch.testing.assert_close(run_loop(grouped, latents, kwargs), expected, rtol=0, atol=0)


# -- four ranks --------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Start 4 gloo ranks over loopback as torchrun does: separate interpreters, each with its
    RANK in its environment and building its own models, here each with its own PYTHONHASHSEED
    (torchrun leaves it to chance); their saved results."""
    out = tmp_path_factory.mktemp("ranks")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "4", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    processes = [subprocess.Popen([sys.executable, str(WORKER), str(out)],
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r),
                                       "PYTHONHASHSEED": str(r + 1)},
                                  cwd=WORKER.parent, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
                 for r in range(4)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in processes]
    finally:
        for p in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    failed = [(r, log[-3000:]) for r, (p, log) in enumerate(zip(processes, logs)) if p.returncode]
    assert not failed, f"ranks failed: {failed}"
    return [torch.load(out / f"rank{r}.pt") for r in range(4)]


def _groups(ranks: list[dict]) -> dict[str, list[int]]:
    """The ranks that ran each case (a group), from their saved results."""
    groups: dict[str, list[int]] = {}
    for r, saved in enumerate(ranks):
        for name in saved["results"]:
            groups.setdefault(name, []).append(r)
    return groups


@pytest.mark.slow
def test_every_rank_gives_the_single_process_result(ranks):
    groups = _groups(ranks)
    assert {name: len(g) for name, g in groups.items()} == {
        "world: cfg_parallel x 2 shares": 4, "pair: sd-cfg, euler, forecast": 2,
        "pair: sd-cfg, heun": 2, "pair: img2img": 2,
        "pair: sdxl, max_batch": 2, "pair: controlnet, cfg_parallel": 2, "one: group of one": 4}
    for name, group in groups.items():
        alone = [ranks[r]["results"][name][1] for r in group]
        alone = [a for a in alone if a is not None]
        assert len(alone) == (4 if name.startswith("one") else 1), name
        for r in group:
            distributed = ranks[r]["results"][name][0]
            if name.startswith("one"):  # a group of one is no group: the same code, exactly
                torch.testing.assert_close(distributed, ranks[r]["results"][name][1],
                                           rtol=0, atol=0)
                continue
            torch.testing.assert_close(distributed, alone[0], rtol=0, atol=TOLERANCE,
                                       msg=lambda m: f"rank {r}, {name}: {m}")
            # every rank applies the scheduler to the same gathered predictions
            torch.testing.assert_close(distributed, ranks[group[0]]["results"][name][0],
                                       rtol=0, atol=0)


@pytest.mark.slow
def test_each_rank_computes_its_share_of_each_segment(ranks):
    # key steps [0, 3]: each segment's 3 steps shared 2 + 1 (3 + 3 for the two CFG halves),
    # gathered once. 6 steps: two such segments; img2img (strength 0.7) runs 4: one segment
    # of 3, then a key step alone. max_batch=2 at batch 2: chunks of one step per rank, so a
    # segment is a chunk of 2 steps shared 1 + 1, then its last step alone on every rank.
    expected = {"world: cfg_parallel x 2 shares": ({0: 2, 1: 2, 2: 1, 3: 1}, 2),
                "pair: sd-cfg, euler, forecast": ({0: 2, 1: 1}, 2),
                "pair: img2img": ({2: 2, 3: 1}, 1),
                "pair: sdxl, max_batch": ({2: 1, 3: 1}, 2),
                "pair: controlnet, cfg_parallel": ({0: 3, 1: 3}, 2)}
    for name, (steps_of, segments) in expected.items():
        for r, steps in steps_of.items():
            ran = ranks[r]["results"][name][2]
            batched = {key: n for key, n in ran.items() if "[x" in key}
            assert batched == {f"fxprop.step[x{steps}]": segments}, (r, name, ran)
            assert ran["fxprop.all_gather"] == segments, (r, name, ran)


@pytest.mark.slow
def test_ranks_started_apart_agree_on_equal_models(ranks):
    """Issue 32: ranks with their own hash seeds refused to run (a config's set-ordered list).
    Each rank built its models; their portable fingerprints agree model by model."""
    assert len({saved["hash"] for saved in ranks}) == 4   # the seeds did differ
    assert len({saved["fingerprints"]["diffusers"] for saved in ranks}) == 1
    others = ["ldm", "comfyui"] if comfy_path() is not None else ["ldm"]
    for model in others:
        assert ranks[0]["fingerprints"][model] == ranks[1]["fingerprints"][model], model


def test_the_portable_fingerprint_reads_sets_dicts_and_configs_in_one_order():
    """What differs between equal models built in two processes does not count: a config's
    private entries (``_use_default_values`` is a list made from a set, in hash-seed order;
    ``_name_or_path``) and the insertion order of a dict; a real difference still counts."""
    unet = decoder_attn_unet()
    before = portable_fingerprint(unet)
    config = dict(unet.config)
    reordered = {**config, "_use_default_values": config["_use_default_values"][::-1],
                 "_name_or_path": "/elsewhere"}
    unet._internal_dict = FrozenDict(reordered)
    assert portable_fingerprint(unet) == before
    unet._internal_dict = FrozenDict(dict(reversed(list(config.items()))))
    assert portable_fingerprint(unet) == before
    unet._internal_dict = FrozenDict({**config, "norm_eps": 1e-3})
    assert portable_fingerprint(unet) != before


@pytest.mark.slow
def test_ranks_that_disagree_all_raise_before_exchanging(ranks):
    for r, saved in enumerate(ranks):
        errors = saved["errors"]
        assert "disagree before their first exchange on steps (rank 0: 6, rank 1: 7)" in (
            errors["steps"]), r
        assert "first exchange on latent sum (rank 0: " in errors["seed"], r
        assert "latent size (rank 0: 512, rank 1: 1152)" in errors["shapes"], r
        assert "input shapes (they differ)" in errors["shapes"], r
        # issue 25, row 10: these ran with each rank's own inputs, mixed by the exchange
        assert "first exchange on encoder_hidden_states sum (rank 0: " in errors["prompt"], r
        assert "UNet state (processors, adapters, FreeU ...) (they differ)" in errors["freeu"], r
