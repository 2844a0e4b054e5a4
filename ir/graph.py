"""The dataflow IR: Graph, Node and Value.

A ``Value`` is produced by at most one node (none for graph inputs and weights)
and knows its uses as ``(node, input_index)`` pairs, kept in sync by every
mutation. A ``Node`` has an op name (ONNX op type, or ``domain.Op`` for other
domains, e.g. ``hetflow.group``), input values (``None`` for an omitted optional
input), output values, ONNX-style attributes, a source location and ``meta``:
the annotation dict that passes fill (device, group kind, memory offsets...).
``Graph`` holds inputs, outputs, weights (initializers, with their data) and
nodes in topological order.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import numpy as np

from .errors import HetflowError
from .types import TensorType


class IRError(HetflowError):
    """A structural misuse of the IR (removing a used node, a name clash...)."""


class Value:
    __slots__ = ("name", "type", "producer", "uses", "data")

    def __init__(self, name: str, type: TensorType | None, producer: "Node | None" = None,
                 data: np.ndarray | None = None):
        self.name = name
        self.type = type
        self.producer = producer
        self.uses: list[tuple[Node, int]] = []
        self.data = data  # set for weights (initializers) only

    @property
    def is_weight(self) -> bool:
        return self.data is not None

    def users(self) -> list["Node"]:
        seen: dict[int, Node] = {}
        for node, _ in self.uses:
            seen.setdefault(id(node), node)
        return list(seen.values())

    def replace_all_uses_with(self, other: "Value", graph: "Graph | None" = None) -> None:
        """Point every use of this value (and, given the graph, its outputs) at ``other``."""
        for node, index in list(self.uses):
            node.set_input(index, other)
        if graph is not None:
            graph.outputs = [other if v is self else v for v in graph.outputs]

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    __slots__ = ("op", "inputs", "outputs", "attrs", "loc", "meta", "__weakref__")

    def __init__(self, op: str, inputs: Iterable[Value | None], outputs: Iterable[Value],
                 attrs: dict[str, Any] | None = None, loc: str = "", meta: dict[str, Any] | None = None):
        self.op = op
        self.inputs: list[Value | None] = []
        self.outputs: list[Value] = list(outputs)
        self.attrs = dict(attrs or {})
        self.loc = loc
        self.meta = dict(meta or {})
        for v in inputs:
            self._append_input(v)
        for out in self.outputs:
            if out.producer is not None and out.producer is not self:
                raise IRError(f"value %{out.name} already produced by {out.producer.op} node {out.producer.loc!r}")
            out.producer = self

    @property
    def domain(self) -> str:
        return self.op.rsplit(".", 1)[0] if "." in self.op else ""

    @property
    def op_type(self) -> str:
        return self.op.rsplit(".", 1)[-1]

    @property
    def subgraphs(self) -> list["Graph"]:
        found = []
        for value in self.attrs.values():
            if isinstance(value, Graph):
                found.append(value)
            elif isinstance(value, list):
                found.extend(v for v in value if isinstance(v, Graph))
        return found

    def _append_input(self, value: Value | None) -> None:
        index = len(self.inputs)
        self.inputs.append(value)
        if value is not None:
            value.uses.append((self, index))

    def set_input(self, index: int, value: Value | None) -> None:
        old = self.inputs[index]
        if old is value:
            return
        if old is not None:
            old.uses.remove((self, index))
        self.inputs[index] = value
        if value is not None:
            value.uses.append((self, index))

    def detach_inputs(self) -> None:
        for index, value in enumerate(self.inputs):
            if value is not None:
                value.uses.remove((self, index))
        self.inputs = []

    def describe(self) -> str:
        """A short human description for error messages: op, output and source location."""
        outs = ", ".join(f"%{o.name}" for o in self.outputs)
        where = f" at {self.loc}" if self.loc else ""
        return f"{self.op} node ({outs}){where}"

    def __repr__(self) -> str:
        return f"<Node {self.describe()}>"


class Graph:
    def __init__(self, name: str = "main", opset: int = 18):
        self.name = name
        self.opset = opset  # version of the default ONNX domain whose semantics the ops follow
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.weights: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self._names: set[str] = set()
        self._counter = itertools.count()

    # --- names -------------------------------------------------------------------------------
    def fresh_name(self, hint: str = "") -> str:
        hint = hint or "v"
        if hint not in self._names:
            return hint
        while True:
            name = f"{hint}_{next(self._counter)}"
            if name not in self._names:
                return name

    def _claim(self, name: str) -> None:
        if name in self._names:
            raise IRError(f"graph {self.name!r}: value name %{name} is already used")
        self._names.add(name)

    def forget_name(self, name: str) -> None:
        self._names.discard(name)

    # --- building -------------------------------------------------------------------------------
    def add_input(self, name: str, type: TensorType) -> Value:
        self._claim(name)
        value = Value(name, type)
        self.inputs.append(value)
        return value

    def add_weight(self, name: str, data: np.ndarray, type: TensorType | None = None) -> Value:
        self._claim(name)
        data = np.asarray(data)
        value = Value(name, type or TensorType.of(data), data=data)
        self.weights[name] = value
        return value

    def make_value(self, name: str, type: TensorType | None) -> Value:
        name = self.fresh_name(name)
        self._claim(name)
        return Value(name, type)

    def add_node(self, op: str, inputs: Iterable[Value | None], output_types: Iterable[TensorType | None],
                 attrs: dict[str, Any] | None = None, loc: str = "", output_names: Iterable[str] | None = None,
                 meta: dict[str, Any] | None = None, before: Node | None = None) -> Node:
        """Create a node with fresh output values and insert it (at the end, or before ``before``)."""
        output_types = list(output_types)
        names = list(output_names) if output_names is not None else [""] * len(output_types)
        outputs = [self.make_value(n, t) for n, t in zip(names, output_types)]
        node = Node(op, inputs, outputs, attrs, loc, meta)
        if before is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(self.nodes.index(before), node)
        return node

    def append(self, node: Node) -> Node:
        for out in node.outputs:
            self._claim(out.name)
        self.nodes.append(node)
        return node

    # --- mutation -------------------------------------------------------------------------------
    def remove(self, node: Node) -> None:
        """Remove a node whose outputs are unused; fails loudly, naming the users, otherwise."""
        for out in node.outputs:
            users = [u.describe() for u in out.users()]
            if users:
                raise IRError(f"cannot remove {node.describe()}: %{out.name} is still used by {', '.join(users)}")
            if out in self.outputs:
                raise IRError(f"cannot remove {node.describe()}: %{out.name} is a graph output")
        node.detach_inputs()
        self.nodes.remove(node)
        for out in node.outputs:
            out.producer = None
            self._names.discard(out.name)

    def rename(self, value: Value, new_name: str) -> None:
        """Give a value a new name (free in this graph); weights are re-keyed."""
        if new_name == value.name:
            return
        self._claim(new_name)
        self._names.discard(value.name)
        if value.data is not None and self.weights.get(value.name) is value:
            self.weights = {(new_name if k == value.name else k): v for k, v in self.weights.items()}
        value.name = new_name

    def remove_weight(self, name: str) -> None:
        value = self.weights[name]
        if value.uses or value in self.outputs:
            raise IRError(f"cannot remove weight %{name}: still used by "
                          + ", ".join(u.describe() for u in value.users()))
        del self.weights[name]
        self._names.discard(name)

    def topological_sort(self) -> None:
        """Reorder nodes so every producer comes before its users (stable for sorted graphs)."""
        order: list[Node] = []
        placed: set[int] = set()
        available = {id(v) for v in self.inputs} | {id(v) for v in self.weights.values()}
        pending = list(self.nodes)
        while pending:
            progressed = []
            for node in pending:
                if all(v is None or id(v) in available for v in node.inputs):
                    order.append(node)
                    placed.add(id(node))
                    available.update(id(o) for o in node.outputs)
                else:
                    progressed.append(node)
            if len(progressed) == len(pending):
                names = ", ".join(n.describe() for n in progressed[:3])
                raise IRError(f"graph {self.name!r} has a cycle or a dangling input among: {names}")
            pending = progressed
        self.nodes = order

    # --- queries -------------------------------------------------------------------------------
    def values(self) -> Iterator[Value]:
        yield from self.inputs
        yield from self.weights.values()
        for node in self.nodes:
            yield from node.outputs

    def value(self, name: str) -> Value:
        for v in self.values():
            if v.name == name:
                return v
        raise KeyError(f"graph {self.name!r} has no value %{name}")

    def walk(self) -> Iterator[Node]:
        """Every node, descending into subgraphs (fused groups, control flow bodies)."""
        for node in self.nodes:
            yield node
            for sub in node.subgraphs:
                yield from sub.walk()

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return dict(sorted(counts.items()))

    def parameter_bytes(self) -> int:
        return int(sum(v.data.nbytes for v in self.weights.values()))

    def clone(self) -> "Graph":
        """A deep copy of the structure; weight arrays are shared (they are never mutated in place)."""
        copy, _ = _clone_graph(self)
        return copy

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Graph):
            return NotImplemented
        return graph_difference(self, other) is None

    __hash__ = object.__hash__

    def __str__(self) -> str:
        from .text import print_graph
        return print_graph(self)


def _clone_graph(graph: Graph) -> tuple[Graph, dict[int, Value]]:
    copy = Graph(graph.name, graph.opset)
    mapping: dict[int, Value] = {}
    for v in graph.inputs:
        mapping[id(v)] = copy.add_input(v.name, v.type)
    for v in graph.weights.values():
        mapping[id(v)] = copy.add_weight(v.name, v.data, v.type)
    for node in graph.nodes:
        attrs = {k: _clone_attr(a) for k, a in node.attrs.items()}
        outputs = []
        for out in node.outputs:
            copy._claim(out.name)
            outputs.append(Value(out.name, out.type))
        new = Node(node.op, [None if v is None else mapping[id(v)] for v in node.inputs], outputs,
                   attrs, node.loc, _deep_copy_meta(node.meta))
        copy.nodes.append(new)
        for old, out in zip(node.outputs, outputs):
            mapping[id(old)] = out
    copy.outputs = [mapping[id(v)] for v in graph.outputs]
    return copy, mapping


def _clone_attr(value: Any) -> Any:
    if isinstance(value, Graph):
        return value.clone()
    if isinstance(value, list):
        return [_clone_attr(v) for v in value]
    return value


def _deep_copy_meta(meta: dict) -> dict:
    import copy
    return copy.deepcopy(meta)


# --- structural equality -------------------------------------------------------------------------

def graph_difference(a: Graph, b: Graph) -> str | None:
    """None when the graphs are structurally equal, else a sentence saying where they first differ."""
    if a.name != b.name:
        return f"graph names differ: {a.name!r} vs {b.name!r}"
    if a.opset != b.opset:
        return f"opsets differ: {a.opset} vs {b.opset}"
    if len(a.inputs) != len(b.inputs) or len(a.weights) != len(b.weights) or len(a.nodes) != len(b.nodes):
        return (f"sizes differ: inputs {len(a.inputs)}/{len(b.inputs)}, weights {len(a.weights)}/{len(b.weights)}, "
                f"nodes {len(a.nodes)}/{len(b.nodes)}")
    names: dict[int, str] = {}
    for va, vb in zip(a.inputs, b.inputs):
        if va.name != vb.name or va.type != vb.type:
            return f"input {va!r} vs {vb!r}"
    for va, vb in zip(a.weights.values(), b.weights.values()):
        if va.name != vb.name or va.type != vb.type:
            return f"weight {va!r} vs {vb!r}"
        if not _arrays_equal(va.data, vb.data):
            return f"weight %{va.name} data differs"
    for na, nb in zip(a.nodes, b.nodes):
        if na.op != nb.op or na.loc != nb.loc or na.meta != nb.meta:
            return f"node {na.describe()} vs {nb.describe()}: op, loc or meta differ"
        ins_a = [None if v is None else v.name for v in na.inputs]
        ins_b = [None if v is None else v.name for v in nb.inputs]
        if ins_a != ins_b:
            return f"node {na.describe()}: inputs {ins_a} vs {ins_b}"
        outs_a = [(o.name, o.type) for o in na.outputs]
        outs_b = [(o.name, o.type) for o in nb.outputs]
        if outs_a != outs_b:
            return f"node {na.describe()}: outputs {outs_a} vs {outs_b}"
        diff = _attrs_difference(na.attrs, nb.attrs)
        if diff:
            return f"node {na.describe()}: attribute {diff}"
    if [v.name for v in a.outputs] != [v.name for v in b.outputs]:
        return "graph outputs differ"
    del names
    return None


def _attrs_difference(a: dict, b: dict) -> str | None:
    if set(a) != set(b):
        return f"names {sorted(a)} vs {sorted(b)}"
    for key in a:
        if not _attr_equal(a[key], b[key]):
            return f"{key} differs"
    return None


def _attr_equal(x: Any, y: Any) -> bool:
    if isinstance(x, Graph) or isinstance(y, Graph):
        return isinstance(x, Graph) and isinstance(y, Graph) and graph_difference(x, y) is None
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and _arrays_equal(x, y)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_attr_equal(p, q) for p, q in zip(x, y))
    if isinstance(x, float) and isinstance(y, float) and np.isnan(x) and np.isnan(y):
        return True
    return type(x) is type(y) and x == y


def _arrays_equal(x: np.ndarray | None, y: np.ndarray | None) -> bool:
    if x is None or y is None:
        return x is y
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if x.dtype.kind == "f" or x.dtype.kind == "c":
        return bool(np.array_equal(x, y, equal_nan=True))
    if x.dtype.kind in "iub?O" or x.dtype.kind == "U":
        return bool(np.array_equal(x, y))
    return x.tobytes() == y.tobytes()


def extract_subgraph(graph: Graph, nodes: list[Node], name: str,
                     weights_as_inputs: bool = False) -> tuple[Graph, list[Value], list[Value]]:
    """Copy ``nodes`` (convex, in order) into a standalone graph.

    Values they read from outside become its inputs (weights too, with
    ``weights_as_inputs``; else they are copied as weights); values read outside
    them, or graph outputs, become its outputs. Returns the subgraph, the outer
    values feeding its inputs and the outer values its outputs stand for.
    """
    members = {id(n) for n in nodes}
    sub = Graph(name, graph.opset)
    mapping: dict[int, Value] = {}
    external: list[Value] = []
    for node in nodes:
        for v in node.inputs:
            if v is None or id(v) in mapping:
                continue
            if v.data is not None and not weights_as_inputs:
                mapping[id(v)] = sub.add_weight(v.name, v.data, v.type)
            elif v.producer is None or id(v.producer) not in members:
                mapping[id(v)] = sub.add_input(v.name, v.type)
                external.append(v)
    escaping: list[Value] = []
    for node in nodes:
        outs = []
        for out in node.outputs:
            sub._claim(out.name)
            outs.append(Value(out.name, out.type))
            mapping[id(out)] = outs[-1]
            if out in graph.outputs or any(id(u) not in members for u, _ in out.uses):
                escaping.append(out)
        sub.nodes.append(Node(node.op, [None if v is None else mapping[id(v)] for v in node.inputs], outs,
                              dict(node.attrs), node.loc, dict(node.meta)))
    sub.outputs = [mapping[id(v)] for v in escaping]
    return sub, external, escaping
