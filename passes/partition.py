"""Partitions: the runs of consecutive top-level nodes on one device, as the runtime executes them.

A placed graph runs as a list of partitions, each a maximal run of consecutive
nodes (in the graph's order, which the schedule keeps) with the same
``meta['device']``; a transfer is a partition of its own on its link
(``link:src->dst``). One worker per device runs that device's partitions in index
order; a partition reading a value from another device waits for its flag. The
memory planner reasons about this order, the backends emit one program per
partition and the executor runs them: all three take the runs from here.
"""
from __future__ import annotations

from hetflow.ir import Graph, Node

TRANSFER_OP = "hetflow.transfer"


def device_runs(graph: Graph) -> list[tuple[str, list[Node]]]:
    """``[(device, nodes)]``: the partitions of a placed graph, in execution-index order."""
    runs: list[tuple[str, list[Node]]] = []
    for node in graph.nodes:
        device = node.meta.get("device", "cpu")
        if runs and runs[-1][0] == device and node.op != TRANSFER_OP and runs[-1][1][-1].op != TRANSFER_OP:
            runs[-1][1].append(node)
        else:
            runs.append((device, [node]))
    return runs
