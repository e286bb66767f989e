"""A capture is valid for the state it was taken in (issue 25, cause 1): the UNet as it is at
the call that captures (not at the start of the generation) and the grad and autocast modes.

Changes made within a generation by stock diffusers callbacks are seen from the next key step
(with every step a key step: the plain pipeline's image); at a non-key step the generation
leaves its plan with one warning. The oracle is a plain pipeline of the same components in the
same state (see test_workflows); where reuse makes the image differ from plain, the oracle is
sequential mode in the same state (parallel mode equals it, test_parallel).
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from diffusers.callbacks import IPAdapterScaleCutoffCallback, SDCFGCutoffCallback

import fxprop
from conftest import assert_differs, decoder_attn_unet, sd_pipeline
from test_workflows import accelerated_and_plain, ip_adapter_state, run

FREEU = dict(s1=0.9, s2=0.2, b1=1.4, b2=1.6)
EMBEDS = [torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(4))]


def _ip_cutoff(step: int) -> IPAdapterScaleCutoffCallback:
    """diffusers' stock callback that sets the IP-Adapter scale to 0 after ``step``."""
    return IPAdapterScaleCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=step)


def _close(actual, expected, what, atol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def ip_pipes():
    """An IP-Adapter pipeline (every step a key step) and its plain twin; tests reset the
    scale and policy they change."""
    pipe = sd_pipeline(unet=decoder_attn_unet())
    pipe.load_ip_adapter(ip_adapter_state(pipe.unet), subfolder=None, weight_name=None,
                         image_encoder_folder=None)
    return accelerated_and_plain(pipe)


def test_captures_are_keyed_by_the_autocast_mode():
    """Row 1: bf16 autocast, then fp16, then none; each equals plain in the same mode."""
    pipe, plain = accelerated_and_plain()
    modes = {"bf16": torch.autocast("cpu", torch.bfloat16),
             "fp16": torch.autocast("cpu", torch.float16), "none": contextlib.nullcontext()}
    outs = {}
    for name, mode in modes.items():
        with mode:
            outs[name] = run(pipe)
            _close(outs[name], run(plain), f"under {name} autocast", atol=1e-3)
    assert_differs(outs["bf16"], outs["none"], 1e-3, "bf16 autocast and none")
    assert_differs(outs["fp16"], outs["bf16"], 1e-3, "fp16 and bf16 autocast")


def _freeu_and_cfg_cutoff(step: int):
    """A callback that enables FreeU after ``step`` and drops CFG (stock SDCFGCutoffCallback)."""
    cutoff = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=step)

    def callback(pipe, i, t, kwargs):
        if i == step:
            pipe.enable_freeu(**FREEU)
        return cutoff(pipe, i, t, kwargs)

    return dict(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_a_capture_mid_generation_is_keyed_by_the_state_it_was_taken_in():
    """Row 2: FreeU on and CFG dropped at step 1 (a new signature is captured then, with FreeU
    on); the next generation, FreeU off at guidance 1, must not get that capture."""
    pipe, plain = accelerated_and_plain()
    outs = []
    for twin in (plain, pipe):
        twin.disable_freeu()
        outs.append(run(twin, **_freeu_and_cfg_cutoff(1)))
    _close(outs[1], outs[0], "FreeU and CFG cut by a callback")
    pipe.disable_freeu()
    _close(run(pipe, guidance_scale=1.0), run(plain, guidance_scale=1.0), "the next generation")


def _sequential(pipe, **kwargs):
    """The oracle of parallel mode: sequential mode with the same key steps, in the same state
    (equal to within 1e-4, test_parallel; its graph is the unbatched one, so a stale batched
    graph cannot reach it)."""
    fxprop.accelerate(pipe, key_steps=[0, 1, 3], prior_noise=0)
    return run(pipe, **kwargs)


def test_parallel_graphs_captured_after_a_change_are_keyed_by_it():
    """Row 3: parallel mode, FreeU on after step 0: the batched graphs of step 1's chunk are
    captured with FreeU on; the next generation, FreeU off as the first one started, must not
    reuse them."""
    pipe, _ = accelerated_and_plain(key_steps=[0, 1, 3], parallel=True)
    pipe.enable_freeu(**FREEU)
    pipe.disable_freeu()  # its attributes exist from now on (None): a state reached again below

    def freeu_on(p, i, t, kwargs):
        if i == 0:
            p.enable_freeu(**FREEU)
        return {}

    run(pipe, callback_on_step_end=freeu_on)
    pipe.disable_freeu()
    after = run(pipe)
    _close(after, _sequential(pipe), "the next generation against sequential mode", atol=1e-4)


def test_ip_adapter_cutoff_is_seen_at_the_next_step(ip_pipes):
    """Row 4: stock IPAdapterScaleCutoffCallback within one generation equals plain."""
    pipe, plain = ip_pipes
    fxprop.accelerate(pipe, key_steps=1, prior_noise=0)
    outs = []
    for twin in (plain, pipe):
        twin.set_ip_adapter_scale(1.0)
        outs.append(run(twin, ip_adapter_image_embeds=EMBEDS,
                        callback_on_step_end=_ip_cutoff(1)))
    _close(outs[1], outs[0], "IP-Adapter scale cut at step 1")
    pipe.set_ip_adapter_scale(1.0)
    assert_differs(outs[0], run(plain, ip_adapter_image_embeds=EMBEDS), 1e-4, "with and without")


def test_a_change_before_a_non_key_step_runs_the_whole_unet_with_a_warning(ip_pipes):
    """Keys [0, 3], the scale cut after step 1: step 2 would reuse step 0's features computed
    at scale 1, so the generation runs the whole UNet from there: keys [0, 2, 3] exactly."""
    pipe, _ = ip_pipes
    kwargs = dict(ip_adapter_image_embeds=EMBEDS,
                  callback_on_step_end=_ip_cutoff(1))
    fxprop.accelerate(pipe, key_steps=[0, 2, 3], prior_noise=0)
    pipe.set_ip_adapter_scale(1.0)
    reference = run(pipe, **kwargs)
    fxprop.accelerate(pipe, key_steps=[0, 3], prior_noise=0)
    pipe.set_ip_adapter_scale(1.0)
    with pytest.warns(UserWarning, match="changed at step 2") as record:
        candidate = run(pipe, **kwargs)
    assert len([w for w in record if "fxprop" in str(w.message)]) == 1
    _close(candidate, reference, "left the plan at step 2")


def test_ip_adapter_cutoff_in_parallel_mode_does_not_reach_the_next_request(ip_pipes):
    """Row 3b: parallel mode with the cutoff callback, then a request without it at scale 1."""
    pipe, _ = ip_pipes
    fxprop.accelerate(pipe, key_steps=[0, 1, 3], prior_noise=0, parallel=True)
    pipe.set_ip_adapter_scale(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cut at step 1 is followed by a chunk's step 2
        run(pipe, ip_adapter_image_embeds=EMBEDS,
            callback_on_step_end=_ip_cutoff(0))
    pipe.set_ip_adapter_scale(1.0)
    after = run(pipe, ip_adapter_image_embeds=EMBEDS)
    _close(after, _sequential(pipe, ip_adapter_image_embeds=EMBEDS), "the next request",
           atol=1e-4)


class StoringProcessor:
    """A prompt-to-prompt style processor: counts its calls, stores what it computed, and
    weights its output by the parity of its count (a step-dependent edit)."""

    def __init__(self, store: list) -> None:
        self.store, self.calls = store, 0

    def __call__(self, attn, hidden_states, *args, **kwargs):
        from diffusers.models.attention_processor import AttnProcessor
        self.calls += 1
        out = AttnProcessor()(attn, hidden_states, *args, **kwargs)
        self.store.append(out.detach())
        return out * (1.0 + 0.5 * (self.calls % 2))


def _storing(unet) -> list:
    store: list = []
    unet.set_attn_processor({name: StoringProcessor(store) for name in unet.attn_processors})
    return store


def test_a_processor_with_python_side_effects_runs_whole_with_a_warning():
    """Row 5: the trace ran the processor once on fake tensors (the store received FakeTensors,
    the counter advanced once), the graph replayed none of it: off by 0.16, no warning."""
    pipe, plain = accelerated_and_plain()
    store = _storing(plain.unet)
    reference = run(plain)
    stored = len(store)
    store = _storing(pipe.unet)
    with pytest.warns(UserWarning, match=r"changed Python state of .*StoringProcessor"):
        out = run(pipe)
    _close(out, reference, "with a storing processor")
    assert len(store) == stored and not any(
        isinstance(x, torch._subclasses.fake_tensor.FakeTensor) for x in store)
    from diffusers.models.attention_processor import AttnProcessor
    pipe.unet.set_attn_processor(AttnProcessor())  # a pure processor again: accelerated
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _close(run(pipe), run(plain), "with the default processor")
    assert not [w for w in record if "fxprop" in str(w.message)]


def test_attend_and_excite_runs_its_gradient_calls_whole():
    """Row 5b: Attend-and-Excite's latent updates call the UNet with inputs that require grad,
    and read the attention maps its processors store: a captured graph stored none
    (``KeyError: 'up'``). Such calls now run the UNet itself; the planned ones are accelerated."""
    from diffusers import StableDiffusionAttendAndExcitePipeline
    pipe = sd_pipeline(StableDiffusionAttendAndExcitePipeline, unet=decoder_attn_unet())
    plain = StableDiffusionAttendAndExcitePipeline(**pipe.components)
    kwargs = dict(prompt=None, token_indices=[1, 2], max_iter_to_alter=2, attn_res=(8, 8))
    reference = run(plain, **kwargs)
    fxprop.accelerate(pipe, key_steps=1, prior_noise=0)
    _close(run(pipe, **kwargs), reference, "Attend-and-Excite")
    assert fxprop.runtime_of(pipe).captures


def test_the_per_call_fingerprint_sees_every_change_a_full_read_sees():
    """The memoised read (:class:`fxprop.graph.fingerprint.Fingerprinter`) equals ``fingerprint``
    and changes with it, change after change (each kind of change its memo could miss)."""
    from diffusers.models.attention_processor import AttnProcessor
    from fxprop.graph.fingerprint import Fingerprinter
    unet, read = decoder_attn_unet(), Fingerprinter()
    changes = {
        "FreeU": lambda: unet.enable_freeu(**FREEU),
        "a processor object": lambda: unet.set_attn_processor(AttnProcessor()),
        "a processor's attribute": lambda: setattr(
            unet.up_blocks[1].attentions[0].transformer_blocks[0].attn1.processor, "x", 1),
        "a replaced parameter": lambda: setattr(unet.conv_in, "weight", torch.nn.Parameter(
            unet.conv_in.weight.detach().clone())),
        "dtype in place (.data)": lambda: setattr(unet.conv_out.weight, "data",
                                                  unet.conv_out.weight.data.double()),
        "a submodule hook": lambda: unet.conv_in.register_forward_hook(lambda *a: None),
        "a replaced submodule": lambda: setattr(unet, "conv_act", torch.nn.SiLU()),
        "the config": lambda: unet.register_to_config(note="changed"),
        "a new attribute": lambda: setattr(unet.mid_block, "flag", True),
    }
    seen = {read(unet)}
    assert read(unet) == fxprop.fingerprint(unet)
    for what, change in changes.items():
        change()
        assert read(unet) == fxprop.fingerprint(unet), what
        assert read(unet) not in seen, f"{what} was not seen"
        seen.add(read(unet))
