"""hetflow.backends: partition a placed graph by device and emit what each device runs (emitters only).

A partition is a maximal run of consecutive top-level nodes (in schedule order)
placed on one device. Each partition becomes a standalone graph, lowered by its
device's backend:

* ``cpu``: an ONNX model run by ONNX Runtime (``cpu/partN.onnx``), measured.
* ``cuda``: a real CUDA GPU of this machine (``host+cuda``): the partition emitted as
  a PyTorch program (``gpu/partN.py``, see ``gpu``), run as Triton kernels compiled by
  TorchInductor or with PyTorch's kernels, captured in a CUDA graph. A machine
  without a GPU refuses the artifact unless the run asks for ``fallback="cpu"``,
  which then runs the same program on the CPU and reports it.
* ``npu``: an NPU's partition as a program for a systolic-array NPU (``npu/partN.npu.json``,
  see ``npu``), run by the NPU simulator: functional in NumPy, timed per instruction.
* ``pim``: a PIM device's command stream (``pim/partN.pim.json``, see ``pim``), run by the runtime's
  event-driven DRAM PIM simulator (``hetflow.runtime.runners.pim``).
* ``simulated``: devices this machine lacks and have no simulator yet (a modelled GPU; an NPU partition
  the NPU emitter cannot lower, e.g. dynamic shapes): the partition's IR (``gpu/partN.json``),
  executed functionally by the reference interpreter; its time is the modelled one.
* ``tvm-llvm``: with ``cpu_backend="tvm"``, a CPU partition's same ONNX lowering compiled by
  TVM for LLVM into a native library (``cpu/partN.so``, see ``tvm_cpu``).
* ``transfer``: a copy between two memories that are not one unified space.
* ``flash``: a feed-forward layer whose weights stream from the flash image (a ``hetflow.flash_ffn`` node,
  see ``flash``); the image is written beside the partitions (``flash.bin``, ``flash.json``).

Each backend is one registry row (``EMITTERS``): the device kinds it serves and
the function that emits a partition's program into the ``Partition``. The runtime
runs them through its own registry of runners, keyed by the same names
(``hetflow.runtime.runners``). Nothing else branches on backend names.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hetflow.ir import Graph, Node
from hetflow.ir.graph import extract_subgraph
from hetflow.ir.program import Partition, device_runs
from hetflow.ir.serialize import graph_to_json

from .cpu import BackendDeclined, BackendError

TRANSFER_OP = "hetflow.transfer"
CPU_BACKENDS = ("onnxruntime", "tvm")


@dataclass(frozen=True)
class Emitter:
    name: str                                 # the backend name the manifest records and the runtime looks up
    folder_suffix: str                        # the file each partition becomes: <device>/partN<suffix>
    emit: Callable[..., None]                 # fills the partition's program (onnx_bytes, source, library...)


def cpu_program(graph: Graph, name: str = "") -> bytes:
    """A CPU partition's program: its ONNX model's bytes (deterministic: the runtime regenerates them at load
    from graph.json and refuses a stored model that differs)."""
    from .cpu import lower_partition
    model, _ = lower_partition(graph, view_outputs=True, inplace_cache=True)
    return model.SerializeToString()


def _emit_cpu(part: Partition) -> None:
    part.onnx_bytes = cpu_program(part.graph)


def _emit_cuda(part: Partition) -> None:
    from .gpu import emit_program
    part.source = emit_program(part.graph, f"{part.index} ({part.file})")


def _emit_tvm(part: Partition) -> None:
    from .tvm_cpu import compile_partition
    part.library, _, part.target = compile_partition(part.graph, f"{part.index} ({part.file})")


def pim_program(graph: Graph, name: str = "", device=None) -> str:
    """A PIM partition's command stream (``pim``), a deterministic function of the graph and the device."""
    from .pim import emit_pim_program
    return emit_pim_program(graph, device, name)


def _emit_pim(part: Partition) -> None:
    part.source = pim_program(part.graph, f"{part.index} ({part.file})", part.device_spec)


def _emit_npu(part: Partition) -> None:
    from .npu import emit_npu_program
    part.source = emit_npu_program(part.graph, part.device_spec, f"partition {part.index} ({part.file})")


def _emit_flash(part: Partition) -> None:
    from .flash import flash_program
    part.source = flash_program(part.graph, f"{part.index} ({part.file})")


def _emit_nothing(part: Partition) -> None:
    """Simulated devices and transfers: the partition's IR is the program (written as JSON)."""


EMITTERS = {e.name: e for e in [
    Emitter("cpu", ".onnx", _emit_cpu),
    Emitter("cuda", ".py", _emit_cuda),
    Emitter("tvm-llvm", ".so", _emit_tvm),
    Emitter("npu", ".npu.json", _emit_npu),
    Emitter("pim", ".pim.json", _emit_pim),
    Emitter("simulated", ".json", _emit_nothing),
    Emitter("transfer", ".json", _emit_nothing),
    Emitter("flash", ".flash.json", _emit_flash),
]}
STREAMING_OPS = {"hetflow.flash_ffn": "flash"}   # a partition of one such node is emitted by this backend


def backend_for(device: str, platform, cpu_backend: str = "onnxruntime") -> str:
    """The backend that emits for ``device``: the platform's default for it (``Platform.backends``), TVM for
    a CPU when ``cpu_backend="tvm"``."""
    if platform is None:
        return "transfer" if device.startswith("link:") else ("tvm-llvm" if cpu_backend == "tvm" else "cpu")
    if not device.startswith("link:") and device not in platform.devices:
        raise BackendError(f"no backend for device {device!r}: platform {platform.name!r} has no such device "
                           f"(devices: {', '.join(platform.devices)})")
    allowed = platform.backends(device)
    return "tvm-llvm" if allowed[0] == "cpu" and cpu_backend == "tvm" else allowed[0]


def split_partitions(graph: Graph) -> list[tuple[str, list[Node]]]:
    """The partitions as (device, nodes) runs (``hetflow.ir.program.device_runs``)."""
    return device_runs(graph)


def partition_graph(graph: Graph, nodes: list[Node], name: str) -> Graph:
    """The nodes as a standalone graph: their external inputs become inputs, the values others read, outputs."""
    return extract_subgraph(graph, nodes, name)[0]


def file_safe(name: str) -> str:
    """``name`` as one path component: every character but letters, digits and _ becomes _."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)[:64] or "_"


def build_partitions(graph: Graph, platform=None, cpu_backend: str = "onnxruntime") -> list[Partition]:
    """``cpu_backend="tvm"`` compiles the CPU partitions with TVM (``tvm-llvm``) instead of ONNX Runtime."""
    partitions = []
    for index, (device, nodes) in enumerate(split_partitions(graph)):
        streaming = STREAMING_OPS.get(nodes[0].op) if len(nodes) == 1 else None
        if streaming is not None and platform is not None and streaming not in platform.backends(device):
            raise BackendError(f"{nodes[0].describe()} is placed on {device!r}, where platform {platform.name!r} "
                               f"allows no {streaming!r} backend ({', '.join(platform.backends(device))})")
        emitter = EMITTERS[streaming or backend_for(device, platform, cpu_backend)]
        sub = partition_graph(graph, nodes, f"part{index}")
        part = Partition(index, device, emitter.name, sub, [n.outputs[0].name for n in nodes],
                         min(n.meta.get("start_us", 0.0) for n in nodes) / 1e6,
                         max(n.meta.get("end_us", 0.0) for n in nodes) / 1e6)
        part.device_spec = platform.devices.get(device) if platform is not None else None
        _emit(part, emitter, device, platform)
        partitions.append(part)
    return partitions


def _emit(part: Partition, emitter: Emitter, device: str, platform) -> None:
    """Fill the partition's program; a backend that declines it (``BackendDeclined``, e.g. the NPU's for dynamic
    shapes) hands it to the next backend the platform allows on the device (the manifest records which ran)."""
    folder = file_safe(device.replace(">", ""))  # a device name never makes a path: no '/', no '..'
    part.file = f"{folder}/part{part.index}{emitter.folder_suffix}"
    try:
        emitter.emit(part)  # (part.device_spec: the Device, for the emitters whose program depends on it)
    except BackendDeclined:
        allowed = platform.backends(device)
        fallback = EMITTERS[allowed[allowed.index(emitter.name) + 1]]
        part.backend, part.source = fallback.name, None
        _emit(part, fallback, device, platform)


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
