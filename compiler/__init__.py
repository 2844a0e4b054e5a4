"""hetflow: a dataflow graph compiler for heterogeneous accelerators.

    compiled = hetflow.compile(module, example_inputs, platform="host")
    compiled(*example_inputs)          # same signature and outputs as the module
    print(compiled.report())

Also ``torch.compile(m, backend="hetflow")``, the ``hetflow`` CLI, and
``hetflow.runtime.load(artifact_dir)`` (no torch needed).

This package is the driver, on top of the layers ``hetflow.ir``, ``hetflow.platform``,
``hetflow.passes``, ``hetflow.backends`` and ``hetflow.runtime`` (docs/ARCHITECTURE.md).
Importing a layer (``import hetflow.ir``) runs this file first, so it imports no
driver module: ``compile`` and friends load on first use, and the measurements and
backend capabilities the platform layer needs are registered as functions that
import the driver only when called.
"""
from hetflow.support.version import VERSION as __version__

__all__ = ["CompiledModel", "__version__", "backend", "compile", "sweep"]


def __getattr__(name: str):
    if name in ("CompiledModel", "backend", "compile"):
        from . import api
        return getattr(api, name)
    if name == "sweep":   # the module is callable: hetflow.sweep(...) runs a study (hetflow.sweep.sweep)
        import importlib
        return importlib.import_module("hetflow.sweep")
    raise AttributeError(f"module 'hetflow' has no attribute {name!r}")


def _register_with_the_platform_layer() -> None:
    from hetflow import platform

    def fill_host(data: dict) -> dict:
        from hetflow.calibrate import fill_host as fill
        return fill(data)

    def fill_cuda(data: dict) -> dict:
        from hetflow.calibrate import fill_cuda as fill
        return fill(data)

    def gpu_emit_check(node, opset: int):
        from hetflow.backends.gpu import emit_failure
        return emit_failure(node, opset)

    platform.register_measurement("host", fill_host)
    platform.register_measurement("cuda", fill_cuda)
    def gpu_program(graph, name: str, device=None) -> str:
        from hetflow.backends.gpu import emit_program
        return emit_program(graph, name)

    def cpu_program(graph, name: str, device=None) -> bytes:
        from hetflow.backends import cpu_program as emit
        return emit(graph, name)

    def npu_program(graph, name: str, device) -> str:
        from hetflow.backends.npu import emit_npu_program
        return emit_npu_program(graph, device, name)

    platform.register_emit_check("cuda", gpu_emit_check)
    platform.register_program_emitter("npu", npu_program, takes_device=True)
    platform.register_program_emitter("cuda", gpu_program)
    platform.register_program_emitter("cpu", cpu_program)

    def flash_program(graph, name: str, device=None) -> str:
        from hetflow.backends.flash import flash_program as emit
        return emit(graph, name)

    platform.register_program_emitter("flash", flash_program)

    def pim_program(graph, name: str, device=None) -> str:
        from hetflow.backends import pim_program as emit
        return emit(graph, name, device)

    def pim_emit_check(node, opset: int):
        from hetflow.backends.pim import emit_failure
        return emit_failure(node, opset)

    platform.register_program_emitter("pim", pim_program, takes_device=True)
    platform.register_emit_check("pim", pim_emit_check)

    def simulated_time(graph, node, device):
        from hetflow.simulated_cost import simulated_seconds
        return simulated_seconds(graph, node, device)

    platform.register_device_timer("npu", simulated_time)
    platform.register_device_timer("pim", simulated_time)


_register_with_the_platform_layer()
