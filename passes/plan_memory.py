"""plan_memory: an offset in its memory space's arena for every activation, sound under any timing.

Buffers are the values top-level nodes produce (a fused group's internal values
never reach memory), each in the memory space of its producer's device
(``Platform.memory_space``). Two buffers may share bytes only when every access
of one happens-before the write of the other in the order the runtime enforces:
data dependences, each device's queue order, the flag synchronisation
(``RuntimeOrder``). The predicted timeline plays no part: devices really run at
their own speeds (a simulated device at the interpreter's), so "ends earlier in
predicted time" is no guarantee. A buffer's span runs, in positions of the
graph's node order, from its producer to the first position that the runtime
orders after all its accesses (graph outputs to the end). The plan checker
(``hetflow.runtime.plancheck``), written apart from this pass, checks every plan
at the end of a compile and at every artifact load. Steps:

1. in-place reuse: an elementwise node may write over an input when every other
   access of the input is ordered before it (same type; never two values that
   both cross one partition's boundary): the two share one buffer;
2. two levels (MEMO): when the graph repeats a block of nodes (transformer
   layers), one block's internal buffers are solved once, and the whole graph is
   solved with each block as one buffer of that block's peak; the block's offsets
   are reused at each block's base;
3. every memory space is solved by ``hetflow.passes.memplan`` (exact search,
   warm-started and bounded by greedy best-fit, never worse than it), each buffer
   aligned (64 bytes by default).

The report gives, per memory space, the arena's size beside the lower bound (the
most bytes live at once), greedy best-fit and no reuse at all. A plan larger than
its memory space's capacity (``Memory.capacity`` of the platform) is an error that
says by how much. Weights have their own region (the place pass checks that they
fit); the KV cache of decode models is a dynamic arena outside this plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hetflow.ir import FusionKind, Graph, Node, Value, get_op

from hetflow.ir.symbolic import max_nbytes

from .base import CompileOptions, PassError, PassResult, register_pass

ALIGNMENT = 64


class PlanTooLargeError(PassError):
    """The activations' plan for a memory space needs more bytes than the space holds."""


@dataclass
class SpacePlan:
    memory: str
    size: int
    lower_bound: int
    greedy: int
    no_reuse: int
    offsets: dict[str, int] = field(default_factory=dict)
    method: str = ""
    note: str = ""
    seconds: float = 0.0
    buffers: int = 0
    blocks: str = ""
    limit_hit: bool = False   # a limit cut the search short: the best plan found, not proved optimal
    limit: str = ""           # "budget" (deterministic: the same every run) or "wall" (the clock: may differ)

    @property
    def gap(self) -> float:
        return (self.size - self.lower_bound) / self.lower_bound if self.lower_bound else 0.0


@dataclass
class MemoryPlanReport:
    spaces: dict[str, SpacePlan] = field(default_factory=dict)
    alignment: int = ALIGNMENT

    def as_manifest(self) -> dict:
        return {m: {"size": p.size, "offsets": p.offsets, "lower_bound": p.lower_bound, "greedy": p.greedy,
                    "no_reuse": p.no_reuse, "method": p.method, "note": p.note,
                    "limit_hit": p.limit_hit, "limit": p.limit}
                for m, p in self.spaces.items()}


def _aligned(n: int, alignment: int) -> int:
    return -(-max(int(n), 1) // alignment) * alignment


def _memory_of(node: Node, platform) -> str:
    if platform is None:
        return "dram"
    device = node.meta.get("device")
    if device is None:
        raise ValueError(f"{node.describe()} has no device: run place before plan_memory")
    return platform.memory_space(device)


@dataclass
class RuntimeOrder:
    """What the runtime guarantees about when a node's reads and writes happen.

    The executor runs partitions (``device_runs``): each device's in index order, and
    a partition that reads another device's value waits for its flag. So partition p
    happens-before q when a chain of queue-order and data edges leads from p to q
    (``reach``). Inside one partition the backend runs the nodes as one program: a
    value crossing the partition's boundary (an arena value) may be read or written
    at any moment of it, an internal value is touched at its node's position.
    """
    position: dict[int, int]      # id(node) -> index in graph.nodes
    run_of: dict[int, int]        # id(node) -> partition index
    last: list[int]               # partition -> position of its last node
    reach: list[int]              # partition -> bitmask of the partitions that happen after it
    tail: list[int]               # partition -> last position of a later partition NOT ordered after it (-1)
    escaping: set[str]            # values that cross a partition boundary (or are graph outputs)

    def free_from(self, node: Node, value: Value) -> int:
        """The first position from which every node is ordered after ``node``'s access of ``value``."""
        run = self.run_of[id(node)]
        end = self.last[run] if value.name in self.escaping else self.position[id(node)]
        return max(end, self.tail[run]) + 1


def runtime_order(graph: Graph, default_device: str | None = None) -> RuntimeOrder:
    """``default_device``: the one device of a graph planned without a platform (every other graph is placed)."""
    from .partition import device_runs
    runs = device_runs(graph, default_device)
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    run_of = {id(n): k for k, (_, nodes) in enumerate(runs) for n in nodes}
    last = [position[id(nodes[-1])] for _, nodes in runs]
    succ: list[set[int]] = [set() for _ in runs]
    previous_on: dict[str, int] = {}
    for k, (device, nodes) in enumerate(runs):
        if device in previous_on:
            succ[previous_on[device]].add(k)  # the device's queue
        previous_on[device] = k
        for node in nodes:
            for v in node.inputs:
                if v is not None and v.producer is not None and id(v.producer) in run_of:
                    p = run_of[id(v.producer)]
                    if p != k:
                        succ[p].add(k)  # a data edge (a flag when the devices differ)
    reach = [0] * len(runs)
    for k in reversed(range(len(runs))):
        mask = 0
        for j in succ[k]:
            mask |= (1 << j) | reach[j]
        reach[k] = mask
    tail = []
    for k in range(len(runs)):
        unordered = [last[j] for j in range(k + 1, len(runs)) if not (reach[k] >> j) & 1]
        tail.append(max(unordered, default=-1))
    escaping = set()
    for node in graph.nodes:
        for out in node.outputs:
            if out.is_output or any(run_of.get(id(u)) != run_of[id(node)] for u in out.users()):
                escaping.add(out.name)
    return RuntimeOrder(position, run_of, last, reach, tail, escaping)


def lifetimes(graph: Graph, order: RuntimeOrder | None = None) -> dict[str, tuple[int, int]]:
    """[start, end) of every top-level value, in positions of the graph's node order.

    A value starts at its producer's position and ends at the first position from
    which every node is ordered after all its accesses (its write and every read) by
    what the runtime enforces (``RuntimeOrder``), never by predicted times: two
    values whose spans do not overlap may share bytes on any timing. Graph outputs
    live to the end."""
    order = order or runtime_order(graph)
    final = len(graph.nodes) + 1
    spans = {}
    for node in graph.nodes:
        for out in node.outputs:
            end = order.free_from(node, out)
            for user in out.users():
                end = max(end, order.free_from(user, out))
            spans[out.name] = (order.position[id(node)], final if out.is_output else end)
    return spans


def in_place_pairs(graph: Graph, order: RuntimeOrder | None = None) -> dict[str, str]:
    """output name -> input name it may overwrite: an elementwise node whose write is ordered after every
    other access of the input and of the values already sharing its bytes. Never two values that both
    cross one partition's boundary (its program may read the input after writing the output)."""
    order = order or runtime_order(graph)
    pairs: dict[str, str] = {}
    group: dict[str, list[Value]] = {}  # value name -> the values sharing its bytes (a chain of in-place writes)
    for node in graph.nodes:
        if node.op == "hetflow.group" or len(node.outputs) != 1:
            continue
        if get_op(node.op, node).kind not in (FusionKind.elementwise, FusionKind.broadcast):
            continue
        out = node.outputs[0]
        here = order.position[id(node)]
        for v in node.inputs:
            if (v is None or v.producer is None or v.data is not None
                    or v.is_output or v.type != out.type or v.name in pairs.values()
                    or (v.name in order.escaping and out.name in order.escaping)):
                continue
            members = group.get(v.name, [v])
            accesses = [(u, m) for m in members for u in [m.producer] + m.users() if not (u is node and m is v)]
            if all(order.free_from(u, m) <= here for u, m in accesses):
                pairs[out.name] = v.name
                group[out.name] = members + [out]
                break
    return pairs


def repeated_block(graph: Graph, min_repeats: int = 2) -> tuple[int, int, int] | None:
    """(first index, block length, repeats) of the longest run of a repeated node pattern, if any."""
    signature = [(n.op, n.attrs.get("kind", ""), tuple(str(o.type) for o in n.outputs)) for n in graph.nodes]
    n = len(signature)
    best = None
    for length in range(2, n // min_repeats + 1):
        for first in range(0, n - length * min_repeats + 1):
            repeats = 1
            while (first + (repeats + 1) * length <= n and
                   signature[first + repeats * length:first + (repeats + 1) * length] == signature[first:first + length]):
                repeats += 1
            if repeats >= min_repeats and (best is None or length * repeats > best[1] * best[2]):
                best = (first, length, repeats)
        if best is not None and best[1] * best[2] > n * 0.6:
            break
    return best


def plan_graph(graph: Graph, platform=None, time_limit: float = 10.0, alignment: int = ALIGNMENT) -> MemoryPlanReport:
    from . import memplan
    order = runtime_order(graph, None if platform is not None else "cpu")
    spans = lifetimes(graph, order)
    pairs = in_place_pairs(graph, order)
    owner = {}
    for out, into in pairs.items():
        root = into
        while root in owner:
            root = owner[root]
        owner[out] = root
    sizes: dict[str, int] = {}
    space_of: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    for node in graph.nodes:
        memory = _memory_of(node, platform)
        for out in node.outputs:
            nbytes = max_nbytes(out.type, graph.dims)  # a dynamic shape: its size at the declared maximum
            if nbytes is None:
                continue
            root = owner.get(out.name, out.name)
            members.setdefault(root, []).append(out.name)
            sizes[root] = max(sizes.get(root, 0), _aligned(nbytes, alignment))
            space_of[root] = space_of.get(root, memory)
    merged_spans = {}
    for root, names in members.items():
        merged_spans[root] = (min(spans[n][0] for n in names), max(spans[n][1] for n in names))
    report = MemoryPlanReport(alignment=alignment)
    for memory in sorted(set(space_of.values())):
        roots = [r for r in members if space_of[r] == memory]
        buffers = [memplan.Buffer(r, merged_spans[r][0], merged_spans[r][1], sizes[r]) for r in roots]
        plan = _solve_two_level(graph, buffers, time_limit, alignment)
        offsets = {}
        for root in roots:
            for name in members[root]:
                offsets[name] = plan.offsets[root]
        greedy = plan.greedy_peak if plan.greedy_peak is not None else plan.peak
        report.spaces[memory] = SpacePlan(memory, plan.peak, memplan.lower_bound(buffers), greedy,
                                          sum(b.size for b in buffers), offsets, plan.method, plan.note,
                                          plan.solve_seconds, len(buffers), getattr(plan, "blocks", ""),
                                          plan.limit_hit, plan.limit)
    if platform is not None:
        _check_capacity(report, platform, graph, sizes)
    return report


def _check_capacity(report: MemoryPlanReport, platform, graph: Graph, sizes: dict[str, int]) -> None:
    """Every space's plan fits its memory's capacity; else one line: the space, the plan's size, the
    capacity, by how much it is over, and the largest buffer in it."""
    from hetflow.platform import human_bytes
    for memory, plan in report.spaces.items():
        capacity = platform.memories[memory].capacity
        if plan.size <= capacity:
            continue
        over = plan.size - capacity
        largest = max(plan.offsets, key=lambda name: sizes.get(name, 0))
        typed = next((f"%{o.name}: {o.type}" for n in graph.nodes for o in n.outputs if o.name == largest),
                     f"%{largest}")
        raise PlanTooLargeError(
            f"pass 'plan_memory': the memory plan for memory {memory!r} of platform {platform.name!r} needs "
            f"{human_bytes(plan.size)} ({plan.size} bytes) for {plan.buffers} buffers, its capacity is "
            f"{human_bytes(capacity)}: over by {human_bytes(over)} ({int(over)} bytes); the largest buffer is "
            f"{typed} ({human_bytes(sizes.get(largest, 0))})")


def _solve_two_level(graph: Graph, buffers, time_limit: float, alignment: int):
    """MEMO's two levels when the graph repeats a block; the flat exact solve otherwise (the better one wins)."""
    from . import memplan
    flat = memplan.solve(buffers, time_limit_s=time_limit, alignment=alignment)
    found = repeated_block(graph)
    if found is None or flat.optimal:
        return flat
    first, length, repeats = found
    by_name = {b.id: b for b in buffers}
    node_names = [[o.name for n in graph.nodes[first + k * length:first + (k + 1) * length] for o in n.outputs]
                  for k in range(repeats)]
    blocks = []
    for k, names in enumerate(node_names):
        inside = set(names)
        internal = [by_name[n] for n in names if n in by_name and _dies_inside(graph, n, inside)]
        blocks.append(internal)
    if not blocks[0]:
        return flat
    inner = memplan.solve(_rebased(blocks[0]), time_limit_s=time_limit / 4, alignment=alignment)
    outer, block_ids = [], {}
    for k, internal in enumerate(blocks):
        if not internal:
            continue
        block_id = f"__block{k}"
        block_ids[block_id] = internal
        outer.append(memplan.Buffer(block_id, min(b.lower for b in internal), max(b.upper for b in internal),
                                    inner.peak))
    rest = [b for b in buffers if not any(b in internal for internal in blocks)]
    top = memplan.solve(rest + outer, time_limit_s=time_limit, alignment=alignment)
    offsets = {b.id: top.offsets[b.id] for b in rest}
    for block_id, internal in block_ids.items():
        for position, b in enumerate(internal):
            template = blocks[0][min(position, len(blocks[0]) - 1)]
            offsets[b.id] = top.offsets[block_id] + inner.offsets[template.id]
    try:
        memplan.check_plan(buffers, offsets, alignment=alignment)
    except memplan.PlanError:
        return flat
    peak = max(offsets[b.id] + b.size for b in buffers)
    if peak >= flat.peak:
        return flat
    limits = {p.limit for p in (flat, inner, top) if p.limit_hit}
    limit = "wall" if "wall" in limits else "budget" if limits else ""
    return memplan.MemoryPlan(offsets, peak, flat.lower_bound, "two-level", False,
                              flat.solve_seconds + inner.solve_seconds + top.solve_seconds,
                              f"MEMO two levels: a block of {length} nodes x {repeats}", flat.greedy_peak,
                              bool(limit), limit)


def _dies_inside(graph: Graph, name: str, inside: set[str]) -> bool:
    value = next((o for n in graph.nodes for o in n.outputs if o.name == name), None)
    if value is None or value.is_output:
        return False
    return all(any(o.name in inside for o in user.outputs) for user in value.users())


def _rebased(buffers):
    from . import memplan
    return [memplan.Buffer(b.id, b.lower, b.upper, b.size) for b in buffers]


@register_pass("plan_memory", needs=("device",), provides=("memory", "offsets"), provides_results=("memory_plan",))
def plan_memory(graph: Graph, options: CompileOptions | None = None) -> PassResult:
    options = options or CompileOptions()
    platform = options.resolved_platform()
    report = plan_graph(graph, platform, options.time_limit)
    options.results["memory_plan"] = report
    before = [dict(n.meta) for n in graph.nodes]
    for node in graph.nodes:
        memory = _memory_of(node, platform)
        offsets = [report.spaces[memory].offsets.get(o.name) for o in node.outputs] if memory in report.spaces else []
        node.meta["memory"] = memory
        node.meta["offsets"] = offsets
    return PassResult(graph, [n.meta for n in graph.nodes] != before)
