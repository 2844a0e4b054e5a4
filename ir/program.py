"""The partitioned program: how a placed graph runs, shared by the passes, backends and runtime.

A placed graph runs as a list of partitions, each a maximal run of consecutive
nodes (in the graph's order, which the schedule keeps) with the same
``meta['device']``; a transfer is a partition of its own on its link
(``link:src_memory->dst_memory``). One worker per device runs that device's
partitions in index order; a partition reading a value from another device waits
for its flag. The memory planner reasons about this order, the backends emit one
program per partition (``Partition``) and the runtime runs them.

Also the artifact's protocol constants both sides of it read: which weights a
partition's program holds inline (the runtime hands the others over at load) and
the ONNX metadata key naming outputs bound as views.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .graph import Graph, Node, Value

TRANSFER_OP = "hetflow.transfer"
FLASH_FFN_OP = "hetflow.flash_ffn"
SOLO_OPS = (TRANSFER_OP, FLASH_FFN_OP)   # each its own partition: a copy between memories, a layer read from flash
VIEW_OUTPUTS = "hetflow.view_outputs"  # ONNX metadata: outputs the CPU runner binds as views, with their IR shapes
# ONNX metadata: extra outputs the CPU runner binds to an input's own buffer (a KV cache written in place at one
# slot, which it puts back after the call): {output: {"input": name, "position": name, "node": label}}
INPLACE_OUTPUTS = "hetflow.inplace_outputs"
INLINE_BYTES = 4096


def inline_weight(value: Value) -> bool:
    """Small constants (shapes, axes, scalars) stay inside a partition's program (ONNX Runtime's shape inference
    reads them); larger weights are handed to the runner from the artifact's safetensors at load."""
    return value.data.nbytes <= INLINE_BYTES or value.data.dtype.kind in "OUS"


def device_runs(graph: Graph, default: str | None = None) -> list[tuple[str, list[Node]]]:
    """``[(device, nodes)]``: the partitions of a placed graph, in execution-index order.

    Every node needs ``meta['device']`` (set by the place pass); ``default`` names the one device of a graph
    that was never placed, when the caller means exactly that."""
    runs: list[tuple[str, list[Node]]] = []
    for node in graph.nodes:
        device = node.meta.get("device", default)
        if device is None:
            from .graph import IRError
            raise IRError(f"{node.describe()} has no device (meta 'device', set by pass 'place'): run place first")
        if runs and runs[-1][0] == device and node.op not in SOLO_OPS and runs[-1][1][-1].op not in SOLO_OPS:
            runs[-1][1].append(node)
        else:
            runs.append((device, [node]))
    return runs


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
    device_spec: object = None        # the platform's Device, for emitters that size the program by it (pim)

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
