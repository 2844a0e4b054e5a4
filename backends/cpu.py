"""The CPU backend: a partition of the IR lowered to an ONNX model and run by ONNX Runtime.

The IR's ops are ONNX ops, so lowering is direct: fused groups are inlined (ONNX
Runtime's own graph optimiser then fuses them again into its fast kernels: GELU,
LayerNorm, attention, MatMul+Add...). The emitted ``.onnx`` holds the structure
and the small constants only: its large initializers are marked external and handed to ONNX Runtime from the
artifact's weights at load time (``add_external_initializers``), so weights are
stored once. Inputs and outputs are bound with IOBinding straight to the
runtime's buffers: nothing is copied on the way in or out.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from hetflow.ir import Graph, Node, Value
from hetflow.ir.errors import HetflowError
from hetflow.ir.onnx_convert import node_to_onnx, value_info

ONNX_IR_VERSION = 10  # what ONNX Runtime 1.17+ reads


class BackendError(HetflowError):
    pass


def _flatten(node: Node, names: dict[int, str], prefix: str) -> list[tuple[Node, dict[int, str]]]:
    """A top-level node as (node, value-name map) pairs, groups inlined with their internal values renamed."""
    if node.op != "hetflow.group":
        return [(node, names)]
    body: Graph = node.attrs["body"]
    inner = dict(names)
    for outer, inner_value in zip(node.inputs, body.inputs):
        inner[id(inner_value)] = names[id(outer)]
    for outer, inner_value in zip(node.outputs, body.outputs):
        inner[id(inner_value)] = names[id(outer)]
    for body_node in body.nodes:
        for out in body_node.outputs:
            inner.setdefault(id(out), f"{prefix}{body.name}/{out.name}")
    flat = []
    for body_node in body.nodes:
        flat.extend(_flatten(body_node, inner, f"{prefix}{body.name}/"))
    return flat


def lower_partition(graph: Graph, view_outputs: bool = False) -> tuple[onnx.ModelProto, list[str]]:
    """A standalone partition graph as an ONNX model; returns it and the names of the weights it reads.

    ``view_outputs``: an output that only reshapes a value computed here (GPT-2's logits: Reshape of the
    LM head's Gemm) becomes that value itself, in its own shape; the model's metadata keeps the IR shape
    (``hetflow.view_outputs``) and ``CpuPartition`` binds a view of the output buffer in that shape. ONNX
    Runtime then writes the result straight into the caller's array: no copy of the logits."""
    names = {id(v): v.name for v in graph.values()}
    protos, infos = [], {}
    weights = dict(graph.weights)
    for node in graph.nodes:
        for inner, mapping in _flatten(node, names, ""):
            op = "Identity" if inner.op == "hetflow.transfer" else inner.op
            attrs = {} if inner.op == "hetflow.transfer" else inner.attrs
            ins = ["" if v is None else mapping[id(v)] for v in inner.inputs]
            outs = [mapping[id(o)] for o in inner.outputs]
            protos.append(node_to_onnx(op, ins, outs, attrs, graph.opset, name=f"n{len(protos)} {inner.loc[:160]}"))
            for o in inner.outputs:
                infos[mapping[id(o)]] = o.type
    extra = _erf_argument_as_division(protos, graph)
    outputs = list(graph.outputs)
    viewed = _outputs_as_views(protos, graph, infos) if view_outputs else {}
    if any(v.data is not None or v in graph.inputs for v in outputs):
        raise BackendError(f"partition {graph.name}: an output that is an input or a weight needs no kernel")
    initializers = [onnx.numpy_helper.from_array(np.asarray(v.data), n) if _inline(v) else _external_initializer(n, v)
                    for n, v in weights.items()] + extra
    boundary = {v.name for v in graph.inputs} | {v.name for v in outputs}
    g = helper.make_graph(protos, graph.name, [value_info(v.name, v.type) for v in graph.inputs],
                          [value_info(v.name, viewed[v.name] if v.name in viewed else v.type) for v in outputs],
                          initializers,
                          value_info=[value_info(n, t) for n, t in infos.items() if n not in boundary and t is not None])
    domains = {d for d in (n.domain for n in protos) if d}
    opsets = [helper.make_opsetid("", graph.opset)] + [helper.make_opsetid(d, 1) for d in sorted(domains)]
    model = helper.make_model(g, opset_imports=opsets, producer_name="hetflow")
    model.ir_version = ONNX_IR_VERSION
    if viewed:
        helper.set_model_props(model, {VIEW_OUTPUTS: json.dumps({v.name: list(v.type.shape)
                                                                 for v in outputs if v.name in viewed})})
    return model, [n for n, v in weights.items() if not _inline(v)]


VIEW_OUTPUTS = "hetflow.view_outputs"
RESHAPES = ("Reshape", "Squeeze", "Unsqueeze", "Flatten")


def _outputs_as_views(protos: list, graph: Graph, infos: dict) -> dict:
    """Drop a reshape that makes a graph output from a value only it reads; the value's producer writes
    the output instead (in the value's shape). Returns {output: the type ONNX Runtime will give it}."""
    producers = {out: p for p in protos for out in p.output}
    reads: dict[str, int] = {}
    for p in protos:
        for name in p.input:
            reads[name] = reads.get(name, 0) + 1
    outputs = {v.name for v in graph.outputs}
    viewed = {}
    for v in graph.outputs:
        reshape = producers.get(v.name)
        if reshape is None or reshape.op_type not in RESHAPES or reshape.domain:
            continue
        data = reshape.input[0]
        inner = producers.get(data)
        t = infos.get(data)
        if (inner is None or reads.get(data) != 1 or reads.get(v.name) or data in outputs or t is None
                or not t.is_static):
            continue
        inner.output[list(inner.output).index(data)] = v.name
        protos.remove(reshape)
        del infos[data]
        viewed[v.name] = t
    return viewed


INLINE_BYTES = 4096
SQRT_HALF = float(np.float32(np.sqrt(0.5)))


def _erf_argument_as_division(protos: list, graph: Graph) -> list[TensorProto]:
    """Erf(x * 0.7071...) -> Erf(x / 1.4142...), in place: torch writes GELU's argument as a product,
    ONNX Runtime's GELU fusion (one Gelu kernel for five elementwise passes) looks for the quotient.
    Returns the initializers the rewritten nodes read."""
    producers = {out: p for p in protos for out in p.output}
    name = "hetflow_sqrt2"
    found = False
    for erf in protos:
        if erf.op_type != "Erf" or erf.domain:
            continue
        mul = producers.get(erf.input[0])
        if mul is None or mul.op_type != "Mul" or mul.domain:
            continue
        for i, operand in enumerate(mul.input):
            w = graph.weights.get(operand)
            if w is None or w.data.dtype != np.float32 or w.data.size != 1 or w.data.ndim != 0:
                continue
            if float(w.data) != SQRT_HALF:
                continue
            other = mul.input[1 - i]
            mul.op_type = "Div"
            del mul.input[:]
            mul.input.extend([other, name])
            found = True
            break
    return [onnx.numpy_helper.from_array(np.array(np.sqrt(2), np.float32), name)] if found else []


def _inline(value: Value) -> bool:
    """Small constants (shapes, axes, scalars) stay in the model: ONNX Runtime's shape inference reads them."""
    return value.data.nbytes <= INLINE_BYTES or value.data.dtype.kind in "OUS"


def _external_initializer(name: str, value: Value) -> TensorProto:
    """An initializer whose data ONNX Runtime receives from hetflow at load time."""
    t = TensorProto()
    t.name = name
    t.data_type = value.type.dtype.onnx
    t.dims.extend(value.data.shape)
    t.data_location = TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", "weights.safetensors"
    return t


def emit(partition_graph: Graph, path: Path) -> list[str]:
    """Write the partition's ONNX model to ``path``; returns the weights it reads."""
    model, weights = lower_partition(partition_graph)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return weights


class CpuPartition:
    """A loaded CPU partition: an ONNX Runtime session with its weights, run through IOBinding."""

    def __init__(self, model: bytes, weights: dict[str, np.ndarray], input_names: list[str],
                 output_names: list[str], threads: int | None = None, name: str = "partition",
                 providers: list[str] | None = None, spin: bool = True):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads or _cores()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        if not spin:  # several sessions share the cores: idle threads sleep instead of spinning
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._keep = [np.ascontiguousarray(weights[n]) for n in weights]  # ORT reads these buffers directly
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._keep]
        if values:
            options.add_external_initializers(list(weights), values)
        try:
            self.session = ort.InferenceSession(model, options, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:
            raise BackendError(f"ONNX Runtime cannot load {name}: {str(exc).strip().splitlines()[0]}") from None
        self.input_names = input_names
        self.output_names = output_names
        self.binding = self.session.io_binding()
        types = [t.type for t in list(self.session.get_inputs()) + list(self.session.get_outputs())]
        self.bindable = all("string" not in t for t in types)  # IOBinding takes numeric tensors only
        viewed = json.loads(self.session.get_modelmeta().custom_metadata_map.get(VIEW_OUTPUTS, "{}"))
        shapes = {o.name: o.shape for o in self.session.get_outputs()}
        self.view_shapes = {n: tuple(shapes[n]) for n in viewed}   # outputs bound as views in these shapes
        self.ir_shapes = {n: tuple(s) for n, s in viewed.items()}

    def run_dynamic(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """For shapes known only at run time: ONNX Runtime allocates the outputs."""
        results = self.session.run(self.output_names, {n: inputs[n] for n in self.input_names})
        return {n: r.reshape(self.ir_shapes[n]) if n in self.ir_shapes else r
                for n, r in zip(self.output_names, results)}

    def run(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Read ``inputs`` and write the results into the preallocated ``outputs`` arrays (no copies)."""
        if not self.bindable:
            results = self.session.run(self.output_names, {n: inputs[n] for n in self.input_names})
            for name, result in zip(self.output_names, results):
                outputs[name][...] = result.reshape(outputs[name].shape)
            return
        binding = self.binding
        for name in self.input_names:
            array = inputs[name]
            binding.bind_input(name, "cpu", 0, array.dtype.type, array.shape, array.ctypes.data)
        for name in self.output_names:
            array = outputs[name]
            shape = self.view_shapes.get(name, array.shape)  # a view of the same contiguous buffer
            binding.bind_output(name, "cpu", 0, array.dtype.type, shape, array.ctypes.data)
        self.session.run_with_iobinding(binding)


def _cores() -> int:
    import os
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
