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
from hetflow.ir.ops import DECODE_ATTENTION_OP
from hetflow.ir.program import INLINE_BYTES, INPLACE_OUTPUTS, VIEW_OUTPUTS, inline_weight  # noqa: F401

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


def lower_partition(graph: Graph, view_outputs: bool = False,
                    inplace_cache: bool = False) -> tuple[onnx.ModelProto, list[str]]:
    """A standalone partition graph as an ONNX model; returns it and the names of the weights it reads.

    ``view_outputs``: an output that only reshapes a value computed here (GPT-2's logits: Reshape of the
    LM head's Gemm) becomes that value itself, in its own shape; the model's metadata keeps the IR shape
    (``hetflow.view_outputs``) and ``CpuPartition`` binds a view of the output buffer in that shape. ONNX
    Runtime then writes the result straight into the caller's array: no copy of the logits.

    ``inplace_cache``: a ``decode_attention`` whose caches and position are partition inputs, each cache read by
    that node alone, becomes ONNX Runtime's ``GroupQueryAttention`` with its ``present`` outputs bound to the
    cache inputs' own buffers (metadata ``hetflow.inplace_outputs``; see ``_decode_attention_inplace``): no other
    op can see the slot it writes during the call. Otherwise, and for TVM, it is written out in standard ops
    (``_decode_attention_ops``)."""
    names = {id(v): v.name for v in graph.values()}
    protos, infos = [], {}
    weights = dict(graph.weights)
    extra: list[TensorProto] = []
    inplace: dict[str, dict] = {}
    taken = set(names.values())
    partition_inputs = {v.name for v in graph.inputs}
    reads: dict[str, int] = {}   # a cache written in place must be read by its attention alone
    for node in graph.nodes:
        for inner, mapping in _flatten(node, names, ""):
            for v in inner.inputs:
                if v is not None:
                    reads[mapping[id(v)]] = reads.get(mapping[id(v)], 0) + 1
    for node in graph.nodes:
        for inner, mapping in _flatten(node, names, ""):
            op = "Identity" if inner.op == "hetflow.transfer" else inner.op
            attrs = {} if inner.op == "hetflow.transfer" else inner.attrs
            ins = ["" if v is None else mapping[id(v)] for v in inner.inputs]
            outs = [mapping[id(o)] for o in inner.outputs]
            label = f"n{len(protos)} {inner.loc[:160]}"
            if inner.op == DECODE_ATTENTION_OP:
                if (inplace_cache and set(ins[3:6]) <= partition_inputs and reads[ins[3]] == reads[ins[4]] == 1
                        and ins[3] != ins[4]):
                    nodes, constants, present = _decode_attention_inplace(inner, ins, outs, label, taken)
                    for name, cache in present.items():
                        inplace[name] = {"input": cache, "position": ins[5], "node": label}
                        infos[name] = inner.inputs[3].type
                else:
                    nodes, constants = _decode_attention_ops(inner, ins, outs, label, graph.opset, taken)
                protos.extend(nodes)
                extra.extend(constants)
            else:
                protos.append(node_to_onnx(op, ins, outs, attrs, graph.opset, name=label))
            for o in inner.outputs:
                infos[mapping[id(o)]] = o.type
    extra += _erf_argument_as_division(protos, graph)
    outputs = list(graph.outputs)
    viewed = _outputs_as_views(protos, graph, infos) if view_outputs else {}
    if any(v.data is not None or v in graph.inputs for v in outputs):
        raise BackendError(f"partition {graph.name}: an output that is an input or a weight needs no kernel")
    initializers = [onnx.numpy_helper.from_array(np.asarray(v.data), n) if _inline(v) else _external_initializer(n, v)
                    for n, v in weights.items()] + extra
    boundary = {v.name for v in graph.inputs} | {v.name for v in outputs} | set(inplace)
    g = helper.make_graph(protos, graph.name, [value_info(v.name, v.type) for v in graph.inputs],
                          [value_info(v.name, viewed[v.name] if v.name in viewed else v.type) for v in outputs]
                          + [value_info(name, infos[name]) for name in inplace],
                          initializers,
                          value_info=[value_info(n, t) for n, t in infos.items() if n not in boundary and t is not None])
    domains = {d for d in (n.domain for n in protos) if d}
    opsets = [helper.make_opsetid("", graph.opset)] + [helper.make_opsetid(d, 1) for d in sorted(domains)]
    model = helper.make_model(g, opset_imports=opsets, producer_name="hetflow")
    model.ir_version = ONNX_IR_VERSION
    props = {}
    if viewed:
        props[VIEW_OUTPUTS] = json.dumps({v.name: list(v.type.shape) for v in outputs if v.name in viewed})
    if inplace:
        props[INPLACE_OUTPUTS] = json.dumps(inplace)
    if props:
        helper.set_model_props(model, props)
    return model, [n for n, v in weights.items() if not _inline(v)]


def _fresh(taken: set[str], hint: str) -> str:
    name, n = hint, 0
    while name in taken:
        n += 1
        name = f"{hint}_{n}"
    taken.add(name)
    return name


def _decode_attention_inplace(node: Node, ins: list[str], outs: list[str], label: str,
                              taken: set[str]) -> tuple[list, list, dict[str, str]]:
    """``decode_attention`` as ``com.microsoft.GroupQueryAttention`` over the caches in place.

    GroupQueryAttention takes the token packed ([B, 1, H * D]), the caches as ``past_key``/``past_value``
    [B, H, S, D] and ``seqlens_k`` = position per batch row. When its ``present`` outputs are bound to the
    ``past`` buffers themselves, it writes the token's key and value into slot ``position`` and attends over
    slots [0, position] where they lie, instead of copying the whole cache into ``present`` (what an unbound
    present costs). The CPU runner binds them so (``hetflow.inplace_outputs``: present output -> its cache
    input and the position input), checks ``0 <= position < S`` before every call, and puts back the slot's
    old contents after it: the caller's cache arrays are left as they were. Returns (nodes, initializers,
    {present output: cache input})."""
    batch, heads = node.inputs[3].type.shape[:2]
    position, k_cache, v_cache = ins[5], ins[3], ins[4]
    rows = _fresh(taken, f"{label.split()[0]}_rows")
    scalar = _fresh(taken, f"{label.split()[0]}_scalar_shape")
    one = _fresh(taken, f"{label.split()[0]}_int32_one")
    pos32, seqlens, total, total_scalar = (_fresh(taken, f"{position}_{what}") for what in
                                           ("int32", "seqlens_k", "total_plus", "total"))
    present_k, present_v = _fresh(taken, f"{k_cache}_present"), _fresh(taken, f"{v_cache}_present")
    nodes = [
        helper.make_node("Cast", [position], [pos32], to=TensorProto.INT32, name=f"{label} (position, int32)"),
        helper.make_node("Expand", [pos32, rows], [seqlens], name=f"{label} (seqlens_k)"),
        helper.make_node("Add", [pos32, one], [total], name=f"{label} (total length)"),
        helper.make_node("Reshape", [total, scalar], [total_scalar], name=f"{label} (total length, scalar)"),
        helper.make_node("GroupQueryAttention", [ins[0], ins[1], ins[2], k_cache, v_cache, seqlens, total_scalar],
                         [outs[0], present_k, present_v], domain="com.microsoft", name=label,
                         num_heads=int(heads), kv_num_heads=int(heads), scale=float(node.attrs["scale"])),
    ]
    constants = [onnx.numpy_helper.from_array(np.array([batch], np.int64), rows),
                 onnx.numpy_helper.from_array(np.zeros((0,), np.int64), scalar),
                 onnx.numpy_helper.from_array(np.array(1, np.int32), one)]
    return nodes, constants, {present_k: k_cache, present_v: v_cache}


def _decode_attention_ops(node: Node, ins: list[str], outs: list[str], label: str, opset: int,
                          taken: set[str]) -> tuple[list, list]:
    """``decode_attention`` in standard ONNX ops, pure: the token's scores over every slot, the slots at and
    after ``position`` masked (-1e9: a weight of exactly 0), its own score beside them, one softmax."""
    batch, heads, slots, head_dim = (int(d) for d in node.inputs[3].type.shape)
    dtype = node.inputs[0].type.dtype.numpy
    q, k, v, k_cache, v_cache, position = ins
    tag = label.split()[0]

    def name(hint):
        return _fresh(taken, f"{tag}_{hint}")
    c = {key: name(key) for key in ("split_shape", "packed_shape", "slots", "masked", "scale", "axis", "sizes",
                                    "mask_shape")}
    constants = [
        onnx.numpy_helper.from_array(np.array([batch, 1, heads, head_dim], np.int64), c["split_shape"]),
        onnx.numpy_helper.from_array(np.array([batch, 1, heads * head_dim], np.int64), c["packed_shape"]),
        onnx.numpy_helper.from_array(np.arange(slots, dtype=np.int64), c["slots"]),
        onnx.numpy_helper.from_array(np.array(-1e9, dtype), c["masked"]),
        onnx.numpy_helper.from_array(np.array(node.attrs["scale"], dtype), c["scale"]),
        onnx.numpy_helper.from_array(np.array([-1], np.int64), c["axis"]),
        onnx.numpy_helper.from_array(np.array([slots, 1], np.int64), c["sizes"]),
        onnx.numpy_helper.from_array(np.array([1, 1, 1, slots], np.int64), c["mask_shape"]),
    ]
    nodes = []

    def add(op, inputs, **attrs):
        out = name(op.lower())
        nodes.append(helper.make_node(op, inputs, [out], name=f"{label} ({out})", **attrs))
        return out

    def heads_first(x):
        return add("Transpose", [add("Reshape", [x, c["split_shape"]])], perm=[0, 2, 1, 3])
    qh, kh, vh = heads_first(q), heads_first(k), heads_first(v)
    scores = add("Mul", [add("MatMul", [qh, add("Transpose", [k_cache], perm=[0, 1, 3, 2])]), c["scale"]])
    written = add("Reshape", [add("Less", [c["slots"], position]), c["mask_shape"]])
    cached = add("Where", [written, scores, c["masked"]])
    own = add("Mul", [add("ReduceSum", [add("Mul", [qh, kh]), c["axis"]], keepdims=1), c["scale"]])
    probs = add("Softmax", [add("Concat", [cached, own], axis=-1)], axis=-1)
    head, tail = name("probs_cached"), name("probs_own")
    nodes.append(helper.make_node("Split", [probs, c["sizes"]], [head, tail], axis=-1, name=f"{label} (Split)"))
    mixed = add("Add", [add("MatMul", [head, v_cache]), add("Mul", [tail, vh])])
    tokens = add("Transpose", [mixed], perm=[0, 2, 1, 3])
    nodes.append(helper.make_node("Reshape", [tokens, c["packed_shape"]], [outs[0]], name=f"{label} (Reshape)"))
    return nodes, constants


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
