"""Large weights no packing kernel reads are bound as graph inputs (ONNX Runtime reads hetflow's buffer where it
lies instead of copying it); the CPU sessions of one process share one arena."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import hetflow
from hetflow.ir.program import inline_weight
from hetflow.runtime import load
from hetflow.runtime.interpreter import Interpreter
from hetflow.runtime.runners import onnxruntime as ort_runner
from hetflow.runtime.runners.onnxruntime import BOUND_WEIGHT_BYTES, CpuPartition, bind_large_weights

ROWS, WIDTH = 1024, 512          # the table: 2 MiB of f32, past BOUND_WEIGHT_BYTES


def _lookup_and_project() -> onnx.ModelProto:
    """ids -> Gather(table) -> Add(bias) -> MatMul(w): a table only a Gather reads, a projection a MatMul reads,
    both larger than BOUND_WEIGHT_BYTES, and a small bias."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((ROWS, WIDTH)).astype(np.float32)
    w = (rng.standard_normal((WIDTH, ROWS)) / 16).astype(np.float32)
    bias = rng.standard_normal(WIDTH).astype(np.float32)
    assert table.nbytes >= BOUND_WEIGHT_BYTES and w.nbytes >= BOUND_WEIGHT_BYTES > bias.nbytes
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"], name="lookup"),
             helper.make_node("Add", ["rows", "bias"], ["shifted"], name="shift"),
             helper.make_node("MatMul", ["shifted", "w"], ["y"], name="project")]
    graph = helper.make_graph(nodes, "lookup", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, ROWS])],
                              [numpy_helper.from_array(a, n) for a, n in ((table, "table"), (w, "w"), (bias, "bias"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _ids(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, ROWS, (1, 8)).astype(np.int64)


def _cpu_runner(model):
    cpu = [r for r in model.executor.runners if isinstance(r, CpuPartition)]
    assert len(cpu) == 1
    return cpu[0]


def test_the_table_is_bound_the_projection_handed_over_and_both_paths_exact(tmp_path):
    onnx_model = _lookup_and_project()
    hetflow.compile(onnx_model, platform="host").save(tmp_path / "a")
    reference = Interpreter(hetflow.frontends.onnx.import_onnx(onnx_model))
    model = load(tmp_path / "a", threads=1)
    runner = _cpu_runner(model)
    assert [a.shape for a in runner.bound_weights.values()] == [(ROWS, WIDTH)]   # the table only
    bound_name = next(iter(runner.bound_weights))
    assert bound_name in [i.name for i in runner.session.get_inputs()]
    for seed in range(3):
        ids = _ids(seed)
        want = reference.run({"ids": ids})[0]
        np.testing.assert_allclose(next(iter(model.run({"ids": ids}).values())), want, rtol=1e-5, atol=1e-5)
        got = runner.run_dynamic({n: ids for n in runner.input_names})          # the path without IOBinding
        np.testing.assert_allclose(next(iter(got.values())), want, rtol=1e-5, atol=1e-5)


def test_a_bound_weight_is_read_where_it_lies(tmp_path):
    """Change the table in place after the session exists: the next call sees the change (it was never copied)."""
    onnx_model = _lookup_and_project()
    hetflow.compile(onnx_model, platform="host").save(tmp_path / "a")
    part = next(p for p in load(tmp_path / "a", threads=1).executor.partitions if p.backend == "cpu")
    weights = {n: np.array(w.data) for n, w in part.graph.weights.items() if not inline_weight(w)}   # writable copies
    runner = CpuPartition(part.onnx_bytes, weights, part.input_names, part.output_names, threads=1)
    table = runner.bound_weights[next(iter(runner.bound_weights))]
    ids = _ids(0)
    before = next(iter(runner.run_dynamic({part.input_names[0]: ids}).values())).copy()
    table += 1.0
    after = next(iter(runner.run_dynamic({part.input_names[0]: ids}).values()))
    assert not np.allclose(before, after)


def test_what_stays_an_initializer():
    """A weight a packing kernel also reads, one a subgraph reads, one a constant-only node reads and one under
    the size stay initializers."""
    big = np.zeros((ROWS, WIDTH), np.float32)
    small = np.zeros(16, np.float32)
    branch = helper.make_graph([helper.make_node("Identity", ["inner"], ["out"])], "branch", [],
                               [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Gather", ["shared", "ids"], ["a"]),
             helper.make_node("MatMul", ["a", "shared_t"], ["b"]),
             helper.make_node("Gather", ["shared_t", "ids"], ["c"]),
             helper.make_node("Gather", ["small", "ids"], ["d"]),
             helper.make_node("If", ["flag"], ["e"], then_branch=branch, else_branch=branch),
             helper.make_node("Gather", ["inner", "ids"], ["f"]),
             helper.make_node("Gather", ["alone", "ids"], ["g"]),
             helper.make_node("Gather", ["folded", "const_ids"], ["h"])]
    inits = [numpy_helper.from_array(big, "shared"), numpy_helper.from_array(big.T.copy(), "shared_t"),
             numpy_helper.from_array(small, "small"), numpy_helper.from_array(big, "inner"),
             numpy_helper.from_array(big, "alone"), numpy_helper.from_array(big, "folded"),
             numpy_helper.from_array(np.array([0, 1], np.int64), "const_ids")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "bcdefgh"], inits)
    weights = {t.name: numpy_helper.to_array(t) for t in inits}
    rewritten, bound = bind_large_weights(helper.make_model(graph).SerializeToString(), weights)
    # shared_t: a MatMul reads it; small: under the size; inner: a subgraph; folded: a node of constants only
    assert bound == ["shared", "alone"]
    model = onnx.load_from_string(rewritten)
    assert {t.name for t in model.graph.initializer} == {"shared_t", "small", "inner", "folded", "const_ids"}
    assert [i.name for i in model.graph.input] == ["ids", "flag", "shared", "alone"]
    assert [d.dim_value for d in model.graph.input[2].type.tensor_type.shape.dim] == [ROWS, WIDTH]
    _, bound_all = bind_large_weights(helper.make_model(graph).SerializeToString(), weights, packed_too=True)
    assert bound_all == ["shared", "shared_t", "alone"]    # under a budget the MatMul's weight is bound too
    unchanged = helper.make_model(helper.make_graph([helper.make_node("Gather", ["small", "ids"], ["d"])], "g",
                                                    graph.input[:1], graph.output[2:3], inits[2:3]))
    assert bind_large_weights(unchanged.SerializeToString(), {"small": small}) == (unchanged.SerializeToString(), [])


def test_sessions_share_one_arena():
    assert ort_runner._shared_cpu_arena() is True     # this process registered it (nothing else here did)
    assert ort_runner._shared_cpu_arena() is True     # once
