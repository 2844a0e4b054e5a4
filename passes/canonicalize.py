"""canonicalize: constant folding, shape folding, identity removal, reshape/transpose merging,
MatMul of a transposed weight as Gemm, scalar multiplies moved next to their MatMul, batched MatMuls
without torch's bmm views, torch's safe-softmax
row test in one pass, splat constants as scalars, a decoded token's attention over a KV cache as one
``hetflow.decode_attention`` node (``passes.decode_attention``), CSE, DCE.

Local rules go through the rewrite engine; common subexpression elimination and
dead code elimination are whole-graph sweeps. A graph output keeps its name: a
rule never replaces a value that is a graph output (the model's signature).
"""
from __future__ import annotations

import numpy as np

from hetflow.ir import Graph, Node, TensorType, Value, make_kernel
from hetflow.ir.errors import HetflowError

from .base import PassResult, register_pass
from .decode_attention import attention_over_cache
from .rewrite import Rule, rewrite

FOLD_LIMIT = 1 << 24  # elements: larger results stay computed at run time
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
                    "Multinomial", "Dropout"}


def _forward(graph: Graph, node: Node, replacement: Value, index: int = 0) -> bool:
    """Replace node output ``index`` by ``replacement`` unless it is a graph output."""
    out = node.outputs[index]
    if out.is_output or not out.uses:
        return False
    out.replace_all_uses_with(replacement)
    return True


def _weight(v: Value | None) -> np.ndarray | None:
    return None if v is None else v.data


# --- rules -----------------------------------------------------------------------------------------

def fold_constants(graph: Graph, node: Node) -> bool:
    if node.op in NONDETERMINISTIC or node.subgraphs or not node.inputs:
        return False
    if not any(o.uses for o in node.outputs):
        return False
    if any(v is not None and v.data is None for v in node.inputs):
        return False
    if any(o.is_output for o in node.outputs):  # a graph output stays computed, under its name
        return False
    if any(o.type is not None and (o.type.numel() or FOLD_LIMIT + 1) > FOLD_LIMIT for o in node.outputs):
        return False
    if _tied_head_transpose(node):   # folded, a tied table would be kept twice: matmul_of_transposed_weight
        return False
    try:
        with np.errstate(all="ignore"):
            results = make_kernel(node, graph.opset)([_weight(v) for v in node.inputs])
    except (HetflowError, Exception):  # an op that cannot run on these constants stays as it is
        return False
    for out, result in zip(node.outputs, results):
        result = np.asarray(result)
        if out.type is not None and out.type.dtype.numpy != result.dtype and result.dtype.kind != "O":
            result = result.astype(out.type.dtype.numpy)
        weight = graph.add_weight(graph.fresh_name(out.name + "_const"), result)
        out.replace_all_uses_with(weight)
    return True


def fold_static_shape(graph: Graph, node: Node) -> bool:
    x = node.inputs[0]
    if x is None or x.type is None or not x.type.is_static or not node.outputs[0].uses:
        return False
    if node.op == "Size":
        value = np.array(x.type.numel(), dtype=np.int64)
    else:
        shape = list(x.type.shape)
        rank = len(shape)
        start = node.attrs.get("start", 0)
        end = node.attrs.get("end", rank)
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = min(max(end + rank if end < 0 else end, 0), rank)
        value = np.array(shape[start:end], dtype=np.int64)
    return _forward(graph, node, graph.add_weight(graph.fresh_name(node.outputs[0].name + "_const"), value))


def remove_identity(graph: Graph, node: Node) -> bool:
    return node.inputs[0] is not None and _forward(graph, node, node.inputs[0])


def remove_noop_reshape(graph: Graph, node: Node) -> bool:
    x, out = node.inputs[0], node.outputs[0]
    if x is None or x.type is None or out.type is None or not x.type.is_static:
        return False
    if x.type != out.type:
        return False
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        if perm is None or list(perm) != list(range(len(perm))):
            return False
    return _forward(graph, node, x)


def _neutral(node: Node) -> tuple[int, float] | None:
    """(index of the non-constant operand, neutral value) for x+0, 0+x, x-0, x*1, 1*x, x/1."""
    neutral = {"Add": 0.0, "Sub": 0.0, "Mul": 1.0, "Div": 1.0}[node.op]
    a, b = node.inputs
    if b is not None and b.data is not None and np.all(b.data == neutral):
        return 0, neutral
    if node.op in ("Add", "Mul") and a is not None and a.data is not None and np.all(a.data == neutral):
        return 1, neutral
    return None


def remove_neutral_arithmetic(graph: Graph, node: Node) -> bool:
    found = _neutral(node)
    if found is None:
        return False
    x = node.inputs[found[0]]
    if x.type is None or x.type != node.outputs[0].type:  # broadcasting or a cast would change the result
        return False
    return _forward(graph, node, x)


def merge_reshapes(graph: Graph, node: Node) -> bool:
    inner = node.inputs[0].producer if node.inputs[0] is not None else None
    shape = node.inputs[1]
    if inner is None or inner.op != "Reshape" or shape is None or shape.data is None:
        return False
    if np.any(shape.data == 0) or node.attrs.get("allowzero", 0):
        return False
    node.set_input(0, inner.inputs[0])
    return True


def merge_transposes(graph: Graph, node: Node) -> bool:
    inner = node.inputs[0].producer if node.inputs[0] is not None else None
    if inner is None or inner.op != "Transpose" or "perm" not in node.attrs or "perm" not in inner.attrs:
        return False
    outer_perm, inner_perm = node.attrs["perm"], inner.attrs["perm"]
    node.attrs["perm"] = [inner_perm[i] for i in outer_perm]
    node.set_input(0, inner.inputs[0])
    return True


def matmul_of_transposed_weight(graph: Graph, node: Node) -> bool:
    """MatMul(a, Transpose(w)) with a constant w [V, H] whose transpose is not folded (too large to, or a tied
    table at any size: ``_tied_head_transpose``; a tied LM head is 50257 x 768), without a transposed copy
    beside w:

    * w also read by row lookups (Gather on axis 0, the tied embedding) and nothing else: the table is
      kept once, transposed (wt [H, V]); the LM head becomes MatMul(a, wt) and each lookup
      Transpose(Gather(wt, ids, axis=1)). ONNX Runtime's MatMul over [H, V] is faster than its Gemm with
      transB over [V, H] (measured: 16.3 against 22.3 ms for GPT-2's head on this CPU, the largest
      GEMV of a decode step), and a batched ``a`` (3-D) gets it too;
    * otherwise, on matrices: Gemm(a, w, transB=1).

    Computing the transpose on every call would stream the whole weight twice.
    """
    a, b = node.inputs
    t = b.producer if b is not None else None
    if t is None or t.op != "Transpose" or t.inputs[0] is None or t.inputs[0].data is None:
        return False
    w = t.inputs[0]
    if w.data.ndim != 2 or list(t.attrs.get("perm", [1, 0])) != [1, 0]:
        return False
    lookups = _row_lookups(w, t)
    if lookups:
        # a view, not a copy: the compile does not copy the table (154 MB for GPT-2, 0.35 to 1.9 s), the compile
        # cache records it as a view of the module's tensor, and the bytes are laid out transposed once, where
        # they are written (an artifact's weights file) or handed to a runtime (ONNX Runtime copies them anyway)
        wt = graph.add_weight(graph.fresh_name(w.name + "_t"), w.data.T)
        for gather in lookups:
            ids, out = gather.inputs[1], gather.outputs[0]
            rank = len(ids.type.shape)
            picked = graph.add_node("Gather", [wt, ids], [TensorType(out.type.dtype, [w.data.shape[1], *ids.type.shape])],
                                    {"axis": 1}, gather.loc, output_names=[out.name + "_columns"], before=gather)
            rows = picked.outputs[0]
            if rank:
                rows = graph.add_node("Transpose", [rows], [out.type], {"perm": [*range(1, rank + 1), 0]}, gather.loc,
                                      output_names=[out.name + "_rows"], before=gather).outputs[0]
            out.replace_all_uses_with(rows)
        for user, index in list(t.outputs[0].uses):   # every head reading this transpose (not only this one):
            if user.op == "MatMul" and index == 1:     # the lookups are gone, so a later one would fold a copy
                user.set_input(1, wt)
        return True
    if a is None or a.type is None or a.type.shape is None or len(a.type.shape) != 2:
        return False
    node.op = "Gemm"
    node.attrs = {"transB": 1}
    node.set_input(1, w)
    return True


def _row_lookups(w: Value, transpose: Node) -> list[Node]:
    """The nodes other than ``transpose`` reading the constant ``w`` when they are all row lookups (Gather on
    axis 0 of ``w`` by ids of known shape, none a graph output) and ``w`` is no graph output: a tied table.
    Otherwise []."""
    lookups = [user for user, index in w.uses if user is not transpose]
    if lookups and not w.is_output and all(
            user.op == "Gather" and user.inputs[0] is w and int(user.attrs.get("axis", 0)) == 0
            and user.inputs[1] is not user.inputs[0] and user.inputs[1] is not None
            and user.inputs[1].type is not None and user.inputs[1].type.shape is not None
            and user.outputs[0].type is not None and not user.outputs[0].is_output for user in lookups):
        return lookups
    return []


def _tied_head_transpose(node: Node) -> bool:
    """Transpose(w) of a tied table (``_row_lookups``) read only as the second operand of MatMuls: folding it
    would keep the table twice (the lookups' and the head's, transposed), so it is left for
    ``matmul_of_transposed_weight``, which keeps it once, transposed, whatever its size."""
    w = node.inputs[0] if node.op == "Transpose" and node.inputs else None
    if w is None or w.data is None or w.data.ndim != 2 or list(node.attrs.get("perm", [1, 0])) != [1, 0]:
        return False
    out = node.outputs[0]
    return (bool(out.uses) and not out.is_output
            and all(user.op == "MatMul" and index == 1 and user.inputs[0] is not out for user, index in out.uses)
            and bool(_row_lookups(w, node)))


LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")


def _scalar_constant(v: Value | None) -> bool:
    return v is not None and v.data is not None and v.data.size == 1 and v.data.ndim == 0


def _scaled_operand(mul: Node) -> tuple[Value | None, Value] | None:
    """(x, c) of Mul(x, c) or Mul(c, x) with c a scalar constant; None for any other Mul."""
    a, b = mul.inputs
    if _scalar_constant(b):
        return a, b
    if _scalar_constant(a):
        return b, a
    return None


def sink_scalar_multiply(graph: Graph, node: Node) -> bool:
    """Layout(Mul(x, c)) -> Mul(Layout(x), c) for a scalar constant c: the same products, moved next to
    their consumer, where a MatMul takes them as its scale (ONNX Runtime's FusedMatMul alpha; attention's
    1/sqrt(d) split over Q and K behind their reshapes and transposes)."""
    x = node.inputs[0]
    mul = x.producer if x is not None else None
    if mul is None or mul.op != "Mul" or len(x.uses) != 1 or node.outputs[0].is_output:
        return False
    if not node.outputs[0].uses:  # already moved (dead until DCE)
        return False
    operands = _scaled_operand(mul)
    if operands is None:
        return False
    src, scale = operands
    out = node.outputs[0]
    if src is None or src.type is None or out.type is None or src.type != x.type:  # no broadcast, no cast
        return False
    if src.producer is not None and src.producer.op == "MatMul":
        return False  # already the MatMul's output scale (see hoist_scalar_multiply)
    if node.op == "Reshape" and all(user.op == "MatMul" for user, _ in out.uses):
        return False  # a bmm view: batched-matmul-without-views removes it, the scale then meets the MatMul
    moved = graph.add_node(node.op, [src] + list(node.inputs[1:]), [out.type], dict(node.attrs), node.loc,
                           output_names=[out.name + "_unscaled"], before=node)
    scaled = graph.add_node("Mul", [moved.outputs[0], scale], [out.type], {}, mul.loc,
                            output_names=[out.name + "_scaled"], before=node)
    out.replace_all_uses_with(scaled.outputs[0])
    return True


def hoist_scalar_multiply(graph: Graph, node: Node) -> bool:
    """Mul(Layout(y), c) -> Layout(Mul(y, c)) when y comes from a MatMul through layout ops and the
    product feeds no MatMul: the scale moves up to the MatMul's output, where ONNX Runtime takes it as
    FusedMatMul's alpha (attention scores scaled after their reshape)."""
    operands = _scaled_operand(node)
    if operands is None:
        return False
    x, scale = operands
    out = node.outputs[0]
    layout = x.producer if x is not None else None
    if layout is None or layout.op not in LAYOUT_OPS or len(x.uses) != 1 or out.is_output or not out.uses:
        return False
    if any(user.op == "MatMul" for user, _ in out.uses):
        return False
    y = layout.inputs[0]
    source = y
    while source is not None and source.producer is not None and source.producer.op in LAYOUT_OPS:
        source = source.producer.inputs[0]
    if source is None or source.producer is None or source.producer.op != "MatMul":
        return False
    if y.type is None or out.type is None or x.type != out.type:
        return False
    scaled = graph.add_node("Mul", [y, scale], [y.type], {}, node.loc, output_names=[y.name + "_scaled"],
                            before=layout)
    moved = graph.add_node(layout.op, [scaled.outputs[0]] + list(layout.inputs[1:]), [out.type],
                           dict(layout.attrs), layout.loc, output_names=[out.name + "_hoisted"], before=node)
    return _forward(graph, node, moved.outputs[0])


def _leading_merge(shape_in, shape_out) -> bool:
    """shape_out merges shape_in's leading dims into one and keeps its last two."""
    return (shape_in is not None and shape_out is not None and len(shape_in) >= 3 and len(shape_out) == 3
            and all(isinstance(d, int) for d in list(shape_in) + list(shape_out))
            and tuple(shape_in[-2:]) == tuple(shape_out[-2:]) and int(np.prod(shape_in[:-2])) == shape_out[0])


def batched_matmul_without_views(graph: Graph, node: Node) -> bool:
    """Reshape(MatMul(Reshape(a), Reshape(b))) -> MatMul(a, b), when the inner reshapes only merge
    equal leading (batch) dims of a and b and the outer one splits them back: torch's bmm through
    views. Without the views, a transpose before the MatMul reaches it (ONNX Runtime fuses it)."""
    mm = node.inputs[0].producer if node.inputs[0] is not None else None
    if mm is None or mm.op != "MatMul" or len(node.inputs[0].uses) != 1 or not node.outputs[0].uses:
        return False
    views = [v.producer if v is not None else None for v in mm.inputs]
    if any(r is None or r.op != "Reshape" for r in views):
        return False
    a, b = (r.inputs[0] for r in views)
    if a is None or b is None or a.type is None or b.type is None or mm.outputs[0].type is None:
        return False
    if not all(_leading_merge(src.type.shape, r.outputs[0].type.shape) for src, r in zip((a, b), views)):
        return False
    if tuple(a.type.shape[:-2]) != tuple(b.type.shape[:-2]):
        return False
    out = node.outputs[0]
    want = tuple(a.type.shape[:-2]) + (a.type.shape[-2], b.type.shape[-1])
    if out.type is None or tuple(out.type.shape) != want:
        return False
    direct = graph.add_node("MatMul", [a, b], [out.type], {}, mm.loc, output_names=[out.name + "_batched"],
                            before=node)
    return _forward(graph, node, direct.outputs[0])


NEG_INF = float("-inf")


def _is_const(v: Value | None, value: float) -> bool:
    return v is not None and v.data is not None and v.data.size == 1 and float(v.data.reshape(())) == value


def simplify_masked_row_test(graph: Graph, node: Node) -> bool:
    """torch's safe softmax asks, per row, whether any score is not -inf, as
    Not(Cast(ReduceMax(Cast(Not(Equal(x, -inf)), int32)), bool)) over the whole score tensor;
    the same question is ReduceMax(x) == -inf, with one full-size pass instead of five.
    (A row holding NaN: the reduction yields NaN, NaN == -inf is false, as before.)"""
    if not node.outputs[0].uses:
        return False
    chain = []  # from the outer Not (``node``) down to the Equal
    v = node.inputs[0]
    for op in ("Cast", "ReduceMax", "Cast", "Not", "Equal"):
        producer = v.producer if v is not None else None
        if producer is None or producer.op != op or len(v.uses) != 1:
            return False
        chain.append(producer)
        v = producer.inputs[0]
    cast_bool, reduce, cast_int, inner_not, equal = chain
    x, neg_inf = equal.inputs
    if not _is_const(neg_inf, NEG_INF) or x is None or x.type is None or not x.type.dtype.is_float:
        return False
    if cast_bool.attrs.get("to") != 9 or reduce.attrs.get("keepdims", 1) != 1 or len(reduce.inputs) < 2:
        return False
    if reduce.attrs.get("noop_with_empty_axes", 0) or reduce.inputs[1] is None or reduce.inputs[1].data is None:
        return False
    out = node.outputs[0]
    row_max = graph.add_node("ReduceMax", [x, reduce.inputs[1]], [TensorType(x.type.dtype, out.type.shape)],
                             {"keepdims": 1}, reduce.loc, output_names=[out.name + "_rowmax"], before=node)
    empty = graph.add_node("Equal", [row_max.outputs[0], neg_inf], [out.type], {}, equal.loc,
                           output_names=[out.name + "_allmasked"], before=node)
    return _forward(graph, node, empty.outputs[0])


BROADCASTING = ("Where", "Add", "Sub", "Mul", "Div", "Max", "Min")


def shrink_splat_operand(graph: Graph, node: Node) -> bool:
    """A constant operand of a broadcasting op whose elements are all one value becomes that scalar
    when the other operands already give the output its shape (torch's ``full_like`` zeros beside a
    softmax: a 1x6x197x197 tensor read on every call, for one number)."""
    out = node.outputs[0].type
    if out is None or not out.is_static:
        return False
    for i, v in enumerate(node.inputs):
        if v is None or v.data is None or v.data.size <= 1 or v.data.dtype.kind not in "biuf":
            continue
        flat = v.data.reshape(-1)
        if not np.all(flat == flat[0]) or np.isnan(flat[0]):
            continue
        others = [u for j, u in enumerate(node.inputs) if j != i]
        if any(u is None or u.type is None or not u.type.is_static for u in others):
            continue
        try:
            shape = np.broadcast_shapes(*(tuple(u.type.shape) for u in others))
        except ValueError:
            continue
        if tuple(shape) != tuple(out.shape):
            continue
        scalar = graph.add_weight(graph.fresh_name(v.name + "_scalar"), np.array(flat[0], dtype=v.data.dtype))
        node.set_input(i, scalar)
        return True
    return False


RULES = [
    Rule("fold-constants", fold_constants),
    Rule("fold-static-shape", fold_static_shape, ("Shape", "Size")),
    Rule("remove-identity", remove_identity, ("Identity",)),
    Rule("remove-noop-reshape", remove_noop_reshape, ("Reshape", "Transpose", "Cast", "Expand", "Squeeze",
                                                       "Unsqueeze", "Flatten")),
    Rule("remove-neutral-arithmetic", remove_neutral_arithmetic, ("Add", "Sub", "Mul", "Div")),
    Rule("merge-reshapes", merge_reshapes, ("Reshape",)),
    Rule("merge-transposes", merge_transposes, ("Transpose",)),
    Rule("matmul-of-transposed-weight", matmul_of_transposed_weight, ("MatMul",)),
    Rule("sink-scalar-multiply", sink_scalar_multiply, LAYOUT_OPS),
    Rule("hoist-scalar-multiply", hoist_scalar_multiply, ("Mul",)),
    Rule("batched-matmul-without-views", batched_matmul_without_views, ("Reshape",)),
    Rule("simplify-masked-row-test", simplify_masked_row_test, ("Not",)),
    Rule("shrink-splat-operand", shrink_splat_operand, BROADCASTING),
    Rule("attention-over-cache", attention_over_cache, ("Add",)),
]


# --- whole-graph sweeps ----------------------------------------------------------------------------

def _attr_key(value) -> object:
    if isinstance(value, np.ndarray):
        return ("tensor", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, list):
        return tuple(_attr_key(v) for v in value)
    return value


def eliminate_common_subexpressions(graph: Graph) -> bool:
    seen: dict[tuple, Node] = {}
    modified = False
    for node in graph.nodes:
        if node.op in NONDETERMINISTIC or node.subgraphs:
            continue
        key = (node.op, tuple(id(v) for v in node.inputs), len(node.outputs),
               tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items())))
        first = seen.get(key)
        if first is None:
            seen[key] = node
            continue
        if any(o.is_output for o in node.outputs):  # a graph output keeps its name
            continue
        for mine, theirs in zip(node.outputs, first.outputs):
            mine.replace_all_uses_with(theirs)
        modified = True
    return modified


def eliminate_dead_code(graph: Graph) -> bool:
    modified = False
    for node in reversed(list(graph.nodes)):
        if any(o.is_used for o in node.outputs):
            continue
        graph.remove(node)
        modified = True
    for name, weight in list(graph.weights.items()):
        if not weight.is_used:
            graph.remove_weight(name)
            modified = True
    return modified


@register_pass("canonicalize", needs=(), provides=())
def canonicalize(graph: Graph, options=None) -> PassResult:
    modified = False
    for _ in range(10):
        changed = rewrite(graph, RULES)
        changed |= eliminate_common_subexpressions(graph)
        changed |= eliminate_dead_code(graph)
        if not changed:
            break
        modified = True
    return PassResult(graph, modified)
