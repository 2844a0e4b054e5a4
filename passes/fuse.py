"""fuse: group operators into ``hetflow.group`` nodes, each holding its subgraph.

Groups, found in this order, each node joining at most one group:

1. attention: MatMul(Q, K^T) -> [scale, mask: elementwise] -> Softmax -> [elementwise] -> MatMul(., V),
   with the K transpose, however the frontend spelled the scale and the mask;
2. expert: a gated MLP, act(x W_gate) * (x W_up) -> W_down (an MoE expert, or a SwiGLU FFN);
3. contraction: MatMul / Gemm / Conv with its elementwise epilogue (bias, activation, residual add);
4. reduction: Softmax, LayerNorm, RMSNorm... with their elementwise neighbours (also decomposed forms);
5. elementwise: the remaining chains of elementwise / broadcast ops.

Fusion kinds come from the op table. A group is convex (no path leaves it and
comes back), so it can run as one kernel. Its bytes are what crosses its boundary.
Single nodes stay plain nodes.
"""
from __future__ import annotations

from hetflow.ir import FusionKind, Graph, Node, Value, get_op
from hetflow.ir.graph import extract_subgraph

from .base import PassResult, register_pass

GROUP_OP = "hetflow.group"
_E, _B, _R, _C = FusionKind.elementwise, FusionKind.broadcast, FusionKind.reduction, FusionKind.contraction
POINTWISE = (_E, _B)
LAYOUT = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"}  # joins groups as a neighbour


def _kind(node: Node) -> FusionKind:
    if node.op == GROUP_OP:
        return FusionKind.opaque
    return get_op(node.op, node).kind


class _Fusion:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.index = {id(n): i for i, n in enumerate(graph.nodes)}
        self.assigned: dict[int, int] = {}
        self.groups: list[tuple[str, list[Node]]] = []

    # --- bookkeeping ---------------------------------------------------------------------------
    def free(self, node: Node | None) -> bool:
        return node is not None and id(node) not in self.assigned and node.op != GROUP_OP

    def add_group(self, kind: str, nodes: list[Node]) -> None:
        if len(nodes) < 2:
            return
        gid = len(self.groups)
        for n in nodes:
            self.assigned[id(n)] = gid
        self.groups.append((kind, sorted(nodes, key=lambda n: self.index[id(n)])))

    def depends_on(self, node: Node, members: set[int], lowest: int) -> bool:
        """Whether ``node`` is reachable from a member (searching producers, pruned by topological index)."""
        stack, seen = [node], set()
        while stack:
            current = stack.pop()
            if id(current) in members:
                return True
            if id(current) in seen or self.index[id(current)] < lowest:
                continue
            seen.add(id(current))
            stack.extend(v.producer for v in current.inputs if v is not None and v.producer is not None)
        return False

    def can_join(self, node: Node, members: set[int], lowest: int) -> bool:
        """All of ``node``'s inputs are members' outputs, or independent of the group."""
        for v in node.inputs:
            if v is None or v.producer is None or id(v.producer) in members:
                continue
            if self.depends_on(v.producer, members, lowest):
                return False
        return True

    def grow(self, seed: list[Node], kinds: tuple[FusionKind, ...], upward: bool) -> list[Node]:
        """Grow a group from ``seed`` over free nodes of ``kinds``: consumers, and producers if ``upward``."""
        members = {id(n): n for n in seed}
        changed = True
        while changed:
            changed = False
            lowest = min(self.index[i] for i in members)
            for node in list(members.values()):
                for out in node.outputs:
                    for user in out.users():
                        if id(user) in members or not self.free(user) or not _fits(user, kinds):
                            continue
                        if self.can_join(user, set(members), lowest):
                            members[id(user)] = user
                            changed = True
                if not upward:
                    continue
                for v in node.inputs:
                    p = v.producer if v is not None else None
                    if p is None or id(p) in members or not self.free(p) or not _fits(p, kinds):
                        continue
                    if all(o.used_only_by(members.values()) for o in p.outputs):
                        members[id(p)] = p
                        changed = True
        return list(members.values())

    # --- patterns ------------------------------------------------------------------------------
    def attention(self, softmax: Node) -> list[Node] | None:
        """Everything between the score MatMul and the context MatMul around ``softmax``."""
        mm2 = self._reach(softmax, forward=True)
        mm1 = self._reach(softmax, forward=False)
        if mm1 is None or mm2 is None or not self.free(mm1) or not self.free(mm2):
            return None
        lo, hi = self.index[id(mm1)], self.index[id(mm2)]
        after_mm1 = self._closure(mm1, forward=True, bound=hi)
        before_mm2 = self._closure(mm2, forward=False, bound=lo)
        between = [n for n in self.graph.nodes[lo:hi + 1] if id(n) in after_mm1 and id(n) in before_mm2]
        if len(between) > 48 or any(not self.free(n) for n in between):
            return None
        if any(_kind(n) is _C for n in between if n is not mm1 and n is not mm2):
            return None
        members = between + self._operand_prep(mm1.inputs[0]) + self._operand_prep(mm1.inputs[1]) \
            + self._operand_prep(mm2.inputs[1])
        return members

    def _reach(self, softmax: Node, forward: bool) -> Node | None:
        """The nearest MatMul after (before) ``softmax`` through pointwise, layout and reduction ops."""
        frontier, seen = [softmax], set()
        for _ in range(12):
            following = []
            for node in frontier:
                if forward:
                    nxt = [u for o in node.outputs for u in o.users()]
                else:
                    act = _widest_activation(node)
                    nxt = [act.producer] if act is not None and act.producer is not None else []
                for n in nxt:
                    if id(n) in seen:
                        continue
                    seen.add(id(n))
                    if n.op == "MatMul" and (not forward or n.inputs[0] is not None and n.inputs[0].producer is node):
                        return n
                    if _kind(n) in POINTWISE + (_R,) or n.op in LAYOUT:
                        following.append(n)
            frontier = following
            if not frontier:
                return None
        return None

    def _closure(self, start: Node, forward: bool, bound: int) -> set[int]:
        found, stack = set(), [start]
        while stack:
            node = stack.pop()
            if id(node) in found:
                continue
            position = self.index[id(node)]
            if (forward and position > bound) or (not forward and position < bound):
                continue
            found.add(id(node))
            if forward:
                stack.extend(u for o in node.outputs for u in o.users())
            else:
                stack.extend(v.producer for v in node.inputs if v is not None and v.producer is not None)
        return found

    def _operand_prep(self, v: Value | None) -> list[Node]:
        """Single-use layout ops and constant scalings that only prepare an attention operand (K^T, heads)."""
        prep = []
        while v is not None and v.producer is not None and len(v.uses) == 1 and len(prep) < 4:
            p = v.producer
            if not self.free(p) or not (p.op in LAYOUT or (_kind(p) in POINTWISE and
                                                          sum(i is not None and i.data is None for i in p.inputs) == 1)):
                break
            prep.append(p)
            v = next(i for i in p.inputs if i is not None and i.data is None)
        return prep

    def expert(self, mul: Node) -> list[Node] | None:
        out = mul.outputs[0]
        if len(out.uses) != 1 or out.uses[0][0].op != "MatMul" or out.uses[0][1] != 0:
            return None
        down = out.uses[0][0]
        a, b = mul.inputs
        for act_side, up_side in ((a, b), (b, a)):
            up = up_side.producer if up_side is not None else None
            if up is None or up.op != "MatMul" or not self.free(up) or len(up_side.uses) != 1:
                continue
            chain = self._activation_chain(act_side, up.inputs[0])
            if chain is not None and self.free(down):
                return [up, mul, down] + chain
        return None

    def _activation_chain(self, v: Value | None, x: Value) -> list[Node] | None:
        """Nodes between a gate MatMul(x, W) and ``v``: pointwise ops only, the MatMul included."""
        found, stack, seen = [], [v], set()
        gate = None
        while stack:
            value = stack.pop()
            p = value.producer if value is not None else None
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if not self.free(p):
                return None
            if p.op == "MatMul":
                if p.inputs[0] is not x or gate is not None:
                    return None
                gate = p
                found.append(p)
                continue
            if _kind(p) not in POINTWISE or len(found) > 8:
                return None
            found.append(p)
            stack.extend(i for i in p.inputs if i is not None and i.data is None)
        return found if gate is not None else None

    # --- driver -------------------------------------------------------------------------------
    def run(self) -> None:
        nodes = self.graph.nodes
        for node in nodes:
            if node.op == "Softmax" and self.free(node):
                found = self.attention(node)
                if found and self.convex(found):
                    self.add_group("attention", found)
        for node in nodes:
            if node.op == "Mul" and self.free(node):
                found = self.expert(node)
                if found and self.convex(found):
                    self.add_group("expert", found)
        for node in nodes:
            if self.free(node) and _kind(node) is _C:
                self.add_group("contraction", self.grow([node], POINTWISE, upward=False))
        for node in nodes:
            if self.free(node) and _kind(node) is _R:
                self.add_group("reduction", self.grow([node], POINTWISE + (_R,), upward=True))
        for node in nodes:
            if self.free(node) and _kind(node) in POINTWISE:
                self.add_group("elementwise", self.grow([node], POINTWISE, upward=True))

    def convex(self, nodes: list[Node]) -> bool:
        members = {id(n) for n in nodes}
        lowest = min(self.index[i] for i in members)
        return all(self.can_join(n, members, lowest) for n in nodes)


def _fits(node: Node, kinds: tuple[FusionKind, ...]) -> bool:
    return node.op in LAYOUT or _kind(node) in kinds


def _widest_activation(node: Node) -> Value | None:
    """The operand of a pointwise op that carries the activation (the largest non-constant one)."""
    best, best_size = None, -1
    for v in node.inputs:
        if v is None or v.data is not None:
            continue
        size = v.type.numel() if v.type is not None and v.type.numel() is not None else 0
        if size > best_size:
            best, best_size = v, size
    return best


def build_group(graph: Graph, kind: str, members: list[Node], name: str) -> Node:
    """Replace ``members`` (convex, in topological order) by one group node holding them as its body."""
    body, external, escaping = extract_subgraph(graph, members, name, weights_as_inputs=True)
    for node in body.nodes:
        node.meta.clear()  # placement and scheduling annotate the group, not its members
    outputs = [Value(v.name, v.type) for v in escaping]
    group = Node(GROUP_OP, external, outputs, {"kind": kind, "body": body}, members[0].loc)
    # where the last member stood; fuse sorts the graph once after all its groups
    return graph.replace(members, group, dict(zip(escaping, outputs)), reorder=False)


@register_pass("fuse", needs=(), provides=())
def fuse(graph: Graph, options=None) -> PassResult:
    fusion = _Fusion(graph)
    fusion.run()
    if not fusion.groups:
        return PassResult(graph, False)
    existing = sum(1 for n in graph.nodes if n.op == GROUP_OP)
    for number, (kind, members) in enumerate(fusion.groups, start=existing):
        build_group(graph, kind, members, f"{kind}_{number}")
    graph.topological_sort()
    return PassResult(graph, True)
