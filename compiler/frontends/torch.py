"""PyTorch frontend: a ``torch.nn.Module`` (through ``torch.export``) or an ATen FX graph into the IR.

``capture_module`` exports the module, lowers it to core ATen with
``run_decompositions()`` and converts every FX node with one function per ATen
overload (the ``CONVERTERS`` table) into ops with ONNX semantics at opset 18.
``capture_fx`` runs the same importer on the core-ATen GraphModule that
``torch.compile`` hands a backend through ``aot_autograd``.

- Parameters, buffers and lifted constants become weights named by their
  state-dict names (``fc1.weight``); Python scalars become small weights of the
  dtype the op computes in.
- Value types come from ``node.meta["val"]``: dtype and shape, symbolic dims
  (SymInt) as their symbol names (``s0``), or unknown when a dim is an
  expression.
- Every node keeps the user's source location: the innermost stack frame outside
  torch (``model.py:12``) and the module path (``encoder.layers.0.attn``), or the
  FX node's name when the trace has neither.
- An ATen op without a converter raises ``UnsupportedOpError`` naming the op, the
  FX node and its location.
- A library's custom op (``torch.library``, e.g. transformers' MoE ``grouped_mm``)
  is keyed in ``CONVERTERS`` by its name, ``"namespace.op.overload"``: the op object
  exists only once that library is imported.
"""
from __future__ import annotations

import math
import operator
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx
from torch._prims_common import ELEMENTWISE_TYPE_PROMOTION_KIND, elementwise_dtypes

from hetflow.ir import DType, Graph, TensorType, UnsupportedOpError, infer_types
from hetflow.ir.errors import HetflowError
from hetflow.ir.graph import Value
from hetflow.ir.symbolic import forget_undeclared

__all__ = ["CONVERTERS", "FrontendError", "TorchCapture", "capture_fx", "capture_module"]

OPSET = 18
aten = torch.ops.aten
FxNode = torch.fx.Node


class FrontendError(HetflowError):
    """The module or FX graph cannot be captured (export failed, a construct hetflow does not take)."""


@dataclass
class TorchCapture:
    graph: Graph
    input_names: list[str]  # the user inputs, flattened, in call order
    out_spec: Any = None    # torch.utils._pytree.TreeSpec rebuilding the module's outputs, or None
    unbounded_sizes: list = None  # dynamic sizes exported without a finite max (names kept, not declared)


# --- entry points --------------------------------------------------------------------------------

def capture_module(module: torch.nn.Module, example_inputs: tuple, dynamic_shapes=None,
                   timings: dict[str, float] | None = None) -> TorchCapture:
    """Export ``module`` in eval mode, decompose to core ATen and import the graph. ``timings``: a dict that
    receives the seconds of each step (``capture: torch.export``, ``capture: decompositions``, ``capture:
    import``), for ``hetflow compile --timings``.

    Weights are the module's own memory, viewed read-only (as torch.export's ExportedProgram holds them), not
    copied: a copy of GPT-2 small's 500 MB cost about 1 s of a 7 s compile. The compiled model therefore sees
    the weights as they are when it runs; recompile after changing them."""
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    timings = {} if timings is None else timings
    try:
        start = time.perf_counter()
        program = torch.export.export(module.eval(), example_inputs, dynamic_shapes=dynamic_shapes)
        exported = time.perf_counter()
        program = program.run_decompositions()
        timings["capture: torch.export"] = exported - start
        timings["capture: decompositions"] = time.perf_counter() - exported
    except Exception as exc:  # torch raises many types; the first line says what failed
        raise FrontendError(f"torch.export failed on {type(module).__name__}: {_first_line(exc)}") from exc
    start = time.perf_counter()
    capture = _import_program(program, module, example_inputs, dynamic_shapes)
    timings["capture: import"] = time.perf_counter() - start
    return capture


def _import_program(program, module: torch.nn.Module, example_inputs: tuple, dynamic_shapes) -> TorchCapture:
    """The exported, decomposed program as IR: weights (referenced, read-only), user inputs, the nodes."""
    graph = Graph(_graph_name(type(module).__name__), OPSET)
    importer = _Importer(graph)
    input_names = []
    specs = program.graph_signature.input_specs
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    for spec, node in zip(specs, placeholders):
        kind = spec.kind.name
        if kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            data = program.state_dict.get(spec.target)
            if data is None:
                data = program.constants[spec.target]
            importer.env[node] = graph.add_weight(spec.target, _weight_view(data))
        elif kind == "USER_INPUT":
            value = graph.add_input(graph.fresh_name(node.name), _value_type(node.meta.get("val")))
            importer.env[node] = value
            input_names.append(value.name)
        else:
            raise FrontendError(f"input {node.name!r} of kind {kind} is not supported")
    user_outputs = [s.kind.name == "USER_OUTPUT" for s in program.graph_signature.output_specs]
    importer.run(program.graph, user_outputs)
    if dynamic_shapes is not None:
        users = [n for spec, n in zip(specs, placeholders) if spec.kind.name == "USER_INPUT"]
        renames, graph.dims, unbounded = _declared_sizes(program, module, example_inputs, dynamic_shapes, users)
        _rename_sizes(graph, renames)
        forget_undeclared(graph, keep=unbounded)
        return TorchCapture(graph, input_names, program.call_spec.out_spec, unbounded)
    return TorchCapture(graph, input_names, program.call_spec.out_spec)


def capture_fx(gm: torch.fx.GraphModule, example_inputs=None) -> TorchCapture:
    """Import an ATen FX graph (as ``aot_autograd`` hands it): every placeholder becomes a graph input."""
    graph = Graph("torch_fx", OPSET)
    importer = _Importer(graph)
    input_names = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            value = graph.add_input(graph.fresh_name(node.name), _value_type(node.meta.get("val")))
            importer.env[node] = value
            input_names.append(value.name)
        elif node.op == "get_attr":
            data = _fetch_attr(gm, node.target)
            importer.env[node] = graph.add_weight(graph.fresh_name(node.target.replace("/", ".")), _to_numpy(data))
    importer.run(gm.graph, None)
    return TorchCapture(graph, input_names, None)


def _fetch_attr(gm: torch.fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, torch.Tensor):
        raise FrontendError(f"get_attr {target!r} is a {type(obj).__name__}, not a tensor")
    return obj


# --- the importer -----------------------------------------------------------------------------------

Converter = Callable[["_Importer", FxNode], Any]
CONVERTERS: dict[Any, Converter] = {}


def converts(*targets):
    def register(fn: Converter) -> Converter:
        for target in targets:
            CONVERTERS[target] = fn
        return fn
    return register


class _Importer:
    """Walks an FX graph; converters emit IR nodes through ``emit`` at the current node's location."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.env: dict[FxNode, Any] = {}
        self.node: FxNode | None = None
        self.loc = ""
        self._consts: dict[tuple, Value] = {}

    def run(self, fx_graph: torch.fx.Graph, user_outputs: list[bool] | None) -> None:
        for node in fx_graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                continue
            if node.op == "output":
                self._set_outputs(node, user_outputs)
                continue
            if node.op != "call_function":
                raise FrontendError(f"FX node {node.name!r}: {node.op} nodes are not supported")
            self._convert(node)
        _remove_dead(self.graph)

    def _convert(self, node: FxNode) -> None:
        self.node, self.loc = node, _location(node)
        converter = CONVERTERS.get(node.target) or CONVERTERS.get(_target_name(node.target))
        if converter is None:
            raise UnsupportedOpError(f"unsupported op {_target_name(node.target)} (node {node.name} at {self.loc})")
        first = len(self.graph.nodes)
        result = converter(self, node)
        if isinstance(result, Value):
            self._take_fx_name(node.name, result, first)
        self.env[node] = result

    def _take_fx_name(self, name: str, result: Value, first: int) -> None:
        """The value an FX node becomes carries the node's name; helpers emitted before it take suffixed ones."""
        created = [out for n in self.graph.nodes[first:] for out in n.outputs]
        if result.name == name or not any(out is result for out in created):
            return
        holder = next((out for out in created if out.name == name), None)
        if holder is not None:
            holder.name, result.name = result.name, holder.name

    def _set_outputs(self, node: FxNode, user_outputs: list[bool] | None) -> None:
        results = node.args[0]
        results = list(results) if isinstance(results, (list, tuple)) else [results]
        if user_outputs is not None:
            results = [r for r, keep in zip(results, user_outputs) if keep]
        self.node, self.loc = node, "output"
        for result in results:
            if result is None:
                raise FrontendError("the model returns None among its tensor outputs; hetflow needs tensors")
            value = self.value(result) if isinstance(result, FxNode) else self.scalar(result, _scalar_dtype(result))
            if value.producer is None or value.is_output:
                value = self.emit("Identity", [value], out=value.type)
            self.graph.outputs.append(value)

    # --- failing ------------------------------------------------------------------------------------
    def unsupported(self, reason: str) -> UnsupportedOpError:
        node = self.node
        return UnsupportedOpError(f"unsupported op {_target_name(node.target)} (node {node.name} at {self.loc}): {reason}")

    # --- reading the FX node ----------------------------------------------------------------------
    def arg(self, index: int, name: str, default: Any = None) -> Any:
        args, kwargs = self.node.args, self.node.kwargs
        if index < len(args):
            return args[index]
        return kwargs.get(name, default)

    def out(self, index: int | None = None) -> TensorType:
        val = self.node.meta.get("val")
        if index is not None:
            val = val[index]
        t = _value_type(val)
        if t is None:
            raise self.unsupported("its result has no tensor type in node.meta['val']")
        return t

    def value(self, arg: Any) -> Value:
        """The IR value of an FX node argument."""
        if not isinstance(arg, FxNode):
            raise self.unsupported(f"expected a tensor argument, got {arg!r}")
        value = self.env.get(arg)
        if not isinstance(value, Value):
            raise self.unsupported(f"argument {arg.name} has no single tensor value")
        return value

    def operand(self, arg: Any, dtype: DType) -> Value:
        """A tensor argument cast to ``dtype``, or a Python scalar as a small weight of that dtype."""
        if isinstance(arg, FxNode):
            return self.cast(self.value(arg), dtype)
        return self.scalar(arg, dtype)

    def promoted(self, *args: Any) -> DType:
        """The dtype torch computes ``args`` in (tensors and Python scalars, torch's promotion rules)."""
        dummies = []
        for a in args:
            val = a.meta.get("val") if isinstance(a, FxNode) else a
            if isinstance(val, torch.Tensor):
                dummies.append(torch.empty((1,) if val.dim() else (), dtype=val.dtype))
            elif isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                dummies.append({torch.SymInt: 1, torch.SymFloat: 1.0, torch.SymBool: True}[type(val)])
            elif val is not None:
                dummies.append(val)
        _, result = elementwise_dtypes(*dummies, type_promotion_kind=ELEMENTWISE_TYPE_PROMOTION_KIND.DEFAULT)
        return _dtype(result)

    # --- building -------------------------------------------------------------------------------
    def emit(self, op: str, inputs: list[Value | None], attrs: dict | None = None,
             out: TensorType | None = None) -> Value:
        """One node with one output; its type is ``out`` or, when omitted, ONNX type inference's."""
        return self.emit_multi(op, inputs, attrs, [out])[0]

    def emit_multi(self, op: str, inputs: list[Value | None], attrs: dict | None,
                   outs: list[TensorType | None]) -> list[Value]:
        hint = self.node.name if self.node is not None else op.lower()
        node = self.graph.add_node(op, inputs, outs, attrs, loc=self.loc, output_names=[hint] * len(outs))
        if any(t is None for t in outs):
            inferred = infer_types(node, self.graph.opset)
            for value, t in zip(node.outputs, inferred):
                value.type = value.type or t
        return node.outputs

    def const(self, data: np.ndarray, hint: str = "const") -> Value:
        """A small constant as a weight, shared between nodes that need the same one."""
        data = np.array(data, order="C")  # (ascontiguousarray would make a 0-d scalar 1-d)
        key = (data.dtype.str, data.shape, data.tobytes())
        if key not in self._consts:
            self._consts[key] = self.graph.add_weight(self.graph.fresh_name(hint), data)
        return self._consts[key]

    def scalar(self, x: Any, dtype: DType) -> Value:
        if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            raise self.unsupported("a symbolic scalar argument needs its FX node")
        return self.const(np.array(x, dtype=dtype.numpy), "scalar")

    def ints(self, items: list[int]) -> Value:
        return self.const(np.array(list(items), dtype=np.int64), "ints")

    def int_list(self, items: list) -> Value:
        """A 1-D int64 operand from a list of ints and SymInt FX nodes (sizes, starts, ends)."""
        if all(not isinstance(i, FxNode) for i in items):
            return self.ints([int(i) for i in items])
        parts = []
        for item in items:
            if isinstance(item, FxNode):
                parts.append(self.emit("Unsqueeze", [self.cast(self.value(item), DType.i64), self.ints([0])]))
            else:
                parts.append(self.ints([int(item)]))
        return self.emit("Concat", parts, {"axis": 0})

    def cast(self, value: Value, dtype: DType) -> Value:
        if value.type is not None and value.type.dtype == dtype:
            return value
        shape = value.type.shape if value.type is not None else None
        return self.emit("Cast", [value], {"to": dtype.onnx}, out=TensorType(dtype, shape))

    def shape_of(self, t: TensorType, like: Value) -> Value:
        """``t``'s shape as an int64 operand: a constant when static, else taken from ``like`` at run time."""
        if t.is_static:
            return self.ints(list(t.shape))
        return self.emit("Shape", [like])


def _remove_dead(graph: Graph) -> None:
    """Drop nodes and constants nothing reads (unused tuple outputs, folded helpers, unused buffers)."""
    for node in reversed(list(graph.nodes)):
        if not any(o.is_used for o in node.outputs):
            graph.remove(node)
    for name, weight in list(graph.weights.items()):
        if not weight.is_used:
            graph.remove_weight(name)


# --- types, names and locations -------------------------------------------------------------------

_DTYPES = {
    torch.float32: DType.f32, torch.float64: DType.f64, torch.float16: DType.f16, torch.bfloat16: DType.bf16,
    torch.int8: DType.i8, torch.int16: DType.i16, torch.int32: DType.i32, torch.int64: DType.i64,
    torch.uint8: DType.u8, torch.bool: DType.bool, torch.complex64: DType.c64, torch.complex128: DType.c128,
}


def _dtype(dtype: torch.dtype) -> DType:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise FrontendError(f"torch dtype {dtype} is not supported") from None


def _scalar_dtype(x: Any) -> DType:
    if isinstance(x, bool):
        return DType.bool
    return DType.i64 if isinstance(x, int) else DType.f32


def _dim(d) -> int | str | None:
    if isinstance(d, int):
        return d
    from torch.fx.experimental.symbolic_shapes import is_concrete_int
    if is_concrete_int(d):
        return int(d)
    return _expression_text(d.node.expr)


def _expression_text(expr) -> str | None:
    """A SymInt's sympy expression in the IR's dim syntax (``hetflow.ir.symbolic``: names, integers,
    ``+ - * // %``, ``max``, ``min``); None for anything else (a dim then unknown, sized at run time)."""
    import sympy
    if isinstance(expr, sympy.Integer):
        return str(int(expr))
    if isinstance(expr, sympy.Symbol):
        return expr.name
    kind = type(expr).__name__
    parts = [_expression_text(a) for a in expr.args]
    if not parts or any(p is None for p in parts):
        return None
    if isinstance(expr, sympy.Add):
        return "(" + " + ".join(parts) + ")"
    if isinstance(expr, sympy.Mul):
        return "*".join(parts)
    if kind in ("Pow", "PowByNatural") and isinstance(expr.args[1], sympy.Integer) and 0 < int(expr.args[1]) <= 8:
        return "*".join([parts[0]] * int(expr.args[1]))
    if kind == "FloorDiv":
        return f"({parts[0]} // {parts[1]})"
    if kind in ("Mod", "PythonMod"):
        return f"({parts[0]} % {parts[1]})"
    if kind in ("Max", "Min"):
        return f"{kind.lower()}({', '.join(parts)})"
    return None


def _rename_sizes(graph: Graph, names: dict[str, str]) -> None:
    """torch's size symbols (``s77``) renamed to the user's Dim names (``batch``) in every type."""
    if not names:
        return
    word = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

    def rename(d):
        return word.sub(lambda m: names.get(m.group(), m.group()), d) if isinstance(d, str) else d
    for value in graph.values():
        if value.type is not None and value.type.shape is not None and any(isinstance(d, str) for d in value.type.shape):
            value.type = TensorType(value.type.dtype, tuple(rename(d) for d in value.type.shape))


def _declared_sizes(program, module, example_inputs: tuple, dynamic_shapes, placeholders) -> tuple[dict, dict]:
    """``(renames, ranges, unbounded)``: each user Dim's torch symbol -> the Dim's name, each size's (min,
    max) from the exported program's range constraints, and the sizes without a finite max (kept as names,
    not declared: ``hetflow.compile`` refuses them, the memory plan being made for the maximum)."""
    import inspect
    specs = dynamic_shapes
    if isinstance(specs, dict):
        try:
            bound = inspect.signature(module.forward).bind(*example_inputs)
            specs = [specs.get(name) for name in bound.arguments]
        except TypeError:
            specs = list(specs.values())
    renames: dict[str, str] = {}
    for spec, node in zip(specs or [], placeholders):
        val = node.meta.get("val")
        if spec is None or not isinstance(val, torch.Tensor):
            continue
        axes = spec.items() if isinstance(spec, dict) else enumerate(spec)
        for axis, dim in axes:
            name = getattr(dim, "__name__", None)
            if name is None or not isinstance(axis, int) or axis >= val.dim():
                continue
            size = val.shape[axis]
            if isinstance(size, torch.SymInt) and getattr(size.node.expr, "is_Symbol", False):
                renames[size.node.expr.name] = name
    ranges: dict[str, tuple[int, int]] = {}
    unbounded: list[str] = []
    for symbol, bounds in program.range_constraints.items():
        name = renames.get(getattr(symbol, "name", str(symbol)), getattr(symbol, "name", str(symbol)))
        try:
            low, high = int(bounds.lower), int(bounds.upper)
        except (TypeError, ValueError, OverflowError, AttributeError):  # sympy's infinity: no max
            low, high = 0, None
        if high is None or high > 2 ** 40:
            unbounded.append(name)
        else:
            ranges[name] = (low, high)
    return renames, ranges, unbounded


def _value_type(val: Any) -> TensorType | None:
    if isinstance(val, torch.Tensor):
        return TensorType(_dtype(val.dtype), tuple(_dim(d) for d in val.shape))
    if isinstance(val, (bool, torch.SymBool)):
        return TensorType(DType.bool, ())
    if isinstance(val, (int, torch.SymInt)):
        return TensorType(DType.i64, ())
    if isinstance(val, (float, torch.SymFloat)):
        return TensorType(DType.f32, ())
    return None


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A weight's data: a copy the graph owns."""
    return tensor_to_numpy(t).copy()


def _weight_view(t: torch.Tensor) -> np.ndarray:
    """A weight's data as a read-only view of the tensor's memory (a copy only where NumPy cannot view it: another
    device, bf16): nothing in hetflow may write into a module's weights."""
    view = tensor_to_numpy(t)
    view.flags.writeable = False
    return view


# NumPy dtypes torch.from_numpy does not take (ml_dtypes'), crossed as a same-size integer view
_INT_OF_SIZE = {1: (np.int8, torch.int8), 2: (np.int16, torch.int16)}
_TORCH_OF_NUMPY_NAME = {"bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn,
                        "float8_e5m2": torch.float8_e5m2}
_NUMPY_NAME_OF_TORCH = {t: name for name, t in _TORCH_OF_NUMPY_NAME.items()}


def tensor_to_numpy(x: Any) -> np.ndarray:
    """A tensor (any device) as a NumPy array without a float round trip: bf16 and float8 cross as a same-size
    integer view into ml_dtypes' types (what hetflow's DType uses); Python scalars as 0-d arrays."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        numpy_name = _NUMPY_NAME_OF_TORCH.get(x.dtype)
        if numpy_name is None:
            return x.numpy()
        import ml_dtypes  # what onnx (and so hetflow's DType.bf16.numpy) uses for bf16 and the float8s
        np_int, torch_int = _INT_OF_SIZE[x.element_size()]
        return x.contiguous().view(torch_int).numpy().view(getattr(ml_dtypes, numpy_name))
    if isinstance(x, bool):
        return np.array(x)
    if isinstance(x, int):
        return np.array(x, dtype=np.int64)
    return np.array(x, dtype=np.float32)


def numpy_to_tensor(array: np.ndarray, device=None) -> torch.Tensor:
    """The inverse of ``tensor_to_numpy``, on ``device`` (None or the CPU: no copy where NumPy allows)."""
    array = np.asarray(array)
    target = _TORCH_OF_NUMPY_NAME.get(array.dtype.name)
    if target is None:
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    else:
        np_int, torch_int = _INT_OF_SIZE[array.dtype.itemsize]
        tensor = torch.from_numpy(np.ascontiguousarray(array).view(np_int)).view(target)
    return tensor if device is None or device.type == "cpu" else tensor.to(device)


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    module = getattr(target, "__module__", "") or ""
    return f"{module.lstrip('_')}.{getattr(target, '__name__', target)}".lstrip(".")


def _graph_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return name if name and not name[0].isdigit() else f"m_{name}"


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_FRAME_RE = re.compile(r'File "([^"]+)", line (\d+)')


def _user_frame(stack_trace: str | None) -> str:
    """``file.py:LINE`` of the innermost frame outside torch itself (the model's code)."""
    if not stack_trace:
        return ""
    frames = [(f, line) for f, line in _FRAME_RE.findall(stack_trace) if not f.startswith(_TORCH_DIR)]
    if not frames:
        return ""
    path, line = frames[-1]
    return f"{os.path.basename(path)}:{line}"


def _module_path(stack: dict | None) -> str:
    """The innermost module's path, cleaned of dynamo's spelling: ``L['self'].layers[0]`` -> ``layers.0``."""
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    path = re.sub(r"^L\['[^']*'\]\.?", "", path)
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".")


def _location(node: FxNode) -> str:
    frame = _user_frame(node.meta.get("stack_trace"))
    path = _module_path(node.meta.get("nn_module_stack"))
    if frame and path:
        return f"{frame} ({path})"
    return frame or path or node.name


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _axis(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


# ===================================================================================================
# The converters: one function per ATen overload (or a family of overloads sharing a rule).
# Each reads the FX node through the importer and returns a Value (a list for tuple results).
# ===================================================================================================

# --- no-ops, aliases and tuple access ------------------------------------------------------------------

@converts(aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default,
          aten.sym_constrain_range.default, aten._assert_async.msg)
def _nothing(imp: _Importer, node: FxNode):
    return None


@converts(aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default)
def _alias(imp: _Importer, node: FxNode) -> Value:
    return imp.value(node.args[0])


@converts(operator.getitem)
def _getitem(imp: _Importer, node: FxNode):
    items = imp.env.get(node.args[0])
    if not isinstance(items, (list, tuple)):
        raise imp.unsupported(f"{node.args[0].name} is not a tuple")
    item = items[node.args[1]]
    if item is None:
        raise imp.unsupported(f"output {node.args[1]} of {node.args[0].name} is not supported (training-only result)")
    return item


# --- elementwise -----------------------------------------------------------------------------------------

def _unary(op: str, attrs: dict | None = None) -> Converter:
    def convert(imp: _Importer, node: FxNode) -> Value:
        out = imp.out()
        return imp.emit(op, [imp.operand(node.args[0], out.dtype)], attrs, out=out)
    return convert


for _target, _op in [(aten.relu.default, "Relu"), (aten.sigmoid.default, "Sigmoid"), (aten.tanh.default, "Tanh"),
                     (aten.exp.default, "Exp"), (aten.log.default, "Log"), (aten.sqrt.default, "Sqrt"),
                     (aten.neg.default, "Neg"), (aten.abs.default, "Abs"), (aten.erf.default, "Erf"),
                     (aten.sin.default, "Sin"), (aten.cos.default, "Cos"), (aten.reciprocal.default, "Reciprocal"),
                     (aten.floor.default, "Floor"), (aten.ceil.default, "Ceil"), (aten.round.default, "Round"),
                     (aten.sign.default, "Sign"), (aten.logical_not.default, "Not"),
                     (aten.hardswish.default, "HardSwish")]:
    converts(_target)(_unary(_op))
converts(aten.hardsigmoid.default)(_unary("HardSigmoid", {"alpha": 1.0 / 6.0, "beta": 0.5}))


@converts(aten.isnan.default)
def _isnan(imp: _Importer, node: FxNode) -> Value:
    return imp.emit("IsNaN", [imp.value(node.args[0])], out=imp.out())


@converts(aten.bitwise_not.default)
def _bitwise_not(imp: _Importer, node: FxNode) -> Value:
    out = imp.out()
    return imp.emit("Not" if out.dtype == DType.bool else "BitwiseNot", [imp.value(node.args[0])], out=out)


@converts(aten.rsqrt.default)
def _rsqrt(imp: _Importer, node: FxNode) -> Value:
    out = imp.out()
    root = imp.emit("Sqrt", [imp.operand(node.args[0], out.dtype)], out=out)
    return imp.emit("Reciprocal", [root], out=out)


@converts(aten.log1p.default)
def _log1p(imp: _Importer, node: FxNode) -> Value:
    out = imp.out()
    shifted = imp.emit("Add", [imp.operand(node.args[0], out.dtype), imp.scalar(1, out.dtype)], out=out)
    return imp.emit("Log", [shifted], out=out)


@converts(aten.silu.default)
def _silu(imp: _Importer, node: FxNode) -> Value:
    out = imp.out()
    x = imp.operand(node.args[0], out.dtype)
    return imp.emit("Mul", [x, imp.emit("Sigmoid", [x], out=out)], out=out)


@converts(aten.gelu.default)
def _gelu(imp: _Importer, node: FxNode) -> Value:
    """Opset 18 has no Gelu: exact 0.5*x*(1+erf(x/sqrt2)); tanh 0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3)))."""
    out = imp.out()
    x = imp.operand(node.args[0], out.dtype)
    k = lambda c: imp.scalar(c, out.dtype)  # noqa: E731
    if imp.arg(1, "approximate", "none") == "tanh":
        cube = imp.emit("Mul", [imp.emit("Mul", [x, x], out=out), x], out=out)
        inner = imp.emit("Add", [x, imp.emit("Mul", [cube, k(0.044715)], out=out)], out=out)
        core = imp.emit("Tanh", [imp.emit("Mul", [inner, k(math.sqrt(2.0 / math.pi))], out=out)], out=out)
    else:
        core = imp.emit("Erf", [imp.emit("Mul", [x, k(1.0 / math.sqrt(2.0))], out=out)], out=out)
    half_x = imp.emit("Mul", [x, k(0.5)], out=out)
    return imp.emit("Mul", [half_x, imp.emit("Add", [core, k(1.0)], out=out)], out=out)


@converts(aten.leaky_relu.default)
def _leaky_relu(imp: _Importer, node: FxNode) -> Value:
    out = imp.out()
    return imp.emit("LeakyRelu", [imp.value(node.args[0])], {"alpha": float(imp.arg(1, "negative_slope", 0.01))},
                    out=out)


@converts(aten.elu.default)
def _elu(imp: _Importer, node: FxNode) -> Value:
    if imp.arg(2, "scale", 1) != 1 or imp.arg(3, "input_scale", 1) != 1:
        raise imp.unsupported("elu with scale or input_scale other than 1")
    return imp.emit("Elu", [imp.value(node.args[0])], {"alpha": float(imp.arg(1, "alpha", 1.0))}, out=imp.out())


@converts(aten.softplus.default)
def _softplus(imp: _Importer, node: FxNode) -> Value:
    out = imp.out()
    beta = float(imp.arg(1, "beta", 1.0))
    x = imp.value(node.args[0])
    if beta == 1.0:
        return imp.emit("Softplus", [x], out=out)
    scaled = imp.emit("Softplus", [imp.emit("Mul", [x, imp.scalar(beta, out.dtype)], out=out)], out=out)
    return imp.emit("Div", [scaled, imp.scalar(beta, out.dtype)], out=out)


@converts(aten.clamp.default, aten.hardtanh.default)
def _clamp(imp: _Importer, node: FxNode) -> Value:
    out = imp.out()
    if node.target is aten.hardtanh.default:
        lo, hi = imp.arg(1, "min_val", -1.0), imp.arg(2, "max_val", 1.0)
    else:
        lo, hi = imp.arg(1, "min"), imp.arg(2, "max")
    x = imp.operand(node.args[0], out.dtype)
    bounds = [None if b is None else imp.scalar(b, out.dtype) for b in (lo, hi)]
    return imp.emit("Clip", [x] + bounds, out=out)


@converts(aten.clamp.Tensor)
def _clamp_tensor(imp: _Importer, node: FxNode) -> Value:
    out = imp.out()
    result = imp.operand(node.args[0], out.dtype)
    lo, hi = imp.arg(1, "min"), imp.arg(2, "max")
    if lo is not None:
        result = imp.emit("Max", [result, imp.operand(lo, out.dtype)], out=out)
    if hi is not None:
        result = imp.emit("Min", [result, imp.operand(hi, out.dtype)], out=out)
    return result


def _binary(op: str) -> Converter:
    """Arithmetic: both operands are computed in the result's dtype (torch's promotion already applied)."""
    def convert(imp: _Importer, node: FxNode) -> Value:
        out = imp.out()
        a, b = imp.operand(node.args[0], out.dtype), imp.operand(node.args[1], out.dtype)
        return imp.emit(op, [a, b], out=out)
    return convert


for _targets, _op in [((aten.mul.Tensor, aten.mul.Scalar), "Mul"), ((aten.div.Tensor, aten.div.Scalar), "Div"),
                      ((aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.pow.Scalar), "Pow"),
                      ((aten.maximum.default,), "Max"), ((aten.minimum.default,), "Min")]:
    converts(*_targets)(_binary(_op))


@converts(aten.fmod.Tensor, aten.fmod.Scalar)
def _fmod(imp: _Importer, node: FxNode) -> Value:
    out = imp.out()
    a, b = imp.operand(node.args[0], out.dtype), imp.operand(node.args[1], out.dtype)
    return imp.emit("Mod", [a, b], {"fmod": 1}, out=out)


@converts(aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.rsub.Tensor)
def _add_sub(imp: _Importer, node: FxNode) -> Value:
    out = imp.out()
    a, b = imp.operand(node.args[0], out.dtype), imp.operand(node.args[1], out.dtype)
    alpha = imp.arg(2, "alpha", 1)
    if alpha != 1:
        b = imp.emit("Mul", [b, imp.scalar(alpha, out.dtype)])
    if node.target in (aten.rsub.Scalar, aten.rsub.Tensor):
        a, b = b, a
    op = "Add" if node.target in (aten.add.Tensor, aten.add.Scalar) else "Sub"
    return imp.emit(op, [a, b], out=out)


def _remainder_needs_fix(imp: _Importer, mod: Value, b: Value) -> Value:
    """Where C's remainder (fmod) and Python's differ: a nonzero remainder whose sign is not the divisor's."""
    zero = imp.scalar(0, mod.type.dtype)
    nonzero = imp.emit("Not", [imp.emit("Equal", [mod, zero])])
    return imp.emit("And", [nonzero, imp.emit("Xor", [imp.emit("Less", [b, zero]), imp.emit("Less", [mod, zero])])])


@converts(aten.div.Tensor_mode, aten.div.Scalar_mode)
def _div_mode(imp: _Importer, node: FxNode) -> Value:
    """Rounding division as torch computes it (floor: through fmod, so 3.0 // 0.3 is 9 as in torch)."""
    out = imp.out()
    mode = imp.arg(2, "rounding_mode")
    a, b = imp.operand(node.args[0], out.dtype), imp.operand(node.args[1], out.dtype)
    if mode is None:
        return imp.emit("Div", [a, b], out=out)
    if mode == "trunc":
        if not out.dtype.is_float:
            return imp.emit("Div", [a, b], out=out)  # integer Div truncates
        quotient = imp.emit("Div", [a, b])
        return imp.emit("Mul", [imp.emit("Sign", [quotient]), imp.emit("Floor", [imp.emit("Abs", [quotient])])],
                        out=out)
    one = imp.scalar(1, out.dtype)
    mod = imp.emit("Mod", [a, b], {"fmod": 1})
    fix = _remainder_needs_fix(imp, mod, b)
    if not out.dtype.is_float:
        quotient = imp.emit("Div", [a, b])
        return imp.emit("Where", [fix, imp.emit("Sub", [quotient, one]), quotient], out=out)
    exact = imp.emit("Div", [imp.emit("Sub", [a, mod]), b])
    exact = imp.emit("Where", [fix, imp.emit("Sub", [exact, one]), exact])
    floored = imp.emit("Floor", [exact])
    round_up = imp.emit("Greater", [imp.emit("Sub", [exact, floored]), imp.scalar(0.5, out.dtype)])
    return imp.emit("Where", [round_up, imp.emit("Add", [floored, one]), floored], out=out)


@converts(aten.remainder.Tensor, aten.remainder.Scalar)
def _remainder(imp: _Importer, node: FxNode) -> Value:
    """Python's modulo (the divisor's sign): ONNX Mod for integers; fmod plus the divisor where signs differ."""
    out = imp.out()
    a, b = imp.operand(node.args[0], out.dtype), imp.operand(node.args[1], out.dtype)
    if not out.dtype.is_float:
        return imp.emit("Mod", [a, b], {"fmod": 0}, out=out)
    mod = imp.emit("Mod", [a, b], {"fmod": 1})
    fix = _remainder_needs_fix(imp, mod, b)
    return imp.emit("Where", [fix, imp.emit("Add", [mod, b]), mod], out=out)


def _compare(op: str, negate: bool = False) -> Converter:
    def convert(imp: _Importer, node: FxNode) -> Value:
        dtype = imp.promoted(node.args[0], node.args[1])
        a, b = imp.operand(node.args[0], dtype), imp.operand(node.args[1], dtype)
        if negate:
            return imp.emit("Not", [imp.emit(op, [a, b])], out=imp.out())
        return imp.emit(op, [a, b], out=imp.out())
    return convert


for _targets, _op, _negate in [((aten.eq.Tensor, aten.eq.Scalar), "Equal", False),
                               ((aten.ne.Tensor, aten.ne.Scalar), "Equal", True),
                               ((aten.lt.Tensor, aten.lt.Scalar), "Less", False),
                               ((aten.le.Tensor, aten.le.Scalar), "LessOrEqual", False),
                               ((aten.gt.Tensor, aten.gt.Scalar), "Greater", False),
                               ((aten.ge.Tensor, aten.ge.Scalar), "GreaterOrEqual", False)]:
    converts(*_targets)(_compare(_op, _negate))


def _logical(op: str) -> Converter:
    def convert(imp: _Importer, node: FxNode) -> Value:
        a, b = imp.operand(node.args[0], DType.bool), imp.operand(node.args[1], DType.bool)
        return imp.emit(op, [a, b], out=imp.out())
    return convert


def _bitwise(logical_op: str, bitwise_op: str) -> Converter:
    def convert(imp: _Importer, node: FxNode) -> Value:
        out = imp.out()
        a, b = imp.operand(node.args[0], out.dtype), imp.operand(node.args[1], out.dtype)
        return imp.emit(logical_op if out.dtype == DType.bool else bitwise_op, [a, b], out=out)
    return convert


converts(aten.logical_and.default)(_logical("And"))
converts(aten.logical_or.default)(_logical("Or"))
converts(aten.logical_xor.default)(_logical("Xor"))
converts(aten.bitwise_and.Tensor, aten.bitwise_and.Scalar)(_bitwise("And", "BitwiseAnd"))
converts(aten.bitwise_or.Tensor, aten.bitwise_or.Scalar)(_bitwise("Or", "BitwiseOr"))
converts(aten.bitwise_xor.Tensor, aten.bitwise_xor.Scalar)(_bitwise("Xor", "BitwiseXor"))


@converts(aten.where.self)
def _where(imp: _Importer, node: FxNode) -> Value:
    out = imp.out()
    cond = imp.operand(node.args[0], DType.bool)
    return imp.emit("Where", [cond, imp.operand(node.args[1], out.dtype), imp.operand(node.args[2], out.dtype)],
                    out=out)


@converts(aten._to_copy.default)
def _to_copy(imp: _Importer, node: FxNode) -> Value:
    return imp.cast(imp.value(node.args[0]), imp.out().dtype)


# --- creation ---------------------------------------------------------------------------------------------

@converts(aten.scalar_tensor.default)
def _scalar_tensor(imp: _Importer, node: FxNode) -> Value:
    return imp.scalar(node.args[0], imp.out().dtype)


def _filled(imp: _Importer, out: TensorType, fill: Any, like: Value | None = None) -> Value:
    """A tensor of ``out``'s type filled with ``fill``: a weight when tiny, else ConstantOfShape."""
    if out.is_static and (out.numel() or 0) <= 16:
        return imp.const(np.full(out.shape, fill, dtype=out.dtype.numpy), "full")
    if not out.is_static and like is None:
        raise imp.unsupported("a symbolic size given without a tensor to take it from")
    shape = imp.shape_of(out, like)
    value = np.array([fill], dtype=out.dtype.numpy)
    return imp.emit("ConstantOfShape", [shape], {"value": value}, out=out)


@converts(aten.full.default)
def _full(imp: _Importer, node: FxNode) -> Value:
    out = imp.out()
    if not out.is_static:
        shape = imp.int_list(list(node.args[0]))
        return imp.emit("ConstantOfShape", [shape], {"value": np.array([node.args[1]], dtype=out.dtype.numpy)}, out=out)
    return _filled(imp, out, node.args[1])


@converts(aten.full_like.default)
def _full_like(imp: _Importer, node: FxNode) -> Value:
    return _filled(imp, imp.out(), node.args[1], like=imp.value(node.args[0]))


@converts(aten.zeros_like.default, aten.empty_like.default)
def _zeros_like(imp: _Importer, node: FxNode) -> Value:
    return _filled(imp, imp.out(), 0, like=imp.value(node.args[0]))


@converts(aten.ones_like.default)
def _ones_like(imp: _Importer, node: FxNode) -> Value:
    return _filled(imp, imp.out(), 1, like=imp.value(node.args[0]))


@converts(aten.empty.memory_format, aten.empty_permuted.default, aten.zeros.default)
def _zeros(imp: _Importer, node: FxNode) -> Value:
    return _full_size(imp, node, 0)


@converts(aten.ones.default)
def _ones(imp: _Importer, node: FxNode) -> Value:
    return _full_size(imp, node, 1)


def _full_size(imp: _Importer, node: FxNode, fill: Any) -> Value:
    out = imp.out()
    if out.is_static:
        return _filled(imp, out, fill)
    shape = imp.int_list(list(node.args[0]))
    return imp.emit("ConstantOfShape", [shape], {"value": np.array([fill], dtype=out.dtype.numpy)}, out=out)


@converts(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(imp: _Importer, node: FxNode) -> Value:
    out = imp.out()
    args = list(node.args)
    if node.target is aten.arange.default:
        start, end, step = 0, args[0], 1
    else:
        start, end = args[0], args[1]
        step = args[2] if len(args) > 2 else node.kwargs.get("step", 1)
    bounds = [imp.cast(imp.value(b), out.dtype) if isinstance(b, FxNode) else imp.scalar(b, out.dtype)
              for b in (start, end, step)]
    return imp.emit("Range", bounds, out=out)


# --- contractions -------------------------------------------------------------------------------------

@converts(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _matmul(imp: _Importer, node: FxNode) -> Value:
    return imp.emit("MatMul", [imp.value(node.args[0]), imp.value(node.args[1])], out=imp.out())


@converts(aten.addmm.default)
def _addmm(imp: _Importer, node: FxNode) -> Value:
    """addmm(bias, a, b) = beta*bias + alpha*(a@b): one Gemm."""
    out = imp.out()
    bias, a, b = (imp.operand(x, out.dtype) for x in node.args[:3])
    beta, alpha = float(imp.arg(3, "beta", 1)), float(imp.arg(4, "alpha", 1))
    attrs = {k: v for k, v in (("alpha", alpha), ("beta", beta)) if v != 1.0}
    return imp.emit("Gemm", [a, b, bias if beta != 0.0 else None], attrs, out=out)


@converts(aten.convolution.default)
def _convolution(imp: _Importer, node: FxNode) -> Value:
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = node.args
    spatial = len(imp.value(w).type.shape) - 2
    attrs = {"strides": _n_list(stride, spatial), "pads": _n_list(padding, spatial) * 2,
             "dilations": _n_list(dilation, spatial), "group": int(groups)}
    inputs = [imp.value(x), imp.value(w), None if b is None else imp.value(b)]
    if inputs[2] is None:
        inputs.pop()
    if transposed:
        attrs["output_padding"] = _n_list(output_padding, spatial)
        return imp.emit("ConvTranspose", inputs, attrs, out=imp.out())
    return imp.emit("Conv", inputs, attrs, out=imp.out())


def _n_list(values, n: int) -> list[int]:
    values = [int(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    return values * n if len(values) == 1 else values


# --- normalisation --------------------------------------------------------------------------------------

@converts(aten._native_batch_norm_legit_no_training.default)
def _batch_norm(imp: _Importer, node: FxNode) -> list:
    x, weight, bias, mean, var = node.args[:5]
    eps = float(imp.arg(6, "eps", 1e-5))
    out = imp.out(0)
    channels = imp.value(mean).type.shape[0]
    scale = imp.value(weight) if weight is not None else imp.const(np.ones(channels, out.dtype.numpy), "ones")
    shift = imp.value(bias) if bias is not None else imp.const(np.zeros(channels, out.dtype.numpy), "zeros")
    y = imp.emit("BatchNormalization", [imp.value(x), scale, shift, imp.value(mean), imp.value(var)],
                 {"epsilon": eps}, out=out)
    return [y, None, None]


@converts(aten.native_layer_norm.default)
def _layer_norm(imp: _Importer, node: FxNode) -> list:
    x, normalized_shape, weight, bias, eps = node.args
    out = imp.out(0)
    axis = -len(normalized_shape)
    scale = imp.value(weight) if weight is not None else imp.const(np.ones(normalized_shape, out.dtype.numpy), "ones")
    inputs = [imp.value(x), scale] + ([imp.value(bias)] if bias is not None else [])
    stats_used = any(u.target is operator.getitem and u.args[1] in (1, 2) for u in node.users)
    if not stats_used:
        y = imp.emit("LayerNormalization", inputs, {"axis": axis, "epsilon": float(eps)}, out=out)
        return [y, None, None]
    return imp.emit_multi("LayerNormalization", inputs, {"axis": axis, "epsilon": float(eps)},
                          [out, imp.out(1), imp.out(2)])


@converts(aten.native_group_norm.default)
def _group_norm(imp: _Importer, node: FxNode) -> list:
    """Decomposed (opset 18's GroupNormalization scales per group, torch per channel)."""
    x, weight, bias, n, c, hw, groups, eps = node.args
    out = imp.out(0)
    xv = imp.value(x)
    grouped = imp.emit("Reshape", [xv, imp.ints([0, int(groups), -1])])
    axes = imp.ints([2])
    mean = imp.emit("ReduceMean", [grouped, axes])
    centered = imp.emit("Sub", [grouped, mean])
    var = imp.emit("ReduceMean", [imp.emit("Mul", [centered, centered]), axes])
    std = imp.emit("Sqrt", [imp.emit("Add", [var, imp.scalar(float(eps), out.dtype)])])
    normed = imp.emit("Reshape", [imp.emit("Div", [centered, std]), imp.emit("Shape", [xv])], out=out)
    rank = len(out.shape)
    per_channel = imp.ints([int(c)] + [1] * (rank - 2))
    if weight is not None:
        normed = imp.emit("Mul", [normed, imp.emit("Reshape", [imp.value(weight), per_channel])], out=out)
    if bias is not None:
        normed = imp.emit("Add", [normed, imp.emit("Reshape", [imp.value(bias), per_channel])], out=out)
    return [normed, None, None]


@converts(aten._softmax.default)
def _softmax(imp: _Importer, node: FxNode) -> Value:
    return imp.emit("Softmax", [imp.value(node.args[0])], {"axis": int(node.args[1])}, out=imp.out())


@converts(aten._log_softmax.default)
def _log_softmax(imp: _Importer, node: FxNode) -> Value:
    return imp.emit("LogSoftmax", [imp.value(node.args[0])], {"axis": int(node.args[1])}, out=imp.out())


# --- pooling ------------------------------------------------------------------------------------------------

@converts(aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default)
def _max_pool(imp: _Importer, node: FxNode) -> list:
    if any(u.target is operator.getitem and u.args[1] == 1 for u in node.users):
        raise imp.unsupported("the pooling indices are used (ONNX MaxPool numbers them differently)")
    kernel = [int(k) for k in node.args[1]]
    n = len(kernel)
    stride = imp.arg(2, "stride", []) or kernel
    attrs = {"kernel_shape": kernel, "strides": _n_list(stride, n), "pads": _n_list(imp.arg(3, "padding", 0), n) * 2,
             "dilations": _n_list(imp.arg(4, "dilation", 1), n)}
    if imp.arg(5, "ceil_mode", False):
        attrs["ceil_mode"] = 1
    return [imp.emit("MaxPool", [imp.value(node.args[0])], attrs, out=imp.out(0)), None]


@converts(aten.avg_pool2d.default, aten.avg_pool3d.default)
def _avg_pool(imp: _Importer, node: FxNode) -> Value:
    if imp.arg(6, "divisor_override") is not None:
        raise imp.unsupported("divisor_override")
    kernel = [int(k) for k in node.args[1]]
    n = len(kernel)
    stride = imp.arg(2, "stride", []) or kernel
    pads = _n_list(imp.arg(3, "padding", 0), n)
    x = imp.value(node.args[0])
    # torch divides by the window's part inside the (padded) input, even where ceil_mode or a kernel larger
    # than the input runs a window past its end (HF EfficientNet pools 1x1 maps with a 320-wide kernel).
    # ONNX's count_include_pad=1 divides by the whole kernel there, so: no padding, count_include_pad=0;
    # padding counted, the zeros padded explicitly and then count_include_pad=0 over the padded input.
    if any(pads) and imp.arg(5, "count_include_pad", True):
        rank = len(x.type.shape)
        begins = [0] * (rank - n) + pads
        x = imp.emit("Pad", [x, imp.ints(begins + begins), imp.scalar(0, x.type.dtype)], {"mode": "constant"})
        pads = [0] * n
    attrs = {"kernel_shape": kernel, "strides": _n_list(stride, n), "pads": pads * 2, "count_include_pad": 0}
    if imp.arg(4, "ceil_mode", False):
        attrs["ceil_mode"] = 1
    return imp.emit("AveragePool", [x], attrs, out=imp.out())


@converts(aten._adaptive_avg_pool2d.default)
def _adaptive_avg_pool(imp: _Importer, node: FxNode) -> Value:
    x = imp.value(node.args[0])
    sizes = [int(s) for s in node.args[1]]
    spatial = x.type.shape[-len(sizes):]
    if not all(isinstance(d, int) and d % s == 0 for d, s in zip(spatial, sizes)):
        raise imp.unsupported(f"input size {list(spatial)} is not a multiple of the output size {sizes}")
    kernel = [d // s for d, s in zip(spatial, sizes)]
    return imp.emit("AveragePool", [x], {"kernel_shape": kernel, "strides": kernel}, out=imp.out())


@converts(aten.upsample_nearest2d.vec)
def _upsample_nearest(imp: _Importer, node: FxNode) -> Value:
    out = imp.out()
    if not out.is_static:
        raise imp.unsupported("a symbolic output size")
    attrs = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    return imp.emit("Resize", [imp.value(node.args[0]), None, None, imp.ints(list(out.shape))], attrs, out=out)


@converts(aten.upsample_bilinear2d.vec)
def _upsample_bilinear(imp: _Importer, node: FxNode) -> Value:
    """Bilinear resize, no antialias: ONNX Resize linear with torch's own coordinate mapping."""
    out = imp.out()
    x = imp.value(node.args[0])
    if not out.is_static or not x.type.is_static:
        raise imp.unsupported("a symbolic size")
    align_corners = bool(imp.arg(2, "align_corners", False))
    scales = imp.arg(3, "scale_factors")
    if scales and any(float(s) * i != o for s, i, o in zip(scales, x.type.shape[-2:], out.shape[-2:])):
        raise imp.unsupported(f"scale factors {list(scales)} that are not output/input sizes")
    attrs = {"mode": "linear",
             "coordinate_transformation_mode": "align_corners" if align_corners else "pytorch_half_pixel"}
    return imp.emit("Resize", [x, None, None, imp.ints(list(out.shape))], attrs, out=out)


# --- reductions ------------------------------------------------------------------------------------------

def _reduce_axes(imp: _Importer, dims) -> Value | None:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return None  # all axes
    return imp.ints([int(d) for d in (dims if isinstance(dims, (list, tuple)) else [dims])])


def _reduce(op: str, cast_first: bool = False) -> Converter:
    def convert(imp: _Importer, node: FxNode) -> Value:
        out = imp.out()
        x = imp.value(node.args[0])
        if cast_first:
            x = imp.cast(x, out.dtype)
        axes = _reduce_axes(imp, imp.arg(1, "dim"))
        keepdims = int(bool(imp.arg(2, "keepdim", False)))
        return imp.emit(op, [x] + ([axes] if axes is not None else []), {"keepdims": keepdims}, out=out)
    return convert


converts(aten.mean.dim, aten.mean.default)(_reduce("ReduceMean", cast_first=True))
converts(aten.sum.dim_IntList, aten.sum.default)(_reduce("ReduceSum", cast_first=True))
converts(aten.amax.default)(_reduce("ReduceMax"))
converts(aten.amin.default)(_reduce("ReduceMin"))
converts(aten.prod.dim_int)(_reduce("ReduceProd", cast_first=True))


def _any_all(op: str) -> Converter:
    """any/all over bools: opset 18's ReduceMax/Min take no bool, so reduce int32 and cast back."""
    def convert(imp: _Importer, node: FxNode) -> Value:
        x = imp.cast(imp.value(node.args[0]), DType.bool)
        x = imp.cast(x, DType.i32)
        axes = _reduce_axes(imp, imp.arg(1, "dim"))
        keepdims = int(bool(imp.arg(2, "keepdim", False)))
        reduced = imp.emit(op, [x] + ([axes] if axes is not None else []), {"keepdims": keepdims})
        return imp.emit("Cast", [reduced], {"to": DType.bool.onnx}, out=imp.out())
    return convert


converts(aten.any.dim, aten.any.dims, aten.any.default)(_any_all("ReduceMax"))
converts(aten.all.dim, aten.all.dims, aten.all.default)(_any_all("ReduceMin"))


@converts(aten.var.correction)
def _var(imp: _Importer, node: FxNode) -> Value:
    out = imp.out()
    x = imp.value(node.args[0])
    dims = imp.arg(1, "dim")
    rank = len(x.type.shape)
    axes_list = list(range(rank)) if not dims else [_axis(int(d), rank) for d in dims]
    sizes = [x.type.shape[a] for a in axes_list]
    if not all(isinstance(s, int) for s in sizes):
        raise imp.unsupported("variance over a symbolic dim")
    correction = node.kwargs.get("correction", 1)
    count = int(np.prod(sizes)) - (1 if correction is None else correction)
    axes = imp.ints(axes_list)
    centered = imp.emit("Sub", [x, imp.emit("ReduceMean", [x, axes], {"keepdims": 1})])
    total = imp.emit("ReduceSum", [imp.emit("Mul", [centered, centered]), axes],
                     {"keepdims": int(bool(node.kwargs.get("keepdim", False)))})
    return imp.emit("Div", [total, imp.scalar(max(count, 0), out.dtype)], out=out)


@converts(aten.argmax.default, aten.argmin.default)
def _argmax(imp: _Importer, node: FxNode) -> Value:
    op = "ArgMax" if node.target is aten.argmax.default else "ArgMin"
    x = imp.value(node.args[0])
    dim, keepdim = imp.arg(1, "dim"), bool(imp.arg(2, "keepdim", False))
    if dim is None:
        if keepdim:
            raise imp.unsupported("keepdim without a dim")
        x, dim = imp.emit("Reshape", [x, imp.ints([-1])]), 0
    return imp.emit(op, [x], {"axis": int(dim), "keepdims": int(keepdim)}, out=imp.out())


@converts(aten.max.dim, aten.min.dim)
def _max_dim(imp: _Importer, node: FxNode) -> list:
    reduce_op, arg_op = ("ReduceMax", "ArgMax") if node.target is aten.max.dim else ("ReduceMin", "ArgMin")
    x = imp.value(node.args[0])
    dim, keepdim = int(node.args[1]), int(bool(imp.arg(2, "keepdim", False)))
    values = imp.emit(reduce_op, [x, imp.ints([dim])], {"keepdims": keepdim}, out=imp.out(0))
    indices = imp.emit(arg_op, [x], {"axis": dim, "keepdims": keepdim, "select_last_index": 0}, out=imp.out(1))
    return [values, indices]


@converts(aten.topk.default)
def _topk(imp: _Importer, node: FxNode) -> list:
    x = imp.value(node.args[0])
    k = imp.arg(1, "k")
    if isinstance(k, FxNode):
        raise imp.unsupported("a symbolic k")
    dim = _axis(int(imp.arg(2, "dim", -1)), len(x.type.shape))
    largest, sorted_ = bool(imp.arg(3, "largest", True)), bool(imp.arg(4, "sorted", True))
    return imp.emit_multi("TopK", [x, imp.ints([int(k)])], {"axis": dim, "largest": int(largest),
                          "sorted": int(sorted_)}, [imp.out(0), imp.out(1)])


@converts(aten.sort.default, aten.sort.stable)
def _sort(imp: _Importer, node: FxNode) -> list:
    """``torch.sort`` (and ``argsort``): TopK with k the dim's size, sorted. ONNX TopK puts the lower index first
    among equal values, for largest and smallest alike: torch's stable sort, both directions."""
    x = imp.value(node.args[0])
    rank = len(x.type.shape)
    if rank == 0:
        raise imp.unsupported("sorting a 0-d tensor")
    if node.target is aten.sort.stable:
        dim, descending = imp.arg(2, "dim", -1), imp.arg(3, "descending", False)
    else:
        dim, descending = imp.arg(1, "dim", -1), imp.arg(2, "descending", False)
    dim = _axis(int(dim), rank)
    size = x.type.shape[dim]
    if isinstance(size, int):
        k = imp.ints([size])
    else:
        k = imp.emit("Slice", [imp.emit("Shape", [x]), imp.ints([dim]), imp.ints([dim + 1])])
    return imp.emit_multi("TopK", [x, k], {"axis": dim, "largest": int(bool(descending)), "sorted": 1},
                          [imp.out(0), imp.out(1)])


@converts(aten.histc.default)
def _histc(imp: _Importer, node: FxNode) -> Value:
    """``torch.histc`` with a given range: each element's bin floor((x - min) * bins / (max - min)), the top edge
    in the last bin, elements outside dropped; counted by comparing with every bin index and summing."""
    out = imp.out()
    bins, low, high = int(imp.arg(1, "bins", 100)), float(imp.arg(2, "min", 0)), float(imp.arg(3, "max", 0))
    if low >= high:
        raise imp.unsupported("min >= max (the range taken from the data)")
    x = imp.emit("Reshape", [imp.cast(imp.value(node.args[0]), out.dtype), imp.ints([-1])])
    inside = imp.emit("And", [imp.emit("GreaterOrEqual", [x, imp.scalar(low, out.dtype)]),
                              imp.emit("LessOrEqual", [x, imp.scalar(high, out.dtype)])])
    scaled = imp.emit("Div", [imp.emit("Mul", [imp.emit("Sub", [x, imp.scalar(low, out.dtype)]),
                                               imp.scalar(bins, out.dtype)]), imp.scalar(high - low, out.dtype)])
    index = imp.emit("Min", [imp.cast(imp.emit("Floor", [scaled]), DType.i64), imp.scalar(bins - 1, DType.i64)])
    hits = imp.emit("Equal", [imp.emit("Unsqueeze", [index, imp.ints([-1])]), imp.ints(list(range(bins)))])
    hits = imp.emit("And", [hits, imp.emit("Unsqueeze", [inside, imp.ints([-1])])])
    return imp.emit("ReduceSum", [imp.cast(hits, out.dtype), imp.ints([0])], {"keepdims": 0}, out=out)


@converts("transformers.grouped_mm_fallback.default")
def _grouped_mm(imp: _Importer, node: FxNode) -> Value:
    """transformers' MoE ``grouped_mm`` (rows sorted by expert, ``offs`` the running row counts per expert) in
    static shapes: each row's expert is the number of offsets at or below its index; that expert's weight is
    gathered per row and a batched MatMul applies it. Rows past the last offset are zeros, as in its fallback."""
    out = imp.out()
    rows, weight, offs = imp.value(node.args[0]), imp.value(node.args[1]), imp.value(node.args[2])
    count, experts = rows.type.shape[0], weight.type.shape[0]
    if not isinstance(count, int) or not isinstance(experts, int):
        raise imp.unsupported("a symbolic row or expert count")
    position = imp.const(np.arange(count, dtype=np.int64).reshape(count, 1), "row_index")
    passed = imp.emit("GreaterOrEqual", [position, imp.emit("Unsqueeze", [imp.cast(offs, DType.i64), imp.ints([0])])])
    expert = imp.emit("ReduceSum", [imp.cast(passed, DType.i64), imp.ints([1])], {"keepdims": 0})
    chosen = imp.emit("Gather", [weight, imp.emit("Min", [expert, imp.scalar(experts - 1, DType.i64)])], {"axis": 0})
    product = imp.emit("MatMul", [imp.emit("Unsqueeze", [rows, imp.ints([1])]), chosen])
    product = imp.emit("Squeeze", [product, imp.ints([1])])
    valid = imp.emit("Unsqueeze", [imp.emit("Less", [expert, imp.scalar(experts, DType.i64)]), imp.ints([1])])
    return imp.emit("Where", [valid, product, imp.scalar(0, out.dtype)], out=out)


@converts(aten.linalg_vector_norm.default)
def _vector_norm(imp: _Importer, node: FxNode) -> Value:
    """``torch.linalg.vector_norm`` (weight norm's ``norm_except_dim``): ReduceL1/L2, max/min of |x|, or the
    general sum(|x|^p)^(1/p)."""
    out = imp.out()
    ord_ = float(imp.arg(1, "ord", 2))
    axes = _reduce_axes(imp, imp.arg(2, "dim"))
    keepdims = {"keepdims": int(bool(imp.arg(3, "keepdim", False)))}
    x = imp.cast(imp.value(node.args[0]), out.dtype)
    args = [axes] if axes is not None else []
    if ord_ in (1.0, 2.0):
        return imp.emit("ReduceL1" if ord_ == 1.0 else "ReduceL2", [x] + args, keepdims, out=out)
    magnitude = imp.emit("Abs", [x])
    if ord_ in (math.inf, -math.inf):
        return imp.emit("ReduceMax" if ord_ > 0 else "ReduceMin", [magnitude] + args, keepdims, out=out)
    if ord_ == 0.0:
        raise imp.unsupported("ord=0 (a count of non-zeros)")
    powered = imp.emit("Pow", [magnitude, imp.scalar(ord_, out.dtype)])
    total = imp.emit("ReduceSum", [powered] + args, keepdims)
    return imp.emit("Pow", [total, imp.scalar(1.0 / ord_, out.dtype)], out=out)


@converts(aten.cumsum.default)
def _cumsum(imp: _Importer, node: FxNode) -> Value:
    out = imp.out()
    x = imp.cast(imp.value(node.args[0]), out.dtype)
    return imp.emit("CumSum", [x, imp.scalar(int(node.args[1]), DType.i64)], out=out)


# --- shape and data movement --------------------------------------------------------------------------------

@converts(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _reshape(imp: _Importer, node: FxNode) -> Value:
    out = imp.out()
    shape = imp.ints(list(out.shape)) if out.is_static else imp.int_list(list(node.args[1]))
    return imp.emit("Reshape", [imp.value(node.args[0]), shape], out=out)


@converts(aten.permute.default)
def _permute(imp: _Importer, node: FxNode) -> Value:
    rank = len(node.args[1])
    return imp.emit("Transpose", [imp.value(node.args[0])], {"perm": [_axis(int(d), rank) for d in node.args[1]]},
                    out=imp.out())


@converts(aten.transpose.int, aten.t.default)
def _transpose(imp: _Importer, node: FxNode) -> Value:
    out = imp.out()
    rank = len(out.shape)
    perm = list(range(rank))
    if rank < 2:
        return imp.value(node.args[0])
    dims = node.args[1:3] if node.target is aten.transpose.int else (0, 1)
    a, b = _axis(int(dims[0]), rank), _axis(int(dims[1]), rank)
    perm[a], perm[b] = perm[b], perm[a]
    return imp.emit("Transpose", [imp.value(node.args[0])], {"perm": perm}, out=out)


@converts(aten.expand.default)
def _expand(imp: _Importer, node: FxNode) -> Value:
    out = imp.out()
    x = imp.value(node.args[0])
    if out.is_static:
        if x.type == out:
            return x
        shape = imp.ints(list(out.shape))
    else:  # -1 keeps the input's dim, which ONNX's broadcasting also does for a 1
        shape = imp.int_list([1 if (not isinstance(s, FxNode) and s == -1) else s for s in node.args[1]])
    return imp.emit("Expand", [x, shape], out=out)


@converts(aten.unsqueeze.default)
def _unsqueeze(imp: _Importer, node: FxNode) -> Value:
    return imp.emit("Unsqueeze", [imp.value(node.args[0]), imp.ints([int(node.args[1])])], out=imp.out())


@converts(aten.squeeze.dims, aten.squeeze.dim, aten.squeeze.default)
def _squeeze(imp: _Importer, node: FxNode) -> Value:
    """torch ignores dims that are not 1; ONNX rejects them, so only the size-1 dims are named."""
    x = imp.value(node.args[0])
    shape = x.type.shape
    dims = node.args[1] if len(node.args) > 1 else list(range(len(shape)))
    dims = [_axis(int(d), len(shape)) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    ones = [d for d in dims if shape[d] == 1]
    if not ones:
        return x
    return imp.emit("Squeeze", [x, imp.ints(ones)], out=imp.out())


@converts(aten.slice.Tensor)
def _slice(imp: _Importer, node: FxNode) -> Value:
    x = imp.value(node.args[0])
    dim = int(imp.arg(1, "dim", 0))
    start, end, step = imp.arg(2, "start"), imp.arg(3, "end"), imp.arg(4, "step", 1)
    start = 0 if start is None else start
    end = np.iinfo(np.int64).max if end is None else end
    out = imp.out()
    if x.type == out and start == 0 and step == 1 and not isinstance(end, FxNode):
        return x
    inputs = [x, imp.int_list([start]), imp.int_list([end]), imp.ints([dim]), imp.ints([int(step)])]
    return imp.emit("Slice", inputs, out=out)


@converts(aten.select.int)
def _select(imp: _Importer, node: FxNode) -> Value:
    index = node.args[2]
    index = imp.cast(imp.value(index), DType.i64) if isinstance(index, FxNode) else imp.scalar(int(index), DType.i64)
    return imp.emit("Gather", [imp.value(node.args[0]), index], {"axis": int(node.args[1])}, out=imp.out())


@converts(aten.cat.default)
def _cat(imp: _Importer, node: FxNode) -> Value:
    out = imp.out()
    rank = len(out.shape)
    parts = [imp.cast(imp.value(t), out.dtype) for t in node.args[0]]
    parts = [p for p in parts if not (p.type.shape == (0,) and rank != 1)]  # torch's legacy empty inputs
    if len(parts) == 1:
        return parts[0]
    return imp.emit("Concat", parts, {"axis": _axis(int(imp.arg(1, "dim", 0)), rank)}, out=out)


@converts(aten.split_with_sizes.default, aten.split.Tensor)
def _split(imp: _Importer, node: FxNode) -> list:
    x = imp.value(node.args[0])
    dim = _axis(int(imp.arg(2, "dim", 0)), len(x.type.shape))
    outs = [_value_type(v) for v in node.meta["val"]]
    sizes = [t.shape[dim] for t in outs]
    if not all(isinstance(s, int) for s in sizes):
        raise imp.unsupported("split along a symbolic dim")
    return imp.emit_multi("Split", [x, imp.ints(sizes)], {"axis": dim}, outs)


@converts(aten.embedding.default)
def _embedding(imp: _Importer, node: FxNode) -> Value:
    return imp.emit("Gather", [imp.value(node.args[0]), imp.value(node.args[1])], {"axis": 0}, out=imp.out())


@converts(aten.index_select.default)
def _index_select(imp: _Importer, node: FxNode) -> Value:
    return imp.emit("Gather", [imp.value(node.args[0]), imp.value(node.args[2])], {"axis": int(node.args[1])},
                    out=imp.out())


@converts(aten.gather.default)
def _gather(imp: _Importer, node: FxNode) -> Value:
    return imp.emit("GatherElements", [imp.value(node.args[0]), imp.value(node.args[2])],
                    {"axis": int(node.args[1])}, out=imp.out())


@converts(aten.index.Tensor)
def _index(imp: _Importer, node: FxNode) -> Value:
    """Advanced indexing: one index is a Gather; several go to the front, are broadcast and stacked for GatherND."""
    out = imp.out()
    x = imp.value(node.args[0])
    indices = list(node.args[1])
    rank = len(x.type.shape)
    positions = [i for i, t in enumerate(indices) if t is not None]
    if any(imp.value(indices[i]).type.dtype == DType.bool for i in positions):
        raise imp.unsupported("boolean mask indexing (data-dependent shape)")
    if len(positions) == 1:
        axis = positions[0]
        return imp.emit("Gather", [x, imp.value(indices[axis])], {"axis": axis}, out=out)
    rest = [d for d in range(rank) if d not in positions]
    if positions != list(range(len(positions))):
        x = imp.emit("Transpose", [x], {"perm": positions + rest})
    index_values = [imp.cast(imp.value(indices[i]), DType.i64) for i in positions]
    zeros = imp.emit("Mul", [index_values[0], imp.scalar(0, DType.i64)])
    for v in index_values[1:]:  # zeros of the broadcast shape, symbolic dims included
        zeros = imp.emit("Add", [zeros, imp.emit("Mul", [v, imp.scalar(0, DType.i64)])])
    columns = [imp.emit("Unsqueeze", [imp.emit("Add", [v, zeros]), imp.ints([-1])]) for v in index_values]
    stacked = imp.emit("Concat", columns, {"axis": -1})
    lead = positions[0]
    moves_back = lead > 0 and positions == list(range(lead, lead + len(positions)))
    gathered = imp.emit("GatherND", [x, stacked], out=None if moves_back else out)
    if not moves_back:
        return gathered
    # adjacent indexed dims after dim 0: torch keeps the broadcast dims where the indexed ones were
    width = len(zeros.type.shape)
    perm = list(range(width, width + lead)) + list(range(width)) + list(range(width + lead, width + len(rest)))
    return imp.emit("Transpose", [gathered], {"perm": perm}, out=out)


def _scatter_elements(imp: _Importer, x: Value, dim: int, index: Value, updates: Value, reduction: str,
                      out: TensorType | None = None) -> Value:
    return imp.emit("ScatterElements", [x, imp.cast(index, DType.i64), updates],
                    {"axis": dim, "reduction": reduction}, out=out)


def _index_shaped(imp: _Importer, index: Value, src: Any, dtype: DType) -> Value:
    """``src`` (a tensor or a Python scalar) as ScatterElements' updates: index's shape, ``dtype``. torch reads
    only the index-shaped corner of a larger ``src``."""
    shape = index.type.shape
    if not isinstance(src, FxNode):
        return imp.emit("Expand", [imp.scalar(src, dtype), imp.shape_of(index.type, index)],
                        out=TensorType(dtype, shape))
    updates = imp.cast(imp.value(src), dtype)
    if updates.type.shape == shape:
        return updates
    if not index.type.is_static or not updates.type.is_static:
        raise imp.unsupported("a src larger than the index with symbolic shapes")
    rank = len(shape)
    return imp.emit("Slice", [updates, imp.ints([0] * rank), imp.ints(list(shape)), imp.ints(list(range(rank)))],
                    out=TensorType(dtype, shape))


_SCATTER_REDUCE = {"sum": "add", "add": "add", "prod": "mul", "multiply": "mul", "amax": "max", "amin": "min"}


@converts(aten.scatter.src, aten.scatter.value, aten.scatter.reduce, aten.scatter.value_reduce,
          aten.scatter_add.default)
def _scatter(imp: _Importer, node: FxNode) -> Value:
    """``scatter`` / ``scatter_add``: ScatterElements (reduction none, add or mul)."""
    out = imp.out()
    x = imp.cast(imp.value(node.args[0]), out.dtype)
    dim = _axis(int(node.args[1]), len(out.shape))
    index = imp.value(node.args[2])
    reduce = imp.arg(4, "reduce")
    reduction = "add" if node.target is aten.scatter_add.default else _SCATTER_REDUCE[reduce] if reduce else "none"
    updates = _index_shaped(imp, index, node.args[3], out.dtype)
    return _scatter_elements(imp, x, dim, index, updates, reduction, out)


@converts(aten.scatter_reduce.two)
def _scatter_reduce(imp: _Importer, node: FxNode) -> Value:
    """``scatter_reduce``: ScatterElements with the reduction. ``include_self=False`` first overwrites the
    targeted elements with the reduction's identity; ``mean`` divides a sum by a count scattered alike."""
    out = imp.out()
    x = imp.cast(imp.value(node.args[0]), out.dtype)
    dim = _axis(int(node.args[1]), len(out.shape))
    index = imp.value(node.args[2])
    reduce, include_self = str(node.args[4]), bool(imp.arg(5, "include_self", True))
    updates = _index_shaped(imp, index, node.args[3], out.dtype)
    floating = out.dtype.numpy.kind == "f"
    if reduce == "mean" and not floating:
        raise imp.unsupported("mean over integers (torch floors the quotient)")
    if reduce not in _SCATTER_REDUCE and reduce != "mean":
        raise imp.unsupported(f"reduce={reduce!r}")
    if not include_self:
        info = np.finfo(out.dtype.numpy) if floating else np.iinfo(out.dtype.numpy)
        identity = {"sum": 0, "mean": 0, "prod": 1, "amax": -np.inf if floating else info.min,
                    "amin": np.inf if floating else info.max}[reduce]
        x = _scatter_elements(imp, x, dim, index, _index_shaped(imp, index, identity, out.dtype), "none")
    if reduce != "mean":
        return _scatter_elements(imp, x, dim, index, updates, _SCATTER_REDUCE[reduce], out)
    total = _scatter_elements(imp, x, dim, index, updates, "add")
    ones = _filled(imp, out, 1, like=x)
    if not include_self:
        ones = _scatter_elements(imp, ones, dim, index, _index_shaped(imp, index, 0, out.dtype), "none")
    count = _scatter_elements(imp, ones, dim, index, _index_shaped(imp, index, 1, out.dtype), "add")
    return imp.emit("Div", [total, count], out=out)


@converts(aten.index_put.default)
def _index_put(imp: _Importer, node: FxNode) -> Value:
    """``x[indices] = values`` (``+=`` with ``accumulate``): ScatterND (reduction add) over the indexed dims moved
    to the front, values broadcast to ``x[indices]``'s shape; one boolean mask with a one-element value is a
    Where."""
    out = imp.out()
    x = imp.cast(imp.value(node.args[0]), out.dtype)
    indices, accumulate = list(node.args[1]), bool(imp.arg(3, "accumulate", False))
    values = imp.cast(imp.value(node.args[2]), out.dtype)
    rank = len(out.shape)
    positions = [i for i, t in enumerate(indices) if t is not None]
    if any(imp.value(indices[i]).type.dtype == DType.bool for i in positions):
        return _index_put_mask(imp, x, indices, positions, values, accumulate, out)
    if not out.is_static:
        raise imp.unsupported("integer indices into a tensor of symbolic shape")
    index_vals = [indices[i].meta.get("val") for i in positions]
    broadcast = tuple(torch.broadcast_shapes(*[v.shape for v in index_vals]))
    rest = [d for d in range(rank) if d not in positions]
    adjacent = positions == list(range(positions[0], positions[0] + len(positions)))
    lead = positions[0] if adjacent else 0
    target = list(out.shape[:lead]) + list(broadcast) + [out.shape[d] for d in rest[lead:]]
    values = imp.emit("Expand", [values, imp.ints(target)])
    if lead > 0:  # torch keeps the broadcast dims where the indexed ones were: move them to the front
        width = len(broadcast)
        values = imp.emit("Transpose", [values], {"perm": list(range(lead, lead + width)) + list(range(lead))
                                                  + list(range(lead + width, len(target)))})
    perm = positions + rest
    moved = perm != list(range(rank))
    if moved:
        x = imp.emit("Transpose", [x], {"perm": perm})
    columns = []
    for i in positions:  # negative indices wrap: (i + n) mod n
        size = imp.scalar(out.shape[i], DType.i64)
        index = imp.emit("Mod", [imp.emit("Add", [imp.cast(imp.value(indices[i]), DType.i64), size]), size])
        index = imp.emit("Expand", [index, imp.ints(list(broadcast))])
        columns.append(imp.emit("Unsqueeze", [index, imp.ints([-1])]))
    stacked = columns[0] if len(columns) == 1 else imp.emit("Concat", columns, {"axis": -1})
    reduction = "add" if accumulate else "none"
    result = imp.emit("ScatterND", [x, stacked, values], {"reduction": reduction}, out=None if moved else out)
    if not moved:
        return result
    return imp.emit("Transpose", [result], {"perm": [int(p) for p in np.argsort(perm)]}, out=out)


def _index_put_mask(imp: _Importer, x: Value, indices: list, positions: list[int], values: Value,
                    accumulate: bool, out: TensorType) -> Value:
    """``x[mask] = v`` with a one-element ``v``: Where(mask, v, x) (``x + v`` with accumulate). A longer ``v``
    fills the masked elements in order: a data-dependent count hetflow's static shapes cannot express."""
    if len(positions) != 1 or values.type.numel() != 1:
        raise imp.unsupported("a boolean mask with other indices or with more than one value (data-dependent)")
    position = positions[0]
    mask = imp.value(indices[position])
    trailing = len(out.shape) - position - len(mask.type.shape)
    if trailing:
        mask = imp.emit("Unsqueeze", [mask, imp.ints(list(range(-trailing, 0)))])
    value = imp.emit("Reshape", [values, imp.ints([])])
    if accumulate:
        value = imp.emit("Add", [x, value])
    return imp.emit("Where", [mask, value, x], out=out)


@converts(aten.copy.default)
def _copy(imp: _Importer, node: FxNode) -> Value:
    """The functional ``copy``: ``src`` cast to ``self``'s dtype and broadcast to its shape."""
    out = imp.out()
    src = imp.cast(imp.value(node.args[1]), out.dtype)
    if src.type.shape == out.shape:
        return src
    return imp.emit("Expand", [src, imp.shape_of(out, imp.value(node.args[0]))], out=out)


@converts(aten.slice_scatter.default)
def _slice_scatter(imp: _Importer, node: FxNode) -> Value:
    """``self`` with ``self[start:end]`` along ``dim`` replaced by ``src`` (step 1): slices of ``self`` around it,
    concatenated."""
    out = imp.out()
    x, src = imp.value(node.args[0]), imp.cast(imp.value(node.args[1]), out.dtype)
    rank = len(out.shape)
    dim = _axis(int(imp.arg(2, "dim", 0)), rank)
    size = out.shape[dim]
    start, end, step = imp.arg(3, "start"), imp.arg(4, "end"), imp.arg(5, "step", 1)
    if not isinstance(size, int) or any(isinstance(v, FxNode) for v in (start, end, step)) or step != 1:
        raise imp.unsupported("a symbolic size or bound, or a step other than 1")
    start, end = slice(start, end).indices(size)[:2]
    end = max(start, end)
    parts = []
    if start > 0:
        parts.append(imp.emit("Slice", [x, imp.ints([0]), imp.ints([start]), imp.ints([dim])]))
    parts.append(src)
    if end < size:
        parts.append(imp.emit("Slice", [x, imp.ints([end]), imp.ints([size]), imp.ints([dim])]))
    if len(parts) == 1:
        return src
    return imp.emit("Concat", parts, {"axis": dim}, out=out)


@converts(aten.repeat.default)
def _repeat(imp: _Importer, node: FxNode) -> Value:
    """``Tensor.repeat``: Tile, after leading size-1 dims when more repeats than dims are given."""
    x = imp.value(node.args[0])
    repeats = list(node.args[1])
    rank = len(x.type.shape)
    if len(repeats) > rank:
        x = imp.emit("Unsqueeze", [x, imp.ints(list(range(len(repeats) - rank)))])
    return imp.emit("Tile", [x, imp.int_list(repeats)], out=imp.out())


@converts(aten.as_strided.default)
def _as_strided(imp: _Importer, node: FxNode) -> Value:
    """A view with static strides over a contiguous input: a Reshape where the strides are the contiguous ones of
    the new size (dims of size 1 may carry any stride; adaptive_avg_pool1d's decomposition), else a Gather of
    precomputed flat indices (offset + sum of index * stride) from the flattened input. A non-contiguous input
    reads memory in an order the IR's values do not have."""
    out = imp.out()
    source = node.args[0].meta.get("val") if isinstance(node.args[0], FxNode) else None
    if any(isinstance(v, FxNode) for v in list(node.args[1]) + list(node.args[2])):
        raise imp.unsupported("a symbolic size or stride")
    size, stride = [int(d) for d in node.args[1]], [int(s) for s in node.args[2]]
    offset = int(imp.arg(3, "storage_offset", 0) or 0)
    if source is None or not out.is_static or not _static_tensor(source) or not source.is_contiguous():
        raise imp.unsupported(f"a restride of a non-contiguous or symbolic input (size {size}, stride {stride})")
    expected, running = [], 1
    for d in reversed(size):
        expected.append(running)
        running *= d
    expected.reverse()
    x = imp.value(node.args[0])
    if (offset == 0 and source.numel() == running
            and all(d == 1 or s == e for d, s, e in zip(size, stride, expected))):
        return imp.emit("Reshape", [x, imp.ints(size)], out=out)
    flat = np.full(size, offset, dtype=np.int64)
    for axis, (d, s) in enumerate(zip(size, stride)):
        shape = [1] * len(size)
        shape[axis] = d
        flat = flat + (np.arange(d, dtype=np.int64) * s).reshape(shape)
    if flat.size and (flat.min() < 0 or flat.max() >= source.numel()):
        raise imp.unsupported(f"size {size}, stride {stride}, offset {offset} reach past the input's elements")
    flattened = imp.emit("Reshape", [x, imp.ints([-1])])
    return imp.emit("Gather", [flattened, imp.const(flat, "strided_index")], {"axis": 0}, out=out)


def _static_tensor(val: Any) -> bool:
    return isinstance(val, torch.Tensor) and all(isinstance(_dim(d), int) for d in val.shape)


@converts(aten.unfold.default)
def _unfold(imp: _Importer, node: FxNode) -> Value:
    """``Tensor.unfold(dim, size, step)``: a Gather of the windows' indices (n, size) along ``dim``, the window
    axis then moved last."""
    out = imp.out()
    x = imp.value(node.args[0])
    rank = len(x.type.shape)
    if rank == 0:
        raise imp.unsupported("unfolding a 0-d tensor")
    dim, size, step = _axis(int(node.args[1]), rank), int(node.args[2]), int(node.args[3])
    length = x.type.shape[dim]
    if not isinstance(length, int):
        raise imp.unsupported(f"a symbolic length along dim {dim}")
    count = (length - size) // step + 1
    windows = np.arange(count, dtype=np.int64)[:, None] * step + np.arange(size, dtype=np.int64)[None, :]
    gathered = imp.emit("Gather", [x, imp.const(windows, "unfold_index")], {"axis": dim})
    perm = list(range(dim + 1)) + list(range(dim + 2, rank + 1)) + [dim + 1]
    return imp.emit("Transpose", [gathered], {"perm": perm}, out=out)


@converts(aten.constant_pad_nd.default)
def _constant_pad(imp: _Importer, node: FxNode) -> Value:
    out = imp.out()
    x = imp.value(node.args[0])
    pad = [int(p) for p in node.args[1]]
    rank = len(x.type.shape)
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):  # torch lists (begin, end) pairs from the last dim backwards
        begins[rank - 1 - i], ends[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
    value = imp.scalar(imp.arg(2, "value", 0), out.dtype)
    return imp.emit("Pad", [x, imp.ints(begins + ends), value], {"mode": "constant"}, out=out)


# --- symbolic sizes (dynamic shapes): SymInts are 0-d int64 tensors ------------------------------------------

@converts(aten.sym_size.int)
def _sym_size(imp: _Importer, node: FxNode) -> Value:
    x = imp.value(node.args[0])
    dim = _axis(int(node.args[1]), len(x.type.shape))
    size = imp.emit("Shape", [x], {"start": dim, "end": dim + 1})
    return imp.emit("Squeeze", [size, imp.ints([0])], out=TensorType(DType.i64, ()))


def _sym_arith(op: str) -> Converter:
    def convert(imp: _Importer, node: FxNode) -> Value:
        a, b = (imp.operand(x, DType.i64) for x in node.args[:2])
        return imp.emit(op, [a, b], out=TensorType(DType.i64, ()))
    return convert


converts(operator.add)(_sym_arith("Add"))
converts(operator.sub)(_sym_arith("Sub"))
converts(operator.mul)(_sym_arith("Mul"))
converts(operator.floordiv)(_sym_arith("Div"))  # sizes are non-negative: truncation is floor
