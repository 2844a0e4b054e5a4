"""The cache directory: ``HETFLOW_CACHE_DIR``, else ``~/.cache/hetflow``."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("HETFLOW_CACHE_DIR", Path.home() / ".cache" / "hetflow"))
