"""The lean call path (``runtime.prebound``): a one-partition artifact's call decided at load, still exact and safe."""
from __future__ import annotations

import threading
import weakref

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
import pytest

import hetflow
from hetflow.runtime import InputError, load
from hetflow.runtime.interpreter import Interpreter
from hetflow.runtime.prebound import STAGE_BYTES, PreboundCall
from hetflow.runtime.runners.onnxruntime import FixedBinding

from ..onnx_models import mlp_model
from .test_soundness import _model, _placed


def _artifact(tmp_path, batch: int, width: int = 64, name: str = "out"):
    model = mlp_model(width=width, layers=2, batch=batch)
    hetflow.compile(model, platform="host").save(tmp_path / name)
    reference = Interpreter(hetflow.frontends.onnx.import_onnx(model))
    return load(tmp_path / name, threads=1), lambda x: reference.run({"x": x})[0]


def _inputs(count: int, batch: int, width: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, width)).astype(np.float32) for _ in range(count)]


@pytest.mark.parametrize("batch", [8, 128], ids=["staged", "pointer-bound"])
def test_lean_path_is_taken_and_matches_the_interpreter(tmp_path, batch):
    model, expected = _artifact(tmp_path, batch)
    assert model.executor.lean_refused is None and model.executor.lean is not None
    staged = batch * 64 * 4 <= STAGE_BYTES
    assert (model.executor.lean.inputs[0][2] is not None) == staged
    for x in _inputs(3, batch):
        out = model.run({"x": x})
        np.testing.assert_allclose(next(iter(out.values())), expected(x), rtol=1e-5, atol=1e-5)
    assert len(model.executor.last.events) == 1  # the record is made when asked for


@pytest.mark.parametrize("batch", [8, 128], ids=["staged", "pointer-bound"])
def test_an_input_changed_in_place_is_read_again(tmp_path, batch):
    model, expected = _artifact(tmp_path, batch)
    x = _inputs(1, batch)[0]
    first = model.run({"x": x})
    x *= -0.5                              # the same array object, new values
    second = model.run({"x": x})
    np.testing.assert_allclose(next(iter(second.values())), expected(x), rtol=1e-5, atol=1e-5)
    assert not np.array_equal(next(iter(first.values())), next(iter(second.values())))


def test_a_kept_result_is_never_overwritten_and_a_dropped_one_is_reused(tmp_path):
    model, expected = _artifact(tmp_path, 8)
    x1, x2 = _inputs(2, 8)
    kept = next(iter(model.run({"x": x1}).values()))
    other = next(iter(model.run({"x": x2}).values()))
    assert kept is not other
    np.testing.assert_allclose(kept, expected(x1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(other, expected(x2), rtol=1e-5, atol=1e-5)
    del kept, other
    slot = weakref.ref(model.executor.lean.outputs[0])  # (a reference of our own would count as kept)
    model.run({"x": x1})                      # result dropped at once: the bound array is written again
    model.run({"x": x2})
    assert model.executor.lean.outputs[0] is slot()


def test_inputs_of_another_form_take_the_checked_path_with_the_same_result(tmp_path):
    model, expected = _artifact(tmp_path, 128)
    x = _inputs(1, 128, seed=3)[0]
    want = expected(x)
    transposed = np.ascontiguousarray(x.T).T  # same values, not C-contiguous
    for feeds in ({"x": x}, [x], (x,), {"x": transposed}, {"x": np.ma.asarray(x)}):
        got = next(iter(model.run(feeds).values()))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("feeds, message", [
    ({"x": np.zeros((8, 64), np.float64)}, "input 'x': expected dtype f32"),
    ({"x": np.zeros((8, 63), np.float32)}, "input 'x': expected shape"),
    ({"x": np.zeros((8, 64), np.float32), "y": np.zeros(1)}, "unknown input 'y'"),
    ({}, "missing input 'x'"),
])
def test_wrong_inputs_are_still_one_line_errors_naming_the_input(tmp_path, feeds, message):
    model, _ = _artifact(tmp_path, 8)
    with pytest.raises(InputError, match=message):
        model.run(feeds)


def test_without_onnxruntime_c_handles_the_public_binding_runs_the_same(tmp_path):
    model, expected = _artifact(tmp_path, 8)
    x = _inputs(1, 8, seed=5)[0]
    executor, runner = model.executor, model.executor.runners[0]
    runner.fixed_binding = lambda: FixedBinding(runner, c_handles=False)  # as if ORT's wrappers lacked them
    executor.lean = PreboundCall(executor, runner, executor.partitions[0])
    assert executor.lean.binding._c_binding is None
    np.testing.assert_allclose(next(iter(model.run({"x": x}).values())), expected(x), rtol=1e-5, atol=1e-5)


def test_concurrent_callers_each_get_their_own_result(tmp_path):
    model, expected = _artifact(tmp_path, 8)
    inputs = _inputs(4, 8, seed=7)
    wants = [expected(x) for x in inputs]
    failures = []

    def caller(i):
        for _ in range(25):
            got = next(iter(model.run({"x": inputs[i]}).values()))
            if not np.allclose(got, wants[i], rtol=1e-5, atol=1e-5):
                failures.append(i)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_programs_the_lean_path_does_not_fit_say_why_and_still_run():
    model, reference = _model()
    several = _placed(model, ("cpu", "gpu"))
    assert several.executor.lean is None
    assert several.executor.lean_refused == f"{len(several.executor.partitions)} partitions"
    x = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    np.testing.assert_allclose(several(x), reference(x), rtol=1e-4, atol=1e-5)

    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(mlp_model(width=32, layers=1))
    dynamic.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    dynamic.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    compiled = hetflow.compile(dynamic, platform="host", dynamic_shapes={"batch": (1, 8)})
    assert compiled.executor.lean is None and compiled.executor.lean_refused == "the graph has dynamic shapes"
    assert compiled(np.ones((3, 32), np.float32)).shape == (3, 32)


def test_an_output_bound_as_a_view_of_another_shape(tmp_path):
    """The partition writes %r's [4,16] into the output %y (its Reshape to [2,32]) through one buffer."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((16, 16)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["y"])]
    graph = helper.make_graph(nodes, "view", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])],
                              [numpy_helper.from_array(weight, "w"),
                               numpy_helper.from_array(np.array([2, 32], np.int64), "shape")])
    hetflow.compile(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])).save(tmp_path / "v")
    model = load(tmp_path / "v")
    assert model.executor.lean is not None and model.executor.runners[0].view_shapes == {"y": (4, 16)}
    for x in _inputs(2, 4, width=16, seed=9):
        np.testing.assert_allclose(model.run({"x": x})["y"], np.maximum(x @ weight, 0).reshape(2, 32),
                                   rtol=1e-5, atol=1e-5)
