"""Pass infrastructure: named passes, a registry, and a runner with hooks.

A pass is a function ``graph -> PassResult`` registered under a name. It may
mutate the graph it is given and returns the resulting graph with an honest
``modified`` flag: running a pass twice reports ``modified=False`` the second time.

Every registered pass declares its contract (``register_pass(name, needs=...,
provides=...)``): the ``node.meta`` keys it needs on every top-level node before
it runs and those it sets (``META_KEYS`` says what each key means and which pass
sets it), and the same for ``CompileOptions.results`` (``RESULT_KEYS``). A pass
run without its prerequisite is an error naming the pass, the key, the pass that
sets it and the first node lacking it (``check_contract``), never a silent
fallback.

``PassRunner`` runs a list of passes (names or callables) with hooks: it checks
each pass's contract before it runs (always: one look at every node per key),
verifies the graph after every pass (``verify_stage``: the IR's invariants and
every key the passes so far promise on every node; always in the tests), times
each pass, and, when ``HETFLOW_DUMP_IR=dir`` is set (or ``dump_dir`` given),
writes the numbered IR after each pass. An exception inside a pass becomes a
``PassError`` naming the pass, the passes before it, the node (when known) and
the IR around it.

The ``node.meta`` keys of top-level nodes (``META_KEYS`` is this table in code; a
test keeps the two equal):

=========  ===========  ==========  ===============================================================
key        set by       on          meaning
=========  ===========  ==========  ===============================================================
device     place        every node  the device that runs it (a platform device name); a transfer's
                                    is its link ``link:src_memory->dst_memory``
reason     place        some        why place chose that device (not on transfers, nor on the
                                    slices and parts of a split)
split      place        some        a part of a split contraction: ``k/n columns`` or ``k/n rows``
start_us   schedule     every node  predicted start, us from the call's entry (modelled)
end_us     schedule     every node  predicted end, us from the call's entry (modelled)
memory     plan_memory  every node  the memory space of its outputs (``Platform.memory_space``)
offsets    plan_memory  every node  each output's byte offset in that space's arena (None: unplanned)
int8       quantize     some        a MatMul/Gemm an NPU runs in int8 (on the group member, for a fused
                                    group): ``{"activation_scale": s}``, its first operand's calibrated scale
=========  ===========  ==========  ===============================================================

``schedule`` and ``plan_memory`` need ``device`` (``plan_memory`` orders
lifetimes by node order and what the runtime enforces, never by the schedule);
outside the passes, the backends and the runtime read ``device`` (partitions) and
``start_us``/``end_us`` (predicted times), the reports ``reason``. A fused group's
members carry no meta: the group is what gets placed. Nodes inside subgraphs are
not checked. The analyses left in ``CompileOptions.results`` are ``RESULT_KEYS``.
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
    cost_model: str = "analytic"       # "sim": NPU/PIM candidates timed on their simulators (hetflow.passes.cost)
    results: dict = field(default_factory=dict)  # analyses the passes leave (RESULT_KEYS below)
    quantize: str | None = None        # "int8": the NPU's contractions in int8 (the quantize pass); None: floats
    calibration_inputs: list[dict] | None = None  # for quantize: samples of {input name: array}; None: random
    dram_budget: int | None = None     # tile_flash: bytes of DRAM the model may use (None: the platform's, if exceeded)
    flash_predict: bool = False        # tile_flash: stream only predicted-active neurons (approximate)

    def resolved_platform(self):
        from hetflow.platform import load_platform
        if self.platform is None or isinstance(self.platform, str):
            self.platform = load_platform(self.platform or "host")
        return self.platform


@dataclass(frozen=True)
class MetaKey:
    set_by: str        # the pass that sets it
    every_node: bool   # on every top-level node once that pass has run (else on some nodes only)
    meaning: str


META_KEYS: dict[str, MetaKey] = {  # the table of the module's docstring
    "device": MetaKey("place", True, "the device that runs it (a platform device name); a transfer's is its link "
                                     "``link:src_memory->dst_memory``"),
    "reason": MetaKey("place", False, "why place chose that device (not on transfers, nor on the slices and parts "
                                      "of a split)"),
    "split": MetaKey("place", False, "a part of a split contraction: ``k/n columns`` or ``k/n rows``"),
    "start_us": MetaKey("schedule", True, "predicted start, us from the call's entry (modelled)"),
    "end_us": MetaKey("schedule", True, "predicted end, us from the call's entry (modelled)"),
    "memory": MetaKey("plan_memory", True, "the memory space of its outputs (``Platform.memory_space``)"),
    "offsets": MetaKey("plan_memory", True, "each output's byte offset in that space's arena (None: unplanned)"),
    "int8": MetaKey("quantize", False, "a MatMul/Gemm an NPU runs in int8 (on the group member, for a fused group): "
                                       "``{\"activation_scale\": s}``, its first operand's calibrated scale"),
}


@dataclass(frozen=True)
class ResultKey:
    set_by: str        # the pass that sets it
    meaning: str


RESULT_KEYS: dict[str, ResultKey] = {  # the analyses the passes leave in CompileOptions.results
    "placement": ResultKey("place", "PlacementReport: the policy, each node's costs, the solver's outcome"),
    "schedule": ResultKey("schedule", "Schedule: the predicted timeline (events per device, makespan)"),
    "memory_plan": ResultKey("plan_memory", "MemoryPlanReport: per memory space, the arena and its offsets"),
    "flash_plan": ResultKey("tile_flash", "FlashTiling: the DRAM budget, which FFN layers stream from flash and how "
                                          "(None when no budget applies)"),
    "quantization": ResultKey("quantize", "QuantizationReport: the contractions quantised, the calibration, the "
                                          "accuracy loss (None when CompileOptions.quantize is None)"),
}


@dataclass(frozen=True)
class Contract:
    """What a pass needs before it runs and what it leaves: ``node.meta`` keys on every top-level node
    (``META_KEYS``) and ``CompileOptions.results`` keys (``RESULT_KEYS``)."""
    needs: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    needs_results: tuple[str, ...] = ()
    provides_results: tuple[str, ...] = ()


PassFn = Callable[..., PassResult]  # (graph, options: CompileOptions | None = None) -> PassResult
PASSES: dict[str, PassFn] = {}


class PassError(HetflowError):
    pass


class NodeError(HetflowError):
    """Raised inside a pass about one node; the runner adds the pass and the IR around it."""

    def __init__(self, node: Node, message: str):
        super().__init__(f"{node.describe()}: {message}")
        self.node = node


_UNDECLARED = object()

# Contracts declared here for passes whose module cannot say it yet: plan_memory.py's decorator is to
# take these arguments (then this entry goes). Nothing else may be added here.


def register_pass(name: str, *, needs=_UNDECLARED, provides=_UNDECLARED, needs_results: tuple[str, ...] = (),
                  provides_results: tuple[str, ...] = ()) -> Callable[[PassFn], PassFn]:
    """Register a pass under ``name`` with its contract: the ``node.meta`` keys it ``needs`` on every top-level
    node and those it ``provides`` (both required, ``()`` for none; keys from ``META_KEYS``), and the
    ``CompileOptions.results`` keys it needs and provides (``RESULT_KEYS``)."""
    if needs is _UNDECLARED or provides is _UNDECLARED:
        raise TypeError(f"register_pass({name!r}): declare the contract: needs=(...), provides=(...) "
                        f"(the node.meta keys, from META_KEYS; () for none)")
    else:
        contract = Contract(tuple(needs), tuple(provides), tuple(needs_results), tuple(provides_results))
    _check_declared(name, contract)

    def wrap(fn: PassFn) -> PassFn:
        if name in PASSES:
            raise ValueError(f"pass {name!r} is registered twice")
        fn.pass_name = name  # type: ignore[attr-defined]
        fn.contract = contract  # type: ignore[attr-defined]
        PASSES[name] = fn
        return fn
    return wrap


def _check_declared(name: str, contract: Contract) -> None:
    for keys, table, what in ((contract.needs + contract.provides, META_KEYS, "meta"),
                              (contract.needs_results + contract.provides_results, RESULT_KEYS, "results")):
        unknown = [k for k in keys if k not in table]
        if unknown:
            raise ValueError(f"pass {name!r} declares {what} key(s) {unknown} that are not in "
                             f"{'META_KEYS' if what == 'meta' else 'RESULT_KEYS'}: add them there with their meaning")
    for keys, table in ((contract.provides, META_KEYS), (contract.provides_results, RESULT_KEYS)):
        for key in keys:
            if table[key].set_by != name:
                raise ValueError(f"pass {name!r} provides {key!r}, which the table says pass "
                                 f"{table[key].set_by!r} sets")


def contract_of(fn: PassFn) -> Contract | None:
    """A registered pass's contract; None for an unregistered callable (it declares nothing and is not checked)."""
    return getattr(fn, "contract", None)


def check_contract(graph: Graph, fn: PassFn | str, options: CompileOptions | None = None) -> None:
    """Raise ``PassError`` unless every top-level node has the meta keys the pass needs (and ``options.results``
    the results it needs), naming the pass, the key, the pass that sets it and the first node lacking it."""
    fn = get_pass(fn) if isinstance(fn, str) else fn
    contract = contract_of(fn)
    if contract is None:
        return
    name = getattr(fn, "pass_name", getattr(fn, "__name__", "pass"))
    for key in contract.needs:
        _require_meta(graph, key, f"pass {name!r} needs meta {key!r} on every node")
    results = options.results if options is not None else {}
    for key in contract.needs_results:
        if key not in results:
            setter = RESULT_KEYS[key].set_by
            raise PassError(f"pass {name!r} needs options.results[{key!r}] (set by pass {setter!r}); "
                            f"there is none: run {setter} first")


def require_meta(graph: Graph, key: str, needed_by: str) -> None:
    """For a consumer outside the passes (the driver before emitting partitions, say): raise ``PassError``
    unless every top-level node has meta ``key``: "<needed_by> needs meta 'device' on every node (set by
    pass 'place'); %x (MatMul) has none: run place first"."""
    _require_meta(graph, key, f"{needed_by} needs meta {key!r} on every node")


def _require_meta(graph: Graph, key: str, what: str, remedy: str | None = None) -> None:
    lacking = [node for node in graph.nodes if key not in node.meta]
    if not lacking:
        return
    setter = META_KEYS[key].set_by if key in META_KEYS else "?"
    first = lacking[0]
    others = f" (and {len(lacking) - 1} other node{'s' if len(lacking) > 2 else ''})" if len(lacking) > 1 else ""
    remedy = remedy or f"run {setter} first"
    raise PassError(f"{what} (set by pass {setter!r}); %{first.outputs[0].name if first.outputs else '?'} "
                    f"({first.op}) has none{others}: {remedy}\n{_context(graph, first)}")


def verify_stage(graph: Graph, stage: list[str], options: CompileOptions | None = None, infer: bool = True) -> None:
    """The graph as it must be after the passes in ``stage`` (names, in order; an unregistered pass promises
    nothing): the IR's invariants (``hetflow.ir.verify``; ``infer=False`` skips type inference, the costly
    part), on every top-level node each meta key those passes set on every node, and their results in
    ``options.results``.

    Raises ``VerifyError`` for the IR, ``PassError`` for a missing key (a pass that dropped or never set
    what it or an earlier pass promises)."""
    verify(graph, infer=infer)
    if not stage:
        return
    _load_builtin_passes()
    last = stage[-1]
    for name in stage:
        contract = contract_of(get_pass(name)) if name in PASSES else None
        if contract is None:
            continue
        for key in contract.provides:
            if META_KEYS[key].every_node:
                remedy = (f"pass {last!r} does not set it" if name == last else
                          f"pass {last!r} (after {name!r}) left it without one; run {name} after {last}")
                _require_meta(graph, key, f"after passes {', '.join(stage)}: meta {key!r} must be on every node",
                              remedy)
        for key in contract.provides_results:
            if options is not None and key not in options.results:
                raise PassError(f"pass {name!r} promises options.results[{key!r}] and left none")


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
    from hetflow.passes import canonicalize, fuse, place_pass, plan_memory, quantize, tile_flash  # noqa: F401  (registration on import)


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    nodes_after: int
    verify_seconds: float = 0.0   # the verification after it (``verify_each``), apart from the pass's own time


VERIFY_LEVELS = ("full", "structure", "none")  # between passes: verify_stage with type inference, without, nothing


@dataclass
class PassRunner:
    """Runs passes in order: each pass's contract is checked before it runs (always), and after it the graph is
    verified at the ``verify_each`` level: ``"full"`` (or True: ``verify_stage`` with type inference, as the
    tests run), ``"structure"`` (``verify_stage`` without type inference: the IR's structure and the meta keys
    the passes so far promise) or ``"none"`` (or False)."""
    passes: list[str | PassFn]
    options: CompileOptions = field(default_factory=CompileOptions)
    verify_each: bool | str = True
    dump_dir: str | Path | None = None
    records: list[PassRecord] = field(default_factory=list)

    def __post_init__(self):
        if self.dump_dir is None and os.environ.get("HETFLOW_DUMP_IR"):
            self.dump_dir = os.environ["HETFLOW_DUMP_IR"]
        level = {True: "full", False: "none"}.get(self.verify_each, self.verify_each)
        if level not in VERIFY_LEVELS:
            raise ValueError(f"verify_each={self.verify_each!r}: one of {', '.join(VERIFY_LEVELS)} (or True/False)")
        self.verify_each = level

    def run(self, graph: Graph) -> Graph:
        fns = [get_pass(p) if isinstance(p, str) else p for p in self.passes]
        self._dump(graph, 0, "input")
        done: list[str] = []
        for index, fn in enumerate(fns, start=1):
            name = getattr(fn, "pass_name", getattr(fn, "__name__", "pass"))
            try:
                check_contract(graph, fn, self.options)
            except PassError as exc:
                raise PassError(f"before pass {name!r} (after: {', '.join(done) or 'none'}): {exc}") from None
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
            if self.verify_each != "none":
                try:
                    verify_stage(graph, done + [name], self.options, infer=self.verify_each == "full")
                except HetflowError as exc:
                    raise PassError(self._where(name, done) + f"the graph fails verification after it: {exc}") from exc
            verified = time.perf_counter() - start - elapsed
            self.records.append(PassRecord(name, elapsed, result.modified, len(graph.nodes), verified))
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
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / f"{index:02d}-{name}.ir").write_text(str(graph) + "\n")
        except OSError as exc:
            raise PassError(f"cannot write the IR after pass {name!r} into HETFLOW_DUMP_IR={self.dump_dir}: "
                            f"{exc.strerror or exc}") from None

    def timing_table(self) -> str:
        lines = [f"{'pass':16s} {'ms':>9s} {'verify ms':>9s}  modified  nodes"]
        for r in self.records:
            lines.append(f"{r.name:16s} {r.seconds * 1e3:9.2f} {r.verify_seconds * 1e3:9.2f}  {str(r.modified):8s}  "
                         f"{r.nodes_after}")
        return "\n".join(lines)


def _context(graph: Graph, node: Node) -> str:
    return ir_context(graph, node) if node in graph.nodes else ""
