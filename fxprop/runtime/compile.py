"""Compile the parts of a cut with ``torch.compile(fullgraph=True)``.

Compile the step functions, not the model (gpt-fast): each part is a static, flat aten graph
chosen by a plan made before the loop, so it compiles whole, with no graph break, once per
input signature. Parts are compiled when they are first captured and kept with them, so a
second generation of the same shapes compiles nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..graph.split import Parts

__all__ = ["CompileOptions", "compile_options", "compile_parts"]


@dataclass(frozen=True)
class CompileOptions:
    """Options passed through to ``torch.compile`` for every part.

    Attributes:
        backend: ``"inductor"`` (default) or any torch.compile backend.
        mode: e.g. ``"max-autotune"``, ``"reduce-overhead"`` (CUDA graphs on GPU).
        dynamic: ``False`` by default: parts have static shapes, one compile per shape.
        options: inductor options dict.
    """

    backend: str = "inductor"
    mode: str | None = None
    dynamic: bool | None = False
    options: dict | None = None


def compile_options(value: Any) -> CompileOptions | None:
    """``compile=`` of :func:`fxprop.accelerate`: False/None, True, a dict or CompileOptions."""
    if value is None or value is False:
        return None
    if value is True:
        return CompileOptions()
    if isinstance(value, CompileOptions):
        return _checked(value)
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(CompileOptions)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"compile options {unknown} are unknown; known: {sorted(known)}")
        return _checked(CompileOptions(**value))
    raise TypeError(f"compile must be a bool, a dict of torch.compile options or "
                    f"CompileOptions, got {type(value).__name__}")


#: Modes that record CUDA graphs: their replays overwrite earlier outputs, and fxprop keeps
#: outputs across calls (the frontier, a chunk's predictions).
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
MODES = (None, "default", "max-autotune-no-cudagraphs", *CUDAGRAPH_MODES)


def _checked(options: CompileOptions) -> CompileOptions:
    """Reject what torch.compile would only reject inside the sampling loop."""
    if options.mode not in MODES:
        raise ValueError(f"compile mode {options.mode!r} is unknown; choose one of {MODES}")
    if options.mode in CUDAGRAPH_MODES:
        raise ValueError(f"compile mode {options.mode!r} records CUDA graphs, whose replays "
                         "overwrite the features fxprop keeps across steps; use "
                         "'max-autotune-no-cudagraphs' or 'default'")
    if options.mode is not None and options.options:
        raise ValueError("torch.compile takes either mode or options, not both; got "
                         f"mode={options.mode!r} and options={options.options!r}")
    if isinstance(options.backend, str):
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        if options.backend not in backends:
            raise ValueError(f"compile backend {options.backend!r} is unknown; choose one "
                             f"of {backends}")
    return options


def _compile(module: torch.nn.Module, options: CompileOptions) -> Any:
    return torch.compile(module, fullgraph=True, backend=options.backend, mode=options.mode,
                         dynamic=options.dynamic, options=options.options)


def compile_parts(parts: Parts, options: CompileOptions | None) -> Parts:
    """The same parts, each wrapped by ``torch.compile`` (compiled lazily at first call)."""
    if options is None:
        return parts
    return parts.map(lambda part: _compile(part, options))
