"""Profile: every top-level node (fused group or lone op) run on its own, measured beside its predicted time.

Each node becomes its own partition (an ONNX Runtime session for the CPU, the
simulator for devices this machine lacks), fed with the values a full run
produced, and timed over repeated runs (median). Running a group alone costs a
session call that the whole-model run does not pay, so the sum of the measured
times exceeds the whole run; both are reported.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from hetflow.ir import Graph


@dataclass
class ProfileRow:
    name: str
    device: str
    backend: str
    kind: str
    predicted: float   # seconds (modelled)
    measured: float    # seconds (median, measured; simulated devices: wall time of the functional simulation)
    real: bool = False  # ran on the device itself (its time is a measurement of that device)


class _Context:
    """What a runner's loader reads of its executor, for one partition run on its own."""

    def __init__(self, platform, part):
        from hetflow.runtime.executor import _copy_into
        self.platform = platform
        self.partitions = [part]
        self.types = {v.name: v.type for v in part.graph.values()}
        self.fallbacks: list[str] = []
        self.threads = None
        self.fallback = "cpu"          # a GPU program on a machine without one runs on the CPU, and says so
        self.gpu_kernels = "torch"     # no Triton compile wait inside a profile
        self.device_memories: set[str] = set()
        self.trust_native_code = False  # (the model's own load checked trust for its native libraries...)
        self.artifact_digest = None     # ...so these one-node partitions, built here, are this process's
        self.copy_into = _copy_into

    def memory_of(self, device: str) -> str:
        return self.platform.memory_space(device)


def profile(graph: Graph, platform, feeds: dict[str, np.ndarray], repeats: int = 5) -> list[ProfileRow]:
    """Each top-level node alone, emitted by its device's backend and run by that backend's runner (both
    registries), against its predicted time."""
    from hetflow.backends import EMITTERS, backend_for, partition_graph
    from hetflow.ir.program import Partition
    from hetflow.runtime.runners import MEASURED, load_runner
    values = dict(feeds)
    values.update({w.name: w.data for w in graph.weights.values()})
    rows = []
    for index, node in enumerate(graph.nodes):
        device = node.meta["device"]  # a placed graph (the driver places an unplaced one on the host)
        backend = backend_for(device, platform)
        sub = partition_graph(graph, [node], f"profile{index}")
        part = Partition(index, device, backend, sub, [node.outputs[0].name], file=f"profile of {node.outputs[0].name}")
        part.device_spec = platform.devices.get(device)   # emitters that size the program by the device (pim)
        EMITTERS[backend].emit(part)
        context = _Context(platform, part)
        runner = load_runner(part, context)
        real = backend in MEASURED and not context.fallbacks
        if context.fallbacks:
            backend += " (on the CPU)"

        def run(runner=runner, sub=sub):
            return runner.run_dynamic({v.name: values[v.name] for v in sub.inputs})
        results = run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        values.update(results)
        for out in node.outputs:  # values no other partition reads still feed later nodes of the profile
            if out.name not in values:
                values[out.name] = results.get(out.name)
        predicted = (node.meta.get("end_us", 0.0) - node.meta.get("start_us", 0.0)) / 1e6
        kind = node.attrs.get("kind", node.op) if node.op == "hetflow.group" else node.op
        rows.append(ProfileRow(node.outputs[0].name, device, backend, kind, predicted, float(np.median(times)), real))
    return rows
