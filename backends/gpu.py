"""The GPU backend: a partition placed on a CUDA GPU, emitted as a PyTorch program.

Emission (compile time, no torch needed): the partition's IR becomes one Python
function, ``gpu/partN.py`` in the artifact, one line per op, from this module's
table (``TORCH_OPS``: op name -> the PyTorch expression with ONNX semantics).
Fused groups are inlined. Shapes are static, so reshapes, expands and splits are
written with their literal shapes, and the constant operands of shape-like ops
(Slice bounds, reduction axes, pads) become literals too. An op or dtype the table
lacks is an error naming the node and the op: the ``host+cuda`` platform lists
exactly these ops as its GPU's, so placement never puts another op there.

Running (``GpuPartition``): the program's weights are uploaded to the GPU once.
``kernels="triton"`` (the default) traces the function with torch.fx and compiles
it with TorchInductor, which generates Triton kernels for it (no dynamo guards: the
shapes are static); ``kernels="torch"`` runs
PyTorch's own CUDA kernels (cuBLAS, cuDNN, ATen). On CUDA the whole partition,
including the copies of its results into the runtime's GPU arena, is captured
into a CUDA graph at the first call and replayed on every later one: one launch per
partition, no Python per op. The arena's addresses never change, so the graph
reads its inputs and writes its outputs in place. The worker waits for the GPU
to finish a partition before it signals the partition's outputs, so measured
times are the GPU's.

The same program runs on the CPU (``device="cpu"``): the tests check every row
against the reference interpreter that way on machines without a GPU, and
``fallback="cpu"`` uses it to run a GPU artifact on a machine without one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from hetflow.ir import Graph, Node
from hetflow.ir.types import DType

from .cpu import BackendError, _flatten

BACKEND = "cuda"

TORCH_DTYPES = {"f16": "torch.float16", "bf16": "torch.bfloat16", "f32": "torch.float32", "f64": "torch.float64",
                "i8": "torch.int8", "i16": "torch.int16", "i32": "torch.int32", "i64": "torch.int64",
                "u8": "torch.uint8", "bool": "torch.bool"}


class Unsupported(Exception):
    """A corner of an op the table does not cover (raised while emitting; reported with the node)."""


@dataclass
class Emit:
    """What an op row sees: the node, its operands as Python expressions, and access to constants."""
    node: Node
    ins: list[str]
    program: "Program"
    consts: list[np.ndarray | None]

    def attr(self, name, default=None):
        return self.node.attrs.get(name, default)

    def const(self, index: int, what: str) -> np.ndarray | None:
        """The value of operand ``index`` if the program knows it at emission (a weight); None if absent."""
        if index >= len(self.ins) or self.ins[index] == "None":
            return None
        value = self.consts[index]
        if value is None:
            raise Unsupported(f"{what} (input {index}) given at run time (it must be a constant)")
        return value

    def shape(self, index: int = 0) -> tuple[int, ...]:
        return tuple(self.node.outputs[index].type.shape)

    def in_shape(self, index: int = 0) -> tuple[int, ...]:
        return tuple(self.node.inputs[index].type.shape)

    def in_dtype(self, index: int = 0) -> DType:
        return self.node.inputs[index].type.dtype

    def out_dtype(self, index: int = 0) -> str:
        return TORCH_DTYPES[self.node.outputs[index].type.dtype.value]

    def constant(self, array: np.ndarray) -> str:
        return self.program.constant(np.asarray(array))


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# --- the rows ----------------------------------------------------------------------------------------

def _unary(fn: str):
    return lambda e: f"{fn}({e.ins[0]})"


def _binary(operator: str):
    return lambda e: f"({e.ins[0]} {operator} {e.ins[1]})"


def _call2(fn: str):
    return lambda e: f"{fn}({e.ins[0]}, {e.ins[1]})"


def _variadic(fn: str):
    def row(e):
        expr = e.ins[0]
        for other in e.ins[1:]:
            expr = f"{fn}({expr}, {other})"
        return expr
    return row


def _div(e):
    if e.in_dtype().is_float:
        return f"({e.ins[0]} / {e.ins[1]})"
    return f"torch.div({e.ins[0]}, {e.ins[1]}, rounding_mode='trunc')"


def _pow(e):
    return f"torch.pow({e.ins[0]}, {e.ins[1]}).to({e.out_dtype()})"


def _mod(e):
    fn = "torch.fmod" if e.attr("fmod", 0) else "torch.remainder"
    return f"{fn}({e.ins[0]}, {e.ins[1]})"


def _clip(e):
    if e.program.opset < 11:
        low, high = e.attr("min"), e.attr("max")
        low = None if low is None else repr(float(low))
        high = None if high is None else repr(float(high))
    else:
        low = e.ins[1] if len(e.ins) > 1 and e.ins[1] != "None" else None
        high = e.ins[2] if len(e.ins) > 2 and e.ins[2] != "None" else None
    if low is None and high is None:
        return e.ins[0]
    return f"torch.clamp({e.ins[0]}, {low}, {high})"


def _gelu(e):
    approximate = e.attr("approximate", "none")
    return f"F.gelu({e.ins[0]}, approximate={approximate!r})"


def _with_alpha(fn: str, default: float):
    return lambda e: f"{fn}({e.ins[0]}, {float(e.attr('alpha', default))!r})"


def _hard_sigmoid(e):
    alpha, beta = float(e.attr("alpha", 0.2)), float(e.attr("beta", 0.5))
    return f"torch.clamp({e.ins[0]} * {alpha!r} + {beta!r}, 0.0, 1.0)"


def _prelu(e):
    x, slope = e.ins
    return f"torch.where({x} < 0, {x} * {slope}, {x})"


def _cast(e):
    return f"{e.ins[0]}.to({e.out_dtype()})"


def _cast_like(e):
    return f"{e.ins[0]}.to({e.ins[1]}.dtype)"


def _matmul(e):
    return f"torch.matmul({e.ins[0]}, {e.ins[1]})"


def _gemm(e):
    a, b = e.ins[0], e.ins[1]
    c = e.ins[2] if len(e.ins) > 2 and e.ins[2] != "None" else None
    alpha, beta = float(e.attr("alpha", 1.0)), float(e.attr("beta", 1.0))
    trans_a, trans_b = e.attr("transA", 0), e.attr("transB", 0)
    c_rank = len(e.node.inputs[2].type.shape) if c is not None else 0
    if trans_b and not trans_a and alpha == 1.0 and (c is None or (beta == 1.0 and c_rank == 1)):
        return f"F.linear({a}, {b}{', ' + c if c else ''})"
    a = f"{a}.t()" if trans_a else a
    b = f"{b}.t()" if trans_b else b
    if c is None or beta == 0.0:
        product = f"torch.matmul({a}, {b})"
        return product if alpha == 1.0 else f"({product} * {alpha!r})"
    return f"torch.addmm({c}, {a}, {b}, beta={beta!r}, alpha={alpha!r})"


def _spatial(e, rank: int) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """Kernel, strides, dilations and (begin, end) pads of a conv or pool, SAME auto-pads resolved."""
    x_shape = e.in_shape(0)[2:]
    if e.node.op in ("Conv", ):
        kernel = list(e.attr("kernel_shape") or e.in_shape(1)[2:])
    else:
        kernel = list(e.attr("kernel_shape"))
    strides = list(e.attr("strides") or [1] * rank)
    dilations = list(e.attr("dilations") or [1] * rank)
    pads = list(e.attr("pads") or [0] * (2 * rank))
    auto_pad = e.attr("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad == "VALID":
        pads = [0] * (2 * rank)
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * rank)
        for i in range(rank):
            out = -(-x_shape[i] // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - x_shape[i], 0)
            small, large = total // 2, total - total // 2
            pads[i], pads[i + rank] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    elif auto_pad not in ("NOTSET", ""):
        raise Unsupported(f"auto_pad {auto_pad}")
    return kernel, strides, dilations, pads[:rank], pads[rank:]


def _torch_pads(begin: list[int], end: list[int]) -> list[int]:
    """ONNX's (begins..., ends...) as F.pad's (last dim first) pairs."""
    out = []
    for b, en in reversed(list(zip(begin, end))):
        out += [b, en]
    return out


def _conv(e):
    rank = len(e.in_shape(0)) - 2
    if rank not in (1, 2, 3):
        raise Unsupported(f"{rank}-D convolution")
    kernel, strides, dilations, begin, end = _spatial(e, rank)
    x = e.ins[0]
    padding = begin
    if begin != end:
        x = f"F.pad({x}, {_torch_pads(begin, end)})"
        padding = [0] * rank
    bias = e.ins[2] if len(e.ins) > 2 and e.ins[2] != "None" else "None"
    return (f"F.conv{rank}d({x}, {e.ins[1]}, {bias}, stride={strides}, padding={padding}, "
            f"dilation={dilations}, groups={int(e.attr('group', 1))})")


def _pool_common(e, rank):
    if len(e.node.outputs) > 1:
        raise Unsupported("the Indices output")
    if rank not in (1, 2, 3):
        raise Unsupported(f"{rank}-D pooling")
    return _spatial(e, rank)


def _max_pool(e):
    rank = len(e.in_shape(0)) - 2
    kernel, strides, dilations, begin, end = _pool_common(e, rank)
    x = e.ins[0]
    ceil = bool(e.attr("ceil_mode", 0))
    padding = begin
    if begin != end or any(2 * p > k for p, k in zip(begin, kernel)):
        x = f"F.pad({x}, {_torch_pads(begin, end)}, value=float('-inf'))"
        padding = [0] * rank
    return (f"F.max_pool{rank}d({x}, {kernel}, stride={strides}, padding={padding}, dilation={dilations}, "
            f"ceil_mode={ceil})")


def _average_pool(e):
    rank = len(e.in_shape(0)) - 2
    kernel, strides, dilations, begin, end = _pool_common(e, rank)
    if any(d != 1 for d in dilations):
        raise Unsupported("dilated average pooling")
    include = bool(e.attr("count_include_pad", 0))
    ceil = bool(e.attr("ceil_mode", 0))
    if ceil and any(begin + end):
        raise Unsupported("ceil_mode with pads")
    x, padding = e.ins[0], begin
    if begin != end or any(2 * p > k for p, k in zip(begin, kernel)):
        if not include:
            raise Unsupported("asymmetric pads without count_include_pad")
        x = f"F.pad({x}, {_torch_pads(begin, end)})"
        padding = [0] * rank
    return (f"F.avg_pool{rank}d({x}, {kernel}, stride={strides}, padding={padding}, ceil_mode={ceil}, "
            f"count_include_pad={include})")


def _global_pool(fn: str):
    def row(e):
        dims = tuple(range(2, len(e.in_shape(0))))
        return f"{e.ins[0]}.{fn}(dim={dims}, keepdim=True)"
    return row


def _batch_norm(e):
    if len(e.node.outputs) > 1 or e.attr("training_mode", 0):
        raise Unsupported("training mode")
    x, scale, bias, mean, var = e.ins
    return f"F.batch_norm({x}, {mean}, {var}, {scale}, {bias}, False, 0.0, {float(e.attr('epsilon', 1e-5))!r})"


def _layer_norm(e):
    if len(e.node.outputs) > 1:
        raise Unsupported("the Mean and InvStdDev outputs")
    shape = e.in_shape(0)
    axis = _axis(e.attr("axis", -1), len(shape))
    normalized = list(shape[axis:])
    weight = e.ins[1]
    if tuple(e.in_shape(1)) != tuple(normalized):
        weight = f"{weight}.expand({normalized})"
    bias = e.ins[2] if len(e.ins) > 2 and e.ins[2] != "None" else "None"
    if bias != "None" and tuple(e.in_shape(2)) != tuple(normalized):
        bias = f"{bias}.expand({normalized})"
    eps = float(e.attr("epsilon", 1e-5))
    if e.in_dtype().value in ("f16", "bf16"):  # stash_type: ONNX computes in f32
        return f"F.layer_norm({e.ins[0]}.float(), {normalized}, {weight}.float(), " \
               f"{bias if bias == 'None' else bias + '.float()'}, {eps!r}).to({e.out_dtype()})"
    return f"F.layer_norm({e.ins[0]}, {normalized}, {weight}, {bias}, {eps!r})"


def _softmax(fn: str):
    def row(e):
        shape = e.in_shape(0)
        if e.program.opset >= 13:
            return f"torch.{fn}({e.ins[0]}, {_axis(e.attr('axis', -1), len(shape))})"
        axis = _axis(e.attr("axis", 1), len(shape))
        rows = math.prod(shape[:axis])
        return f"torch.{fn}({e.ins[0]}.reshape({rows}, -1), 1).reshape({list(shape)})"
    return row


def _reduce(fn: str, float_only: bool = False):
    def row(e):
        if float_only and not e.in_dtype().is_float:
            raise Unsupported(f"{e.in_dtype().value} input")
        rank = len(e.in_shape(0))
        if "axes" in e.node.attrs:
            axes = list(e.attr("axes"))
        else:
            given = e.const(1, "axes")
            axes = [] if given is None else [int(a) for a in np.asarray(given).reshape(-1)]
        keep = bool(e.attr("keepdims", 1))
        if not axes:
            if e.attr("noop_with_empty_axes", 0):
                return e.ins[0]
            axes = list(range(rank))
        axes = sorted(_axis(a, rank) for a in axes)
        if fn in ("torch.amax", "torch.amin") and any(e.in_shape(0)[a] == 0 for a in axes):
            raise Unsupported("a max or min over an empty axis")
        if rank == 0:
            return e.ins[0]
        return f"{fn}({e.ins[0]}, dim={tuple(axes)}, keepdim={keep})"
    return row


def _reshape(e):
    return f"{e.ins[0]}.reshape({list(e.shape())})"


def _expand(e):
    return f"{e.ins[0]}.expand({list(e.shape())})"


def _transpose(e):
    rank = len(e.in_shape(0))
    perm = list(e.attr("perm") or reversed(range(rank)))
    return f"{e.ins[0]}.permute({perm})"


def _concat(e):
    rank = len(e.in_shape(0))
    return f"torch.cat([{', '.join(e.ins)}], {_axis(e.attr('axis'), rank)})"


def _split(e):
    axis = _axis(e.attr("axis", 0), len(e.in_shape(0)))
    sizes = [e.node.outputs[i].type.shape[axis] for i in range(len(e.node.outputs))]
    if sum(sizes) != e.in_shape(0)[axis]:
        raise Unsupported("output sizes that do not cover the input")
    return f"torch.split({e.ins[0]}, {sizes}, {axis})"


def _slice(e):
    shape = e.in_shape(0)
    rank = len(shape)
    if e.program.opset < 10:
        starts, ends = list(e.attr("starts")), list(e.attr("ends"))
        axes = list(e.attr("axes") or range(len(starts)))
        steps = [1] * len(starts)
    else:
        starts = [int(s) for s in e.const(1, "starts").reshape(-1)]
        ends = [int(s) for s in e.const(2, "ends").reshape(-1)]
        given_axes, given_steps = e.const(3, "axes"), e.const(4, "steps")
        axes = list(range(len(starts))) if given_axes is None else [int(a) for a in given_axes.reshape(-1)]
        steps = [1] * len(starts) if given_steps is None else [int(s) for s in given_steps.reshape(-1)]
    expr = e.ins[0]
    index = [":"] * rank
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(axis, rank)
        picked = list(range(shape[axis]))[slice(max(min(start, 2**62), -2**62), max(min(end, 2**62), -2**62), step)]
        if not picked:
            index[axis] = "0:0"
        elif step > 0:
            index[axis] = f"{picked[0]}:{picked[-1] + 1}:{step}"
        else:  # torch has no negative steps: flip, then slice forward
            flips.append(axis)
            first = shape[axis] - 1 - picked[0]
            index[axis] = f"{first}:{first + (len(picked) - 1) * -step + 1}:{-step}"
    if flips:
        expr = f"torch.flip({expr}, {flips})"
    return f"{expr}[{', '.join(index)}]"


def _normalised_index(e, index_input: int, dim: int) -> str:
    """Indices with negative entries wrapped (the constant case is checked at emission)."""
    indices = e.ins[index_input]
    known = e.consts[index_input]
    if known is not None and (np.asarray(known) >= 0).all():
        return f"{indices}.long()"
    return f"torch.where({indices} < 0, {indices} + {dim}, {indices}).long()"


def _gather(e):
    shape = e.in_shape(0)
    axis = _axis(e.attr("axis", 0), len(shape))
    index = _normalised_index(e, 1, shape[axis])
    return f"torch.index_select({e.ins[0]}, {axis}, {index}.reshape(-1)).reshape({list(e.shape())})"


def _gather_elements(e):
    shape = e.in_shape(0)
    axis = _axis(e.attr("axis", 0), len(shape))
    return f"torch.gather({e.ins[0]}, {axis}, {_normalised_index(e, 1, shape[axis])})"


def _shape(e):
    shape = list(e.in_shape(0))
    start, end = e.attr("start", 0), e.attr("end", None)
    return e.constant(np.array(shape[slice(start, end)], np.int64))


def _constant_of_shape(e):
    value = e.attr("value")
    fill = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    return e.constant(np.full(e.shape(), fill[0], dtype=fill.dtype))


def _range(e):
    start, limit, delta = (e.const(i, name).item() for i, name in enumerate(("start", "limit", "delta")))
    dtype = e.node.outputs[0].type.dtype.numpy
    return e.constant(np.arange(start, limit, delta).astype(dtype))


def _trilu(e):
    k = e.const(1, "k")
    k = 0 if k is None else int(np.asarray(k).reshape(-1)[0])
    return f"torch.{'triu' if e.attr('upper', 1) else 'tril'}({e.ins[0]}, {k})"


def _tile(e):
    repeats = [int(r) for r in e.const(1, "repeats").reshape(-1)]
    return f"{e.ins[0]}.repeat({repeats})"


def _pad(e):
    mode = e.attr("mode", "constant")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if mode != "constant":
        raise Unsupported(f"mode {mode}")
    rank = len(e.in_shape(0))
    if e.program.opset < 11:
        pads, value = list(e.attr("pads")), float(e.attr("value", 0.0))
        value_expr = repr(value)
    else:
        pads = [int(p) for p in e.const(1, "pads").reshape(-1)]
        given = e.const(2, "constant_value")
        value_expr = "0" if given is None else repr(np.asarray(given).reshape(-1)[0].item())
        axes_given = e.const(3, "axes")
        if axes_given is not None:
            axes = [_axis(int(a), rank) for a in axes_given.reshape(-1)]
            full = [0] * (2 * rank)
            for i, axis in enumerate(axes):
                full[axis], full[axis + rank] = pads[i], pads[i + len(axes)]
            pads = full
    return f"F.pad({e.ins[0]}, {_torch_pads(pads[:rank], pads[rank:])}, value={value_expr})"


def _arg(fn: str):
    def row(e):
        if e.attr("select_last_index", 0):
            raise Unsupported("select_last_index")
        axis = _axis(e.attr("axis", 0), len(e.in_shape(0)))
        return f"torch.{fn}({e.ins[0]}, {axis}, keepdim={bool(e.attr('keepdims', 1))})"
    return row


def _einsum(e):
    equation = e.attr("equation")
    if isinstance(equation, bytes):
        equation = equation.decode()
    return f"torch.einsum({equation!r}, {', '.join(e.ins)})"


def _identity(e):
    return e.ins[0]


def _dropout(e):
    if len(e.node.outputs) > 1:
        raise Unsupported("the mask output")
    training = e.const(2, "training_mode") if e.program.opset >= 12 else np.array(e.attr("is_test", 1) == 0)
    if training is not None and bool(np.asarray(training).reshape(-1)[0]):
        raise Unsupported("training mode (random masks)")
    return e.ins[0]


def _where(e):
    return f"torch.where({e.ins[0]}, {e.ins[1]}, {e.ins[2]})"


TORCH_OPS = {
    # elementwise
    "Relu": _unary("torch.relu"), "Sigmoid": _unary("torch.sigmoid"), "Tanh": _unary("torch.tanh"),
    "Exp": _unary("torch.exp"), "Log": _unary("torch.log"), "Sqrt": _unary("torch.sqrt"),
    "Neg": _unary("torch.neg"), "Abs": _unary("torch.abs"), "Erf": _unary("torch.erf"),
    "Reciprocal": _unary("torch.reciprocal"), "Floor": _unary("torch.floor"), "Ceil": _unary("torch.ceil"),
    "Sin": _unary("torch.sin"), "Cos": _unary("torch.cos"), "Not": _unary("torch.logical_not"),
    "IsNaN": _unary("torch.isnan"), "Sign": _unary("torch.sign"), "Round": _unary("torch.round"),
    "Softplus": _unary("F.softplus"), "Softsign": _unary("F.softsign"), "Gelu": _gelu,
    "LeakyRelu": _with_alpha("F.leaky_relu", 0.01), "Elu": _with_alpha("F.elu", 1.0),
    "HardSigmoid": _hard_sigmoid, "PRelu": _prelu, "Clip": _clip,
    "Identity": _identity, "Dropout": _dropout, "Cast": _cast, "CastLike": _cast_like,
    # broadcast
    "Add": _binary("+"), "Sub": _binary("-"), "Mul": _binary("*"), "Div": _div, "Pow": _pow, "Mod": _mod,
    "Equal": _call2("torch.eq"), "Less": _call2("torch.lt"), "LessOrEqual": _call2("torch.le"),
    "Greater": _call2("torch.gt"), "GreaterOrEqual": _call2("torch.ge"), "And": _call2("torch.logical_and"),
    "Or": _call2("torch.logical_or"), "Xor": _call2("torch.logical_xor"), "Where": _where,
    "Max": _variadic("torch.maximum"), "Min": _variadic("torch.minimum"), "Sum": _variadic("torch.add"),
    # contraction
    "MatMul": _matmul, "Gemm": _gemm, "Conv": _conv, "Einsum": _einsum,
    # window and reduction
    "MaxPool": _max_pool, "AveragePool": _average_pool, "GlobalAveragePool": _global_pool("mean"),
    "GlobalMaxPool": _global_pool("amax"), "BatchNormalization": _batch_norm, "LayerNormalization": _layer_norm,
    "Softmax": _softmax("softmax"), "LogSoftmax": _softmax("log_softmax"),
    "ReduceSum": _reduce("torch.sum"), "ReduceMean": _reduce("torch.mean", float_only=True),
    "ReduceMax": _reduce("torch.amax"), "ReduceMin": _reduce("torch.amin"),
    "ArgMax": _arg("argmax"), "ArgMin": _arg("argmin"),
    # data movement
    "Reshape": _reshape, "Flatten": _reshape, "Squeeze": _reshape, "Unsqueeze": _reshape, "Expand": _expand,
    "Transpose": _transpose, "Concat": _concat, "Split": _split, "Slice": _slice, "Gather": _gather,
    "GatherElements": _gather_elements, "Shape": _shape, "ConstantOfShape": _constant_of_shape,
    "Range": _range, "Trilu": _trilu, "Tile": _tile, "Pad": _pad,
}

# operands the rows read at emission (opset 10+ forms): they must be weights, not run-time values
CONSTANT_OPERANDS = {"Slice": (1, 2, 3, 4), "Pad": (1, 2, 3), "Tile": (1,), "Trilu": (1,), "Range": (0, 1, 2),
                     "Dropout": (2,), **{op: (1,) for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin")}}

GPU_OPS = tuple(sorted(TORCH_OPS))
GPU_DTYPES = tuple(sorted(TORCH_DTYPES))
MULTI_OUTPUT = {"Split"}


# --- emission ----------------------------------------------------------------------------------------

@dataclass
class Program:
    """The emitted source of one partition, and what it needs at load time."""
    name: str
    opset: int
    inputs: list[str] = field(default_factory=list)      # partition input names, in argument order
    weights: list[str] = field(default_factory=list)     # weight names, in argument order
    outputs: list[str] = field(default_factory=list)
    constants: list[np.ndarray] = field(default_factory=list)  # made at emission (Shape, Range...)
    lines: list[str] = field(default_factory=list)

    def constant(self, array: np.ndarray) -> str:
        self.constants.append(array)
        return f"c{len(self.constants) - 1}"


def emit_program(graph: Graph, where: str) -> str:
    """The partition as the source of a PyTorch program (``gpu/partN.py``); raises naming the node and op."""
    names = {id(v): v.name for v in graph.values()}
    program = Program(graph.name, graph.opset)
    variables: dict[str, str] = {}
    for v in graph.inputs:
        variables[v.name] = f"i{len(program.inputs)}"
        program.inputs.append(v.name)
    weights = dict(graph.weights)
    constant_data = {n: np.asarray(w.data) for n, w in weights.items()}
    for name, w in weights.items():
        _check_dtype(w.type.dtype.value, f"weight {name!r}", where)
        variables[name] = f"w{len(program.weights)}"
        program.weights.append(name)
    for node in graph.nodes:
        for inner, mapping in _flatten(node, names, ""):
            _emit_node(inner, mapping, program, variables, constant_data, where)
    for v in graph.outputs:
        if v.name not in variables or v.name in program.inputs or v.name in weights:
            raise BackendError(f"partition {where}: output {v.name!r} is an input or a weight and needs no kernel")
        program.outputs.append(v.name)
    return _source(program, variables)


def emit_failure(node: Node, opset: int = 18) -> str | None:
    """Why the GPU backend cannot emit this top-level node (a group: any op inside), or None if it can.
    Placement asks this for a real GPU, so that it never places there what the backend would refuse."""
    names = {}
    constant_data = {}
    for v in node.inputs:
        if v is not None:
            names[id(v)] = v.name
            if v.data is not None:
                constant_data[v.name] = np.asarray(v.data)
    for out in node.outputs:
        names[id(out)] = out.name
    program = Program("check", opset)
    variables = {name: f"x{i}" for i, name in enumerate(names.values())}
    try:
        for inner, mapping in _flatten(node, names, ""):
            _emit_node(inner, mapping, program, variables, constant_data, "check")
    except BackendError as exc:
        return str(exc).split("partition check: ", 1)[-1]
    return None


def _check_dtype(dtype: str, what: str, where: str) -> None:
    if dtype not in TORCH_DTYPES:
        raise BackendError(f"backends.gpu: partition {where}: {what} is {dtype}, which the GPU backend does not "
                           f"run (it runs {', '.join(GPU_DTYPES)})")


def _emit_node(node: Node, mapping: dict, program: Program, variables: dict, constant_data: dict,
               where: str) -> None:
    row = TORCH_OPS.get(node.op)
    described = node.describe()
    if row is None:
        raise BackendError(f"backends.gpu: partition {where}: op {node.op} ({described}) has no GPU kernel; "
                           f"the GPU backend runs {len(GPU_OPS)} ops (hetflow platforms show them)")
    for v in list(node.inputs) + list(node.outputs):
        if v is None:
            continue
        if v.type is None or not v.type.is_static:
            raise BackendError(f"backends.gpu: partition {where}: {described} ({node.op}) has a value of "
                               f"unknown or symbolic shape ({v.name}); the GPU backend needs static shapes")
        _check_dtype(v.type.dtype.value, f"{described} ({node.op}) value {v.name!r}", where)
    ins = ["None" if v is None else variables[mapping[id(v)]] for v in node.inputs]
    consts = [None if v is None else constant_data.get(mapping[id(v)]) for v in node.inputs]
    try:
        expr = row(Emit(node, ins, program, consts))
    except Unsupported as exc:
        raise BackendError(f"backends.gpu: partition {where}: {described} ({node.op}): the GPU backend does "
                           f"not cover {exc}") from None
    outs = []
    for out in node.outputs:
        name = mapping[id(out)]
        variables[name] = f"v{len(variables)}"
        outs.append(variables[name])
    comment = _quoted(node.loc or node.outputs[0].name)  # a name from a model: quoted, never raw source
    if node.op not in MULTI_OUTPUT:
        program.lines.append(f"    {outs[0]} = {expr}  # {node.op} {comment}")
        return
    parts = f"t{len(program.lines)}"  # indexed, not unpacked: torch.fx traces the program for Triton
    program.lines.append(f"    {parts} = {expr}  # {node.op} {comment}")
    program.lines.extend(f"    {out} = {parts}[{i}]" for i, out in enumerate(outs))


def _quoted(name: str, limit: int = 100) -> str:
    """A name as a Python string literal, for a comment: whatever it holds (a carriage return, quotes,
    code) stays inside the literal and the comment, on its line."""
    return repr(name[:limit])


def _source(program: Program, variables: dict) -> str:
    arguments = ([variables[n] for n in program.inputs] + [variables[n] for n in program.weights]
                 + [f"c{i}" for i in range(len(program.constants))])
    constants = [{"values": c.reshape(-1).tolist(), "dtype": str(c.dtype), "shape": list(c.shape)}
                 for c in program.constants]
    results = ", ".join(variables[n] for n in program.outputs)
    return "\n".join([
        '"""A hetflow GPU partition (PARTITION): emitted by hetflow.backends.gpu from the IR.',
        "",
        'Runs with PyTorch on a CUDA GPU, as Triton kernels compiled by TorchInductor (kernels="triton") or',
        'with PyTorch\'s own kernels (kernels="torch"). Arguments: the inputs, the weights (from',
        'weights.safetensors), then the constants below, in the orders listed. Every name from the model',
        'appears as a string literal (in the lists below and in the comments), never as code."""',
        "import torch",
        "import torch.nn.functional as F",
        "",
        "# the names repr() writes for non-finite floats (attributes, constants)",
        "nan, inf = float('nan'), float('inf')",
        "",
        f"PARTITION = {program.name!r}",
        f"INPUTS = {program.inputs!r}",
        f"WEIGHTS = {program.weights!r}",
        f"CONSTANTS = {constants!r}",
        f"OUTPUTS = {program.outputs!r}",
        "",
        "",
        f"def run({', '.join(arguments)}):",
        *program.lines,
        f"    return ({results},)",
        "",
    ])
