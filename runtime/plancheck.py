"""The memory-plan checker: an independent proof that a plan cannot race, at every compile and every load.

Written apart from the planner (``hetflow.passes.plan_memory``) on purpose: it
shares no code with it, only the rules of the runtime it checks against.

The runtime's order: the program is a list of partitions, each a run of top-level
nodes on one device. One worker per device runs its partitions in index order; a
partition that reads a value another partition made starts after that partition
finished (a flag across devices, the queue on one). Partition p *happens-before*
q when a chain of such edges leads from p to q. Inside one partition the backend
runs the nodes as one program (ONNX Runtime may reorder them): a value crossing
the partition's boundary may be touched at any moment of it, a value internal to
it only at its node's position.

A plan is sound when, in each memory space:

* every planned value is produced into that space and lies inside the arena,
  aligned;
* any two values whose bytes overlap are ordered: every access of one (its
  write and each read; a graph output is read by the caller after the run) is
  ordered before the write of the other. A node may write its output over an
  input it reads only as an elementwise op of one output and the same type, and
  never when both values cross the same partition's boundary.

A violation raises ``PlanError`` in one line naming the two values, their
devices and the memory space.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

from hetflow.ir import FusionKind, Graph, Node, Value, get_op
from hetflow.ir.errors import HetflowError
from hetflow.ir.symbolic import max_nbytes

IN_PLACE_KINDS = (FusionKind.elementwise, FusionKind.broadcast)


class PlanError(HetflowError):
    pass


class _Order:
    def __init__(self, graph: Graph, partitions: Sequence[tuple[str, Sequence[str]]]):
        by_name = {n.outputs[0].name: n for n in graph.nodes if n.outputs}
        self.part: dict[int, int] = {}
        self.position: dict[int, int] = {}
        self.devices = [device for device, _ in partitions]
        counter = 0
        for index, (_, names) in enumerate(partitions):
            for name in names:
                if name not in by_name:
                    raise PlanError(f"memory plan check: partition {index} names node {name!r}, "
                                    "which the graph does not have")
                node = by_name[name]
                self.part[id(node)] = index
                self.position[id(node)] = counter
                counter += 1
        missing = [n for n in graph.nodes if id(n) not in self.part]
        if missing:
            raise PlanError(f"memory plan check: {missing[0].describe()} is in no partition")
        edges: list[set[int]] = [set() for _ in partitions]
        last_on: dict[str, int] = {}
        for index, (device, _) in enumerate(partitions):
            if device in last_on:
                edges[last_on[device]].add(index)
            last_on[device] = index
        for node in graph.nodes:
            for value in node.inputs:
                if value is not None and value.producer is not None and id(value.producer) in self.part:
                    source, target = self.part[id(value.producer)], self.part[id(node)]
                    if source != target:
                        edges[source].add(target)
        # after[p]: the partitions that p happens-before. Every edge runs forward in index order (a worker's
        # queue, a producer before its readers), so one sweep from the last partition closes them.
        self.after: list[set[int]] = [set() for _ in partitions]
        for index in reversed(range(len(partitions))):
            for j in edges[index]:
                if j <= index:
                    raise PlanError(f"memory plan check: partition {index} ({self.devices[index]}) feeds "
                                    f"partition {j}, which comes before it")
                self.after[index] |= {j} | self.after[j]

    def crosses(self, value: Value, part: int) -> bool:
        """Whether ``value`` crosses partition ``part``'s boundary (so the arena holds it while it runs)."""
        if value.is_output:
            return True
        produced_in = self.part.get(id(value.producer)) if value.producer is not None else None
        if produced_in != part:
            return True
        return any(self.part.get(id(u)) != part for u, _ in value.uses)

    def before(self, reader: Node, first: Value, writer: Node, second: Value) -> str | None:
        """None when ``reader``'s access of ``first`` is ordered before ``writer``'s write of ``second``;
        else why not."""
        p, q = self.part[id(reader)], self.part[id(writer)]
        if p != q:
            if q in self.after[p]:
                return None
            return (f"{reader.describe()} (partition {p}, {self.devices[p]}) is not ordered before "
                    f"partition {q} ({self.devices[q]})")
        if reader is writer:
            row = get_op(writer.op, writer)
            if (first in writer.inputs and len(writer.outputs) == 1 and row.kind in IN_PLACE_KINDS
                    and first.type == second.type
                    and not (self.crosses(first, p) and self.crosses(second, p))):
                return None
            return f"{writer.describe()} reads %{first.name} and writes %{second.name} over it, not as an in-place elementwise op"
        if self.crosses(first, p) and self.crosses(second, p):
            return (f"both cross partition {p}'s boundary ({self.devices[p]}), whose program may touch them in any "
                    "order")
        if self.position[id(reader)] < self.position[id(writer)]:
            return None
        return f"{reader.describe()} runs after {writer.describe()} in partition {p}"

    def ordered(self, first: Value, second: Value) -> str | None:
        """None when every access of ``first`` is ordered before the write of ``second``."""
        if first.is_output:
            return f"%{first.name} is a graph output (read by the caller after the run)"
        writer = second.producer
        for node in [first.producer] + [u for u, _ in first.uses]:
            why = self.before(node, first, writer, second)
            if why is not None:
                return why
        return None


def check_memory_plan(graph: Graph, partitions: Sequence[tuple[str, Sequence[str]]],
                      plan: Mapping[str, Mapping], memory_space: Callable[[str], str],
                      alignment: int = 64, where: str = "memory plan") -> int:
    """Raise ``PlanError`` unless ``plan`` ({memory: {"size", "offsets"}}) is sound for the partitioned
    graph (``partitions``: [(device, [node names])] in index order). Returns the overlapping pairs proved
    ordered."""
    order = _Order(graph, partitions)
    values: dict[str, Value] = {o.name: o for n in graph.nodes for o in n.outputs}
    proved = 0
    for memory, space in plan.items():
        if not isinstance(space, Mapping) or not isinstance(space.get("offsets"), Mapping):
            raise PlanError(f"{where}: memory {memory!r} has no offsets table")
        size = space.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise PlanError(f"{where}: memory {memory!r} has arena size {size!r}, not a byte count")
        spans = []
        for name, offset in space["offsets"].items():
            value = values.get(name)
            if value is None:
                raise PlanError(f"{where}: memory {memory!r} places %{name}, which no node of the graph produces")
            device = order.devices[order.part[id(value.producer)]]
            home = memory_space(device)
            if home != memory:
                raise PlanError(f"{where}: %{name} is placed in memory {memory!r}, but its producer "
                                f"(device {device}) writes memory {home!r}")
            nbytes = max_nbytes(value.type, graph.dims)  # a dynamic shape: its bytes at the declared maximum
            if nbytes is None:
                raise PlanError(f"{where}: %{name} in memory {memory!r} has no bounded size ({value.type})")
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
                raise PlanError(f"{where}: %{name} in memory {memory!r} has offset {offset!r}, not a byte offset")
            if offset % alignment:
                raise PlanError(f"{where}: %{name} in memory {memory!r} is at offset {offset}, not aligned to "
                                f"{alignment} bytes")
            if offset + nbytes > size:
                raise PlanError(f"{where}: %{name} in memory {memory!r} ends at byte {offset + nbytes}, past the "
                                f"arena's {size} bytes")
            if nbytes:
                spans.append((offset, offset + nbytes, value))
        spans.sort(key=lambda s: (s[0], s[1], s[2].name))
        active: list[tuple[int, int, Value]] = []
        for low, high, value in spans:
            active = [s for s in active if s[1] > low]
            for other_low, other_high, other in active:
                first_why = order.ordered(other, value)
                if first_why is not None and order.ordered(value, other) is not None:
                    a_dev = order.devices[order.part[id(other.producer)]]
                    b_dev = order.devices[order.part[id(value.producer)]]
                    raise PlanError(
                        f"{where}: %{other.name} ({a_dev}) and %{value.name} ({b_dev}) share bytes "
                        f"{max(low, other_low)}..{min(high, other_high)} of memory {memory!r}, but nothing the "
                        f"runtime enforces orders them: {first_why}")
                proved += 1
            active.append((low, high, value))
    return proved
