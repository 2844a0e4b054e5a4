"""The lean call path: a call of a one-partition CPU artifact with everything decided at load.

Where the work per call is a few microseconds, what the executor does around ONNX
Runtime is the cost: checking the inputs against the graph's types, binding each
input and output by pointer, the arena, the run record. For a graph that is one
ONNX Runtime partition with static shapes, all of that can be settled once, at load:

* the inputs' signature is precompiled to (name, dtype, shape) tuples, so a call's
  check is a tuple compare per input (``InputSignature``); anything else (a wrong
  shape, a list, a missing name) goes to the executor's checked path, which raises
  the error naming the input, exactly as before;
* small inputs are copied into buffers bound once (a copy of a few KiB costs less
  than binding a pointer); larger ones are bound by pointer, and only again when
  the caller passes a different array;
* the outputs are bound once to arrays that are handed to the caller; they are
  written again only when the caller has let go of them (else fresh arrays are
  bound), so a result is never overwritten under the caller;
* no worker thread, flag or arena: one session runs in the calling thread.

``PreboundCall.plan(executor)`` says whether an executor's program qualifies, and why not.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from hetflow.ir.errors import HetflowError

from .errors import RuntimeFailure
from .runners.onnxruntime import InPlaceSlots

STAGE_BYTES = 16384   # inputs up to this size are copied into a prebound buffer; larger ones bound by pointer


class InputSignature:
    """The graph's inputs as plain tuples, for a check per call that costs a compare per input.

    ``arrays(feeds)`` returns the inputs in the graph's order when every one is a NumPy array of exactly the
    declared dtype and shape and no name is unknown or missing; otherwise None, and the caller takes the
    checked path, whose errors name the input and what was wrong."""

    def __init__(self, inputs):
        self.names = tuple(v.name for v in inputs)
        self.expected = tuple((v.name, np.dtype(v.type.dtype.numpy), tuple(v.type.shape)) for v in inputs)

    def arrays(self, feeds) -> list[np.ndarray] | None:
        if isinstance(feeds, dict):
            if len(feeds) != len(self.expected):
                return None
            values = [feeds.get(name) for name in self.names]
        elif isinstance(feeds, (list, tuple)) and len(feeds) == len(self.expected):
            values = feeds
        else:
            return None
        for array, (_, dtype, shape) in zip(values, self.expected):
            if type(array) is not np.ndarray or array.shape != shape or array.dtype != dtype:
                return None
        return list(values)


def static_signature(inputs) -> bool:
    """Every input has a static, known type (a dynamic one is bound per call by the executor)."""
    return all(v.type is not None and v.type.is_static for v in inputs)


def _references(arrays: list, index: int) -> int:
    """``arrays[index]``'s reference count as this function sees it: compared with the count of an array only
    the list holds, measured the same way at load, it says whether anyone else holds that array."""
    array = arrays[index]
    return sys.getrefcount(array)


class PreboundCall:
    """One CPU partition that is the whole graph, its inputs and outputs bound at load (module docstring)."""

    def __init__(self, executor, runner, part):
        graph = executor.graph
        self.part = part
        self.signature = InputSignature(graph.inputs)
        self.binding = runner.fixed_binding()
        self.output_names = list(dict.fromkeys(v.name for v in graph.outputs))
        self.single = self.output_names[0] if len(self.output_names) == 1 else None
        reads = set(part.input_names)
        # (position in the signature, name, staging buffer or None for a pointer-bound input)
        self.inputs = []
        for position, (name, dtype, shape) in enumerate(self.signature.expected):
            if name not in reads:
                continue
            staged = None
            if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize <= STAGE_BYTES:
                staged = np.zeros(shape, dtype)
                self.binding.bind_input(name, staged)
            self.inputs.append((position, name, staged))
        self.bound: list = [None] * len(self.inputs)   # the caller's array each pointer-bound input holds
        self.slot_of = {name: slot for slot, (_, name, _) in enumerate(self.inputs)}
        entries = getattr(runner, "inplace_outputs", None)
        # outputs written into an input's own buffer (a KV cache, one slot, put back after the call)
        self.inplace = InPlaceSlots(part.file, entries) if entries else None
        self.types = {v.name: v.type for v in graph.outputs}
        self.outputs = [self._fresh_output(name) for name in self.output_names]
        probe = [np.empty(0)]
        self.unshared = _references(probe, 0)  # an array only our list holds (what counts varies by interpreter)
        self.seconds = (0.0, 0.0)  # the last call's start and end (perf_counter), for the executor's record

    @staticmethod
    def plan(executor) -> str | None:
        """None when the executor's program can take this path; else why not (for tests and reports)."""
        if len(executor.partitions) != 1:
            return f"{len(executor.partitions)} partitions"
        part, runner = executor.partitions[0], executor.runners[0]
        if not hasattr(runner, "fixed_binding") or not getattr(runner, "bindable", False):
            return f"partition 0 runs on {type(runner).__name__}, not a bindable ONNX Runtime session"
        graph = executor.graph
        if executor.dims or not static_signature(graph.inputs) or not static_signature(graph.outputs):
            return "the graph has dynamic shapes"
        names = {v.name for v in graph.inputs}
        if not set(part.input_names) <= names:
            return "partition 0 reads values that are not graph inputs"
        if set(part.output_names) != {v.name for v in graph.outputs} or names & set(part.output_names):
            return "the graph's outputs are not exactly partition 0's outputs"
        return None

    def _bind_private(self, name: str, array: np.ndarray) -> None:
        """An input bound to this call's own copy (``InPlaceSlots``): the next call binds the caller's again."""
        self.binding.bind_input(name, array)
        slot = self.slot_of[name]
        if self.inputs[slot][2] is None:
            self.bound[slot] = None

    def _fresh_output(self, name: str) -> np.ndarray:
        t = self.types[name]
        array = np.empty(t.shape, t.dtype.numpy)
        self.binding.bind_output(name, array)
        return array

    def __call__(self, feeds) -> dict[str, np.ndarray] | None:
        """The outputs, or None when ``feeds`` is not the precompiled signature (the caller checks them)."""
        arrays = self.signature.arrays(feeds)
        if arrays is None:
            return None
        start = time.perf_counter()
        for slot, (position, name, staged) in enumerate(self.inputs):
            array = arrays[position]
            if staged is not None:
                staged[...] = array
            elif array is not self.bound[slot]:  # (holding it keeps the bound pointer valid)
                if not array.flags.c_contiguous:
                    array = np.ascontiguousarray(array)
                self.binding.bind_input(name, array)
                self.bound[slot] = array
        outputs = self.outputs
        for index in range(len(outputs)):
            if _references(outputs, index) > self.unshared:  # the caller still holds the last result:
                outputs[index] = self._fresh_output(self.output_names[index])  # bind a fresh one, not over it
        saved = None
        if self.inplace is not None:
            saved = self.inplace.bind({name: staged if staged is not None else self.bound[slot]
                                       for slot, (_, name, staged) in enumerate(self.inputs)},
                                      self._bind_private, self.binding.bind_output)
        try:
            self.binding.run()
        except HetflowError:
            raise
        except Exception as exc:
            part = self.part
            text = str(exc).strip()
            raise RuntimeFailure(f"partition {part.index} ({part.file}, device {part.device}) failed: "
                                 f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}") from exc
        finally:
            if saved:
                self.inplace.restore(saved)
        self.seconds = (start, time.perf_counter())
        if self.single is not None:
            return {self.single: outputs[0]}
        return dict(zip(self.output_names, outputs))
