"""Capture a UNet call as a flat torch.fx graph, once per input signature.

A UNet is called with a mix of tensors, nested containers (SDXL's ``added_cond_kwargs``,
ControlNet residual tuples) and plain values (``None``, flags). We bind the call to the UNet's
``forward`` signature, flatten it with pytree and capture, with ``torch.export`` (non-strict),
a graph whose placeholders are exactly the tensor leaves. Everything that is not a tensor is
baked into the graph and becomes part of the :class:`CallKey`, so a call that differs in shape,
dtype, device or any plain value gets its own graph instead of a stale one.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from .calls import capturing
from .nodes import placeholders
from .stacks import canonical_stacks
from .twin import rebind, twin

__all__ = ["CallKey", "FlatCall", "Captured", "flatten_call", "capture", "normalise_timestep",
           "path_name", "TENSOR", "why_not_captured"]

LOG = logging.getLogger("fxprop")

#: Stands for a tensor leaf in a call's template (``None`` is a real leaf value).
TENSOR = object()

#: Prefix of every module path in the captured graph (the wrapper's attribute name).
ROOT = "unet"


@dataclass(frozen=True)
class CallKey:
    """What a captured graph is specialised on: tree structure and every leaf's meta."""

    spec: str
    leaves: tuple


@dataclass
class FlatCall:
    """One UNet call, flattened: tensor leaves in order, plus what is needed to rebuild it."""

    tensors: list[torch.Tensor]
    names: list[str]          # a readable name per tensor leaf (for placeholders and errors)
    key: CallKey
    spec: pytree.TreeSpec
    template: list[Any]       # all leaves, tensors replaced by TENSOR
    timestep: Any             # the timestep exactly as passed (before normalisation)


def _leaf_meta(leaf: Any) -> tuple:
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device.type, leaf.device.index)
    try:
        hash(leaf)
        return ("const", type(leaf).__name__, leaf)
    except TypeError:
        return ("const", type(leaf).__name__, repr(leaf))


def path_name(path: tuple) -> str:
    parts = []
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry)))
        parts.append(str(key))
    return "_".join(parts)


def normalise_timestep(arguments: dict, sample: torch.Tensor, timestep_name: str) -> None:
    """Make the timestep a 1-D tensor of the batch size, as the UNet itself would."""
    t = arguments[timestep_name]
    t = torch.as_tensor(t, device=sample.device)
    if t.ndim == 0:
        t = t.reshape(1)
    if t.shape[0] == 1 and sample.shape[0] != 1:
        t = t.expand(sample.shape[0])
    arguments[timestep_name] = t


def flatten_call(forward: Callable, args: tuple, kwargs: dict) -> FlatCall:
    """Bind ``forward(*args, **kwargs)`` and flatten it into tensor leaves and a key.

    The first parameter of ``forward`` is the latent and the second the timestep, which is the
    convention of every diffusers and LDM UNet.
    """
    signature = inspect.signature(forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"the call does not match the UNet's forward{signature}: {err}") from err
    arguments = dict(bound.arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
    names = list(signature.parameters)
    if len(names) < 2 or not isinstance(arguments.get(names[0]), torch.Tensor):
        raise TypeError(f"the UNet's first argument must be the latent tensor, got {names[:2]}")
    timestep = arguments.get(names[1])
    normalise_timestep(arguments, arguments[names[0]], names[1])
    leaves_with_path, spec = pytree.tree_flatten_with_path(arguments)
    tensors, tensor_names, template = [], [], []
    for path, leaf in leaves_with_path:
        if isinstance(leaf, torch.Tensor):
            tensors.append(leaf)
            tensor_names.append(path_name(path))
            template.append(TENSOR)
        else:
            template.append(leaf)
    key = CallKey(str(spec), tuple(_leaf_meta(leaf) for _, leaf in leaves_with_path))
    return FlatCall(tensors, tensor_names, key, spec, template, timestep)


class _FlatUNet(nn.Module):
    """The UNet called with tensor leaves only (export records the output's structure)."""

    def __init__(self, unet: nn.Module, call: FlatCall, forward: Callable | None) -> None:
        super().__init__()
        setattr(self, ROOT, unet)  # registered: module paths in the graph start with ROOT
        self._spec, self._template = call.spec, call.template
        object.__setattr__(self, "_forward", unet if forward is None else forward)  # not a submodule

    def forward(self, *tensors: torch.Tensor) -> Any:
        leaves, it = [], iter(tensors)
        for leaf in self._template:
            leaves.append(next(it) if leaf is TENSOR else leaf)
        arguments = pytree.tree_unflatten(leaves, self._spec)
        return self._forward(**arguments)


@dataclass
class Captured:
    """A captured UNet call: a flat graph over the tensor leaves, and how to rebuild outputs."""

    module: fx.GraphModule     # forward(*tensor_leaves) -> tuple of output tensors
    out_spec: pytree.TreeSpec

    @property
    def graph(self) -> fx.Graph:
        return self.module.graph


def _plain_graph(graph: fx.Graph, names: list[str]) -> fx.Graph:
    """Copy an exported graph into one with a plain codegen and readable placeholder names."""
    new, env = fx.Graph(), {}
    for node, name in zip(placeholders(graph), names):
        env[node] = new.placeholder(name)
        env[node].meta = dict(node.meta)
    for node in graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            new.output(fx.map_arg(node.args[0], lambda a: env[a]))
        elif node.op == "call_module" and node.target == "_guards_fn":
            continue  # export's input guards: our CallKey already pins every shape
        else:
            env[node] = new.node_copy(node, lambda a: env[a])
    new.eliminate_dead_code()
    return new


def capture(unet: nn.Module, call: FlatCall, forward: Callable | None = None,
            tree: nn.Module | None = None) -> Captured:
    """Capture ``unet`` for this call's signature; parameters stay shared with ``unet``.

    ``forward``: what to trace instead of calling ``unet`` (the forward beneath fxprop's own
    interception, so that the capture neither re-enters it nor traces hooks above it).
    ``tree``: the twin of ``unet`` to trace (default: :func:`~fxprop.graph.twin.twin` of it)."""
    double = twin(unet) if tree is None else tree  # export swaps fakes into the twin only
    flat = _FlatUNet(double, call, rebind(forward, unet, double))
    with torch.no_grad(), capturing(unet):  # no other thread runs the UNet meanwhile
        exported = _export(flat, call, type(unet).__name__)
        if _mutates(exported.graph):
            # In-place ops (e.g. FreeU's ``h[:, :n] *= b``) have no users, so cutting the graph
            # by data dependencies would drop them: make the graph functional first.
            exported = exported.run_decompositions({})
    unlifted = exported.module()
    graph = _plain_graph(unlifted.graph, call.names)
    # module paths as the UNet names them, whatever spelling export chose (see fxprop.graph.stacks)
    canonical_stacks(graph, double, ((flat, ROOT), (double, "")), ROOT)
    return Captured(fx.GraphModule(_attributes(graph, flat, unlifted), graph),
                    exported.call_spec.out_spec)


def _export(flat: nn.Module, call: FlatCall, model: str) -> torch.export.ExportedProgram:
    try:
        with _without_partial_graph():
            return torch.export.export(flat, tuple(call.tensors), strict=False)
    except Exception as err:  # export raises many types: keep the type, name the model
        context = f"fxprop could not capture {model} with torch.export"
        again = _same_type(err, f"{context}: {err}")
        if again is None:
            err.add_note(context)
            raise
        raise again from err


@contextlib.contextmanager
def _without_partial_graph() -> Iterator[None]:
    """Keep the partial graph that torch.export prints to stderr when a trace fails (tens of
    KB for a UNet, at every attempt) out of the user's log; anything else written meanwhile is
    passed on, and the graph goes to the debug log."""
    buffer = io.StringIO()
    dump = None
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except Exception as err:
        dump = getattr(err, "partial_fx_graph", None)
        raise
    finally:
        text = buffer.getvalue()
        if dump is not None and str(dump) in text:  # printed by each of export's layers
            text = text.replace(str(dump) + "\n", "").replace(str(dump), "")
            LOG.debug("torch.export's partial graph:\n%s", dump)
        sys.stderr.write(text)


def why_not_captured(err: BaseException) -> str:
    """A failed capture in one line a user can act on: the error's first line or, where the
    UNet's Python read the value of a call input (a data-dependent guard), the code that did."""
    text = str(err).strip()
    if "data-dependent" in text:
        where = re.search(r"Caused by: \(([^)]*)\)", text)
        return ("its Python reads the value of a call input" + (
            f" ({where.group(1)})" if where else "") + ", so one graph cannot serve every step")
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first[:300]}"


def _same_type(err: Exception, message: str) -> Exception | None:
    """A new exception of ``err``'s type saying ``message``, or None if the type does not take
    a single message (then the caller adds a note to ``err`` instead)."""
    try:
        again = type(err)(message)
    except Exception:  # any constructor that wants other arguments
        return None
    return again if str(again) == message else None


def _mutates(graph: fx.Graph) -> bool:
    """Whether ``graph`` has an operator that writes into one of its arguments."""
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and schema is not None and schema.is_mutable:
            return True
    return False


def _attributes(graph: fx.Graph, *owners: nn.Module) -> dict[str, Any]:
    """Resolve every ``get_attr`` target, preferring the user's own module (shared weights)."""
    found: dict[str, Any] = {}
    for node in graph.find_nodes(op="get_attr"):
        for owner in owners:
            try:
                found[node.target] = _getattr_path(owner, node.target)
                break
            except AttributeError:
                continue
        else:
            raise AttributeError(f"captured graph reads {node.target!r}, found on no module")
    return found


def _getattr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
