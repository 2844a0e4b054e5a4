"""Runner ``npu``: the NPU simulator. Runs the program ``hetflow.backends.npu`` emits (its format is documented
there) functionally with NumPy and times every instruction with a model of the device.

Validation at load: the JSON schema (``PROGRAM_SCHEMA``: one line naming the field), then the program's
meaning: every buffer inside the SRAM (``hetflow.platform.NPU_SRAM_BYTES``, not what the program claims),
every name defined, every region inside its tensor and the size of its buffer, gemm operands that multiply,
an int8 gemm's i8 ``b`` and its f32 per-column scales, each int8 tensor's float source. The int8 weights
(``int8_weight``, ``int8_scale``) are made here at load from their sources (``quantize_per_channel``), once.

The timing model (all of it from the platform's device; nothing measured):

* array clock = peak(dtype) / (2 tile^2): a tile x tile systolic array does tile^2 MACs a cycle at peak;
* gemm (in int8 mode, ``int8`` present: at peak(i8); its i8 weight panels are a quarter of f32's load bytes):
  batch x ceil(m/T) x ceil(k/T) x ceil(n/T) tiles of T cycles each (every dim padded to the tile), times
  ``stationary_penalty`` when the operand held in the array has a reduction dim longer than its output dim
  in the whole product (``b`` held: k > n; ``a`` held: k > m), HeteroInfer's operand-order effect;
* vector: ceil(elements x ops-per-element / T) cycles (T lanes), elements = the larger of what it reads and writes;
* load/store: bytes / device bandwidth (DRAM), on one DMA engine; a load into an operand of a penalised gemm
  (the held operand's reduction dim the longer) streams ``stationary_penalty`` times slower: HeteroInfer saw
  the whole kernel 6x slower in the wrong order, a memory-bound GEMV included (its [4096, 14336] x 1 token:
  NPU 6.5 ms against the GPU's 1.5 ms);
* the DMA engine, the array and the vector unit each run their instructions in order; an instruction starts when
  its engine is free, the buffers and DRAM tensors it reads are written, and the SRAM bytes it writes are no
  longer read or written by earlier instructions: a load into the other ping-pong slot overlaps a gemm;
* the partition's time = the makespan + ``launch`` x ``dispatches`` (one launch per top-level IR node).

The timing does not depend on the data: it is computed once at load (``trace``, ``modelled_seconds``);
``last_seconds`` is the modelled time of the last run.
"""
from __future__ import annotations

import json
import math

import numpy as np

from hetflow.ir import DType, Node, TensorType, Value
from hetflow.ir.errors import HetflowError
from hetflow.ir.ops import make_kernel
from hetflow.ir.serialize import _attr_from_json, _tensor_from_json
from hetflow.platform import NPU_SRAM_BYTES
from hetflow.support.schema import check

from . import RunnerError, register_runner
from .interpreter import SimulatorRunner

__all__ = ["PROGRAM_SCHEMA", "NpuSimulator", "gemm_cycles", "load_program", "load_npu", "quantize_activation",
           "quantize_per_channel"]

IM2COL = "hetflow.npu.Im2Col"   # the vector unit's own op: x [N, C, H, W] -> [N, C*kh*kw, oh*ow]
OPS_PER_ELEMENT = {"Softmax": 5, "LogSoftmax": 5, "LayerNormalization": 8, "RMSNormalization": 6,
                   "BatchNormalization": 4, "InstanceNormalization": 8, "GroupNormalization": 8, "Gelu": 8,
                   "Erf": 8, "Tanh": 4, "Sigmoid": 4, "Exp": 2, "Log": 2, "Sqrt": 2, "Pow": 4, "Div": 2,
                   "Conv": 0}   # Conv: counted by its MACs (see _vector_work)

_REGION = {"anyOf": [{"type": "null"}, {"type": "array", "items": {
    "type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 2, "maxItems": 2}}]}
_NAME = {"type": "string", "minLength": 1}
_INSTRUCTION = {
    "type": "object", "required": ["op", "node"],
    "properties": {"op": {"enum": ["load", "store", "gemm", "vector"]}, "node": {"type": "string"}},
    "allOf": [
        {"if": {"properties": {"op": {"const": "load"}}},
         "then": {"required": ["tensor", "buffer", "view", "region", "transpose"],
                  "properties": {"tensor": _NAME, "buffer": _NAME, "region": _REGION, "transpose": {"type": "boolean"},
                                 "view": {"anyOf": [{"type": "null"}, {"type": "array",
                                                                       "items": {"type": "integer", "minimum": 0}}]}}}},
        {"if": {"properties": {"op": {"const": "store"}}},
         "then": {"required": ["tensor", "buffer", "view", "region"],
                  "properties": {"tensor": _NAME, "buffer": _NAME, "region": _REGION,
                                 "view": {"anyOf": [{"type": "null"}, {"type": "array",
                                                                       "items": {"type": "integer", "minimum": 0}}]}}}},
        {"if": {"properties": {"op": {"const": "gemm"}}},
         "then": {"required": ["a", "b", "out", "bias", "alpha", "beta", "stationary", "product"],
                  "properties": {"a": _NAME, "b": _NAME, "out": _NAME, "bias": {"type": ["string", "null"]},
                                 "alpha": {"type": "number"}, "beta": {"type": "number"},
                                 "stationary": {"enum": ["a", "b"]},
                                 "int8": {"type": "object", "required": ["a_scale", "b_scales"],
                                          "properties": {"a_scale": {"type": "number", "exclusiveMinimum": 0},
                                                         "b_scales": _NAME}},
                                 "product": {"type": "array", "items": {"type": "integer", "minimum": 0},
                                             "minItems": 3, "maxItems": 3}}}},
        {"if": {"properties": {"op": {"const": "vector"}}},
         "then": {"required": ["kernel", "inputs", "outputs"],
                  "properties": {"kernel": {"type": "object", "required": ["op", "attrs", "opset"],
                                            "properties": {"op": _NAME, "attrs": {"type": "object"},
                                                           "opset": {"type": "integer"}}},
                                 "inputs": {"type": "array", "items": {"type": ["string", "null"]}},
                                 "outputs": {"type": "array", "items": _NAME, "minItems": 1}}}},
    ],
}
PROGRAM_SCHEMA = {
    "type": "object",
    "required": ["format", "version", "name", "device", "dispatches", "inputs", "outputs", "tensors", "buffers",
                 "instructions"],
    "properties": {
        "format": {"const": "hetflow-npu"}, "version": {"const": 1}, "name": {"type": "string"},
        "device": {"type": "object", "required": ["tile", "peak", "bandwidth", "launch", "stationary_penalty"],
                   "properties": {"tile": {"type": "integer", "minimum": 1},
                                  "peak": {"type": "object", "minProperties": 1,
                                           "additionalProperties": {"type": "number", "exclusiveMinimum": 0}},
                                  "bandwidth": {"type": "number", "exclusiveMinimum": 0},
                                  "launch": {"type": "number", "minimum": 0},
                                  "stationary_penalty": {"type": "number", "minimum": 1}}},
        "dispatches": {"type": "integer", "minimum": 0},
        "inputs": {"type": "array", "items": _NAME}, "outputs": {"type": "array", "items": _NAME},
        "tensors": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["dtype", "shape", "kind"],
            "properties": {"dtype": {"enum": [d.value for d in DType if d is not DType.str]},
                           "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                           "kind": {"enum": ["input", "weight", "const", "temp", "output", "int8_weight",
                                             "int8_scale"]},
                           "source": _NAME, "axis": {"enum": [0, 1]}},
            "if": {"properties": {"kind": {"enum": ["int8_weight", "int8_scale"]}}},
            "then": {"required": ["source", "axis"]}}},
        "buffers": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["offset", "bytes", "shape", "dtype"],
            "properties": {"offset": {"type": "integer", "minimum": 0}, "bytes": {"type": "integer", "minimum": 0},
                           "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                           "dtype": {"enum": [d.value for d in DType if d is not DType.str]}}}},
        "instructions": {"type": "array", "items": _INSTRUCTION},
    },
}


def load_program(text: str, where: str = "NPU program") -> dict:
    """The program parsed and schema-checked; a malformed or truncated one is a one-line ``RunnerError``."""
    try:
        program = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise RunnerError(f"{where} is not a valid NPU program (malformed or cut short): "
                          f"{str(exc).splitlines()[0][:120]}") from None
    check(program, PROGRAM_SCHEMA, where, RunnerError)
    return program


def gemm_cycles(batch: int, m: int, k: int, n: int, stationary: str, tile: int, penalty: float,
                product: tuple[int, int, int] | None = None) -> float:
    """Array cycles of ``batch`` products [m x k] @ [k x n]: every dim padded to the tile, T cycles a tile,
    ``penalty`` times more when the held operand's reduction dim is longer than its output dim in the whole
    ``product`` (m, k, n) the block belongs to (default: this block)."""
    tiles = batch * math.ceil(m / tile) * math.ceil(k / tile) * math.ceil(n / tile)
    whole_m, whole_k, whole_n = product or (m, k, n)
    held_output = whole_n if stationary == "b" else whole_m
    return tiles * tile * (penalty if whole_k > held_output else 1.0)


def peak_for(peak: dict, dtype: str) -> float:
    """As ``Device.peak_for``: a float type the device lacks runs in its nearest float precision."""
    if dtype in peak:
        return peak[dtype]
    for fallback in ("f32", "f16", "bf16", "f64"):
        if fallback in peak:
            return peak[fallback]
    return min(peak.values())


class NpuSimulator:
    """Executes an NPU program functionally (NumPy) and times it instruction by instruction."""

    def __init__(self, program: dict | str, weights: dict[str, np.ndarray], where: str = "NPU program"):
        self.where = where
        self.program = load_program(program, where) if isinstance(program, str) else program
        self.weights = weights
        self._check()
        self.int8 = self._quantize_weights()
        self.kernels = {i: self._kernel(i, ins) for i, ins in enumerate(self.program["instructions"])
                        if ins["op"] == "vector"}
        self._penalised = self._penalised_operands()
        self.trace, self.modelled_seconds = self._time()
        self.last_seconds: float | None = None

    # --- validation --------------------------------------------------------------------------------
    def _fail(self, index: int | None, message: str):
        at = "" if index is None else f" instruction {index} ({self.program['instructions'][index]['op']} for " \
                                      f"%{self.program['instructions'][index]['node']})"
        raise RunnerError(f"{self.where}{at}: {message}")

    def _check(self) -> None:
        p = self.program
        tensors, buffers = p["tensors"], p["buffers"]
        for name, b in buffers.items():
            need = math.prod(b["shape"]) * DType(b["dtype"]).numpy.itemsize
            if b["bytes"] != need:
                self._fail(None, f"buffer {name!r} says {b['bytes']} bytes; its shape {b['shape']} {b['dtype']} is "
                                 f"{need}")
            if b["offset"] + b["bytes"] > NPU_SRAM_BYTES:
                self._fail(None, f"buffer {name!r} at SRAM offset {b['offset']} + {b['bytes']} bytes lies beyond the "
                                 f"SRAM's capacity of {NPU_SRAM_BYTES} bytes")
        for name in p["inputs"] + p["outputs"]:
            if name not in tensors:
                self._fail(None, f"names tensor {name!r}, which its tensors table lacks")
        for name, t in tensors.items():
            if t["kind"] == "weight":
                w = self.weights.get(name)
                if w is None or list(w.shape) != t["shape"] or TensorType.of(w).dtype.value != t["dtype"]:
                    self._fail(None, f"weight {name!r} {t['dtype']}{t['shape']} is not among the partition's weights "
                                     "with that type")
        for name, t in tensors.items():
            if t["kind"] in ("int8_weight", "int8_scale"):
                self._check_int8_tensor(name, t)
        for i, ins in enumerate(p["instructions"]):
            if ins["op"] == "gemm" and ins.get("int8") is not None and ins["int8"]["b_scales"] not in buffers:
                self._fail(i, f"int8.b_scales names buffer {ins['int8']['b_scales']!r}, which the program does not "
                              "declare")
            for field in ("buffer", "a", "b", "out", "bias"):
                if ins.get(field) is not None and ins[field] not in buffers:
                    self._fail(i, f"{field} names buffer {ins[field]!r}, which the program does not declare")
            for name in ins.get("inputs", []) + ins.get("outputs", []):
                if name is not None and name not in buffers:
                    self._fail(i, f"names buffer {name!r}, which the program does not declare")
            if "tensor" in ins and ins["tensor"] not in tensors:
                self._fail(i, f"names tensor {ins['tensor']!r}, which the program does not declare")
            if ins["op"] in ("load", "store"):
                self._check_region(i, ins)
            if ins["op"] == "gemm":
                self._check_gemm(i, ins)

    def _check_int8_tensor(self, name: str, t: dict) -> None:
        source = self.program["tensors"].get(t["source"])
        if source is None or source["kind"] not in ("weight", "const") or len(source["shape"]) != 2 \
                or DType(source["dtype"]).numpy.kind != "f":
            self._fail(None, f"{t['kind']} {name!r} is made from {t['source']!r}, which is not a 2-D float weight or "
                             "constant of the program")
        want = ("i8", source["shape"]) if t["kind"] == "int8_weight" else ("f32", [source["shape"][t["axis"]]])
        if (t["dtype"], t["shape"]) != want:
            self._fail(None, f"{t['kind']} {name!r} is {t['dtype']}{t['shape']}; made from {t['source']!r} "
                             f"{source['dtype']}{source['shape']} along axis {t['axis']} it is {want[0]}{want[1]}")

    def _quantize_weights(self) -> dict[str, np.ndarray]:
        """The int8 weights and their per-channel scales, made from their float weights (once, at load)."""
        tensors, made = self.program["tensors"], {}
        for name, t in tensors.items():
            if t["kind"] not in ("int8_weight", "int8_scale"):
                continue
            source = tensors[t["source"]]
            data = self.weights[t["source"]] if source["kind"] == "weight" else \
                _tensor_from_json(source["data"], f"constant {t['source']}")
            quantized, scales = quantize_per_channel(data, t["axis"])
            made[name] = quantized if t["kind"] == "int8_weight" else scales
        return made

    def _check_region(self, i: int, ins: dict) -> None:
        t = self.program["tensors"][ins["tensor"]]
        shape = ins.get("view") or t["shape"]
        if math.prod(shape) != math.prod(t["shape"]):
            self._fail(i, f"view {shape} does not hold tensor {ins['tensor']!r}'s shape {t['shape']}")
        region = ins["region"] or [[0, d] for d in shape]
        if len(region) != len(shape) or any(not 0 <= a <= b <= d for (a, b), d in zip(region, shape)):
            self._fail(i, f"region {region} lies outside tensor {ins['tensor']!r} of shape {shape}")
        got = [b - a for a, b in region]
        if ins.get("transpose"):
            got = got[:-2] + got[-1:] + got[-2:-1] if len(got) >= 2 else got
        if got != self.program["buffers"][ins["buffer"]]["shape"]:
            self._fail(i, f"region of shape {got} does not fit buffer {ins['buffer']!r} of shape "
                          f"{self.program['buffers'][ins['buffer']]['shape']}")

    def _check_gemm(self, i: int, ins: dict) -> None:
        buffers = self.program["buffers"]
        a, b, out = buffers[ins["a"]]["shape"], buffers[ins["b"]]["shape"], buffers[ins["out"]]["shape"]
        try:
            expect = list(np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))) + [a[-2], b[-1]]
        except (ValueError, IndexError):
            expect = None
        if len(a) < 2 or len(b) < 2 or a[-1] != b[-2] or expect != out:
            self._fail(i, f"operands {a} @ {b} do not make its output buffer's shape {out}")
        m, k, n = ins["product"]
        if a[-2] > m or a[-1] != k or b[-1] > n:
            self._fail(i, f"its block {a} @ {b} is not part of the product {ins['product']} it names")
        a_dtype, b_dtype = buffers[ins["a"]]["dtype"], buffers[ins["b"]]["dtype"]
        if ins.get("int8") is None:
            if "i8" in (a_dtype, b_dtype):
                self._fail(i, "an i8 operand in a gemm without int8 mode (its per-column scales)")
            return
        scales = buffers[ins["int8"]["b_scales"]]
        if b_dtype != "i8" or DType(a_dtype).numpy.kind != "f" or len(b) != 2:
            self._fail(i, f"int8 mode takes a float a and a 2-D i8 b, not {a_dtype} and {b_dtype}{b}")
        if scales["dtype"] != "f32" or scales["shape"] != [b[-1]]:
            self._fail(i, f"int8 mode's column scales {ins['int8']['b_scales']!r} are {scales['dtype']}"
                          f"{scales['shape']}; its b has {b[-1]} columns: f32[{b[-1]}]")

    def _kernel(self, i: int, ins: dict):
        spec = ins["kernel"]
        buffers = self.program["buffers"]
        if spec["op"] == IM2COL:
            return self._im2col_kernel(i, ins)
        values = [None if b is None else Value(b, TensorType(DType(buffers[b]["dtype"]), tuple(buffers[b]["shape"])))
                  for b in ins["inputs"]]
        outs = [Value(b, TensorType(DType(buffers[b]["dtype"]), tuple(buffers[b]["shape"]))) for b in ins["outputs"]]
        try:
            attrs = {k: _attr_from_json(v, f"attribute {k}") for k, v in spec["attrs"].items()}
            return make_kernel(Node(spec["op"], values, outs, attrs, loc=ins["node"]), spec["opset"])
        except HetflowError as exc:
            self._fail(i, f"the vector unit cannot run {spec['op']}: {str(exc).splitlines()[0]}")

    def _im2col_kernel(self, i: int, ins: dict):
        buffers, attrs = self.program["buffers"], ins["kernel"]["attrs"]
        try:
            (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = (attrs["kernel_shape"], attrs["strides"], attrs["pads"],
                                                              attrs["dilations"])
            n, c, h, w = buffers[ins["inputs"][0]]["shape"]
            [out] = ins["outputs"]
        except (KeyError, TypeError, ValueError):
            self._fail(i, f"{IM2COL} takes one [N, C, H, W] buffer, kernel_shape, strides, pads and dilations of "
                          "2-D")
        oh, ow = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
        if buffers[out]["shape"] != [n, c * kh * kw, oh * ow] or min(sh, sw, dh, dw) < 1:
            self._fail(i, f"{IM2COL} of {[n, c, h, w]} makes {[n, c * kh * kw, oh * ow]}, not its output buffer's "
                          f"{buffers[out]['shape']}")

        def run(inputs):
            x = np.pad(inputs[0], ((0, 0), (0, 0), (pt, pb), (pl, pr)))
            cols = np.empty((n, c, kh, kw, oh, ow), x.dtype)
            for a in range(kh):
                for b in range(kw):
                    cols[:, :, a, b] = x[:, :, a * dh:a * dh + sh * (oh - 1) + 1:sh, b * dw:b * dw + sw * (ow - 1) + 1:sw]
            return [cols.reshape(n, c * kh * kw, oh * ow)]
        return run

    # --- timing ------------------------------------------------------------------------------------
    def _seconds(self, ins: dict) -> tuple[str, float]:
        d, buffers = self.program["device"], self.program["buffers"]
        tile = d["tile"]
        if ins["op"] in ("load", "store"):
            slowdown = d["stationary_penalty"] if ins["op"] == "load" and ins["buffer"] in self._penalised else 1.0
            return "dma", buffers[ins["buffer"]]["bytes"] / d["bandwidth"] * slowdown
        if ins["op"] == "gemm":
            a, b = buffers[ins["a"]], buffers[ins["b"]]
            batch = math.prod(buffers[ins["out"]]["shape"][:-2])
            cycles = gemm_cycles(batch, a["shape"][-2], a["shape"][-1], b["shape"][-1], ins["stationary"], tile,
                                 d["stationary_penalty"], tuple(ins["product"]))
            dtype = "i8" if ins.get("int8") is not None else a["dtype"]
            return "array", cycles * 2 * tile * tile / peak_for(d["peak"], dtype)
        reads = sum(math.prod(buffers[x]["shape"]) for x in ins["inputs"] if x is not None)
        writes = sum(math.prod(buffers[x]["shape"]) for x in ins["outputs"])
        work = max(reads, writes, 1) * OPS_PER_ELEMENT.get(ins["kernel"]["op"], 1)
        if ins["kernel"]["op"] == "Conv" and len(ins["inputs"]) > 1:
            weight = buffers[ins["inputs"][1]]["shape"]
            work = writes * math.prod(weight[1:])   # MACs on the vector lanes (Conv is not on the array yet)
        dtype = buffers[ins["outputs"][0]]["dtype"]
        return "vector", math.ceil(work / tile) * 2 * tile * tile / peak_for(d["peak"], dtype)

    def _penalised_operands(self) -> set[str]:
        """The a and b buffers of every gemm whose held operand has the longer reduction dim."""
        penalty, out = self.program["device"]["stationary_penalty"], set()
        for ins in self.program["instructions"]:
            if ins["op"] == "gemm" and penalty > 1:
                m, k, n = ins["product"]
                if k > (n if ins["stationary"] == "b" else m):
                    out.update((ins["a"], ins["b"]))
        return out

    def _time(self) -> tuple[list[dict], float]:
        """Every instruction's (engine, start, end) by the in-order scoreboard described in the module doc."""
        buffers = self.program["buffers"]
        engines = {"dma": 0.0, "array": 0.0, "vector": 0.0}
        written = {}                       # DRAM tensor -> when its last store ends
        sram = {}                          # buffer -> [lo, hi, last read end, last write end]
        trace = []
        instructions = self.program["instructions"]
        timed = [self._seconds(ins) for ins in instructions]
        later: list[frozenset] = [frozenset()] * len(instructions)   # the engines instructions after i use
        for i in range(len(instructions) - 2, -1, -1):
            later[i] = later[i + 1] | {timed[i + 1][0]}
        for i, ins in enumerate(instructions):
            engine, seconds = timed[i]
            reads, writes = _accesses(ins)
            start = engines[engine]
            if ins["op"] == "load":
                start = max(start, written.get(ins["tensor"], 0.0))
            for name in reads:
                start = max(start, sram.get(name, (0, 0, 0.0, 0.0))[3])
            for name in writes:
                lo, hi = buffers[name]["offset"], buffers[name]["offset"] + buffers[name]["bytes"]
                for olo, ohi, read_end, write_end in sram.values():
                    if olo < hi and lo < ohi:
                        start = max(start, read_end, write_end)
            end = start + seconds
            engines[engine] = end
            for name in reads:
                entry = sram.setdefault(name, [buffers[name]["offset"], buffers[name]["offset"] + buffers[name]["bytes"],
                                               0.0, 0.0])
                entry[2] = max(entry[2], end)
            for name in writes:
                lo = buffers[name]["offset"]
                sram[name] = [lo, lo + buffers[name]["bytes"], sram.get(name, [0, 0, 0.0, 0.0])[2], end]
            if ins["op"] == "store":
                written[ins["tensor"]] = max(written.get(ins["tensor"], 0.0), end)
            trace.append({"index": i, "op": ins["op"], "node": ins["node"], "engine": engine, "start": start,
                          "end": end})
            if i % 64 == 63 and later[i]:   # accesses ending before every engine still used is free delay nothing
                floor = min(engines[e] for e in later[i])
                sram = {k: v for k, v in sram.items() if max(v[2], v[3]) > floor}
        makespan = max((t["end"] for t in trace), default=0.0)
        d = self.program["device"]
        return trace, makespan + d["launch"] * self.program["dispatches"]

    # --- running -----------------------------------------------------------------------------------
    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The program's outputs, in order, from ``inputs`` (by the program's input names)."""
        p = self.program
        dram: dict[str, np.ndarray] = {}
        for name, t in p["tensors"].items():
            if t["kind"] == "weight":
                dram[name] = self.weights[name]
            elif t["kind"] == "const":
                dram[name] = _tensor_from_json(t["data"], f"constant {name}")
            elif t["kind"] in ("int8_weight", "int8_scale"):
                dram[name] = self.int8[name]
        for name in p["inputs"]:
            if name not in inputs:
                raise RunnerError(f"{self.where}: missing input {name!r}")
            array, t = np.asarray(inputs[name]), p["tensors"][name]
            if list(array.shape) != t["shape"] or array.dtype != DType(t["dtype"]).numpy:
                raise RunnerError(f"{self.where}: input {name!r} is {array.dtype}{list(array.shape)}; the program "
                                  f"takes {t['dtype']}{t['shape']}")
            dram[name] = array
        sram: dict[str, np.ndarray] = {}
        for i, ins in enumerate(p["instructions"]):
            op = ins["op"]
            if op == "load":
                source = dram[ins["tensor"]]
                if ins["view"] is not None:
                    source = source.reshape(ins["view"])
                if ins["region"] is not None:
                    source = source[tuple(slice(a, b) for a, b in ins["region"])]
                sram[ins["buffer"]] = np.array(np.swapaxes(source, -1, -2) if ins["transpose"] else source)
            elif op == "store":
                self._store(dram, sram[ins["buffer"]], ins)
            elif op == "gemm":
                out_dtype = DType(p["buffers"][ins["out"]]["dtype"]).numpy
                sram[ins["out"]] = _gemm(ins, sram) if ins.get("int8") is None else _gemm_int8(ins, sram, out_dtype)
            else:
                args = [None if b is None else sram[b] for b in ins["inputs"]]
                try:
                    results = self.kernels[i](args)
                except Exception as exc:
                    self._fail(i, f"{ins['kernel']['op']} failed: {type(exc).__name__}: {str(exc)[:160]}")
                for b, r in zip(ins["outputs"], results):
                    declared = DType(p["buffers"][b]["dtype"]).numpy
                    sram[b] = np.asarray(r).astype(declared, copy=False).reshape(p["buffers"][b]["shape"])
        self.last_seconds = self.modelled_seconds
        return [dram[name] for name in p["outputs"]]

    def _store(self, dram: dict, data: np.ndarray, ins: dict) -> None:
        t = self.program["tensors"][ins["tensor"]]
        if ins["region"] is None:
            dram[ins["tensor"]] = data.reshape(t["shape"])
            return
        target = dram.get(ins["tensor"])
        if target is None:
            target = dram[ins["tensor"]] = np.empty(t["shape"], DType(t["dtype"]).numpy)
        view = target if ins["view"] is None else target.reshape(ins["view"])
        view[tuple(slice(a, b) for a, b in ins["region"])] = data


def _accesses(ins: dict) -> tuple[list[str], list[str]]:
    """(buffers read, buffers written) by an instruction."""
    if ins["op"] == "load":
        return [], [ins["buffer"]]
    if ins["op"] == "store":
        return [ins["buffer"]], []
    if ins["op"] == "gemm":
        scales = ins["int8"]["b_scales"] if ins.get("int8") is not None else None
        return [x for x in (ins["a"], ins["b"], ins["bias"], scales) if x is not None], [ins["out"]]
    return [x for x in ins["inputs"] if x is not None], list(ins["outputs"])


def _gemm(ins: dict, sram: dict) -> np.ndarray:
    """As the IR's MatMul/Gemm kernels: a @ b, times alpha, plus beta * bias (in the operands' dtype)."""
    a, b = sram[ins["a"]], sram[ins["b"]]
    y = np.matmul(a, b)
    if ins["alpha"] != 1.0:
        y = y * a.dtype.type(ins["alpha"])
    if ins["bias"] is not None:
        c = sram[ins["bias"]]
        y = y + (c * c.dtype.type(ins["beta"]) if ins["beta"] != 1.0 else c)
    return y.astype(a.dtype, copy=False)


def quantize_per_channel(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D float weight as (int8 values, f32 scales), one scale per index of ``axis`` (the output channel):
    symmetric, ``scale = max |w| / 127`` over the channel (1 for an all-zero channel), ``q = clip(rint(w /
    scale), -127, 127)`` (round to nearest, ties to even)."""
    w = np.asarray(weight, dtype=np.float32)
    peak = np.max(np.abs(w), axis=1 - axis)
    scales = np.where(peak > 0, peak / np.float32(127), np.float32(1)).astype(np.float32)
    shaped = scales[None, :] if axis == 1 else scales[:, None]
    return np.clip(np.rint(w / shaped), -127, 127).astype(np.int8), scales


def quantize_activation(a: np.ndarray, scale: float) -> np.ndarray:
    """An activation as int8 with a per-tensor scale: ``clip(rint(a / scale), -127, 127)`` in f32."""
    return np.clip(np.rint(np.asarray(a, dtype=np.float32) / np.float32(scale)), -127, 127).astype(np.int8)


def _gemm_int8(ins: dict, sram: dict, out_dtype) -> np.ndarray:
    """The array's int8 mode: A quantised with ``a_scale``, int32 accumulation against the int8 B, dequantised
    by ``a_scale * b_scales[j]`` (f32), then alpha and beta * bias in f32, then the output's dtype."""
    int8 = ins["int8"]
    qa = quantize_activation(sram[ins["a"]], int8["a_scale"]).astype(np.int32)
    acc = np.matmul(qa, sram[ins["b"]].astype(np.int32))
    y = acc.astype(np.float32) * (np.float32(int8["a_scale"]) * sram[int8["b_scales"]].astype(np.float32))
    if ins["alpha"] != 1.0:
        y = y * np.float32(ins["alpha"])
    if ins["bias"] is not None:
        c = sram[ins["bias"]].astype(np.float32)
        y = y + (c * np.float32(ins["beta"]) if ins["beta"] != 1.0 else c)
    return y.astype(out_dtype, copy=False)


class NpuRunner(SimulatorRunner):
    def __init__(self, simulator: NpuSimulator, input_names: list[str], output_names: list[str], copy_into=None):
        super().__init__(simulator, output_names, copy_into)
        self.input_names = input_names

    def run_dynamic(self, inputs: dict) -> dict:
        feeds = dict(zip(self.simulator.program["inputs"], (inputs[n] for n in self.input_names)))
        return dict(zip(self.output_names, self.simulator.run(feeds)))


@register_runner("npu")
def load_npu(part, executor):
    """The NPU simulator on the partition's program (``part.source``, regenerated from graph.json at load)."""
    where = f"partition {part.index} ({part.file})"
    if part.source is None:
        raise RunnerError(f"{where} has no NPU program")
    weights = {n: w.data for n, w in part.graph.weights.items()}
    return NpuRunner(NpuSimulator(part.source, weights, where), part.input_names, part.output_names,
                     getattr(executor, "copy_into", None))
