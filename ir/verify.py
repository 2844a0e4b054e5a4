"""verify(graph): the structural and type invariants every pass must keep.

Checks that values are defined before use, that ``Value.uses`` and
``Value.producer`` agree with the nodes (no use by a node outside the graph), that
each value's graph output accounting agrees with ``graph.outputs``, that names are unique, that every op has
a row and its attributes fit the ONNX schema, and (``infer=True``) that the
declared output types agree with the op's type inference. Recurses into
subgraphs. A failure raises ``VerifyError`` naming the node and showing the IR
around it.
"""
from __future__ import annotations

import onnx

from .errors import HetflowError
from .graph import Graph, Node
from .ops import InferenceError, UnsupportedOpError, get_op, infer_types
from .types import TensorType


class VerifyError(HetflowError):
    pass


def verify(graph: Graph, infer: bool = True) -> None:
    _verify(graph, infer, path=graph.name)


def _verify(graph: Graph, infer: bool, path: str) -> None:
    defined: set[int] = set()
    names: set[str] = set()

    def define(value, what):
        if value.name in names:
            _fail(graph, None, f"{path}: value name %{value.name} defined twice ({what})")
        names.add(value.name)
        defined.add(id(value))

    for v in graph.inputs:
        if v.producer is not None:
            _fail(graph, None, f"{path}: graph input %{v.name} has a producer")
        define(v, "input")
    for name, w in graph.weights.items():
        if w.name != name or w.data is None:
            _fail(graph, None, f"{path}: weight %{name} has no data or a mismatched name")
        define(w, "weight")
    for node in graph.nodes:
        for index, v in enumerate(node.inputs):
            if v is None:
                continue
            if id(v) not in defined:
                _fail(graph, node, f"{path}: {node.describe()} uses %{v.name} before it is defined")
            if (node, index) not in v.uses:
                _fail(graph, node, f"{path}: %{v.name}.uses lacks its use by {node.describe()} (input {index})")
        for out in node.outputs:
            if out.producer is not node:
                _fail(graph, node, f"{path}: %{out.name}'s producer is not {node.describe()}")
            define(out, "node output")
        _check_op(graph, node, path, infer)
        for sub in node.subgraphs:
            _verify(sub, infer, f"{path}/{node.op}:{sub.name}")
    members = {id(n) for n in graph.nodes}
    for v in graph.values():
        for user, index in v.uses:
            if index >= len(user.inputs) or user.inputs[index] is not v:
                _fail(graph, user, f"{path}: %{v.name}.uses names {user.describe()} input {index}, which is not it")
            if id(user) not in members:
                _fail(graph, None, f"{path}: %{v.name}.uses names {user.describe()}, which is not a node of the "
                                   "graph (removed, or built and never inserted)")
    if graph.dims:
        _check_dims(graph, path)
    slots: dict[int, int] = {}
    for v in graph.outputs:
        if id(v) not in defined:
            _fail(graph, None, f"{path}: graph output %{v.name} is not defined")
        slots[id(v)] = slots.get(id(v), 0) + 1
    for v in graph.values():
        counted = sum(1 for g in v._output_of if g is graph)
        if counted != slots.get(id(v), 0):
            _fail(graph, None, f"{path}: %{v.name} counts {counted} graph output use(s), graph.outputs holds it "
                               f"{slots.get(id(v), 0)} time(s)")


def _check_dims(graph: Graph, path: str) -> None:
    """A graph with declared sizes: each range is min <= max, each symbolic dim an expression over them."""
    from .symbolic import NAME_RE, SymbolicError, check_expression
    for size, (low, high) in graph.dims.items():
        if not NAME_RE.match(size) or not 0 <= low <= high:
            _fail(graph, None, f"{path}: declared size {size!r} has range {low}..{high}")
    for v in graph.values():
        for d in (v.type.shape or ()) if v.type is not None else ():
            if isinstance(d, str):
                try:
                    check_expression(d, graph.dims, f"%{v.name}: {v.type}")
                except SymbolicError as exc:
                    _fail(graph, v.producer, f"{path}: {exc}")


def _check_op(graph: Graph, node: Node, path: str, infer: bool) -> None:
    try:
        row = get_op(node.op, node)
    except UnsupportedOpError as exc:
        _fail(graph, node, f"{path}: {exc}")
    if row.attr_schema is not None:
        unknown = set(node.attrs) - set(row.attr_schema)
        if unknown:
            _fail(graph, node, f"{path}: {node.describe()} has unknown attributes {sorted(unknown)}")
    elif not node.domain:
        _check_onnx_attrs(graph, node, path)
    if not infer:
        return
    try:
        inferred = infer_types(node, graph.opset)
    except InferenceError as exc:
        _fail(graph, node, f"{path}: type inference failed: {exc}")
    except UnsupportedOpError:
        return
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError) as exc:
        # an inference rule meeting attributes of the wrong kind (a graph read from a file someone else wrote)
        _fail(graph, node, f"{path}: {node.describe()} has malformed attributes or inputs "
                           f"({type(exc).__name__}: {str(exc)[:120]})")
    for out, want in zip(node.outputs, inferred):
        if not _compatible(out.type, want):
            _fail(graph, node, f"{path}: {node.describe()} declares %{out.name}: {out.type}"
                               f" but {node.op} gives {want}")


def _check_onnx_attrs(graph: Graph, node: Node, path: str) -> None:
    try:
        schema = onnx.defs.get_schema(node.op_type, graph.opset, "")
    except onnx.defs.SchemaError:
        _fail(graph, node, f"{path}: op {node.op} does not exist at opset {graph.opset}")
    allowed = set(schema.attributes)
    unknown = set(node.attrs) - allowed
    if unknown:
        _fail(graph, node, f"{path}: {node.describe()} has attributes {sorted(unknown)}"
                           f" that {node.op}-{schema.since_version} does not define")
    missing = [n for n, a in schema.attributes.items() if a.required and n not in node.attrs]
    if missing:
        _fail(graph, node, f"{path}: {node.describe()} lacks required attributes {missing}")


def _compatible(declared: TensorType | None, inferred: TensorType | None) -> bool:
    if declared is None or inferred is None:
        return True
    if declared.dtype != inferred.dtype:
        return False
    if declared.shape is None or inferred.shape is None:
        return True
    if len(declared.shape) != len(inferred.shape):
        return False
    return all(not (isinstance(a, int) and isinstance(b, int)) or a == b
               for a, b in zip(declared.shape, inferred.shape))


def _fail(graph: Graph, node: Node | None, message: str) -> None:
    raise VerifyError(message + ("\n" + ir_context(graph, node) if node is not None else ""))


def ir_context(graph: Graph, node: Node, around: int = 2) -> str:
    """The printed IR lines around ``node``, the node's line marked with '>'."""
    from .text import _node_text
    if node not in graph.nodes:
        return ""
    index = graph.nodes.index(node)
    lo, hi = max(0, index - around), min(len(graph.nodes), index + around + 1)
    lines = []
    for i in range(lo, hi):
        mark = ">" if i == index else " "
        text = _node_text(graph.nodes[i], "")
        lines.append(f"  {mark} {text if len(text) < 240 else text[:237] + '...'}")
    return "\n".join(lines)
