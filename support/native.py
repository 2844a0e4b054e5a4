"""Small C kernels compiled on first use with the system's C compiler and cached.

The flag wait of the runtime and the memory planner's search use it. A machine
without a compiler, or with no writable cache, gets None and the caller runs its
Python version instead.
"""
from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
import time

from .cache import cache_dir


def compiled_function(name: str, source: str, symbol: str, timeout: float = 120.0):
    """``symbol`` from ``source`` built as a shared library (cached by the source's hash), or None.

    ctypes calls into it release Python's interpreter lock.
    """
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    library = cache_dir() / f"{name}-{digest}.so"
    try:
        if not library.exists():
            library.parent.mkdir(parents=True, exist_ok=True)
            stamp = time.monotonic_ns()
            src = library.with_suffix(f".{stamp}.c")
            partial = library.with_suffix(f".{stamp}.tmp")
            src.write_text(source)
            try:
                result = subprocess.run([compiler, "-O2", "-shared", "-fPIC", str(src), "-o", str(partial)],
                                        capture_output=True, text=True, timeout=timeout)
            finally:
                src.unlink(missing_ok=True)
            if result.returncode != 0:
                partial.unlink(missing_ok=True)
                return None
            partial.replace(library)  # atomic: another process never loads a half-written library
        return getattr(ctypes.CDLL(str(library)), symbol)
    except (OSError, subprocess.SubprocessError, AttributeError):
        return None
