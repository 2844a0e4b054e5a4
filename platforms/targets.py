"""Code-generation targets of this machine's devices: the LLVM target of its CPU (for TVM).

The emitter builds for ``host_target()``; the runner refuses, in one line, a library
built for a CPU whose features this one lacks.
"""
from __future__ import annotations

from hetflow.ir.errors import HetflowError

BACKEND = "tvm-llvm"
INSTALL = "pip install apache-tvm==0.27.*"


class TargetError(HetflowError):
    pass


def import_tvm(what: str):
    """``tvm``, or a one-line BackendError: ``what`` (which needs TVM), and what to install."""
    try:
        import tvm
        from tvm import relax  # noqa: F401  (the VM and the ONNX frontend live here)
    except ImportError as exc:
        raise TargetError(f"{what}, but this Python cannot import tvm ({exc}): {INSTALL}") from None
    return tvm


def host_target() -> dict:
    """LLVM for this machine's CPU (``mcpu`` from LLVM's host detection when LLVM knows it)."""
    tvm = import_tvm("the TVM CPU backend needs TVM")
    from tvm.target import codegen
    target = {"kind": "llvm"}
    try:
        cpu = codegen.llvm_get_system_cpu()
        if cpu and cpu != "generic" and codegen.llvm_is_valid_cpu(cpu, codegen.llvm_get_system_triple()):
            target["mcpu"] = cpu
    except Exception:  # noqa: BLE001 - an LLVM without host detection: plain llvm is still correct
        pass
    tvm.target.Target(target)  # fails here, not mid-compile, if this TVM rejects it
    return target


def check_target(target: dict | None, name: str) -> None:
    """Refuse, in one line, a library built for a CPU with features this one lacks (it would crash, not fail)."""
    if not target or "mcpu" not in target:
        return
    tvm = import_tvm(f"{name} was compiled by TVM (backend {BACKEND}) and needs it to run")
    from tvm.target import codegen
    here = host_target()
    if here.get("mcpu") == target["mcpu"]:
        return
    missing = codegen.llvm_get_cpu_features(tvm.target.Target(target)) - \
        codegen.llvm_get_cpu_features(tvm.target.Target(here))
    if missing:
        raise TargetError(f"{name} was compiled by TVM for CPU {target['mcpu']}, whose features this CPU "
                           f"({here.get('mcpu', 'generic')}) lacks ({', '.join(sorted(missing)[:6])}): "
                           "compile it again on this machine")
