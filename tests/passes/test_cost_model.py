"""passes/cost.py against hand-computed times on tiny graphs and tiny platforms.

A node's time on a device is ``max(FLOPs / peak, bytes / bandwidth) + launch + op_launch x ops``;
the platforms here use round figures (1 GFLOP/s, 1 GB/s, 10 us) so every expected time is exact.
"""
from __future__ import annotations

import numpy as np
import pytest

from hetflow.ir import DType, Graph, TensorType, infer_types, node_bytes
from hetflow.passes.cost import cost_graph, cost_node
from hetflow.passes.fuse import build_group
from hetflow.platform import Platform, platform_from_dict

US = 1e-6
F32 = 4  # bytes per f32 element


def approx(seconds: float):
    return pytest.approx(seconds, rel=1e-12, abs=1e-18)


def tiny_platform(**devices) -> Platform:
    """One memory; each device a dict overriding a 1 GFLOP/s (f32), 1 GB/s, launch-free CPU."""
    base = {"kind": "cpu", "memory": "m", "peak": {"f32": "1 GFLOP/s"}, "bandwidth": "1 GB/s", "launch": 0}
    return platform_from_dict({
        "name": "tiny",
        "memory": {"m": {"capacity": "1 GiB", "bandwidth": "1 GB/s"}},
        "device": {name: {**base, **spec} for name, spec in devices.items()},
    })


def add(graph: Graph, op: str, inputs, attrs=None, name: str | None = None):
    node = graph.add_node(op, inputs, [None], attrs or {}, output_names=[name] if name else None)
    node.outputs[0].type = infer_types(node, graph.opset)[0]
    return node


def matmul_graph(m: int, k: int, n: int, weight: bool = True, dtype=np.float32, batch: int | None = None):
    """x[m, k] @ w[k, n] (w a weight, or a second graph input); ``batch`` prepends a batch dim to x."""
    g = Graph("mm")
    dt = DType.f16 if dtype == np.float16 else DType.f32
    x = g.add_input("x", TensorType(dt, (batch, m, k) if batch else (m, k)))
    w = g.add_weight("w", np.ones((k, n), dtype)) if weight else g.add_input("w", TensorType(dt, (k, n)))
    node = add(g, "MatMul", [x, w], name="y")
    g.outputs = [node.outputs[0]]
    return g, node


# --- the roofline: compute-bound and memory-bound ---------------------------------------------------------

def test_compute_bound_matmul_costs_its_flops_over_peak_plus_launch():
    platform = tiny_platform(cpu={"launch": "10 us"})
    _, node = matmul_graph(64, 64, 64)
    cost = cost_node(node, platform)
    assert cost.flops == 2 * 64 * 64 * 64 == 524288
    assert cost.bytes == 3 * 64 * 64 * F32 == 49152
    assert cost.intensity == pytest.approx(524288 / 49152)
    assert cost.dtype == "f32" and cost.kind == "contraction" and cost.ops == "MatMul"
    # 524288 FLOP at 1 GFLOP/s = 524.288 us (the 49152 bytes would take only 49.152 us), + 10 us launch
    assert cost.times == {"cpu": approx(524.288 * US + 10 * US)}
    assert cost.unsupported == {}


def test_memory_bound_matvec_costs_its_bytes_over_bandwidth_plus_launch():
    platform = tiny_platform(cpu={"launch": "10 us"})
    _, node = matmul_graph(1, 256, 256)
    cost = cost_node(node, platform)
    assert cost.flops == 2 * 256 * 256 == 131072
    assert cost.bytes == (256 + 256 * 256 + 256) * F32 == 264192
    # 264192 bytes at 1 GB/s = 264.192 us (the FLOPs would take only 131.072 us), + 10 us launch
    assert cost.times["cpu"] == approx(264.192 * US + 10 * US)


def test_dtype_picks_its_peak():
    platform = tiny_platform(cpu={"peak": {"f16": "2 GFLOP/s", "f32": "1 GFLOP/s"}, "bandwidth": "1 TB/s"})
    _, half = matmul_graph(64, 64, 64, dtype=np.float16)
    _, single = matmul_graph(64, 64, 64)
    assert cost_node(half, platform).dtype == "f16"
    assert cost_node(half, platform).times["cpu"] == approx(524288 / 2e9)
    assert cost_node(single, platform).times["cpu"] == approx(524288 / 1e9)


def test_faster_device_is_the_fastest():
    platform = tiny_platform(slow={}, fast={"peak": {"f32": "4 GFLOP/s"}, "bandwidth": "4 GB/s"})
    _, node = matmul_graph(64, 64, 64)
    cost = cost_node(node, platform)
    assert cost.times == {"slow": approx(524.288 * US), "fast": approx(131.072 * US)}
    assert cost.fastest() == "fast"


# --- launch and op_launch: a fused group counts its inner ops -------------------------------------------

def elementwise_chain(length: int = 3):
    g = Graph("chain")
    x = g.add_input("x", TensorType(DType.f32, (1000,)))
    nodes, value = [], x
    for op in ["Relu", "Neg", "Abs"][:length]:
        nodes.append(add(g, op, [value]))
        value = nodes[-1].outputs[0]
    g.outputs = [value]
    return g, nodes


def test_lone_op_pays_launch_plus_one_op_launch():
    platform = tiny_platform(cpu={"launch": "10 us", "op_launch": "1 us", "peak": {"f32": "1 TFLOP/s"}})
    _, (relu, *_) = elementwise_chain()
    cost = cost_node(relu, platform)
    assert (cost.flops, cost.bytes) == (1000, 8000)
    # max(1000 FLOP / 1 TFLOP/s = 1 ns, 8000 B / 1 GB/s = 8 us) + 10 us + 1 x 1 us
    assert cost.times["cpu"] == approx(8 * US + 10 * US + 1 * US)


def test_fused_group_counts_its_inner_ops_and_only_its_boundary_bytes():
    platform = tiny_platform(cpu={"launch": "10 us", "op_launch": "1 us", "peak": {"f32": "1 TFLOP/s"}})
    g, nodes = elementwise_chain()
    lone = [cost_node(n, platform) for n in nodes]
    group = build_group(g, "elementwise", nodes, "ew")
    cost = cost_node(group, platform)
    assert cost.kind == "elementwise" and cost.ops == "Relu,Neg,Abs"
    assert cost.flops == 3000
    assert cost.bytes == 8000 < sum(c.bytes for c in lone) == 24000  # the inner values stay on chip
    # max(3 ns, 8 us) + 10 us launch + 3 ops x 1 us
    assert cost.times["cpu"] == approx(8 * US + 10 * US + 3 * US)
    assert [c.name for c in cost_graph(g, platform)] == [cost.name]


# --- the NPU: tile padding and the stationary penalty ---------------------------------------------------

NPU = {"kind": "npu", "tile": 32, "stationary_penalty": 6.0, "bandwidth": 1e15}  # compute-bound throughout


@pytest.mark.parametrize("m, k, n, padded", [
    (4, 8, 8, (32, 32, 32)),      # every dim below the tile costs as much as the tile
    (32, 32, 32, (32, 32, 32)),   # exactly one tile: no padding
    (33, 32, 32, (64, 32, 32)),   # one row over: two tiles
    (4, 8, 40, (32, 32, 64)),
])
def test_npu_pads_every_dim_to_its_tile(m, k, n, padded):
    platform = tiny_platform(npu=NPU, cpu={"bandwidth": 1e15})
    _, node = matmul_graph(m, k, n)
    cost = cost_node(node, platform)
    assert cost.flops == 2 * m * k * n  # the node's FLOPs stay the real ones
    pm, pk, pn = padded
    assert cost.times["npu"] == approx(2 * pm * pk * pn / 1e9)
    assert cost.times["cpu"] == approx(2 * m * k * n / 1e9)


def test_npu_pads_each_batch():
    platform = tiny_platform(npu=NPU)
    _, node = matmul_graph(4, 8, 8, batch=3)
    assert cost_node(node, platform).times["npu"] == approx(3 * 2 * 32 * 32 * 32 / 1e9)


def test_npu_weight_with_longer_reduction_than_output_dim_runs_six_times_slower():
    platform = tiny_platform(npu=NPU)
    _, tall = matmul_graph(32, 64, 32)       # w[64, 32]: K > N, cannot be the stationary operand
    _, wide = matmul_graph(32, 32, 64)       # w[32, 64]: K < N, stationary
    _, square = matmul_graph(32, 32, 32)     # K == N: stationary
    _, activations = matmul_graph(32, 64, 32, weight=False)  # no weight at all: no penalty
    flops = 2 * 32 * 64 * 32
    assert cost_node(tall, platform).times["npu"] == approx(6 * flops / 1e9)
    assert cost_node(wide, platform).times["npu"] == approx(flops / 1e9)
    assert cost_node(square, platform).times["npu"] == approx(2 * 32 * 32 * 32 / 1e9)
    assert cost_node(activations, platform).times["npu"] == approx(flops / 1e9)


def test_stationary_penalty_also_slows_a_memory_bound_kernel():
    platform = tiny_platform(npu={**NPU, "peak": {"f32": "1 PFLOP/s"}, "bandwidth": "1 MB/s"})
    _, tall = matmul_graph(32, 64, 32)
    _, wide = matmul_graph(32, 32, 64)
    moved = (32 * 64 + 64 * 32 + 32 * 32) * F32
    assert cost_node(tall, platform).bytes == moved == 20480
    assert cost_node(tall, platform).times["npu"] == approx(6 * moved / 1e6)  # bandwidth / 6
    assert cost_node(wide, platform).times["npu"] == approx(moved / 1e6)


def test_activations_held_stationary_avoid_the_penalty_as_the_emitter_does():
    """w[64, 32] cannot be held (K > N), but x[128, 64] can (K <= M): the NPU emitter holds x, no penalty."""
    platform = tiny_platform(npu=NPU)
    _, held_x = matmul_graph(128, 64, 32)
    _, neither = matmul_graph(32, 64, 32)
    assert cost_node(held_x, platform).times["npu"] == approx(2 * 128 * 64 * 32 / 1e9)
    assert cost_node(neither, platform).times["npu"] == approx(6 * 2 * 32 * 64 * 32 / 1e9)


def test_fused_contraction_keeps_the_stationary_penalty():
    platform = tiny_platform(npu=NPU)
    g, mm = matmul_graph(32, 64, 32)         # w[64, 32]: K > N
    bias = g.add_weight("b", np.ones((32,), np.float32))
    added = add(g, "Add", [mm.outputs[0], bias])
    relu = add(g, "Relu", [added.outputs[0]])
    g.outputs = [relu.outputs[0]]
    lone = cost_node(mm, platform).times["npu"]
    assert lone == approx(6 * 2 * 32 * 64 * 32 / 1e9)
    group = build_group(g, "contraction", [mm, added, relu], "c")
    # the MatMul with its penalty, then the bias add and the Relu (32 x 32 FLOPs each) at 1 GFLOP/s
    assert cost_node(group, platform).times["npu"] == approx(lone + 2 * 32 * 32 / 1e9)


def test_fused_contraction_is_padded_to_the_tile():
    platform = tiny_platform(npu=NPU)
    g, mm = matmul_graph(4, 8, 8)
    relu = add(g, "Relu", [mm.outputs[0]])
    g.outputs = [relu.outputs[0]]
    group = build_group(g, "contraction", [mm, relu], "c")
    # the MatMul padded to 32 x 32 x 32, the Relu's 4 x 8 FLOPs unpadded
    assert cost_node(group, platform).times["npu"] == approx((2 * 32 * 32 * 32 + 4 * 8) / 1e9)


# --- PIM: fewer output rows than channels leaves channels idle -------------------------------------------

def test_pim_matrix_narrower_than_its_channels_streams_at_a_fraction():
    platform = tiny_platform(pim={"kind": "pim", "channels": 8, "bandwidth": "8 GB/s", "peak": {"f32": "1 PFLOP/s"}})
    _, narrow = matmul_graph(1, 64, 4)   # 4 output rows on 8 channels: half the bandwidth
    _, full = matmul_graph(1, 64, 8)
    narrow_bytes = (64 + 64 * 4 + 4) * F32
    full_bytes = (64 + 64 * 8 + 8) * F32
    assert cost_node(narrow, platform).times["pim"] == approx(narrow_bytes / 4e9)
    assert cost_node(full, platform).times["pim"] == approx(full_bytes / 8e9)


# --- what a device cannot run ---------------------------------------------------------------------------

def test_dtype_the_device_lacks_is_unsupported_with_a_reason():
    platform = tiny_platform(cpu={}, npu={"kind": "npu", "dtypes": ["f16", "i8"]})
    _, node = matmul_graph(8, 8, 8)
    cost = cost_node(node, platform)
    assert cost.unsupported == {"npu": "npu does not run f32"}
    assert set(cost.times) == {"cpu"} and cost.fastest() == "cpu"
    _, half = matmul_graph(8, 8, 8, dtype=np.float16)
    assert set(cost_node(half, platform).times) == {"cpu", "npu"}


def test_op_the_device_lacks_is_unsupported_with_a_reason():
    platform = tiny_platform(cpu={}, pim={"kind": "pim", "ops": ["MatMul"]}, ew={"ops": ["elementwise"]})
    g, (relu, *_) = elementwise_chain(1)
    cost = cost_node(relu, platform)
    assert cost.unsupported == {"pim": "pim does not run Relu"}  # ew lists Relu's fusion kind
    assert set(cost.times) == {"cpu", "ew"}
    _, mm = matmul_graph(8, 8, 8)
    assert cost_node(mm, platform).unsupported == {"ew": "ew does not run MatMul"}


def test_group_runs_where_every_inner_op_runs_and_names_the_missing_ones():
    platform = tiny_platform(cpu={}, partial={"ops": ["MatMul", "Add"]}, named={"ops": ["MatMul", "Add", "Relu"]},
                             by_kind={"ops": ["contraction"]})
    g, mm = matmul_graph(8, 8, 8)
    bias = g.add_weight("b", np.ones((8,), np.float32))
    added = add(g, "Add", [mm.outputs[0], bias])
    relu = add(g, "Relu", [added.outputs[0]])
    g.outputs = [relu.outputs[0]]
    cost = cost_node(build_group(g, "contraction", [mm, added, relu], "c"), platform)
    assert cost.unsupported == {"partial": "partial does not run contraction (Relu)"}
    assert set(cost.times) == {"cpu", "named", "by_kind"}


# --- a table read only by gathers counts the rows read ---------------------------------------------------

def gather_graph(rows: int = 1000, width: int = 16, ids: int = 4):
    g = Graph("embed")
    table = g.add_weight("table", np.ones((rows, width), np.float32))
    index = g.add_input("ids", TensorType(DType.i64, (ids,)))
    gather = add(g, "Gather", [table, index], {"axis": 0}, name="rows")
    return g, table, index, gather


def test_gather_counts_the_rows_read_not_the_table():
    platform = tiny_platform(cpu={})
    g, table, _, gather = gather_graph()
    g.outputs = [gather.outputs[0]]
    cost = cost_node(gather, platform)
    rows = 4 * 16 * F32
    # the 64000-byte table counts as the 256 bytes of rows read, + 32 bytes of indices + 256 bytes written
    assert table.type.nbytes() == 64000
    assert cost.bytes == rows + 4 * 8 + rows == 544
    assert cost.times["cpu"] == approx(544 / 1e9)


def test_gather_counts_at_most_the_whole_table():
    g, _, _, gather = gather_graph(rows=10, ids=100)  # 100 rows read from a 10-row table
    assert node_bytes(gather) == 10 * 16 * F32 + 100 * 8 + 100 * 16 * F32


def test_group_whose_table_only_gathers_read_counts_the_rows_of_each_gather():
    g, table, first_ids, first = gather_graph()
    second_ids = g.add_input("ids2", TensorType(DType.i64, (4,)))
    second = add(g, "Gather", [table, second_ids], {"axis": 0})
    total = add(g, "Add", [first.outputs[0], second.outputs[0]])
    g.outputs = [total.outputs[0]]
    group = build_group(g, "elementwise", [first, second, total], "e")
    assert table in group.inputs
    rows = 4 * 16 * F32
    # two gathers of 4 rows each, two index vectors, one 4 x 16 output
    assert node_bytes(group) == 2 * rows + 2 * 4 * 8 + rows
    assert cost_node(group, tiny_platform(cpu={})).bytes == 2 * rows + 2 * 4 * 8 + rows


def test_group_that_also_reads_the_table_otherwise_counts_all_of_it():
    g, table, _, gather = gather_graph()
    flipped = add(g, "Transpose", [table], {"perm": [1, 0]})
    g.outputs = [gather.outputs[0], flipped.outputs[0]]
    group = build_group(g, "elementwise", [gather, flipped], "e")
    # the table in full (the Transpose reads every row), the indices, and both outputs
    assert node_bytes(group) == 64000 + 4 * 8 + 4 * 16 * F32 + 64000
