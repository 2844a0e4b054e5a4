"""hetflow.passes: small named passes over the IR, their contracts (the meta keys they need and provide), and
the runner that checks those and verifies between them."""
from .base import (
    META_KEYS,
    PASSES,
    RESULT_KEYS,
    CompileOptions,
    Contract,
    NodeError,
    PassError,
    PassResult,
    PassRunner,
    check_contract,
    get_pass,
    parse_pipeline,
    register_pass,
    require_meta,
    verify_stage,
)

__all__ = ["CompileOptions", "Contract", "META_KEYS", "PASSES", "NodeError", "PassError", "PassResult", "PassRunner",
           "RESULT_KEYS", "check_contract", "get_pass", "parse_pipeline", "register_pass", "require_meta",
           "verify_stage"]
