"""Heavy suites (markers ``slow`` and ``differential``) run only when selected: ``pytest -m slow``."""
from __future__ import annotations

import os

# The compile cache is off in the suite unless a test turns it on (``cache=True``, its own ``cache_dir``): a test
# compiles to exercise the passes, and an entry from an earlier run or test would skip them.
os.environ.setdefault("HETFLOW_COMPILE_CACHE", "0")

HEAVY = ("slow", "differential")


def pytest_collection_modifyitems(config, items):
    chosen = config.getoption("-m") or ""
    keep, dropped = [], []
    for item in items:
        heavy = [m for m in HEAVY if item.get_closest_marker(m) is not None]
        (dropped if any(m not in chosen for m in heavy) else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
