"""fxprop inside k-diffusion samplers: key steps index the sigma grid, and every UNet call is
mapped to its grid step by the timestep it receives (``AcceleratedUNet.set_sigmas``).

The samplers and the model wrapper are k-diffusion's own files (``k_diffusion.sampling`` and
``k_diffusion.external``), loaded without the package ``__init__``: that imports the training
stack (torchvision, which pins another torch than the CPU build here, clean-fid, CLIP, kornia,
wandb). The one helper they use from ``k_diffusion.utils`` is given here.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import logging
import sys
import types

import pytest
import torch
from torch import nn

import fxprop
from conftest import TEXT_DIM, assert_differs, sd_unet
from real_unets import ldm_unet
from fxprop.runtime.grid import grid_step
from fxprop.runtime.gridparallel import GridChunk

pytest.importorskip("torchsde", reason="k_diffusion.sampling imports torchsde")
pytest.importorskip("torchdiffeq", reason="k_diffusion.sampling imports torchdiffeq")
if importlib.util.find_spec("k_diffusion") is None:
    pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion)",
                allow_module_level=True)


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """``k_diffusion.utils.append_dims``: trailing singleton dims up to ``target_dims``."""
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def _load_kdiffusion() -> tuple[types.ModuleType, types.ModuleType]:
    """The real ``k_diffusion.sampling`` and ``k_diffusion.external`` (see the docstring);
    nothing is left in ``sys.modules``."""
    names = ("k_diffusion", "k_diffusion.utils", "k_diffusion.sampling", "k_diffusion.external")
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(importlib.util.find_spec("k_diffusion").submodule_search_locations)
    package.utils = types.ModuleType("k_diffusion.utils")
    package.utils.append_dims = _append_dims
    sys.modules.update({"k_diffusion": package, "k_diffusion.utils": package.utils})
    try:
        return (importlib.import_module("k_diffusion.sampling"),
                importlib.import_module("k_diffusion.external"))
    finally:
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


K, EXTERNAL = _load_kdiffusion()

#: every sampler of k_diffusion.sampling with a fixed sigma grid
SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms",
            "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde"]
STEPS = 7


class CompVisModel(nn.Module):
    """What ``CompVisDenoiser`` wraps: an LDM with ``apply_model(x, t, cond)`` and SD's
    ``alphas_cumprod``; here it calls a diffusers UNet (plain or accelerated)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=cond).sample


class LDMModel(CompVisModel):
    """The same around an LDM ``UNetModel`` (A1111's ``model.model.diffusion_model``)."""

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, context=cond)


UNET = ldm_unet()  # the real LDM UNetModel (pip's stable-diffusion-sdkit), as A1111 runs it
PLAIN = EXTERNAL.CompVisDenoiser(LDMModel(UNET))
SIGMAS = K.get_sigmas_karras(STEPS, PLAIN.sigma_min.item(), PLAIN.sigma_max.item())


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 8, 8, generator=g) * SIGMAS[0],
            torch.randn(1, 5, TEXT_DIM, generator=g))


@torch.no_grad()
def sample(name: str, model_wrap: nn.Module, sigmas: torch.Tensor = SIGMAS,
           inputs: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One generation with sampler ``name`` from ``inputs`` (latent, text; default
    ``_inputs()``), its noise from a fixed seed (the global RNG for the ancestral samplers'
    default, else a seeded ``noise_sampler``: no Brownian tree). Also used by
    tools/bench_kdiffusion.py."""
    sampler = getattr(K, f"sample_{name}")
    x, cond = _inputs() if inputs is None else inputs
    torch.manual_seed(1)
    extra = {}
    if "noise_sampler" in inspect.signature(sampler).parameters:
        g = torch.Generator().manual_seed(2)
        extra["noise_sampler"] = lambda sigma, sigma_next: torch.randn(x.shape, generator=g)
    return sampler(model_wrap, x, sigmas, extra_args={"cond": cond}, disable=True, **extra)


@pytest.fixture(scope="module")
def plain() -> dict:
    """Plain outputs per sampler, computed once."""
    return {}


def plain_output(cache: dict, name: str) -> torch.Tensor:
    if name not in cache:
        cache[name] = sample(name, PLAIN)
    return cache[name]


@pytest.fixture(scope="module", params=["encoder", "deep"])
def runtime(request):
    """One accelerated UNet per reuse mode, shared by every sampler (one capture each)."""
    acc = fxprop.accelerate(UNET, reuse=request.param, key_steps=1, prior_noise=0.0)
    return acc, EXTERNAL.CompVisDenoiser(LDMModel(acc))


def run(runtime, name: str, key_steps, record: list | None = None) -> torch.Tensor:
    acc, model_wrap = runtime
    acc.policy = dataclasses.replace(acc.policy, key_steps=key_steps)
    plan = acc.set_sigmas(SIGMAS, model_wrap)
    assert len(plan) == STEPS
    if record is None:
        return sample(name, model_wrap)
    real = acc.run_planned

    def spy(gen, call, parts):
        record.append((gen.step, gen.plan.is_key[gen.step]))
        return real(gen, call, parts)

    acc.run_planned = spy
    try:
        return sample(name, model_wrap)
    finally:
        del acc.run_planned


#: the grid step of each UNet call of a 7-step generation: Heun calls again at the next sigma
#: (that step's), DPM2 and DPM++ SDE at a midpoint (the step they start from); the last step
#: (to sigma 0) is one Euler call. The ancestral DPM2 / DPM++ 2S midpoint, between sigma and
#: sigma_down = sigma_next^2 / sigma (eta = 1), is sigma_next up to rounding: that step's.
NEXT_SIGMA = [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
MIDPOINTS = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
CALL_STEPS = {"heun": NEXT_SIGMA, "dpm_2": MIDPOINTS, "dpm_2_ancestral": NEXT_SIGMA,
              "dpmpp_2s_ancestral": NEXT_SIGMA, "dpmpp_sde": MIDPOINTS}


# -- mapping a timestep to its grid step -----------------------------------------------------

def test_grid_step_maps_points_and_intervals_down_to_the_end():
    grid = (999.0, 700.0, 400.0)
    assert [grid_step(grid, 0.0, v, 1e-3) for v in (999.0, 800.0, 700.0, 699.9, 400.0, 1.0)] \
        == [0, 0, 1, 1, 2, 2]
    assert grid_step(grid, 0.0, 700.0004, 1e-3) == 1       # a rounded grid point is the point
    assert grid_step(grid, 0.0, 1000.0, 1e-3) is None      # above the grid
    assert grid_step(grid, 0.0, 0.0, 1e-3) is None         # the end is not a step
    assert grid_step(grid, 400.0, 399.0, 1e-3) is None     # no interval after the last point


def test_float16_timesteps_match_their_grid_points():
    acc, model_wrap = fxprop.accelerate(UNET, key_steps=1), PLAIN
    plan = acc.set_sigmas(SIGMAS, model_wrap)
    for i, t in enumerate(plan.timesteps):
        assert acc.next_is_key(torch.tensor([t]).half())   # every step is a key step
        assert acc.step == i and not acc.off_plan


# -- every fixed-grid sampler, both reuse modes ------------------------------------------------

@pytest.mark.parametrize("name", SAMPLERS)
def test_every_key_step_equals_plain(runtime, plain, name):
    record: list = []
    out = run(runtime, name, 1, record)
    torch.testing.assert_close(out, plain_output(plain, name), atol=1e-5, rtol=0)
    assert [step for step, _ in record] == CALL_STEPS.get(name, list(range(STEPS)))


@pytest.mark.parametrize("name", SAMPLERS)
def test_sparse_key_steps_follow_the_grid_and_differ_from_plain(runtime, plain, name):
    record: list = []
    out = run(runtime, name, [0, 3], record)   # the fallback warning is an error here
    steps = CALL_STEPS.get(name, list(range(STEPS)))
    assert record == [(s, s in (0, 3)) for s in steps]  # every call of a key step runs it all
    assert not runtime[0].off_plan
    assert torch.isfinite(out).all()
    assert_differs(out, plain_output(plain, name), 1e-4)


@pytest.mark.slow  # ~6 s: a capture of its own
def test_a_diffusers_unet_behind_compvis_follows_the_grid():
    """CompVisDenoiser -> apply_model -> a diffusers UNet (accelerated)."""
    unet = sd_unet()
    plain_wrap = EXTERNAL.CompVisDenoiser(CompVisModel(unet))
    acc = fxprop.accelerate(unet, key_steps=1, prior_noise=0.0)
    runtime, record = (acc, EXTERNAL.CompVisDenoiser(CompVisModel(acc))), []
    reference = sample("heun", plain_wrap)
    torch.testing.assert_close(run(runtime, "heun", 1), reference, atol=1e-5, rtol=0)
    assert_differs(run(runtime, "heun", [0, 3], record), reference, 1e-4)
    assert record == [(s, s in (0, 3)) for s in NEXT_SIGMA]


# -- what is refused ---------------------------------------------------------------------------

def _call(model_wrap: nn.Module, sigma: float) -> torch.Tensor:
    x, cond = _inputs()
    with torch.no_grad():
        return model_wrap(x, torch.tensor([sigma]), cond=cond)


@pytest.mark.parametrize("sigmas, why", [
    ([0, 1, 0], "goes back up"),                 # a grid step again after the next one
    ([0, 2], "step 1 never ran"),                # a skipped grid step
    ([1], "step 0 never ran"),                   # not starting at the grid's start
])
def test_calls_that_leave_the_order_run_the_whole_unet(runtime, sigmas, why):
    acc, model_wrap = runtime
    acc.policy = dataclasses.replace(acc.policy, key_steps=[0, 3])
    acc.set_sigmas(SIGMAS, model_wrap)
    with pytest.warns(UserWarning, match=why):
        outs = [_call(model_wrap, float(SIGMAS[i])) for i in sigmas]
    assert acc.off_plan
    torch.testing.assert_close(outs[-1], _call(PLAIN, float(SIGMAS[sigmas[-1]])), atol=1e-5,
                               rtol=0)


def test_a_call_above_the_grid_is_off_plan(runtime):
    acc, model_wrap = runtime
    sigmas = K.get_sigmas_karras(STEPS, PLAIN.sigma_min.item(), 2.0)
    acc.set_sigmas(sigmas, model_wrap)
    with pytest.warns(UserWarning, match="off the planned grid"):
        _call(model_wrap, 5.0)
    assert acc.off_plan


def test_sampling_again_without_set_sigmas_goes_back_up(runtime):
    acc, model_wrap = runtime
    run(runtime, "euler", [0, 3])
    with pytest.warns(UserWarning, match="goes back up"):
        out = sample("euler", model_wrap)
    torch.testing.assert_close(out, sample("euler", PLAIN), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["dpm_fast", "dpm_adaptive"])
def test_adaptive_samplers_are_refused_with_the_reason(runtime, name):
    """No fixed grid, nothing to plan: they run the whole UNet and the warning says why."""
    acc, model_wrap = runtime
    acc.reset()
    x, cond = _inputs()
    sampler = getattr(K, f"sample_{name}")
    args = (PLAIN.sigma_min.item(), PLAIN.sigma_max.item()) + ((4,) if name == "dpm_fast" else ())
    with torch.no_grad():
        with pytest.warns(UserWarning, match="adaptive-step samplers"):
            out = sampler(model_wrap, x, *args, extra_args={"cond": cond}, disable=True)
        torch.testing.assert_close(
            out, sampler(PLAIN, x, *args, extra_args={"cond": cond}, disable=True),
            atol=1e-5, rtol=0)


# -- parallel mode: a segment's decoder passes in one call --------------------------------------

@pytest.fixture(scope="module")
def parallel():
    """Sequential and parallel encoder propagation of the UNet (its captures are shared with
    the other tests'; max_batch 2: chunks of two steps, one more capture)."""
    acc = fxprop.accelerate(UNET, key_steps=[0, 3], prior_noise=0.0, forecast=1)
    return acc, EXTERNAL.CompVisDenoiser(LDMModel(acc))


#: calls served from a batch with key steps [0, 3] and chunks of two steps (1-2, 4-5; step 6
#: alone): Heun's second calls land on the next grid point and are served too, DPM2's
#: midpoints run their decoder alone
SERVED = {"euler": 4, "heun": 8, "dpm_2": 4}   # dpmpp_2m: in test_comfyui_parallel.py


@pytest.mark.parametrize("name", sorted(SERVED))
def test_parallel_equals_sequential(parallel, name, monkeypatch, caplog):
    acc, model_wrap = parallel
    acc.policy = dataclasses.replace(acc.policy, parallel=False, max_batch=None)
    acc.set_sigmas(SIGMAS, model_wrap)
    sequential = sample(name, model_wrap)
    acc.policy = dataclasses.replace(acc.policy, parallel=True, max_batch=2)
    acc.set_sigmas(SIGMAS, model_wrap)
    served, take = [], GridChunk.take
    monkeypatch.setattr(GridChunk, "take", lambda self, s: served.append(s) or take(self, s))
    with caplog.at_level(logging.INFO, logger="fxprop"):
        out = sample(name, model_wrap)
    # batched and single calls round differently (~1e-7), amplified over 7 steps
    torch.testing.assert_close(out, sequential, atol=1e-5 * sequential.abs().max().item(),
                               rtol=0)
    assert len(served) == SERVED[name] and not acc.off_plan
    notes = [r.getMessage() for r in caplog.records if "between grid points" in r.getMessage()]
    assert len(notes) == (name == "dpm_2")


def test_every_key_step_parallel_equals_plain(parallel, plain, monkeypatch):
    acc, model_wrap = parallel
    acc.policy = dataclasses.replace(acc.policy, key_steps=1, parallel=True)
    monkeypatch.setattr(GridChunk, "take", lambda self, s: pytest.fail("served a batch"))
    try:
        acc.set_sigmas(SIGMAS, model_wrap)
        out = sample("heun", model_wrap)
    finally:
        acc.policy = dataclasses.replace(acc.policy, key_steps=[0, 3])
    torch.testing.assert_close(out, plain_output(plain, "heun"), atol=1e-5, rtol=0)


def test_parallel_on_a_grid_needs_the_loops_timesteps():
    acc = fxprop.accelerate(UNET, key_steps=2, parallel=True)
    with pytest.raises(ValueError, match="needs timestep_of"):
        acc.set_grid(SIGMAS, torch.linspace(999, 0, len(SIGMAS)), 1000)


def test_a_grid_that_does_not_decrease_is_refused():
    acc = fxprop.accelerate(UNET, key_steps=2)
    with pytest.raises(ValueError, match="must decrease strictly"):
        acc.set_sigmas(torch.tensor([14.6, 5.0, 5.0, 0.0]), PLAIN)
    with pytest.raises(TypeError, match="sigma_to_t"):
        acc.set_sigmas(SIGMAS, object())


# -- calls mapped by sigma (ComfyUI's loop passes each call's sigma) ----------------------------

def test_a_grid_mapped_by_sigma_takes_repeated_timesteps():
    """Rounded timesteps may repeat (ComfyUI's karras grids): mapped by sigma, each call still
    finds its step, midpoints the step they start from."""
    acc = fxprop.accelerate(UNET, key_steps=2)
    sigmas = torch.tensor([14.6, 0.031, 0.030, 0.029, 0.0])
    timesteps = torch.tensor([999.0, 1.0, 1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="timesteps of sigmas must decrease strictly.*by='sigma'"):
        acc.set_grid(sigmas, timesteps, 1000)
    plan = acc.set_grid(sigmas, timesteps, 1000, by="sigma")
    assert plan.timesteps == (999.0, 1.0, 1.0, 1.0) and plan.is_key == (True, False, True, False)
    visits = [(14.6, 0), (1.0, 0), (0.031, 1), (0.0305, 1), (0.030, 2), (0.029, 3), (0.01, 3)]
    for sigma, step in visits:
        assert acc.next_is_key(torch.tensor([sigma])) == (step % 2 == 0)
        assert acc.step == step and not acc.off_plan
    with pytest.warns(UserWarning, match="sigma 0.03 goes back up"):
        acc.next_is_key(torch.tensor([0.030]))
    with pytest.raises(ValueError, match="^sigmas must decrease strictly"):
        acc.set_grid(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([9.0, 9.0, 0.0]), by="sigma")
