"""The dataflow IR: Graph, Node and Value.

A ``Value`` is produced by at most one node (none for graph inputs and weights)
and knows its uses as ``(node, input_index)`` pairs, kept in sync by every
mutation, and the graph output slots holding it: a graph output counts as a use
(``is_used``, ``num_uses``, ``used_only_by``), so "is this value dead, may I
remove its producer, may I absorb it" needs no separate look at
``graph.outputs``. A node's uses are registered when a graph inserts it
(``Graph.insert``, ``add_node``, ``replace``) and dropped when it removes it: a
node built but never inserted reads nothing. A ``Node`` has an op name (ONNX op
type, or ``domain.Op`` for other domains, e.g. ``hetflow.group``), input values
(``None`` for an omitted optional input), output values, ONNX-style attributes,
a source location and ``meta``: the annotation dict that passes fill (device,
group kind, memory offsets...). ``Graph`` holds inputs, outputs, weights
(initializers, with their data) and nodes in topological order;
``Graph.replace`` swaps a set of nodes for one new node, rewiring every use of
what they produced.
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
    __slots__ = ("name", "type", "producer", "uses", "data", "_output_of")

    def __init__(self, name: str, type: TensorType | None, producer: "Node | None" = None,
                 data: np.ndarray | None = None):
        self.name = name
        self.type = type
        self.producer = producer
        self.uses: list[tuple[Node, int]] = []  # node uses only: a graph output is counted apart
        self.data = data  # set for weights (initializers) only
        self._output_of: list[Graph] = []  # one entry per graph output slot holding this value

    @property
    def is_weight(self) -> bool:
        return self.data is not None

    @property
    def is_output(self) -> bool:
        """Whether the value is an output of its graph (which counts as a use)."""
        return bool(self._output_of)

    @property
    def num_uses(self) -> int:
        """Node uses plus graph output slots."""
        return len(self.uses) + len(self._output_of)

    @property
    def is_used(self) -> bool:
        """Read by a node or returned by the graph: its producer may not be removed."""
        return bool(self.uses) or bool(self._output_of)

    def used_only_by(self, nodes: "Iterable[Node]") -> bool:
        """Whether every use is by one of ``nodes`` (a graph output is a use by none of them)."""
        if self._output_of:
            return False
        members = {id(n) for n in nodes}
        return all(id(user) in members for user, _ in self.uses)

    def users(self) -> list["Node"]:
        seen: dict[int, Node] = {}
        for node, _ in self.uses:
            seen.setdefault(id(node), node)
        return list(seen.values())

    def replace_all_uses_with(self, other: "Value", graph: "Graph | None" = None) -> None:
        """Point every use of this value, graph outputs included, at ``other``.

        (``graph`` is accepted for compatibility: the value knows the graphs it is an output of.)"""
        for node, index in list(self.uses):
            node.set_input(index, other)
        for owner in _unique(self._output_of):
            owner.outputs = [other if v is self else v for v in owner.outputs]

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    """An operation. Built on its own it reads nothing yet: its inputs become uses of their values when a
    graph inserts it (``attached``), and stop being uses when the graph removes it."""
    __slots__ = ("op", "inputs", "outputs", "attrs", "loc", "meta", "_attached", "__weakref__")

    def __init__(self, op: str, inputs: Iterable[Value | None], outputs: Iterable[Value],
                 attrs: dict[str, Any] | None = None, loc: str = "", meta: dict[str, Any] | None = None):
        self.op = op
        self.outputs: list[Value] = list(outputs)
        self.attrs = dict(attrs or {})
        self.loc = loc
        self.meta = dict(meta or {})
        self._attached = False
        self.inputs: list[Value | None] = list(inputs)
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

    @property
    def attached(self) -> bool:
        """Whether the node is in a graph, its inputs registered as uses."""
        return self._attached

    def _attach(self) -> None:
        if self._attached:
            return
        for index, value in enumerate(self.inputs):
            if value is not None:
                value.uses.append((self, index))
        self._attached = True

    def set_input(self, index: int, value: Value | None) -> None:
        old = self.inputs[index]
        if old is value:
            return
        if self._attached and old is not None:
            old.uses.remove((self, index))
        self.inputs[index] = value
        if self._attached and value is not None:
            value.uses.append((self, index))

    def detach_inputs(self) -> None:
        """Drop the node's inputs (and, when it is attached, their uses)."""
        if self._attached:
            for index, value in enumerate(self.inputs):
                if value is not None:
                    value.uses.remove((self, index))
        self._attached = False
        self.inputs = []

    def describe(self) -> str:
        """A short human description for error messages: op, output and source location."""
        outs = ", ".join(f"%{_one_line(o.name)}" for o in self.outputs)
        where = f" at {_one_line(self.loc)}" if self.loc else ""
        return f"{_one_line(self.op)} node ({outs}){where}"

    def __repr__(self) -> str:
        return f"<Node {self.describe()}>"


def _one_line(text: str) -> str:
    """A name as it is when printable; with its control characters escaped (repr's escapes) when not, so a
    name from a model never splits an error message over lines."""
    text = str(text)
    return text if text.isprintable() else repr(text)[1:-1]


def _unique(graphs: list) -> list:
    """The distinct objects of ``graphs``, by identity (Graph's ``==`` is structural)."""
    seen: dict[int, Any] = {}
    for g in graphs:
        seen.setdefault(id(g), g)
    return list(seen.values())


class _OutputList(list):
    """A graph's outputs: a list that keeps each value's output accounting (``Value.is_output``) in step
    with every mutation (assignment, append, slice assignment, removal...)."""
    __slots__ = ("_graph",)

    def __init__(self, graph: "Graph"):
        super().__init__()
        self._graph = graph

    def _sync(self, before: list) -> None:
        graph = getattr(self, "_graph", None)
        if graph is None:
            return
        bad = next((v for v in self if not isinstance(v, Value)), None)
        if bad is not None:
            list.__init__(self, before)  # refused: the list and the accounting stay as they were
            raise IRError(f"graph {graph.name!r}: an output must be a Value, not {bad!r}")
        for v in before:
            slots = v._output_of
            for i, g in enumerate(slots):
                if g is graph:
                    del slots[i]
                    break
        for v in self:
            v._output_of.append(graph)

    def _mutating(name):  # noqa: N805 - a method factory evaluated in the class body
        base = getattr(list, name)

        def method(self, *args):
            before = list(self)
            result = base(self, *args)
            self._sync(before)
            return result
        method.__name__ = name
        return method

    append = _mutating("append")
    extend = _mutating("extend")
    insert = _mutating("insert")
    remove = _mutating("remove")
    pop = _mutating("pop")
    clear = _mutating("clear")
    __setitem__ = _mutating("__setitem__")
    __delitem__ = _mutating("__delitem__")
    __iadd__ = _mutating("__iadd__")
    __imul__ = _mutating("__imul__")
    del _mutating

    def __reduce_ex__(self, protocol):  # copies and pickles are plain lists
        return list, (list(self),)


class Graph:
    def __init__(self, name: str = "main", opset: int = 18):
        self.name = name
        self.opset = opset  # version of the default ONNX domain whose semantics the ops follow
        self.inputs: list[Value] = []
        self._outputs = _OutputList(self)
        self.weights: dict[str, Value] = {}
        self.nodes: list[Node] = []
        # dynamic shapes: each declared size's (min, max); a str dim of a type is an expression over these
        # names (``hetflow.ir.symbolic``); empty for a graph of static shapes
        self.dims: dict[str, tuple[int, int]] = {}
        self._names: set[str] = set()
        self._counter = itertools.count()

    @property
    def outputs(self) -> list[Value]:
        """The graph's results, in order: each one counts as a use of its value (``Value.is_output``).
        Assign a list, or mutate this one in place: the accounting follows either way."""
        return self._outputs

    @outputs.setter
    def outputs(self, values: Iterable[Value]) -> None:
        self._outputs[:] = list(values)

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
        return self.insert(node, before=before, claim=False)

    def insert(self, node: Node, before: Node | None = None, after: Node | None = None, claim: bool = True) -> Node:
        """Insert a built node (at the end, or before/after a node of this graph): its output names are
        claimed (unless ``claim`` is False: the caller claimed them, as a parser does while reading) and
        its inputs become uses of their values."""
        if node.attached:
            raise IRError(f"cannot insert {node.describe()}: it is already in a graph")
        if before is not None and after is not None:
            raise IRError("insert takes before or after, not both")
        position = len(self.nodes) if before is None and after is None else \
            self._position(before) if before is not None else self._position(after) + 1
        if claim:
            claimed = []
            try:
                for out in node.outputs:
                    self._claim(out.name)
                    claimed.append(out.name)
            except IRError:
                for name in claimed:
                    self._names.discard(name)
                raise
        node._attach()
        self.nodes.insert(position, node)
        return node

    def append(self, node: Node) -> Node:
        return self.insert(node)

    def _position(self, node: Node) -> int:
        for i, n in enumerate(self.nodes):
            if n is node:
                return i
        raise IRError(f"{node.describe()} is not a node of graph {self.name!r}")

    # --- mutation -------------------------------------------------------------------------------
    def remove(self, node: Node) -> None:
        """Remove a node whose outputs are unused (a graph output is a use); fails loudly, naming the users,
        otherwise."""
        for out in node.outputs:
            if out.is_used:
                raise IRError(f"cannot remove {node.describe()}: %{out.name} is still used by {_readers(out)}")
        position = self._position(node)
        node.detach_inputs()
        del self.nodes[position]
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
        if value.is_used:
            raise IRError(f"cannot remove weight %{name}: still used by {_readers(value)}")
        del self.weights[name]
        self._names.discard(name)

    def replace(self, nodes: Iterable[Node], new_node: Node, mapping: "dict[Value, Value] | None" = None,
                keep_names: bool = True, at: str = "last", reorder: bool = True) -> Node:
        """Replace ``nodes`` (of this graph) by ``new_node`` (built, not yet in a graph); returns it.

        ``mapping`` gives, for every output of ``nodes`` still read outside them (by another node, or as
        a graph output), the value that takes its place: an output of ``new_node`` or a value already in
        the graph. Without one, a single replaced node's outputs map to ``new_node``'s by position. Each
        use is rewired, graph outputs included; with ``keep_names``, an output of ``new_node`` taking an
        old value's place takes its name (a graph output keeps its name), the others get fresh names.
        ``new_node`` goes where the last (``at="first"``: the first) of ``nodes`` stood; if that breaks
        the topological order (a reader of a replaced value stood between them), the graph is re-sorted,
        unless ``reorder`` is False (the caller sorts once after a batch of replacements).

        Refuses, with an IRError naming the value and its reader, a replacement that would leave a read
        of a removed value; the graph is then unchanged.
        """
        nodes = list(nodes)
        if not nodes:
            raise IRError("replace needs at least one node to replace")
        if at not in ("first", "last"):
            raise IRError(f"replace: at must be 'first' or 'last', not {at!r}")
        if new_node.attached:
            raise IRError(f"cannot insert {new_node.describe()}: it is already in a graph")
        index = {id(n): i for i, n in enumerate(self.nodes)}
        for n in nodes:
            if id(n) not in index:
                raise IRError(f"cannot replace {n.describe()}: it is not a node of graph {self.name!r}")
        members = {id(n) for n in nodes}
        if len(members) != len(nodes):
            raise IRError("replace: a node is listed twice")
        removed = {id(o): o for n in nodes for o in n.outputs}
        if mapping is None:
            if len(nodes) != 1 or len(nodes[0].outputs) != len(new_node.outputs):
                mapping = {}
            else:
                mapping = dict(zip(nodes[0].outputs, new_node.outputs))
        what = f"cannot replace {', '.join(n.describe() for n in nodes)} by {new_node.describe()}"
        new_outputs = {id(o) for o in new_node.outputs}
        sources = {id(v) for v in self.inputs} | {id(v) for v in self.weights.values()}

        def defined(v: Value) -> bool:  # a value the graph will still hold once the nodes are gone
            if v.producer is None:
                return id(v) in sources
            return id(v.producer) in index and id(v.producer) not in members

        for old, new in mapping.items():
            if id(old) not in removed:
                raise IRError(f"{what}: the mapping names %{old.name}, which they do not produce")
            if id(new) in removed:
                raise IRError(f"{what}: %{old.name} would be replaced by %{new.name}, which is removed too")
            if id(new) not in new_outputs and not defined(new):
                raise IRError(f"{what}: %{old.name} would be replaced by %{new.name}, which is not in the graph")
        for i, v in enumerate(new_node.inputs):
            if v is not None and id(v) in removed:
                raise IRError(f"{what}: the new node reads %{v.name} (input {i}), which the replaced nodes produce")
            if v is not None and not defined(v):
                raise IRError(f"{what}: the new node reads %{v.name} (input {i}), which is not in the graph")
        mapped = {id(k) for k in mapping}
        for value in removed.values():
            if id(value) in mapped:
                continue
            if not value.used_only_by(nodes):
                raise IRError(f"{what}: %{value.name} would be left dangling, still read by "
                              f"{_readers(value, exclude=members)}, and the mapping gives no value in its place")
        # rewire every use outside the replaced nodes, graph outputs included
        for old, new in mapping.items():
            for user, slot in list(old.uses):
                if id(user) not in members:
                    user.set_input(slot, new)
            for owner in _unique(old._output_of):
                owner.outputs = [new if v is old else v for v in owner.outputs]
        # remove the old nodes; new_node goes where the first or last of them stood
        positions = sorted(index[id(n)] for n in nodes)
        anchor = positions[-1] if at == "last" else positions[0]
        position = anchor - sum(1 for p in positions if p < anchor)
        for n in nodes:
            n.detach_inputs()
            for out in n.outputs:
                out.producer = None
                self._names.discard(out.name)
        self.nodes = [n for n in self.nodes if id(n) not in members]
        # names: an output taking an old value's place takes its name (keep_names), the others fresh ones
        names = {}
        if keep_names:
            for old, new in mapping.items():
                if id(new) in new_outputs:
                    names.setdefault(id(new), old.name)
        for out in new_node.outputs:
            out.name = names.get(id(out)) or self.fresh_name(out.name)
            self._claim(out.name)
        new_node._attach()
        self.nodes.insert(position, new_node)
        if reorder and not self._in_order_around(new_node, position):
            self.topological_sort()
        return new_node

    def _in_order_around(self, node: Node, position: int) -> bool:
        """Whether ``node``, at ``position``, comes after its inputs' producers and before its readers."""
        where = {id(n): i for i, n in enumerate(self.nodes)}
        for v in node.inputs:
            if v is not None and v.producer is not None and where.get(id(v.producer), -1) > position:
                return False
        return all(where.get(id(user), position + 1) > position for out in node.outputs for user, _ in out.uses)

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
    copy.dims = dict(graph.dims)
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
        copy.insert(new, claim=False)
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
    if a.dims != b.dims:
        return f"declared sizes differ: {a.dims} vs {b.dims}"
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
            if not out.used_only_by(nodes):
                escaping.append(out)
        sub.insert(Node(node.op, [None if v is None else mapping[id(v)] for v in node.inputs], outs,
                        dict(node.attrs), node.loc, dict(node.meta)), claim=False)
    sub.outputs = [mapping[id(v)] for v in escaping]
    return sub, external, escaping


def _readers(value: Value, exclude: set[int] = frozenset()) -> str:
    """Who reads ``value`` (nodes, and the graph when it is an output): for error messages."""
    readers = [u.describe() for u in value.users() if id(u) not in exclude]
    if value.is_output:
        readers.append("a graph output")
    return ", ".join(readers)
