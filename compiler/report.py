"""Human-readable summaries of a graph: what ``hetflow inspect`` and ``CompiledModel.report()`` print."""
from __future__ import annotations

from hetflow.ir import Graph, node_bytes, node_flops
from hetflow.ir.errors import HetflowError
from hetflow.platform import human_bytes  # noqa: F401  (report.human_bytes is public)


def human_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def graph_totals(graph: Graph) -> dict[str, int]:
    flops = moved = 0
    for node in graph.nodes:
        try:
            flops += node_flops(node)
            moved += node_bytes(node)
        except HetflowError:
            continue
    return {"nodes": len(graph.nodes), "flops": flops, "bytes": moved,
            "parameters": int(sum(w.data.size for w in graph.weights.values())),
            "parameter_bytes": graph.parameter_bytes()}


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return "\n".join(out)


def graph_summary(graph: Graph, platform: str | None = None, compile_seconds: float | None = None) -> str:
    totals = graph_totals(graph)
    lines = [f"graph {graph.name} (opset {graph.opset})" + (f" for platform {platform}" if platform else "")]
    for v in graph.inputs:
        lines.append(f"  input  %{v.name}: {v.type}")
    for v in graph.outputs:
        lines.append(f"  output %{v.name}: {v.type}")
    lines.append(f"  {totals['nodes']} nodes, {human_count(totals['parameters'])} parameters "
                 f"({human_bytes(totals['parameter_bytes'])}), {human_count(totals['flops'])}FLOP, "
                 f"{human_bytes(totals['bytes'])} moved across node and group boundaries")
    if compile_seconds is not None:
        lines.append(f"  compiled in {compile_seconds:.2f} s")
    counts = graph.op_counts()
    rows = [[op, str(n)] for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    lines.append("")
    lines.append(table(rows, ["op", "count"]))
    return "\n".join(lines)


def group_rows(graph: Graph) -> list[dict]:
    """One row per top-level node: fused groups with their kind and members, plain nodes as themselves."""
    rows = []
    for node in graph.nodes:
        try:
            flops, moved = node_flops(node), node_bytes(node)
        except HetflowError:
            flops, moved = 0, 0
        if node.op == "hetflow.group":
            body = node.attrs["body"]
            ops = ",".join(n.op for n in body.nodes)
            kind = node.attrs["kind"]
        else:
            ops, kind = node.op, "single"
        rows.append({"name": node.outputs[0].name, "kind": kind, "ops": ops, "flops": flops, "bytes": moved,
                     "intensity": flops / moved if moved else 0.0, "loc": node.loc})
    return rows


def group_table(graph: Graph, limit: int = 60) -> str:
    rows = [r for r in group_rows(graph) if r["kind"] != "single"]
    if not rows:
        return ""
    body = []
    for r in rows[:limit]:
        ops = r["ops"] if len(r["ops"]) <= 48 else r["ops"][:45] + "..."
        body.append([r["name"], r["kind"], ops, human_count(r["flops"]), human_bytes(r["bytes"]),
                     f"{r['intensity']:.1f}"])
    text = f"{len(rows)} fused groups (bytes: what crosses the group's boundary; Op/B = FLOPs per byte)\n"
    text += table(body, ["group", "kind", "ops", "FLOPs", "bytes", "Op/B"])
    if len(rows) > limit:
        text += f"\n... and {len(rows) - limit} more"
    return text


def _us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.1f} us" if us < 1000 else f"{us / 1e3:.2f} ms"


def placement_table(costs, limit: int = 80) -> str:
    """One row per placed node: its costs, device, predicted time and why (``costs``: NodeCost list)."""
    rows = []
    for cost in costs[:limit]:
        node = cost.node
        device = node.meta.get("device", "?")
        ops = cost.ops if len(cost.ops) <= 40 else cost.ops[:37] + "..."
        time_on = cost.times.get(device)
        shown = "-" if time_on is None else _us(time_on) + (" flash" if getattr(cost, "flash", False) else " sim" if device in getattr(cost, "simulated", {}) else "")
        rows.append([cost.name[:28], cost.kind, ops, human_count(cost.flops), human_bytes(cost.bytes),
                     f"{cost.intensity:.1f}", device, shown,
                     node.meta.get("reason", "")[:90]])
    text = table(rows, ["group", "kind", "ops", "FLOPs", "bytes", "Op/B", "device", "predicted", "why"])
    if len(costs) > limit:
        text += f"\n... and {len(costs) - limit} more"
    return text


def timeline_text(schedule, limit: int = 40) -> str:
    lines = [f"predicted makespan {_us(schedule.makespan)} on {schedule.platform} (modelled)"]
    busy = schedule.busy()
    for device, seconds in sorted(busy.items()):
        share = 100 * seconds / schedule.makespan if schedule.makespan else 0
        lines.append(f"  {device:14s} busy {_us(seconds):>10s} ({share:4.0f}% of the makespan)")
    rows = [[f"{e.start * 1e6:10.1f}", f"{e.end * 1e6:10.1f}", e.device, e.kind, e.name[:32]]
            for e in sorted(schedule.events, key=lambda e: e.start)[:limit]]
    if rows:
        lines.append(table(rows, ["start us", "end us", "device", "kind", "node"]))
    if limit and len(schedule.events) > limit:
        lines.append(f"... and {len(schedule.events) - limit} more events")
    return "\n".join(lines)


def provenance(platform) -> str:
    measured = [d.name for d in platform.devices.values() if d.measured]
    text = "Times are predicted by the cost model from the platform file's figures (modelled)"
    if measured:
        text += f"; the figures of {', '.join(measured)} were measured on this machine by calibration"
    return text + "."


def _space_limit(space) -> str:
    """"budget", "wall" or "" for one memory space's plan (its ``limit``, else read from its note)."""
    limit = getattr(space, "limit", None)
    if limit is not None:
        return limit
    from hetflow.passes import memplan
    note = space.note or ""
    if memplan.NOTE_WALL in note or memplan.NOTE_WALL_OPTIMAL in note:
        return "wall"
    return "budget" if getattr(space, "limit_hit", False) or memplan.NOTE_BUDGET in note else ""


def memory_table(report) -> str:
    rows = [[p.memory, str(p.buffers), human_bytes(p.size), human_bytes(p.lower_bound), f"{100 * p.gap:.2f}%",
             human_bytes(p.greedy), human_bytes(p.no_reuse), p.method + (f" ({p.note})" if p.note else "")]
            for p in report.spaces.values()]
    text = table(rows, ["memory", "buffers", "arena", "lower bound", "gap", "greedy", "no reuse", "method"])
    for p in report.spaces.values():
        limit = _space_limit(p)
        if limit:
            text += f"\n{p.memory}: {_LIMIT_LINE[limit]}"
    return text


_LIMIT_LINE = {
    "budget": "cut short by the search's deterministic budget: the best plan found, not proved optimal "
              "(the same plan every run; a larger --time-limit searches longer)",
    "wall": "cut short by the wall-clock time limit: the best plan found, not proved optimal, and it may differ "
            "between runs (the machine was slower than the deterministic budget assumes)",
}


def compile_report(graph: Graph, platform, placement, schedule, compile_seconds: float | None = None,
                   memory_plan=None, quantization=None, flash_plan=None,
                   timings: dict[str, float] | None = None) -> str:
    from hetflow.ir.symbolic import describe_ranges, max_nbytes, sized_at_max
    summary = graph_summary(graph, platform=platform.name, compile_seconds=compile_seconds)
    if graph.dims:  # a dynamic graph's counts at the declared maximum; its inputs and outputs as declared
        with sized_at_max(graph):
            at_max = graph_summary(graph, platform=platform.name, compile_seconds=compile_seconds)
        declared = [line for line in summary.splitlines() if line.startswith(("  input ", "  output "))]
        summary = "\n".join(declared.pop(0) if line.startswith(("  input ", "  output ")) and declared else line
                            for line in at_max.splitlines())
    parts = [summary]
    if graph.dims:
        unbounded = sum(1 for n in graph.nodes for o in n.outputs
                        if o.type is not None and max_nbytes(o.type, graph.dims) is None)
        parts.append(f"dynamic sizes: {describe_ranges(graph.dims)}; FLOPs, placement, timeline and memory plan are "
                     "for the maximum, and each call is checked against the ranges"
                     + (f"; {unbounded} values of a size known only at run time are allocated per call, "
                        "outside the plan" if unbounded else ""))
    if placement is not None:
        header = f"placement ({placement.policy}"
        if placement.solver:
            header += f"; {placement.solver}"
        if getattr(placement, "solve_seconds", 0.0):
            header += f"; {placement.solve_seconds:.2f} s"
        header += ")"
        limit = getattr(placement, "limit", "")
        if limit:
            header += "\nplacement " + _LIMIT_LINE[limit].replace("search's", "solver's")
        if hasattr(placement, "cost_model_line"):
            header += "\n" + placement.cost_model_line()
        parts.append(header + "\n" + placement_table(placement.costs))
        if placement.splits:
            for s in placement.splits:
                parts.append(f"split {s['node']} by {s['dim']}: {s['eighths_on_first']}/8 on {s['devices'][0]}, "
                             f"the rest on {s['devices'][1]} -> {_us(s['time'])} (alone: "
                             + ", ".join(f"{d} {_us(t)}" for d, t in s['alone'].items()) + ")")
    if quantization is not None:   # hetflow.passes.quantize.QuantizationReport
        parts.append(quantization.line())
    if flash_plan is not None:     # hetflow.passes.tile_flash.FlashTiling
        parts.append(flash_plan.describe())
    if memory_plan is not None and memory_plan.spaces:
        parts.append("memory plan (activations crossing groups; weights have their own region)\n"
                     + memory_table(memory_plan))
    if schedule is not None:
        parts.append("timeline\n" + timeline_text(schedule))
        parts.append(provenance(platform))
    if timings:
        parts.append("compile time per stage (wall, measured in this process)\n" + timings_table(timings))
    return "\n\n".join(parts)


def timings_table(timings: dict[str, float], cache=None) -> str:
    """``hetflow compile --timings``: each compile stage's wall time (ms) and share, in the order they ran."""
    total = sum(timings.values())
    width = max([len(name) for name in timings] + [len("stage")])
    lines = [f"{'stage':{width}s} {'ms':>10s} {'share':>6s}"]
    for name, seconds in timings.items():
        share = 100 * seconds / total if total else 0.0
        lines.append(f"{name:{width}s} {seconds * 1e3:10.1f} {share:5.1f}%")
    lines.append(f"{'total':{width}s} {total * 1e3:10.1f}")
    if cache is not None:
        lines.append(f"compile cache: {cache.status}" + (f" (key {cache.key[:16]}...)" if cache.key else ""))
    return "\n".join(lines)
