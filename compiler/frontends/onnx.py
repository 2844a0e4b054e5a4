"""ONNX frontend: a ModelProto (or a path to one) into the hetflow IR.

Models below opset 13 are converted up to 13 with onnx's version converter;
13 and later keep their opset (the IR records it and every op row follows that
opset's semantics). Initializers and Constant nodes become weights; node names
are kept as source locations; value types come from onnx's shape inference.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from hetflow.ir import Graph, TensorType, UnsupportedOpError, get_op, infer_types
from hetflow.ir.errors import HetflowError
from hetflow.ir.graph import Node, Value
from hetflow.ir.onnx_convert import attr_from_onnx, type_from_onnx

MIN_OPSET = 13


class FrontendError(HetflowError):
    pass


def load_model(source: str | Path | bytes | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        return source
    if isinstance(source, bytes):
        try:
            return onnx.load_from_string(source)
        except Exception as exc:
            raise FrontendError(f"the bytes given are not a valid ONNX model: {_first_line(exc)}") from None
    path = Path(source)
    if not path.exists():
        raise FrontendError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as exc:
        raise FrontendError(f"{path} is not a valid ONNX model (truncated or corrupt?): {_first_line(exc)}") from None
    if not model.graph.node and not model.graph.output:
        raise FrontendError(f"{path} holds no ONNX graph (empty or not an ONNX file)")
    return model


def import_onnx(source: str | Path | bytes | onnx.ModelProto) -> Graph:
    model = load_model(source)
    opset = _default_opset(model)
    if opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:
            raise FrontendError(f"model uses opset {opset}; converting it to opset {MIN_OPSET} failed: "
                                f"{_first_line(exc)}") from None
        opset = MIN_OPSET
    _check_ops_exist(model.graph, opset)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise FrontendError(f"invalid ONNX model: {_first_line(exc)}") from None
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        raise FrontendError(f"ONNX shape inference rejected the model: {_first_line(exc)}") from None
    name = model.graph.name or "main"
    return _import_graph(model.graph, opset, name)


def _check_ops_exist(g: onnx.GraphProto, opset: int) -> None:
    """Name an unknown op and its node before onnx's checker gives its terser message."""
    for index, proto in enumerate(g.node):
        if proto.domain in ("", "ai.onnx") and not onnx.defs.has(proto.op_type):
            loc = proto.name or f"{proto.op_type}_{index}"
            raise UnsupportedOpError(f"unsupported op {proto.op_type} (node {loc!r}): ONNX opset {opset} "
                                     "has no such op")


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    domains = ", ".join(sorted(e.domain for e in model.opset_import)) or "none"
    raise UnsupportedOpError(f"unsupported model: it imports only the domains {domains}, "
                             "not the default ONNX domain")


def _import_graph(g: onnx.GraphProto, opset: int, name: str) -> Graph:
    graph = Graph(_safe_name(name), opset)
    types: dict[str, TensorType | None] = {}
    for vi in list(g.value_info) + list(g.output) + list(g.input):
        types[vi.name] = _type(vi)
    env: dict[str, Value] = {}
    initializer_names = {t.name for t in g.initializer}
    for t in g.initializer:
        env[t.name] = graph.add_weight(t.name, numpy_helper.to_array(t))
    for vi in g.input:
        if vi.name in initializer_names:
            continue
        env[vi.name] = graph.add_input(vi.name, types.get(vi.name))
    if g.sparse_initializer:
        raise FrontendError("sparse initializers are not supported")
    for index, proto in enumerate(g.node):
        loc = proto.name or f"{proto.op_type}_{index}"
        op = proto.op_type if proto.domain in ("", "ai.onnx") else f"{proto.domain}.{proto.op_type}"
        if proto.domain not in ("", "ai.onnx"):
            raise UnsupportedOpError(f"unsupported op {op} (node {loc!r}): domain {proto.domain} is not supported")
        if op == "Constant":
            _import_constant(graph, proto, env, loc)
            continue
        attrs = {}
        for attr in proto.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise UnsupportedOpError(f"unsupported op {op} (node {loc!r}): control flow with subgraphs "
                                         "is not supported yet")
            if attr.ref_attr_name:
                raise FrontendError(f"node {loc!r} ({op}): attribute references are only valid inside functions")
            try:
                attrs[attr.name] = attr_from_onnx(attr)
            except ValueError as exc:
                raise UnsupportedOpError(f"unsupported op {op} (node {loc!r}): {exc}") from None
        inputs = []
        for input_name in proto.input:
            if input_name == "":
                inputs.append(None)
                continue
            if input_name not in env:
                raise FrontendError(f"node {loc!r} ({op}) reads {input_name!r}, which no earlier node, "
                                    "input or initializer defines")
            inputs.append(env[input_name])
        outputs = []
        for out_name in proto.output:
            if out_name == "":
                out_name = graph.fresh_name(f"{loc}_unused")
            graph._claim(out_name)
            outputs.append(Value(out_name, types.get(out_name)))
        node = Node(op, inputs, outputs, attrs, loc)
        get_op(op, node)  # fails with "unsupported op X (node Y)" for an op hetflow cannot run
        graph.insert(node, claim=False)
        _fill_missing_types(node, opset)
        for out in outputs:
            env[out.name] = out
    for vi in g.output:
        if vi.name not in env:
            raise FrontendError(f"graph output {vi.name!r} is not produced by any node")
        graph.outputs.append(env[vi.name])
    return graph


def _import_constant(graph: Graph, proto: onnx.NodeProto, env: dict[str, Value], loc: str) -> None:
    attr = proto.attribute[0]
    kind = attr.name
    if kind == "value":
        data = numpy_helper.to_array(attr.t)
    elif kind == "value_float":
        data = np.array(attr.f, dtype=np.float32)
    elif kind == "value_floats":
        data = np.array(list(attr.floats), dtype=np.float32)
    elif kind == "value_int":
        data = np.array(attr.i, dtype=np.int64)
    elif kind == "value_ints":
        data = np.array(list(attr.ints), dtype=np.int64)
    elif kind == "value_string":
        data = np.array(attr.s.decode(), dtype=object)
    elif kind == "value_strings":
        data = np.array([s.decode() for s in attr.strings], dtype=object)
    else:
        raise UnsupportedOpError(f"unsupported op Constant (node {loc!r}): attribute {kind} is not supported")
    env[proto.output[0]] = graph.add_weight(proto.output[0], data)


def _fill_missing_types(node: Node, opset: int) -> None:
    if all(o.type is not None and o.type.shape is not None for o in node.outputs):
        return
    try:
        inferred = infer_types(node, opset)
    except HetflowError:
        return
    for out, t in zip(node.outputs, inferred):
        if out.type is None or (out.type.shape is None and t is not None):
            out.type = t


def _type(vi: onnx.ValueInfoProto) -> TensorType | None:
    kind = vi.type.WhichOneof("value")
    if kind not in (None, "tensor_type"):
        raise UnsupportedOpError(f"unsupported value type {kind.replace('_type', '')} for {vi.name!r}: "
                                 "hetflow's IR holds tensors only")
    try:
        return type_from_onnx(vi.type)
    except ValueError as exc:
        raise UnsupportedOpError(f"unsupported type for value {vi.name!r}: {exc}") from None


def _safe_name(name: str) -> str:
    return name if name else "main"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
