"""``hetflow.compile``: a torch module or an ONNX model in, a callable with the model's signature out."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hetflow.ir import Graph, verify
from hetflow.ir.errors import HetflowError
from hetflow.runtime.interpreter import Interpreter

PLATFORMS = ("host",)


class CompileError(HetflowError):
    pass


def _is_torch_module(model: Any) -> bool:
    try:
        import torch
    except ImportError:
        return False
    return isinstance(model, torch.nn.Module)


def _check_platform(platform: str) -> str:
    if platform not in PLATFORMS:
        raise CompileError(f"unknown platform {platform!r}; available: {', '.join(PLATFORMS)}")
    return platform


def capture(model: Any, example_inputs: Sequence[Any] | None = None):
    """The model as IR: returns ``(graph, torch_capture_or_None)``."""
    if _is_torch_module(model):
        if example_inputs is None:
            raise CompileError("a torch module needs example_inputs (a tuple of tensors)")
        from hetflow.frontends.torch import capture_module
        if not isinstance(example_inputs, (tuple, list)):
            example_inputs = (example_inputs,)
        captured = capture_module(model, tuple(example_inputs))
        return captured.graph, captured
    import onnx
    if isinstance(model, (onnx.ModelProto, bytes, str, Path)):
        from hetflow.frontends.onnx import import_onnx
        return import_onnx(model), None
    raise CompileError(f"cannot compile a {type(model).__name__}: give a torch.nn.Module, an onnx.ModelProto "
                       "or a path to a .onnx file")


class CompiledModel:
    """What ``hetflow.compile`` returns: call it like the model; ``report()`` says what was built."""

    def __init__(self, graph: Graph, platform: str, torch_capture=None, compile_seconds: float = 0.0):
        self.graph = graph
        self.platform = platform
        self.compile_seconds = compile_seconds
        self._torch = torch_capture
        self._interpreter = Interpreter(graph)

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.graph.inputs]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._torch is not None:
            return self._call_torch(args, kwargs)
        feeds = dict(zip(self.input_names, args))
        feeds.update(kwargs)
        outputs = self._interpreter.run({k: np.asarray(v) for k, v in feeds.items()})
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _call_torch(self, args, kwargs):
        import torch
        from torch.utils import _pytree as pytree
        if kwargs:
            raise CompileError("keyword arguments are not supported for compiled torch modules yet")
        flat, _ = pytree.tree_flatten(args)
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        names = self._torch.input_names
        if len(tensors) != len(names):
            raise CompileError(f"the compiled module takes {len(names)} tensor inputs, got {len(tensors)}")
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}
        outputs = [torch.from_numpy(np.ascontiguousarray(o)) for o in self._interpreter.run(feeds)]
        if self._torch.out_spec is None:
            return outputs[0] if len(outputs) == 1 else tuple(outputs)
        return pytree.tree_unflatten(outputs, self._torch.out_spec)

    def save(self, directory: str | Path) -> Path:
        from hetflow.runtime.artifact import write_artifact
        return write_artifact(self.graph, directory, self.platform)

    def report(self) -> str:
        from hetflow.report import graph_summary
        return graph_summary(self.graph, platform=self.platform, compile_seconds=self.compile_seconds)


def compile(model: Any, example_inputs: Sequence[Any] | None = None, platform: str = "host",
            passes: Sequence[str] | str | None = None) -> CompiledModel:
    """Compile a torch module (with example inputs) or an ONNX model for ``platform``.

    ``passes`` overrides the pipeline (a list of pass names or "canonicalize,fuse").
    Returns a ``CompiledModel``: call it with the model's inputs (torch tensors for a
    torch module, NumPy arrays or keyword arrays by input name for ONNX).
    """
    from hetflow.pipeline import run_pipeline
    _check_platform(platform)
    start = time.perf_counter()
    graph, torch_capture = capture(model, example_inputs)
    verify(graph)
    graph, runner = run_pipeline(graph, passes)
    compiled = CompiledModel(graph, platform, torch_capture, time.perf_counter() - start)
    compiled.pass_records = runner.records
    return compiled


def backend(platform: str = "host"):
    """A ``torch.compile`` backend compiling for ``platform``: ``torch.compile(m, backend=hetflow.backend())``."""
    _check_platform(platform)
    from hetflow.torch_backend import hetflow_backend

    def compile_fx(gm, example_inputs, **kwargs):
        return hetflow_backend(gm, example_inputs, platform=platform, **kwargs)
    return compile_fx
