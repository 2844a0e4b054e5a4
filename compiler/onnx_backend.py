"""hetflow as an ``onnx.backend.base.Backend``: how the ONNX backend node tests reach hetflow.

``prepare`` imports the model into the IR (and, with ``mode="compiled"``, would run
the compile pipeline); ``run`` executes it with the reference interpreter.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep

from hetflow.frontends.onnx import import_onnx
from hetflow.runtime.interpreter import Interpreter


class HetflowRep(BackendRep):
    def __init__(self, graph):
        self.graph = graph
        self.interpreter = Interpreter(graph)

    def run(self, inputs: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
        if isinstance(inputs, dict):
            feeds = inputs
        else:
            if isinstance(inputs, np.ndarray):
                inputs = [inputs]
            feeds = dict(zip([v.name for v in self.graph.inputs], inputs))
        return tuple(self.interpreter.run(feeds))


class HetflowBackend(Backend):
    @classmethod
    def is_compatible(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> bool:
        return device == "CPU"

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> HetflowRep:
        return HetflowRep(import_onnx(model))

    @classmethod
    def run_model(cls, model: onnx.ModelProto, inputs: Any, device: str = "CPU", **kwargs: Any):
        return cls.prepare(model, device).run(inputs)

    @classmethod
    def run_node(cls, node, inputs, device="CPU", outputs_info=None, **kwargs):
        raise NotImplementedError("hetflow runs whole models; the node tests come as models")
