"""cost: FLOPs, bytes, Op/B of every top-level node (fused group or lone op), and its time on every device.

Device time of a node: ``max(FLOPs / peak, bytes / bandwidth) + launch + op_launch x ops``
(plus ``overlap_loss`` x the shorter of the two, when the device hides its DMA only in part)
(ops: the ops inside a fused group, 1 for a lone op) with the
quirks the papers measured:

* NPU (HeteroInfer): contraction dims are padded to the array's tile (32): any
  dimension below 32 costs as much as 32; a contraction whose weight has a longer
  reduction dim than output dim cannot keep the large weight stationary and its
  whole kernel (array and DMA: HeteroInfer's memory-bound GEMV was as slow) runs
  ``stationary_penalty`` (6x) slower, unless the activations can be held instead
  (their reduction dim no longer than their rows: what the NPU emitter does).
* PIM (Duplex, PIM-GPT): its peak and bandwidth are the aggregate over channels x
  banks; a matrix with fewer output rows than channels leaves channels idle.

Bytes are what crosses the node's boundary (a group's internal values stay on
chip), so fusion raises a group's Op/B.

Two cost models (``COST_MODELS``): ``analytic`` is the formula above for every
device; ``sim`` times each group on a simulated device (NPU, PIM) by emitting it
and timing the program on the device's simulator (``DEVICE_TIMERS`` of
``hetflow.platform``, filled by the driver: ``hetflow.simulated_cost``), so
placement and execution agree; real devices and groups a backend declines keep
the analytic time (``NodeCost.simulated`` says which times came from a simulator).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hetflow.ir import Graph, Node, Value, get_op, node_bytes, node_flops
from hetflow.ir.ops import FLASH_FFN_OP
from hetflow.ir.errors import HetflowError
from hetflow.platform import DEVICE_TIMERS, EMIT_CHECKS, Device, Platform, PlatformError

CONTRACTIONS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulInteger")
COST_MODELS = ("analytic", "sim")


@dataclass
class NodeCost:
    node: Node
    name: str
    kind: str                 # group kind, or the op's fusion kind
    ops: str
    flops: int
    bytes: int
    dtype: str | None
    times: dict[str, float] = field(default_factory=dict)        # device -> seconds (supported devices only)
    unsupported: dict[str, str] = field(default_factory=dict)    # device -> why not
    simulated: dict[str, float] = field(default_factory=dict)    # device -> seconds its simulator gave (sim model)
    declined: dict[str, str] = field(default_factory=dict)       # device -> why the sim model fell back to analytic
    flash: bool = False        # a layer streamed from flash: its times are hetflow.passes.flash_cost's model

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else 0.0

    def fastest(self) -> str:
        return min(self.times, key=self.times.get)


def node_kind(node: Node) -> str:
    if node.op == "hetflow.group":
        return node.attrs["kind"]
    return get_op(node.op, node).kind.value


def inner_nodes(node: Node) -> list[Node]:
    return list(node.attrs["body"].nodes) if node.op == "hetflow.group" else [node]


def node_dtype(node: Node) -> str | None:
    for v in list(node.inputs) + list(node.outputs):
        if v is not None and v.type is not None and v.type.dtype.is_float:
            return v.type.dtype.value
    return None


def _dims(node: Node) -> tuple[int, int, int, int] | None:
    """(batch, M, K, N) of a MatMul/Gemm, None when not static."""
    a, b = node.inputs[0], node.inputs[1]
    if a is None or b is None or a.type is None or b.type is None or not a.type.is_static or not b.type.is_static:
        return None
    sa, sb = a.type.shape, b.type.shape
    if node.op == "Gemm":
        m, k = (sa[1], sa[0]) if node.attrs.get("transA", 0) else sa
        n = sb[0] if node.attrs.get("transB", 0) else sb[1]
        return 1, m, k, n
    if len(sa) < 1 or len(sb) < 1:
        return None
    m = sa[-2] if len(sa) >= 2 else 1
    k = sa[-1]
    n = sb[-1] if len(sb) >= 2 else 1
    out = node.outputs[0].type
    batch = int(np.prod(out.shape[:-2])) if out is not None and out.is_static and len(out.shape) > 2 else 1
    return batch, m, k, n


def _pad(x: int, tile: int) -> int:
    return -(-x // tile) * tile


def contraction_time(inner: Node, device: Device, peak: float, outer: dict[int, Value] | None = None
                     ) -> tuple[float, float] | None:
    """(compute seconds, slowdown) of one MatMul/Gemm on an NPU: dims padded to the tile; the weight not
    stationary (reduction dim longer than output dim) makes the whole kernel ``stationary_penalty`` slower.
    ``outer`` maps a fused group's body inputs to the group's own inputs (a weight is a plain input inside)."""
    if inner.op not in ("MatMul", "Gemm"):
        return None
    dims = _dims(inner)
    if dims is None:
        return None
    batch, m, k, n = dims
    slowdown = 1.0
    operand = inner.inputs[1]
    if operand is not None and outer is not None and id(operand) in outer:
        operand = outer[id(operand)]
    if device.stationary_penalty > 1 and operand is not None and operand.data is not None and k > n and k > m:
        # the weight cannot be held (its reduction dim is the longer) and neither can the activations
        # (theirs is too): the NPU emitter's choice (hetflow.backends.npu ``_stationary``)
        slowdown = device.stationary_penalty
    if device.tile > 1:
        m, k, n = _pad(m, device.tile), _pad(k, device.tile), _pad(n, device.tile)
    return 2 * batch * m * k * n / peak * slowdown, slowdown


def device_time_parts(node: Node, device: Device, moved: int, dtype: str | None) -> tuple[float, float]:
    """(compute seconds, bandwidth in bytes/s) of ``node`` on ``device``; time = max(compute, bytes/bw) + launch."""
    device = device.analytic()
    peak = device.peak_for(dtype)
    compute, slowdown = 0.0, 1.0
    outer = ({id(b): v for b, v in zip(node.attrs["body"].inputs, node.inputs)} if node.op == "hetflow.group"
             else None)
    for inner in inner_nodes(node):
        special = contraction_time(inner, device, peak, outer) if device.kind == "npu" else None
        if special is None:
            compute += _safe_flops(inner) / peak
        else:
            compute += special[0]
            slowdown = max(slowdown, special[1])
    bandwidth = device.bandwidth / slowdown  # the whole kernel: its DMA too (HeteroInfer's GEMV, the simulator)
    if device.kind == "pim" and device.channels > 1:
        rows = _output_rows(node)
        if rows and rows < device.channels:
            bandwidth *= rows / device.channels
    if device.overlap_loss > 0 and moved > 0:  # both parts take the whole work time: max + loss x min
        memory = moved / bandwidth
        work = max(compute, memory) + device.overlap_loss * min(compute, memory)
        return work, moved / work
    return compute, bandwidth


def device_time(node: Node, device: Device, moved: int, dtype: str | None) -> float:
    compute, bandwidth = device_time_parts(node, device, moved, dtype)
    return max(compute, moved / bandwidth) + device.analytic().launch_for(len(inner_nodes(node)))


def _safe_flops(node: Node) -> int:
    try:
        return node_flops(node)
    except HetflowError:
        return 0


def _output_rows(node: Node) -> int | None:
    for inner in inner_nodes(node):
        if inner.op in ("MatMul", "Gemm"):
            dims = _dims(inner)
            if dims:
                return dims[3]
    return None


def _unsupported_reason(node: Node, device: Device, kind: str, dtype: str | None, opset: int) -> str | None:
    if dtype is not None and not ("*" in device.dtypes or dtype in device.dtypes):
        return f"{device.name} does not run {dtype}"
    if not device.supports(node.op, kind, None):
        if node.op != "hetflow.group":
            return f"{device.name} does not run {node.op}"
        missing = sorted({i.op for i in inner_nodes(node) if i.op not in device.ops})
        if missing:  # a device listing ops by name runs a group when it runs every op inside
            return f"{device.name} does not run {kind} ({', '.join(missing)})"
    if device.kind == "gpu" and device.measured:  # a real GPU: what its backend can emit, exactly
        check = EMIT_CHECKS.get("cuda")
        if check is None:
            raise PlatformError(f"{device.name} is a real CUDA GPU, but no emit check is registered for backend "
                                "'cuda' (the driver registers it: import hetflow)")
        why = check(node, opset)
        if why:
            return f"{device.name}: {why}"
    if device.kind == "pim" and EMIT_CHECKS.get("pim") is not None:  # what the PIM command stream can hold
        why = EMIT_CHECKS["pim"](node, opset)
        if why:
            return f"{device.name}: {why}"
    return None


def time_parts(cost: NodeCost, device_name: str, device: Device) -> tuple[float, float]:
    """(compute seconds, bandwidth) of the node of ``cost`` on the device, as the schedule's tasks take them:
    a simulated time becomes a task whose work takes exactly that time at full bandwidth (its bytes over
    its bandwidth and its compute both equal the simulated time less the launch), so it still shares
    the memory with what runs beside it."""
    if device_name not in cost.simulated:
        return device_time_parts(cost.node, device, cost.bytes, cost.dtype)
    work = max(cost.simulated[device_name] - device.analytic().launch_for(len(inner_nodes(cost.node))), 1e-12)
    return work, (cost.bytes / work if cost.bytes else device.bandwidth)


def cost_node(node: Node, platform: Platform, opset: int = 18, cost_model: str = "analytic",
              graph: Graph | None = None) -> NodeCost:
    """``cost_model="sim"`` needs ``graph`` (the node's own graph: the group is cut out of it to be emitted)."""
    if cost_model not in COST_MODELS:
        raise PlatformError(f"unknown cost model {cost_model!r}; choose one of {', '.join(COST_MODELS)}")
    kind = node_kind(node)
    flops = _safe_flops(node)
    moved = node_bytes(node)
    dtype = node_dtype(node)
    ops = ",".join(i.op for i in inner_nodes(node))
    cost = NodeCost(node, node.outputs[0].name, kind, ops, flops, moved, dtype)
    if node.op == FLASH_FFN_OP:   # its weights come from flash, not DRAM: hetflow.passes.flash_cost models it
        from .flash_cost import flash_ffn_seconds
        cost.bytes = sum(_value_bytes(v) for v in (node.inputs[0], node.outputs[0]))
        cost.flash = True
        for name in platform.devices:
            seconds, why = flash_ffn_seconds(node, platform, name)
            if seconds is None:
                cost.unsupported[name] = why
            else:
                cost.times[name] = cost.simulated[name] = seconds
        return cost
    for name, device in platform.devices.items():
        reason = _unsupported_reason(node, device, kind, dtype, opset)
        if reason:
            cost.unsupported[name] = reason
        else:
            cost.times[name] = device_time(node, device, moved, dtype)
            if cost_model == "sim" and device.kind in DEVICE_TIMERS:
                seconds = DEVICE_TIMERS[device.kind](graph, node, device)
                if seconds is None:
                    cost.declined[name] = f"{device.name}'s backend declines it (analytic time used)"
                else:
                    cost.times[name] = cost.simulated[name] = seconds
    return cost


def cost_graph(graph: Graph, platform: Platform, cost_model: str = "analytic") -> list[NodeCost]:
    return [cost_node(node, platform, graph.opset, cost_model, graph) for node in graph.nodes]


def _value_bytes(v: Value | None) -> int:
    if v is None or v.type is None or v.type.shape is None or not all(isinstance(d, int) for d in v.type.shape):
        return 0
    return int(int(np.prod(v.type.shape, dtype=np.int64)) * v.type.dtype.itemsize)
