"""Conversions between hetflow IR pieces and ONNX protos (types, attributes, single nodes).

Shared by the ONNX frontend, the reference kernels (which run onnx.reference on a
one-node proto) and backends that lower partitions to ONNX.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .symbolic import is_expression
from .types import DType, TensorType

_AT = onnx.AttributeProto


def type_to_onnx(t: TensorType | None) -> onnx.TypeProto:
    if t is None:
        return onnx.TypeProto()
    if t.shape is None:
        return helper.make_tensor_type_proto(t.dtype.onnx, None)
    dims = [d if d is not None else None for d in t.shape]
    return helper.make_tensor_type_proto(t.dtype.onnx, dims)


def type_from_onnx(tp: onnx.TypeProto) -> TensorType | None:
    if not tp.HasField("tensor_type"):
        return None
    tt = tp.tensor_type
    if tt.elem_type == 0:
        return None
    dtype = DType.from_onnx(tt.elem_type)
    if not tt.HasField("shape"):
        return TensorType(dtype, None)
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param and is_expression(d.dim_param):
            dims.append(d.dim_param)  # a size's name, or an expression over names ("2*batch")
        else:
            dims.append(None)
    return TensorType(dtype, tuple(dims))


def value_info(name: str, t: TensorType | None) -> onnx.ValueInfoProto:
    return helper.make_value_info(name, type_to_onnx(t))


def attr_from_onnx(attr: onnx.AttributeProto, graph_importer=None) -> Any:
    """An ONNX attribute as a plain Python value (ints, floats, str, lists, np.ndarray, Graph)."""
    kind = attr.type
    if kind == _AT.INT:
        return int(attr.i)
    if kind == _AT.FLOAT:
        return float(np.float32(attr.f))
    if kind == _AT.STRING:
        return attr.s.decode("utf-8", errors="surrogateescape")
    if kind == _AT.INTS:
        return [int(v) for v in attr.ints]
    if kind == _AT.FLOATS:
        return [float(np.float32(v)) for v in attr.floats]
    if kind == _AT.STRINGS:
        return [s.decode("utf-8", errors="surrogateescape") for s in attr.strings]
    if kind == _AT.TENSOR:
        return numpy_helper.to_array(attr.t)
    if kind == _AT.GRAPH and graph_importer is not None:
        return graph_importer(attr.g)
    if kind == _AT.GRAPHS and graph_importer is not None:
        return [graph_importer(g) for g in attr.graphs]
    raise ValueError(f"attribute {attr.name!r} has unsupported type {_AT.AttributeType.Name(kind)}")


def attr_to_onnx(name: str, value: Any, attr_type: int | None = None, graph_exporter=None) -> onnx.AttributeProto:
    """A Python attribute value as an ONNX AttributeProto (``attr_type`` settles empty lists)."""
    from .graph import Graph
    if isinstance(value, np.ndarray):
        return helper.make_attribute(name, numpy_helper.from_array(value))
    if isinstance(value, Graph):
        if graph_exporter is None:
            raise ValueError(f"attribute {name!r} holds a graph and no exporter was given")
        return helper.make_attribute(name, graph_exporter(value))
    if isinstance(value, list) and not value:
        kind = attr_type if attr_type is not None else _AT.INTS
        return helper.make_attribute(name, [], attr_type=kind)
    if isinstance(value, list) and attr_type == _AT.FLOATS:
        value = [float(v) for v in value]
    if isinstance(value, int) and attr_type == _AT.FLOAT:
        value = float(value)
    return helper.make_attribute(name, value)


def schema_attr_types(op_type: str, opset: int, domain: str = "") -> dict[str, int]:
    try:
        schema = onnx.defs.get_schema(op_type, opset, domain)
    except onnx.defs.SchemaError:
        return {}
    return {name: int(a.type) for name, a in schema.attributes.items()}


def node_to_onnx(op: str, input_names: list[str], output_names: list[str], attrs: dict[str, Any],
                 opset: int, name: str = "") -> onnx.NodeProto:
    domain, op_type = (op.rsplit(".", 1) if "." in op else ("", op))
    types = schema_attr_types(op_type, opset if domain == "" else 1, domain)
    proto = helper.make_node(op_type, input_names, output_names, name=name or None, domain=domain or None)
    for key, value in attrs.items():
        proto.attribute.append(attr_to_onnx(key, value, types.get(key)))
    return proto


def external_data_tensors(model: onnx.ModelProto, supplied: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """``[(what, location)]`` for every tensor of the model whose bytes live in a file outside it
    (``data_location`` EXTERNAL): initializers, sparse initializers and tensor attributes, in subgraphs and
    functions too. ``what`` names the tensor and where it sits; ``location`` is the file it names.
    ``supplied``: main-graph initializers whose data the caller hands over itself (not reported)."""
    found: list[tuple[str, str]] = []
    for graph, where in _graphs(model):
        for t in getattr(graph, "initializer", ()):  # (a function has none)
            if not where and t.name in supplied:  # (the main graph: where is empty)
                continue
            _note_external(t, f"initializer {t.name!r}{where}", found)
        for sparse in getattr(graph, "sparse_initializer", ()):
            for t in (sparse.values, sparse.indices):
                _note_external(t, f"sparse initializer {sparse.values.name!r}{where}", found)
        for node in graph.node:
            for attr in node.attribute:
                what = f"attribute {attr.name!r} of node {node.name!r} ({node.op_type}){where}"
                sparse = ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors)
                tensors = ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
                tensors += [t for s in sparse for t in (s.values, s.indices)]
                for t in tensors:
                    _note_external(t, f"tensor {t.name!r} in {what}", found)
    return found


def _note_external(t: onnx.TensorProto, what: str, found: list) -> None:
    if t.data_location != onnx.TensorProto.EXTERNAL and not t.external_data:
        return
    location = next((entry.value for entry in t.external_data if entry.key == "location"), "")
    found.append((what, location))


def names_read_in_subgraphs(model: onnx.ModelProto) -> set[str]:
    """Every name a node reads inside a subgraph or function body of the model (not in the main graph)."""
    return {name for graph, where in _graphs(model) if where for node in graph.node for name in node.input}


def _graphs(model: onnx.ModelProto):
    """The model's graph, every subgraph in its node attributes and every function body, each with a
    phrase saying where it is (empty for the main graph)."""
    pending = [(model.graph, "")]
    pending += [(f, f" in function {f.name!r}") for f in model.functions]
    while pending:
        graph, where = pending.pop()
        yield graph, where
        for node in graph.node:
            for attr in node.attribute:
                inner = f" in the {attr.name!r} subgraph of node {node.name!r}{where}"
                if attr.HasField("g"):
                    pending.append((attr.g, inner))
                pending.extend((g, inner) for g in attr.graphs)
