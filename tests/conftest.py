"""Heavy suites (markers ``slow`` and ``differential``) run only when selected: ``pytest -m slow``."""
from __future__ import annotations

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
