"""Deep caching on any UNet: branches found from the graph's structure.

The LDM ``UNetModel`` (the real one, pip's stable-diffusion-sdkit) is checked against an
independent eager oracle (forward hooks, none of fxprop's code); diffusers UNets keep
DeepCache's ids; user-written, lucidrains' and video UNets cut, compose and reuse; a UNet
without a shallow branch says why.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxprop.graph.capture
from conftest import ddpm_pipeline, fast_params, sd_unet, sdxl_unet
from fxprop.graph.capture import flatten_call
from fxprop.graph.deep import branch_target, deep_cut, find_branches, valid_branches
from fxprop.graph.regions import module_path, resolve_layout
from fxprop.graph.split import check_split, split
from real_unets import zero_init_layers
from test_models import (LDM_SD1, LUCID, MODELS, TIMESTEPS, Model, accelerate, check_model,
                         generate, sparse_generation, unet_of)

LDM = {"sd1": LDM_SD1, "sdxl": next(name for name in MODELS if "SDXL-shaped" in name)}


def assert_steps_close(actual: list, expected: list, atol: float = 1e-5) -> None:
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, atol=atol, rtol=0, msg=lambda m: f"step {step}: {m}")


def assert_steps_differ(actual: list, expected: list, more_than: float = 1e-4) -> None:
    worst = max((a - e).abs().max().item() for a, e in zip(actual, expected))
    assert worst > more_than, f"reuse changed nothing ({worst:.2g}): random weights must matter"


@torch.no_grad()  # the grad mode is part of a capture's state: the generations run without
def captured_of(model: Model, unet: nn.Module):
    """The captured graph of ``model``'s call, taken from the UNet's capture cache: the runtimes
    the tests make next (``check_model``, ``sparse_generation``) reuse it, one capture a UNet."""
    x, args, kwargs = model.call()
    call = flatten_call(unet.forward, (x, TIMESTEPS[0], *args), kwargs)
    return accelerate(unet, model.regions, key_steps=1).parts_for(call)[0], call


# -- LDM against an eager oracle -------------------------------------------------------------

class DeepCacheOracle:
    """Eager deep caching of LDM's ``UNetModel`` with hooks: branch ``b`` is the hidden state
    that ``forward`` concatenates with a skip in front of ``output_blocks[-1 - b]``. At key
    steps the output of the block before it is kept; at other steps a pre-hook puts it back in
    place of the hidden state's channels of the concatenation (the deep part still runs here,
    but what it feeds is replaced)."""

    def __init__(self, unet: nn.Module, branch: int, keys: list[int]) -> None:
        blocks = unet.output_blocks
        index = len(blocks) - 1 - branch
        before = blocks[index - 1] if index else unet.middle_block
        self.keys, self.step, self.kept, self.latest = set(keys), -1, None, None
        self.handles = [unet.register_forward_pre_hook(self._count),
                        before.register_forward_hook(self._record),
                        blocks[index].register_forward_pre_hook(self._replace)]

    def _count(self, module, args):
        self.step += 1

    def _record(self, module, args, output):
        self.latest = output

    def _replace(self, module, args):
        merged, *rest = args
        if self.step in self.keys:
            self.kept = self.latest.clone()
            return None
        return (torch.cat([self.kept, merged[:, self.kept.shape[1]:]], dim=1), *rest)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def oracle_generation(model: Model, unet: nn.Module, branch: int, keys: list[int]) -> list:
    oracle = DeepCacheOracle(unet, branch, keys)
    try:
        return generate(model, unet)
    finally:
        oracle.remove()


@pytest.mark.parametrize("kind", list(LDM))
def test_ldm_random_weights_matter(kind):
    unet = unet_of(MODELS[LDM[kind]])
    for layer in zero_init_layers(unet):  # LDM would zero these: an untrained UNet outputs ~0
        assert layer.weight.abs().max() > 1e-3, layer


@pytest.mark.parametrize("keys", [[0, 2], [0]])
@pytest.mark.parametrize("kind,branch", [  # the SDXL-shaped LDM (~11 s to capture): CI only
    ("sd1", 0), ("sd1", 2), ("sd1", 5),
    *[pytest.param("sdxl", b, marks=pytest.mark.slow) for b in (0, 4, 8)]])
def test_ldm_equals_the_hook_oracle(kind, branch, keys):
    model = MODELS[LDM[kind]]
    unet = unet_of(model)
    expected = oracle_generation(model, unet, branch, keys)
    sparse = sparse_generation(model, unet, keys, reuse="deep", branch=branch)
    assert_steps_close(sparse, expected)
    assert_steps_differ(sparse, generate(model, unet))


@pytest.mark.parametrize("kind", fast_params(LDM, ("sd1",)))  # the SDXL-shaped one: CI only
def test_ldm_every_step_key_equals_plain(kind):
    model = MODELS[LDM[kind]]
    unet = unet_of(model)
    for branch in (0, 3):
        accelerated = accelerate(unet, key_steps=1, reuse="deep", branch=branch)
        assert_steps_close(generate(model, accelerated), generate(model, unet))


def test_ldm_step_part_runs_only_the_shallow_branch():
    model = MODELS[LDM["sd1"]]
    unet = unet_of(model)
    captured, call = captured_of(model, unet)
    layout, blocks = resolve_layout(unet), len(unet.output_blocks)
    assert [b.id for b in find_branches(captured, layout)] == list(range(blocks))
    for branch in range(blocks):
        parts = split(captured, deep_cut(captured, layout, branch))
        assert check_split(parts, captured, call.tensors) <= 1e-5
        tops = {".".join(module_path(n).split(".")[:2]) for n in parts.step.graph.nodes
                if n.op != "placeholder"}  # (the frontier's inputs keep their producers' meta)
        runs = {i for i in range(blocks) if f"output_blocks.{i}" in tops}
        assert runs == set(range(blocks - 1 - branch, blocks)) and "middle_block" not in tops
        assert "input_blocks.0" in tops and "out.2" in tops  # conv_in and conv_out


def test_ldm_out_of_range_branch_lists_the_branches():
    model = MODELS[LDM["sd1"]]
    unet = unet_of(model)
    fxprop.graph.deep.check_branch(unet, 6)  # nothing to check without a capture
    with pytest.raises(ValueError, match=r"branch=6 is out of range for this UNet: valid "
                                         r"branches are 0-5 \(branch 0: forward, into "
                                         r"output_blocks\.5"):
        sparse_generation(model, unet, [0, 2], reuse="deep", branch=6)


# -- diffusers keeps DeepCache's ids ----------------------------------------------------------

def _diffusers(kind: str):
    g = torch.Generator().manual_seed(0)
    if kind == "unet2d":
        return ddpm_pipeline().unet, (torch.randn(2, 3, 8, 8, generator=g), 10), {}
    unet = {"sd1": sd_unet, "sd3": lambda: sd_unet(layers_per_block=2), "sdxl": sdxl_unet}[kind]()
    kwargs = {"encoder_hidden_states": torch.randn(2, 5, 32, generator=g)}
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g),
                                       "time_ids": torch.randn(2, 6, generator=g)}
    return unet, (torch.randn(2, 4, 8, 8, generator=g), 10), kwargs


@pytest.mark.parametrize("kind", ["sd1", pytest.param("sd3", marks=pytest.mark.slow), "sdxl",
                                  "unet2d"])
def test_structural_branches_have_deepcache_ids_on_diffusers(kind):
    unet, args, kwargs = _diffusers(kind)
    resnets = [len(b.resnets) for b in unet.up_blocks]
    found = fxprop.graph.deep.branches(unet, *args, **kwargs)
    assert [b.id for b in found] == valid_branches(resnets)
    for branch in found:  # each merge feeds the resnet DeepCache's id names
        k, r = branch_target(branch.id, resnets)
        assert module_path(branch.merge) == f"up_blocks.{k}"
        assert any(module_path(u).startswith(f"up_blocks.{k}.resnets.{r}.")
                   for u in branch.merge.users)


# -- other UNets ------------------------------------------------------------------------------

OTHERS = ["user-written, structural fallback", "user-written, regions=",
          LUCID + ", structural", LUCID + ", regions=",
          "UNet3DConditionModel (text-to-video)", "UNetSpatioTemporalConditionModel (SVD)"]


@pytest.mark.parametrize("name", fast_params(OTHERS, OTHERS[:4]))  # the video UNets in CI
def test_any_unet_cuts_composes_and_reuses(name):
    model = MODELS[name]
    unet = unet_of(model)
    captured, _ = captured_of(model, unet)
    ids = [b.id for b in find_branches(captured, resolve_layout(unet, model.regions))]
    plain = generate(model, unet)
    for branch in (ids[0], ids[-1]):
        check_model(model, unet, reuse="deep", branch=branch)  # split and every-key: 1e-5
        assert_steps_differ(sparse_generation(model, unet, [0], reuse="deep", branch=branch),
                            plain)


def test_regions_reach_the_lowest_resolution_merges():
    lucid = {kind: MODELS[f"{LUCID}, {kind}"]
             for kind in ("structural", "regions=")}
    found = {kind: find_branches(captured_of(m, unet_of(m))[0],
                                 resolve_layout(unet_of(m), m.regions))
             for kind, m in lucid.items()}
    # two skips per level and the init_conv skip r; without names the lowest level is deep
    assert len(found["regions="]) == 5 and len(found["structural"]) == 3
    assert ([b.merge.name for b in found["structural"]]
            == [b.merge.name for b in found["regions="]][:3])
    assert "final_res_block" in found["regions="][0].layer


@pytest.mark.slow  # ~7 s: a capture of its own
def test_score_sde_skip_blocks_have_no_shallow_branch():
    model = MODELS["UNet2DModel (score-SDE skip blocks, Fourier time)"]
    with pytest.raises(ValueError, match=r"finds no shallow branch for branch=0 \(up_blocks\.1"
                                         r"\).*score-SDE skip blocks.*of mid_block"):
        sparse_generation(model, unet_of(model), [0, 2], reuse="deep")
