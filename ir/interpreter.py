"""The reference interpreter: runs any IR graph with the op table's NumPy kernels.

This is the executable spec every pass, backend and simulator is checked against.
Values are freed right after their last use, so peak memory follows the schedule.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from hetflow.ir import Graph, TensorType, make_kernel
from hetflow.ir.errors import HetflowError
from hetflow.ir.types import DType, shape_matches


class InputError(HetflowError, ValueError):
    """A run-time input that does not fit the graph (name, dtype or shape)."""


class ExecutionError(HetflowError, RuntimeError):
    """A kernel failed; names the node."""


def check_inputs(graph: Graph, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate run-time inputs against the graph's declared inputs; returns them as arrays."""
    expected = [v.name for v in graph.inputs]
    unknown = sorted(set(feeds) - set(expected))
    if unknown:
        raise InputError(f"unknown input {unknown[0]!r}; the model's inputs are {expected}")
    missing = [n for n in expected if n not in feeds]
    if missing:
        raise InputError(f"missing input {missing[0]!r}; the model's inputs are {expected}")
    arrays = {}
    for v in graph.inputs:
        a = np.asarray(feeds[v.name])
        got = TensorType.of(a)
        want = v.type
        if want is not None and got.dtype != want.dtype:
            raise InputError(f"input {v.name!r}: expected dtype {want.dtype.value} ({want}), got {got.dtype.value} {got}")
        if want is not None and not shape_matches(want.shape, a.shape):
            raise InputError(f"input {v.name!r}: expected shape {want}, got {got}")
        arrays[v.name] = a
    return arrays


class Interpreter:
    """Runs a graph; kernels are built once per node and reused across calls."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self._kernels: list = [None] * len(graph.nodes)
        last_use: dict[int, int] = {}
        for index, node in enumerate(graph.nodes):
            for v in node.inputs:
                if v is not None:
                    last_use[id(v)] = index
        keep = {id(v) for v in graph.outputs} | {id(w) for w in graph.weights.values()}
        self._free_after: list[list] = [[] for _ in graph.nodes]
        for index, node in enumerate(graph.nodes):
            for v in node.inputs:
                if v is not None and last_use.get(id(v)) == index and id(v) not in keep:
                    if v not in self._free_after[index]:
                        self._free_after[index].append(v)
            for out in node.outputs:  # outputs nobody reads are dropped at once
                if id(out) not in last_use and id(out) not in keep:
                    self._free_after[index].append(out)

    def run(self, feeds: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> list[np.ndarray]:
        graph = self.graph
        if not isinstance(feeds, Mapping):
            feeds = dict(zip([v.name for v in graph.inputs], feeds))
        env: dict[int, np.ndarray] = {}
        for name, array in check_inputs(graph, feeds).items():
            env[id(next(v for v in graph.inputs if v.name == name))] = array
        for w in graph.weights.values():
            env[id(w)] = w.data
        for index, node in enumerate(graph.nodes):
            kernel = self._kernels[index]
            if kernel is None:
                kernel = self._kernels[index] = make_kernel(node, graph.opset)
            args = [None if v is None else env[id(v)] for v in node.inputs]
            try:
                results = kernel(args)
            except Exception as exc:
                raise ExecutionError(f"{node.describe()} failed: {type(exc).__name__}: {exc}") from exc
            if len(results) < len(node.outputs):
                raise ExecutionError(f"{node.describe()} returned {len(results)} outputs, expected {len(node.outputs)}")
            for out, result in zip(node.outputs, results):
                env[id(out)] = _as_declared(result, out.type)
            for v in self._free_after[index]:
                env.pop(id(v), None)
        return [env[id(v)] for v in graph.outputs]


def _as_declared(result, t: TensorType | None) -> np.ndarray:
    """Kernels may return NumPy scalars or a wider dtype for a 0-d result; keep the declared dtype."""
    a = np.asarray(result)
    if t is not None and t.dtype is not DType.str and a.dtype != t.dtype.numpy and a.dtype.kind != "O":
        a = a.astype(t.dtype.numpy)
    return a


def run_graph(graph: Graph, feeds) -> list[np.ndarray]:
    return Interpreter(graph).run(feeds)
