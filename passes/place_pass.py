"""The place and schedule passes: wrappers that read the platform and policy from CompileOptions."""
from __future__ import annotations

from hetflow.ir import Graph
from hetflow.ir.symbolic import sized_at_max

from .base import CompileOptions, PassResult, register_pass
from .place import place_graph
from .schedule import simulate


@register_pass("place", needs=(), provides=("device", "reason", "split"),
               provides_results=("placement",))
def place(graph: Graph, options: CompileOptions | None = None) -> PassResult:
    options = options or CompileOptions()
    platform = options.resolved_platform()
    before = [(n.op, n.meta.get("device")) for n in graph.nodes]
    report = place_graph(graph, platform, options.placement, options.time_limit, options.devices,
                         options.cost_model)
    options.results["placement"] = report
    return PassResult(graph, [(n.op, n.meta.get("device")) for n in graph.nodes] != before)


@register_pass("schedule", needs=("device",), provides=("start_us", "end_us"),
               provides_results=("schedule",))
def schedule(graph: Graph, options: CompileOptions | None = None) -> PassResult:
    options = options or CompileOptions()
    platform = options.resolved_platform()
    if options.devices:
        from .place import restrict
        platform = restrict(platform, options.devices)
    before = [dict(n.meta) for n in graph.nodes]
    placement = options.results.get("placement")
    # the times placement chose by (the simulators' under cost_model="sim"), for the nodes it placed
    costs = {id(c.node): c for c in placement.costs} if placement is not None else {}
    with sized_at_max(graph):  # a dynamic graph's timeline at its declared maximum
        options.results["schedule"] = simulate(graph, platform, costs)
    return PassResult(graph, [n.meta for n in graph.nodes] != before)
