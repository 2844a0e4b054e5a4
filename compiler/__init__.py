"""hetflow: a dataflow graph compiler for heterogeneous accelerators.

    compiled = hetflow.compile(module, example_inputs, platform="host")
    compiled(*example_inputs)          # same signature and outputs as the module
    print(compiled.report())

Also ``torch.compile(m, backend="hetflow")``, the ``hetflow`` CLI, and
``hetflow.runtime.load(artifact_dir)`` (no torch needed).
"""
from hetflow.support.version import VERSION as __version__

from .api import CompiledModel, backend, compile  # noqa: E402

__all__ = ["CompiledModel", "__version__", "backend", "compile"]
