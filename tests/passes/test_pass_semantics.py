"""Semantics preserved: random graphs give the same outputs before and after the full pipeline."""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetflow.ir import DType, Graph, TensorType, infer_types, verify
from hetflow.passes import PassRunner
from hetflow.pipeline import PIPELINE
from hetflow.runtime.interpreter import Interpreter

UNARY = ["Relu", "Neg", "Tanh", "Sigmoid", "Abs", "Identity"]
BINARY = ["Add", "Mul", "Sub", "Max"]


def add(graph: Graph, op, inputs, attrs=None):
    node = graph.add_node(op, inputs, [None], attrs=attrs or {})
    node.outputs[0].type = infer_types(node, graph.opset)[0]
    return node.outputs[0]


def weight(graph: Graph, array):
    return graph.add_weight(graph.fresh_name("w"), array)


@st.composite
def random_graphs(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    graph = Graph("random")
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    values = []
    for i in range(draw(st.integers(1, 2))):
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
        values.append(graph.add_input(f"x{i}", TensorType(DType.from_numpy(dtype), shape)))
    for _ in range(draw(st.integers(1, 12))):
        x = draw(st.sampled_from([v for v in values if v.type.rank]))
        shape = x.type.shape
        kind = draw(st.sampled_from(["unary", "binary", "const", "matmul", "reduce", "softmax", "reshape",
                                     "transpose", "neutral", "cast", "folded"]))
        if kind == "unary":
            out = add(graph, draw(st.sampled_from(UNARY)), [x])
        elif kind == "binary":
            same = [v for v in values if v.type.shape == shape]
            other = draw(st.sampled_from(same)) if draw(st.booleans()) else weight(graph, rng.standard_normal(shape[-1:]).astype(dtype))
            out = add(graph, draw(st.sampled_from(BINARY)), [x, other])
        elif kind == "const":
            out = add(graph, "Mul", [x, weight(graph, rng.standard_normal(shape).astype(dtype))])
        elif kind == "matmul":
            out = add(graph, "MatMul", [x, weight(graph, rng.standard_normal((shape[-1], draw(st.integers(1, 4)))).astype(dtype))])
        elif kind == "reduce":
            axis = draw(st.integers(-len(shape), len(shape) - 1))
            out = add(graph, draw(st.sampled_from(["ReduceSum", "ReduceMean", "ReduceMax"])),
                      [x, weight(graph, np.array([axis], np.int64))], {"keepdims": draw(st.sampled_from([0, 1]))})
        elif kind == "softmax":
            out = add(graph, "Softmax", [x], {"axis": -1})
        elif kind == "reshape":
            out = add(graph, "Reshape", [x, weight(graph, np.array([-1], np.int64))])
        elif kind == "transpose":
            perm = list(draw(st.permutations(range(len(shape)))))
            out = add(graph, "Transpose", [x], {"perm": perm})
        elif kind == "neutral":
            op = draw(st.sampled_from(["Add", "Mul"]))
            out = add(graph, op, [x, weight(graph, np.array(0.0 if op == "Add" else 1.0, dtype))])
        elif kind == "cast":
            other = DType.f64 if dtype == np.float32 else DType.f32
            mid = add(graph, "Cast", [x], {"to": other.onnx})
            out = add(graph, "Cast", [mid], {"to": DType.from_numpy(dtype).onnx})
        else:
            a = weight(graph, rng.standard_normal(shape).astype(dtype))
            b = weight(graph, rng.standard_normal(shape).astype(dtype))
            out = add(graph, "Add", [x, add(graph, "Mul", [a, b])])
        values.append(out)
    produced = [v for v in values if v.producer is not None] or values
    graph.outputs = list(dict.fromkeys(draw(st.lists(st.sampled_from(produced), min_size=1, max_size=2))))
    return graph


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs(), st.integers(0, 1000))
def test_pipeline_preserves_semantics(graph, seed):
    verify(graph)
    rng = np.random.default_rng(seed)
    feeds = {v.name: rng.standard_normal(v.type.shape).astype(v.type.dtype.numpy) for v in graph.inputs}
    before = Interpreter(graph).run(feeds)
    output_names = [v.name for v in graph.outputs]
    compiled = PassRunner(list(PIPELINE), verify_each=True).run(graph.clone())
    assert [v.name for v in compiled.outputs] == output_names  # the signature keeps its names
    after = Interpreter(compiled).run(feeds)
    for a, b in zip(before, after):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    again = PassRunner(list(PIPELINE), verify_each=True)
    again.run(compiled)
    assert not any(r.modified for r in again.records), "the pipeline is not idempotent"
