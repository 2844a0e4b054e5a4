"""hetflow.ir: the one dataflow IR every stage consumes and produces."""
from .errors import HetflowError
from .graph import Graph, IRError, Node, Value, graph_difference
from .ops import (OPS, FusionKind, InferenceError, OpDef, UnsupportedOpError, get_op, infer_types,
                  make_kernel, node_bytes, node_flops, register_op)
from .serialize import SerializationError, graph_from_json, graph_to_json, load, save
from .text import ParseError, parse_graph, print_graph
from .types import DType, ShapeError, TensorType
from .verify import VerifyError, verify

__all__ = [
    "DType", "HetflowError", "FusionKind", "Graph", "IRError", "InferenceError", "Node", "OPS", "OpDef", "ParseError",
    "SerializationError", "ShapeError", "TensorType", "UnsupportedOpError", "Value", "VerifyError", "get_op",
    "graph_difference", "graph_from_json", "graph_to_json", "infer_types", "load", "make_kernel",
    "node_bytes", "node_flops", "parse_graph", "print_graph", "register_op", "save", "verify",
]
