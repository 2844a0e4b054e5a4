"""ONNX frontend: a ModelProto (or a path to one) into the hetflow IR.

Models below opset 13 are converted up to 13 with onnx's version converter;
13 and later keep their opset (the IR records it and every op row follows that
opset's semantics). Initializers and Constant nodes become weights; node names
are kept as source locations; value types come from onnx's shape inference.

Models are untrusted input: ``import_onnx`` returns a graph or raises a
``HetflowError`` for any bytes at all (the fuzz tests hold it to that). onnx's
checker runs before anything else reads the model; tensors whose data lie in
another file are read only for a model loaded from its path (onnx resolves them
next to it), never for bytes or a ModelProto; negative and absurd dims are
refused with the value and the node (``hetflow.ir.types.ShapeError``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import numpy_helper

from hetflow.ir import DType, Graph, TensorType, UnsupportedOpError, get_op, infer_types
from hetflow.ir.errors import HetflowError
from hetflow.ir.graph import Node, Value
from hetflow.ir.symbolic import forget_undeclared
from hetflow.ir.onnx_convert import attr_from_onnx, external_data_tensors, type_from_onnx
from hetflow.ir.types import ShapeError

from .onnx_shapes import infer_shapes

MIN_OPSET = 13


class FrontendError(HetflowError):
    pass


class ImporterBug(FrontendError):
    """An exception hetflow's importer did not expect, raised as a HetflowError (the cause kept): the model
    is refused all the same, and the message says it is hetflow's bug, not the model's fault alone."""


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


def import_onnx(source: str | Path | bytes | onnx.ModelProto,
                dynamic_shapes: dict[str, tuple[int, int]] | None = None) -> Graph:
    """The model as a hetflow graph; for any input a ``Graph`` or a ``HetflowError``, never another
    exception (an unexpected one becomes ``ImporterBug``, its cause kept). ``dynamic_shapes``: the
    inputs' dim_params that vary, each name -> ``(min, max)``; the graph then declares them
    (``Graph.dims``) and every dim onnxruntime's symbolic shape inference writes as an expression over
    them is kept as one."""
    try:
        return _import_model(source, dynamic_shapes)
    except HetflowError:
        raise
    except RecursionError:
        raise FrontendError("the ONNX model nests too deeply to import") from None
    except Exception as exc:  # noqa: BLE001  (the one boundary: a model must never crash the importer's caller)
        raise ImporterBug(f"hetflow's ONNX importer failed on this model ({type(exc).__name__}: "
                          f"{_first_line(exc)}); the model is refused; this is a bug in hetflow") from exc


def _import_model(source: str | Path | bytes | onnx.ModelProto, dynamic_shapes=None) -> Graph:
    model = load_model(source)
    _check_text(model)
    _refuse_external_data(model)
    for t in model.graph.initializer:  # named here, before onnx's checker says it more tersely
        _check_tensor_dims(t, f"initializer {t.name!r}")
    opset = _default_opset(model)
    _check_ops_exist(model.graph, opset)
    _check(model)  # before the version converter and shape inference read it
    if opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:
            raise FrontendError(f"model uses opset {opset}; converting it to opset {MIN_OPSET} failed: "
                                f"{_first_line(exc)}") from None
        opset = MIN_OPSET
        _check_ops_exist(model.graph, opset)
        _check(model)
    if dynamic_shapes:
        _check_declared_sizes(model.graph, dynamic_shapes)
        model = _symbolic_shapes(model)
    model = infer_shapes(model, FrontendError)
    name = model.graph.name or "main"
    graph = _import_graph(model.graph, opset, name)
    if dynamic_shapes:
        graph.dims = dict(dynamic_shapes)
        forget_undeclared(graph)
    return graph


def _check_declared_sizes(g: onnx.GraphProto, sizes: dict) -> None:
    """Each declared size is a dim_param of some input; each input dim_param is declared."""
    initializers = {t.name for t in g.initializer}
    params: dict[str, str] = {}
    for vi in g.input:
        if vi.name in initializers or not vi.type.HasField("tensor_type"):
            continue
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_param") and d.dim_param:
                params.setdefault(d.dim_param, f"input {vi.name!r} dim {axis}")
    for name in sizes:
        if name not in params:
            raise FrontendError(f"dynamic size {name!r} is not a dim_param of any input (the inputs' dim_params: "
                                f"{', '.join(params) or 'none'})")
    for name, where in params.items():
        if name not in sizes:
            raise FrontendError(f"{where} is dim_param {name!r}, which dynamic_shapes does not declare: give its "
                                f"range too ({name}=MIN..MAX)")


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's symbolic shape inference (sympy) writes each dim it can derive as an expression over
    the inputs' dim_params (``2*batch``). Ops it does not know leave their dims to onnx's inference: those
    values are then allocated at run time, outside the memory plan (the report counts them)."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
        inferred = SymbolicShapeInference.infer_shapes(model, int_max=2 ** 31 - 1, auto_merge=False,
                                                       guess_output_rank=False, verbose=0)
    except Exception:  # noqa: BLE001  (its own limits: onnx's inference below still runs)
        return model
    return inferred if inferred is not None else model


def _check(model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # ValidationError, and what the checker's C++ raises on stranger input
        raise FrontendError(f"invalid ONNX model: {_first_line(exc)}") from None


def _check_text(model: onnx.ModelProto) -> None:
    """Every string field of the model is text: protobuf hands over a string field that is not UTF-8 as
    bytes, which no name may be (onnx's C++ refuses it with a TypeError, file names cannot hold it)."""
    pending: list = [(model, "model")]
    while pending:
        message, where = pending.pop()
        for field, value in message.ListFields():
            if field.type == field.TYPE_STRING:
                texts = [value] if isinstance(value, (str, bytes)) else value  # one, or a repeated field
                bad = next((t for t in texts if not isinstance(t, str)), None)
                if bad is not None:
                    raise FrontendError(f"{where}: field {field.name} is not UTF-8 text ({bytes(bad)[:40]!r})")
            elif field.type == field.TYPE_MESSAGE:
                inner = f"{where}.{field.name}"
                messages = [value] if isinstance(value, Message) else value
                pending.extend((m, _where(m, inner)) for m in messages)


def _where(message, path: str) -> str:
    name = getattr(message, "name", "")
    return f"{path} {name!r}" if isinstance(name, str) and name else path


def _refuse_external_data(model: onnx.ModelProto) -> None:
    """Tensors still pointing at files (bytes or a ModelProto given, or a path whose external data onnx did
    not load): reading them would resolve the location against the working directory."""
    external = external_data_tensors(model)
    if external:
        what, location = external[0]
        raise FrontendError(f"{what} keeps its data in an external file ({location!r}); hetflow reads external "
                            "data only for a model loaded from its path, from beside it")


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
    producers = {out: (proto.name or f"{proto.op_type}_{index}", proto.op_type)
                 for index, proto in enumerate(g.node) for out in proto.output}
    types: dict[str, TensorType | None] = {}
    for vi in list(g.value_info) + list(g.output) + list(g.input):
        types[vi.name] = _type(vi, producers.get(vi.name))
    env: dict[str, Value] = {}
    initializer_names = {t.name for t in g.initializer}
    for t in g.initializer:
        env[t.name] = graph.add_weight(t.name, _tensor_array(t, f"initializer {t.name!r}"))
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
        attrs = _attributes(proto, op, loc)
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


def _attributes(proto: onnx.NodeProto, op: str, loc: str) -> dict:
    attrs = {}
    for attr in proto.attribute:
        if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            raise UnsupportedOpError(f"unsupported op {op} (node {loc!r}): control flow with subgraphs "
                                     "is not supported yet")
        if attr.ref_attr_name:
            raise FrontendError(f"node {loc!r} ({op}): attribute references are only valid inside functions")
        if attr.type == onnx.AttributeProto.TENSOR:
            attrs[attr.name] = _tensor_array(attr.t, f"attribute {attr.name!r} of node {loc!r} ({op})")
            continue
        try:
            attrs[attr.name] = attr_from_onnx(attr)
        except ValueError as exc:
            raise UnsupportedOpError(f"unsupported op {op} (node {loc!r}): {exc}") from None
    return attrs


def _tensor_array(t: onnx.TensorProto, what: str) -> np.ndarray:
    """A tensor proto's data; a malformed one (data that does not fill its dims, a negative or absurd dim)
    is one line naming ``what``."""
    _check_tensor_dims(t, what)
    try:
        array = numpy_helper.to_array(t)
    except Exception as exc:  # numpy's ValueError for data that does not fill the dims, onnx's own errors
        raise FrontendError(f"{what} is malformed: {_first_line(exc)}") from None
    return array


def _check_tensor_dims(t: onnx.TensorProto, what: str) -> None:
    try:
        TensorType(DType.from_onnx(t.data_type), tuple(int(d) for d in t.dims))
    except ShapeError as exc:
        raise FrontendError(f"{what}: {exc}") from None
    except ValueError as exc:  # an element type hetflow does not know
        raise UnsupportedOpError(f"{what}: {exc}") from None


def _import_constant(graph: Graph, proto: onnx.NodeProto, env: dict[str, Value], loc: str) -> None:
    if len(proto.attribute) != 1 or len(proto.output) != 1:
        raise FrontendError(f"node {loc!r} (Constant) has {len(proto.attribute)} attributes and "
                            f"{len(proto.output)} outputs; a Constant has one of each")
    attr = proto.attribute[0]
    kind = attr.name
    if kind == "value":
        data = _tensor_array(attr.t, f"the value of node {loc!r} (Constant)")
    elif kind == "value_float":
        data = np.array(attr.f, dtype=np.float32)
    elif kind == "value_floats":
        data = np.array(list(attr.floats), dtype=np.float32)
    elif kind == "value_int":
        data = np.array(attr.i, dtype=np.int64)
    elif kind == "value_ints":
        data = np.array(list(attr.ints), dtype=np.int64)
    elif kind == "value_string":
        data = np.array(_text(attr.s, loc), dtype=object)
    elif kind == "value_strings":
        data = np.array([_text(s, loc) for s in attr.strings], dtype=object)
    else:
        raise UnsupportedOpError(f"unsupported op Constant (node {loc!r}): attribute {kind} is not supported")
    env[proto.output[0]] = graph.add_weight(proto.output[0], data)


def _text(raw: bytes, loc: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise FrontendError(f"node {loc!r} (Constant): its string value is not UTF-8") from None


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


def _type(vi: onnx.ValueInfoProto, producer: tuple[str, str] | None) -> TensorType | None:
    """``producer``: (node, op) that makes the value, named when its type is refused."""
    kind = vi.type.WhichOneof("value")
    if kind not in (None, "tensor_type"):
        raise UnsupportedOpError(f"unsupported value type {kind.replace('_type', '')} for {vi.name!r}: "
                                 "hetflow's IR holds tensors only")
    try:
        return type_from_onnx(vi.type)
    except ShapeError as exc:
        made_by = f"output of node {producer[0]!r} ({producer[1]})" if producer else "a graph input"
        raise FrontendError(f"value {vi.name!r} ({made_by}): {exc}") from None
    except ValueError as exc:
        raise UnsupportedOpError(f"unsupported type for value {vi.name!r}: {exc}") from None


def _safe_name(name: str) -> str:
    return name if name else "main"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
