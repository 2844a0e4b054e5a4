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
from hetflow.ir.program import INLINE_BYTES, VIEW_OUTPUTS, inline_weight  # noqa: F401

ONNX_IR_VERSION = 10  # what ONNX Runtime 1.17+ reads


class BackendError(HetflowError):
    pass


class BackendDeclined(BackendError):
    """A backend that cannot lower this partition at all (e.g. the NPU's for dynamic shapes): the partition
    goes to the next backend the platform allows on its device, and the manifest records which one ran."""


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


_inline = inline_weight  # small constants stay in the model (hetflow.ir.program)


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
