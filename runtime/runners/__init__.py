"""Runners: what runs a partition of a loaded artifact, one module each, behind one registry.

The registry is keyed by the backend name the artifact's manifest gives each
partition (``cpu``, ``cuda``, ``tvm-llvm``, ``simulated``, ``transfer``). A loader
``(partition, executor) -> runner`` builds what runs it; a runner has

    run(inputs, outputs)     read ``inputs``, write the preallocated ``outputs`` (the arena's slots)
    run_dynamic(inputs)      return {name: array}, for outputs of shapes known only at run time
    host_inputs              True when it reads host (NumPy) arrays only

Adding a device's runner: a module here with ``@register_runner("name")``, imported
below. Nothing outside this registry branches on backend names.
"""
from __future__ import annotations

import importlib
from typing import Callable

from hetflow.runtime.errors import RunnerError

RUNNERS: dict[str, Callable] = {}
MODULES = {"cpu": "onnxruntime", "cuda": "cuda", "tvm-llvm": "tvm", "simulated": "interpreter",
           "transfer": "transfer"}
MEASURED = {"cpu", "cuda", "tvm-llvm"}  # backends that run on this machine's real device: their times are measured


def register_runner(backend: str):
    def wrap(loader: Callable) -> Callable:
        RUNNERS[backend] = loader
        return loader
    return wrap


def backends() -> list[str]:
    return sorted(MODULES)


def load_runner(part, executor):
    """The runner for a partition, by its backend name (its module imported on first use: tvm and torch
    are imported only by the partitions that need them)."""
    if part.backend not in MODULES:
        raise RunnerError(f"partition {part.index} ({part.file}) names backend {part.backend!r}, which this "
                          f"runtime does not have (backends: {', '.join(backends())})")
    if part.backend not in RUNNERS:
        importlib.import_module(f"{__name__}.{MODULES[part.backend]}")
    return RUNNERS[part.backend](part, executor)


# what each backend's partition file holds, and where it goes on the Partition
FILES = {"cpu": ("onnx_bytes", "bytes"), "cuda": ("source", "text"), "tvm-llvm": ("library", "bytes"),
         "simulated": ("graph", "graph"), "transfer": (None, None)}


def read_partitions(entries: list[dict], directory, graph):
    """Partitions of a loaded artifact (the standalone graphs are rebuilt from the main graph; each program
    read from its file as its backend's row says)."""
    import json
    from pathlib import Path

    from hetflow.ir.graph import extract_subgraph
    from hetflow.ir.program import Partition
    from hetflow.ir.serialize import graph_from_json
    by_name = {n.outputs[0].name: n for n in graph.nodes}
    partitions = []
    for entry in entries:
        if entry["backend"] not in FILES:
            raise RunnerError(f"partition {entry['index']} ({entry['file']}) names backend {entry['backend']!r}, "
                              f"which this runtime does not have (backends: {', '.join(backends())})")
        nodes = [by_name[name] for name in entry["nodes"]]
        sub = extract_subgraph(graph, nodes, f"part{entry['index']}")[0]
        part = Partition(entry["index"], entry["device"], entry["backend"], sub, entry["nodes"],
                         entry["predicted_start_us"] / 1e6, entry["predicted_end_us"] / 1e6, entry["file"],
                         target=entry.get("target"))
        field, kind = FILES[entry["backend"]]
        path = Path(directory) / entry["file"]
        if kind == "bytes":
            setattr(part, field, path.read_bytes())
        elif kind == "text":
            setattr(part, field, path.read_text())
        elif kind == "graph":
            weights = {w.name: w.data for w in graph.weights.values()}
            part.graph = graph_from_json(json.loads(path.read_text()), weights)
        partitions.append(part)
    return partitions
