"""The PIM backend (backends/pim.py) and its simulator (runtime/runners/pim.py).

Functional results against the reference interpreter; modelled timings against hand-computed cycle counts
(REFERENCE.md's GDDR6 and HBM3 figures); a GEMV sweep; the bad inputs, each one line. Every time asserted is a
modelled cycle count, never the wall clock.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import hetflow  # noqa: F401  (registers the program emitters)
from hetflow.backends.cpu import BackendError
from hetflow.backends.pim import emit_pim_program
from hetflow.examples.decode_graphs import Builder, attention_decode, build_gpt2_decode_step
from hetflow.ir import DType, Graph, TensorType
from hetflow.ir.interpreter import Interpreter
from hetflow.passes.fuse import build_group
from hetflow.platform import Device
from hetflow.runtime.errors import RunnerError
from hetflow.runtime.runners.pim import TIMINGS, PimSimulator, partition_weights

BANK_LEVEL = Device("pim", "pim", "gddr6", {"f16": 8.192e12}, 8.192e12, 1e-6, channels=16)
LOGIC_DIE = Device("pim", "pim", "hbm", {"f16": 2 * 64e9}, 32e9, 2e-6, channels=1)   # 64 MACs, 32 B a cycle
GDDR6, HBM3 = TIMINGS["gddr6"], TIMINGS["hbm3"]


def simulator(graph: Graph, device: Device = BANK_LEVEL, **kw) -> PimSimulator:
    return PimSimulator(emit_pim_program(graph, device, **kw), partition_weights(graph), graph)


def feeds_for(graph: Graph, rng) -> dict:
    return {v.name: rng.standard_normal(v.type.shape).astype(v.type.dtype.numpy) for v in graph.inputs}


def check_equal(graph: Graph, device: Device = BANK_LEVEL, rtol=1e-5, atol=1e-5, seed=0, **kw) -> PimSimulator:
    sim = simulator(graph, device, **kw)
    feeds = feeds_for(graph, np.random.default_rng(seed))
    got = sim.run(feeds)
    for value, want in zip(graph.outputs, Interpreter(graph).run(feeds)):
        assert got[value.name].dtype == want.dtype
        np.testing.assert_allclose(got[value.name].astype(np.float64), want.astype(np.float64), rtol=rtol, atol=atol)
    return sim


def gemv_graph(m: int, k: int, n: int, dtype=DType.f32, seed=1) -> Graph:
    g = Graph("gemv")
    x = g.add_input("x", TensorType(dtype, (m, k)))
    w = g.add_weight("w", np.random.default_rng(seed).standard_normal((k, n)).astype(dtype.numpy))
    g.outputs = [g.add_node("MatMul", [x, w], [TensorType(dtype, (m, n))]).outputs[0]]
    return g


# --- functional: equal to the interpreter --------------------------------------------------------------------

@pytest.mark.parametrize("m,k,n", [(1, 37, 29), (1, 1, 1), (3, 130, 7), (1, 1000, 3), (2, 17, 300)])
@pytest.mark.parametrize("device", [BANK_LEVEL, LOGIC_DIE], ids=["bank-level", "logic-die"])
def test_gemv_equals_the_interpreter(m, k, n, device):
    check_equal(gemv_graph(m, k, n), device)


def test_few_columns_split_k_over_the_banks_and_gather_partial_sums():
    graph = gemv_graph(1, 1000, 3)
    layout = json.loads(emit_pim_program(graph, BANK_LEVEL))["commands"][0]["layout"]
    assert layout["k_splits"] > 1 and layout["k_splits"] * layout["column_blocks"] <= 16 * 16
    check_equal(graph)


def test_batched_matmul_of_two_activations():
    g = Graph("bmm")
    a = g.add_input("a", TensorType(DType.f32, (3, 5, 37)))
    b = g.add_input("b", TensorType(DType.f32, (3, 37, 29)))
    g.outputs = [g.add_node("MatMul", [a, b], [TensorType(DType.f32, (3, 5, 29))]).outputs[0]]
    check_equal(g)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_with_bias_alpha_beta(trans_b):
    rng = np.random.default_rng(2)
    g = Graph("gemm")
    x = g.add_input("x", TensorType(DType.f32, (2, 45)))
    w = g.add_weight("w", rng.standard_normal((33, 45) if trans_b else (45, 33)).astype(np.float32))
    c = g.add_weight("c", rng.standard_normal((33,)).astype(np.float32))
    node = g.add_node("Gemm", [x, w, c], [TensorType(DType.f32, (2, 33))],
                      {"alpha": 0.5, "beta": 2.0, "transB": trans_b})
    g.outputs = [node.outputs[0]]
    check_equal(g)


def attention_graph(dtype=DType.f32) -> Graph:
    """GPT-2 decode attention (2 heads of 32, 16 tokens of KV cache) as one fused attention group."""
    b = Builder("attention", dtype)
    q = b.input("q", (1, 64))
    b.graph.outputs = [attention_decode(b, q, 1, 2, 1, 32, 16, "attn")]
    build_group(b.graph, "attention", list(b.graph.nodes), "attention_0")
    return b.graph


def test_attention_group_equals_the_interpreter():
    graph = attention_graph()
    assert [n.op for n in graph.nodes] == ["hetflow.group"]
    sim = check_equal(graph)
    kinds = [c["cmd"] for c in sim.program["commands"]]
    assert kinds.count("gemv") == 2 and "asic" in kinds   # scores and context in the banks, softmax on the ASIC
    softmax = next(c for c in sim.program["commands"] if c.get("op") == "Softmax")
    assert softmax["cmd"] == "asic"


def test_program_is_deterministic_sorted_json():
    graph = attention_graph()
    text = emit_pim_program(graph, BANK_LEVEL)
    assert text == emit_pim_program(attention_graph(), BANK_LEVEL)
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))


def test_the_kind_follows_the_memory():
    assert json.loads(emit_pim_program(gemv_graph(1, 8, 8), BANK_LEVEL))["kind"] == "bank-level"
    assert json.loads(emit_pim_program(gemv_graph(1, 8, 8), LOGIC_DIE))["kind"] == "logic-die"


# --- whole models: PIM partitions get backend "pim" and the outputs equal the reference -----------------------

def random_weights(graph: Graph, seed=0) -> Graph:
    rng = np.random.default_rng(seed)
    for v in graph.weights.values():
        if v.data.dtype.kind == "f" and v.data.ndim >= 1:
            v.data = (rng.standard_normal(v.data.shape) * 0.1).astype(v.data.dtype)
    return graph


@pytest.mark.parametrize("platform", ["pim-gpt", "duplex"])
def test_gpt2_decode_runs_its_pim_partitions_on_the_simulator(platform, tmp_path):
    from hetflow.api import compile_graph
    from hetflow.runtime import load
    graph = random_weights(build_gpt2_decode_step(layers=1, hidden=64, heads=2, context=16, vocab=100))
    feeds = feeds_for(graph, np.random.default_rng(1))
    want = Interpreter(graph).run(feeds)
    compiled = compile_graph(graph, platform)
    got = compiled(**feeds)
    pim = [p for p in compiled.partitions if p.device == "pim"]
    assert pim and all(p.backend == "pim" and p.file.endswith(".pim.json") for p in pim)
    for a, b in zip(got, want):   # f16 model: f16 tolerance
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=1e-2, atol=2e-3)
    compiled.save(tmp_path / "art")                     # regenerated at load from graph.json and the Device
    loaded = load(tmp_path / "art").run(feeds)
    for a, b in zip(loaded.values(), want):
        np.testing.assert_allclose(np.asarray(a, np.float32), b.astype(np.float32), rtol=1e-2, atol=2e-3)
    for part in pim:                                    # modelled: row activations, MACs, a positive time
        sim = compiled.executor.runners[part.index].simulator
        assert sim.last_seconds > 0 and sim.row_misses > 0 and sim.internal_bandwidth > 0


def test_each_pim_partition_equals_the_interpreter_f16():
    from hetflow.api import compile_graph
    graph = random_weights(build_gpt2_decode_step(layers=1, hidden=64, heads=2, context=16, vocab=100))
    compiled = compile_graph(graph, "pim-gpt")
    device = compiled.platform.devices["pim"]
    for part in compiled._build_partitions():
        if part.backend == "pim":
            check_equal(part.graph, device, rtol=1e-2, atol=2e-3)


def test_a_tampered_stored_program_is_refused(tmp_path):
    from hetflow.api import compile_graph
    from hetflow.runtime import load
    graph = random_weights(build_gpt2_decode_step(layers=1, hidden=64, heads=2, context=16, vocab=100))
    compiled = compile_graph(graph, "pim-gpt")
    compiled.save(tmp_path / "art")
    part = next(p for p in compiled.partitions if p.backend == "pim")
    from hetflow.runtime.runners import read_partitions
    from hetflow.runtime.artifact import load_artifact
    artifact = load_artifact(tmp_path / "art")
    files = dict(artifact.files)
    files[part.file] = files[part.file][:-40]
    with pytest.raises(RunnerError) as exc:
        read_partitions(artifact.manifest["partitions"], files, artifact.graph, compiled.platform)
    assert "differs" in str(exc.value) and "\n" not in str(exc.value)


# --- timing: hand-computed cycle counts ----------------------------------------------------------------------

ONE_BANK = dataclasses.replace(BANK_LEVEL, channels=1)


def gemv_cycles(k: int, n: int, device=ONE_BANK, m: int = 1, banks=1, dtype=DType.f16) -> PimSimulator:
    return simulator(gemv_graph(m, k, n, dtype), device, banks_per_channel=banks)


def test_one_row_activation_and_one_mac_burst():
    sim = gemv_cycles(16, 1)        # 16 f16 = one 32-B burst
    broadcast = 1 * GDDR6.tCCD_S
    gather = GDDR6.tCL + 1 * GDDR6.tCCD_L
    assert sim.last_cycles == broadcast + GDDR6.tRCD + 1 + gather == 61
    assert (sim.row_misses, sim.row_hits) == (1, 0)


def test_a_full_row_is_one_miss_then_hits():
    sim = gemv_cycles(1024, 1)      # 1024 f16 = one 2-KiB row = 64 bursts
    assert sim.last_cycles == 64 * GDDR6.tCCD_S + GDDR6.tRCD + 64 + GDDR6.tCL + GDDR6.tCCD_L == 376
    assert (sim.row_misses, sim.row_hits) == (1, 63)
    assert sim.bytes_read == 2048


def test_two_rows_in_one_bank_precharge_and_reactivate():
    sim = gemv_cycles(2048, 1)
    act0 = 128 * GDDR6.tCCD_S                                   # 512
    act1 = max(act0 + GDDR6.tRCD + 64, act0 + GDDR6.tRAS) + GDDR6.tRP   # 628 (tRC 591 is already met)
    assert act1 >= act0 + GDDR6.tRC
    assert sim.last_cycles == act1 + GDDR6.tRCD + 64 + GDDR6.tCL + GDDR6.tCCD_L == 748
    assert (sim.row_misses, sim.row_hits) == (2, 126)


def test_a_refresh_in_the_middle_of_a_stream():
    """20 rows of 64 bursts in one bank; row 15's bursts run into the refresh at tREFI = 1900."""
    sim = gemv_cycles(512, 40)                                  # two 512-element columns a row: 20 rows
    period = GDDR6.tRCD + 64 + GDDR6.tRP                        # 116 cycles a row, back to back
    act15 = 128 + 15 * period                                   # 1868: its MACs start at 1894
    done = GDDR6.tREFI - (act15 + GDDR6.tRCD)                   # 6 bursts before the refresh
    reopen = GDDR6.tREFI + GDDR6.tRP + GDDR6.tRFC               # 2136
    act16 = reopen + GDDR6.tRCD + (64 - done) + GDDR6.tRP       # 2246
    last = act16 + 3 * period + GDDR6.tRCD + 64                 # rows 16..19
    gather = GDDR6.tCL + 5 * GDDR6.tCCD_L                       # 40 f32 results = 160 B
    assert sim.last_cycles == last + gather == 2738
    assert sim.row_misses == 21                                 # 20 rows + the reopened one
    assert sim.row_hits + sim.row_misses == 20 * 64
    no_refresh = 128 + 19 * period + GDDR6.tRCD + 64 + gather
    assert sim.last_cycles - no_refresh == 262


def test_tfaw_limits_activations_across_banks():
    sim = gemv_cycles(16, 5, banks=5)                           # five banks, one burst each
    # ACTs at 4, 5, 6, 7, then the fifth waits for tFAW after the first: 4 + 28 = 32
    assert sim.last_cycles == 32 + GDDR6.tRCD + 1 + GDDR6.tCL + GDDR6.tCCD_L


def test_logic_die_streams_rows_through_the_tsvs():
    sim = simulator(gemv_graph(1, 512, 1, DType.f16), LOGIC_DIE)   # one 1-KiB HBM3 row
    begin = HBM3.tRCD + HBM3.tCL
    assert sim.last_cycles == begin + 1024 / 32 == 46               # bandwidth bound
    sim8 = simulator(gemv_graph(8, 512, 1, DType.f16), LOGIC_DIE)
    assert sim8.last_cycles == begin + 8 * 512 / 64 == 78           # 8 vectors: compute bound
    assert (sim.row_misses, sim.row_hits) == (1, 31)


def test_gemv_sweep_bandwidth_rises_with_banks():
    """Achieved internal bandwidth of a 2048 x 1024 f16 GEMV against the number of banks computing."""
    graph = gemv_graph(1, 2048, 1024, DType.f16)
    rows = []
    for channels, banks in [(1, 1), (1, 4), (1, 16), (4, 16), (16, 16)]:
        sim = simulator(graph, dataclasses.replace(BANK_LEVEL, channels=channels), banks_per_channel=banks)
        rows.append((channels * banks, sim.internal_bandwidth, sim.row_hit_rate))
    bandwidths = [bw for _, bw, _ in rows]
    assert bandwidths == sorted(bandwidths) and bandwidths[-1] > 20 * bandwidths[0]
    assert all(rate == pytest.approx(63 / 64, abs=0.01) for _, _, rate in rows)
    assert bandwidths[0] < 32e9                 # one bank: at most 32 B a cycle


# --- bad input: one line each ---------------------------------------------------------------------------------

def one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_a_device_with_zero_channels_or_banks():
    with pytest.raises(BackendError) as exc:
        emit_pim_program(gemv_graph(1, 8, 8), dataclasses.replace(BANK_LEVEL, channels=0))
    assert "0 channels" in one_line(exc)
    with pytest.raises(BackendError) as exc:
        emit_pim_program(gemv_graph(1, 8, 8), BANK_LEVEL, banks_per_channel=0)
    assert "0 banks" in one_line(exc)


def test_a_command_stream_cut_short():
    text = emit_pim_program(gemv_graph(1, 8, 8), BANK_LEVEL)
    with pytest.raises(RunnerError) as exc:
        PimSimulator(text[: len(text) // 2])
    assert "cut short" in one_line(exc)


def test_a_malformed_command_names_the_field():
    program = json.loads(emit_pim_program(gemv_graph(1, 8, 8), BANK_LEVEL))
    del program["commands"][0]["layout"]
    with pytest.raises(RunnerError) as exc:
        PimSimulator(json.dumps(program))
    assert "commands[0]" in one_line(exc) and "layout" in one_line(exc)
    program = json.loads(emit_pim_program(gemv_graph(1, 8, 8), BANK_LEVEL))
    program["commands"][0]["layout"]["column_blocks"] = 10 ** 6
    with pytest.raises(RunnerError) as exc:
        PimSimulator(json.dumps(program))
    assert "commands[0].layout.column_blocks" in one_line(exc)


def test_an_op_the_pim_cannot_lower_names_node_and_op():
    g = Graph("conv")
    x = g.add_input("x", TensorType(DType.f32, (1, 1, 4, 4)))
    w = g.add_weight("w", np.ones((1, 1, 3, 3), np.float32))
    g.outputs = [g.add_node("Conv", [x, w], [TensorType(DType.f32, (1, 1, 2, 2))]).outputs[0]]
    with pytest.raises(BackendError) as exc:
        emit_pim_program(g, BANK_LEVEL)
    assert "Conv node" in one_line(exc) and "op Conv cannot be lowered" in one_line(exc)


def test_a_platform_whose_pim_has_zero_channels_is_refused_at_load():
    import copy
    from hetflow.platform import PlatformError, load_platform, platform_from_dict
    data = copy.deepcopy(load_platform("pim-gpt").raw)
    data["device"]["pim"]["channels"] = 0
    with pytest.raises(PlatformError) as exc:
        platform_from_dict(data, "pim-gpt (edited)")
    assert "channels" in one_line(exc)


def test_without_the_device_the_program_cannot_be_regenerated():
    from hetflow.platform import PROGRAM_EMITTERS
    with pytest.raises(BackendError) as exc:
        PROGRAM_EMITTERS["pim"](gemv_graph(1, 8, 8), "0 (pim/part0.pim.json)", None)
    assert "needs the device" in one_line(exc)


def test_placement_keeps_what_the_pim_cannot_lower_off_it():
    from hetflow.backends.pim import emit_failure
    from hetflow.passes.cost import cost_node
    from hetflow.platform import load_platform
    g = Graph("conv")
    x = g.add_input("x", TensorType(DType.f16, (1, 1, 4, 4)))
    w = g.add_weight("w", np.ones((1, 1, 3, 3), np.float16))
    node = g.add_node("Conv", [x, w], [TensorType(DType.f16, (1, 1, 2, 2))])
    assert "op Conv cannot be lowered" in emit_failure(node)
    cost = cost_node(node, load_platform("duplex"))
    assert "pim" in cost.unsupported and "Conv" in cost.unsupported["pim"]
    assert emit_failure(gemv_graph(1, 8, 8).nodes[0]) is None


def test_public_api():
    from hetflow.backends import pim
    from hetflow.runtime.runners import pim as runner
    assert sorted(pim.__all__) == ["FORMAT", "emit_failure", "emit_pim_program", "pim_kind"]
    assert sorted(runner.__all__) == ["DramTiming", "PimRunner", "PimSimulator", "TIMINGS", "load_pim",
                                      "parse_program", "partition_weights"]
    for module in (pim, runner):
        assert all(hasattr(module, name) for name in module.__all__)
