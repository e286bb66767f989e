"""Deployable artifacts: the parts of an accelerated UNet as ``torch.export`` programs.

:func:`export` writes, for one input signature, the ``full`` part (the UNet returning its
outputs and the frontier, run at key steps) and the ``step`` part (run at the other steps) as
``.pt2`` files, optionally AOTInductor packages of both, and ``fxprop.json`` with what running
them needs: the input names, which inputs the step part reads, the key-step schedule.
:func:`load` gives back a :class:`LoadedUNet` that follows the same plans as the runtime
without the UNet's Python class and without capturing again.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from ..graph.capture import normalise_timestep, path_name, flatten_call
from ..plan.policies import make_policy
from .accelerated import AcceleratedUNet
from .attach import runtime_of
from .follow import PlanFollower

__all__ = ["export", "load", "LoadedUNet", "META_FILE"]

META_FILE = "fxprop.json"
FORMAT = 1
_PARTS = ("full", "step")


def export(target: Any, path: str | Path, *args: Any, aoti: bool = False,
           **kwargs: Any) -> Path:
    """Write the parts of ``target`` for the UNet call ``target(*args, **kwargs)`` to ``path``.

    Args:
        target: an :class:`~fxprop.AcceleratedUNet` or a pipeline made by
            :func:`fxprop.accelerate` (its policy's key steps are saved with the programs).
        path: a directory, created if needed.
        args, kwargs: one example UNet call, as the sampling loop makes it; shapes, dtypes and
            non-tensor arguments are fixed by it (export again for another resolution).
        aoti: also compile each part ahead of time with AOTInductor (minutes per part).
    """
    runtime = _runtime_of(target)
    key_steps = _plain_key_steps(runtime.policy)
    call = flatten_call(runtime.unet.forward, args, kwargs)
    _, parts = runtime.split_call(call)  # eager parts, whatever compile= the runtime has
    with torch.no_grad():
        frontier = parts.key(*[call.tensors[i] for i in parts.key_inputs])
        step_args = (*[call.tensors[i] for i in parts.step_inputs], *frontier)
        programs = {"full": torch.export.export(parts.full, tuple(call.tensors), strict=False),
                    "step": torch.export.export(parts.step, step_args, strict=False)}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in [path / META_FILE, *path.glob("*.aoti.pt2")]:  # no half-old export loads
        stale.unlink(missing_ok=True)
    for name, program in programs.items():
        torch.export.save(program, path / f"{name}.pt2")
        if aoti:
            torch._inductor.aoti_compile_and_package(program,
                                                     package_path=str(path / f"{name}.aoti.pt2"))
    names = list(inspect.signature(runtime.unet.forward).parameters)[:2]  # sample, timestep
    meta = {
        "format": FORMAT, "unet_class": type(runtime.unet).__name__,
        "reuse": runtime.policy.reuse, "key_steps": key_steps,
        "prior_noise": runtime.policy.prior_noise, "forecast": runtime.policy.forecast,
        "forecast_in": runtime.policy.forecast_in,
        "forecast_reach": runtime.policy.forecast_reach,
        "positional": names, "input_names": call.names, "step_inputs": parts.step_inputs,
        "shapes": [list(t.shape) for t in call.tensors],
        "dtypes": [str(t.dtype).removeprefix("torch.") for t in call.tensors],
        "num_outputs": parts.num_outputs, "aoti": aoti,
    }
    (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load(path: str | Path, aoti: bool | None = None) -> "LoadedUNet":
    """The exported parts in ``path`` as a :class:`LoadedUNet`.

    ``aoti``: run the AOTInductor packages (``None``: when the export wrote them).
    """
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise ValueError(f"{path} holds no fxprop export (no {META_FILE}); "
                         "write one with fxprop.export")
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: export format {meta.get('format')!r}, this fxprop reads "
                         f"{FORMAT}; export again")
    use_aoti = meta["aoti"] if aoti is None else aoti
    if use_aoti and not meta["aoti"]:
        raise ValueError(f"{path} has no AOTInductor packages; export with aoti=True")
    if use_aoti:
        parts = {n: torch._inductor.aoti_load_package(str(path / f"{n}.aoti.pt2"))
                 for n in _PARTS}
    else:
        parts = {n: torch.export.load(path / f"{n}.pt2").module() for n in _PARTS}
    return LoadedUNet(parts["full"], parts["step"], meta)


class LoadedUNet(PlanFollower):
    """An exported UNet that follows a plan: call ``set_timesteps`` before each generation,
    then call it like the UNet (same argument names); it returns a tuple of output tensors,
    as the UNet with ``return_dict=False``. An off-plan call runs the full part (correct)."""

    def __init__(self, full: Callable, step: Callable, meta: dict) -> None:
        super().__init__()
        self.meta = meta
        forecast = {k: meta[k] for k in ("forecast", "forecast_in", "forecast_reach")
                    if k in meta}  # older exports: the policy's defaults (forecast 0)
        self.policy = make_policy(meta["reuse"], key_steps=meta["key_steps"], **forecast)
        self.full_part, self.step_part = full, step  # submodules: .to() moves them
        self.parts = _LoadedParts(full, step, meta["step_inputs"], meta["num_outputs"])

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        call = _LoadedCall(*self._tensors(args, kwargs))
        gen = self._on_plan(call.timestep)
        out = None if gen is None else self.run_planned(gen, call, self.parts)
        if out is None:  # off the plan: the full part is the whole UNet
            return tuple(self.parts.full(*call.tensors)[: self.parts.num_outputs])
        return out

    def _tensors(self, args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], Any]:
        """The call's tensor leaves in the exported order, checked against the export."""
        sample_name, timestep_name = self.meta["positional"]
        if len(args) > 2:
            raise TypeError(f"pass at most ({sample_name}, {timestep_name}) by position, the "
                            "rest by name")
        arguments = {**dict(zip(self.meta["positional"], args)), **kwargs}
        timestep = arguments.get(timestep_name)
        sample = arguments.get(sample_name)
        if not isinstance(sample, torch.Tensor) or timestep is None:
            raise TypeError(f"the call needs {sample_name} (a tensor) and {timestep_name}")
        normalise_timestep(arguments, sample, timestep_name)
        dtype = getattr(torch, self.meta["dtypes"][self.meta["input_names"].index(timestep_name)])
        arguments[timestep_name] = arguments[timestep_name].to(dtype)
        leaves, _ = pytree.tree_flatten_with_path(arguments)
        given = {path_name(p): x for p, x in leaves if isinstance(x, torch.Tensor)}
        names = self.meta["input_names"]
        if set(given) != set(names):
            raise TypeError(f"the export takes the tensors {names}; got {sorted(given)}")
        tensors = [given[n] for n in names]
        for name, x, shape, dtype in zip(names, tensors, self.meta["shapes"],
                                         self.meta["dtypes"]):
            if list(x.shape) != shape or x.dtype != getattr(torch, dtype):
                raise ValueError(f"{name} is {list(x.shape)} {x.dtype}; the export was made "
                                 f"for {shape} torch.{dtype} (export again for other inputs)")
        return tensors, timestep


@dataclass
class _LoadedParts:
    """The exported programs as the step function's parts."""

    full: Callable
    step: Callable
    step_inputs: list[int]
    num_outputs: int


@dataclass
class _LoadedCall:
    """A call of the exported signature (one signature: every call has the same key)."""

    tensors: list[torch.Tensor]
    timestep: Any
    key: str = "export"


def _runtime_of(target: Any) -> AcceleratedUNet:
    runtime = target if isinstance(target, AcceleratedUNet) else runtime_of(target)
    if not isinstance(runtime, AcceleratedUNet):
        raise TypeError("fxprop.export takes an AcceleratedUNet or a pipeline accelerated by "
                        f"fxprop.accelerate, got {type(target).__name__}; accelerate it first")
    if getattr(runtime.policy, "parallel", False):
        raise ValueError("fxprop.export writes sequential mode (one program per part); "
                         "accelerate with parallel=False to export")
    return runtime


def _plain_key_steps(policy: Any) -> Any:
    """The policy's key steps as JSON data (preset name, interval or list)."""
    value = policy.key_steps
    if isinstance(value, (str, int)) or (isinstance(value, (list, tuple))
                                         and all(isinstance(v, int) for v in value)):
        return list(value) if isinstance(value, tuple) else value
    raise ValueError(f"fxprop.export saves key_steps as a preset name, an interval or a list "
                     f"of steps; got {value!r}")
