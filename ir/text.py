"""The textual IR: a printer and a parser that round-trip.

    graph mlp(%x: f32[8,64]) -> (%y: f32[8,10]) opset 18 {
      weight %w1: f32[64,128] = resource
      weight %b1: f32[2] = dense<f32[2]: [0.5, -1.0]>
      %0: f32[8,128] = MatMul(%x, %w1) loc("fc1")
      %1: f32[8,128] = Gemm(%0, %w2, none) {transB = 1, alpha = 1.0} #{device = "cpu"} loc("fc2")
      return %y
    }

Attributes: ints, floats (always with a '.', an exponent, inf or nan), JSON
strings, lists, tensors (``dense<type: [values]>`` or ``dense<type: 0xHEX>``) and
nested graphs. ``#{...}`` is the node's ``meta`` (annotations from passes), whose
values may also be true/false/null and nested ``{...}`` dicts. Weights larger than
``INLINE_LIMIT`` elements print as ``= resource``: their data travels beside the
text (``parse(text, resources={name: array})``), as MLIR's dense resources do.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from .errors import HetflowError
from .graph import Graph, Node, Value
from .types import DType, ShapeError, TensorType

INLINE_LIMIT = 16
_VALUE_NAME_RE = re.compile(r"^[A-Za-z0-9_.]+$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class ParseError(HetflowError):
    def __init__(self, message: str, text: str, pos: int):
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        line_text = text.splitlines()[line - 1] if text.splitlines() else ""
        super().__init__(f"line {line}, column {col}: {message}\n  {line_text}\n  {' ' * (col - 1)}^")


# --- printing -------------------------------------------------------------------------------------

def print_graph(graph: Graph, indent: str = "") -> str:
    lines = [f"{indent}graph {_ident(graph.name)}({', '.join(_decl(v) for v in graph.inputs)})"
             f" -> ({', '.join(_decl(v) for v in graph.outputs)}) opset {graph.opset}{_dims_text(graph)} {{"]
    inner = indent + "  "
    for w in graph.weights.values():
        lines.append(f"{inner}weight {_decl(w)} = {_weight_body(w)}")
    for node in graph.nodes:
        lines.append(inner + _node_text(node, inner))
    lines.append(f"{inner}return {', '.join(_ref(v) for v in graph.outputs)}")
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def _dims_text(graph: Graph) -> str:
    if not graph.dims:
        return ""
    return " dims(" + ", ".join(f"{_ident(k)}={lo}..{hi}" for k, (lo, hi) in graph.dims.items()) + ")"


def _ident(name: str) -> str:
    return name if _NAME_RE.match(name) else json.dumps(name)


def _ref(v: Value | None) -> str:
    if v is None:
        return "none"
    return "%" + (v.name if _VALUE_NAME_RE.match(v.name) else json.dumps(v.name))


def _decl(v: Value) -> str:
    return f"{_ref(v)}: {_type_text(v.type)}"


def _type_text(t: TensorType | None) -> str:
    return "?" if t is None else str(t)


def _weight_body(w: Value) -> str:
    if w.data.size <= INLINE_LIMIT:
        return _dense(w.data)
    return "resource"


def _node_text(node: Node, indent: str) -> str:
    outs = ", ".join(_decl(o) for o in node.outputs)
    ins = ", ".join(_ref(v) for v in node.inputs)
    text = f"{outs} = {node.op}({ins})"
    if node.attrs:
        text += " {" + ", ".join(f"{_ident(k)} = {_attr(v, indent)}" for k, v in node.attrs.items()) + "}"
    if node.meta:
        text += " #{" + ", ".join(f"{_ident(k)} = {_meta(v)}" for k, v in node.meta.items()) + "}"
    if node.loc:
        text += f" loc({json.dumps(node.loc)})"
    return text


def _float(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return repr(float(x))


def _attr(v: Any, indent: str) -> str:
    if isinstance(v, bool):
        raise TypeError("attributes hold no bools; use ints")
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return _float(float(v))
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, np.ndarray):
        return _dense(v)
    if isinstance(v, Graph):
        return print_graph(v, indent).lstrip()
    if isinstance(v, list):
        return "[" + ", ".join(_attr(x, indent) for x in v) + "]"
    raise TypeError(f"cannot print attribute value {v!r}")


def _meta(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_ident(str(k))} = {_meta(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_meta(x) for x in v) + "]"
    return _attr(v, "")


_LIST_KINDS = {"f": (np.float16, np.float32, np.float64), "i": None, "u": None, "b": None}


def _dense(a: np.ndarray) -> str:
    t = TensorType.of(a)
    flat = a.reshape(-1)
    if a.dtype.kind in ("U", "O", "S"):
        return f"dense<{t}: [{', '.join(json.dumps(str(x)) for x in flat)}]>"
    if a.dtype.kind in "iub" and a.dtype in (np.dtype(d) for d in ("int8", "int16", "int32", "int64", "uint8",
                                                                      "uint16", "uint32", "uint64", "bool")):
        if a.size <= INLINE_LIMIT:
            return f"dense<{t}: [{', '.join(str(int(x)) for x in flat)}]>"
    if a.dtype in (np.float16, np.float32, np.float64) and a.size <= INLINE_LIMIT:
        return f"dense<{t}: [{', '.join(_float(float(x)) for x in flat)}]>"
    return f"dense<{t}: 0x{np.ascontiguousarray(a).tobytes().hex()}>"


# --- parsing --------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<range>\d+\.\.\d+)
  | (?P<hex>0x[0-9a-fA-F]*)
  | (?P<num>-?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|inf\b|nan\b))
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<arrow>->)
  | (?P<hash>\#\{)
  | (?P<vref>%(?:[A-Za-z0-9_.]+|"(?:[^"\\]|\\.)*"))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[%(){}\[\]<>,:=*?])
""", re.VERBOSE)


class _Parser:
    def __init__(self, text: str, resources: dict[str, np.ndarray] | None):
        self.text = text
        self.resources = resources or {}
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN_RE.match(text, pos)
            if m is None:
                raise ParseError(f"unexpected character {text[pos]!r}", text, pos)
            if m.lastgroup != "ws":
                self.tokens.append((m.lastgroup, m.group(), pos))
            pos = m.end()
        self.tokens.append(("eof", "", len(text)))
        self.i = 0

    # token helpers
    def peek(self, ahead: int = 0) -> tuple[str, str, int]:
        return self.tokens[self.i + ahead]

    def next(self) -> tuple[str, str, int]:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def error(self, message: str) -> ParseError:
        return ParseError(message, self.text, self.peek()[2])

    def expect(self, value: str) -> None:
        kind, text, _ = self.peek()
        if text != value:
            raise self.error(f"expected {value!r}, found {text or 'end of text'!r}")
        self.i += 1

    def accept(self, value: str) -> bool:
        if self.peek()[1] == value:
            self.i += 1
            return True
        return False

    def name(self) -> str:
        kind, text, _ = self.next()
        if kind == "str":
            return json.loads(text)
        if kind in ("ident", "num"):
            return text
        self.i -= 1
        raise self.error(f"expected a name, found {text!r}")

    def value_ref(self) -> str:
        kind, text, _ = self.next()
        if kind != "vref":
            self.i -= 1
            raise self.error(f"expected a %value, found {text!r}")
        return json.loads(text[1:]) if text[1] == '"' else text[1:]

    def _dim_expression(self, expression, pos) -> str:
        from .symbolic import SymbolicError, symbols
        try:
            symbols(expression)
        except SymbolicError as exc:
            raise ParseError(str(exc), self.text, pos) from None
        return expression

    # grammar
    def graph(self) -> Graph:
        self.expect("graph")
        graph = Graph(self.name())
        env: dict[str, Value] = {}
        self.expect("(")
        while not self.accept(")"):
            name = self.value_ref()
            self.expect(":")
            env[name] = graph.add_input(name, self.type())
            self.accept(",")
        self.expect("->")
        self.expect("(")
        declared_outputs = []
        while not self.accept(")"):
            declared_outputs.append((self.value_ref(), self._colon_type()))
            self.accept(",")
        self.expect("opset")
        graph.opset = int(self.next()[1])
        if self.accept("dims"):  # dims(batch=1..4, seq=2..128)
            self.expect("(")
            while not self.accept(")"):
                size, low = self.name(), None
                self.expect("=")
                kind, text, pos = self.next()
                low, _, high = text.partition("..")
                if kind != "range" or not low.isdigit() or not high.isdigit():
                    raise ParseError(f"bad range {text!r} for size {size!r} (write {size}=MIN..MAX)", self.text, pos)
                graph.dims[size] = (int(low), int(high))
                self.accept(",")
        self.expect("{")
        while self.peek()[1] == "weight":
            self.next()
            name = self.value_ref()
            self.expect(":")
            t = self.type()
            self.expect("=")
            env[name] = graph.add_weight(name, self._weight_data(name, t), t)
        while self.peek()[1] != "return":
            self._node(graph, env)
        self.expect("return")
        outputs = []
        while self.peek()[0] == "vref":
            ref_pos = self.peek()[2]
            name = self.value_ref()
            if name not in env:
                raise ParseError(f"return of undefined value %{name}", self.text, ref_pos)
            outputs.append(env[name])
            self.accept(",")
        self.expect("}")
        graph.outputs = outputs
        if [n for n, _ in declared_outputs] != [v.name for v in outputs]:
            raise self.error(f"graph {graph.name!r}: signature outputs differ from the return statement")
        return graph

    def _colon_type(self) -> TensorType | None:
        self.expect(":")
        return self.type()

    def _weight_data(self, name: str, t: TensorType | None) -> np.ndarray:
        if self.accept("resource"):
            if name not in self.resources:
                raise self.error(f"weight %{name} is a resource and no data was given for it")
            return np.asarray(self.resources[name])
        return self.dense()

    def _node(self, graph: Graph, env: dict[str, Value]) -> None:
        outs = []
        while True:
            outs.append((self.value_ref(), self._colon_type()))
            if not self.accept(","):
                break
        self.expect("=")
        op = self.name()
        self.expect("(")
        inputs: list[Value | None] = []
        while not self.accept(")"):
            if self.accept("none"):
                inputs.append(None)
            else:
                ref_pos = self.peek()[2]
                name = self.value_ref()
                if name not in env:
                    raise ParseError(f"use of undefined value %{name}", self.text, ref_pos)
                inputs.append(env[name])
            self.accept(",")
        attrs, meta, loc = {}, {}, ""
        if self.accept("{"):
            attrs = self._dict(self.attr_value)
        if self.accept("#{"):
            meta = self._dict(self.meta_value)
        if self.accept("loc"):
            self.expect("(")
            loc = json.loads(self.next()[1])
            self.expect(")")
        values = []
        for name, t in outs:
            graph._claim(name)
            values.append(Value(name, t))
            env[name] = values[-1]
        graph.insert(Node(op, inputs, values, attrs, loc, meta), claim=False)

    def _dict(self, parse_value) -> dict:
        result = {}
        while not self.accept("}"):
            key = self.name()
            self.expect("=")
            result[key] = parse_value()
            self.accept(",")
        return result

    def type(self) -> TensorType | None:
        if self.accept("?"):
            return None
        kind, text, pos = self.next()
        try:
            dtype = DType(text)
        except ValueError:
            raise ParseError(f"unknown dtype {text!r}", self.text, pos) from None
        self.expect("[")
        if self.accept("*"):
            self.expect("]")
            return TensorType(dtype, None)
        dims: list[int | str | None] = []
        while not self.accept("]"):
            kind, text, pos = self.next()
            if text == "?":
                dims.append(None)
            elif kind == "num":
                dims.append(int(text))
            elif kind == "ident":
                dims.append(text)
            elif kind == "str":  # an expression over sizes: "batch*seq"
                dims.append(self._dim_expression(json.loads(text), pos))
            else:
                raise ParseError(f"bad dimension {text!r}", self.text, pos)
            self.accept(",")
        try:
            return TensorType(dtype, tuple(dims))
        except ShapeError as exc:
            raise ParseError(str(exc), self.text, pos) from None

    def number(self) -> int | float:
        kind, text, pos = self.next()
        if kind != "num":
            raise ParseError(f"expected a number, found {text!r}", self.text, pos)
        if any(c in text for c in ".eEna"):
            return float(text)
        return int(text)

    def attr_value(self) -> Any:
        kind, text, pos = self.peek()
        if kind == "num":
            return self.number()
        if kind == "str":
            self.next()
            return json.loads(text)
        if text == "[":
            self.next()
            items = []
            while not self.accept("]"):
                items.append(self.attr_value())
                self.accept(",")
            return items
        if text == "dense":
            return self.dense()
        if text == "graph":
            return self.graph()
        raise self.error(f"expected an attribute value, found {text!r}")

    def meta_value(self) -> Any:
        kind, text, pos = self.peek()
        if text in ("true", "false", "null"):
            self.next()
            return {"true": True, "false": False, "null": None}[text]
        if text == "{":
            self.next()
            return self._dict(self.meta_value)
        if text == "[":
            self.next()
            items = []
            while not self.accept("]"):
                items.append(self.meta_value())
                self.accept(",")
            return items
        return self.attr_value()

    def dense(self) -> np.ndarray:
        self.expect("dense")
        self.expect("<")
        t = self.type()
        self.expect(":")
        if t is None or not t.is_static:
            raise self.error("a dense tensor needs a static type")
        kind, text, pos = self.peek()
        if kind == "hex":
            self.next()
            data = np.frombuffer(bytes.fromhex(text[2:]), dtype=t.dtype.numpy).reshape(t.shape).copy()
        else:
            self.expect("[")
            items = []
            while not self.accept("]"):
                k, tok, _ = self.next()
                items.append(json.loads(tok) if k == "str" else float(tok) if any(c in tok for c in ".eEna") else int(tok))
                self.accept(",")
            np_dtype = object if t.dtype is DType.str else t.dtype.numpy
            data = np.array(items, dtype=np_dtype).reshape(t.shape)
        self.expect(">")
        return data


def parse_graph(text: str, resources: dict[str, np.ndarray] | None = None) -> Graph:
    """Parse the textual IR back into a Graph (weights printed as resources come from ``resources``)."""
    parser = _Parser(text, resources)
    graph = parser.graph()
    if parser.peek()[0] != "eof":
        raise parser.error("text after the end of the graph")
    return graph
