"""Platforms, the cost model, placement policies and the predicted timeline."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from hetflow.ir import DType, Graph, TensorType, infer_types, verify
from hetflow.passes import CompileOptions
from hetflow.passes.cost import cost_node
from hetflow.passes.place import PlacementError, place_graph, placement_problem
from hetflow.passes.schedule import simulate
from hetflow.pipeline import run_pipeline
from hetflow.platform import PlatformError, load_platform, platform_from_dict, preset_names
from hetflow.runtime.interpreter import Interpreter

TWO_MEMORIES = {
    "name": "two-memories", "sync": {"flag": "2 us"},
    "memory": {"dram": {"capacity": "1 GiB", "bandwidth": "20 GB/s"},
               "hbm": {"capacity": "1 GiB", "bandwidth": "400 GB/s"}},
    "link": {"pcie": {"from": "dram", "to": "hbm", "bandwidth": "10 GB/s", "latency": "5 us"}},
    "device": {"cpu": {"kind": "cpu", "memory": "dram", "peak": {"f32": "50 GFLOP/s"}, "launch": "2 us"},
               "gpu": {"kind": "gpu", "memory": "hbm", "peak": {"f32": "5 TFLOP/s"}, "launch": "10 us",
                       "ops": ["contraction", "MatMul", "Gemm", "reduction", "elementwise", "broadcast"]}},
}


def test_every_preset_loads_and_cites_its_source():
    names = preset_names()
    assert {"host", "host+cuda", "mobile-soc", "duplex", "pim-gpt", "flash-edge", "laptop-ssd"} <= set(names)
    for name in names:
        platform = load_platform(name)
        assert platform.source and platform.devices
        assert all(d.peak and d.bandwidth > 0 for d in platform.devices.values())
    host = load_platform("host")
    assert host.devices["cpu"].measured and "measured on this machine" in host.devices["cpu"].source


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["device"]["gpu"].pop("kind"), r"device.gpu: missing field 'kind'"),
    (lambda d: d["memory"]["hbm"].update(bandwidth="-3 GB/s"), r"memory.hbm.bandwidth: must be positive"),
    (lambda d: d["memory"]["hbm"].update(bandwidth="3 GiB"), r"memory.hbm.bandwidth: unit 'GiB' is not a bandwidth"),
    (lambda d: d["device"]["gpu"].update(memory="vram"), r"device.gpu.memory: no memory space 'vram'"),
    (lambda d: d["device"]["cpu"].update(kind="tpu"), r"device.cpu.kind: 'tpu' is not one of"),
    (lambda d: d["link"]["pcie"].update(to="nowhere"), r"link.pcie.to: no memory space 'nowhere'"),
])
def test_platform_errors_name_the_field(edit, message):
    import copy
    data = copy.deepcopy(TWO_MEMORIES)
    edit(data)
    with pytest.raises(PlatformError, match=message):
        platform_from_dict(data)


def test_unknown_platform_lists_the_presets():
    with pytest.raises(PlatformError, match=r"unknown platform 'phone'; presets: .*mobile-soc"):
        load_platform("phone")


def add(graph, op, inputs, attrs=None, name=None):
    node = graph.add_node(op, inputs, [None], attrs or {}, output_names=[name] if name else None)
    node.outputs[0].type = infer_types(node, graph.opset)[0]
    return node.outputs[0]


def mlp_graph(batch=64, width=256, layers=3, seed=0):
    rng = np.random.default_rng(seed)
    g = Graph("mlp")
    x = g.add_input("x", TensorType(DType.f32, (batch, width)))
    for i in range(layers):
        w = g.add_weight(f"w{i}", rng.standard_normal((width, width)).astype(np.float32) / 16)
        x = add(g, "MatMul", [x, w])
        x = add(g, "Relu", [x]) if i % 2 == 0 else add(g, "Softmax", [x], {"axis": -1})
    g.outputs = [x]
    return g


def test_unsupported_everywhere_names_the_op_and_node():
    gpu_only = dict(TWO_MEMORIES["device"]["gpu"], ops=["MatMul"])
    platform = platform_from_dict(dict(TWO_MEMORIES, device={"gpu": gpu_only}))
    g = mlp_graph(layers=1)  # MatMul then Relu; the gpu runs only MatMul and there is no other device
    with pytest.raises(PlacementError, match=r"op Relu \(Relu node .*\) is supported by no device of platform "
                                             r"'two-memories': gpu does not run Relu"):
        place_graph(g, platform)


def test_model_that_fits_no_memory_names_the_tensor():
    import copy
    data = copy.deepcopy(TWO_MEMORIES)
    data["memory"]["hbm"]["capacity"] = "64 KiB"
    data["memory"]["dram"]["capacity"] = "64 KiB"
    with pytest.raises(PlacementError, match=r"weights need .*KiB in memory '\w+' .*largest tensor: %w\d: f32\[256,256\]"):
        place_graph(mlp_graph(), platform_from_dict(data))


def random_dag(n, seed):
    rng = np.random.default_rng(seed)
    g = Graph("dag")
    values = [g.add_input("x", TensorType(DType.f32, (int(rng.integers(8, 200)), 128)))]
    for i in range(n):
        x = values[int(rng.integers(max(0, len(values) - 3), len(values)))]
        kind = rng.integers(0, 3)
        if kind == 0:
            w = g.add_weight(f"w{i}", np.zeros((128, 128), np.float32))
            values.append(add(g, "MatMul", [x, w]))
        elif kind == 1:
            values.append(add(g, "Relu", [x]))
        else:
            y = values[int(rng.integers(0, len(values)))]
            values.append(add(g, "Add", [x, y]) if y.type == x.type else add(g, "Softmax", [x], {"axis": -1}))
    g.outputs = [values[-1]]
    return g


@pytest.mark.parametrize("seed", range(6))
def test_optimal_matches_brute_force_on_small_graphs(seed):
    platform = load_platform("mobile-soc")
    g = random_dag(9, seed)
    report = place_graph(g.clone(), platform, "optimal")
    costs = [cost_node(n, platform) for n in g.nodes]
    problem = placement_problem(g, costs, platform)
    best = min(problem.makespan(dict(zip(problem.order, combo)))
               for combo in itertools.product(*[sorted(problem.times[i]) for i in problem.order]))
    assert report.static_makespan["optimal"] == pytest.approx(best, rel=1e-6, abs=1e-8)
    assert report.static_makespan[report.chosen] <= min(report.static_makespan.values()) + 1e-12


@pytest.mark.parametrize("platform", ["mobile-soc", "duplex", "pim-gpt", "laptop-ssd"])
def test_optimal_never_worse_than_roofline_or_one_device(platform):
    from hetflow.examples.decode_graphs import build_gpt2_decode_step
    for graph in (mlp_graph(), build_gpt2_decode_step(layers=2, hidden=256, heads=4, vocab=1000)):
        options = CompileOptions(platform=platform, placement="optimal")
        run_pipeline(graph, options=options)
        spans = options.results["placement"].static_makespan
        assert spans[options.results["placement"].chosen] <= min(spans.values()) + 1e-12
        assert spans["optimal"] <= spans["roofline"] + 1e-12


@pytest.mark.parametrize("policy", ["roofline", "optimal", "split"])
def test_placed_graph_computes_the_same(policy):
    platform = platform_from_dict(TWO_MEMORIES)
    g = mlp_graph(batch=256, width=128)
    feeds = {"x": np.random.default_rng(1).standard_normal((256, 128)).astype(np.float32)}
    expected = Interpreter(g).run(feeds)
    options = CompileOptions(platform=platform, placement=policy)
    placed, _ = run_pipeline(g.clone(), options=options)
    verify(placed)
    assert all("device" in n.meta for n in placed.nodes)
    got = Interpreter(placed).run(feeds)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-6)
    if any(n.meta["device"] == "gpu" for n in placed.nodes):
        assert any(n.op == "hetflow.transfer" for n in placed.nodes)  # dram <-> hbm is not unified


def test_split_rewrites_a_matmul_into_two_parts_that_compute_the_same():
    platform = load_platform("mobile-soc")
    rng = np.random.default_rng(0)
    g = Graph("mm")
    x = g.add_input("x", TensorType(DType.f16, (1, 512)))
    w = g.add_weight("w", (rng.standard_normal((512, 4096)) / 20).astype(np.float16))
    g.outputs = [add(g, "MatMul", [x, w], name="y")]
    feeds = {"x": rng.standard_normal((1, 512)).astype(np.float16)}
    expected = Interpreter(g).run(feeds)[0]
    report = place_graph(g, platform, "split", devices=["gpu", "npu"])
    assert report.splits and {n.meta["device"] for n in g.nodes} == {"gpu", "npu"}
    assert [v.name for v in g.outputs] == ["y"]
    verify(g)
    np.testing.assert_allclose(Interpreter(g).run(feeds)[0], expected, rtol=1e-3, atol=1e-3)


def test_heteroinfer_decisions_within_one_step():
    from ..benchmarks_path import heteroinfer_shares
    for paper, ours in heteroinfer_shares():
        assert abs(paper - ours) <= 0.25 + 1e-9


def test_shared_bandwidth_slows_concurrent_streams():
    platform = load_platform("mobile-soc")
    g = Graph("two")
    x = g.add_input("x", TensorType(DType.f16, (1, 4096)))
    outs = []
    for i, device in enumerate(("gpu", "npu")):
        w = g.add_weight(f"w{i}", np.broadcast_to(np.zeros((), np.float16), (4096, 4096)))
        outs.append(add(g, "MatMul", [x, w]))
        g.nodes[-1].meta["device"] = device
    g.outputs = outs
    schedule = simulate(g, platform)
    alone = {e.device: cost_node(n, platform).times[e.device] for e, n in zip(schedule.events, g.nodes)}
    for event in schedule.events:  # both stream 32 MiB at once: 60 GB/s shared, not 45 + 40
        assert event.end - event.start > alone[event.device] * 1.2
    assert schedule.makespan == pytest.approx(2 * 4096 * 4096 * 2 / 60e9 + 20e-6, rel=0.05)


def test_schedule_of_zero_cost_nodes_terminates():
    import copy
    data = copy.deepcopy(TWO_MEMORIES)
    data["device"]["cpu"]["launch"] = 0  # a node with no FLOPs, no bytes and no launch takes no time
    platform = platform_from_dict(data)
    g = Graph("tiny")
    x = g.add_input("x", TensorType(DType.f32, (0, 4)))
    g.outputs = [add(g, "Relu", [add(g, "Neg", [x])])]
    for node in g.nodes:
        node.meta["device"] = "cpu"
    schedule = simulate(g, platform)
    assert schedule.makespan == 0.0 and len(schedule.events) == 2


def test_schedule_round_trips_through_the_manifest_form():
    from hetflow.passes.schedule import Schedule
    options = CompileOptions(platform="mobile-soc", placement="optimal")
    run_pipeline(mlp_graph(), options=options)
    schedule = options.results["schedule"]
    again = Schedule.from_dict(schedule.as_dict())
    assert again.platform == schedule.platform and again.makespan == pytest.approx(schedule.makespan)
    assert [(e.name, e.device) for e in again.events] == [(e.name, e.device) for e in schedule.events]
