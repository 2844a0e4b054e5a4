"""Emitter ``npu``: a partition placed on an NPU as a program for a systolic-array NPU.

The program is JSON text (sorted keys, deterministic: the runtime regenerates it
from graph.json at load and refuses a stored one that differs), stored as
``npu/partN.npu.json`` and run by the NPU simulator (``hetflow.runtime.runners.npu``).

The machine it targets
----------------------
* DRAM (the device's memory, ``device.bandwidth`` bytes/s) holds the partition's
  inputs, weights, outputs and every intermediate value (``tensors``).
* On-chip SRAM of ``NPU_SRAM_BYTES`` (``hetflow.platform``; 8 MiB, an UNCONFIRMED
  estimate of a Hexagon-class NPU's tightly coupled memory) holds ``buffers``:
  named regions ``{offset, bytes, shape, dtype}``. The emitter lays them out with
  a bump allocator per IR op (above a group's intermediates held in SRAM); a
  program whose buffers pass the capacity is refused (``BackendError`` naming the
  node and the op).
* One DMA engine (loads and stores, in program order), a ``tile`` x ``tile``
  systolic array (``gemm``) and a vector unit (``vector``), each in order; an
  instruction starts when its engine is free and the SRAM/DRAM data it reads is
  written (and the SRAM it overwrites is read): DMA overlaps compute.

Instructions (``instructions``, each with ``node``: the IR value it computes)
------------------------------------------------------------------------------
* ``load``:  ``tensor`` (DRAM) -> ``buffer``; ``view`` (a shape the tensor is
  reshaped to first, or null), ``region`` (``[start, stop]`` per dim, or null for
  all), ``transpose`` (swap the last two dims on the way: Gemm's transA/transB).
* ``store``: ``buffer`` -> ``tensor`` at ``region`` (null: all of it) of its ``view``.
* ``gemm``:  ``out = alpha * a @ b (+ beta * bias)`` on buffers (NumPy matmul
  broadcasting over leading batch dims); ``stationary`` names the operand held in
  the array (``"a"`` or ``"b"``); ``product`` is ``[m, k, n]`` of the whole product the
  block belongs to (which operand is large is a property of the product, not of one
  panel). Dims are padded to the tile for timing (the data itself is not padded:
  padding with zeros does not change the result).
  Its int8 mode (``int8``: ``{a_scale, b_scales}``, present only on a quantised gemm): ``b`` is an i8 buffer
  and ``b_scales`` an f32 buffer of one scale per column of ``b``; the array quantises ``a`` (a float buffer)
  as ``qa = clip(rint(a / a_scale), -127, 127)`` (round to nearest, ties to even), accumulates
  ``qa @ b`` in int32, dequantises ``float32(acc) * (a_scale * b_scales[j])`` (f32), then applies alpha and
  ``beta * bias`` in f32 and writes the output buffer's dtype. Timed at the device's i8 peak.
* ``vector``: one IR op on the vector unit: ``kernel`` = ``{op, attrs, opset}``
  (attrs in graph.json's encoding), run with the IR's NumPy kernel on ``inputs``
  (buffers, null for an absent optional input) into ``outputs``. One op is the
  vector unit's own, not an IR op: ``hetflow.npu.Im2Col`` (attrs kernel_shape,
  strides, pads, dilations): x [N, C, H, W] -> [N, C*kh*kw, oh*ow].

Tensors (``tensors``: ``{dtype, shape, kind}``): kind ``input``, ``weight`` (the partition's weights, given
to the simulator), ``const`` (with ``data`` inline), ``temp``, ``output``, and the int8 weights' two:
``int8_weight`` (i8, the shape of its ``source``) and ``int8_scale`` (f32 ``[source.shape[axis]]``), each
with ``source`` (a 2-D float weight or constant of the program) and ``axis`` (the source's output-channel
axis: 1 for B [K, N], 0 for Gemm's transB [N, K]). Their data is not in the program: it is the source
quantised per channel when the program is loaded, ``scale = max |w| / 127`` over the channel (1 for an
all-zero one), ``q = clip(rint(w / scale), -127, 127)`` (``hetflow.runtime.runners.npu.quantize_per_channel``),
so the program stays small and is still exactly what graph.json and the weights determine.

Lowering
--------
* MatMul (both operands of rank >= 2) and Gemm go to the array. The output is cut
  into blocks of ``mb`` rows (all batch dims, all of K) and panels of ``nb``
  columns (multiples of the tile) so that one A block, two B panels and two output
  panels fit the SRAM: the B panels and output panels are double-buffered (ping-pong
  slots) and the instructions are software-pipelined (load panel p+1 before the
  gemm of panel p) so the DMA of one panel overlaps the gemm of the previous.
* ``stationary``: the weight-stationary choice of HeteroInfer. Holding an operand
  whose reduction dim is longer than its output dim costs ``stationary_penalty``
  (6x on mobile-soc); the emitter holds ``b`` unless that is penalised and ``a`` is
  not.
* Conv (2-D, group 1, explicit pads, float): im2col on the vector unit into a DRAM
  temp, then ``W[M, C*kh*kw] @ cols`` on the array (tiled, double-buffered as above),
  its bias as a per-row bias, stored as [N, M, oh, ow].
* Every other op (a grouped or 1-D/3-D Conv included; elementwise, reductions,
  softmax, normalisation, data movement, a MatMul with a 1-D operand, int types)
  go to the vector unit: its inputs are
  loaded, the op runs with the IR's kernel, its outputs are stored. An op too large
  for the SRAM is cut into chunks along its first dim longer than 1 (ops with NumPy
  broadcasting; Softmax, LogSoftmax, LayerNormalization when that dim is before
  their axis), double-buffered and pipelined as the gemm panels are; any other op
  too large is a ``BackendError``. A Conv the array does not take runs on the vector
  unit, timed by its MACs on the vector lanes.
* A fused group (``hetflow.group``) is flattened: its body's ops are lowered one by
  one. An intermediate only the group's own ops read stays in SRAM (no store, no
  reload) when a vector op or a one-block product made it, until its last reader
  ran; everything held is stored (if still to be read) before a product, a chunked
  op or an op that needs the room: a "flush". The group's outputs go to DRAM.
* Float types f32, f16 (and bf16/f64 by the same path). int8: a MatMul/Gemm the ``quantize`` pass marked
  (``node.meta["int8"] = {"activation_scale": s}``, opt-in: ``hetflow.compile(..., quantize="int8")``) reads
  its weight as ``W#i8`` panels (a quarter of f32's DMA bytes, half of f16's) with ``W#scale`` panels of
  per-column scales, and its gemms run in int8 mode with ``a_scale = s``; a marked node whose second operand
  is not a 2-D weight is a ``BackendError`` (the pass and the emitter disagree). Shapes must be static: a
  dynamic partition raises ``NpuUnsupported`` and the partition falls back to the next backend the platform allows (``simulated``).
"""
from __future__ import annotations

import json
import math

import numpy as np

from hetflow.ir import Graph, Node, Value
from hetflow.ir.serialize import _attr_to_json, _tensor_to_json
from hetflow.platform import NPU_SRAM_BYTES

from .cpu import BackendDeclined, BackendError

__all__ = ["FORMAT", "NpuUnsupported", "emit_npu_program", "disassemble", "plan_gemm"]

FORMAT = "hetflow-npu"
VERSION = 1
ARRAY_DTYPES = ("f32", "f16", "bf16", "f64")
GROUP = "hetflow.group"
IM2COL = "hetflow.npu.Im2Col"   # the vector unit's own op (not an IR op): see hetflow.runtime.runners.npu


class NpuUnsupported(BackendDeclined):
    """The partition cannot be lowered to the NPU (dynamic shapes, untyped values): the next backend runs it."""


def _pad(x: int, tile: int) -> int:
    return -(-x // tile) * tile


def emit_npu_program(graph: Graph, device, where: str = "") -> str:
    """The NPU program of a partition graph on ``device`` (a ``hetflow.platform.Device``), as JSON text."""
    return json.dumps(_Lowering(graph, device, where).program(), sort_keys=True, separators=(",", ":"))


def plan_gemm(batch_a: int, batch_b: int, batch_out: int, m: int, k: int, n: int, itemsize: int, tile: int,
              capacity: int = NPU_SRAM_BYTES, bias: bool = False, scales: bool = False) -> tuple[int, int] | None:
    """(mb, nb): the largest row block and column panel (tile multiples, or the whole dim) such that one A
    block, two B panels and two output panels (and two bias panels, two f32 int8-scale panels) fit
    ``capacity`` bytes, with room for the 64-byte alignment of each buffer; None when not even one tile fits.
    (An int8 B panel is planned at ``itemsize``: more than it takes.)"""
    capacity -= (9 if scales else 7) * 64
    mb = m
    while True:
        a_bytes = batch_a * mb * k * itemsize
        per_column = 2 * (batch_b * k + batch_out * mb + (mb if bias else 0)) * itemsize + (8 if scales else 0)
        room = capacity - a_bytes
        if room > 0:
            nb = room // per_column
            nb = n if nb >= n else (nb // tile) * tile
            if nb >= min(tile, n):
                return mb, nb
        if mb <= min(tile, m):
            return None
        mb = max(min(tile, m), (mb // 2) // tile * tile)


class _Lowering:
    def __init__(self, graph: Graph, device, where: str):
        self.graph, self.device, self.where = graph, device, where or graph.name
        self.tile = max(1, int(device.tile))
        self.tensors: dict[str, dict] = {}
        self.buffers: dict[str, dict] = {}
        self.instructions: list[dict] = []
        self.names: dict[int, str] = {}
        self.sram_top = 0
        self.pending: dict[str, str] = {}     # a group's intermediate held in SRAM (not stored): tensor -> buffer
        self.remaining: dict[str, int] = {}   # its uses still to come

    # --- the program -------------------------------------------------------------------------------
    def program(self) -> dict:
        g = self.graph
        for v in g.inputs:
            self._tensor(v, v.name, "input")
        for name, w in g.weights.items():
            self._tensor(w, name, "weight")
        for node in g.nodes:
            self._node(node, {}, "")
        for v in g.outputs:
            entry = self.tensors[self.names[id(v)]]
            if entry["kind"] == "temp":
                entry["kind"] = "output"
        d = self.device
        return {"format": FORMAT, "version": VERSION, "name": g.name,
                "device": {"name": d.name, "tile": self.tile, "peak": {k: float(v) for k, v in sorted(d.peak.items())},
                           "bandwidth": float(d.bandwidth), "launch": float(d.launch),
                           "stationary_penalty": float(d.stationary_penalty), "sram_bytes": NPU_SRAM_BYTES},
                "dispatches": len(g.nodes),
                "inputs": [self.names[id(v)] for v in g.inputs],
                "outputs": [self.names[id(v)] for v in g.outputs],
                "tensors": self.tensors, "buffers": self.buffers, "instructions": self.instructions}

    def _tensor(self, v: Value, name: str, kind: str) -> str:
        t = v.type
        if t is None or not t.is_static or t.dtype.value == "str":
            raise NpuUnsupported(f"{self.where}: value %{v.name} has type {t}: the NPU needs static numeric shapes")
        entry = {"dtype": t.dtype.value, "shape": [int(d) for d in t.shape], "kind": kind}
        if kind == "const":
            entry["data"] = _tensor_to_json(np.asarray(v.data))["tensor"]
        self.tensors[name] = entry
        self.names[id(v)] = name
        return name

    def _node(self, node: Node, scope: dict[int, str], prefix: str) -> None:
        """Lower ``node``; ``scope`` maps a group body's inputs to the DRAM tensors they read."""
        if node.op == GROUP:
            self._group(node, scope, prefix)
            return
        ins = [None if v is None else self._name_of(v, scope, prefix) for v in node.inputs]
        outs = [self._tensor(o, prefix + o.name, "temp") for o in node.outputs]
        label = prefix + (node.outputs[0].name if node.outputs else node.op)
        shapes = [None if n is None else self.tensors[n] for n in ins]
        # inside a group, a value only the group's own ops read may stay in SRAM (no store, no reload)
        hold = [len(o.uses) if prefix and not o.is_output else 0 for o in node.outputs]
        if node.op in ("MatMul", "Gemm") and self._on_array(node, shapes):
            self._flush()
            self.sram_top = 0
            self._gemm(node, ins, outs[0], label, hold=hold[0], int8=self._int8(node, ins, label))
        elif node.op == "Conv" and self._conv_on_array(node, shapes):
            self._flush()
            self._conv(node, ins, outs[0], label)
        else:
            self._vector(node, ins, outs, label, hold)
        for name in ins:
            if name in self.remaining:
                self.remaining[name] -= 1
                if self.remaining[name] <= 0:
                    self.pending.pop(name, None)   # its last reader ran: its SRAM is free

    def _name_of(self, v: Value, scope: dict[int, str], prefix: str) -> str:
        if id(v) in scope:
            return scope[id(v)]
        if id(v) in self.names:
            return self.names[id(v)]
        if v.data is not None:  # a constant inside a group body
            return self._tensor(v, prefix + v.name, "const")
        raise BackendError(f"{self.where}: value %{v.name} is read before it is computed (a bug in the NPU "
                           "emitter's lowering)")

    def _group(self, node: Node, scope: dict[int, str], prefix: str) -> None:
        body: Graph = node.attrs["body"]
        inner = {id(b): (None if v is None else self._name_of(v, scope, prefix)) for b, v in zip(body.inputs, node.inputs)}
        inner_prefix = f"{prefix}{node.outputs[0].name}/"
        for w_name, w in body.weights.items():
            if id(w) not in inner:
                inner[id(w)] = self._tensor(w, inner_prefix + w_name, "const")
        for body_node in body.nodes:
            self._node(body_node, inner, inner_prefix)
        self._flush()
        for out, body_out in zip(node.outputs, body.outputs):  # the group's outputs are its body's: aliases
            self.names[id(out)] = inner.get(id(body_out)) or self.names[id(body_out)]

    # --- SRAM --------------------------------------------------------------------------------------
    def _flush(self) -> None:
        """Store the intermediates held in SRAM that are still to be read (before their SRAM is reused)."""
        for name, buf in self.pending.items():
            if self.remaining.get(name, 0) > 0:
                self._emit(name, "store", buffer=buf, tensor=name, view=None, region=None)
        self.pending.clear()

    def _pending_top(self) -> int:
        return max((self.buffers[b]["offset"] + _pad(max(self.buffers[b]["bytes"], 1), 64)
                    for b in self.pending.values()), default=0)

    def _buffer(self, label: str, role: str, shape, dtype: str, node_label: str, op: str) -> str:
        size = math.prod(shape) * np.dtype(_numpy(dtype)).itemsize
        offset = self.sram_top
        aligned = _pad(size, 64) if size else 64
        if offset + aligned > NPU_SRAM_BYTES:
            raise BackendError(f"{self.where}: node %{node_label} ({op}) needs {offset + aligned} bytes of NPU SRAM "
                               f"for its {role} buffer of shape {list(shape)} {dtype}; the SRAM holds "
                               f"{NPU_SRAM_BYTES} bytes (hetflow.platform.NPU_SRAM_BYTES)")
        self.sram_top = offset + aligned
        name = f"{label}:{role}"
        self.buffers[name] = {"offset": offset, "bytes": int(size), "shape": [int(d) for d in shape], "dtype": dtype}
        return name

    def _emit(self, label: str, op: str, **fields) -> None:
        self.instructions.append({"op": op, "node": label, **fields})

    # --- the array ---------------------------------------------------------------------------------
    def _on_array(self, node: Node, shapes: list) -> bool:
        a, b = shapes[0], shapes[1]
        if a is None or b is None or a["dtype"] != b["dtype"] or a["dtype"] not in ARRAY_DTYPES:
            return False
        if node.op == "Gemm":
            return len(a["shape"]) == 2 and len(b["shape"]) == 2
        return len(a["shape"]) >= 2 and len(b["shape"]) >= 2

    def _int8(self, node: Node, ins: list, label: str) -> dict | None:
        """The int8 mode of a MatMul/Gemm the quantize pass marked (``node.meta["int8"]``): its weight (the second
        operand, a 2-D weight or constant) as the int8 tensor ``W#i8`` and the per-column scales ``W#scale``,
        both declared here and made from the float weight when the program is loaded. None: floats."""
        mark = node.meta.get("int8")
        if mark is None:
            return None
        weight = self.tensors[ins[1]]
        if weight["kind"] not in ("weight", "const") or len(weight["shape"]) != 2:
            raise BackendError(f"{self.where}: node %{label} ({node.op}) is marked int8 by the quantize pass, but its "
                               f"second operand {ins[1]!r} is a {weight['kind']} of shape {weight['shape']}, not a "
                               "2-D weight (an inconsistency between the pass and the NPU emitter)")
        trans_b = node.op == "Gemm" and bool(node.attrs.get("transB", 0))
        axis = 0 if trans_b else 1                       # the output-channel (column of B) axis of the stored weight
        quantized, scales = f"{ins[1]}#i8", f"{ins[1]}#scale"
        self.tensors[quantized] = {"dtype": "i8", "shape": list(weight["shape"]), "kind": "int8_weight",
                                   "source": ins[1], "axis": axis}
        self.tensors[scales] = {"dtype": "f32", "shape": [weight["shape"][axis]], "kind": "int8_scale",
                                "source": ins[1], "axis": axis}
        return {"weight": quantized, "scales": scales, "a_scale": float(mark["activation_scale"])}

    def _gemm(self, node: Node, ins: list, out: str, label: str, views: tuple = (None, None, None),
              hold: int = 0, int8: dict | None = None) -> None:
        """MatMul/Gemm (or a Conv's im2col product) on the array. ``views``: shapes the A, B and output tensors
        are read and written as (None: their own). ``hold`` > 0: a group's intermediate read that many times:
        when the product is one block, its output stays in SRAM instead of being stored. ``int8`` (``_int8``):
        B is read from its int8 tensor with a panel of per-column scales, and the gemm runs in int8."""
        trans_a = bool(node.attrs.get("transA", 0)) if node.op == "Gemm" else False
        trans_b = bool(node.attrs.get("transB", 0)) if node.op == "Gemm" else False
        alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
        beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        bias = ins[2] if node.op in ("Gemm", "Conv") and len(ins) > 2 else None
        a_shape = views[0] or self.tensors[ins[0]]["shape"]
        b_shape = views[1] or self.tensors[ins[1]]["shape"]
        o_shape = views[2] or self.tensors[out]["shape"]
        dtype = self.tensors[ins[0]]["dtype"]
        itemsize = np.dtype(_numpy(dtype)).itemsize
        m, k = (a_shape[-1], a_shape[-2]) if trans_a else (a_shape[-2], a_shape[-1])
        n = b_shape[-2] if trans_b else b_shape[-1]
        batch_a, batch_b = math.prod(a_shape[:-2]), math.prod(b_shape[:-2])
        batch_out = math.prod(o_shape[:-2])
        plan = plan_gemm(batch_a, batch_b, batch_out, m, k, n, itemsize, self.tile, bias=bias is not None,
                         scales=int8 is not None)
        if plan is None:
            raise BackendError(f"{self.where}: node %{label} ({node.op}) [{m}x{k}]x[{k}x{n}] {dtype}: not even one "
                               f"{self.tile}-wide panel fits the NPU SRAM ({NPU_SRAM_BYTES} bytes, "
                               "hetflow.platform.NPU_SRAM_BYTES)")
        mb, nb = plan
        keep = hold > 0 and mb >= m and nb >= n and views[2] is None
        stationary = self._stationary(m, k, n)
        bias_view = None
        if bias is not None:   # Gemm's C broadcasts to [M, N]; a Conv's bias is per output channel (row)
            bias_view = [self.tensors[bias]["shape"][0], 1] if node.op == "Conv" else \
                _bias_view(self.tensors[bias]["shape"])
        for m0 in range(0, m, mb):
            m1 = min(m, m0 + mb)
            self.sram_top = 0
            a_region = _rows(a_shape, m0, m1, trans_a)
            a_buf = self._buffer(f"{label}@m{m0}", "a", _region_shape(a_region, trans_a), dtype, label, node.op)
            self._emit(label, "load", tensor=ins[0], buffer=a_buf, view=views[0], region=a_region, transpose=trans_a)
            base, second = self.sram_top, self.sram_top
            panels = list(range(0, n, nb))
            steps = []
            for p, n0 in enumerate(panels):
                n1 = min(n, n0 + nb)
                self.sram_top = base if p % 2 == 0 else second   # ping-pong slots
                tag = f"{label}@m{m0}n{n0}"
                b_region = _cols(b_shape, n0, n1, trans_b)
                b_buf = self._buffer(tag, "b", _region_shape(b_region, trans_b), "i8" if int8 else dtype, label,
                                     node.op)
                s_buf = None
                if int8 is not None:
                    s_buf = self._buffer(tag, "scales", [n1 - n0], "f32", label, node.op)
                c_buf = c_region = None
                if bias is not None:
                    c_region = _bias_region(bias_view, m0, m1, n0, n1)
                    c_buf = self._buffer(tag, "bias", _region_shape(c_region, False), self.tensors[bias]["dtype"],
                                         label, node.op)
                o_region = [[0, d] for d in o_shape[:-2]] + [[m0, m1], [n0, n1]]
                o_buf = self._buffer(tag, "out", _region_shape(o_region, False), self.tensors[out]["dtype"], label,
                                     node.op)
                if p == 0:
                    second = self.sram_top
                b_tensor = int8["weight"] if int8 else ins[1]
                loads = [dict(tensor=b_tensor, buffer=b_buf, view=views[1], region=b_region, transpose=trans_b)]
                if s_buf is not None:
                    loads.append(dict(tensor=int8["scales"], buffer=s_buf, view=None, region=[[n0, n1]],
                                      transpose=False))
                if c_buf is not None:
                    loads.append(dict(tensor=bias, buffer=c_buf, view=bias_view, region=c_region, transpose=False))
                gemm = dict(a=a_buf, b=b_buf, out=o_buf, bias=c_buf, alpha=alpha, beta=beta, stationary=stationary,
                            product=[m, k, n])
                if int8 is not None:
                    gemm["int8"] = {"a_scale": int8["a_scale"], "b_scales": s_buf}
                stores = [] if keep else [dict(buffer=o_buf, tensor=out, view=views[2], region=o_region)]
                steps.append((loads, ("gemm", gemm), stores))
            self._pipeline(label, steps)
        if keep:
            self.pending[out], self.remaining[out] = steps[0][1][1]["out"], hold

    def _pipeline(self, label: str, steps: list) -> None:
        """Software pipelining over the ping-pong slots: the loads of step p+1 go before the compute of step p.
        A step is (loads, (op, fields), stores)."""
        for loads in steps[0][0]:
            self._emit(label, "load", **loads)
        for p, (_, (op, fields), stores) in enumerate(steps):
            if p + 1 < len(steps):
                for loads in steps[p + 1][0]:
                    self._emit(label, "load", **loads)
            self._emit(label, op, **fields)
            for store in stores:
                self._emit(label, "store", **store)

    def _conv_on_array(self, node: Node, shapes: list) -> bool:
        x, w = shapes[0], shapes[1]
        return (w is not None and len(x["shape"]) == 4 and len(w["shape"]) == 4 and x["dtype"] == w["dtype"]
                and x["dtype"] in ARRAY_DTYPES and int(node.attrs.get("group", 1)) == 1
                and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET"))

    def _conv(self, node: Node, ins: list, out: str, label: str) -> None:
        """A 2-D Conv as im2col on the vector unit (x [N,C,H,W] -> cols [N, C*kh*kw, oh*ow], a DRAM temp), then
        the product W[M, C*kh*kw] @ cols on the array, written as the output [N, M, oh, ow]."""
        n_, c, h, w = self.tensors[ins[0]]["shape"]
        m, _, kh, kw = self.tensors[ins[1]]["shape"]
        _, _, oh, ow = self.tensors[out]["shape"]
        dtype = self.tensors[ins[0]]["dtype"]
        attrs = {"kernel_shape": [kh, kw], "strides": list(node.attrs.get("strides", [1, 1])),
                 "pads": list(node.attrs.get("pads", [0, 0, 0, 0])),
                 "dilations": list(node.attrs.get("dilations", [1, 1]))}
        cols = f"{label}/im2col"
        self.tensors[cols] = {"dtype": dtype, "shape": [n_, c * kh * kw, oh * ow], "kind": "temp"}
        self.sram_top = 0
        x_buf = self._buffer(label, "x", [n_, c, h, w], dtype, label, node.op)
        self._emit(label, "load", tensor=ins[0], buffer=x_buf, view=None, region=None, transpose=False)
        c_buf = self._buffer(label, "cols", [n_, c * kh * kw, oh * ow], dtype, label, node.op)
        self._emit(label, "vector", kernel={"op": IM2COL, "opset": self.graph.opset, "attrs": attrs},
                   inputs=[x_buf], outputs=[c_buf])
        self._emit(label, "store", buffer=c_buf, tensor=cols, view=None, region=None)
        self.sram_top = 0
        k = c * kh * kw
        self._gemm(node, [ins[1], cols] + ins[2:3], out, label, views=([m, k], None, [n_, m, oh * ow]))

    def _stationary(self, m: int, k: int, n: int) -> str:
        """Hold ``b`` (the weight) unless its reduction dim is longer than its output dim and ``a``'s is not."""
        if self.device.stationary_penalty > 1 and k > n and k <= m:
            return "a"
        return "b"

    # --- the vector unit ---------------------------------------------------------------------------
    def _bytes(self, name: str) -> int:
        t = self.tensors[name]
        return math.prod(t["shape"]) * np.dtype(_numpy(t["dtype"])).itemsize

    def _chunk_dim(self, node: Node, ins: list, outs: list) -> int | None:
        """The output dim an op too large for the SRAM can be cut along (its first dim longer than 1), for
        ops with NumPy broadcasting and Softmax/LayerNormalization cut before their axis; None otherwise."""
        from hetflow.ir import FusionKind, get_op
        shape = self.tensors[outs[0]]["shape"]
        if len(outs) != 1 or not shape:
            return None
        dim = next((i for i, d in enumerate(shape) if d > 1), None)
        if dim is None:
            return None
        if node.op in CHUNKABLE_REDUCTIONS:
            axis = int(node.attrs.get("axis", -1))
            return dim if dim < (axis % len(shape)) else None
        kind = get_op(node.op, node).kind
        if kind not in (FusionKind.elementwise, FusionKind.broadcast) or node.op == "BatchNormalization":
            return None
        return dim

    def _vector_chunked(self, node: Node, ins: list, outs: list, label: str, dim: int) -> None:
        """The op in chunks of rows of output dim ``dim``, double-buffered: inputs aligned with that dim are
        cut with it, the others (broadcast operands, normalisation weights) loaded once."""
        out_shape = self.tensors[outs[0]]["shape"]
        rank, rows = len(out_shape), out_shape[dim]

        def cut_at(name):   # the input's dim aligned with ``dim`` (NumPy broadcasting), or None: loaded whole
            shape = self.tensors[name]["shape"]
            index = dim - (rank - len(shape))
            return index if index >= 0 and shape[index] == rows else None

        self.sram_top = 0
        fixed = {}
        for i, name in enumerate(ins):
            if name is not None and cut_at(name) is None:
                t = self.tensors[name]
                fixed[i] = self._buffer(label, f"in{i}", t["shape"], t["dtype"], label, node.op)
                self._emit(label, "load", tensor=name, buffer=fixed[i], view=None, region=None, transpose=False)
        per_row = sum(self._bytes(n) // rows for i, n in enumerate(ins) if n is not None and i not in fixed)
        per_row += self._bytes(outs[0]) // rows
        room = NPU_SRAM_BYTES - self.sram_top - 2 * 64 * (len(ins) + 1)
        chunk = room // (2 * per_row) if per_row else rows
        if chunk < 1:
            raise BackendError(f"{self.where}: node %{label} ({node.op}): not even one row of dim {dim} of "
                               f"{out_shape} fits the NPU SRAM ({NPU_SRAM_BYTES} bytes, "
                               "hetflow.platform.NPU_SRAM_BYTES)")
        kernel = {"op": node.op, "opset": self.graph.opset,
                  "attrs": {k: _attr_to_json(a) for k, a in sorted(node.attrs.items())}}
        base, second, steps = self.sram_top, self.sram_top, []
        for c, r0 in enumerate(range(0, rows, chunk)):
            r1 = min(rows, r0 + chunk)
            self.sram_top = base if c % 2 == 0 else second   # ping-pong slots
            tag = f"{label}@r{r0}"
            loads, bufs = [], []
            for i, name in enumerate(ins):
                if name is None or i in fixed:
                    bufs.append(None if name is None else fixed[i])
                    continue
                shape, index = self.tensors[name]["shape"], cut_at(name)
                region = [[0, d] for d in shape]
                region[index] = [r0, r1]
                buf = self._buffer(tag, f"in{i}", [b - a for a, b in region], self.tensors[name]["dtype"],
                                   label, node.op)
                loads.append(dict(tensor=name, buffer=buf, view=None, region=region, transpose=False))
                bufs.append(buf)
            region = [[0, d] for d in out_shape]
            region[dim] = [r0, r1]
            out_buf = self._buffer(tag, "out0", [b - a for a, b in region], self.tensors[outs[0]]["dtype"],
                                   label, node.op)
            if c == 0:
                second = self.sram_top
            steps.append((loads, ("vector", dict(kernel=kernel, inputs=bufs, outputs=[out_buf])),
                          [dict(buffer=out_buf, tensor=outs[0], view=None, region=region)]))
        self._pipeline(label, steps)

    def _vector(self, node: Node, ins: list, outs: list, label: str, hold: list) -> None:
        names = [n for n in ins if n is not None] + outs
        whole = sum(_pad(self._bytes(n), 64) for n in names)
        if whole > NPU_SRAM_BYTES:
            dim = self._chunk_dim(node, ins, outs)
            if dim is not None:
                self._flush()
                self._vector_chunked(node, ins, outs, label, dim)
                return
        fresh = [n for n in ins if n is not None and n not in self.pending] + outs
        base = self._pending_top()
        if base + sum(_pad(max(self._bytes(n), 1), 64) for n in fresh) > NPU_SRAM_BYTES:
            self._flush()
            base = 0
        self.sram_top = base
        in_bufs = []
        for i, name in enumerate(ins):
            if name is None or name in self.pending:
                in_bufs.append(None if name is None else self.pending[name])
                continue
            t = self.tensors[name]
            buf = self._buffer(label, f"in{i}", t["shape"], t["dtype"], label, node.op)
            self._emit(label, "load", tensor=name, buffer=buf, view=None, region=None, transpose=False)
            in_bufs.append(buf)
        out_bufs = [self._buffer(label, f"out{i}", self.tensors[o]["shape"], self.tensors[o]["dtype"], label, node.op)
                    for i, o in enumerate(outs)]
        kernel = {"op": node.op, "opset": self.graph.opset,
                  "attrs": {k: _attr_to_json(a) for k, a in sorted(node.attrs.items())}}
        self._emit(label, "vector", kernel=kernel, inputs=in_bufs, outputs=out_bufs)
        for buf, name, uses in zip(out_bufs, outs, hold):
            if uses > 0:
                self.pending[name], self.remaining[name] = buf, uses
            else:
                self._emit(label, "store", buffer=buf, tensor=name, view=None, region=None)


CHUNKABLE_REDUCTIONS = ("Softmax", "LogSoftmax", "LayerNormalization")


def _numpy(dtype: str):
    from hetflow.ir import DType
    return DType(dtype).numpy


def _rows(shape: list, m0: int, m1: int, trans: bool) -> list:
    lead = [[0, d] for d in shape[:-2]]
    return lead + ([[0, shape[-2]], [m0, m1]] if trans else [[m0, m1], [0, shape[-1]]])


def _cols(shape: list, n0: int, n1: int, trans: bool) -> list:
    lead = [[0, d] for d in shape[:-2]]
    return lead + ([[n0, n1], [0, shape[-1]]] if trans else [[0, shape[-2]], [n0, n1]])


def _region_shape(region: list, trans: bool) -> list:
    shape = [b - a for a, b in region]
    return shape[:-2] + [shape[-1], shape[-2]] if trans else shape


def _bias_view(shape: list) -> list:
    """Gemm's C as a 2-D view (it broadcasts unidirectionally to [M, N])."""
    shape = list(shape)
    while len(shape) < 2:
        shape.insert(0, 1)
    return shape


def _bias_region(view: list, m0: int, m1: int, n0: int, n1: int) -> list:
    rows = [m0, m1] if view[0] != 1 else [0, 1]
    cols = [n0, n1] if view[1] != 1 else [0, 1]
    return [rows, cols]


# --- the listing ---------------------------------------------------------------------------------------

def disassemble(text: str) -> str:
    """A readable listing of an NPU program: its device, tensors, SRAM buffers and instructions."""
    program = json.loads(text)
    d = program["device"]
    lines = [f"; {program['format']} v{program['version']} {program['name']}: device {d['name']} "
             f"(array {d['tile']}x{d['tile']}, SRAM {d['sram_bytes']} B, DRAM {d['bandwidth'] / 1e9:g} GB/s)"]
    for name, t in program["tensors"].items():
        source = f" of {t['source']} (axis {t['axis']})" if "source" in t else ""
        lines.append(f"; tensor {name}: {t['kind']} {t['dtype']}{t['shape']}{source}")
    buffers = program["buffers"]
    for i, ins in enumerate(program["instructions"]):
        op = ins["op"]
        if op == "load":
            b = buffers[ins["buffer"]]
            region = "" if ins["region"] is None else "[" + ",".join(f"{a}:{z}" for a, z in ins["region"]) + "]"
            lines.append(f"{i:5d}  load    sram@{b['offset']:<8d} <- {ins['tensor']}{region}"
                         f"{' (T)' if ins['transpose'] else ''}  {b['bytes']} B")
        elif op == "store":
            b = buffers[ins["buffer"]]
            region = "" if ins["region"] is None else "[" + ",".join(f"{a}:{z}" for a, z in ins["region"]) + "]"
            lines.append(f"{i:5d}  store   {ins['tensor']}{region} <- sram@{b['offset']}  {b['bytes']} B")
        elif op == "gemm":
            a, b = buffers[ins["a"]]["shape"], buffers[ins["b"]]["shape"]
            int8 = ins.get("int8")
            mode = "" if int8 is None else (f"  int8 (a_scale={int8['a_scale']:.6g}, column scales "
                                            f"sram@{buffers[int8['b_scales']]['offset']})")
            lines.append(f"{i:5d}  gemm    sram@{buffers[ins['out']]['offset']} = {ins['alpha']:g} * "
                         f"{a} @ {b}{' + bias' if ins['bias'] else ''}  stationary={ins['stationary']}{mode}  "
                         f"; %{ins['node']}")
        else:
            outs = ", ".join(f"sram@{buffers[o]['offset']}" for o in ins["outputs"])
            args = ", ".join("-" if x is None else f"sram@{buffers[x]['offset']}" for x in ins["inputs"])
            lines.append(f"{i:5d}  vector  {outs} = {ins['kernel']['op']}({args})  ; %{ins['node']}")
    return "\n".join(lines)
