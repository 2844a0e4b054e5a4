"""The ``torch.compile`` backend: ``torch.compile(model, backend="hetflow")``.

Dynamo hands the backend an FX graph; ``aot_autograd`` with the core-ATen
decompositions turns it into a core-ATen graph with the parameters lifted as
inputs, which ``capture_fx`` imports. The compiled forward runs the hetflow
reference interpreter on NumPy arrays and returns torch tensors. Inference only:
asking for a backward raises ``BackwardNotSupported``.

The backend is found by name through the ``torch_dynamo_backends`` entry point
in pyproject; importing this module also registers it with dynamo, for an
install whose entry points torch has not seen.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch._decomp import core_aten_decompositions
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from hetflow.frontends.torch import TorchCapture, capture_fx
from hetflow.ir.errors import HetflowError
from hetflow.runtime.interpreter import Interpreter

__all__ = ["BackwardNotSupported", "hetflow_backend"]


class BackwardNotSupported(HetflowError, RuntimeError):
    """A gradient was requested through a hetflow-compiled module (hetflow compiles inference only)."""


def hetflow_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], platform: str = "host",
                    **kwargs) -> Callable:
    """A torch.compile backend: core-ATen graph -> hetflow IR -> reference interpreter.

    ``platform`` is accepted for ``hetflow.backend(platform=...)``; for now every
    platform runs the reference interpreter.
    """
    backend = aot_autograd(fw_compiler=_compile_forward, bw_compiler=_refuse_backward,
                           inference_compiler=_compile_forward, decompositions=core_aten_decompositions())
    return backend(gm, example_inputs, **kwargs)


def _compile_forward(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    capture = capture_fx(gm, example_inputs)
    return make_boxed_func(_InterpretedForward(capture, _symint_outputs(gm)))


def _refuse_backward(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    def run(*args):
        raise BackwardNotSupported("hetflow compiles inference only: backward through a module compiled with "
                                   "backend='hetflow' is not supported (run it under torch.no_grad())")
    return make_boxed_func(run)


def _symint_outputs(gm: torch.fx.GraphModule) -> list[bool]:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    results = output.args[0] if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    return [isinstance(r, torch.fx.Node) and isinstance(r.meta.get("val"), torch.SymInt) for r in results]


class _InterpretedForward:
    """Runs the captured graph: torch arguments in, torch tensors (and Python ints for sizes) out."""

    def __init__(self, capture: TorchCapture, symint_outputs: list[bool]):
        self.capture = capture
        self.interpreter = Interpreter(capture.graph)
        self.symint_outputs = symint_outputs

    def __call__(self, *args):
        feeds = {name: _to_numpy(a) for name, a in zip(self.capture.input_names, args)}
        outputs = self.interpreter.run(feeds)
        results = []
        for array, is_size in zip(outputs, self.symint_outputs + [False] * len(outputs)):
            results.append(int(array) if is_size else torch.from_numpy(np.array(array, copy=True)))
        return results


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            from hetflow.ir import DType
            return x.view(torch.int16).numpy().view(DType.bf16.numpy)
        return x.numpy()
    if isinstance(x, bool):
        return np.array(x)
    if isinstance(x, int):
        return np.array(x, dtype=np.int64)
    return np.array(x, dtype=np.float32)


def _register() -> None:
    from torch._dynamo.backends.registry import _BACKENDS, register_backend
    if "hetflow" not in _BACKENDS:
        register_backend(name="hetflow")(hetflow_backend)


_register()
