"""The TVM CPU backend (``--cpu-backend tvm``): a CPU partition compiled to a native library by TVM.

The partition is lowered to the same ONNX model the ONNX Runtime backend emits
(``cpu.lower_partition``), imported with apache-tvm's Relax ONNX frontend and
compiled with ``tvm.compile`` for LLVM, untuned (no MetaSchedule search, no
schedules: TVM's default CPU pipeline). The library is exported as a ``.so``
into the artifact (``cpu/partN.so``, hashed by the manifest like every file).

Weights are not baked into the library: the large initializers become extra
inputs of the compiled function and are handed over from the artifact's
weights at load time, so they are stored once (small constants, shapes and
axes, stay constants). At run time the inputs are passed to the Relax VM as
DLPack views of the runtime's arrays (no copy when 64-byte aligned, which the
arena guarantees; an unaligned input is copied once into an aligned buffer).
The VM allocates its outputs; each is copied into the arena slot the memory
plan gives (one memcpy per output: the Relax VM has no destination-passing
entry point).

``tvm`` is imported only when a TVM partition is compiled or loaded.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from hetflow.ir import Graph

from hetflow.platform.targets import BACKEND, INSTALL, TargetError, check_target, host_target, import_tvm  # noqa: F401

from .cpu import BackendError, _inline, lower_partition



def tvm_model(graph: Graph) -> tuple[onnx.ModelProto, list[str]]:
    """The partition's ONNX model with its large weights turned into inputs (after the real inputs)."""
    model, weights = lower_partition(graph)
    g = model.graph
    kept = [init for init in g.initializer if init.name not in set(weights)]
    del g.initializer[:]
    g.initializer.extend(kept)
    for name in weights:
        data = graph.weights[name].data
        g.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(data.dtype), data.shape))
    return model, weights


def _failing_node(exc: BaseException) -> onnx.NodeProto | None:
    """The ONNX node the Relax frontend was converting when it raised (from its frame)."""
    tb = exc.__traceback__
    node = None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_construct_nodes":
            node = tb.tb_frame.f_locals.get("node", node)
        tb = tb.tb_next
    return node if isinstance(node, onnx.NodeProto) else None


def _unsupported_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes whose op the Relax ONNX frontend cannot convert (empty if this TVM does not say)."""
    from tvm.relax.frontend.onnx import onnx_frontend
    convert_map = getattr(onnx_frontend, "_get_convert_map", None)
    if convert_map is None:
        return []
    known = set(convert_map()) | {"Constant", "If"}
    return [n for n in model.graph.node if n.op_type not in known]


def _first_line(exc: BaseException) -> str:
    lines = [l.strip() for l in str(exc).strip().splitlines() if l.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]


def compile_partition(graph: Graph, name: str, target: dict | None = None) -> tuple[bytes, list[str], dict]:
    """Compile a partition graph with TVM; returns (the .so's bytes, the weight names it takes, the target)."""
    tvm = import_tvm(f"partition {name} is to be compiled by TVM (--cpu-backend tvm)")
    from tvm.relax.frontend.onnx import from_onnx
    target = target or host_target()
    model, weights = tvm_model(graph)
    ops = sorted({n.op_type for n in model.graph.node})
    missing = _unsupported_nodes(model)
    if missing:
        names = ", ".join(sorted({n.op_type for n in missing}))
        raise BackendError(f"TVM cannot import partition {name}: its ONNX frontend has no converter for {names} "
                           f"(ONNX node {missing[0].name!r}); compile with --cpu-backend onnxruntime")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the frontend prints its own error line
            mod = from_onnx(model, keep_params_in_input=False, sanitize_input_names=False)
    except Exception as exc:  # noqa: BLE001 - any frontend failure is this partition's compile error
        node = _failing_node(exc)
        where = f"op {node.op_type} (ONNX node {node.name!r})" if node is not None else f"ops {', '.join(ops)}"
        raise BackendError(f"TVM cannot import partition {name}: {where}: {_first_line(exc)}") from None
    try:
        executable = tvm.compile(mod, target=tvm.target.Target(target))
        with tempfile.TemporaryDirectory(prefix="hetflow-tvm-") as tmp:
            path = Path(tmp) / "partition.so"
            executable.export_library(str(path))
            library = path.read_bytes()
    except Exception as exc:  # noqa: BLE001
        raise BackendError(f"TVM cannot compile partition {name} (ops {', '.join(ops)}) for {target}: "
                           f"{_first_line(exc)}") from None
    return library, weights, target
