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


def _cuda() -> bool:
    from hetflow.backends.gpu import cuda_available
    return cuda_available()


def profile(graph: Graph, platform, feeds: dict[str, np.ndarray], repeats: int = 5) -> list[ProfileRow]:
    from hetflow.backends import Partition, backend_for, partition_graph
    from hetflow.backends.cpu import CpuPartition, _inline, lower_partition
    from .interpreter import Interpreter
    values = dict(feeds)
    values.update({w.name: w.data for w in graph.weights.values()})
    rows = []
    for index, node in enumerate(graph.nodes):
        device = node.meta.get("device", "cpu")
        backend = backend_for(device, platform)
        sub = partition_graph(graph, [node], f"profile{index}")
        if backend == "cpu":
            model, _ = lower_partition(sub)
            weights = {n: w.data for n, w in sub.weights.items() if not _inline(w)}
            runner = CpuPartition(model.SerializeToString(), weights, [v.name for v in sub.inputs],
                                  [v.name for v in sub.outputs], name=f"profile of {node.outputs[0].name}")

            def run(runner=runner, sub=sub):
                return runner.run_dynamic({v.name: values[v.name] for v in sub.inputs})
        elif backend == "cuda" and _cuda():  # the GPU program, with PyTorch's kernels (copies in and out included)
            from hetflow.backends.gpu import GpuPartition, emit_program
            runner = GpuPartition(emit_program(sub, f"profile of {node.outputs[0].name}"),
                                  {n: w.data for n, w in sub.weights.items()}, [v.name for v in sub.inputs],
                                  [v.name for v in sub.outputs], name=f"profile of {node.outputs[0].name}",
                                  kernels="torch")

            def run(runner=runner, sub=sub):
                return runner.run_dynamic({v.name: values[v.name] for v in sub.inputs})
        else:
            if backend == "cuda":
                backend = "interpreter"  # no GPU here: the group runs on the reference interpreter
            interpreter = Interpreter(sub)

            def run(interpreter=interpreter, sub=sub):
                outs = interpreter.run({v.name: values[v.name] for v in sub.inputs})
                return dict(zip([v.name for v in sub.outputs], outs))
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
        rows.append(ProfileRow(node.outputs[0].name, device, backend, kind, predicted, float(np.median(times))))
    return rows
