"""A function named on the command line or in a study: 'package.module:function' or 'path/file.py:function'.

Used by ``hetflow compile MODEL`` (a builder of (module, example inputs)) and ``hetflow sweep`` (a builder of
a graph or a module). Each caller raises its own error type with the one-line message this gives.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Callable

__all__ = ["import_function"]


def import_function(spec: str, error: type[Exception], module_prefix: str = "") -> Callable:
    """The function ``spec`` names; ``error(message)`` when it cannot be found. A file is run as a module
    named ``module_prefix`` + its stem."""
    module_name, sep, function = spec.rpartition(":")
    if not sep or not module_name or not function:
        raise error(f"{spec!r} is neither a .onnx file nor 'module:function'")
    try:
        if module_name.endswith(".py"):
            if not Path(module_name).exists():
                raise error(f"{module_name}: no such file")
            loader = importlib.util.spec_from_file_location(module_prefix + Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise error(f"cannot import {module_name!r}: {exc}") from None
    found = getattr(module, function, None)
    if not callable(found):
        raise error(f"{module_name!r} has no function {function!r}")
    return found
