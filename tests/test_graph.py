"""fxprop.graph.nodes on hand-built graphs with known answers, and capture's error types."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx, nn

from fxprop.graph.capture import Captured, capture, flatten_call
from fxprop.graph.nodes import (ancestors, descendants, frontier_of, needed, output_nodes,
                                placeholders, positions)
from fxprop.graph.split import Parts, extract, split


def unet_like() -> tuple[fx.Graph, dict[str, fx.Node]]:
    """x -> a -> b -> c (the "mid"), a skip ``a`` consumed twice (m1, m2), a dead node and a
    second input ``t`` read only at the end::

        a = relu(x); b = neg(a); c = sigmoid(b); dead = cos(b)
        m1 = c + a; m2 = m1 * a; o = m2 + t; return (o, c)
    """
    g = fx.Graph()
    n = {"x": g.placeholder("x"), "t": g.placeholder("t")}
    n["a"] = g.call_function(torch.relu, (n["x"],))
    n["b"] = g.call_function(torch.neg, (n["a"],))
    n["c"] = g.call_function(torch.sigmoid, (n["b"],))
    n["dead"] = g.call_function(torch.cos, (n["b"],))
    n["m1"] = g.call_function(operator.add, (n["c"], n["a"]))
    n["m2"] = g.call_function(operator.mul, (n["m1"], n["a"]))
    n["o"] = g.call_function(operator.add, (n["m2"], n["t"]))
    n["out"] = g.output((n["o"], n["c"]))
    g.lint()
    return g, n


def names(nodes) -> set[str]:
    return {node.name for node in nodes}


def test_lookups():
    g, n = unet_like()
    assert placeholders(g) == [n["x"], n["t"]]
    assert output_nodes(g) == [n["o"], n["c"]]
    order = positions(g)
    assert order[n["x"]] == 0 and order[n["out"]] == len(g.nodes) - 1
    assert order[n["a"]] < order[n["m1"]] < order[n["m2"]]


def test_output_nodes_of_a_nested_output_in_order():
    g = fx.Graph()
    x, y = g.placeholder("x"), g.placeholder("y")
    s = g.call_function(torch.sin, (x,))
    g.output({"first": (y, None), "second": [s, x]})
    assert output_nodes(g) == [y, s, x]


def test_descendants():
    g, n = unet_like()
    assert names(descendants([n["a"]])) == {"relu", "neg", "sigmoid", "cos", "add", "mul",
                                            "add_1", "output"}
    assert descendants([n["dead"]]) == {n["dead"]}  # no users
    assert descendants([n["t"]]) == {n["t"], n["o"], n["out"]}
    assert descendants([]) == set()


def test_ancestors():
    g, n = unet_like()
    assert ancestors([n["m1"]]) == {n["m1"], n["c"], n["b"], n["a"], n["x"]}
    assert ancestors([n["dead"], n["t"]]) == {n["dead"], n["b"], n["a"], n["x"], n["t"]}
    assert ancestors([n["x"]]) == {n["x"]}


def test_needed_stops_at_the_stop_set_but_follows_a_skip_around_it():
    g, n = unet_like()
    everything = needed([n["o"]], set())
    assert everything == ancestors([n["o"]])
    # with m1 given, the skip a is still needed (m2 reads it again): x too, but not b or c
    assert needed([n["o"]], {n["m1"]}) == {n["o"], n["m2"], n["m1"], n["a"], n["x"], n["t"]}
    assert needed([n["o"]], {n["m1"], n["a"]}) == {n["o"], n["m2"], n["m1"], n["a"], n["t"]}
    assert needed([n["c"]], {n["c"]}) == {n["c"]}  # a stop node is reached, not walked behind


def test_frontier_of_a_tensor_crossing_two_cuts():
    g, n = unet_like()
    deep = {n["x"], n["a"], n["b"], n["c"], n["dead"]}
    # c is read by m1 and by the output; the dead node is never read; a crosses to m1 and m2
    assert frontier_of(g, deep) == [n["a"], n["c"]]
    # one cut later, the skip a still crosses (m2 reads it), with m1
    assert frontier_of(g, deep | {n["m1"]}) == [n["a"], n["c"], n["m1"]]
    assert frontier_of(g, set(g.nodes)) == []
    assert frontier_of(g, set()) == []


# -- split: parts checked up front, built when first read ----------------------------------------

def _captured(graph: fx.Graph) -> Captured:
    return Captured(fx.GraphModule(nn.Module(), graph), None)


def test_parts_are_built_once_each_when_first_read():
    built = []
    parts = Parts(lambda name: built.append(name) or name.upper(), [0], [1], 2)
    assert built == []
    assert parts.step == "STEP" and parts.step == "STEP" and built == ["step"]
    wrapped = parts.map(lambda part: ("wrapped", part))
    assert built == ["step"] and (wrapped.key_inputs, wrapped.step_inputs) == ([0], [1])
    assert wrapped.full == ("wrapped", "FULL") and built == ["step", "full"]


def test_split_parts_read_what_they_need_and_compose():
    g, n = unet_like()
    parts = split(_captured(g), [n["a"], n["c"]])
    assert (parts.key_inputs, parts.step_inputs, parts.num_outputs) == ([0], [1], 2)
    assert names(placeholders(parts.step.graph)) == {"t", "relu", "sigmoid"}
    x, t = torch.randn(3), torch.randn(3)
    frontier = parts.key(x)
    torch.testing.assert_close(parts.step(t, *frontier), parts.full(x, t)[:2])


def test_a_frontier_without_the_skip_leaves_the_latent_to_the_step_part():
    g, n = unet_like()
    parts = split(_captured(g), [n["c"]])   # the skip a is not kept: m1 reads it from x
    assert parts.step_inputs == [0, 1]


def test_extract_refuses_a_part_that_reads_an_input_it_is_not_given():
    g, n = unet_like()
    with pytest.raises(ValueError, match=r"also reads the inputs \['x'\]"):
        extract(g, [n["t"]], [n["o"]])


# -- capture keeps the type of what export raises ----------------------------------------------

class Raises(nn.Module):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def forward(self, x, t):
        raise self.error


class TwoArgumentError(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")


def _capture(unet: nn.Module) -> None:
    capture(unet, flatten_call(unet.forward, (torch.randn(1, 3, 4, 4), torch.tensor(1)), {}))


def test_capture_error_keeps_its_type_and_chain():
    original = ValueError("the UNet rejected its input")
    with pytest.raises(ValueError, match="could not capture Raises with torch.export: .*"
                                         "the UNet rejected its input") as info:
        _capture(Raises(original))
    assert type(info.value) is ValueError and info.value.__cause__ is not None
    assert "the UNet rejected its input" in str(info.value.__cause__)


def test_capture_error_that_wants_other_arguments_gets_a_note():
    with pytest.raises(TwoArgumentError, match="7: no") as info:
        _capture(Raises(TwoArgumentError(7, "no")))
    assert any("could not capture Raises" in note for note in info.value.__notes__)
