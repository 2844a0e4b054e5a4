"""place: a device for every top-level node (fused group or lone op), and for split contractions, per part.

Policies:

* ``roofline``: each node, in graph order, to the device that runs it fastest (Duplex's rule),
  counting the copies its inputs would need from where their producers went: a small op
  between two GPU ops stays on the GPU rather than saving 5 us on the CPU and paying two
  PCIe copies.
* ``optimal``: the minimum predicted makespan with transfer and sync costs, each
  device running its nodes in graph order; exact with OR-Tools CP-SAT under a time
  limit, hinted with the roofline plan, and never worse than roofline or any
  single-device plan (the best of them is kept, and the report says which won).
  CP-SAT runs with one worker, a fixed seed and a deterministic-time limit
  (``DTIME_PER_SECOND`` x the time limit), so the same graph and platform give the
  same plan on every run and machine; the wall clock (``WALL_FACTOR`` x the limit
  + ``WALL_SLACK`` s) is only a safety net. A plan cut short by either says so in the
  report's ``solver`` text, ``limit_hit`` and ``limit`` ("wall" when it may differ between runs).
* ``split``: ``optimal``, then every MatMul/Gemm that gains from it is split across
  its two fastest devices, by weight columns (decode: few rows) or by activation
  rows (prefill), with HeteroInfer's rule: min(max(T_a(r), T_b(1-r)) + sync + copy,
  T_a(all), T_b(all)) over r in eighths.

Every decision is recorded in ``node.meta``: ``device`` and ``reason`` (the times it
compared). Values crossing memories that are not unified get a ``hetflow.transfer``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from hetflow.ir import Graph, Node, TensorType, Value
from hetflow.ir.errors import HetflowError
from hetflow.ir.symbolic import describe_ranges, sized_at_max
from hetflow.platform import Platform

from .cost import NodeCost, cost_node, device_time_parts
from .schedule import TRANSFER_OP, static_makespan

POLICIES = ("roofline", "optimal", "split")
SPLIT_STEPS = 8
# CP-SAT's deterministic time per second of time limit: its deterministic time advanced 0.16-0.25
# per wall second on placement models on this 2-core machine, so a limit of S seconds is reached
# in about S/2 s here (S at twice the load); the wall clock stops it at WALL_FACTOR x S + WALL_SLACK s.
DTIME_PER_SECOND = 0.1
WALL_FACTOR, WALL_SLACK = 3.0, 1.0
SEED = 0


class PlacementError(HetflowError):
    pass


@dataclass
class PlacementReport:
    policy: str
    platform: str
    costs: list[NodeCost] = field(default_factory=list)
    static_makespan: dict[str, float] = field(default_factory=dict)  # plan -> seconds (no contention)
    chosen: str = ""
    solver: str = ""  # what CP-SAT did and which plan was kept: deterministic (no times), written to the manifest
    splits: list[dict] = field(default_factory=list)
    limit_hit: bool = False  # a limit cut CP-SAT short: the plan is the best found, not proved optimal
    limit: str = ""  # which: "budget" (the deterministic limit: the same every run) or "wall" (the clock)
    solve_seconds: float = 0.0  # wall time of the search: for the report only, never the artifact
    cost_model: str = "analytic"  # "sim": NPU/PIM groups timed by emitting them and running their simulator

    def cost_model_line(self) -> str:
        """Which cost model timed the groups, in one line for the report."""
        if self.cost_model != "sim":
            return "cost model: analytic (roofline per group, the papers' quirks; --cost-model sim asks the simulators)"
        simulated: dict[str, int] = {}
        declined = 0
        for cost in self.costs:
            for device in ({} if cost.flash else cost.simulated):
                simulated[device] = simulated.get(device, 0) + 1
            declined += len(cost.declined)
        where = ", ".join(f"{n} on {d}" for d, n in sorted(simulated.items())) or "none"
        return (f"cost model: sim (candidate times from the simulators: {where}; "
                f"{declined} declined by their backend, analytic time used; other devices analytic)")


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e6:.0f}us" if seconds < 1e-2 else f"{seconds * 1e3:.2f}ms"


def _reason(cost: NodeCost, chosen: str) -> str:
    ordered = sorted(cost.times.items(), key=lambda kv: kv[1])
    text = " < ".join(f"{d} {_fmt(t)}" for d, t in ordered)
    if chosen != ordered[0][0]:
        text = f"{chosen} keeps the makespan lowest ({text})"
    if cost.unsupported:
        text += "; " + "; ".join(cost.unsupported.values())
    return text


def check_supported(costs: list[NodeCost], platform: Platform) -> None:
    for cost in costs:
        if not cost.times:
            reasons = "; ".join(cost.unsupported.values())
            raise PlacementError(f"op {cost.ops} ({cost.node.describe()}) is supported by no device of platform "
                                 f"{platform.name!r}: {reasons}")


def check_memory_fits(graph: Graph, platform: Platform, assignment: dict[int, str]) -> None:
    """Weights must fit the memory of the devices that read them (flash streaming lifts this later)."""
    need: dict[str, list] = {}
    for node in graph.nodes:
        memory = platform.devices[assignment[id(node)]].memory
        for v in node.inputs:
            if v is not None and v.data is not None:
                need.setdefault(memory, {})[v.name] = v
    for memory, weights in need.items():
        total = sum(w.type.nbytes() or 0 for w in weights.values())
        capacity = platform.memories[memory].capacity
        if total > capacity:
            largest = max(weights.values(), key=lambda w: w.type.nbytes() or 0)
            from hetflow.platform import human_bytes
            raise PlacementError(f"the model's weights need {human_bytes(total)} in memory {memory!r} of platform "
                                 f"{platform.name!r}, which holds {human_bytes(capacity)} (largest tensor: "
                                 f"%{largest.name}: {largest.type}, {human_bytes(largest.type.nbytes())})")


# --- the static model shared by optimal and the brute-force check ----------------------------------

@dataclass
class PlacementProblem:
    order: list[int]
    times: dict[int, dict[str, float]]
    preds: dict[int, list[tuple[int, float]]]
    platform: Platform

    def comm(self, pred: int, node: int, nbytes: float, assignment: dict[int, str]) -> float:
        return self.copy_cost(assignment[pred], assignment[node], nbytes)

    def copy_cost(self, src: str, dst: str, nbytes: float) -> float:
        return self.platform.sync + self.platform.transfer_time(src, dst, nbytes)

    def makespan(self, assignment: dict[int, str]) -> float:
        return static_makespan(self.order, assignment, self.times, self.preds,
                               lambda p, i, n: self.comm(p, i, n, assignment))


def placement_problem(graph: Graph, costs: list[NodeCost], platform: Platform) -> PlacementProblem:
    index = {id(c.node): i for i, c in enumerate(costs)}
    preds: dict[int, list[tuple[int, float]]] = {}
    for i, cost in enumerate(costs):
        for v in cost.node.inputs:
            if v is not None and v.producer is not None and id(v.producer) in index:
                preds.setdefault(i, []).append((index[id(v.producer)], float(v.type.nbytes() or 0)))
    return PlacementProblem(list(range(len(costs))), {i: dict(c.times) for i, c in enumerate(costs)}, preds, platform)


NOTE_BUDGET = "best found within the deterministic limit, not proved optimal"
NOTE_WALL = ("best found before the wall-clock time limit, not proved optimal: cut short by the clock, "
             "the plan may differ between runs")


def solve_optimal(problem: PlacementProblem, hint: dict[int, str], time_limit: float,
                  ) -> tuple[dict[int, str] | None, str, str]:
    """CP-SAT: choose a device per node, minimise the makespan (fixed per-device order, exact comm costs).

    Returns (assignment, or None when it found none; what happened; limit): limit is "" (proved
    optimal), "budget" (the deterministic limit, ``DTIME_PER_SECOND`` x ``time_limit``, cut it short:
    the same result every run) or "wall" (the wall-clock safety net did: the result may differ
    between runs). One worker and a fixed seed: CP-SAT with several workers returns whichever of
    equally good plans a thread found first, so its plans differ between runs even when proved
    optimal."""
    from ortools.sat.python import cp_model
    scale = 1e9  # nanoseconds
    n = len(problem.order)
    devices = sorted({d for t in problem.times.values() for d in t})
    model = cp_model.CpModel()
    horizon = int(sum(max(t.values()) for t in problem.times.values()) * scale) + 1
    for i in problem.order:
        for p, nbytes in problem.preds.get(i, []):
            worst = max((problem.platform.sync + problem.platform.transfer_time(a, b, nbytes)
                         for a in problem.times[p] for b in problem.times[i] if a != b), default=0.0)
            horizon += int(worst * scale) + 1
    on = {(i, d): model.NewBoolVar(f"on_{i}_{d}") for i in problem.order for d in problem.times[i]}
    start = {i: model.NewIntVar(0, horizon, f"s{i}") for i in problem.order}
    end = {i: model.NewIntVar(0, horizon, f"e{i}") for i in problem.order}
    for i in problem.order:
        model.AddExactlyOne(on[i, d] for d in problem.times[i])
        model.Add(end[i] == start[i] + sum(int(round(t * scale)) * on[i, d] for d, t in problem.times[i].items()))
    for i in problem.order:
        for p, nbytes in problem.preds.get(i, []):
            for a in problem.times[p]:
                for b in problem.times[i]:
                    delay = 0 if a == b else int(round((problem.platform.sync +
                                                        problem.platform.transfer_time(a, b, nbytes)) * scale))
                    model.Add(start[i] >= end[p] + delay).OnlyEnforceIf([on[p, a], on[i, b]])
    for d in devices:
        members = [i for i in problem.order if d in problem.times[i]]
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                i, j = members[x], members[y]
                model.Add(start[j] >= end[i]).OnlyEnforceIf([on[i, d], on[j, d]])
    makespan = model.NewIntVar(0, horizon, "makespan")
    model.AddMaxEquality(makespan, list(end.values()))
    model.Minimize(makespan)
    for i, d in hint.items():
        for dd in problem.times[i]:
            model.AddHint(on[i, dd], dd == d)
    solver = cp_model.CpSolver()
    dtime = max(time_limit * DTIME_PER_SECOND, 1e-4)
    solver.parameters.max_deterministic_time = dtime
    solver.parameters.max_time_in_seconds = WALL_FACTOR * time_limit + WALL_SLACK
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = SEED
    status = solver.Solve(model)
    limit = ""
    if status != cp_model.OPTIMAL:
        limit = "budget" if solver.deterministic_time >= 0.999 * dtime else "wall"
    budget = f"deterministic time {dtime:g} for a {time_limit:g} s time limit"
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        why = "before the wall-clock time limit (may differ between runs)" if limit == "wall" else f"within its {budget}"
        return None, f"CP-SAT found no plan {why}", limit
    assignment = {i: next(d for d in problem.times[i] if solver.Value(on[i, d])) for i in problem.order}
    if status == cp_model.OPTIMAL:
        return assignment, f"CP-SAT optimal ({n} nodes)", limit
    note = NOTE_WALL if limit == "wall" else f"{NOTE_BUDGET} ({budget})"
    return assignment, f"CP-SAT {note} ({n} nodes)", limit


# --- splitting one contraction across two devices --------------------------------------------------

def _split_candidate(node: Node) -> tuple[str, int, int] | None:
    """('rows' | 'cols', M, N) for a plain MatMul/Gemm with a constant weight, else None."""
    if node.op not in ("MatMul", "Gemm") or node.inputs[1] is None or node.inputs[1].data is None:
        return None
    if node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("transB", 0)):
        return None
    x, out = node.inputs[0].type, node.outputs[0].type
    if x is None or out is None or not out.is_static or len(out.shape) < 2 or node.inputs[1].data.ndim != 2:
        return None
    m, n = int(np.prod(out.shape[:-1])), out.shape[-1]
    return ("rows" if m >= 64 else "cols"), m, n


def _part_time(node: Node, device, dim: str, share: float, cost: NodeCost, platform: Platform) -> float:
    """Time of the part of ``node`` computing ``share`` of its columns (or rows), both parts streaming at once."""
    compute, bandwidth = device_time_parts(node, device, cost.bytes, cost.dtype)
    weight = node.inputs[1].type.nbytes() or 0
    other = cost.bytes - weight
    moved = (weight + other) * share if dim == "cols" else weight + other * share
    concurrent = platform.memories[device.memory].achievable_total(2) / 2
    return max(compute * share, moved / min(bandwidth, concurrent)) + device.analytic().launch_for(1)


def best_split(node: Node, cost: NodeCost, platform: Platform) -> dict | None:
    found = _split_candidate(node)
    if found is None or len(cost.times) < 2:
        return None
    dim, m, n = found
    a, b = sorted(cost.times, key=cost.times.get)[:2]
    da, db = platform.devices[a], platform.devices[b]
    copy = 0.0 if not platform.needs_transfer(b, a) else platform.transfer_time(b, a, cost.bytes / 2)
    options = {(a, SPLIT_STEPS): cost.times[a], (a, 0): cost.times[b] + platform.sync + copy}
    for k in range(1, SPLIT_STEPS):
        r = k / SPLIT_STEPS
        options[(a, k)] = max(_part_time(node, da, dim, r, cost, platform),
                              _part_time(node, db, dim, 1 - r, cost, platform)) + platform.sync + copy
    (first, k), best = min(options.items(), key=lambda kv: kv[1])
    return {"node": node.outputs[0].name, "dim": dim, "devices": [a, b], "eighths_on_first": k,
            "time": best, "alone": {a: cost.times[a], b: cost.times[b]},
            "options": {f"{kk}/8": t for (_, kk), t in sorted(options.items(), key=lambda kv: kv[0][1])}}


def apply_split(graph: Graph, node: Node, decision: dict) -> None:
    """Rewrite ``node`` into two parts on two devices and a Concat."""
    a, b = decision["devices"]
    k = decision["eighths_on_first"]
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    out = node.outputs[0]
    dtype = out.type.dtype
    name = out.name
    if decision["dim"] == "cols":
        n = out.type.shape[-1]
        cut = max(1, min(n - 1, round(n * k / SPLIT_STEPS)))
        parts = []
        for device, (lo, hi) in ((a, (0, cut)), (b, (cut, n))):
            wp = graph.add_weight(graph.fresh_name(f"{w.name}_cols{lo}_{hi}"), w.data[:, lo:hi])
            ins = [x, wp]
            if bias is not None and bias.data is not None:
                ins.append(graph.add_weight(graph.fresh_name(f"{bias.name}_{lo}_{hi}"),
                                            bias.data[..., lo:hi] if bias.data.ndim else bias.data))
            shape = tuple(out.type.shape[:-1]) + (hi - lo,)
            part = graph.add_node(node.op, ins, [TensorType(dtype, shape)], dict(node.attrs), node.loc,
                                  output_names=[f"{name}_part"], before=node,
                                  meta={"device": device, "split": f"{hi - lo}/{n} columns"})
            parts.append(part.outputs[0])
        axis = -1
    else:
        m = out.type.shape[-2]
        cut = max(1, min(m - 1, round(m * k / SPLIT_STEPS)))
        parts = []
        for device, (lo, hi) in ((a, (0, cut)), (b, (cut, m))):
            starts = graph.add_weight(graph.fresh_name("slice_start"), np.array([lo], np.int64))
            ends = graph.add_weight(graph.fresh_name("slice_end"), np.array([hi], np.int64))
            axes = graph.add_weight(graph.fresh_name("slice_axis"), np.array([-2], np.int64))
            xshape = tuple(x.type.shape[:-2]) + (hi - lo, x.type.shape[-1])
            xs = graph.add_node("Slice", [x, starts, ends, axes], [TensorType(x.type.dtype, xshape)], loc=node.loc,
                                output_names=[f"{name}_rows{lo}"], before=node, meta={"device": device})
            shape = tuple(out.type.shape[:-2]) + (hi - lo, out.type.shape[-1])
            part = graph.add_node(node.op, [xs.outputs[0]] + list(node.inputs[1:]), [TensorType(dtype, shape)],
                                  dict(node.attrs), node.loc, output_names=[f"{name}_part"], before=node,
                                  meta={"device": device, "split": f"{hi - lo}/{m} rows"})
            parts.append(part.outputs[0])
        axis = -2
    joined = Value(name, out.type)  # takes the original name back
    concat = Node("Concat", parts, [joined], {"axis": axis}, node.loc,
                  meta={"device": a, "reason": "joins the split parts (in place in unified memory)"})
    graph.replace([node], concat, {out: joined})


# --- transfers ---------------------------------------------------------------------------------------

def insert_transfers(graph: Graph, platform: Platform) -> int:
    """A hetflow.transfer on every edge between devices whose memories are not one unified space."""
    inserted = 0
    copies: dict[tuple[int, str], object] = {}  # (value, destination memory) -> the copy there: one per value
    for node in list(graph.nodes):
        device = node.meta.get("device")
        if device is None or node.op == TRANSFER_OP:
            continue
        for index, v in enumerate(node.inputs):
            if v is None or v.producer is None or "device" not in v.producer.meta:
                continue
            src = v.producer.meta["device"]
            if src == device or not platform.needs_transfer(src, device):
                continue
            a, b = platform.devices[src].memory, platform.devices[device].memory
            copy = copies.get((id(v), b))
            if copy is None:  # the first reader's copy comes before every later reader (graph order)
                copy = copies[(id(v), b)] = graph.add_node(
                    TRANSFER_OP, [v], [v.type], {"src": a, "dst": b}, node.loc, output_names=[f"{v.name}_to_{b}"],
                    before=node, meta={"device": f"link:{a}->{b}"})
                inserted += 1
            node.set_input(index, copy.outputs[0])
    return inserted


# --- the pass ----------------------------------------------------------------------------------------

def roofline_assignment(problem: PlacementProblem) -> dict[int, str]:
    """Each node to its fastest device, the copies of its inputs from where their producers went counted."""
    platform = problem.platform
    assignment: dict[int, str] = {}
    for i in problem.order:
        def total(device: str) -> float:
            seconds = problem.times[i][device]
            for pred, nbytes in problem.preds.get(i, []):
                if platform.needs_transfer(assignment[pred], device):
                    seconds += problem.copy_cost(assignment[pred], device, nbytes)
            return seconds
        assignment[i] = min(problem.times[i], key=lambda d: (total(d), problem.times[i][d]))
    return assignment


def restrict(platform: Platform, devices: list[str] | None) -> Platform:
    """The platform with only ``devices`` (e.g. HeteroInfer's GPU + NPU without the CPU)."""
    if not devices:
        return platform
    import dataclasses
    for d in devices:
        platform.device(d)
    return dataclasses.replace(platform, devices={d: platform.devices[d] for d in devices})


def place_graph(graph: Graph, platform: Platform, policy: str = "roofline", time_limit: float = 10.0,
                devices: list[str] | None = None, cost_model: str = "analytic") -> PlacementReport:
    if policy not in POLICIES:
        raise PlacementError(f"unknown placement policy {policy!r}; choose one of {', '.join(POLICIES)}")
    platform = restrict(platform, devices)
    if policy == "split" and graph.dims:
        raise PlacementError(f"placement 'split' fixes each part's rows at compile time, and this graph has "
                             f"dynamic sizes ({describe_ranges(graph.dims)}): use roofline or optimal")
    with sized_at_max(graph):  # a dynamic graph is placed for its declared maximum
        report = _place_at_fixed_sizes(graph, platform, policy, time_limit, cost_model)
    insert_transfers(graph, platform)
    return report


def _place_at_fixed_sizes(graph: Graph, platform: Platform, policy: str, time_limit: float,
                          cost_model: str = "analytic") -> PlacementReport:
    costs = [cost_node(node, platform, graph.opset, cost_model, graph) for node in graph.nodes]
    check_supported(costs, platform)
    report = PlacementReport(policy, platform.name, costs, cost_model=cost_model)
    problem = placement_problem(graph, costs, platform)
    roofline = roofline_assignment(problem)
    assignment = roofline
    if policy in ("optimal", "split") and len(platform.devices) > 1:
        candidates = {"roofline": roofline}
        for d in platform.devices:
            if all(d in c.times for c in costs):
                candidates[f"all on {d}"] = {i: d for i in range(len(costs))}
        started = time.perf_counter()
        solved, report.solver, report.limit = solve_optimal(problem, roofline, time_limit)
        report.limit_hit = bool(report.limit)
        if solved is not None:
            candidates["optimal"] = solved
        report.static_makespan = {k: problem.makespan(v) for k, v in candidates.items()}
        report.chosen = min(report.static_makespan, key=lambda k: (report.static_makespan[k], k != "optimal"))
        assignment = candidates[report.chosen]
        report.solver += f"; kept {report.chosen!r}"
        report.solve_seconds = time.perf_counter() - started
    else:
        report.chosen = "roofline"
    check_memory_fits(graph, platform, {id(c.node): assignment[i] for i, c in enumerate(costs)})
    for i, cost in enumerate(costs):
        cost.node.meta["device"] = assignment[i]
        cost.node.meta["reason"] = _reason(cost, assignment[i])
    if policy == "split":
        for cost in costs:
            decision = best_split(cost.node, cost, platform)
            if decision and 0 < decision["eighths_on_first"] < SPLIT_STEPS:
                report.splits.append(decision)
                apply_split(graph, cost.node, decision)
    return report
