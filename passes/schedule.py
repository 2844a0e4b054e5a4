"""schedule: a queue per device and an event-driven simulation of the platform: the predicted timeline.

Each device runs its nodes one at a time in the graph's (topological) order. A
node starts when its device is free and its inputs are ready; an input from
another device adds the platform's flag-sync cost, and explicit transfer nodes
run on the link between two memories. While several devices stream from one
memory at once they share its achievable bandwidth (the platform's
shared-bandwidth curve): a fluid model recomputes every running node's rate
whenever one starts or ends. Everything here is modelled, not measured.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hetflow.ir import Graph, Node
from hetflow.platform import Platform

from .cost import NodeCost, cost_node, inner_nodes, time_parts

TRANSFER_OP = "hetflow.transfer"


@dataclass
class Event:
    name: str
    device: str
    start: float
    end: float
    kind: str
    ops: str
    flops: int = 0
    bytes: int = 0

    def as_dict(self) -> dict:
        return {"name": self.name, "device": self.device, "start_us": self.start * 1e6, "end_us": self.end * 1e6,
                "kind": self.kind, "ops": self.ops, "flops": self.flops, "bytes": self.bytes}


@dataclass
class Schedule:
    platform: str
    events: list[Event] = field(default_factory=list)

    @property
    def makespan(self) -> float:
        return max((e.end for e in self.events), default=0.0)

    def busy(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for e in self.events:
            totals[e.device] = totals.get(e.device, 0.0) + e.end - e.start
        return totals

    def as_dict(self) -> dict:
        return {"platform": self.platform, "makespan_us": self.makespan * 1e6, "modelled": True,
                "events": [e.as_dict() for e in self.events]}

    @staticmethod
    def from_dict(data: dict) -> "Schedule":
        """The inverse of ``as_dict`` (what an artifact's manifest stores)."""
        return Schedule(data["platform"], [Event(e["name"], e["device"], e["start_us"] / 1e6, e["end_us"] / 1e6,
                                                 e["kind"], e["ops"], e["flops"], e["bytes"])
                                           for e in data["events"]])


@dataclass
class _Task:
    node: Node
    device: str
    memory: str | None      # memory it streams from (None for a link transfer)
    launch: float
    compute: float
    bytes: float
    bandwidth: float        # its own ceiling (device or link)
    cost: NodeCost | None
    preds: list[tuple[int, float]] = field(default_factory=list)  # (task index, extra delay)
    ready: float = 0.0
    start: float = -1.0
    work_start: float = -1.0
    remaining: float = 1.0
    end: float = -1.0


def _tasks(graph: Graph, platform: Platform, costs: dict[int, NodeCost]) -> list[_Task]:
    tasks: list[_Task] = []
    producer_task: dict[int, int] = {}
    for node in graph.nodes:
        device = node.meta.get("device")
        if node.op == TRANSFER_OP:
            link = next(l for l in platform.links if {l.src, l.dst} == {node.attrs["src"], node.attrs["dst"]})
            nbytes = node.outputs[0].type.nbytes() or 0
            task = _Task(node, f"link:{link.name}", None, link.latency, 0.0, nbytes, link.bandwidth, None)
        else:
            if device is None:
                raise ValueError(f"{node.describe()} has no device: run place before schedule")
            cost = costs.get(id(node)) or cost_node(node, platform)
            compute, bandwidth = time_parts(cost, device, platform.devices[device])
            spec = platform.devices[device]
            task = _Task(node, device, spec.memory, spec.analytic().launch_for(len(inner_nodes(node))), compute,
                         cost.bytes, bandwidth, cost)
        for v in node.inputs:
            if v is None or id(v) not in producer_task:
                continue
            pred = producer_task[id(v)]
            cross = tasks[pred].device != task.device and not task.device.startswith("link:") \
                and not tasks[pred].device.startswith("link:")
            task.preds.append((pred, platform.sync if cross else 0.0))
        index = len(tasks)
        tasks.append(task)
        for out in node.outputs:
            producer_task[id(out)] = index
    return tasks


def simulate(graph: Graph, platform: Platform, costs: dict[int, NodeCost] | None = None) -> Schedule:
    """The predicted timeline of a placed graph (every top-level node has meta['device'])."""
    tasks = _tasks(graph, platform, costs or {})
    queues: dict[str, list[int]] = {}
    for index, task in enumerate(tasks):
        queues.setdefault(task.device, []).append(index)
    heads = {d: 0 for d in queues}
    running: dict[str, int] = {}
    now = platform.call_overhead  # the runtime's entry: nothing starts before it
    done = 0
    while done < len(tasks):
        # start every task at the head of an idle device whose inputs are done
        for device, queue in queues.items():
            if device in running or heads[device] >= len(queue):
                continue
            task = tasks[queue[heads[device]]]
            if all(tasks[p].end >= 0 for p, _ in task.preds):
                task.ready = max([tasks[p].end + delay for p, delay in task.preds], default=platform.call_overhead)
                if task.ready <= now + 1e-15:
                    task.start = now
                    running[device] = queue[heads[device]]
                    heads[device] += 1
        # the next event: a launch ending, a task finishing, or a waiting task becoming ready
        rates = _rates(tasks, running, platform, now)
        candidates = []
        for device, index in running.items():
            task = tasks[index]
            if task.work_start < 0:
                candidates.append(task.start + task.launch)
            else:
                candidates.append(now + task.remaining / rates[index] if rates[index] > 0 else now)
        for device, queue in queues.items():
            if device not in running and heads[device] < len(queue):
                task = tasks[queue[heads[device]]]
                if all(tasks[p].end >= 0 for p, _ in task.preds):
                    candidates.append(max(tasks[p].end + d for p, d in task.preds) if task.preds else now)
        if not candidates:
            raise RuntimeError("schedule deadlock: a queue waits on a task that never starts")
        step = max(min(candidates), now)
        for device, index in list(running.items()):
            task = tasks[index]
            if task.work_start >= 0:
                rate = rates[index]
                task.remaining = 0.0 if rate == float("inf") else task.remaining - (step - now) * rate
        now = step
        for device, index in list(running.items()):
            task = tasks[index]
            if task.work_start < 0 and task.start + task.launch <= now + 1e-15:
                task.work_start = now
            elif task.work_start >= 0 and (task.remaining <= 1e-9 or _finished_at(now, task, rates.get(index))):
                task.end = now
                del running[device]
                done += 1
    schedule = Schedule(platform.name)
    for task in tasks:
        cost = task.cost
        schedule.events.append(Event(task.node.outputs[0].name, task.device, task.start, task.end,
                                     cost.kind if cost else "transfer", cost.ops if cost else TRANSFER_OP,
                                     cost.flops if cost else 0, int(task.bytes)))
        task.node.meta["start_us"] = round(task.start * 1e6, 3)
        task.node.meta["end_us"] = round(task.end * 1e6, 3)
    return schedule


def _finished_at(now: float, task: "_Task", rate: float | None) -> bool:
    """Whether what is left of ``task`` takes less time than the clock can still resolve at ``now`` (a
    femtosecond kernel late in the timeline: ``now + left == now`` would stall the simulation forever)."""
    if rate is None or rate == 0:
        return False
    if rate == float("inf"):
        return True
    return now + task.remaining / rate <= now


def _rates(tasks: list[_Task], running: dict[str, int], platform: Platform, now: float) -> dict[int, float]:
    """Progress per second of every running task in its work phase, sharing each memory's bandwidth."""
    streaming: dict[str, list[int]] = {}
    for index in running.values():
        task = tasks[index]
        if task.work_start >= 0 and task.memory is not None and task.bytes > 0:
            streaming.setdefault(task.memory, []).append(index)
    rates = {}
    for index in running.values():
        task = tasks[index]
        if task.work_start < 0:
            continue
        bandwidth = task.bandwidth
        if task.memory is not None and task.memory in streaming and len(streaming[task.memory]) > 1:
            group = streaming[task.memory]
            total = platform.memories[task.memory].achievable_total(len(group))
            bandwidth = min(bandwidth, total / len(group))
        duration = max(task.compute, task.bytes / bandwidth if bandwidth > 0 else 0.0)
        rates[index] = 1.0 / duration if duration > 0 else float("inf")
    return rates


def static_makespan(order: list[int], assignment: dict[int, str], times: dict[int, dict[str, float]],
                    preds: dict[int, list[tuple[int, float]]], comm) -> float:
    """Makespan without contention for an assignment, each device running its nodes in ``order``.

    ``comm(pred, node, bytes)`` gives the delay of an edge between different devices.
    """
    device_free: dict[str, float] = {}
    finish: dict[int, float] = {}
    for i in order:
        d = assignment[i]
        ready = 0.0
        for p, nbytes in preds.get(i, []):
            delay = comm(p, i, nbytes) if assignment[p] != d else 0.0
            ready = max(ready, finish[p] + delay)
        start = max(ready, device_free.get(d, 0.0))
        finish[i] = start + times[i][d]
        device_free[d] = finish[i]
    return max(finish.values(), default=0.0)
