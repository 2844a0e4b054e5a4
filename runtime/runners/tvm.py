"""Runner ``tvm-llvm``: a CPU partition TVM compiled, its library in a Relax VM (imports tvm; nothing else does)."""
from __future__ import annotations

import os
import tempfile

import numpy as np

from hetflow.ir.program import inline_weight
from hetflow.platform.targets import BACKEND, check_target, import_tvm

from . import RunnerError, register_runner

ALIGNMENT = 64


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]


@register_runner("tvm-llvm")
def load_tvm(part, executor):
    weights = {n: w.data for n, w in part.graph.weights.items() if not inline_weight(w)}
    return TvmPartition(part.library, weights, part.input_names, part.output_names,
                        name=f"partition {part.index} ({part.file})", target=part.target)


def _aligned(array: np.ndarray) -> np.ndarray:
    """The array itself when C-contiguous and 64-byte aligned (what TVM's DLPack import wants), else a copy that is."""
    if array.flags.c_contiguous and array.ctypes.data % ALIGNMENT == 0:
        return array
    raw = np.empty(array.nbytes + ALIGNMENT, np.uint8)
    start = (-raw.ctypes.data) % ALIGNMENT
    out = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


class TvmPartition:
    """A loaded TVM partition: the library in a Relax VM, its weights bound once, run on the runtime's arrays."""

    host_inputs = False

    def __init__(self, library: bytes, weights: dict[str, np.ndarray], input_names: list[str],
                 output_names: list[str], name: str = "partition", target: dict | None = None):
        tvm = import_tvm(f"{name} was compiled by TVM (backend {BACKEND}) and needs it to run")
        from tvm import relax
        check_target(target, name)
        self.tvm = tvm
        fd, path = tempfile.mkstemp(prefix="hetflow-tvm-", suffix=".so")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(library)
            module = tvm.runtime.load_module(path)
        except Exception as exc:  # noqa: BLE001
            raise RunnerError(f"TVM cannot load {name}: {_first_line(exc)}") from None
        finally:
            os.unlink(path)  # the loader keeps its mapping
        self.vm = relax.VirtualMachine(module, tvm.cpu())
        self.main = self.vm["main"]
        self._keep = [_aligned(np.asarray(w)) for w in weights.values()]
        self.weights = [tvm.runtime.from_dlpack(a) for a in self._keep]
        self.input_names = input_names
        self.output_names = output_names

    def _call(self, inputs: dict[str, np.ndarray]) -> list:
        arrays = [_aligned(np.asarray(inputs[n])) for n in self.input_names]
        result = self.main(*[self.tvm.runtime.from_dlpack(a) for a in arrays], *self.weights)
        return [result] if hasattr(result, "numpy") else list(result)

    def run(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Read ``inputs`` (no copy) and write the results into the preallocated ``outputs`` arrays."""
        for name, result in zip(self.output_names, self._call(inputs)):
            np.copyto(outputs[name], np.from_dlpack(result))

    def run_dynamic(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: result.numpy() for name, result in zip(self.output_names, self._call(inputs))}
