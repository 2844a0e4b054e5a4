"""The simulated cost model (``cost_model="sim"``): a group's time on an NPU or PIM is what the device's
simulator says its emitted program takes, not the roofline estimate.

For each candidate (group, device) placement asks, the group is cut out of the graph as a standalone
graph (``extract_subgraph``), emitted by the device's backend (``hetflow.backends.npu`` /
``hetflow.backends.pim``) and timed by its simulator (``hetflow.runtime.runners.npu`` / ``.pim``). Both
simulators time a program from the program alone (the instruction scoreboard, the DRAM command timing),
so nothing is executed: the price is one emit and one timing walk per distinct group.

Results are cached in this process by the group's printed IR (names, locations and meta left out:
``structure``) and the device's figures, so a transformer's repeated layers are timed once. A study's
workers share what each has learnt (``cache_entries`` / ``merge_cache``: ``hetflow.sweep``), as points of
one model differing only in context or a platform figure the groups do not see repeat most probes. A group the backend declines (the NPU's dynamic shapes, an op the PIM
command stream cannot hold) gets ``None``: placement keeps the analytic time for it and the report
counts it.

Registered with the platform layer by ``hetflow/__init__.py`` (``register_device_timer``), so that the
passes never import a backend or a runner.
"""
from __future__ import annotations

import hashlib
import re
import threading

from hetflow.ir import Graph, Node
from hetflow.ir.graph import extract_subgraph
from hetflow.ir.text import print_graph

__all__ = ["simulated_seconds", "cache_info", "clear_cache", "cache_entries", "merge_cache"]

_CACHE: dict[str, float | None] = {}
_LOCK = threading.Lock()
_STATS = {"hits": 0, "misses": 0}


_NAME = re.compile(r'%(?:"(?:[^"\\]|\\.)*"|[^\s,():\[\]=]+)')
_LOC = re.compile(r'\s*loc\("(?:[^"\\]|\\.)*"\)')
_META = re.compile(r'\s*#\{(?:[^{}"]|"(?:[^"\\]|\\.)*")*\}')
_GRAPH_NAME = re.compile(r'graph [^\s(]+\(')


def structure(sub: Graph) -> str:
    """The group's printed IR without what does not change its program's timing: value and graph names
    (renamed in order of appearance), source locations and meta. Equal for a transformer's repeated layers."""
    text = _META.sub("", _LOC.sub("", print_graph(sub)))
    text = _GRAPH_NAME.sub("graph _(", text)
    names: dict[str, str] = {}
    return _NAME.sub(lambda m: names.setdefault(m.group(0), f"%{len(names)}"), text)


def _key(sub: Graph, device) -> str:
    digest = hashlib.sha256(structure(sub).encode())
    digest.update(repr(device).encode())
    return digest.hexdigest()


def simulated_seconds(graph: Graph, node: Node, device) -> float | None:
    """Modelled seconds of ``node`` (a top-level node of ``graph``, static shapes) alone on ``device``
    (an ``npu`` or ``pim`` Device), from its emitted program; None when the backend declines it."""
    from hetflow.backends.cpu import BackendDeclined, BackendError
    sub = extract_subgraph(graph, [node], f"probe_{node.outputs[0].name}")[0]
    if not sub.outputs or not all(v.type is not None and v.type.is_static for v in sub.inputs + sub.outputs):
        return None
    key = _key(sub, device)
    with _LOCK:
        if key in _CACHE:
            _STATS["hits"] += 1
            return _CACHE[key]
    where = f"cost probe of %{node.outputs[0].name} ({node.op}) on {device.name}"
    try:
        seconds = _time(sub, device, where)
    except (BackendDeclined, BackendError):
        # declined, or too large for the device (e.g. the NPU's SRAM): the analytic model stands for it;
        # if placement still picks the device, the backend's own error names the node at emit
        seconds = None
    with _LOCK:
        _STATS["misses"] += 1
        _CACHE[key] = seconds
    return seconds


def _time(sub: Graph, device, where: str) -> float:
    weights = {w.name: w.data for w in sub.weights.values()}
    if device.kind == "npu":
        from hetflow.backends.npu import emit_npu_program
        from hetflow.runtime.runners.npu import NpuSimulator
        return NpuSimulator(emit_npu_program(sub, device, where), weights, where).modelled_seconds
    if device.kind == "pim":
        from hetflow.backends.pim import emit_pim_program
        from hetflow.runtime.runners.pim import PimSimulator
        return PimSimulator(emit_pim_program(sub, device, where), weights, sub, where).last_seconds
    raise ValueError(f"no simulator for device kind {device.kind!r} ({device.name})")


def cache_info() -> dict:
    """{'hits', 'misses', 'entries'}: how often placement reused a simulated time."""
    with _LOCK:
        return {**_STATS, "entries": len(_CACHE)}


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()
        _STATS.update(hits=0, misses=0)


def cache_entries(leave_out: set | frozenset = frozenset()) -> dict[str, float | None]:
    """The cached times (key -> seconds, None where declined), less the keys in ``leave_out``."""
    with _LOCK:
        return {k: v for k, v in _CACHE.items() if k not in leave_out}


def merge_cache(entries: dict[str, float | None]) -> None:
    """Add times another process simulated (``cache_entries`` there): same key, same program, same time."""
    with _LOCK:
        _CACHE.update(entries)
