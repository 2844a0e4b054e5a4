"""The ONNX backend node tests (generated in memory from the installed onnx package) run through hetflow.

Used by ``benchmarks/onnx_conformance.py`` and the test suite. A case passes when
every output matches the expected one the way ``onnx.backend.test`` compares
them (same dtype, ``assert_allclose`` with the case's rtol/atol).
"""
from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class CaseResult:
    name: str
    passed: bool
    category: str  # "pass", "mismatch", "unsupported", "error" (a hetflow error), "crash" (anything else)
    message: str = ""


@functools.lru_cache(maxsize=1)
def node_test_cases():
    from onnx.backend.test.loader import load_model_tests
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tuple(load_model_tests(kind="node"))


def _compare(case, outputs, expected) -> None:
    import onnx
    from onnx import numpy_helper
    from onnx.backend.test.runner import Runner
    expected = [numpy_helper.to_array(e) if isinstance(e, onnx.TensorProto) else e for e in expected]
    if len(outputs) != len(expected):
        raise AssertionError(f"{len(outputs)} outputs, expected {len(expected)}")
    Runner.assert_similar_outputs(list(expected), list(outputs), rtol=case.rtol, atol=case.atol)


def run_case(case, prepare: Callable) -> CaseResult:
    """Run one case with ``prepare(model) -> callable(list_of_inputs) -> outputs``."""
    from hetflow.ir.errors import HetflowError
    from hetflow.ir.ops import UnsupportedOpError
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            run = prepare(case.model)
            for inputs, expected in case.data_sets:
                _compare(case, run(list(inputs)), expected)
    except AssertionError as exc:
        return CaseResult(case.name, False, "mismatch", str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    except UnsupportedOpError as exc:
        return CaseResult(case.name, False, "unsupported", str(exc))
    except HetflowError as exc:
        return CaseResult(case.name, False, "error", f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    except Exception as exc:  # a crash: a bug to fix, reported as such
        return CaseResult(case.name, False, "crash", f"{type(exc).__name__}: {exc}".splitlines()[0])
    return CaseResult(case.name, True, "pass")


def prepare_reference(model):
    from onnx.reference import ReferenceEvaluator
    evaluator = ReferenceEvaluator(model)
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    return lambda inputs: evaluator.run(None, dict(zip(names, inputs)))


def prepare_hetflow_interpreter(model):
    from hetflow.frontends.onnx import import_onnx
    from hetflow.runtime.interpreter import Interpreter
    graph = import_onnx(model)
    interpreter = Interpreter(graph)
    names = [v.name for v in graph.inputs]
    return lambda inputs: interpreter.run(dict(zip(names, inputs)))


def prepare_hetflow_compiled(model):
    """The compiled host path: hetflow.compile -> artifact on disk -> hetflow.runtime.load -> ONNX Runtime."""
    import tempfile

    import hetflow
    from hetflow.runtime import load
    compiled = hetflow.compile(model, platform="host", cache=False)  # (a node test compiles, it is not a reuse)
    with tempfile.TemporaryDirectory() as tmp:
        compiled.save(tmp)
        loaded = load(tmp)
    names = loaded.input_names
    return lambda inputs: list(loaded.run(dict(zip(names, inputs))).values())


def prepare_hetflow_gpu_program(model, device: str | None = None):
    """The GPU backend's emitted PyTorch program for the whole model, run by torch (on the CUDA GPU when
    there is one, else on the CPU). An op or corner the backend does not emit is a ``BackendError``.

    The backend reads some operands at emission (Slice bounds, reduction axes, pads: ``CONSTANT_OPERANDS``);
    the test models feed them as inputs, so those inputs are bound to the case's values first, as the
    weights a real model has there."""
    from hetflow.backends.gpu import CONSTANT_OPERANDS, emit_program
    from hetflow.runtime.runners.cuda import GpuPartition, cuda_available
    from hetflow.frontends.onnx import import_onnx
    device = device or ("cuda" if cuda_available() else "cpu")
    names = [v.name for v in import_onnx(model).inputs]

    def run(inputs):
        graph = import_onnx(model)
        feeds = dict(zip(names, inputs))
        for v in list(graph.inputs):
            if any(index in CONSTANT_OPERANDS.get(node.op, ()) for node, index in v.uses):
                graph.inputs.remove(v)
                v.data = np.asarray(feeds.pop(v.name))
                graph.weights[v.name] = v
        source = emit_program(graph, graph.name)
        runner = GpuPartition(source, {n: w.data for n, w in graph.weights.items()}, list(feeds),
                              [v.name for v in graph.outputs], name=graph.name, kernels="torch", device=device)
        return list(runner.run_dynamic(feeds).values())
    return run


def run_suite(prepare: Callable, names: set[str] | None = None, progress: Callable | None = None) -> list[CaseResult]:
    results = []
    cases = [c for c in node_test_cases() if names is None or c.name in names]
    start = time.time()
    for index, case in enumerate(cases):
        results.append(run_case(case, prepare))
        if progress is not None:
            progress(index + 1, len(cases), time.time() - start)
    return results
