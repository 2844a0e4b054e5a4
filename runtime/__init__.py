"""hetflow.runtime: loads an artifact and runs it. Needs numpy and onnx/onnxruntime, never torch."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .artifact import ArtifactError, load_artifact, write_artifact
from .interpreter import ExecutionError, InputError, Interpreter

__all__ = ["ArtifactError", "ExecutionError", "InputError", "Interpreter", "LoadedModel", "load", "write_artifact"]


class LoadedModel:
    """A loaded artifact: ``run({name: array})`` returns ``{output_name: array}``."""

    def __init__(self, graph, manifest: dict, path: Path, fallback: str | None = None):
        from hetflow.backends import read_partitions
        from hetflow.platform import platform_from_dict
        from .executor import Executor
        self.graph = graph
        self.manifest = manifest
        self.path = path
        self.platform = platform_from_dict(manifest["platform_data"], "artifact platform") \
            if "platform_data" in manifest else None
        if "partitions" in manifest:
            self.partitions = read_partitions(manifest["partitions"], Path(path), graph)
            self.executor = Executor(graph, self.partitions, self.platform, manifest.get("memory_plan"),
                                     fallback=fallback)
        else:
            self.partitions, self.executor = [], None
            self._interpreter = Interpreter(graph)

    @property
    def fallbacks(self) -> list[str]:
        return self.executor.fallbacks if self.executor is not None else []

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.graph.inputs]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self.graph.outputs]

    def run(self, feeds: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        if self.executor is not None:
            return self.executor.run(feeds)
        return dict(zip(self.output_names, self._interpreter.run(feeds)))


def load(path: str | Path, fallback: str | None = None) -> LoadedModel:
    """Load an artifact (hashes checked). ``fallback="cpu"`` runs partitions built for a device this
    machine lacks (a CUDA GPU) on the CPU instead, and says so in ``LoadedModel.fallbacks``."""
    graph, manifest = load_artifact(path)
    return LoadedModel(graph, manifest, Path(path), fallback)
