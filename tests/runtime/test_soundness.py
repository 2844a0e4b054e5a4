"""Correctness under concurrency: plans sound by the runtime's order, the plan checker, a safe executor."""
from __future__ import annotations

import _thread
import json
import re
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import hetflow
from hetflow.api import CompiledModel
from hetflow.frontends.onnx import import_onnx
from hetflow.ir import DType, Graph, TensorType, infer_types
from hetflow.runtime.artifact import ArtifactError
from hetflow.passes import CompileOptions
from hetflow.passes.partition import device_runs
from hetflow.pipeline import run_pipeline
from hetflow.platform import load_platform
from hetflow.runtime import load
from hetflow.runtime.executor import RuntimeFailure
from hetflow.runtime.plancheck import PlanError, check_memory_plan

MOBILE = ("cpu", "gpu", "npu")


def _model(width=64, rows=16, layers=4, seed=0):
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((width, width)) / 8).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"]),
                  helper.make_node("Tanh", [f"h{i}"], [f"a{i}"]),
                  helper.make_node("Sigmoid", [f"h{i}"], [f"r{i}"]),
                  helper.make_node("Add", [f"a{i}", f"r{i}"], [f"s{i}"])]
        x = f"s{i}"
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [rows, width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    weights = [numpy_helper.to_array(w) for w in inits]

    def reference(x):
        for w in weights:
            h = x @ w
            x = np.tanh(h) + 1 / (1 + np.exp(-h))
        return x
    return model, reference


def _placed(model, devices, platform="mobile-soc"):
    """A CompiledModel whose fused groups are placed round-robin on ``devices`` (every device used)."""
    options = CompileOptions(platform=load_platform(platform))
    graph, _ = run_pipeline(import_onnx(model), ["canonicalize"], options=options)
    for i, node in enumerate(graph.nodes):
        node.meta["device"] = devices[i % len(devices)]
    graph, _ = run_pipeline(graph, ["schedule", "plan_memory"], verify_each=True, options=options)
    hetflow.api.check_plan(graph, options.platform, options.results["memory_plan"])
    return CompiledModel(graph, options.platform, None, 0.0, options)


# --- the plan checker ----------------------------------------------------------------------------

def _add(graph, op, inputs):
    node = graph.add_node(op, inputs, [None], {})
    node.outputs[0].type = infer_types(node, graph.opset)[0]
    return node


def _branches():
    """cpu: a = Relu(x); npu: b = Tanh(x); cpu: c = Sigmoid(a); npu: d = Exp(b); cpu: Add(c, d)."""
    g = Graph("branches")
    x = g.add_input("x", TensorType(DType.f32, (16, 16)))
    a = _add(g, "Relu", [x])
    b = _add(g, "Tanh", [x])
    c = _add(g, "Sigmoid", [a.outputs[0]])
    d = _add(g, "Exp", [b.outputs[0]])
    out = _add(g, "Add", [c.outputs[0], d.outputs[0]])
    g.outputs = [out.outputs[0]]
    for node, device in zip(g.nodes, ["cpu", "npu", "cpu", "npu", "cpu"]):
        node.meta["device"] = device
    parts = [(dev, [n.outputs[0].name for n in nodes]) for dev, nodes in device_runs(g)]
    return g, parts, [n.outputs[0].name for n in g.nodes]


def test_checker_refuses_reuse_that_only_predicted_times_order():
    g, parts, (a, b, c, d, out) = _branches()
    # a's last reader (c, on the CPU) and d's writer (on the NPU) are ordered by nothing the runtime
    # enforces, though a timeline may well predict c before d
    plan = {"lpddr": {"size": 4096, "offsets": {a: 0, b: 1024, c: 2048, d: 0, out: 3072}}}
    with pytest.raises(PlanError) as info:
        check_memory_plan(g, parts, plan, lambda device: "lpddr")
    message = str(info.value)
    assert "\n" not in message
    assert f"%{a} (cpu)" in message and f"%{d} (npu)" in message and "'lpddr'" in message
    # the same bytes for values a queue orders (a dies at c; c's partition precedes out's on the CPU) pass
    plan = {"lpddr": {"size": 4096, "offsets": {a: 0, b: 1024, c: 2048, d: 3072, out: 0}}}
    assert check_memory_plan(g, parts, plan, lambda device: "lpddr") == 1


def test_checker_refuses_misplaced_and_out_of_bounds_values():
    g, parts, (a, b, c, d, out) = _branches()
    offsets = {a: 0, b: 1024, c: 2048, d: 3072, out: 4096}
    with pytest.raises(PlanError, match="past the arena"):
        check_memory_plan(g, parts, {"lpddr": {"size": 4096, "offsets": offsets}}, lambda device: "lpddr")
    with pytest.raises(PlanError, match="not aligned"):
        check_memory_plan(g, parts, {"lpddr": {"size": 8192, "offsets": {**offsets, c: 2050}}},
                          lambda device: "lpddr")
    with pytest.raises(PlanError, match="its producer"):
        check_memory_plan(g, parts, {"lpddr": {"size": 8192, "offsets": offsets}},
                          lambda device: "sram" if device == "npu" else "lpddr")


@st.composite
def placed_graphs(draw):
    g = Graph("random")
    values = [g.add_input("x", TensorType(DType.f32, (8, 8)))]
    w = g.add_weight("w", np.ones((8, 8), np.float32))
    for _ in range(draw(st.integers(2, 14))):
        op = draw(st.sampled_from(["Relu", "Tanh", "Add", "Mul", "MatMul"]))
        first = draw(st.sampled_from(values))
        inputs = [first] if op in ("Relu", "Tanh") else [first, w if op == "MatMul" else draw(st.sampled_from(values))]
        node = _add(g, op, inputs)
        node.meta["device"] = draw(st.sampled_from(MOBILE))
        values.append(node.outputs[0])
    produced = values[1:]
    g.outputs = draw(st.lists(st.sampled_from(produced), min_size=1, max_size=3, unique_by=lambda v: v.name))
    return g


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(placed_graphs())
def test_every_plan_the_planner_makes_passes_the_checker(graph):
    platform = load_platform("mobile-soc")
    options = CompileOptions(platform=platform)
    graph, _ = run_pipeline(graph, ["schedule", "plan_memory"], options=options)
    parts = [(dev, [n.outputs[0].name for n in nodes]) for dev, nodes in device_runs(graph)]
    plan = options.results["memory_plan"].as_manifest()
    note(f"{graph}\n{parts}\n{plan}")
    check_memory_plan(graph, parts, plan, platform.memory_space)


# --- the executor --------------------------------------------------------------------------------

def test_three_devices_compute_the_model():
    model, reference = _model()
    compiled = _placed(model, MOBILE)
    assert {p.device for p in compiled._build_partitions()} == set(MOBILE)
    x = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    np.testing.assert_allclose(compiled(x), reference(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("where", ["host", "mobile-soc"])
def test_four_threads_share_one_loaded_model(tmp_path, where):
    model, reference = _model()
    compiled = hetflow.compile(model, platform="host") if where == "host" else _placed(model, MOBILE)
    compiled.save(tmp_path / "m")
    loaded = load(tmp_path / "m")
    assert len({p.device for p in loaded.partitions}) == (1 if where == "host" else 3)
    rng = np.random.default_rng(2)
    inputs = [rng.standard_normal((16, 64)).astype(np.float32) for _ in range(8)]
    expected = [reference(x) for x in inputs]
    wrong, failures = [], []

    def caller(k):
        try:
            for i in range(200):
                j = (k + i) % len(inputs)
                y = loaded.run({"x": inputs[j]})["s3"]
                if not np.allclose(y, expected[j], rtol=1e-4, atol=1e-5):
                    wrong.append((k, i))
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a call hung"
    assert not failures, failures[0]
    assert not wrong, f"{len(wrong)} of 800 calls were wrong"


def test_a_failed_run_leaves_the_model_usable():
    model, reference = _model()
    compiled = _placed(model, MOBILE)
    executor = compiled.executor
    index = next(i for i, p in enumerate(executor.partitions) if p.device == "gpu")
    runner = executor.runners[index]
    real = runner.run
    calls = []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("injected failure")
        return real(*args, **kwargs)

    runner.run = fail_once
    x = np.random.default_rng(3).standard_normal((16, 64)).astype(np.float32)
    with pytest.raises(RuntimeFailure, match=f"partition {index} .*injected failure"):
        compiled(x)
    for _ in range(3):
        np.testing.assert_allclose(compiled(x), reference(x), rtol=1e-4, atol=1e-5)


def test_a_wait_is_bounded_and_names_the_partition_and_value():
    model, _ = _model()
    compiled = _placed(model, MOBILE)
    executor = compiled.executor
    executor.wait_timeout = 0.5
    index = next(i for i, p in enumerate(executor.partitions) if p.device == "gpu")
    runner = executor.runners[index]
    real = runner.run
    hang = threading.Event()

    def stuck(*args, **kwargs):
        if not hang.is_set():
            time.sleep(3.0)  # "never" finishes, as far as a 0.5 s bound is concerned
        return real(*args, **kwargs)

    runner.run = stuck
    x = np.zeros((16, 64), np.float32)
    began = time.perf_counter()
    with pytest.raises(RuntimeFailure) as info:
        compiled(x)
    assert time.perf_counter() - began < 2.5
    message = str(info.value)
    # the waiter names the value and the stuck GPU queue's partition it waited for (the stuck one or one behind it)
    assert re.search(r"waited [\d.]+ s for %\w+ from partition \d+ \(\S+, device gpu\) and gave up", message), message
    hang.set()
    executor.wait_timeout = 30.0
    assert compiled(x).shape == (16, 64)  # the next run joins the straggler first; the model still runs


def test_ctrl_c_stops_the_run_and_the_model_stays_usable():
    model, reference = _model()
    compiled = _placed(model, MOBILE)
    executor = compiled.executor
    index = next(i for i, p in enumerate(executor.partitions) if p.device == "npu")
    runner = executor.runners[index]
    real = runner.run
    slow = threading.Event()
    slow.set()

    def slowly(*args, **kwargs):
        if slow.is_set():
            time.sleep(0.5)
        return real(*args, **kwargs)

    runner.run = slowly
    x = np.random.default_rng(4).standard_normal((16, 64)).astype(np.float32)
    threading.Timer(0.2, _thread.interrupt_main).start()
    began = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        compiled(x)
    assert time.perf_counter() - began < 3.0
    slow.clear()
    np.testing.assert_allclose(compiled(x), reference(x), rtol=1e-4, atol=1e-5)


def _saved(tmp_path):
    model, reference = _model()
    compiled = _placed(model, MOBILE)
    path = compiled.save(tmp_path / "m")
    manifest = json.loads((path / "manifest.json").read_text())
    return path, manifest, reference


def test_an_artifact_whose_plan_overlaps_live_values_is_refused(tmp_path):
    path, manifest, _ = _saved(tmp_path)
    for space in manifest["memory_plan"].values():
        space["offsets"] = {name: 0 for name in space["offsets"]}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PlanError) as info:
        load(path)
    assert "\n" not in str(info.value) and "share bytes" in str(info.value)


def test_an_artifact_whose_plan_misses_a_value_is_refused(tmp_path):
    path, manifest, _ = _saved(tmp_path)
    space = next(iter(manifest["memory_plan"].values()))
    space["offsets"].pop(next(iter(space["offsets"])))
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeFailure, match="has no offset for"):
        load(path)


def test_a_huge_predicted_time_neither_hangs_nor_sleeps(tmp_path):
    path, manifest, reference = _saved(tmp_path)
    for entry in manifest["partitions"]:
        entry["predicted_start_us"] = 1e12
        entry["predicted_end_us"] = 1e12
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"predicted_start_us: 1000000000000.0 is out of range"):
        load(path)  # beyond a day: refused by the manifest's schema
    for entry in manifest["partitions"]:
        entry["predicted_start_us"] = 8e10  # under the cap, and still no wait sleeps that long
        entry["predicted_end_us"] = 8e10
    (path / "manifest.json").write_text(json.dumps(manifest))
    loaded = load(path)
    x = np.random.default_rng(5).standard_normal((16, 64)).astype(np.float32)
    began = time.perf_counter()
    y = loaded.run({"x": x})["s3"]
    assert time.perf_counter() - began < 5.0
    np.testing.assert_allclose(y, reference(x), rtol=1e-4, atol=1e-5)
