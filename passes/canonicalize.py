"""canonicalize: constant folding, shape folding, identity removal, reshape/transpose merging,
MatMul of a transposed weight as Gemm, CSE, DCE.

Local rules go through the rewrite engine; common subexpression elimination and
dead code elimination are whole-graph sweeps. A graph output keeps its name: a
rule never replaces a value that is a graph output (the model's signature).
"""
from __future__ import annotations

import numpy as np

from hetflow.ir import Graph, Node, Value, make_kernel
from hetflow.ir.errors import HetflowError

from .base import PassResult, register_pass
from .rewrite import Rule, rewrite

FOLD_LIMIT = 1 << 24  # elements: larger results stay computed at run time
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
                    "Multinomial", "Dropout"}


def _forward(graph: Graph, node: Node, replacement: Value, index: int = 0) -> bool:
    """Replace node output ``index`` by ``replacement`` unless it is a graph output."""
    out = node.outputs[index]
    if out in graph.outputs or not out.uses:
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
    if any(o in graph.outputs for o in node.outputs):
        return False
    if any(o.type is not None and (o.type.numel() or FOLD_LIMIT + 1) > FOLD_LIMIT for o in node.outputs):
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
    """MatMul(a, Transpose(w)) on matrices with a constant w -> Gemm(a, w, transB=1): no transposed copy.

    The transpose of a large weight (a tied LM head: 50257 x 768) is too big to fold,
    and computing it on every call would stream the whole weight twice.
    """
    a, b = node.inputs
    t = b.producer if b is not None else None
    if t is None or t.op != "Transpose" or t.inputs[0] is None or t.inputs[0].data is None:
        return False
    w = t.inputs[0]
    if a is None or a.type is None or a.type.shape is None or len(a.type.shape) != 2:
        return False
    if w.data.ndim != 2 or list(t.attrs.get("perm", [1, 0])) != [1, 0]:
        return False
    node.op = "Gemm"
    node.attrs = {"transB": 1}
    node.set_input(1, w)
    return True


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
        if any(o in graph.outputs for o in node.outputs):
            continue
        for mine, theirs in zip(node.outputs, first.outputs):
            mine.replace_all_uses_with(theirs)
        modified = True
    return modified


def eliminate_dead_code(graph: Graph) -> bool:
    modified = False
    for node in reversed(list(graph.nodes)):
        if any(o.uses or o in graph.outputs for o in node.outputs):
            continue
        graph.remove(node)
        modified = True
    for name, weight in list(graph.weights.items()):
        if not weight.uses and weight not in graph.outputs:
            graph.remove_weight(name)
            modified = True
    return modified


@register_pass("canonicalize")
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
