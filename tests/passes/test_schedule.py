"""passes/schedule.py's simulate on hand-placed graphs and tiny platforms, against hand-computed timelines.

Nearly every node here is a Relu over f32 values on devices with a 1 PFLOP/s peak, so each is memory-bound and
its time is ``bytes / bandwidth + launch`` exactly: a Relu over 1000 floats moves 8000 bytes, 8 us at
1 GB/s, plus a 2 us launch: 10 us.
"""
from __future__ import annotations

import pytest

from hetflow.ir import DType, Graph, TensorType, infer_types
from hetflow.passes.place import insert_transfers
from hetflow.passes.schedule import Schedule, simulate
from hetflow.platform import platform_from_dict

US = 1e-6
DEVICE = {"kind": "cpu", "peak": {"f32": "1 PFLOP/s"}, "bandwidth": "1 GB/s", "launch": "2 us"}


def us(value: float):
    return pytest.approx(value * US, rel=1e-9, abs=1e-15)


def platform(memories: dict, devices: dict, **extra):
    """``devices``: name -> memory name, or (memory name, overrides)."""
    device = {}
    for name, spec in devices.items():
        memory, overrides = (spec, {}) if isinstance(spec, str) else spec
        device[name] = {**DEVICE, "memory": memory, **overrides}
    memory = {name: {"capacity": "1 GiB", "bandwidth": "1 GB/s", **spec} for name, spec in memories.items()}
    return platform_from_dict({"name": "tiny", "sync": {"flag": "5 us"}, "memory": memory, "device": device,
                               **extra})


def two_memories(**extra):
    """d0 on m0 and d1 on m1: no contention between them."""
    return platform({"m0": {}, "m1": {}}, {"d0": "m0", "d1": "m1"}, **extra)


def placed(graph: Graph, op: str, inputs, device: str, name: str):
    node = graph.add_node(op, inputs, [None], output_names=[name], meta={"device": device})
    node.outputs[0].type = infer_types(node, graph.opset)[0]
    return node.outputs[0]


def relu(graph: Graph, value, device: str, name: str):
    return placed(graph, "Relu", [value], device, name)


def floats(graph: Graph, name: str, n: int = 1000):
    return graph.add_input(name, TensorType(DType.f32, (n,)))


def timeline(schedule: Schedule) -> dict[str, tuple[float, float]]:
    return {e.name: (e.start, e.end) for e in schedule.events}


def test_one_node_costs_bytes_over_bandwidth_plus_launch():
    g = Graph("one")
    g.outputs = [relu(g, floats(g, "x"), "d0", "a")]
    schedule = simulate(g, two_memories())
    assert timeline(schedule) == {"a": (0.0, us(10))}
    assert schedule.makespan == us(10)
    (event,) = schedule.events
    assert (event.device, event.kind, event.ops, event.bytes, event.flops) == ("d0", "elementwise", "Relu", 8000, 1000)
    assert g.nodes[0].meta["start_us"] == 0.0 and g.nodes[0].meta["end_us"] == pytest.approx(10.0)


def test_independent_nodes_on_two_devices_overlap():
    g = Graph("two")
    x = floats(g, "x")
    g.outputs = [relu(g, x, "d0", "a"), relu(g, x, "d1", "b")]
    schedule = simulate(g, two_memories())
    assert timeline(schedule) == {"a": (0.0, us(10)), "b": (0.0, us(10))}
    assert schedule.makespan == us(10)  # not 20: they run side by side
    assert schedule.busy() == {"d0": us(10), "d1": us(10)}


def test_dependency_across_devices_adds_the_flag_sync():
    g = Graph("chain")
    a = relu(g, floats(g, "x"), "d0", "a")
    g.outputs = [relu(g, a, "d1", "across"), relu(g, a, "d0", "same")]
    times = timeline(simulate(g, two_memories()))
    assert times["across"] == (us(10 + 5), us(10 + 5 + 10))  # a's end + the 5 us flag sync
    assert times["same"] == (us(10), us(20))                  # the same device: no sync


def test_a_device_runs_its_nodes_in_graph_order():
    g = Graph("order")
    slow = relu(g, floats(g, "big", 10000), "d1", "slow")      # 80000 bytes: 80 + 2 us
    after = relu(g, slow, "d0", "after")                       # waits for slow + 5 us sync
    g.outputs = [after, relu(g, floats(g, "x"), "d0", "independent")]
    schedule = simulate(g, two_memories())
    times = timeline(schedule)
    assert times["slow"] == (0.0, us(82))
    assert times["after"] == (us(87), us(87 + 82))
    # ready at 0, but behind "after" in d0's queue
    assert times["independent"] == (us(169), us(179))
    assert schedule.makespan == us(179)
    assert schedule.busy() == {"d0": us(82 + 10), "d1": us(82)}


SHARED = {"m": {"bandwidth": "16 GB/s", "shared_bandwidth": ["8 GB/s", "12 GB/s"]}}


def shared_platform():
    fast = {"bandwidth": "8 GB/s", "launch": 0}
    return platform(SHARED, {"d0": ("m", fast), "d1": ("m", fast)})


def test_two_devices_streaming_one_memory_share_its_bandwidth():
    alone = Graph("alone")
    alone.outputs = [relu(alone, floats(alone, "x", 250000), "d0", "a")]   # 2 MB
    assert timeline(simulate(alone, shared_platform()))["a"] == (0.0, us(250))  # 2 MB at 8 GB/s

    g = Graph("together")
    g.outputs = [relu(g, floats(g, "x", 250000), "d0", "a"),    # 2 MB
                 relu(g, floats(g, "y", 500000), "d1", "b")]    # 4 MB
    schedule = simulate(g, shared_platform())
    times = timeline(schedule)
    # together the memory gives 12 GB/s, 6 GB/s each: a's 2 MB take 333.3 us (alone 250 us)
    assert times["a"] == (0.0, us(2e6 / 6e9 / US))
    # b moved 2 MB by then, and its last 2 MB run alone at 8 GB/s: 333.3 + 250 us (alone 500 us)
    assert times["b"] == (0.0, us(2e6 / 6e9 / US + 250))
    assert schedule.makespan == us(2e6 / 6e9 / US + 250)


def test_more_streams_than_the_curve_share_its_last_total():
    fast = {"bandwidth": "8 GB/s", "launch": 0}
    p = platform(SHARED, {"d0": ("m", fast), "d1": ("m", fast), "d2": ("m", fast)})
    g = Graph("three")
    g.outputs = [relu(g, floats(g, f"x{i}", 250000), f"d{i}", f"a{i}") for i in range(3)]
    # three streams, a curve of two: 12 GB/s in all, 4 GB/s each: 2 MB in 500 us
    assert timeline(simulate(g, p)) == {f"a{i}": (0.0, us(500)) for i in range(3)}


def test_the_runtime_call_overhead_delays_the_first_node():
    g = Graph("overhead")
    a = relu(g, floats(g, "x"), "d0", "a")
    g.outputs = [relu(g, a, "d0", "b"), relu(g, floats(g, "y"), "d1", "c")]
    schedule = simulate(g, two_memories(call_overhead="50 us"))
    assert timeline(schedule) == {"a": (us(50), us(60)), "b": (us(60), us(70)), "c": (us(50), us(60))}
    assert schedule.makespan == us(70)
    assert schedule.as_dict()["makespan_us"] == pytest.approx(70)


def test_transfer_runs_on_the_link_with_its_latency_and_bandwidth():
    p = two_memories(link={"pcie": {"from": "m0", "to": "m1", "bandwidth": "1 GB/s", "latency": "10 us"}})
    assert p.needs_transfer("d0", "d1")  # two memories: a copy between them
    g = Graph("copy")
    half = relu(g, floats(g, "x", 500), "d0", "a")            # 4000 bytes: 4 + 2 us
    g.outputs = [relu(g, half, "d1", "b")]
    assert insert_transfers(g, p) == 1
    copy = g.nodes[1]
    assert copy.op == "hetflow.transfer" and copy.attrs == {"src": "m0", "dst": "m1"}
    schedule = simulate(g, p)
    times = timeline(schedule)
    assert times["a"] == (0.0, us(6))
    # the copy: 10 us latency + 2000 bytes at 1 GB/s, on the link, from a's end
    assert times[copy.outputs[0].name] == (us(6), us(6 + 10 + 2))
    # b reads the copy on d1 (the model charges no flag sync on either side of a link)
    assert times["b"] == (us(18), us(24))
    assert {e.device for e in schedule.events} == {"d0", "d1", "link:pcie"}
    assert schedule.busy() == {"d0": us(6), "link:pcie": us(12), "d1": us(6)}
    assert schedule.makespan == us(24)


def test_makespan_and_busy_of_a_diamond():
    #        a (d0) -------------> c (d0) --+
    #  x --<                                +--> d (d0): Add
    #        b1 (d1) -> b2 (d1) ------------+    (b2 crosses to d0: + 5 us)
    g = Graph("diamond")
    x = floats(g, "x")
    a = relu(g, x, "d0", "a")                      # 0 .. 10
    b1 = relu(g, x, "d1", "b1")                    # 0 .. 10
    b2 = relu(g, b1, "d1", "b2")                   # 10 .. 20
    c = relu(g, a, "d0", "c")                      # 10 .. 20
    g.outputs = [placed(g, "Add", [c, b2], "d0", "d")]
    schedule = simulate(g, two_memories())
    # d waits for c (20) and b2 (20 + 5 us sync); it moves 3 x 4000 bytes: 12 us + 2 us launch
    assert timeline(schedule) == {"a": (0.0, us(10)), "b1": (0.0, us(10)), "b2": (us(10), us(20)),
                                  "c": (us(10), us(20)), "d": (us(25), us(39))}
    assert schedule.makespan == us(39)
    assert schedule.busy() == {"d0": us(10 + 10 + 14), "d1": us(20)}
    again = Schedule.from_dict(schedule.as_dict())
    assert again.makespan == pytest.approx(schedule.makespan) and again.busy() == pytest.approx(schedule.busy())


def test_a_node_without_a_device_is_refused():
    g = Graph("unplaced")
    g.outputs = [relu(g, floats(g, "x"), "d0", "a")]
    del g.nodes[0].meta["device"]
    with pytest.raises(ValueError, match="has no device: run place before schedule"):
        simulate(g, two_memories())


def test_a_femtosecond_kernel_late_in_the_timeline_finishes():
    """What is left of a task can take less time than the clock resolves at ``now`` (now + left == now): the
    simulation must finish it, not spin (a Sqrt on duplex's PIM at t = 0.53 ms hung every duplex compile of
    llama without fuse)."""
    import threading

    from hetflow.examples.zoo import ZOO
    import hetflow
    module, inputs = ZOO["llama"].build()
    done = []

    def compile_it():
        done.append(hetflow.compile(module, inputs, platform="duplex", placement="roofline",
                                    passes="canonicalize,place,schedule,plan_memory", time_limit=1))
    worker = threading.Thread(target=compile_it, daemon=True)
    worker.start()
    worker.join(120)
    assert done, "the schedule simulation did not finish"
    assert done[0].schedule.makespan > 0
