"""Symbolic dims: a dim that is a ``str`` is an expression over named sizes.

A graph compiled with dynamic shapes declares its sizes and their ranges
(``Graph.dims``, e.g. ``{"batch": (1, 4), "seq": (2, 128)}``); a dim of a value's
type is then an int, a size's name (``"seq"``) or an expression over the names
(``"batch*seq"``, ``"seq//2"``, ``"max(1, seq - 1)"``): integers, names, ``+ - *
// %``, parentheses, ``max`` and ``min``. Nothing else parses: an expression is
data from a file and is never handed to ``eval``.

Three things are done with an expression:

- ``evaluate``: its value for concrete sizes (the runtime, once per call);
- ``upper_bound``: the most it can be over the declared ranges, by interval
  arithmetic (the memory plan and the cost model size a value at this bound);
- ``bind``: the sizes a call's inputs give, checked against the ranges, with an
  error naming the input, the dim and the range.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import math
import re

from .errors import HetflowError

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_EXPRESSION = 256  # characters: an expression is a short formula, never a program


class SymbolicError(HetflowError, ValueError):
    """An expression that does not parse, names an undeclared size, or sizes outside their ranges."""


class DimOutOfRange(SymbolicError):
    """A call's input has a size outside the range the model was compiled for."""


DimRanges = dict  # name -> (min, max), both ints


@functools.lru_cache(maxsize=4096)
def _parse(expression: str) -> ast.AST:
    if not isinstance(expression, str) or not expression or len(expression) > MAX_EXPRESSION:
        raise SymbolicError(f"dim expression {str(expression)[:60]!r} is empty or longer than {MAX_EXPRESSION} "
                            "characters")
    try:
        tree = ast.parse(expression, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise SymbolicError(f"dim expression {expression!r} does not parse") from None
    _check_tree(tree, expression)
    return tree


_BINARY = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod)


def _check_tree(tree: ast.AST, expression: str, depth: int = 0) -> None:
    if depth > 32:
        raise SymbolicError(f"dim expression {expression!r} nests too deeply")
    if isinstance(tree, ast.Constant) and type(tree.value) is int:
        return
    if isinstance(tree, ast.Name):
        return
    if isinstance(tree, ast.BinOp) and isinstance(tree.op, _BINARY):
        _check_tree(tree.left, expression, depth + 1)
        _check_tree(tree.right, expression, depth + 1)
        return
    if isinstance(tree, ast.UnaryOp) and isinstance(tree.op, ast.USub):
        _check_tree(tree.operand, expression, depth + 1)
        return
    if (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id in ("max", "min")
            and len(tree.args) >= 2 and not tree.keywords):
        for arg in tree.args:
            _check_tree(arg, expression, depth + 1)
        return
    raise SymbolicError(f"dim expression {expression!r}: only integers, size names, + - * // %, max and min "
                        "are allowed")


def symbols(expression: str) -> set[str]:
    """The size names an expression reads."""
    tree = _parse(expression)
    functions = {id(c.func) for c in ast.walk(tree) if isinstance(c, ast.Call)}
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in functions}


def check_expression(expression: str, ranges: DimRanges, where: str = "") -> None:
    """Parses, and names only declared sizes."""
    undeclared = sorted(symbols(expression) - set(ranges))
    if undeclared:
        raise SymbolicError(f"{where + ': ' if where else ''}dim {expression!r} names size {undeclared[0]!r}, "
                            f"which the graph does not declare (declared: {', '.join(ranges) or 'none'})")


def evaluate(expression: str, sizes: dict[str, int]) -> int:
    """The expression's value for concrete sizes."""
    def walk(node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in sizes:
                raise SymbolicError(f"dim {expression!r} needs size {node.id!r}, which no input gives")
            return sizes[node.id]
        if isinstance(node, ast.UnaryOp):
            return -walk(node.operand)
        if isinstance(node, ast.Call):
            values = [walk(a) for a in node.args]
            return max(values) if node.func.id == "max" else min(values)
        a, b = walk(node.left), walk(node.right)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if b == 0:
            raise SymbolicError(f"dim {expression!r} divides by zero for sizes {sizes}")
        return a // b if isinstance(node.op, ast.FloorDiv) else a % b
    return walk(_parse(expression))


def _times(a: float, b: float) -> float:
    """a * b with 0 * inf = 0: a factor that is exactly zero keeps an unbounded one at zero (IEEE gives NaN)."""
    return 0 if a == 0 or b == 0 else a * b


def _floor_divide(a: float, b: float) -> float:
    """a // b for b > 0 with unbounded ends (IEEE gives NaN for inf // b): an unbounded a stays unbounded,
    a finite a over an unbounded b tends to 0 (a >= 0) or -1."""
    if math.isinf(a):
        return a
    if math.isinf(b):
        return 0 if a >= 0 else -1
    return a // b


def upper_bound(expression: str, ranges: DimRanges) -> int | None:
    """The largest value the expression takes with every size in its range (interval arithmetic: sound,
    exact for the sums and products of sizes that shapes are made of). None when it is unbounded."""
    def walk(node) -> tuple[float, float]:
        if isinstance(node, ast.Constant):
            return node.value, node.value
        if isinstance(node, ast.Name):
            if node.id not in ranges:
                raise SymbolicError(f"dim {expression!r} names size {node.id!r}, which the graph does not declare")
            low, high = ranges[node.id]
            return low, high
        if isinstance(node, ast.UnaryOp):
            low, high = walk(node.operand)
            return -high, -low
        if isinstance(node, ast.Call):
            bounds = [walk(a) for a in node.args]
            pick = max if node.func.id == "max" else min
            return pick(b[0] for b in bounds), pick(b[1] for b in bounds)
        (a0, a1), (b0, b1) = walk(node.left), walk(node.right)
        if isinstance(node.op, ast.Add):
            return a0 + b0, a1 + b1
        if isinstance(node.op, ast.Sub):
            return a0 - b1, a1 - b0
        if isinstance(node.op, ast.Mult):
            products = [_times(a0, b0), _times(a0, b1), _times(a1, b0), _times(a1, b1)]
            return min(products), max(products)
        if isinstance(node.op, ast.Mod):  # 0 <= a % b < b for a positive divisor
            if b0 <= 0:
                return -math.inf, math.inf
            return 0, max(b1 - 1, 0)
        if b0 <= 0:  # floor division by a range holding zero or negatives: unbounded
            return -math.inf, math.inf
        # a positive divisor: the largest quotient is the top of a over the smallest divisor (or, all of a
        # negative, over the largest), the smallest mirrors it
        high = _floor_divide(a1, b0) if a1 >= 0 else _floor_divide(a1, b1)
        low = _floor_divide(a0, b1) if a0 >= 0 else _floor_divide(a0, b0)
        return low, high
    high = walk(_parse(expression))[1]
    return None if high == math.inf else int(high)


def dim_upper_bound(dim, ranges: DimRanges) -> int | None:
    if isinstance(dim, int):
        return dim
    if isinstance(dim, str) and ranges:
        return upper_bound(dim, ranges)
    return None


def shape_upper_bound(shape, ranges: DimRanges) -> tuple[int, ...] | None:
    """Each dim at its largest; None when a dim is unknown or unbounded."""
    if shape is None:
        return None
    bounds = tuple(dim_upper_bound(d, ranges) for d in shape)
    return None if any(b is None for b in bounds) else tuple(max(b, 0) for b in bounds)


def max_nbytes(t, ranges: DimRanges) -> int | None:
    """The most bytes a value of type ``t`` can take: its size when static, its size at the declared
    maximum when every dim is an expression over declared sizes, else None (allocated at run time)."""
    if t is None:
        return None
    if t.is_static:
        return t.nbytes()
    shape = shape_upper_bound(t.shape, ranges)
    if shape is None:
        return None
    from .types import TensorType
    return TensorType(t.dtype, shape).nbytes()


def concrete_shape(shape, sizes: dict[str, int]) -> tuple[int, ...] | None:
    """The shape for concrete sizes; None when a dim is unknown."""
    if shape is None or any(d is None for d in shape):
        return None
    return tuple(d if isinstance(d, int) else evaluate(d, sizes) for d in shape)


def bind(inputs, arrays: dict, ranges: DimRanges) -> dict[str, int]:
    """The sizes a call's inputs give (``inputs``: the graph's input Values), each checked against its
    declared range, a name bound twice checked for agreement. Raises ``DimOutOfRange`` in one line naming
    the input, the dim and the range."""
    sizes: dict[str, int] = {}
    where: dict[str, str] = {}
    for value in inputs:
        array = arrays.get(value.name)
        if array is None or value.type is None or value.type.shape is None:
            continue
        shape = getattr(array, "shape", ())
        for axis, (dim, actual) in enumerate(zip(value.type.shape, shape)):
            if isinstance(dim, str) and NAME_RE.match(dim):
                low, high = ranges.get(dim, (0, None))
                if actual < low or (high is not None and actual > high):
                    raise DimOutOfRange(f"input %{value.name} dim {axis} ({dim}) is {actual}, outside the range "
                                        f"{low}..{high} this model was compiled for")
                if dim in sizes and sizes[dim] != actual:
                    raise DimOutOfRange(f"input %{value.name} dim {axis} ({dim}) is {actual}, but {where[dim]} "
                                        f"gave {dim} = {sizes[dim]}")
                sizes[dim] = int(actual)
                where[dim] = f"input %{value.name} dim {axis}"
    for value in inputs:  # dims that are expressions (e.g. a padded length) agree with the names
        array = arrays.get(value.name)
        if array is None or value.type is None or value.type.shape is None:
            continue
        for axis, (dim, actual) in enumerate(zip(value.type.shape, getattr(array, "shape", ()))):
            if isinstance(dim, str) and not NAME_RE.match(dim) and symbols(dim) <= set(sizes):
                expected = evaluate(dim, sizes)
                if expected != actual:
                    raise DimOutOfRange(f"input %{value.name} dim {axis} is {actual}, but {dim} = {expected} "
                                        f"for {', '.join(f'{k}={v}' for k, v in sizes.items())}")
    return sizes


def describe_ranges(ranges: DimRanges) -> str:
    return ", ".join(f"{name} in {low}..{high}" for name, (low, high) in ranges.items())


def _all_values(graph):
    yield from graph.values()
    for node in graph.nodes:
        for sub in node.subgraphs:
            yield from _all_values(sub)


@contextlib.contextmanager
def sized_at_max(graph):
    """Inside: every value of a symbolic shape over the graph's declared sizes has its type at the declared
    maximum (static), for the passes that size things (cost, placement, schedule, memory plan); the
    symbolic types come back on exit. Passes that rewrite the graph's shapes never run inside."""
    if not graph.dims:
        yield graph
        return
    from .types import TensorType
    saved = []
    for value in _all_values(graph):
        t = value.type
        if t is None or t.shape is None or t.is_static:
            continue
        shape = shape_upper_bound(t.shape, graph.dims)
        if shape is not None:
            saved.append((value, t))
            value.type = TensorType(t.dtype, shape)
    try:
        yield graph
    finally:
        for value, t in saved:
            value.type = t


def is_expression(text) -> bool:
    """A dim text hetflow can read (a name or an expression over names)."""
    try:
        _parse(text)
    except SymbolicError:
        return False
    return True


def forget_undeclared(graph, keep=()) -> int:
    """Dims over a size the graph does not declare (a data-dependent size, an ONNX exporter's ``unk__3``)
    become unknown: the runtime allocates such values for each call, outside the memory plan. ``keep``:
    size names to keep although undeclared. Returns how many values changed."""
    from .types import TensorType
    declared = set(graph.dims) | set(keep)  # (keep: names of sizes known but without a range)
    changed = 0
    for value in _all_values(graph):
        t = value.type
        if t is None or t.shape is None or t.is_static:
            continue
        shape = tuple(None if isinstance(d, str) and not (is_expression(d) and symbols(d) <= declared) else d
                      for d in t.shape)
        if shape != t.shape:
            value.type = TensorType(t.dtype, shape)
            changed += 1
    return changed
