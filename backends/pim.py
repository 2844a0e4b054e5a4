"""PIM backend: a partition placed on a processing-in-memory device as a DRAM PIM command stream.

``emit_pim_program(graph, device)`` returns the program as JSON text (sorted keys,
so the same partition graph and device always give the same bytes: the runtime
regenerates it at load and refuses a stored one that differs). The runner
``hetflow.runtime.runners.pim`` executes it functionally with NumPy and times it
with an event-driven DRAM model.

Two kinds, chosen by the device's memory (the rule: a memory named ``hbm*`` is
Duplex's Logic-PIM on the HBM3 logic die, every other memory, ``gddr6`` first,
is PIM-GPT's bank-level PIM):

* ``bank-level`` (PIM-GPT, arXiv 2310.09385; GDDR6 timing): every bank has a MAC
  unit. A matrix-vector product's matrix (the weight, or a KV-cache operand) is
  partitioned over channels x banks by output columns (split along K too when
  there are fewer columns than banks, so that every bank computes); each output
  column's K elements are stored contiguously, padded to a burst (32 B), so one
  row activation feeds consecutive MAC bursts. The input vector is broadcast to
  the bank buffers (write bursts on each channel, channels in parallel), each
  bank runs 32 B = 16 f16 MACs a cycle, and the partial sums are gathered
  (column reads) by the ASIC, which also adds a K split's partial sums and a
  Gemm's bias. Everything else (softmax, layer norm, GELU, reshapes) is an
  ``asic`` command beside the products: PIM-GPT's division of labour.
* ``logic-die`` (Duplex, arXiv 2409.01141; HBM3 timing): GEMM units on the HBM
  logic die read the matrix rows through the TSVs. Columns are partitioned over
  the pseudo-channels, each channel's rows interleaved over its banks; each
  channel's TSV share is ``bandwidth / channels`` and its compute share
  ``peak / 2 / channels`` MACs a cycle, so the product is bound by bandwidth at
  low Op/B and by the units above about 8 Op/B, as Duplex has it. Non-linear
  ops are ``asic`` commands run by the logic die's vector units.

Program (JSON object):

    format "hetflow.pim", version 1, kind "bank-level" | "logic-die", memory "gddr6" | "hbm3"
    device, channels, banks_per_channel, row_bytes, burst_bytes
    macs_per_cycle          logic-die: MACs a cycle per channel (bank-level: burst_bytes / element bytes)
    tsv_bytes_per_cycle     logic-die: bytes a cycle per channel through the TSVs (bank-level: 0)
    asic_lanes              elements a cycle of the ASIC / vector unit (an estimate, unconfirmed)
    launch_ns               the dispatch cost: the device's launch per top-level node (added to the DRAM time)
    inputs, outputs         the partition's value names
    commands                run in order, over an environment of named values:
      {"cmd": "gemv", "node", "op", "vector", "matrix", "out", "trans_matrix", "alpha", "bias", "beta",
       "batch", "m", "k", "n", "dtype", "layout": {"k_pad", "k_splits", "k_per_split", "column_blocks",
       "columns_per_block"}}
          out[b] = alpha * vector[b] @ matrix[b] (+ beta * bias): ``batch`` independent matrices of
          ``k`` x ``n`` (``matrix`` given transposed when ``trans_matrix``), ``m`` vectors each.
          Layout: batch*n columns in ``column_blocks`` blocks of ``columns_per_block``, K (padded to a
          burst, ``k_pad``) in ``k_splits`` pieces of ``k_per_split``; block c, piece s goes to unit
          ``c * k_splits + s``, which is bank ``unit // channels`` of channel ``unit % channels``
          (bank-level), or channel ``unit`` (logic-die).
      {"cmd": "asic", "node", "op", "path", "inputs", "outputs"}
          the IR node at ``path`` (indices into the partition's nodes, then a group body's nodes) run by
          its NumPy kernel; ``inputs``/``outputs`` name the environment's values.
      {"cmd": "bind", "src", "dst"}
          a group body's input or output: the same array under the body's name.

Names inside a group body are ``<group output>/<body value>``, so they never clash.
Weights are not in the program: the runner takes them from the partition graph (and the group bodies), by
the same names.
"""
from __future__ import annotations

import json
import math

from hetflow.ir import FusionKind, Graph, Node, get_op
from hetflow.ir.errors import HetflowError

from .cpu import BackendError

__all__ = ["FORMAT", "emit_failure", "emit_pim_program", "pim_kind"]

FORMAT = "hetflow.pim"
BURST_BYTES = 32
ROW_BYTES = {"gddr6": 2048, "hbm3": 1024}        # a bank's row (page): GDDR6 2K columns x 16 bit; HBM3 1 KiB
BANKS_PER_CHANNEL = {"gddr6": 16, "hbm3": 16}    # 4 bank groups x 4 banks (REFERENCE.md, Ramulator2)
ASIC_LANES = {"bank-level": 16, "logic-die": 512}  # unconfirmed estimates: PIM-GPT's ASIC, one Duplex GEMM unit
CLOCK_HZ = 1e9                                   # tCK 1 ns (REFERENCE.md)
MATRIX_OPS = ("MatMul", "Gemm")
SIZES = {"f16": 2, "bf16": 2, "f32": 4, "f64": 8}


def pim_kind(device) -> tuple[str, str]:
    """(kind, memory timing) for a PIM device: ``hbm*`` memory -> logic-die on HBM3, else bank-level on GDDR6."""
    memory = (device.memory or "").lower()
    return ("logic-die", "hbm3") if memory.startswith("hbm") else ("bank-level", "gddr6")


def emit_pim_program(graph: Graph, device, where: str = "", banks_per_channel: int | None = None) -> str:
    """The partition ``graph`` as a PIM command stream for ``device`` (a ``hetflow.platform.Device``), JSON text.

    ``banks_per_channel`` overrides the memory's (16) for design sweeps. Raises ``BackendError`` for a device
    without channels or banks and for an op the PIM cannot run (naming the node and the op)."""
    at = f" (partition {where})" if where else ""
    if device is None:
        raise BackendError(f"the PIM backend needs the device it emits for{at}: none was given")
    kind, memory = pim_kind(device)
    banks = BANKS_PER_CHANNEL[memory] if banks_per_channel is None else banks_per_channel
    if device.channels < 1 or banks < 1:
        raise BackendError(f"PIM device {device.name!r} has {device.channels} channels and {banks} banks per "
                           f"channel{at}: a PIM device needs at least one of each")
    units = device.channels * banks if kind == "bank-level" else device.channels
    program = {"format": FORMAT, "version": 1, "kind": kind, "memory": memory, "device": device.name,
               "channels": device.channels, "banks_per_channel": banks, "row_bytes": ROW_BYTES[memory],
               "burst_bytes": BURST_BYTES, "asic_lanes": ASIC_LANES[kind],
               # each top-level node is one dispatch of the device's launch cost (as the cost model charges it)
               "launch_ns": round(len(graph.nodes) * device.launch * 1e9, 3),
               "inputs": [v.name for v in graph.inputs], "outputs": [v.name for v in graph.outputs],
               "commands": []}
    program.update(_channel_rates(device, kind))
    _lower_graph(graph, "", [], units, program["commands"], at)
    return json.dumps(program, sort_keys=True, indent=None, separators=(",", ":"))


def emit_failure(node: Node, opset: int = 18) -> str | None:
    """Why the PIM backend cannot emit ``node`` (a lone op or a fused group), or None: placement asks this
    (as data registered by the driver) so that it never puts on a PIM device what the PIM cannot run."""
    try:
        _check_node(node)
    except BackendError as exc:
        return str(exc).split(": ", 1)[-1]
    return None


def _check_node(node: Node) -> None:
    if node.op == "hetflow.group":
        for inner in node.attrs["body"].nodes:
            _check_node(inner)
    elif node.op in MATRIX_OPS:
        _gemv(node, lambda v: None if v is None else v.name, 1, "")
    else:
        _check_asic(node, "")


def _channel_rates(device, kind: str) -> dict:
    if kind == "bank-level":
        return {"macs_per_cycle": 0.0, "tsv_bytes_per_cycle": 0.0}
    peak = max(device.peak.values()) if device.peak else 0.0
    return {"macs_per_cycle": round(peak / 2 / device.channels / CLOCK_HZ, 6),
            "tsv_bytes_per_cycle": round(device.bandwidth / device.channels / CLOCK_HZ, 6)}


def _lower_graph(graph: Graph, prefix: str, path: list[int], units: int, commands: list, at: str) -> None:
    name = (lambda v: None if v is None else prefix + v.name)
    for index, node in enumerate(graph.nodes):
        if node.op == "hetflow.group":
            _lower_group(node, prefix, path + [index], units, commands, at)
        elif node.op in MATRIX_OPS:
            commands.append(_gemv(node, name, units, at))
        else:
            _check_asic(node, at)
            commands.append({"cmd": "asic", "node": node.describe(), "op": node.op, "path": path + [index],
                             "inputs": [name(v) for v in node.inputs], "outputs": [name(v) for v in node.outputs]})


def _lower_group(node: Node, prefix: str, path: list[int], units: int, commands: list, at: str) -> None:
    body = node.attrs["body"]
    inner = f"{prefix}{node.outputs[0].name}/"
    for outer, value in zip(node.inputs, body.inputs):
        commands.append({"cmd": "bind", "src": prefix + outer.name, "dst": inner + value.name})
    _lower_graph(body, inner, path, units, commands, at)
    for outer, value in zip(node.outputs, body.outputs):
        commands.append({"cmd": "bind", "src": inner + value.name, "dst": prefix + outer.name})


def _check_asic(node: Node, at: str) -> None:
    try:
        row = get_op(node.op, node)
    except HetflowError as exc:
        raise BackendError(f"PIM backend{at}: {node.describe()}: op {node.op} cannot be lowered: "
                           f"{str(exc).splitlines()[0]}") from None
    if row.kind in (FusionKind.contraction, FusionKind.window):
        raise BackendError(f"PIM backend{at}: {node.describe()}: op {node.op} cannot be lowered: PIM runs "
                           "matrix-vector products (MatMul, Gemm) and the ASIC element-wise work, not "
                           f"{row.kind.value} ops")


def _gemv(node: Node, name, units: int, at: str) -> dict:
    a, b = node.inputs[0], node.inputs[1]
    where = f"PIM backend{at}: {node.describe()}"
    if a.type is None or b.type is None or (a.type.rank or 0) < 2 or (b.type.rank or 0) < 2:
        raise BackendError(f"{where}: op {node.op} cannot be lowered: both operands need a known shape of rank "
                           f"2 or more (got {a.type} and {b.type})")
    shape_a, shape_b = a.type.shape, b.type.shape
    if not all(isinstance(d, int) for d in shape_a + shape_b):
        raise BackendError(f"{where}: op {node.op} cannot be lowered: dynamic sizes ({a.type}, {b.type})")
    dtype = node.outputs[0].type.dtype.value
    if dtype not in SIZES:
        raise BackendError(f"{where}: op {node.op} cannot be lowered: PIM MACs are floating point, not {dtype}")
    trans_a = bool(node.attrs.get("transA", 0)) if node.op == "Gemm" else False
    trans_b = bool(node.attrs.get("transB", 0)) if node.op == "Gemm" else False
    if trans_a:
        raise BackendError(f"{where}: op Gemm with transA cannot be lowered: the vector operand is broadcast as "
                           "it is stored")
    k, n = (shape_b[-1], shape_b[-2]) if trans_b else (shape_b[-2], shape_b[-1])
    m = shape_a[-2]
    batch = math.prod(node.outputs[0].type.shape[:-2]) if (node.outputs[0].type.rank or 0) > 2 else 1
    bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 else None
    return {"cmd": "gemv", "node": node.describe(), "op": node.op, "vector": name(a), "matrix": name(b),
            "out": name(node.outputs[0]), "trans_matrix": trans_b,
            "alpha": float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0,
            "beta": float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0,
            "bias": name(bias), "batch": batch, "m": m, "k": k, "n": n, "dtype": dtype,
            "layout": _layout(batch * n, k, SIZES[dtype], units)}


def _layout(columns: int, k: int, element_bytes: int, units: int) -> dict:
    """Columns over the units (banks or channels); K split as well when columns are fewer than units."""
    per_burst = BURST_BYTES // element_bytes
    k_pad = -(-k // per_burst) * per_burst
    k_splits = max(1, min(units // max(columns, 1), k_pad // per_burst))
    k_per_split = -(-k_pad // (k_splits * per_burst)) * per_burst
    k_splits = -(-k_pad // k_per_split)
    column_blocks = max(1, min(columns, units // k_splits))
    columns_per_block = -(-columns // column_blocks)
    column_blocks = -(-columns // columns_per_block)
    return {"k_pad": k_pad, "k_splits": k_splits, "k_per_split": k_per_split, "column_blocks": column_blocks,
            "columns_per_block": columns_per_block}
