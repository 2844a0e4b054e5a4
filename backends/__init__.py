"""hetflow.backends: partition a placed graph by device and emit what each device runs.

A partition is a maximal run of consecutive top-level nodes (in schedule order)
placed on one device. Each partition becomes a standalone graph, lowered by its
device's backend:

* ``cpu``: an ONNX model run by ONNX Runtime (``cpu/partN.onnx``), measured.
* ``cuda``: a real CUDA GPU of this machine (``host+cuda``): the partition emitted as
  a PyTorch program (``gpu/partN.py``, see ``gpu``), run as Triton kernels compiled by
  TorchInductor or with PyTorch's kernels, captured in a CUDA graph. A machine
  without a GPU refuses the artifact unless the run asks for ``fallback="cpu"``,
  which then runs the same program on the CPU and reports it.
* ``simulated``: devices this machine lacks (NPU, PIM, a modelled GPU): the
  partition's IR (``npu/partN.json``), executed functionally by the reference
  interpreter until the device's simulator lands; its time is the modelled one.
* ``tvm-llvm``: with ``cpu_backend="tvm"``, a CPU partition's same ONNX lowering compiled by
  TVM for LLVM into a native library (``cpu/partN.so``, see ``tvm_cpu``).
* ``transfer``: a copy between two memories that are not one unified space.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hetflow.ir import Graph, Node
from hetflow.ir.graph import extract_subgraph
from hetflow.ir.serialize import graph_from_json, graph_to_json
from hetflow.passes.partition import device_runs

TRANSFER_OP = "hetflow.transfer"


@dataclass
class Partition:
    index: int
    device: str
    backend: str                      # "cpu", "cuda", "tvm-llvm", "simulated", "transfer"
    graph: Graph                      # standalone: its inputs, weights and outputs
    nodes: list[str] = field(default_factory=list)  # the top-level nodes it holds (first output names)
    predicted_start: float = 0.0
    predicted_end: float = 0.0
    file: str = ""
    onnx_bytes: bytes | None = None
    library: bytes | None = None      # tvm-llvm: the compiled .so
    source: str | None = None         # cuda: the emitted PyTorch program
    target: dict | None = None        # tvm-llvm: the LLVM target it was compiled for

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.graph.inputs]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self.graph.outputs]

    def manifest_entry(self) -> dict:
        return {"index": self.index, "device": self.device, "backend": self.backend, "file": self.file,
                "inputs": self.input_names, "outputs": self.output_names,
                "weights": list(self.graph.weights), "nodes": self.nodes,
                "predicted_start_us": self.predicted_start * 1e6, "predicted_end_us": self.predicted_end * 1e6,
                **({"target": self.target} if self.target else {})}


def backend_for(device: str, platform) -> str:
    if device.startswith("link:"):
        return "transfer"
    spec = platform.devices.get(device) if platform is not None else None
    if spec is None or spec.kind == "cpu":
        return "cpu"
    if spec.kind == "gpu" and spec.measured:  # a real GPU of this machine (host+cuda)
        return "cuda"
    return "simulated"


def split_partitions(graph: Graph) -> list[tuple[str, list[Node]]]:
    """The partitions as (device, nodes) runs (``hetflow.passes.partition.device_runs``)."""
    return device_runs(graph)


def partition_graph(graph: Graph, nodes: list[Node], name: str) -> Graph:
    """The nodes as a standalone graph: their external inputs become inputs, the values others read, outputs."""
    return extract_subgraph(graph, nodes, name)[0]


CPU_BACKENDS = ("onnxruntime", "tvm")


def build_partitions(graph: Graph, platform=None, cpu_backend: str = "onnxruntime") -> list[Partition]:
    """``cpu_backend="tvm"`` compiles the CPU partitions with TVM (``tvm-llvm``) instead of ONNX Runtime."""
    from .cpu import lower_partition
    partitions = []
    for index, (device, nodes) in enumerate(split_partitions(graph)):
        backend = backend_for(device, platform)
        if backend == "cpu" and cpu_backend == "tvm":
            backend = "tvm-llvm"
        sub = partition_graph(graph, nodes, f"part{index}")
        part = Partition(index, device, backend, sub, [n.outputs[0].name for n in nodes],
                         min(n.meta.get("start_us", 0.0) for n in nodes) / 1e6,
                         max(n.meta.get("end_us", 0.0) for n in nodes) / 1e6)
        folder = device.replace(":", "_").replace(">", "").replace("-", "_")
        if backend == "cuda":
            from .gpu import emit_program
            part.file = f"{folder}/part{index}.py"
            part.source = emit_program(sub, f"{index} ({part.file})")
        elif backend == "cpu":
            model, _ = lower_partition(sub, view_outputs=True)
            part.onnx_bytes = model.SerializeToString()
            part.file = f"{folder}/part{index}.onnx"
        elif backend == "tvm-llvm":
            from .tvm_cpu import compile_partition
            part.file = f"{folder}/part{index}.so"
            part.library, _, part.target = compile_partition(sub, f"{index} ({part.file})")
        else:
            part.file = f"{folder}/part{index}.json"
        partitions.append(part)
    return partitions


def write_partitions(partitions: list[Partition], directory: Path) -> list[Path]:
    written = []
    for part in partitions:
        path = directory / part.file
        path.parent.mkdir(parents=True, exist_ok=True)
        if part.source is not None:
            path.write_text(part.source)
        elif part.onnx_bytes is not None or part.library is not None:
            path.write_bytes(part.onnx_bytes if part.onnx_bytes is not None else part.library)
        else:
            path.write_text(json.dumps(graph_to_json(part.graph), indent=1))
        written.append(path)
    return written


def read_partitions(entries: list[dict], directory: Path, graph: Graph) -> list[Partition]:
    """Partitions of a loaded artifact (the standalone graphs are rebuilt from the main graph)."""
    by_name = {n.outputs[0].name: n for n in graph.nodes}
    partitions = []
    for entry in entries:
        nodes = [by_name[name] for name in entry["nodes"]]
        sub = partition_graph(graph, nodes, f"part{entry['index']}")
        part = Partition(entry["index"], entry["device"], entry["backend"], sub, entry["nodes"],
                         entry["predicted_start_us"] / 1e6, entry["predicted_end_us"] / 1e6, entry["file"],
                         target=entry.get("target"))
        path = directory / entry["file"]
        if entry["backend"] == "cpu":
            part.onnx_bytes = path.read_bytes()
        elif entry["backend"] == "cuda":
            part.source = path.read_text()
        elif entry["backend"] == "tvm-llvm":
            part.library = path.read_bytes()
        elif entry["backend"] == "simulated":
            weights = {w.name: w.data for w in graph.weights.values()}
            part.graph = graph_from_json(json.loads(path.read_text()), weights)
        partitions.append(part)
    return partitions
