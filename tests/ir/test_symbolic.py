"""Symbolic dims (``hetflow.ir.symbolic``): expressions over declared sizes, evaluated, bounded, bound."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hetflow.ir import DType, Graph, TensorType, verify
from hetflow.ir.errors import HetflowError
from hetflow.ir.serialize import graph_from_json, graph_to_json
from hetflow.ir.symbolic import (DimOutOfRange, SymbolicError, bind, concrete_shape, evaluate, max_nbytes,
                                 sized_at_max, symbols, upper_bound)
from hetflow.ir.text import parse_graph, print_graph

RANGES = {"batch": (1, 4), "seq": (2, 128)}


def test_evaluate_and_bound_the_expressions_shapes_are_made_of():
    sizes = {"batch": 3, "seq": 10}
    cases = {"batch*seq": 30, "(seq + 1)": 11, "2*batch": 6, "(seq // 4)": 2, "(seq % 4)": 2,
             "max(1, seq - 20)": 1, "min(seq, 7)": 7, "-batch + seq": 7}
    for expression, value in cases.items():
        assert evaluate(expression, sizes) == value, expression
    assert upper_bound("batch*seq", RANGES) == 512
    assert upper_bound("(seq + 1)", RANGES) == 129
    assert upper_bound("(seq // 4)", RANGES) == 32
    assert upper_bound("(seq % 4)", RANGES) == 3
    assert upper_bound("seq - batch", RANGES) == 127
    assert upper_bound("seq // (batch - 1)", RANGES) is None  # a divisor that can be zero: unbounded
    assert symbols("max(batch, seq) * 2") == {"batch", "seq"}


@pytest.mark.parametrize("expression", ["__import__('os').system('true')", "seq.real", "seq ** 2", "seq / 2",
                                        "[seq]", "lambda: 1", "seq if batch else 1", "f(seq)", "1.5 * seq",
                                        "x" * 300, "", "((((" * 40 + "seq" + "))))" * 40])
def test_anything_but_arithmetic_over_sizes_is_refused(expression):
    with pytest.raises(SymbolicError):
        evaluate(expression, {"seq": 4, "batch": 1})


_leaf = st.one_of(st.sampled_from(["batch", "seq"]), st.integers(0, 9).map(str))
_expressions = st.recursive(_leaf, lambda inner: st.one_of(
    st.tuples(inner, st.sampled_from(["+", "-", "*", "//", "%"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
    st.tuples(st.sampled_from(["max", "min"]), inner, inner).map(lambda t: f"{t[0]}({t[1]}, {t[2]})")),
    max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(_expressions, st.integers(1, 4), st.integers(2, 128))
# unbounded intermediates: 0 * inf and inf // b are NaN in IEEE arithmetic (found by this test in CI)
@example("(0 * (batch // (batch // batch)))", 1, 2)
@example("((seq // (batch - 1)) // 2)", 2, 2)
@example("(5 // (seq // (batch - 1)))", 3, 128)
@example("((0 - 3) // (seq // (batch - 1)))", 3, 128)
def test_the_upper_bound_is_never_below_a_value_in_the_ranges(expression, batch, seq):
    try:
        value = evaluate(expression, {"batch": batch, "seq": seq})
    except SymbolicError:  # a division by zero at these sizes
        return
    bound = upper_bound(expression, RANGES)
    assert bound is None or value <= bound


def _dynamic_graph() -> Graph:
    g = Graph("dyn")
    g.dims = dict(RANGES)
    x = g.add_input("x", TensorType(DType.f32, ("batch", "seq", 8)))
    shape = g.add_weight("shape", np.array([-1, 8], np.int64))
    flat = g.add_node("Reshape", [x, shape], [TensorType(DType.f32, ("batch*seq", 8))]).outputs[0]
    y = g.add_node("Relu", [flat], [TensorType(DType.f32, ("batch*seq", 8))]).outputs[0]
    g.outputs.append(y)
    verify(g)
    return g


def test_declared_sizes_and_expression_dims_round_trip_through_text_and_json():
    g = _dynamic_graph()
    text = print_graph(g)
    assert "dims(batch=1..4, seq=2..128)" in text and 'f32["batch*seq",8]' in text
    again = parse_graph(text)
    assert again.dims == g.dims and print_graph(again) == text
    from_json = graph_from_json(graph_to_json(g), {w.name: w.data for w in g.weights.values()})
    assert from_json.dims == g.dims and print_graph(from_json) == text


def test_a_dim_naming_an_undeclared_size_fails_verification():
    g = _dynamic_graph()
    g.nodes[-1].outputs[0].type = TensorType(DType.f32, ("batch*tokens", 8))
    with pytest.raises(HetflowError, match="names size 'tokens', which the graph does not declare"):
        verify(g)


def test_json_with_an_empty_range_or_a_bad_expression_is_refused():
    g = _dynamic_graph()
    data = graph_to_json(g)
    weights = {w.name: w.data for w in g.weights.values()}
    broken = dict(data, dims={"batch": [4, 1], "seq": [2, 128]})
    with pytest.raises(HetflowError, match="the range 4..1 is empty"):
        graph_from_json(broken, weights)
    bad_type = dict(data, inputs=[{"name": "x", "type": 'f32["__import__(1)",8]'}])
    with pytest.raises(HetflowError, match="input %x has type"):
        graph_from_json(bad_type, weights)


def test_bind_checks_ranges_and_agreement_in_one_line():
    g = _dynamic_graph()
    assert bind(g.inputs, {"x": np.zeros((2, 5, 8), np.float32)}, g.dims) == {"batch": 2, "seq": 5}
    with pytest.raises(DimOutOfRange, match=r"^input %x dim 1 \(seq\) is 200, outside the range 2..128"):
        bind(g.inputs, {"x": np.zeros((2, 200, 8), np.float32)}, g.dims)
    two = Graph("two")
    two.dims = dict(RANGES)
    a = two.add_input("a", TensorType(DType.f32, ("batch", 8)))
    b = two.add_input("b", TensorType(DType.f32, ("batch", 8)))
    with pytest.raises(DimOutOfRange, match="input %b dim 0 \\(batch\\) is 3, but input %a dim 0 gave batch = 2"):
        bind([a, b], {"a": np.zeros((2, 8)), "b": np.zeros((3, 8))}, two.dims)


def test_sizes_at_the_maximum_inside_and_symbolic_again_outside():
    g = _dynamic_graph()
    out = g.outputs[0]
    assert max_nbytes(out.type, g.dims) == 4 * 128 * 8 * 4
    with sized_at_max(g):
        assert out.type.shape == (512, 8)
    assert out.type.shape == ("batch*seq", 8)
    assert concrete_shape(out.type.shape, {"batch": 2, "seq": 3}) == (6, 8)
