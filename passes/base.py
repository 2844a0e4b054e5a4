"""Pass infrastructure: named passes, a registry, and a runner with hooks.

A pass is a function ``graph -> PassResult`` registered under a name. It may
mutate the graph it is given and returns the resulting graph with an honest
``modified`` flag: running a pass twice reports ``modified=False`` the second time.

``PassRunner`` runs a list of passes (names or callables) with hooks: it verifies
the graph after every pass (always in the tests), times each pass, and, when
``HETFLOW_DUMP_IR=dir`` is set (or ``dump_dir`` given), writes the numbered IR
after each pass. An exception inside a pass becomes a ``PassError`` naming the
pass, the passes before it, the node (when known) and the IR around it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hetflow.ir import Graph, Node, verify
from hetflow.ir.errors import HetflowError
from hetflow.ir.verify import ir_context


@dataclass
class PassResult:
    graph: Graph
    modified: bool


@dataclass
class CompileOptions:
    """What the passes that need more than the graph read: the platform, the placement policy..."""
    platform: object = None            # hetflow.platform.Platform; None means the "host" preset
    placement: str = "roofline"
    devices: list[str] | None = None   # restrict placement to these devices
    time_limit: float = 10.0           # seconds for each exact solver
    results: dict = field(default_factory=dict)  # analyses the passes leave: "placement", "schedule"

    def resolved_platform(self):
        from hetflow.platform import load_platform
        if self.platform is None or isinstance(self.platform, str):
            self.platform = load_platform(self.platform or "host")
        return self.platform


PassFn = Callable[..., PassResult]  # (graph, options: CompileOptions | None = None) -> PassResult
PASSES: dict[str, PassFn] = {}


class PassError(HetflowError):
    pass


class NodeError(HetflowError):
    """Raised inside a pass about one node; the runner adds the pass and the IR around it."""

    def __init__(self, node: Node, message: str):
        super().__init__(f"{node.describe()}: {message}")
        self.node = node


def register_pass(name: str) -> Callable[[PassFn], PassFn]:
    def wrap(fn: PassFn) -> PassFn:
        if name in PASSES:
            raise ValueError(f"pass {name!r} is registered twice")
        fn.pass_name = name  # type: ignore[attr-defined]
        PASSES[name] = fn
        return fn
    return wrap


def get_pass(name: str) -> PassFn:
    _load_builtin_passes()
    if name not in PASSES:
        raise PassError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def parse_pipeline(text: str) -> list[str]:
    """'canonicalize,fuse' -> ['canonicalize', 'fuse'], each name checked."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        get_pass(name)
    return names


def _load_builtin_passes() -> None:
    from hetflow.passes import canonicalize, fuse, place_pass, plan_memory  # noqa: F401  (registration on import)


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    nodes_after: int


@dataclass
class PassRunner:
    passes: list[str | PassFn]
    options: CompileOptions = field(default_factory=CompileOptions)
    verify_each: bool = True
    dump_dir: str | Path | None = None
    records: list[PassRecord] = field(default_factory=list)

    def __post_init__(self):
        if self.dump_dir is None and os.environ.get("HETFLOW_DUMP_IR"):
            self.dump_dir = os.environ["HETFLOW_DUMP_IR"]

    def run(self, graph: Graph) -> Graph:
        fns = [get_pass(p) if isinstance(p, str) else p for p in self.passes]
        self._dump(graph, 0, "input")
        done: list[str] = []
        for index, fn in enumerate(fns, start=1):
            name = getattr(fn, "pass_name", getattr(fn, "__name__", "pass"))
            start = time.perf_counter()
            try:
                result = fn(graph, self.options)
            except NodeError as exc:
                raise PassError(self._where(name, done) + str(exc) + "\n" + _context(graph, exc.node)) from exc
            except HetflowError:
                raise
            except Exception as exc:
                raise PassError(self._where(name, done) + f"{type(exc).__name__}: {exc}") from exc
            elapsed = time.perf_counter() - start
            graph = result.graph
            if self.verify_each:
                try:
                    verify(graph)
                except HetflowError as exc:
                    raise PassError(self._where(name, done) + f"the graph fails verification after it: {exc}") from exc
            self.records.append(PassRecord(name, elapsed, result.modified, len(graph.nodes)))
            self._dump(graph, index, name)
            done.append(name)
        return graph

    @staticmethod
    def _where(name: str, done: list[str]) -> str:
        before = ", ".join(done) if done else "none"
        return f"in pass {name!r} (after: {before}): "

    def _dump(self, graph: Graph, index: int, name: str) -> None:
        if not self.dump_dir:
            return
        path = Path(self.dump_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / f"{index:02d}-{name}.ir").write_text(str(graph) + "\n")

    def timing_table(self) -> str:
        lines = [f"{'pass':16s} {'ms':>9s}  modified  nodes"]
        for r in self.records:
            lines.append(f"{r.name:16s} {r.seconds * 1e3:9.2f}  {str(r.modified):8s}  {r.nodes_after}")
        return "\n".join(lines)


def _context(graph: Graph, node: Node) -> str:
    return ir_context(graph, node) if node in graph.nodes else ""
