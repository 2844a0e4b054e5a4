"""hetflow.passes: small named passes over the IR, and the runner that verifies between them."""
from .base import PASSES, CompileOptions, NodeError, PassError, PassResult, PassRunner, get_pass, parse_pipeline, register_pass

__all__ = ["CompileOptions", "PASSES", "NodeError", "PassError", "PassResult", "PassRunner", "get_pass", "parse_pipeline",
           "register_pass"]
