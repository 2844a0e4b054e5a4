"""The op table: one row per op.

A row holds what every stage needs to know about an op: its fusion kind, how to
infer its output types, its FLOPs, its bytes read and written, and a NumPy
reference kernel. Semantics are ONNX's; the attribute schema, the type inference
and (unless a row brings a faster NumPy kernel) the reference kernel come from
the ``onnx`` package itself, so the table does not restate the spec.

Explicit rows below cover the ops hetflow reasons about (fusion, cost). Any other
op of the default ONNX domain that onnx's reference evaluator implements gets a
generated row of kind ``opaque``. Backends keep their own tables keyed by op name
and never edit these rows.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx

from .errors import HetflowError
from .graph import Node
from .onnx_convert import node_to_onnx, type_from_onnx, type_to_onnx
from .types import TensorType

Kernel = Callable[[list], list]


class FusionKind(enum.Enum):
    elementwise = "elementwise"  # one output element from the same input element(s), same shape
    broadcast = "broadcast"      # elementwise with numpy broadcasting between inputs
    injective = "injective"      # pure data movement: reshape, transpose, slice, concat, gather
    reduction = "reduction"      # reduces or normalises along axes: ReduceSum, Softmax, LayerNorm
    window = "window"            # sliding-window reductions: pooling
    contraction = "contraction"  # MatMul, Gemm, Conv: the arithmetic-heavy ops
    opaque = "opaque"            # everything else (never fused)


class UnsupportedOpError(HetflowError):
    """An op hetflow has no row for (names the op and the node)."""


@dataclass(frozen=True)
class OpDef:
    name: str
    kind: FusionKind
    flops: Callable[[Node], int] | None = None
    make_kernel: Callable[[Node, int], Kernel] | None = None  # fast NumPy kernel, else onnx.reference
    infer: Callable[[Node, int], list[TensorType | None]] | None = None  # else onnx shape inference
    attr_schema: dict[str, Any] | None = None  # for non-ONNX ops: name -> python type
    notes: str = ""
    generated: bool = field(default=False, compare=False)


OPS: dict[str, OpDef] = {}


def register_op(row: OpDef) -> OpDef:
    if row.name in OPS and not OPS[row.name].generated:
        raise ValueError(f"op {row.name} is registered twice")
    OPS[row.name] = row
    return row


def get_op(op: str, node: Node | None = None) -> OpDef:
    row = OPS.get(op)
    if row is not None:
        return row
    if "." not in op and onnx.defs.has(op) and _has_onnx_reference(op):
        row = OpDef(op, FusionKind.opaque, generated=True, notes="generated from the onnx schema")
        OPS[op] = row
        return row
    where = f" (node {node.describe()})" if node is not None else ""
    raise UnsupportedOpError(f"unsupported op {op}{where}")


def _has_onnx_reference(op: str) -> bool:
    from onnx.reference import ops as ref_ops
    try:
        ref_ops.load_op("", op, None)
        return True
    except Exception:  # onnx raises several types for a missing implementation
        pass
    schema = onnx.defs.get_schema(op)
    return schema.has_function or schema.has_context_dependent_function  # runs as its function body


# --- FLOPs and bytes ---------------------------------------------------------------------------

def _numel(t: TensorType | None) -> int:
    if t is None:
        return 0
    n = t.numel()
    return 0 if n is None else n


def out_numel(node: Node) -> int:
    return sum(_numel(o.type) for o in node.outputs)


def in_numel(node: Node) -> int:
    return sum(_numel(v.type) for v in node.inputs if v is not None)


def node_flops(node: Node) -> int:
    row = get_op(node.op, node)
    if row.flops is not None:
        return int(row.flops(node))
    return out_numel(node)


GATHERS = ("Gather", "GatherElements", "GatherND")


def node_bytes(node: Node) -> int:
    """Bytes read plus bytes written, each value counted once.

    A table that only gathers read (an embedding) counts as the rows they read,
    at most the bytes of their outputs, not the whole table.
    """
    seen: set[int] = set()
    total = 0
    for v in list(node.inputs) + list(node.outputs):
        if v is None or id(v) in seen or v.type is None:
            continue
        seen.add(id(v))
        size = v.type.nbytes() or 0
        if v in node.inputs:
            size = min(size, _gathered_bytes(node, node.inputs.index(v), size))
        total += size
    return total


def _gathered_bytes(node: Node, index: int, size: int) -> int:
    """The bytes of input ``index`` that ``node`` reads when gathers alone read it as their table, else ``size``."""
    if node.op in GATHERS:
        out = node.outputs[0].type
        return size if index != 0 or out is None else (out.nbytes() or size)
    body = node.attrs.get("body") if node.op == "hetflow.group" else None
    if body is None or index >= len(body.inputs):
        return size
    inner = body.inputs[index]
    if inner.is_output or not inner.uses:
        return size
    total = 0
    for user, slot in inner.uses:
        if user.op not in GATHERS or slot != 0 or user.outputs[0].type is None:
            return size
        total += user.outputs[0].type.nbytes() or size
    return total


def _matmul_flops(node: Node) -> int:
    a, b = node.inputs[0].type, node.inputs[1].type
    out = node.outputs[0].type
    if a is None or a.shape is None or not isinstance(a.shape[-1], int):
        return 0
    return 2 * _numel(out) * int(a.shape[-1])


def _gemm_flops(node: Node) -> int:
    a = node.inputs[0].type
    if a is None or not a.is_static:
        return 0
    k = a.shape[0] if node.attrs.get("transA", 0) else a.shape[1]
    return 2 * _numel(node.outputs[0].type) * int(k) + _numel(node.outputs[0].type)


def _conv_flops(node: Node) -> int:
    w = node.inputs[1].type
    if w is None or not w.is_static:
        return 0
    per_output = int(np.prod(w.shape[1:]))  # C_in/group x kernel
    return 2 * _numel(node.outputs[0].type) * per_output


def _conv_transpose_flops(node: Node) -> int:
    w = node.inputs[1].type
    if w is None or not w.is_static:
        return 0
    return 2 * _numel(node.inputs[0].type) * int(np.prod(w.shape[1:]))


def _reduction_flops(node: Node) -> int:
    return in_numel(node)


def _scaled(per_element: int) -> Callable[[Node], int]:
    return lambda node: per_element * max(_numel(node.inputs[0].type), out_numel(node))


def _pool_flops(node: Node) -> int:
    kernel = node.attrs.get("kernel_shape", [1])
    return out_numel(node) * int(np.prod(kernel))


def _zero(node: Node) -> int:
    return 0


# --- NumPy kernels that are much faster than onnx.reference's for the hot ops -----------------

from . import kernels as _k  # noqa: E402  (kernels import nothing from here)

_E, _B, _I, _R, _W, _C = (FusionKind.elementwise, FusionKind.broadcast, FusionKind.injective,
                          FusionKind.reduction, FusionKind.window, FusionKind.contraction)

for _name in ["Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Ceil", "Cos", "Cosh", "Erf",
              "Exp", "Floor", "Log", "Neg", "Not", "Reciprocal", "Round", "Sign", "Sin", "Sinh",
              "Sqrt", "Tan", "IsNaN", "IsInf", "Softsign", "Cast", "CastLike",
              "BitwiseNot", "Identity"]:
    register_op(OpDef(_name, _E))
for _name, _cost in [("Sigmoid", 4), ("Tanh", 6), ("Softplus", 4), ("Elu", 4), ("Selu", 4), ("Celu", 4),
                     ("LeakyRelu", 2), ("HardSigmoid", 3), ("HardSwish", 4), ("Mish", 8),
                     ("ThresholdedRelu", 2), ("Gelu", 8)]:
    register_op(OpDef(_name, _E, flops=_scaled(_cost)))
register_op(OpDef("Relu", _E, make_kernel=_k.relu))
register_op(OpDef("Clip", _E, flops=_scaled(2)))
for _name in ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Equal", "Greater",
              "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor", "Where", "Mod", "PRelu",
              "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor"]:
    register_op(OpDef(_name, _B, make_kernel=_k.BINARY.get(_name)))
for _name in ["Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Slice", "Concat",
              "Split", "Gather", "GatherND", "Pad", "Tile", "DepthToSpace",
              "SpaceToDepth", "Shape", "Size", "ConstantOfShape", "Range", "Trilu", "ScatterND",
              "ScatterElements", "Constant"]:
    register_op(OpDef(_name, _I, flops=_zero))
register_op(OpDef("GatherElements", _I, flops=_zero, make_kernel=_k.gather_elements))
for _name in ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSumExp", "ReduceSumSquare", "ReduceLogSum", "ArgMax", "ArgMin", "CumSum",
              "GlobalAveragePool", "GlobalMaxPool", "LpNormalization"]:
    register_op(OpDef(_name, _R, flops=_reduction_flops))
register_op(OpDef("Softmax", _R, flops=_scaled(5), make_kernel=_k.softmax))
register_op(OpDef("LogSoftmax", _R, flops=_scaled(5)))
register_op(OpDef("LayerNormalization", _R, flops=_scaled(8)))
register_op(OpDef("InstanceNormalization", _R, flops=_scaled(8)))
register_op(OpDef("GroupNormalization", _R, flops=_scaled(8)))
register_op(OpDef("BatchNormalization", _B, flops=_scaled(2)))
register_op(OpDef("MaxPool", _W, flops=_pool_flops, make_kernel=_k.max_pool))
register_op(OpDef("AveragePool", _W, flops=_pool_flops, make_kernel=_k.average_pool))
register_op(OpDef("LpPool", _W, flops=_pool_flops))
register_op(OpDef("MatMul", _C, flops=_matmul_flops, make_kernel=_k.matmul))
register_op(OpDef("Gemm", _C, flops=_gemm_flops, make_kernel=_k.gemm))
register_op(OpDef("Conv", _C, flops=_conv_flops, make_kernel=_k.conv))
register_op(OpDef("ConvTranspose", _C, flops=_conv_transpose_flops))
register_op(OpDef("MatMulInteger", _C, flops=_matmul_flops))
register_op(OpDef("Einsum", _C, flops=_zero, notes="FLOPs not modelled"))


# --- type inference -------------------------------------------------------------------------------

class InferenceError(HetflowError):
    """ONNX type inference rejected a node (a shape or dtype mismatch)."""


def infer_types(node: Node, opset: int) -> list[TensorType | None]:
    """The output types the op's rule gives for the node's current input types."""
    row = get_op(node.op, node)
    if row.infer is not None:
        return row.infer(node, opset)
    return _onnx_infer(node, opset)


def _onnx_infer(node: Node, opset: int) -> list[TensorType | None]:
    domain = node.domain
    try:
        schema = onnx.defs.get_schema(node.op_type, opset if not domain else 1, domain)
    except onnx.defs.SchemaError as exc:
        raise UnsupportedOpError(f"unsupported op {node.op} at opset {opset} (node {node.describe()})") from exc
    in_names = [f"in{i}" if v is not None else "" for i, v in enumerate(node.inputs)]
    out_names = [f"out{i}" for i in range(len(node.outputs))]
    proto = node_to_onnx(node.op, in_names, out_names, node.attrs, opset)
    input_types = {}
    input_data = {}
    for name, v in zip(in_names, node.inputs):
        if v is None:
            continue
        input_types[name] = type_to_onnx(v.type)
        if v.data is not None and v.data.size <= 64:
            input_data[name] = onnx.numpy_helper.from_array(np.asarray(v.data), name)
    opsets = [onnx.helper.make_opsetid("", opset)]
    try:
        result = onnx.shape_inference.infer_node_outputs(schema, proto, input_types, input_data,
                                                         opset_imports=opsets)
    except Exception as exc:  # onnx raises InferenceError / RuntimeError with the reason
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InferenceError(f"{node.describe()}: {msg}") from None
    return [type_from_onnx(result[n]) if n in result else None for n in out_names]


# --- reference kernels -----------------------------------------------------------------------------

def make_kernel(node: Node, opset: int) -> Kernel:
    """A callable running the node on NumPy arrays: the row's own kernel, else onnx.reference's."""
    row = get_op(node.op, node)
    if row.make_kernel is not None:
        kernel = row.make_kernel(node, opset)
        if kernel is not None:
            return kernel
    return _onnx_reference_kernel(node, opset)


def _onnx_reference_kernel(node: Node, opset: int) -> Kernel:
    from onnx.reference import ReferenceEvaluator
    in_names = [f"in{i}" if v is not None else "" for i, v in enumerate(node.inputs)]
    out_names = [f"out{i}" for i in range(len(node.outputs))]
    proto = node_to_onnx(node.op, in_names, out_names, node.attrs, opset)
    opsets = {"": opset}
    if node.domain:
        opsets[node.domain] = 1
    try:
        evaluator = ReferenceEvaluator(proto, opsets=opsets)
    except Exception:
        # Ops defined as ONNX functions (Gelu, GroupNormalization...) need a model around them.
        try:
            evaluator = ReferenceEvaluator(_one_node_model(node, proto, in_names, out_names, opsets))
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedOpError(f"unsupported op {node.op} (node {node.describe()}): {reason}") from None
    def run(inputs: list) -> list:
        return evaluator.run(None, {n: x for n, x in zip(in_names, inputs) if n})

    return run


def _one_node_model(node: Node, proto, in_names, out_names, opsets) -> onnx.ModelProto:
    from .onnx_convert import value_info
    inputs = [value_info(n, v.type) for n, v in zip(in_names, node.inputs) if n]
    outputs = [value_info(n, o.type) for n, o in zip(out_names, node.outputs)]
    graph = onnx.helper.make_graph([proto], "node", inputs, outputs)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()])


# --- hetflow's own ops ---------------------------------------------------------------------------------

GROUP_KINDS = ("attention", "expert", "contraction", "reduction", "elementwise")


def _group_body(node: Node):
    return node.attrs["body"]


def _group_infer(node: Node, opset: int) -> list[TensorType | None]:
    body = _group_body(node)
    if len(body.inputs) != len(node.inputs) or len(body.outputs) != len(node.outputs):
        raise InferenceError(f"{node.describe()}: body takes {len(body.inputs)} inputs and gives "
                             f"{len(body.outputs)} outputs; the node has {len(node.inputs)} and {len(node.outputs)}")
    for inner, outer in zip(body.inputs, node.inputs):
        if outer is not None and inner.type != outer.type:
            raise InferenceError(f"{node.describe()}: body input %{inner.name}: {inner.type} "
                                 f"does not match %{outer.name}: {outer.type}")
    return [v.type for v in body.outputs]


def _group_flops(node: Node) -> int:
    return sum(node_flops(n) for n in _group_body(node).nodes)


def _group_kernel(node: Node, opset: int) -> Kernel:
    from hetflow.ir.interpreter import Interpreter  # the group runs its body with the interpreter
    body = _group_body(node)
    interpreter = Interpreter(body)
    names = [v.name for v in body.inputs]
    return lambda ins: interpreter.run(dict(zip(names, ins)))


register_op(OpDef("hetflow.group", FusionKind.opaque, flops=_group_flops, make_kernel=_group_kernel,
                  infer=_group_infer, attr_schema={"kind": str, "body": object},
                  notes="a fused group: runs its body subgraph; its bytes are what crosses its boundary"))


def _identity_infer(node: Node, opset: int) -> list[TensorType | None]:
    return [node.inputs[0].type]


register_op(OpDef("hetflow.transfer", FusionKind.injective, flops=lambda node: 0,
                  make_kernel=lambda node, opset: (lambda ins: [np.array(ins[0], copy=True)]),
                  infer=_identity_infer, attr_schema={"src": str, "dst": str},
                  notes="a copy between memory spaces that are not one unified space"))


# --- a feed-forward layer whose weights stream from flash (the tile_flash pass) ------------------------------

FLASH_FFN_OP = "hetflow.flash_ffn"
FLASH_FFN_MODES = ("dense", "predict", "window")
FLASH_FFN_ACTIVATIONS = ("relu", "silu")


def flash_ffn_weights(node: Node) -> dict[str, int]:
    """Input positions of a flash_ffn node's operands by role: x, up [hidden, neurons], b_up [neurons], down
    [neurons, hidden], b_down [hidden], then gate [hidden, neurons] when gated, then the predictor's left
    [hidden, rank] and right [rank, neurons] when its mode predicts."""
    roles = ["x", "up", "b_up", "down", "b_down"]
    if node.attrs.get("gated"):
        roles.append("gate")
    if node.attrs.get("mode", "dense") != "dense":
        roles += ["pred_left", "pred_right"]
    return {role: i for i, role in enumerate(roles)}


def flash_ffn_active(node: Node, x: np.ndarray, left: np.ndarray, right: np.ndarray, b_up: np.ndarray) -> np.ndarray:
    """The neurons the predictor picks for any row of ``x`` [tokens, hidden]: ``x @ left @ right + b_up`` above
    ``-margin`` (what the runtime's ``Predictor.active`` computes)."""
    scores = (x.astype(np.float32) @ left.astype(np.float32)) @ right.astype(np.float32) + b_up.astype(np.float32)
    return np.flatnonzero((scores > -float(node.attrs.get("margin", 0.0))).any(axis=0))


def _flash_ffn_infer(node: Node, opset: int) -> list[TensorType | None]:
    roles = flash_ffn_weights(node)
    if len(node.inputs) != len(roles):
        raise InferenceError(f"{node.describe()}: takes {len(roles)} inputs ({', '.join(roles)}), got {len(node.inputs)}")
    if node.attrs.get("mode", "dense") not in FLASH_FFN_MODES:
        raise InferenceError(f"{node.describe()}: mode {node.attrs.get('mode')!r} is not one of {FLASH_FFN_MODES}")
    if node.attrs.get("activation", "relu") not in FLASH_FFN_ACTIVATIONS:
        raise InferenceError(f"{node.describe()}: activation {node.attrs.get('activation')!r} is not one of "
                             f"{FLASH_FFN_ACTIVATIONS}")
    x, up, down = (node.inputs[roles[r]].type for r in ("x", "up", "down"))
    if x is None or up is None or down is None:
        return [x]
    if len(up.shape) != 2 or len(down.shape) != 2 or up.shape[0] != x.shape[-1] or down.shape != (up.shape[1], up.shape[0]):
        raise InferenceError(f"{node.describe()}: x {x}, up {up} and down {down} do not make a feed-forward layer "
                             "(up [hidden, neurons], down [neurons, hidden])")
    return [x]


def _flash_ffn_flops(node: Node) -> int:
    roles = flash_ffn_weights(node)
    x, up = node.inputs[0].type, node.inputs[roles["up"]].type
    tokens = int(np.prod([d for d in x.shape[:-1]])) if x is not None and all(isinstance(d, int) for d in x.shape) else 1
    hidden, neurons = up.shape
    return 2 * tokens * hidden * neurons * (3 if node.attrs.get("gated") else 2)


def _flash_ffn_kernel(node: Node, opset: int) -> Kernel:
    """The executable spec: the whole layer exact (``dense``), or over the neurons the predictor picks only
    (``predict``, ``window``: the window cache changes what is read, not what is computed)."""
    roles = flash_ffn_weights(node)
    gated, mode = bool(node.attrs.get("gated")), node.attrs.get("mode", "dense")

    def run(ins: list) -> list:
        x = ins[0]
        rows = x.reshape(-1, x.shape[-1]).astype(np.float32)
        up, b_up = ins[roles["up"]].astype(np.float32), ins[roles["b_up"]].astype(np.float32)
        down = ins[roles["down"]].astype(np.float32)
        gate = ins[roles["gate"]].astype(np.float32) if gated else None
        if mode != "dense":
            ids = flash_ffn_active(node, rows, ins[roles["pred_left"]], ins[roles["pred_right"]], b_up)
            up, b_up, down = up[:, ids], b_up[ids], down[ids]
            gate = gate[:, ids] if gated else None
        pre = rows @ up + b_up
        if gated:
            g = rows @ gate
            hidden = g / (1 + np.exp(-g)) * pre
        else:
            hidden = np.maximum(pre, 0)
        y = hidden @ down + ins[roles["b_down"]].astype(np.float32)
        return [y.astype(x.dtype).reshape(x.shape)]
    return run


register_op(OpDef(FLASH_FFN_OP, FusionKind.opaque, flops=_flash_ffn_flops, make_kernel=_flash_ffn_kernel,
                  infer=_flash_ffn_infer,
                  attr_schema={"layer": str, "activation": str, "gated": int, "mode": str, "chunk_neurons": int,
                               "bundled": int, "window": int, "capacity": int, "margin": float},
                  notes="a feed-forward layer whose weights stream from the flash image: act(x @ up + b_up) @ down "
                        "+ b_down (gated: silu(x @ gate) * (x @ up)); with a predictor, over its predicted neurons"))


# --- one new token attending over a KV cache (canonicalize's attention-over-cache rule) -----------------------

DECODE_ATTENTION_OP = "hetflow.decode_attention"


class DecodeAttentionError(HetflowError):
    """A decode_attention node was given a position outside its cache's slots."""


def decode_attention_shapes(node: Node) -> tuple[int, int, int, int] | None:
    """(batch, heads, slots, head_dim) from the node's k_cache type; None when that is not static."""
    cache = node.inputs[3].type if len(node.inputs) > 3 and node.inputs[3] is not None else None
    if cache is None or not cache.is_static or len(cache.shape) != 4:
        return None
    return tuple(int(d) for d in cache.shape)


def _decode_attention_infer(node: Node, opset: int) -> list[TensorType | None]:
    if len(node.inputs) != 6 or any(v is None for v in node.inputs):
        raise InferenceError(f"{node.describe()}: takes 6 inputs (q, k, v, k_cache, v_cache, position), "
                             f"got {len(node.inputs)}")
    q, k, v, k_cache, v_cache, position = (x.type for x in node.inputs)
    if any(t is None for t in (q, k, v, k_cache, v_cache, position)):
        return [q]
    shapes = decode_attention_shapes(node)
    if shapes is None:
        raise InferenceError(f"{node.describe()}: k_cache must be static [batch, heads, slots, head_dim], got "
                             f"{k_cache}")
    batch, heads, _, head_dim = shapes
    token = (batch, 1, heads * head_dim)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if tuple(t.shape) != token or t.dtype != k_cache.dtype:
            raise InferenceError(f"{node.describe()}: {name} is {t}, expected {k_cache.dtype.value}{list(token)} "
                                 f"(one token, heads packed, for a cache {k_cache})")
    if v_cache != k_cache:
        raise InferenceError(f"{node.describe()}: v_cache {v_cache} must have k_cache's type {k_cache}")
    for name, cache in (("k_cache", node.inputs[3]), ("v_cache", node.inputs[4])):
        readers = len(cache.uses)
        if readers > 1:   # the CPU runs it writing the cache's slot in place: nothing else may read it
            raise InferenceError(f"{node.describe()}: {name} %{cache.name} is read {readers} times; a "
                                 f"decode_attention's caches are read by it alone")
    if position.dtype.value != "i64" or tuple(position.shape) not in ((1,), ()):
        raise InferenceError(f"{node.describe()}: position must be i64[1] or i64[], got {position}")
    return [q]


def _decode_attention_flops(node: Node) -> int:
    shapes = decode_attention_shapes(node)
    if shapes is None:
        return 0
    batch, heads, slots, head_dim = shapes
    return 4 * batch * heads * (slots + 1) * head_dim + 5 * batch * heads * (slots + 1)


def _decode_attention_kernel(node: Node, opset: int) -> Kernel:
    """The executable spec: token t = ``position`` attends over cache slots [0, t) and itself.

    Per batch row b and head h: scores s_j = scale * q_h . k_cache[b, h, j] for j < t and s_t = scale * q_h . k_h,
    weights softmax(s), out_h = sum_j w_j v_cache[b, h, j] + w_t v_h. Slots at and after t are not read. A
    position outside [0, slots) is an error naming the node (the cache has no slot for the token)."""
    scale = float(node.attrs["scale"])

    def run(ins: list) -> list:
        q, k, v, k_cache, v_cache, position = ins
        batch, heads, slots, head_dim = k_cache.shape
        t = int(np.asarray(position).reshape(-1)[0])
        if not 0 <= t < slots:
            raise DecodeAttentionError(f"{node.describe()}: position {t} is outside the cache's {slots} slots "
                                       f"[0, {slots})")
        dtype = q.dtype
        qh = q.reshape(batch, heads, 1, head_dim)
        kh = k.reshape(batch, heads, 1, head_dim)
        vh = v.reshape(batch, heads, 1, head_dim)
        keys = np.concatenate([k_cache[:, :, :t], kh], axis=2)          # [b, h, t + 1, d]
        values = np.concatenate([v_cache[:, :, :t], vh], axis=2)
        scores = np.matmul(qh, keys.transpose(0, 1, 3, 2)) * dtype.type(scale)   # [b, h, 1, t + 1]
        scores = scores - scores.max(axis=-1, keepdims=True)
        weights = np.exp(scores)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        out = np.matmul(weights, values)                                  # [b, h, 1, d]
        return [out.reshape(batch, 1, heads * head_dim).astype(dtype, copy=False)]
    return run


register_op(OpDef(DECODE_ATTENTION_OP, FusionKind.opaque, flops=_decode_attention_flops,
                  make_kernel=_decode_attention_kernel, infer=_decode_attention_infer,
                  attr_schema={"scale": float},
                  notes="one new token (q, k, v [batch, 1, heads * head_dim]) attending over the cache slots before "
                        "position (k_cache, v_cache [batch, heads, slots, head_dim]) and itself: "
                        "softmax(scale * q . [k_cache[:position]; k]) . [v_cache[:position]; v]"))
