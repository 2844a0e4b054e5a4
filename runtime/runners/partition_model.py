"""What a CPU partition's ONNX model must be before ONNX Runtime sees it (``load_cpu``).

The model comes from an artifact, and people load artifacts they did not make. The
manifest's hashes say only that the files are the ones the manifest names, and
whoever wrote the model can write the manifest. So the model is checked against
the partition hetflow knows from graph.json:

- its bytes parse as an ONNX model (onnx);
- no tensor keeps its data in a file: ONNX Runtime would resolve the location
  against the working directory and read whatever file it names into the
  outputs. The one exception is the weights hetflow hands over itself
  (``add_external_initializers``): main-graph initializers named as those, of
  their element type and dims;
- the graph's inputs and outputs are the partition's: the same names in the same
  order, the same element types, equal dims where both are static;
- each output bound as a view (metadata ``hetflow.view_outputs``, see
  ``hetflow.ir.program``) has a static shape with exactly as many elements as the
  arena buffer it is bound to, of its element type: ONNX Runtime writes as many
  bytes as that shape says, wherever the pointer points;
- each output bound to an input's own buffer (metadata ``hetflow.inplace_outputs``:
  a KV cache written in place) follows the partition's outputs, names a distinct
  static floating [B, H, S, D] input of exactly its type and an int64 position
  input of one element.

Every refusal is one ``RunnerError`` line naming the partition file and the tensor.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx

from hetflow.ir.onnx_convert import external_data_tensors, type_from_onnx
from hetflow.ir.program import INPLACE_OUTPUTS, VIEW_OUTPUTS
from hetflow.ir.types import DType, TensorType

from . import RunnerError


@dataclass(frozen=True)
class ViewOutput:
    """An output ONNX Runtime writes in ``shape`` into the arena buffer of the IR's ``ir_shape``."""
    shape: tuple[int, ...]
    ir_shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class InPlaceOutput:
    """An output ONNX Runtime writes into input ``input``'s own buffer (its slot ``position`` along axis 2)."""
    input: str
    position: str
    node: str
    slots: int


def check_partition_model(model_bytes: bytes, part, supplied: dict[str, np.ndarray]
                          ) -> tuple[dict[str, ViewOutput], dict[str, InPlaceOutput]]:
    """Refuse a partition model that could read a file or write past a buffer; returns its view outputs and
    its in-place outputs. ``part``: the partition (``file``, ``graph``: the IR it must match); ``supplied``:
    the weights hetflow hands ONNX Runtime by name."""
    where = part.file or f"partition {part.index}"
    try:
        model = onnx.load_from_string(model_bytes)
    except Exception as exc:  # protobuf's DecodeError, and what onnx raises on stranger bytes
        raise RunnerError(f"{where} is not an ONNX model onnx can parse: {_first_line(exc)}") from None
    _check_external_data(model, supplied, where)
    types = {v.name: v.type for v in list(part.graph.inputs) + list(part.graph.outputs)}
    _check_boundary(model.graph.input, [v.name for v in part.graph.inputs], types, "input", where, set())
    views = _view_outputs(model, part, types, where)
    inplace = _inplace_outputs(model, part, where)
    count = len(part.graph.outputs)
    _check_boundary(model.graph.output[:count], [v.name for v in part.graph.outputs], types, "output", where,
                    set(views))
    extra = [vi.name for vi in model.graph.output[count:]]
    if sorted(extra) != sorted(inplace):
        raise RunnerError(f"{where}: the model's outputs after the partition's are {extra}; the metadata "
                          f"{INPLACE_OUTPUTS!r} declares {sorted(inplace)}")
    declared = {vi.name: type_from_onnx(vi.type) for vi in model.graph.output}
    for name, entry in inplace.items():
        if declared[name] != types[entry.input]:
            raise RunnerError(f"{where}: output {name!r} is written into input {entry.input!r}'s buffer but is "
                              f"declared {declared[name] or 'untyped'} in the model, the input {types[entry.input]}")
    result = {}
    for name, ir_shape in views.items():
        result[name] = _view(name, declared[name], types[name], ir_shape, where)
    return result, inplace


def _metadata_object(model: onnx.ModelProto, key: str, mapping: str, where: str) -> dict:
    """The model's metadata ``key`` as a JSON object ({} when absent); one RunnerError line when it is given
    twice, is not JSON, or is not an object (``mapping`` says what it maps)."""
    entries = [p.value for p in model.metadata_props if p.key == key]
    if not entries:
        return {}
    if len(entries) > 1:
        raise RunnerError(f"{where}: the metadata {key!r} is given {len(entries)} times")
    try:
        value = json.loads(entries[0])
    except (ValueError, RecursionError) as exc:
        raise RunnerError(f"{where}: the metadata {key!r} is not JSON: {_first_line(exc)}") from None
    if not isinstance(value, dict):
        raise RunnerError(f"{where}: the metadata {key!r} is a JSON {type(value).__name__}, not an object mapping "
                          f"{mapping}")
    return value


def _inplace_outputs(model: onnx.ModelProto, part, where: str) -> dict[str, InPlaceOutput]:
    """The ``hetflow.inplace_outputs`` metadata, checked: output -> {input, position, node}, each input a distinct
    static floating rank-4 partition input, each position an int64 partition input of one element."""
    declared = _metadata_object(model, INPLACE_OUTPUTS, "outputs to the inputs they are written into", where)
    inputs = {v.name: v.type for v in part.graph.inputs}
    taken = {v.name for v in part.graph.outputs} | set(inputs)
    result, used = {}, set()
    for name, entry in declared.items():
        fields = entry if isinstance(entry, dict) else {}
        target, position, node = fields.get("input"), fields.get("position"), fields.get("node", "")
        if not isinstance(target, str) or not isinstance(position, str) or not isinstance(node, str):
            raise RunnerError(f"{where}: the metadata {INPLACE_OUTPUTS!r} entry for {name!r} is not "
                              "{input, position, node} names")
        if name in taken:
            raise RunnerError(f"{where}: the metadata {INPLACE_OUTPUTS!r} names {name!r}, an input or output of "
                              "the partition, as an output written in place")
        cache, pos = inputs.get(target), inputs.get(position)
        if (cache is None or not cache.is_static or len(cache.shape) != 4 or not cache.dtype.is_float
                or target in used):
            raise RunnerError(f"{where}: the metadata {INPLACE_OUTPUTS!r} writes {name!r} into {target!r}, which is "
                              f"not a partition input of a static floating [B, H, S, D] type used once "
                              f"(it is {cache or 'no input'})")
        if pos is None or pos.dtype.value != "i64" or tuple(pos.shape or ()) not in ((1,), ()):
            raise RunnerError(f"{where}: the metadata {INPLACE_OUTPUTS!r} gives {name!r} the position {position!r}, "
                              f"which is not an i64 partition input of one element (it is {pos or 'no input'})")
        used.add(target)
        result[name] = InPlaceOutput(target, position, node, int(cache.shape[2]))
    return result


def _check_external_data(model: onnx.ModelProto, supplied: dict[str, np.ndarray], where: str) -> None:
    external = external_data_tensors(model, frozenset(supplied))
    if external:
        what, location = external[0]
        raise RunnerError(f"{where}: {what} keeps its data in an external file ({location!r}); a partition's "
                          "tensors are in the model or handed over by hetflow, never read from a file")
    for t in model.graph.initializer:
        if t.name not in supplied:
            continue
        array = supplied[t.name]
        expected = DType.from_numpy(array.dtype).onnx
        if tuple(t.dims) != array.shape or t.data_type != expected:
            raise RunnerError(f"{where}: initializer {t.name!r} is declared {_element_type(t.data_type)}"
                              f"{list(t.dims)}, but hetflow hands over {array.dtype}{list(array.shape)} for it")


def _element_type(data_type: int) -> str:
    known = onnx.TensorProto.DataType.values()
    return onnx.TensorProto.DataType.Name(data_type) if data_type in known else f"element type {data_type}"


def _check_boundary(declared, names: list[str], types: dict, kind: str, where: str, views: set[str]) -> None:
    """The graph's declared inputs (or outputs) are the partition's: names in order, element types, and
    static dims (a view output's shape is checked by ``_view``)."""
    declared_names = [vi.name for vi in declared]
    if declared_names != names:
        index = next((i for i, (a, b) in enumerate(zip(declared_names, names)) if a != b),
                     min(len(declared_names), len(names)))
        found = repr(declared_names[index]) if index < len(declared_names) else "nothing"
        wanted = repr(names[index]) if index < len(names) else "nothing"
        raise RunnerError(f"{where}: the model's {kind} {index} is {found}, the partition's (graph.json) is "
                          f"{wanted}")
    for vi in declared:
        try:
            onnx_type = type_from_onnx(vi.type)
        except ValueError as exc:  # an element type hetflow does not know, a negative or absurd dim
            raise RunnerError(f"{where}: {kind} {vi.name!r}: {exc}") from None
        ir_type = types[vi.name]
        if onnx_type is None or ir_type is None:
            if onnx_type is not ir_type:
                raise RunnerError(f"{where}: {kind} {vi.name!r} is declared {onnx_type or 'untyped'} in the model, "
                                  f"{ir_type or 'untyped'} in the partition (graph.json)")
            continue
        if onnx_type.dtype != ir_type.dtype:
            raise RunnerError(f"{where}: {kind} {vi.name!r} is {onnx_type.dtype.value} in the model, "
                              f"{ir_type.dtype.value} in the partition (graph.json)")
        if vi.name not in views and not _same_static_dims(onnx_type, ir_type):
            raise RunnerError(f"{where}: {kind} {vi.name!r} is {onnx_type} in the model, {ir_type} in the "
                              "partition (graph.json)")


def _same_static_dims(a: TensorType, b: TensorType) -> bool:
    if a.shape is None or b.shape is None:
        return True
    if len(a.shape) != len(b.shape):
        return False
    return all(x == y for x, y in zip(a.shape, b.shape) if isinstance(x, int) and isinstance(y, int))


def _view_outputs(model: onnx.ModelProto, part, types: dict, where: str) -> dict[str, tuple[int, ...]]:
    """The ``hetflow.view_outputs`` metadata, checked: a JSON object mapping outputs of the partition to
    their IR shapes (lists of dims), each equal to the partition's (graph.json) static shape."""
    viewed = _metadata_object(model, VIEW_OUTPUTS, "outputs to shapes", where)
    outputs = {v.name for v in part.graph.outputs}
    shapes = {}
    for name, shape in viewed.items():
        if name not in outputs:
            raise RunnerError(f"{where}: the metadata {VIEW_OUTPUTS!r} names {name!r}, which is not an output "
                              "of the partition")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise RunnerError(f"{where}: the metadata {VIEW_OUTPUTS!r} gives output {name!r} the shape "
                              f"{json.dumps(shape)[:80]}, not a list of dims")
        ir_type = types[name]
        if ir_type is None or not ir_type.is_static or tuple(shape) != ir_type.shape:
            raise RunnerError(f"{where}: the metadata {VIEW_OUTPUTS!r} gives output {name!r} the shape "
                              f"{shape}, the partition (graph.json) declares {ir_type}")
        shapes[name] = tuple(shape)
    return shapes


def _view(name: str, declared: TensorType | None, ir_type: TensorType, ir_shape: tuple[int, ...],
          where: str) -> ViewOutput:
    """An output bound as a view: its model shape static, with the arena buffer's element count and type."""
    if declared is None or not declared.is_static:
        raise RunnerError(f"{where}: output {name!r} is bound as a view but the model declares it "
                          f"{declared or 'untyped'}, not a static shape")
    if declared.numel() != ir_type.numel() or declared.dtype != ir_type.dtype:
        raise RunnerError(f"{where}: output {name!r} is bound as a view of {declared} over its buffer of "
                          f"{ir_type} ({ir_type.numel()} elements): the sizes differ")
    return ViewOutput(tuple(declared.shape), ir_shape, declared.nbytes())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
