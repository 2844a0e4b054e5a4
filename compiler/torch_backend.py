"""The ``torch.compile`` backend: ``torch.compile(model, backend="hetflow")``.

Dynamo hands the backend one FX graph per graph-break piece and guard set (it
keeps the guards and caches what the backend returns, as for any backend);
``aot_autograd`` with the core-ATen decompositions turns it into a core-ATen
graph with the parameters lifted as inputs. The parameters and buffers are put
back as weights (the values they hold at compile time, as inductor's freezing
does), ``capture_fx`` imports the graph and ``hetflow.api.compile_graph`` takes
it through the same pipeline, placement, memory plan and runtime as
``hetflow.compile``. Inference only: asking for a backward raises
``BackwardNotSupported``.

The backend is found by name through the ``torch_dynamo_backends`` entry point
in pyproject; importing this module also registers it with dynamo, for an
install whose entry points torch has not seen.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch
from torch._decomp import core_aten_decompositions
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._subclasses.fake_tensor import unset_fake_temporarily

from hetflow.api import compile_graph
from hetflow.frontends.torch import capture_fx
from hetflow.frontends.torch import numpy_to_tensor as _to_torch
from hetflow.frontends.torch import tensor_to_numpy as _to_numpy
from hetflow.ir.errors import HetflowError

__all__ = ["BackwardNotSupported", "hetflow_backend"]


class BackwardNotSupported(HetflowError, RuntimeError):
    """A gradient was requested through a hetflow-compiled module (hetflow compiles inference only)."""


def hetflow_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], platform: Any = "host",
                    placement: str = "roofline", passes=None, devices=None, time_limit: float = 10.0,
                    cpu_backend: str = "onnxruntime", gpu_kernels: str = "triton", compiled_models: list | None = None,
                    cost_model: str = "analytic", **kwargs) -> Callable:
    """A torch.compile backend: core-ATen graph -> hetflow IR -> the ``hetflow.compile`` pipeline and runtime.

    The options are ``hetflow.compile``'s; ``hetflow.backend(...)`` binds them. Each ``CompiledModel`` built
    is appended to ``compiled_models`` when given (``hetflow.backend(...).compiled`` is such a list).
    """
    options = dict(platform=platform, placement=placement, passes=passes, devices=devices, time_limit=time_limit,
                   cpu_backend=cpu_backend, gpu_kernels=gpu_kernels, cost_model=cost_model)
    weights = {i: example_inputs[i].detach() for i in _weight_indices(gm)}
    forward = functools.partial(_compile_forward, weights=weights, n_inputs=len(example_inputs), options=options,
                                compiled_models=compiled_models)
    backend = aot_autograd(fw_compiler=forward, bw_compiler=_refuse_backward, inference_compiler=forward,
                           decompositions=core_aten_decompositions())
    return backend(gm, example_inputs, **kwargs)


def _weight_indices(gm: torch.fx.GraphModule) -> list[int]:
    """The dynamo graph's inputs that are a module's parameters or buffers (dynamo lifts them as inputs)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [i for i, node in enumerate(placeholders) if _is_param_or_buffer(getattr(node, "_dynamo_source", None))]


def _is_param_or_buffer(source) -> bool:
    from torch._dynamo.source import DictGetItemSource, ParamBufferSource, UnspecializedParamBufferSource
    while source is not None:
        if isinstance(source, (ParamBufferSource, UnspecializedParamBufferSource)):
            return True
        if isinstance(source, DictGetItemSource) and isinstance(source.base, UnspecializedParamBufferSource):
            return True
        source = getattr(source, "base", None)
    return False


def _compile_forward(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], weights: dict, n_inputs: int,
                     options: dict, compiled_models: list | None) -> Callable:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != n_inputs:  # aot_autograd rewrote the inputs (aliasing, subclasses): keep them inputs
        weights = {}
    _freeze(gm, placeholders, weights)
    with unset_fake_temporarily():  # aot_autograd calls this under its fake mode; the weights are real tensors
        capture = capture_fx(gm)
        compiled = compile_graph(capture.graph, torch_capture=capture, **options)
        compiled.executor  # built now: a partition that cannot be built fails the compile, not the first call
    if compiled_models is not None:
        compiled_models.append(compiled)
    kept = [i for i in range(len(placeholders)) if i not in weights]
    return make_boxed_func(_CompiledForward(compiled, capture.input_names, kept, _symint_outputs(gm)))


def _freeze(gm: torch.fx.GraphModule, placeholders: list, weights: dict) -> None:
    """Turn the placeholders of parameters and buffers into ``get_attr`` constants ``capture_fx`` makes weights."""
    if not weights:
        return
    with gm.graph.inserting_after(placeholders[-1]):
        for index, tensor in weights.items():
            node = placeholders[index]
            name = f"_hetflow_weight_{node.name}"
            gm.register_buffer(name, tensor)
            constant = gm.graph.get_attr(name)
            constant.meta = dict(node.meta)
            node.replace_all_uses_with(constant)
            gm.graph.erase_node(node)
    gm.recompile()


def _refuse_backward(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    def run(*args):
        raise BackwardNotSupported("hetflow compiles inference only: backward through a module compiled with "
                                   "backend='hetflow' is not supported (run it under torch.no_grad())")
    return make_boxed_func(run)


def _symint_outputs(gm: torch.fx.GraphModule) -> list[bool]:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    results = output.args[0] if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    return [isinstance(r, torch.fx.Node) and isinstance(r.meta.get("val"), torch.SymInt) for r in results]


class _CompiledForward:
    """Runs the compiled model: torch arguments in (weights dropped), torch tensors (and ints for sizes) out,
    on the device of the first tensor argument."""

    def __init__(self, compiled, input_names: list[str], kept: list[int], symint_outputs: list[bool]):
        self.compiled = compiled
        self.executor = compiled.executor
        self.names = input_names
        self.outputs = [v.name for v in compiled.graph.outputs]
        self.kept = kept
        self.symint_outputs = symint_outputs + [False] * len(self.outputs)

    def __call__(self, *args):
        args = [args[i] for i in self.kept]
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        results = self.executor.run({name: _to_numpy(a) for name, a in zip(self.names, args)})
        out = []
        for name, is_size in zip(self.outputs, self.symint_outputs):
            array = results[name]
            out.append(int(array) if is_size else _to_torch(array, device))
        return out


def _register() -> None:
    from torch._dynamo.backends.registry import _BACKENDS, register_backend
    if "hetflow" not in _BACKENDS:
        register_backend(name="hetflow")(hetflow_backend)


_register()
