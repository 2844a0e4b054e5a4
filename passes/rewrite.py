"""The local rewrite engine: rules applied to a fixed point, with a guard against endless rewriting.

A ``Rule`` looks at one node (optionally only nodes of some ops) and either
rewrites the graph around it and returns True, or returns False. ``rewrite`` sweeps
the graph in order, applying the first rule that fires on each live node, until a
whole sweep changes nothing; if that takes more than ``max_sweeps`` it raises,
naming the rules that were still firing (a pair of rules undoing each other).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable

from hetflow.ir import Graph, Node
from hetflow.ir.errors import HetflowError


class RewriteLimitError(HetflowError):
    pass


@dataclass(frozen=True)
class Rule:
    name: str
    apply: Callable[[Graph, Node], bool]
    ops: tuple[str, ...] | None = None  # None: every op


def _alive(node: Node) -> bool:
    return bool(node.outputs) and all(o.producer is node for o in node.outputs)


def rewrite(graph: Graph, rules: list[Rule], max_sweeps: int = 50) -> bool:
    """Apply ``rules`` until nothing changes; returns whether anything did."""
    by_op: dict[str, list[Rule]] = collections.defaultdict(list)
    generic = [r for r in rules if r.ops is None]
    for rule in rules:
        for op in rule.ops or ():
            by_op[op].append(rule)
    modified = False
    for _ in range(max_sweeps):
        fired: collections.Counter[str] = collections.Counter()
        for node in list(graph.nodes):
            if not _alive(node):
                continue
            for rule in by_op.get(node.op, []) + generic:
                if rule.apply(graph, node):
                    fired[rule.name] += 1
                    break
        if not fired:
            return modified
        modified = True
    still = ", ".join(f"{name} ({n}x)" for name, n in fired.most_common())
    raise RewriteLimitError(f"rewriting did not reach a fixed point after {max_sweeps} sweeps; "
                            f"rules still firing: {still}")
