"""The IR: values and uses, mutation, the verifier, the text form and serialization round trips."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from hetflow.ir import (DType, Graph, IRError, ParseError, TensorType, VerifyError, graph_difference, load,
                        parse_graph, print_graph, save, verify)

F32 = DType.f32


def t(*shape, dtype=F32):
    return TensorType(dtype, shape)


def mlp_graph() -> Graph:
    g = Graph("mlp")
    x = g.add_input("x", t("batch", 4))
    w = g.add_weight("w", np.arange(12, dtype=np.float32).reshape(4, 3))
    b = g.add_weight("b", np.ones(3, np.float32))
    mm = g.add_node("MatMul", [x, w], [t("batch", 3)], loc="fc")
    add = g.add_node("Add", [mm.outputs[0], b], [t("batch", 3)], loc="fc")
    relu = g.add_node("Relu", [add.outputs[0]], [t("batch", 3)], loc="act", output_names=["y"])
    g.outputs = [relu.outputs[0]]
    return g


def roundtrip_text(g: Graph) -> Graph:
    return parse_graph(print_graph(g), resources={n: w.data for n, w in g.weights.items()})


def test_uses_are_maintained():
    g = mlp_graph()
    x = g.inputs[0]
    mm = g.nodes[0]
    assert x.uses == [(mm, 0)]
    y = g.add_node("Neg", [x], [t("batch", 4)]).outputs[0]
    mm.set_input(0, y)
    assert x.uses == [(g.nodes[-1], 0)] and y.uses == [(mm, 0)]
    g.topological_sort()
    assert g.nodes[0].op == "Neg"
    verify(g)


def test_replace_all_uses_with_updates_graph_outputs():
    g = mlp_graph()
    relu = g.nodes[-1]
    neg = g.add_node("Neg", [relu.inputs[0]], [t("batch", 3)])
    relu.outputs[0].replace_all_uses_with(neg.outputs[0], g)
    assert g.outputs == [neg.outputs[0]]
    g.remove(relu)
    verify(g)


def test_remove_refuses_a_used_node_and_names_its_users():
    g = mlp_graph()
    with pytest.raises(IRError, match=r"still used by Add node"):
        g.remove(g.nodes[0])
    with pytest.raises(IRError, match="graph output"):
        g.remove(g.nodes[-1])


def test_clone_is_equal_and_independent():
    g = mlp_graph()
    c = g.clone()
    assert c == g
    c.nodes[-1].meta["device"] = "npu"
    assert c != g
    assert "meta" in graph_difference(c, g)


def test_verify_catches_a_wrong_declared_type():
    g = mlp_graph()
    g.nodes[0].outputs[0].type = t("batch", 5)
    with pytest.raises(VerifyError, match=r"declares %.*f32\[batch,5\].*MatMul gives f32\[batch,3\]"):
        verify(g)


def test_verify_catches_unknown_and_missing_attributes():
    g = mlp_graph()
    g.nodes[2].attrs["alpha"] = 1.0
    with pytest.raises(VerifyError, match=r"attributes \['alpha'\]"):
        verify(g)
    g = Graph("t")
    x = g.add_input("x", t(2, 2))
    g.outputs = [g.add_node("Transpose", [x], [t(2, 2)], attrs={"bogus": 1}).outputs[0]]
    with pytest.raises(VerifyError, match="bogus"):
        verify(g)


def test_verify_catches_use_before_definition_and_shows_the_ir():
    g = mlp_graph()
    g.nodes.reverse()
    with pytest.raises(VerifyError, match=r"before it is defined") as info:
        verify(g)
    assert "> " in str(info.value)  # the offending line is marked in the IR excerpt


def test_text_roundtrip_of_every_attribute_kind():
    g = Graph("kinds", opset=18)
    x = g.add_input("x with space", TensorType(F32, None))
    y = g.add_input("y", t(None, "n", 3))
    big = g.add_weight("big", np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32))
    small = g.add_weight("small", np.array([1.5, -np.inf, np.nan], np.float32))
    ints = g.add_weight("ints", np.array([1, -2], np.int64))
    strs = g.add_weight("strs", np.array(["a\"b", "ü"], dtype=object))
    node = g.add_node("Custom.Op", [x, None, y, big, small, ints, strs], [t(1), None],
                      attrs={"i": -3, "f": 1e-05, "inf": float("inf"), "s": "quote\" and \\ and ü",
                             "ints": [1, 2], "floats": [0.5, 2.0], "strings": ["a", "b"], "empty": [],
                             "tensor": np.arange(40, dtype=np.int32).reshape(5, 8),
                             "small_tensor": np.array([0.1, 0.2], np.float16)},
                      meta={"device": "npu", "ok": True, "none": None, "times": {"cpu": 1.5, "npu": 2}},
                      loc="model.py:12 (layer.0)")
    g.outputs = [node.outputs[0]]
    back = roundtrip_text(g)
    assert graph_difference(back, g) is None
    assert "weight %big: f32[5,7] = resource" in print_graph(g)


def test_text_roundtrip_of_nested_graphs():
    body = mlp_graph()
    g = Graph("outer")
    x = g.add_input("x", t(2, 4))
    g.outputs = [g.add_node("hetflow.group", [x], [t(2, 3)], attrs={"kind": "contraction", "body": body},
                            meta={"device": "cpu"}).outputs[0]]
    back = roundtrip_text(g)
    assert back == g


def test_parse_errors_name_line_and_column():
    text = print_graph(mlp_graph()).replace("%x, %w", "%x, %nope")
    with pytest.raises(ParseError, match=r"line \d+, column \d+: use of undefined value %nope"):
        parse_graph(text, resources={"w": np.zeros((4, 3), np.float32)})
    with pytest.raises(ParseError, match="no data was given"):
        parse_graph(print_graph(mlp_graph()).replace("dense<f32[3]: [1.0, 1.0, 1.0]>", "resource"))


def test_save_load_roundtrip(tmp_path):
    g = mlp_graph()
    save(g, tmp_path)
    assert load(tmp_path) == g


def _onnx_node_test_graphs(every: bool = True):
    """The ONNX backend node tests' graphs that hetflow imports; with ``every=False`` the first graph of each
    distinct set of op types (about 280 of the 1,700: every op, and every op pair the tests combine)."""
    from hetflow.conformance import node_test_cases
    from hetflow.frontends.onnx import import_onnx
    from hetflow.ir import HetflowError
    graphs, seen = [], set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in node_test_cases():
            ops = frozenset(n.op_type for n in case.model.graph.node)
            if not every and ops in seen:
                continue
            try:
                graphs.append((case.name, import_onnx(case.model)))
            except HetflowError:
                continue
            seen.add(ops)
    return graphs


def _roundtrip_each(graphs, tmp_path):
    for name, g in graphs:
        verify(g)
        diff = graph_difference(roundtrip_text(g), g)
        assert diff is None, f"{name}: text round trip: {diff}"
        save(g, tmp_path / name)
        diff = graph_difference(load(tmp_path / name), g)
        assert diff is None, f"{name}: save/load: {diff}"


def test_each_op_set_of_the_onnx_test_graphs_roundtrips_and_verifies(tmp_path):
    graphs = _onnx_node_test_graphs(every=False)
    assert len(graphs) > 200
    _roundtrip_each(graphs, tmp_path)


@pytest.mark.slow
def test_every_onnx_test_graph_roundtrips_and_verifies(tmp_path):
    graphs = _onnx_node_test_graphs()
    assert len(graphs) > 1500
    _roundtrip_each(graphs, tmp_path)
