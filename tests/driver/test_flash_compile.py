"""tile_flash in the compiler: feed-forward layers beyond a DRAM budget streamed from the artifact's flash image.

The model: an OPT-style stack in ONNX (embedding gather, then per layer a residual ReLU FFN with biases),
small enough to compile in a second, with the ReLU biases shifted so a few percent of neurons fire (the
sparsity a trained OPT has; random weights fire half)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import hetflow
import hetflow.runtime
from hetflow.cli import main
from hetflow.ir.errors import HetflowError
from hetflow.ir.ops import FLASH_FFN_OP
from hetflow.passes.flash_plan import WORKSPACE
from hetflow.passes.tile_flash import find_ffns

HIDDEN, NEURONS, LAYERS, VOCAB, TOKENS = 64, 2048, 4, 256, 4
LAYER_BYTES = 2 * HIDDEN * NEURONS * 4


def ffn_model(seed: int = 0, shift: float = 0.0, tie: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "embed")]
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["h0"])]
    for i in range(LAYERS):
        up = (rng.standard_normal((HIDDEN, NEURONS)) / np.sqrt(HIDDEN)).astype(np.float32)
        b_up = (rng.standard_normal(NEURONS) * 0.1 - shift).astype(np.float32)
        down = (rng.standard_normal((NEURONS, HIDDEN)) / np.sqrt(NEURONS)).astype(np.float32)
        inits += [numpy_helper.from_array(up, f"up{i}"), numpy_helper.from_array(b_up, f"bup{i}"),
                  numpy_helper.from_array(down, f"down{i}"),
                  numpy_helper.from_array(np.zeros(HIDDEN, np.float32) + 0.01 * i, f"bdown{i}")]
        nodes += [helper.make_node("MatMul", [f"h{i}", f"up{i}"], [f"a{i}"]),
                  helper.make_node("Add", [f"a{i}", f"bup{i}"], [f"p{i}"]),
                  helper.make_node("Relu", [f"p{i}"], [f"r{i}"]),
                  helper.make_node("MatMul", [f"r{i}", "up0_t" if (tie and i == 1) else f"down{i}"], [f"d{i}"]),
                  helper.make_node("Add", [f"d{i}", f"bdown{i}"], [f"f{i}"]),
                  helper.make_node("Add", [f"h{i}", f"f{i}"], [f"h{i + 1}"])]
    if tie:   # layer 1's down projection is layer 0's up, transposed: a weight read twice stays resident
        nodes.insert(0, helper.make_node("Transpose", ["up0"], ["up0_t"], perm=[1, 0]))
    graph = helper.make_graph(nodes, "ffn_stack", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, TOKENS])],
                              [helper.make_tensor_value_info(f"h{LAYERS}", TensorProto.FLOAT, [1, TOKENS, HIDDEN])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def swiglu_model(seed: int = 0) -> onnx.ModelProto:
    """Llama's MLP as torch.export writes it: row views around each product, silu as x * sigmoid(x)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "embed"),
             numpy_helper.from_array(np.array([TOKENS, HIDDEN], np.int64), "rows"),
             numpy_helper.from_array(np.array([1, TOKENS, NEURONS], np.int64), "wide3"),
             numpy_helper.from_array(np.array([TOKENS, NEURONS], np.int64), "wide2"),
             numpy_helper.from_array(np.array([1, TOKENS, HIDDEN], np.int64), "narrow3")]
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["h0"])]
    for i in range(LAYERS):
        for name, shape in ((f"gate{i}", (HIDDEN, NEURONS)), (f"up{i}", (HIDDEN, NEURONS)), (f"down{i}", (NEURONS, HIDDEN))):
            inits.append(numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name))
        nodes += [helper.make_node("Reshape", [f"h{i}", "rows"], [f"x{i}"]),
                  helper.make_node("MatMul", [f"x{i}", f"gate{i}"], [f"g{i}"]),
                  helper.make_node("Reshape", [f"g{i}", "wide3"], [f"g3_{i}"]),
                  helper.make_node("Sigmoid", [f"g3_{i}"], [f"s{i}"]),
                  helper.make_node("Mul", [f"g3_{i}", f"s{i}"], [f"silu{i}"]),
                  helper.make_node("MatMul", [f"x{i}", f"up{i}"], [f"u{i}"]),
                  helper.make_node("Reshape", [f"u{i}", "wide3"], [f"u3_{i}"]),
                  helper.make_node("Mul", [f"silu{i}", f"u3_{i}"], [f"m{i}"]),
                  helper.make_node("Reshape", [f"m{i}", "wide2"], [f"m2_{i}"]),
                  helper.make_node("MatMul", [f"m2_{i}", f"down{i}"], [f"d{i}"]),
                  helper.make_node("Reshape", [f"d{i}", "narrow3"], [f"f{i}"]),
                  helper.make_node("Add", [f"h{i}", f"f{i}"], [f"h{i + 1}"])]
    graph = helper.make_graph(nodes, "swiglu_stack", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, TOKENS])],
                              [helper.make_tensor_value_info(f"h{LAYERS}", TensorProto.FLOAT, [1, TOKENS, HIDDEN])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def ids(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (1, TOKENS)).astype(np.int64)


def reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": x})[0]


def resident_budget(extra: int = 0) -> int:
    """A budget holding the embedding, the biases, the workspace and two layers' read buffers, not the layers."""
    return VOCAB * HIDDEN * 4 + 2 * LAYER_BYTES + WORKSPACE + 256 * 1024 + extra


def streamed_nodes(compiled) -> list:
    return [n for n in compiled.graph.nodes if n.op == FLASH_FFN_OP]


def test_find_ffns_takes_relu_layers_and_leaves_a_tied_weight_resident():
    from hetflow.frontends.onnx import import_onnx
    graph = import_onnx(ffn_model())
    assert [m.up.shape for m in find_ffns(graph)] == [(HIDDEN, NEURONS)] * LAYERS
    tied = import_onnx(ffn_model(tie=True))
    found = find_ffns(tied)
    assert len(found) == LAYERS - 2   # layer 0's up and layer 1's down are one weight: neither layer streams


def test_no_budget_no_flash():
    compiled = hetflow.compile(ffn_model(), platform="laptop-ssd")
    assert not streamed_nodes(compiled)
    assert compiled.flash_plan is None


def test_streamed_whole_is_exact_in_process_and_from_the_artifact(tmp_path):
    model, x = ffn_model(), ids()
    compiled = hetflow.compile(model, platform="laptop-ssd", dram_budget=resident_budget())
    nodes = streamed_nodes(compiled)
    assert len(nodes) == LAYERS and all(n.attrs["mode"] == "dense" for n in nodes)
    assert "stream from flash" in compiled.report() and "exact" in compiled.report()
    want = reference(model, x)
    np.testing.assert_allclose(compiled(ids=x)[f"h{LAYERS}"] if isinstance(compiled(ids=x), dict)
                               else compiled(ids=x), want, rtol=1e-5, atol=1e-5)
    compiled.save(tmp_path / "a")
    files = sorted(os.listdir(tmp_path / "a"))
    assert "flash.bin" in files and "flash.json" in files
    from safetensors.numpy import load_file
    held = set(load_file(str(tmp_path / "a" / "weights.safetensors")))
    manifest = json.loads((tmp_path / "a" / "flash.json").read_text())
    assert manifest["weights"] and not held & set(manifest["weights"])   # the streamed weights live in the image only
    loaded = hetflow.runtime.load(tmp_path / "a")
    got = loaded.run({"ids": x})
    np.testing.assert_allclose(next(iter(got.values())), want, rtol=1e-5, atol=1e-5)
    stats = [r.stats() for r in loaded.executor.runners if hasattr(r, "stats")]
    assert len(stats) == LAYERS and all(s["streamed"] and s["bytes_read"] == LAYER_BYTES for s in stats)


def test_a_roomier_budget_keeps_layers_resident():
    compiled = hetflow.compile(ffn_model(), platform="laptop-ssd", dram_budget=resident_budget(LAYER_BYTES + 4096))
    assert 0 < len(streamed_nodes(compiled)) < LAYERS


def test_prediction_is_reported_and_the_artifact_computes_the_spec(tmp_path):
    model, x = ffn_model(shift=1.5), ids()
    compiled = hetflow.compile(model, platform="laptop-ssd", dram_budget=resident_budget(LAYER_BYTES // 2),
                               flash_predict=True)
    nodes = streamed_nodes(compiled)
    assert nodes and all(n.attrs["mode"] == "window" for n in nodes)
    tiling = compiled.flash_plan
    assert all(s["recall"] >= 0.9 for s in tiling.streamed)
    assert "approximate" in compiled.report()
    # the compiled graph run by the reference interpreter (the op's NumPy spec) equals the streamed artifact
    from hetflow.ir.interpreter import Interpreter
    spec = Interpreter(compiled.graph).run({"ids": x})[0]
    compiled.save(tmp_path / "a")
    got = next(iter(hetflow.runtime.load(tmp_path / "a").run({"ids": x}).values()))
    np.testing.assert_allclose(got, spec, rtol=1e-5, atol=1e-5)
    # and stays near the exact model: the stated bound holds on these inputs
    exact = reference(model, x)
    assert np.abs(got - exact).max() / np.abs(exact).max() < 0.25


def test_budget_below_the_resident_minimum_is_one_clear_error():
    with pytest.raises(HetflowError, match="below the resident minimum") as info:
        hetflow.compile(ffn_model(), platform="laptop-ssd", dram_budget=VOCAB * HIDDEN * 2)
    assert "tile_flash" in str(info.value) and len(str(info.value).splitlines()) == 1


def test_a_platform_without_flash_is_refused():
    with pytest.raises(HetflowError, match="no flash"):
        hetflow.compile(ffn_model(), platform="host", dram_budget=resident_budget())


def test_a_budget_that_is_not_a_size_is_refused():
    with pytest.raises(HetflowError, match="dram_budget"):
        hetflow.compile(ffn_model(), platform="laptop-ssd", dram_budget="lots")


def _saved(tmp_path: Path) -> Path:
    compiled = hetflow.compile(ffn_model(), platform="laptop-ssd", dram_budget=resident_budget())
    return compiled.save(tmp_path / "a")


def test_a_tampered_or_truncated_image_is_refused(tmp_path):
    path = _saved(tmp_path)
    image = path / "flash.bin"
    data = bytearray(image.read_bytes())
    data[100] ^= 0xFF
    image.write_bytes(bytes(data))
    with pytest.raises(HetflowError, match="SHA-256"):
        hetflow.runtime.load(path)
    image.write_bytes(bytes(data[:-4096]))
    with pytest.raises(HetflowError, match="bytes, but its manifest says"):
        hetflow.runtime.load(path)


def test_an_image_without_room_is_one_clear_error(tmp_path, monkeypatch):
    compiled = hetflow.compile(ffn_model(), platform="laptop-ssd", dram_budget=resident_budget())

    class Full:
        f_bavail, f_frsize = 1, 4096
    monkeypatch.setattr(os, "statvfs", lambda path: Full())
    with pytest.raises(HetflowError, match="the file system has 4096 free"):
        compiled.save(tmp_path / "a")
    assert not (tmp_path / "a").exists()   # nothing half-written is left where the artifact was to go


def test_flash_edge_places_streamed_layers_with_the_nand_model():
    from hetflow.passes.flash_cost import flash_gemv_on
    compiled = hetflow.compile(ffn_model(), platform="flash-edge", dram_budget=resident_budget())
    costs = [c for c in compiled.placement.costs if c.node.op == FLASH_FFN_OP]
    assert costs
    platform = compiled.platform
    per_token = flash_gemv_on(platform, HIDDEN, NEURONS, "f32") + flash_gemv_on(platform, NEURONS, HIDDEN, "f32")
    launch = platform.device("npu").analytic().launch_for(1)
    assert costs[0].times["npu"] == pytest.approx(TOKENS * per_token + launch)


def test_cli_compile_with_a_budget_then_run(tmp_path, capsys):
    onnx.save(ffn_model(), tmp_path / "m.onnx")
    budget = f"{resident_budget() / (1 << 20):.3f} MiB"
    assert main(["compile", str(tmp_path / "m.onnx"), "--platform", "laptop-ssd", "--dram-budget", budget,
                 "-o", str(tmp_path / "out")]) == 0
    assert "stream from flash" in capsys.readouterr().out
    assert main(["run", str(tmp_path / "out"), "--random", "--trace", str(tmp_path / "trace.json")]) == 0
    assert "FFN layers streamed" in capsys.readouterr().out
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    tracks = {e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    assert "flash reads" in tracks   # the reads beside the partitions that compute


def test_on_flash_edge_an_npu_placed_layer_runs_with_its_time_modelled(tmp_path):
    """Placed on the NPU beside in-flash compute, a streamed layer still computes on the host from the image,
    and its time is the NAND model's (the NPU is simulated here)."""
    from hetflow.platform.nand import gemv_split
    compiled = hetflow.compile(ffn_model(), platform="flash-edge", dram_budget=resident_budget(), devices=["npu"])
    assert all(n.meta["device"] == "npu" for n in streamed_nodes(compiled))
    compiled.save(tmp_path / "a")
    loaded = hetflow.runtime.load(tmp_path / "a")
    x = ids()
    got = next(iter(loaded.run({"ids": x}).values()))
    np.testing.assert_allclose(got, reference(ffn_model(), x), rtol=1e-5, atol=1e-5)
    platform = compiled.platform
    peak = platform.device("npu").peak_for("f32")
    per_token = (gemv_split(HIDDEN, NEURONS, 4, platform.flash, peak).seconds
                 + gemv_split(NEURONS, HIDDEN, 4, platform.flash, peak).seconds)
    modelled = [e.modelled for e in loaded.executor.last.events if e.name.endswith(".flash.json")]
    assert len(modelled) == LAYERS and all(m == pytest.approx(TOKENS * per_token) for m in modelled)


def test_swiglu_layers_stream_exactly_and_refuse_prediction(tmp_path):
    model, x = swiglu_model(), ids()
    budget = resident_budget(LAYER_BYTES)   # three parts a layer: two layers' buffers are 3 * LAYER_BYTES
    compiled = hetflow.compile(model, platform="laptop-ssd", dram_budget=budget)
    nodes = streamed_nodes(compiled)
    assert len(nodes) == LAYERS and all(n.attrs["gated"] == 1 and n.attrs["activation"] == "silu" for n in nodes)
    compiled.save(tmp_path / "a")
    got = next(iter(hetflow.runtime.load(tmp_path / "a").run({"ids": x}).values()))
    want = reference(model, x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()   # f32 rounding of the silu, no more
    with pytest.raises(HetflowError, match="gated"):
        hetflow.compile(model, platform="laptop-ssd", dram_budget=budget, flash_predict=True)


@pytest.mark.parametrize("budget", [True, False], ids=["streamed", "no-budget"])
def test_under_a_budget_cpu_sessions_bind_their_gemm_weights(tmp_path, monkeypatch, budget):
    """An artifact that streams from flash binds every large weight of its CPU sessions, GEMM weights too (ONNX
    Runtime would copy them: the resident part twice over the budget); without a budget GEMM weights stay
    initializers (ONNX Runtime packs them). The size limit is lowered to this model's 512 KiB weights."""
    from hetflow.runtime.runners import onnxruntime as ort_runner
    monkeypatch.setattr(ort_runner, "BOUND_WEIGHT_BYTES", 1 << 16)
    model, x = ffn_model(), ids()
    options = {"dram_budget": resident_budget(LAYER_BYTES + 4096)} if budget else {}
    hetflow.compile(model, platform="laptop-ssd", devices=["cpu"], **options).save(tmp_path / "a")
    loaded = hetflow.runtime.load(tmp_path / "a")
    cpu = [r for r in loaded.executor.runners if isinstance(r, ort_runner.CpuPartition)]
    gemm_weights = [a for r in cpu for a in r.bound_weights.values() if a.shape in ((HIDDEN, NEURONS), (NEURONS, HIDDEN))]
    assert bool(gemm_weights) == budget
    np.testing.assert_allclose(next(iter(loaded.run({"ids": x}).values())), reference(model, x), rtol=1e-5, atol=1e-5)
