"""The NPU backend (``hetflow.backends.npu``) and its simulator (``hetflow.runtime.runners.npu``): outputs equal
the reference interpreter's, timings equal hand-computed ones on the modelled cycles, bad programs fail in one line."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace

import numpy as np
import pytest

from hetflow.backends.cpu import BackendError
from hetflow.backends.npu import disassemble, emit_npu_program
from hetflow.ir import Graph, Node, TensorType, Value
from hetflow.ir.interpreter import run_graph
from hetflow.ir.ops import infer_types
from hetflow.platform import NPU_SRAM_BYTES, load_platform
from hetflow.runtime.errors import RunnerError
from hetflow.runtime.runners.npu import NpuSimulator, gemm_cycles

NPU = load_platform("mobile-soc").devices["npu"]
RNG = np.random.default_rng(0)


def one_op(op: str, inputs: list, attrs: dict | None = None, weights: tuple = ()) -> tuple[Graph, dict]:
    """A graph of one op: inputs[i] is a weight when i is in ``weights``; returns (graph, feeds)."""
    g = Graph(op.lower())
    values, feeds = [], {}
    for i, a in enumerate(inputs):
        if i in weights:
            values.append(g.add_weight(f"w{i}", a))
        else:
            values.append(g.add_input(f"x{i}", TensorType.of(a)))
            feeds[f"x{i}"] = a
    probe = Node(op, values, [Value("probe", None)], attrs or {})
    types = infer_types(probe, g.opset)
    probe.inputs = []
    node = g.add_node(op, values, types, attrs, output_names=["y"] + [f"y{i}" for i in range(1, len(types))])
    g.outputs = [node.outputs[0]]
    return g, feeds


def simulate(graph: Graph, feeds: dict, device=NPU) -> tuple[list, NpuSimulator]:
    program = emit_npu_program(graph, device)
    sim = NpuSimulator(program, {n: w.data for n, w in graph.weights.items()})
    return sim.run(feeds), sim


def assert_matches(graph: Graph, feeds: dict, rtol=1e-5, atol=1e-6):
    got, sim = simulate(graph, feeds)
    want = run_graph(graph, feeds)
    for g_, w_ in zip(got, want):
        assert g_.shape == w_.shape and g_.dtype == w_.dtype
        np.testing.assert_allclose(g_, w_, rtol=rtol, atol=atol)
    assert sim.last_seconds > 0
    return sim


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 33, 65), (33, 31, 97), (64, 128, 40)])
def test_matmul_odd_sizes(m, k, n):
    sim = assert_matches(*one_op("MatMul", [f32(m, k), f32(k, n)], weights=(1,)))
    assert any(t["op"] == "gemm" for t in sim.trace)


def test_batched_matmul_and_f16():
    assert_matches(*one_op("MatMul", [f32(2, 3, 5, 40), f32(2, 3, 40, 6)]))
    a, b = RNG.standard_normal((9, 70)).astype(np.float16), RNG.standard_normal((70, 33)).astype(np.float16)
    assert_matches(*one_op("MatMul", [a, b], weights=(1,)), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("trans_a,trans_b,bias", [(0, 0, (20,)), (1, 0, (5, 20)), (0, 1, (5, 1)), (1, 1, None)])
def test_gemm(trans_a, trans_b, bias):
    a = f32(37, 5) if trans_a else f32(5, 37)
    b = f32(20, 37) if trans_b else f32(37, 20)
    inputs = [a, b] + ([f32(*bias)] if bias else [])
    assert_matches(*one_op("Gemm", inputs, {"transA": trans_a, "transB": trans_b, "alpha": 0.5, "beta": 2.0},
                           weights=(1, 2)))


def test_vector_ops():
    x = f32(4, 10, 16)
    assert_matches(*one_op("Softmax", [x], {"axis": -1}))
    assert_matches(*one_op("LayerNormalization", [x, f32(16), f32(16)], {"axis": -1, "epsilon": 1e-5},
                           weights=(1, 2)))
    for op in ("Add", "Mul"):
        assert_matches(*one_op(op, [x, f32(16)], weights=(1,)))
    assert_matches(*one_op("Relu", [x]))
    assert_matches(*one_op("Reshape", [x, np.array([4, 160], np.int64)], weights=(1,)))
    assert_matches(*one_op("Transpose", [x], {"perm": [2, 0, 1]}))


def test_a_large_gemm_streams_panels_double_buffered():
    """A weight bigger than the SRAM is cut into panels; loads of panel p+1 run while panel p is on the array."""
    k, n = 1024, 4096   # 16 MiB of f32 weight > 8 MiB SRAM
    graph, feeds = one_op("MatMul", [f32(8, k), f32(k, n)], weights=(1,))
    sim = assert_matches(graph, feeds)
    gemms = [t for t in sim.trace if t["op"] == "gemm"]
    loads = [t for t in sim.trace if t["op"] == "load"]
    assert len(gemms) > 2
    assert any(l["start"] < g["end"] and g["start"] < l["end"] for l in loads for g in gemms)  # overlap
    program = json.loads(emit_npu_program(graph, NPU))
    assert max(b["offset"] + b["bytes"] for b in program["buffers"].values()) <= NPU_SRAM_BYTES


# --- hand-computed timings (modelled cycles, never wall clock) ---------------------------------------

def test_one_gemm_tile():
    """A 32x32 @ 32x32 f16 product: load A, load B, one tile of 32 cycles, store C."""
    a, b = np.ones((32, 32), np.float16), np.ones((32, 32), np.float16)
    graph, feeds = one_op("MatMul", [a, b], weights=(1,))
    _, sim = simulate(graph, feeds)
    clock = 10e12 / (2 * 32 * 32)
    dma = 32 * 32 * 2 / 40e9
    ops = [(t["op"], t["start"], t["end"]) for t in sim.trace]
    assert [o for o, _, _ in ops] == ["load", "load", "gemm", "store"]
    assert ops[1][1] == pytest.approx(dma) and ops[1][2] == pytest.approx(2 * dma)
    assert ops[2][1] == pytest.approx(2 * dma) and ops[2][2] - ops[2][1] == pytest.approx(32 / clock)
    assert ops[3][2] == pytest.approx(3 * dma + 32 / clock)
    assert sim.modelled_seconds == pytest.approx(3 * dma + 32 / clock + NPU.launch)


def test_dma_overlaps_a_gemm_tile():
    """Two panels: the load of panel 1 (DMA) runs during the gemm of panel 0 (array): hand-computed times."""
    small = replace(NPU, bandwidth=2048 * 1e9)     # 2 KiB (one f16 tile) per ns: DMA 1 ns a tile
    # a 32x32 A and a 32x64 B; force 32-wide panels with a small SRAM plan through a 2-panel weight
    from hetflow.backends import npu as npu_backend
    graph, feeds = one_op("MatMul", [np.ones((32, 32), np.float16), np.ones((32, 64), np.float16)], weights=(1,))
    original = npu_backend.plan_gemm
    npu_backend.plan_gemm = lambda *args, **kw: (32, 32)
    try:
        program = emit_npu_program(graph, small)
    finally:
        npu_backend.plan_gemm = original
    sim = NpuSimulator(program, {"w1": graph.weights["w1"].data})
    np.testing.assert_array_equal(sim.run(feeds)[0], run_graph(graph, feeds)[0])
    t = {(x["op"], i): x for i, x in enumerate(sim.trace)}
    ops = [x["op"] for x in sim.trace]
    assert ops == ["load", "load", "load", "gemm", "store", "gemm", "store"]
    tile_s = 32 / (10e12 / 2048)                  # 3.2768 ns
    dma = 1e-9
    load_b1 = sim.trace[2]
    gemm0 = sim.trace[3]
    assert gemm0["start"] == pytest.approx(2 * dma)        # after A and B0
    assert load_b1["start"] == pytest.approx(2 * dma) and load_b1["end"] == pytest.approx(3 * dma)
    assert load_b1["start"] < gemm0["end"]                 # overlapped with the gemm
    store0, gemm1, store1 = sim.trace[4], sim.trace[5], sim.trace[6]
    assert gemm1["start"] == pytest.approx(2 * dma + tile_s)
    assert store0["start"] == pytest.approx(2 * dma + tile_s)
    assert store1["end"] == pytest.approx(2 * dma + 2 * tile_s + dma)
    del t


def time_of(m: int, k: int, n: int, **kw) -> float:
    graph, feeds = one_op("MatMul", [np.ones((m, k), np.float16), np.ones((k, n), np.float16)], weights=(1,))
    _, sim = simulate(graph, feeds, **kw)
    return sum(t["end"] - t["start"] for t in sim.trace if t["op"] == "gemm")


def test_latency_staircase():
    """Array time is constant within each 32-step of M and N (HeteroInfer's Figure 4 shape)."""
    for dim in ("m", "n"):
        times = [time_of(**{"m": 64, "k": 64, "n": 64, dim: x}) for x in range(1, 97)]
        for step in range(3):
            block = times[32 * step:32 * step + 32]
            assert max(block) == pytest.approx(min(block))
        assert times[32] == pytest.approx(2 * times[0]) and times[64] == pytest.approx(3 * times[0])


def test_operand_order_effect():
    """Holding the operand whose reduction dim exceeds its output dim costs the stationary penalty (6x); the
    emitter holds the other one when that is faster."""
    assert gemm_cycles(1, 1024, 512, 64, "b", 32, 6.0) == 6 * gemm_cycles(1, 1024, 512, 64, "a", 32, 6.0)
    graph, _ = one_op("MatMul", [f32(1024, 512), f32(512, 64)], weights=(1,))
    program = json.loads(emit_npu_program(graph, NPU))
    assert {i["stationary"] for i in program["instructions"] if i["op"] == "gemm"} == {"a"}
    # the emitter's choice runs unpenalised; holding the weight (b) would be 6x slower
    assert time_of(1024, 512, 64) == pytest.approx(gemm_cycles(1, 1024, 512, 64, "a", 32, 6.0) * 2048 / 10e12)
    assert gemm_cycles(1, 1024, 512, 64, "b", 32, 6.0) * 2048 / 10e12 == pytest.approx(6 * time_of(1024, 512, 64))
    # a decode-like product whose weight's reduction dim exceeds its output dim has no good order: 6x
    slow = time_of(32, 1024, 256)
    assert slow == pytest.approx(6 * gemm_cycles(1, 32, 1024, 256, "b", 32, 1.0) * 2048 / 10e12)


# --- bad input ------------------------------------------------------------------------------------

def test_sram_over_capacity_names_the_node():
    graph, _ = one_op("Transpose", [f32(1024, 2048)], {"perm": [1, 0]})   # 8 MiB in and out, cannot be cut
    with pytest.raises(BackendError, match=r"node %y \(Transpose\) needs .* bytes of NPU SRAM") as info:
        emit_npu_program(graph, NPU)
    assert "\n" not in str(info.value)


def test_vector_ops_too_large_for_the_sram_are_cut_into_double_buffered_chunks():
    x = f32(1, 64, 50000)   # 12.8 MB in and as much out: over the 8 MiB SRAM
    sim = assert_matches(*one_op("Softmax", [x], {"axis": -1}))
    vectors = [t for t in sim.trace if t["op"] == "vector"]
    loads = [t for t in sim.trace if t["op"] == "load"]
    assert len(vectors) > 2
    assert any(l["start"] < v["end"] and v["start"] < l["end"] for l in loads for v in vectors)
    assert_matches(*one_op("Add", [x, f32(50000)], weights=(1,)))
    assert_matches(*one_op("LayerNormalization", [x, f32(50000), f32(50000)], {"axis": -1}, weights=(1, 2)),
                   rtol=1e-4, atol=1e-5)


def test_a_buffer_beyond_the_sram_is_refused():
    graph, feeds = one_op("Relu", [f32(4, 4)])
    program = json.loads(emit_npu_program(graph, NPU))
    next(iter(program["buffers"].values()))["offset"] = NPU_SRAM_BYTES
    with pytest.raises(RunnerError, match="beyond the SRAM") as info:
        NpuSimulator(json.dumps(program), {})
    assert "\n" not in str(info.value)


def test_a_program_cut_short_is_one_line():
    graph, _ = one_op("Relu", [f32(4, 4)])
    text = emit_npu_program(graph, NPU)
    with pytest.raises(RunnerError, match="malformed or cut short") as info:
        NpuSimulator(text[:len(text) // 2], {})
    assert "\n" not in str(info.value)
    program = json.loads(text)
    del program["instructions"][0]["buffer"]
    with pytest.raises(RunnerError, match=r"instructions\[0\].*buffer"):
        NpuSimulator(json.dumps(program), {})


def test_program_is_deterministic_and_disassembles():
    graph, _ = one_op("Gemm", [f32(5, 37), f32(37, 20), f32(20)], {"alpha": 0.5}, weights=(1, 2))
    text = emit_npu_program(graph, NPU)
    assert text == emit_npu_program(graph, NPU)
    listing = disassemble(text)
    assert "gemm" in listing and "stationary=" in listing and "load" in listing


# --- a real model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_on_mobile_soc():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import hetflow
    from hetflow.examples import models
    module, inputs = models.build_gpt2(n_layer=1, n_embd=128, n_head=2, seq=64, vocab=50)
    compiled = hetflow.compile(module, inputs, platform="mobile-soc", placement="split", time_limit=3)
    compiled(*inputs)   # the partitions are built at the first call
    with torch.no_grad():
        eager = module(*inputs)
    return compiled, inputs, eager


def test_gpt2_partitions_run_on_the_npu_simulator(gpt2_on_mobile_soc):
    compiled, inputs, eager = gpt2_on_mobile_soc
    npu_parts = [p for p in compiled.partitions if p.device == "npu"]
    if not npu_parts:
        pytest.skip("placement put nothing on the NPU")
    assert {p.backend for p in npu_parts} == {"npu"}
    assert all(p.file.endswith(".npu.json") and json.loads(p.source)["format"] == "hetflow-npu" for p in npu_parts)
    got = compiled(*inputs)
    np.testing.assert_allclose(got.numpy(), eager.numpy(), rtol=1e-4, atol=1e-5)


def test_saved_npu_program_is_regenerated_and_a_changed_one_refused(gpt2_on_mobile_soc, tmp_path, capsys):
    from hetflow.runtime import load
    compiled, inputs, eager = gpt2_on_mobile_soc
    npu_parts = [p for p in compiled.partitions if p.backend == "npu"]
    if not npu_parts:
        pytest.skip("placement put nothing on the NPU")
    compiled.save(tmp_path)
    loaded = load(tmp_path)
    out = loaded.run([x.numpy() for x in inputs])
    np.testing.assert_allclose(next(iter(out.values())), eager.numpy(), rtol=1e-4, atol=1e-5)
    import hetflow.cli
    assert hetflow.cli.main(["inspect", str(tmp_path), "--device", "npu"]) == 0
    listing = capsys.readouterr().out
    assert "hetflow-npu v1" in listing and " gemm " in listing and " load " in listing
    path = tmp_path / npu_parts[0].file
    program = json.loads(path.read_text())
    program["instructions"] = program["instructions"][:-1]
    path.write_text(json.dumps(program, sort_keys=True, separators=(",", ":")))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["files"][npu_parts[0].file] = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunnerError, match="differs from the one hetflow generates") as info:
        load(tmp_path)
    assert "\n" not in str(info.value)


# --- the registry ---------------------------------------------------------------------------------

def test_an_npu_runs_the_npu_backend_first():
    from hetflow.backends import EMITTERS, build_partitions
    from hetflow.runtime.runners import FILES, MODULES
    platform = load_platform("mobile-soc")
    assert platform.backends("npu") == ("npu", "simulated")
    assert EMITTERS["npu"].folder_suffix == ".npu.json" and MODULES["npu"] == "npu" and FILES["npu"] == ("source", "text")
    graph, _ = one_op("Relu", [f32(4, 4)])
    graph.nodes[0].meta["device"] = "npu"
    [part] = build_partitions(graph, platform)
    assert (part.backend, part.file) == ("npu", "npu/part0.npu.json")


def test_a_partition_with_dynamic_shapes_falls_back_to_the_interpreter():
    from hetflow.backends import build_partitions
    from hetflow.backends.npu import NpuUnsupported
    from hetflow.ir import DType
    graph = Graph("dynamic")
    x = graph.add_input("x", TensorType(DType.f32, ("batch", 4)))
    node = graph.add_node("Relu", [x], [TensorType(DType.f32, ("batch", 4))], output_names=["y"],
                          meta={"device": "npu"})
    graph.outputs = [node.outputs[0]]
    with pytest.raises(NpuUnsupported, match="static"):
        emit_npu_program(graph, NPU)
    [part] = build_partitions(graph, load_platform("mobile-soc"))
    assert (part.backend, part.file, part.source) == ("simulated", "npu/part0.json", None)


def test_a_fused_groups_intermediates_stay_in_sram():
    body = Graph("body")
    a = body.add_input("a", TensorType.of(f32(8, 16)))
    b = body.add_input("b", TensorType.of(f32(8, 16)))
    t = TensorType.of(f32(8, 16))
    mul = body.add_node("Mul", [a, b], [t], output_names=["t1"])
    relu = body.add_node("Relu", [mul.outputs[0]], [t], output_names=["t2"])
    add = body.add_node("Add", [relu.outputs[0], a], [t], output_names=["t3"])
    body.outputs = [add.outputs[0]]
    graph = Graph("grouped")
    x, y = graph.add_input("x", t), graph.add_input("y", t)
    group = graph.add_node("hetflow.group", [x, y], [t], {"kind": "elementwise", "body": body}, output_names=["z"])
    graph.outputs = [group.outputs[0]]
    feeds = {"x": f32(8, 16), "y": f32(8, 16)}
    sim = assert_matches(graph, feeds)
    ops = [i["op"] for i in sim.program["instructions"]]
    assert ops.count("vector") == 3 and ops.count("store") == 1 and ops.count("load") == 3   # a, b, then a again


def test_the_stationary_penalty_is_the_whole_products_not_a_panels():
    """A weight cut into panels narrower than its reduction dim is not penalised for that: each panel's gemm
    costs its tiles, the sum equal to the whole product's unpenalised cycles."""
    k, n = 2048, 4096   # k <= n: holding the weight is the fast order; panels of < 2048 columns must not change it
    graph, feeds = one_op("MatMul", [f32(128, k), f32(k, n)], weights=(1,))
    _, sim = simulate(graph, feeds)
    gemm_seconds = sum(t["end"] - t["start"] for t in sim.trace if t["op"] == "gemm")
    assert len([t for t in sim.trace if t["op"] == "gemm"]) > 1
    assert gemm_seconds == pytest.approx(gemm_cycles(1, 128, k, n, "b", 32, 6.0) * 2048 / 10e12)


@pytest.mark.parametrize("attrs,bias", [({}, False), ({"pads": [1, 1, 1, 1]}, True),
                                        ({"strides": [2, 2], "pads": [1, 0, 2, 1], "dilations": [1, 2]}, True)])
def test_conv_as_im2col_on_the_array(attrs, bias):
    inputs = [f32(2, 3, 11, 9), f32(5, 3, 3, 3)] + ([f32(5)] if bias else [])
    sim = assert_matches(*one_op("Conv", inputs, attrs, weights=(1, 2)), rtol=1e-4, atol=1e-5)
    ops = [i["op"] for i in sim.program["instructions"]]
    assert "gemm" in ops and {i["kernel"]["op"] for i in sim.program["instructions"] if i["op"] == "vector"} == \
        {"hetflow.npu.Im2Col"}


def test_a_conv_whose_weight_exceeds_the_sram_is_tiled():
    sim = assert_matches(*one_op("Conv", [f32(1, 512, 7, 7), f32(512, 512, 3, 3), f32(512)], {"pads": [1, 1, 1, 1]},
                                 weights=(1, 2)), rtol=1e-4, atol=1e-5)   # 9.4 MB of weight
    assert len([t for t in sim.trace if t["op"] == "gemm"]) > 1


def test_the_public_names():
    from hetflow.backends import npu as backend
    from hetflow.runtime.runners import npu as runner
    assert sorted(backend.__all__) == ["FORMAT", "NpuUnsupported", "disassemble", "emit_npu_program", "plan_gemm"]
    assert sorted(runner.__all__) == ["NpuSimulator", "PROGRAM_SCHEMA", "gemm_cycles", "load_npu", "load_program",
                                      "quantize_activation", "quantize_per_channel"]
    for module in (backend, runner):
        assert all(hasattr(module, name) for name in module.__all__)


def test_a_groups_product_feeding_its_softmax_stays_in_sram():
    body = Graph("attention")
    q = body.add_input("q", TensorType.of(f32(2, 16, 8)))
    k = body.add_input("k", TensorType.of(f32(2, 8, 16)))
    scores = body.add_node("MatMul", [q, k], [TensorType.of(f32(2, 16, 16))], output_names=["s"])
    soft = body.add_node("Softmax", [scores.outputs[0]], [TensorType.of(f32(2, 16, 16))], {"axis": -1},
                         output_names=["p"])
    body.outputs = [soft.outputs[0]]
    graph = Graph("grouped")
    x, y = graph.add_input("x", q.type), graph.add_input("y", k.type)
    group = graph.add_node("hetflow.group", [x, y], [soft.outputs[0].type], {"kind": "attention", "body": body},
                           output_names=["z"])
    graph.outputs = [group.outputs[0]]
    sim = assert_matches(graph, {"x": f32(2, 16, 8), "y": f32(2, 8, 16)})
    assert [i["op"] for i in sim.program["instructions"]] == ["load", "load", "gemm", "vector", "store"]
