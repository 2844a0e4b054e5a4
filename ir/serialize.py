"""Save and load graphs: JSON for the structure, safetensors for the weights. Never pickle."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import HetflowError
from .graph import Graph, Node, Value
from .types import DType, TensorType

FORMAT = "hetflow.graph"
VERSION = 1


class SerializationError(HetflowError):
    pass


# graph.json's shape (JSON Schema; checked before any field is read). Attribute values and meta are free JSON.
NAME = {"type": "string", "minLength": 1, "maxLength": 4096}
TYPE_TEXT = {"type": ["string", "null"], "maxLength": 4096}
TENSOR = {"type": "object", "required": ["tensor"], "properties": {"tensor": {
    "type": "object", "required": ["dtype", "shape"],
    "properties": {"dtype": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                   "hex": {"type": "string"}, "values": {"type": "array", "items": {"type": "string"}}}}}}
GRAPH_SCHEMA = {
    "type": "object",
    "required": ["format", "version", "name", "opset", "inputs", "weights", "nodes", "outputs"],
    "properties": {
        "format": {"const": FORMAT},
        "version": {"const": VERSION},
        "name": {"type": "string", "maxLength": 4096},
        "opset": {"type": "integer", "minimum": 1, "maximum": 1000},
        "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "type"],
                                              "properties": {"name": NAME, "type": TYPE_TEXT}}},
        "weights": {"type": "array", "items": {"type": "object", "required": ["name", "type"],
                                               "properties": {"name": NAME, "type": TYPE_TEXT,
                                                              "tensor": TENSOR["properties"]["tensor"],
                                                              "external": {"enum": ["flash"]}}}},
        "nodes": {"type": "array", "items": {
            "type": "object", "required": ["op", "inputs", "outputs", "attrs"],
            "properties": {"op": {"type": "string", "minLength": 1, "maxLength": 256},
                           "inputs": {"type": "array", "items": {"anyOf": [NAME, {"type": "null"}]}},
                           "outputs": {"type": "array", "minItems": 1, "items": {
                               "type": "object", "required": ["name", "type"],
                               "properties": {"name": NAME, "type": TYPE_TEXT}}},
                           "attrs": {"type": "object"}, "meta": {"type": "object"}, "loc": {"type": "string"}}}},
        "outputs": {"type": "array", "items": NAME},
        "dims": {"type": "object", "maxProperties": 64,
                 "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]{0,63}$"},
                 "additionalProperties": {"type": "array", "minItems": 2, "maxItems": 2,
                                          "items": {"type": "integer", "minimum": 0, "maximum": 2 ** 40}}},
    },
}


def _type_to_json(t: TensorType | None) -> Any:
    return None if t is None else str(t)


def _type_from_json(text: str | None, what: str = "a value") -> TensorType | None:
    """A type from its text; a bad one (unparsable, a negative or absurd dim) is one line naming ``what``."""
    if text is None:
        return None
    from .text import _Parser
    try:
        return _Parser(text, None).type()
    except HetflowError as exc:
        raise SerializationError(f"{what} has type {text!r}: {str(exc).splitlines()[0]}") from None


def _tensor_to_json(a: np.ndarray) -> dict:
    if a.dtype.kind in ("U", "O", "S"):
        return {"tensor": {"dtype": "str", "shape": list(a.shape), "values": [str(x) for x in a.reshape(-1)]}}
    t = TensorType.of(a)
    return {"tensor": {"dtype": t.dtype.value, "shape": list(a.shape), "hex": np.ascontiguousarray(a).tobytes().hex()}}


def _tensor_from_json(d: dict, what: str = "a tensor") -> np.ndarray:
    try:
        dtype = DType(d["dtype"])
        if dtype is DType.str:
            return np.array(d["values"], dtype=object).reshape(d["shape"])
        return np.frombuffer(bytes.fromhex(d["hex"]), dtype=dtype.numpy).reshape(d["shape"]).copy()
    except (KeyError, TypeError, ValueError) as exc:
        detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0][:120]
        raise SerializationError(f"{what} in the graph file is malformed: {detail}") from None


def _attr_to_json(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return _tensor_to_json(v)
    if isinstance(v, Graph):
        return {"graph": graph_to_json(v, inline_weights=True)}
    if isinstance(v, list):
        return [_attr_to_json(x) for x in v]
    return v


def _attr_from_json(v: Any, what: str) -> Any:
    if isinstance(v, dict) and "tensor" in v:
        return _tensor_from_json(v["tensor"], what)
    if isinstance(v, dict) and "graph" in v:
        return graph_from_json(v["graph"], {})
    if isinstance(v, list):
        return [_attr_from_json(x, what) for x in v]
    return v


def graph_to_json(graph: Graph, inline_weights: bool = False, external: set[str] | frozenset = frozenset()) -> dict:
    """A JSON-able dict; weights are listed by name and type (their data inline only if asked). ``external``:
    weights whose data lives in the flash image (``"external": "flash"``), not in the weights file."""
    weights = []
    for w in graph.weights.values():
        entry = {"name": w.name, "type": _type_to_json(w.type)}
        if w.name in external:
            entry["external"] = "flash"
        elif inline_weights or not _safetensors_can_hold(w.data):
            entry.update(_tensor_to_json(w.data))
        weights.append(entry)
    return {
        "format": FORMAT, "version": VERSION, "name": graph.name, "opset": graph.opset,
        "inputs": [{"name": v.name, "type": _type_to_json(v.type)} for v in graph.inputs],
        "weights": weights,
        "nodes": [{
            "op": n.op,
            "inputs": [None if v is None else v.name for v in n.inputs],
            "outputs": [{"name": o.name, "type": _type_to_json(o.type)} for o in n.outputs],
            "attrs": {k: _attr_to_json(a) for k, a in n.attrs.items()},
            "meta": n.meta,
            "loc": n.loc,
        } for n in graph.nodes],
        "outputs": [v.name for v in graph.outputs],
        **({"dims": {k: list(r) for k, r in graph.dims.items()}} if graph.dims else {}),
    }


def graph_from_json(d: dict, weights: dict[str, np.ndarray], external: dict[str, np.ndarray] | None = None) -> Graph:
    """The graph a ``graph_to_json`` dict describes (``weights``: the arrays its weights file holds; ``external``:
    those the flash image holds, by name). Data from a file: its shape is checked against ``GRAPH_SCHEMA``
    first, and each error names the field or value."""
    from hetflow.support.schema import check
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise SerializationError(f"not a hetflow graph (format {d.get('format') if isinstance(d, dict) else d!r:.60})")
    if d.get("version") != VERSION:
        raise SerializationError(f"graph format version {d.get('version')!r:.20} is not supported "
                                 f"(this hetflow reads {VERSION})")
    check(d, GRAPH_SCHEMA, "graph file", SerializationError)
    graph = Graph(d["name"], d["opset"])
    for size, (low, high) in d.get("dims", {}).items():
        if low > high:
            raise SerializationError(f"graph file: dims.{size}: the range {low}..{high} is empty")
        graph.dims[size] = (low, high)
    env: dict[str, Value] = {}
    for v in d["inputs"]:
        env[v["name"]] = graph.add_input(v["name"], _type_from_json(v["type"], f"input %{v['name']}"))
    for w in d["weights"]:
        if "external" in w:
            if w["name"] not in (external or {}):
                raise SerializationError(f"weight {w['name']!r} is stored in the flash image, which does not hold it "
                                         "(or was not loaded)")
            data = external[w["name"]]
            declared = _type_from_json(w["type"], f"weight %{w['name']}")
            if declared is not None and declared.is_static and (data.shape != declared.shape or
                                                                 data.dtype != declared.dtype.numpy):
                raise SerializationError(f"weight {w['name']!r} is {data.dtype}{list(data.shape)} in the flash image, "
                                         f"but the graph declares {declared}")
        elif "tensor" in w:
            data = _tensor_from_json(w["tensor"], f"weight {w['name']!r}")
        elif w["name"] in weights:
            data = weights[w["name"]]
            declared = _type_from_json(w["type"], f"weight %{w['name']}")
            if declared is not None and declared.is_static and data.shape != declared.shape:
                if data.size != declared.numel():
                    raise SerializationError(f"weight {w['name']!r} has shape {list(data.shape)} in the weights "
                                             f"file, but the graph declares {declared}")
                data = data.reshape(declared.shape)  # safetensors stores 0-d tensors as shape [1]
        else:
            raise SerializationError(f"weight {w['name']!r} is missing from the weights file")
        env[w["name"]] = graph.add_weight(w["name"], data, _type_from_json(w["type"], f"weight %{w['name']}"))
    for n in d["nodes"]:
        try:
            inputs = [None if name is None else env[name] for name in n["inputs"]]
        except KeyError as exc:
            raise SerializationError(f"node {n['op']} ({n.get('loc', '')}) uses undefined value {exc}") from None
        outputs = []
        for o in n["outputs"]:
            graph._claim(o["name"])
            what = f"%{o['name']} (output of node {n.get('loc', '')!r}, {n['op']})"
            outputs.append(Value(o["name"], _type_from_json(o["type"], what)))
            env[o["name"]] = outputs[-1]
        attrs = {k: _attr_from_json(a, f"attribute {k!r} of node {n['op']}") for k, a in n["attrs"].items()}
        graph.insert(Node(n["op"], inputs, outputs, attrs, n.get("loc", ""), n.get("meta", {})), claim=False)
    try:
        graph.outputs = [env[name] for name in d["outputs"]]
    except KeyError as exc:
        raise SerializationError(f"graph output {exc} is not defined") from None
    return graph


def _safetensors_can_hold(a: np.ndarray) -> bool:
    return a.dtype.kind in "biuf" and a.dtype.name in {
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64"}


def save(graph: Graph, directory: str | Path, graph_file: str = "graph.json",
         weights_file: str = "weights.safetensors", external: set[str] | frozenset = frozenset()) -> list[Path]:
    """Write ``graph.json`` and ``weights.safetensors`` into ``directory``; returns the paths written.
    ``external``: weights written elsewhere (the flash image), only named in graph.json."""
    from safetensors.numpy import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    graph_path, weights_path = directory / graph_file, directory / weights_file
    graph_path.write_text(json.dumps(graph_to_json(graph, external=external), indent=1))
    tensors = {w.name: np.ascontiguousarray(w.data) for w in graph.weights.values()
               if _safetensors_can_hold(w.data) and w.name not in external}
    save_file(tensors, str(weights_path))
    return [graph_path, weights_path]


def load(directory: str | Path, graph_file: str = "graph.json", weights_file: str = "weights.safetensors") -> Graph:
    from safetensors.numpy import load_file
    directory = Path(directory)
    graph_path, weights_path = directory / graph_file, directory / weights_file
    for path in (graph_path, weights_path):
        if not path.exists():
            raise SerializationError(f"missing file {path}")
    try:
        d = json.loads(graph_path.read_text())
    except json.JSONDecodeError as exc:
        raise SerializationError(f"{graph_path} is not valid JSON: {exc}") from None
    try:
        weights = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise SerializationError(f"{weights_path} is not a valid safetensors file: {exc}") from None
    return graph_from_json(d, weights)
