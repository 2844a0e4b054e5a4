"""The simulated cost model (``cost_model="sim"``), platform files over a preset (``base``), the analytic
figures fitted to the simulators (``hetflow calibrate --platform P``) and the NPU's operand-order DMA."""
from __future__ import annotations

import json

import numpy as np
import pytest

import hetflow
from hetflow.api import CompileError, compile_graph
from hetflow.examples.decode_graphs import build_gpt2_decode_step
from hetflow.ir import DType, Graph, TensorType
from hetflow.ir.graph import extract_subgraph
from hetflow.passes import CompileOptions
from hetflow.passes.cost import cost_node
from hetflow.pipeline import run_pipeline
from hetflow.platform import PlatformError, load_platform
from hetflow.simulated_cost import cache_entries, cache_info, clear_cache, merge_cache, structure


def _decode(layers: int = 2):
    return build_gpt2_decode_step(layers=layers, hidden=256, heads=4, context=32, vocab=100)


def _run_partition_ratios(compiled) -> list[float]:
    """Simulator time / the schedule's prediction for each PIM or NPU partition, after one run."""
    feeds = {v.name: np.zeros(v.type.shape, v.type.dtype.numpy) for v in compiled.graph.inputs}
    compiled.executor.run(feeds)
    events = {e.name: e for e in compiled.executor.last.events}
    return [events[p.file].modelled / (p.predicted_end - p.predicted_start) for p in compiled.partitions
            if p.backend in ("npu", "pim")]


def test_sim_cost_model_makes_placement_agree_with_the_simulated_run():
    simulated = _run_partition_ratios(compile_graph(_decode(), "pim-gpt", cost_model="sim"))
    assert simulated and all(abs(r - 1) < 0.05 for r in simulated), simulated
    analytic = _run_partition_ratios(compile_graph(_decode(), "pim-gpt"))  # the preset's figures: off by ~1.5-2x
    assert np.median(analytic) > 1.2, analytic


def test_sim_cost_model_times_repeated_layers_once_and_says_so_in_the_report():
    clear_cache()
    compiled = compile_graph(_decode(layers=3), "pim-gpt", cost_model="sim")
    info = cache_info()
    assert info["hits"] > 0 and info["entries"] < info["hits"] + info["misses"]
    report = compiled.report()
    assert "cost model: sim" in report and "on pim" in report
    assert " sim " in report or " sim\n" in report   # the placement table marks the simulated times
    placed = [c for c in compiled.placement.costs if "pim" in c.simulated]
    assert placed and all(c.times["pim"] == c.simulated["pim"] for c in placed)
    assert "cost model: analytic" in compile_graph(_decode(), "pim-gpt").report()


def test_probe_times_merged_from_another_process_are_hits_with_the_same_result():
    clear_cache()
    first = compile_graph(_decode(), "pim-gpt", cost_model="sim")
    learnt = cache_entries()
    assert learnt and cache_entries(leave_out=set(learnt)) == {}
    clear_cache()
    merge_cache(learnt)                                     # as a sweep worker starts from the study's table
    again = compile_graph(_decode(), "pim-gpt", cost_model="sim")
    assert cache_info()["misses"] == 0 and cache_info()["hits"] > 0
    assert again.schedule.makespan == first.schedule.makespan
    assert [n.meta.get("device") for n in again.graph.nodes] == [n.meta.get("device") for n in first.graph.nodes]


def test_structure_ignores_names_but_not_shapes():
    options = CompileOptions(load_platform("pim-gpt"))
    fused, _ = run_pipeline(_decode(layers=2), "canonicalize,fuse", options=options)
    gemms = [n for n in fused.nodes if n.op == "Gemm"]
    texts = [structure(extract_subgraph(fused, [n], f"g{i}")[0]) for i, n in enumerate(gemms)]
    assert len(gemms) == 2 and texts[0] == texts[1]          # the same projection in layers 0 and 1
    everything = {structure(extract_subgraph(fused, [n], "g")[0]) for n in fused.nodes}
    assert texts[0] in everything and len(everything) > 3    # groups of other ops or shapes differ


def test_a_group_the_backend_declines_keeps_its_analytic_time(monkeypatch):
    from hetflow import platform as platform_layer
    monkeypatch.setitem(platform_layer.DEVICE_TIMERS, "pim", lambda graph, node, device: None)
    platform = load_platform("pim-gpt")
    options = CompileOptions(platform)
    fused, _ = run_pipeline(_decode(layers=1), "canonicalize,fuse", options=options)
    node = next(n for n in fused.nodes if n.op == "Gemm")
    simulated = cost_node(node, platform, fused.opset, "sim", fused)
    analytic = cost_node(node, platform, fused.opset)
    assert "pim" in simulated.declined and not simulated.simulated
    assert simulated.times == analytic.times


def test_an_unknown_cost_model_is_refused_naming_the_choices():
    with pytest.raises(CompileError, match="cost_model 'roofline' is not one of analytic, sim"):
        compile_graph(_decode(layers=1), "pim-gpt", cost_model="roofline")


# --- platform files over a preset ---------------------------------------------------------------------------

def test_a_platform_file_over_a_preset_changes_only_what_it_names(tmp_path):
    path = tmp_path / "wider.toml"
    path.write_text('base = "pim-gpt"\nname = "pim-gpt-wide"\n[device.pim]\nbandwidth = "16 TB/s"\n')
    wide, preset = load_platform(str(path)), load_platform("pim-gpt")
    assert wide.name == "pim-gpt-wide" and wide.devices["pim"].bandwidth == 16e12
    assert wide.devices["pim"].peak == preset.devices["pim"].peak and wide.devices["asic"] == preset.devices["asic"]


@pytest.mark.parametrize("text, message", [
    ('base = "no-such-preset"\n', "no such preset or file"),
    ("base = 3\n", "base must be a preset name"),
    ('base = "loop.toml"\nname = "loop"\n', "leads back to itself"),
])
def test_a_bad_base_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "loop.toml"
    path.write_text(text)
    with pytest.raises(PlatformError, match=message):
        load_platform(str(path))


# --- the analytic model fitted to the simulators ------------------------------------------------------------

def test_calibration_fits_the_analytic_figures_and_leaves_the_hardware_alone(tmp_path):
    from hetflow.backends.npu import emit_npu_program
    from hetflow.calibrate import calibrate_simulated, write_calibrated_platform
    result = calibrate_simulated("mobile-soc", progress=lambda *_: None)
    fit = result["npu"]
    assert fit["after"]["within"] > fit["before"]["within"]        # the fit helps (116 -> 127 of 152 when written)
    assert fit["after"]["within"] >= 0.75 * fit["after"]["of"]
    path = write_calibrated_platform("mobile-soc", result, tmp_path / "fitted.toml")
    fitted, preset = load_platform(str(path)), load_platform("mobile-soc")
    npu = fitted.devices["npu"]
    assert npu.analytic_figures and npu.analytic() != preset.devices["npu"]
    # the emitted program (and so the simulator) sees the hardware's figures, not the fitted ones
    graph = Graph("mm")
    x = graph.add_input("x", TensorType(DType.f16, (64, 256)))
    w = graph.add_weight("w", np.zeros((256, 256), np.float16))
    graph.outputs = [graph.add_node("MatMul", [x, w], [TensorType(DType.f16, (64, 256))]).outputs[0]]
    assert emit_npu_program(graph, npu) == emit_npu_program(graph, preset.devices["npu"])
    # while the analytic model uses the fitted ones
    node = graph.nodes[0]
    assert cost_node(node, fitted).times["npu"] != cost_node(node, preset).times["npu"]


def test_cli_calibrate_writes_a_platform_file_and_compile_takes_the_sim_cost_model(tmp_path, capsys):
    from hetflow.cli import main
    out = tmp_path / "duplex-fitted.toml"
    assert main(["calibrate", "--platform", "duplex", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "within 20%" in text and out.exists()
    assert load_platform(str(out)).devices["pim"].analytic_figures
    with pytest.raises(SystemExit):
        main(["compile", "m.onnx", "-o", str(tmp_path / "o"), "--cost-model", "guess"])
    assert "invalid choice: 'guess'" in capsys.readouterr().err


# --- the NPU's operand order: the whole kernel, its DMA included ---------------------------------------------

def _npu_load_seconds(m: int, k: int, n: int) -> tuple[float, float]:
    """(the weight load's modelled seconds, bytes / bandwidth) of x[m, k] @ w[k, n] f16 on mobile-soc's NPU."""
    from hetflow.backends.npu import emit_npu_program
    from hetflow.runtime.runners.npu import NpuSimulator
    npu = load_platform("mobile-soc").devices["npu"]
    graph = Graph("mm")
    x = graph.add_input("x", TensorType(DType.f16, (m, k)))
    w = graph.add_weight("w", np.zeros((k, n), np.float16))
    graph.outputs = [graph.add_node("MatMul", [x, w], [TensorType(DType.f16, (m, n))]).outputs[0]]
    simulator = NpuSimulator(emit_npu_program(graph, npu), {"w": w.data})
    program = simulator.program
    load = next(t for t, ins in zip(simulator.trace, program["instructions"])
                if ins["op"] == "load" and ins["tensor"] == "w")
    return load["end"] - load["start"], k * n * 2 / npu.bandwidth


def test_a_penalised_products_loads_stream_slower_by_the_penalty():
    penalty = load_platform("mobile-soc").devices["npu"].stationary_penalty
    took, plain = _npu_load_seconds(32, 64, 32)    # w[64, 32]: K > N, and x[32, 64]: K > M: neither can be held
    assert took == pytest.approx(plain * penalty)
    took, plain = _npu_load_seconds(32, 32, 64)    # w[32, 64]: held, no penalty
    assert took == pytest.approx(plain)
    took, plain = _npu_load_seconds(128, 64, 32)   # x[128, 64] held instead (K <= M): no penalty
    assert took == pytest.approx(plain)


def test_report_json_of_the_simulated_run_names_the_cost_model(tmp_path):
    compiled = compile_graph(_decode(layers=1), "pim-gpt", cost_model="sim")
    out = compiled.save(tmp_path / "art")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schedule"]["events"]   # the predicted timeline made from the simulators' times is kept
