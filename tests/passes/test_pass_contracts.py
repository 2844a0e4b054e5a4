"""Pass contracts: each pass declares the node.meta keys (and results) it needs and provides; a pass run without
its prerequisite fails naming the pass, the key, the pass that sets it and the first node lacking it."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import numpy as np
import pytest

from hetflow.ir import DType, Graph, TensorType, infer_types
from hetflow.passes import (
    META_KEYS,
    PASSES,
    RESULT_KEYS,
    CompileOptions,
    Contract,
    PassError,
    PassResult,
    PassRunner,
    check_contract,
    get_pass,
    register_pass,
    require_meta,
    verify_stage,
)
from hetflow.passes.base import PassRunner as BasePassRunner
from hetflow.pipeline import PIPELINE, run_pipeline


def add(graph, op, inputs, attrs=None):
    node = graph.add_node(op, inputs, [None], attrs or {})
    node.outputs[0].type = infer_types(node, graph.opset)[0]
    return node.outputs[0]


def mlp(rows=64, width=256, hidden=1024):
    rng = np.random.default_rng(0)
    g = Graph("mlp")
    x = g.add_input("x", TensorType(DType.f32, (rows, width)))
    w1 = g.add_weight("w1", rng.standard_normal((width, hidden)).astype(np.float32))
    w2 = g.add_weight("w2", rng.standard_normal((hidden, width)).astype(np.float32))
    h = add(g, "MatMul", [x, w1])
    g.outputs = [add(g, "MatMul", [add(g, "Relu", [h]), w2])]
    return g


# --- a pass without its prerequisite --------------------------------------------------------------------

@pytest.mark.parametrize("passes, after", [(["schedule"], "none"), (["plan_memory"], "none"),
                                           (["canonicalize", "fuse", "schedule"], "canonicalize, fuse"),
                                           (["canonicalize", "plan_memory"], "canonicalize")])
def test_a_pass_without_its_prerequisite_names_the_key_the_pass_to_run_and_the_node(passes, after):
    graph = mlp()
    first = graph.nodes[0]
    expected = (rf"before pass '{passes[-1]}' \(after: {after}\): pass '{passes[-1]}' needs meta 'device' on every "
                r"node \(set by pass 'place'\); %\w+ \((MatMul|hetflow\.group)\) has none .*: run place first")
    with pytest.raises(PassError, match=expected) as info:
        run_pipeline(graph, passes, options=CompileOptions(platform="host"))
    if passes == ["schedule"]:
        assert f"%{first.outputs[0].name} (MatMul)" in str(info.value)
        assert "> " in str(info.value)  # the IR around the node, the node marked


def test_the_first_node_lacking_the_key_is_named_not_the_first_node():
    graph = mlp()
    graph.nodes[0].meta["device"] = "cpu"
    graph.nodes[1].meta["device"] = "cpu"
    lacking = graph.nodes[2]
    with pytest.raises(PassError, match=rf"%{lacking.outputs[0].name} \(MatMul\) has none: run place first"):
        run_pipeline(graph, ["schedule"], options=CompileOptions(platform="host"))


def test_check_contract_without_a_runner_and_a_placed_graph_passes():
    graph = mlp()
    with pytest.raises(PassError, match="pass 'plan_memory' needs meta 'device'"):
        check_contract(graph, "plan_memory")
    options = CompileOptions(platform="host")
    graph, _ = run_pipeline(graph, ["place"], options=options)
    check_contract(graph, "schedule", options)
    check_contract(graph, "plan_memory", options)


def test_require_meta_for_consumers_outside_the_passes():
    graph = mlp()
    with pytest.raises(PassError, match=r"^emitting partitions needs meta 'device' on every node \(set by pass "
                                        r"'place'\); %\w+ \(MatMul\) has none \(and 2 other nodes\): run place first"):
        require_meta(graph, "device", "emitting partitions")


def test_a_needed_result_is_checked_too():
    @register_pass("needs_a_schedule_test_only", needs=(), provides=(), needs_results=("schedule",))
    def needs_schedule(graph, options=None):
        return PassResult(graph, False)
    try:
        with pytest.raises(PassError, match=r"needs options.results\['schedule'\] \(set by pass 'schedule'\); "
                                            r"there is none: run schedule first"):
            PassRunner([needs_schedule]).run(mlp())
        options = CompileOptions(platform="host")
        run_pipeline(mlp(), ["place", "schedule", "needs_a_schedule_test_only"], options=options)
    finally:
        del PASSES["needs_a_schedule_test_only"]


def test_the_whole_pipeline_and_the_driver_run_with_contracts_checked():
    options = CompileOptions(platform="host")
    graph, runner = run_pipeline(mlp(), options=options)
    assert [r.name for r in runner.records] == PIPELINE
    for key, row in META_KEYS.items():
        if row.every_node:
            assert all(key in n.meta for n in graph.nodes), key
    assert set(options.results) == set(RESULT_KEYS)
    verify_stage(graph, PIPELINE, options)


# --- verification between passes --------------------------------------------------------------------------

def test_a_pass_that_drops_what_an_earlier_pass_promised_is_caught_where_it_does():
    def forgets_devices(graph, options=None):
        for node in graph.nodes:
            node.meta.pop("device", None)
        return PassResult(graph, True)
    forgets_devices.pass_name = "forgets"
    with pytest.raises(PassError, match=r"in pass 'forgets' \(after: place\): the graph fails verification after "
                                        r"it: after passes place, forgets: meta 'device' must be on every node"):
        PassRunner(["place", forgets_devices], CompileOptions(platform="host")).run(mlp())


def test_fuse_after_place_leaves_groups_unplaced_and_the_default_verification_says_so():
    with pytest.raises(PassError, match=r"in pass 'fuse' \(after: place\).*meta 'device' must be on every node.*"
                                        r"hetflow\.group\) has none.*run place after fuse"):
        run_pipeline(mlp(), ["place", "fuse"], options=CompileOptions(platform="host"))


def test_verify_levels():
    assert BasePassRunner(["canonicalize"], verify_each=True).verify_each == "full"
    assert BasePassRunner(["canonicalize"], verify_each=False).verify_each == "none"
    assert BasePassRunner(["canonicalize"], verify_each="structure").verify_each == "structure"
    with pytest.raises(ValueError, match="verify_each='sometimes'"):
        BasePassRunner(["canonicalize"], verify_each="sometimes")
    _, runner = run_pipeline(mlp(), ["canonicalize"])
    assert runner.verify_each == "structure"  # the pipeline's default: cheap, but on


def test_contract_checked_even_without_verification():
    with pytest.raises(PassError, match="pass 'schedule' needs meta 'device'"):
        run_pipeline(mlp(), ["schedule"], verify_each=False, options=CompileOptions(platform="host"))


# --- every pass declares its contract --------------------------------------------------------------------

def test_every_registered_pass_declares_its_contract():
    get_pass("canonicalize")  # loads the built-in passes
    assert {"canonicalize", "fuse", "place", "schedule", "plan_memory"} <= set(PASSES)
    for name, fn in PASSES.items():
        contract = fn.contract
        assert isinstance(contract, Contract), name
        for key in contract.needs + contract.provides:
            assert key in META_KEYS, (name, key)
        for key in contract.needs_results + contract.provides_results:
            assert key in RESULT_KEYS, (name, key)
        for key in contract.provides:
            assert META_KEYS[key].set_by == name, (name, key)
    # each key in the tables is set by exactly the pass that says it provides it
    for table, field in ((META_KEYS, "provides"), (RESULT_KEYS, "provides_results")):
        for key, row in table.items():
            assert key in getattr(PASSES[row.set_by].contract, field), (key, row.set_by)
    assert PASSES["schedule"].contract.needs == ("device",)
    assert PASSES["plan_memory"].contract.needs == ("device",)  # node order by design: no schedule needed
    assert PASSES["canonicalize"].contract == Contract() == PASSES["fuse"].contract


def test_register_pass_refuses_an_undeclared_or_unknown_contract():
    with pytest.raises(TypeError, match="declare the contract"):
        register_pass("undeclared_test_only")
    with pytest.raises(TypeError, match="declare the contract"):
        register_pass("half_declared_test_only", needs=())
    with pytest.raises(ValueError, match=r"meta key\(s\) \['colour'\] that are not in META_KEYS"):
        register_pass("unknown_key_test_only", needs=("colour",), provides=())
    with pytest.raises(ValueError, match="provides 'device', which the table says pass 'place' sets"):
        register_pass("usurper_test_only", needs=(), provides=("device",))
    assert not any(name.endswith("_test_only") for name in PASSES)


def docstring_table(doc: str) -> dict[str, tuple[str, bool, str]]:
    """The rows of the reST table in ``hetflow.passes.base``'s docstring: key -> (set by, every node, meaning)."""
    lines = doc.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("=========")]
    rows: dict[str, list] = {}
    last = None
    for line in lines[rules[1] + 1:rules[2]]:
        key, setter, on, meaning = line[:11].strip(), line[11:24].strip(), line[24:36].strip(), line[36:].strip()
        if key:
            rows[key] = last = [setter, on == "every node", meaning]
        else:
            last[2] += " " + meaning
    return {k: tuple(v) for k, v in rows.items()}


def test_the_docstring_table_is_meta_keys():
    from hetflow.passes import base
    table = docstring_table(base.__doc__)
    assert table == {k: (row.set_by, row.every_node, row.meaning) for k, row in META_KEYS.items()}


# --- the table covers every key read --------------------------------------------------------------------

def meta_keys_used(source: str) -> tuple[set[str], set[str]]:
    """(node.meta keys, options.results keys) a module's source reads or writes with a literal key:
    ``x.meta["k"]``, ``x.meta.get("k")`` (pop, setdefault), ``"k" in x.meta``, ``meta={"k": ...}``."""
    meta, results = set(), set()
    table = {"meta": meta, "results": results}

    def owner(expr):
        return table.get(expr.attr) if isinstance(expr, ast.Attribute) else None

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript) and owner(node.value) is not None:
            if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                owner(node.value).add(node.slice.value)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("get", "pop", "setdefault") and owner(node.func.value) is not None
              and node.args and isinstance(node.args[0], ast.Constant)):
            owner(node.func.value).add(node.args[0].value)
        elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) and \
                any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            for comparator in node.comparators:
                if owner(comparator) is not None:
                    owner(comparator).add(node.left.value)
        elif isinstance(node, ast.keyword) and node.arg == "meta" and isinstance(node.value, ast.Dict):
            meta.update(k.value for k in node.value.keys if isinstance(k, ast.Constant))
    return meta, results


def test_the_key_scanner_finds_every_form():
    source = '''
n.meta["a"]; n.meta["b"] = 1; n.meta.get("c", 0); "d" in n.meta; "e" not in v.producer.meta
g.add_node(op, [], [], meta={"f": 1}); options.results["g"] = 1; options.results.get("h")
n.attrs["not_meta"]; other.get("nor_this")
'''
    assert meta_keys_used(source) == ({"a", "b", "c", "d", "e", "f"}, {"g", "h"})


def _sources(package: str) -> list[Path]:
    folder = Path(importlib.import_module(package).__file__).parent
    return sorted(folder.glob("*.py"))


def test_the_table_names_every_meta_key_the_passes_use():
    seen_meta, seen_results = set(), set()
    for path in _sources("hetflow.passes"):
        meta, results = meta_keys_used(path.read_text())
        unknown = meta - set(META_KEYS)
        assert not unknown, f"{path.name} uses node.meta keys {sorted(unknown)} that META_KEYS does not name"
        unknown = results - set(RESULT_KEYS)
        assert not unknown, f"{path.name} uses options.results keys {sorted(unknown)} that RESULT_KEYS does not name"
        seen_meta |= meta
        seen_results |= results
    assert {"device", "start_us", "end_us", "memory", "offsets"} <= seen_meta  # the scan does see the passes
    assert seen_results == set(RESULT_KEYS)


# torch.fx's node.meta ("val", "stack_trace", ...) is torch's, not hetflow's
FX_META_MODULES = {"torch.py", "torch_backend.py"}


def test_every_other_layer_reads_only_keys_the_table_names():
    root = Path(importlib.import_module("hetflow.passes").__file__).parent.parent
    seen = set()
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts)
        if parts & {"tests", "benchmarks", "examples", "passes"} or path.name in FX_META_MODULES:
            continue
        meta, _ = meta_keys_used(path.read_text())
        unknown = meta - set(META_KEYS)
        assert not unknown, f"{path.relative_to(root)} reads node.meta keys {sorted(unknown)} that META_KEYS lacks"
        seen |= meta
    assert "device" in seen  # the backends and runtime read the partitions' devices


# --- the contracts are honest: what each pass reads and writes when it runs --------------------------------

class RecordingMeta(dict):
    reads: set[str] = set()

    def __getitem__(self, key):
        RecordingMeta.reads.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        RecordingMeta.reads.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        RecordingMeta.reads.add(key)
        return super().__contains__(key)


@pytest.mark.parametrize("placement", ["roofline", "split"])
def test_each_pass_reads_only_what_it_needs_and_writes_only_what_it_provides(placement):
    options = CompileOptions(platform="mobile-soc", placement=placement, time_limit=1.0)
    graph = mlp(rows=256, width=512, hidden=2048)  # split: the second MatMul by rows over the NPU and GPU
    written = set()
    for name in PIPELINE:
        contract = get_pass(name).contract
        check_contract(graph, name, options)  # outside the runner: its own look must not count as the pass's
        for node in graph.nodes:
            node.meta = RecordingMeta(node.meta)
        before = {id(n): set(n.meta) for n in graph.nodes}
        RecordingMeta.reads = set()
        graph = get_pass(name)(graph, options).graph
        from_others = {k for k in RecordingMeta.reads if k in META_KEYS and META_KEYS[k].set_by != name}
        assert from_others <= set(contract.needs), f"pass {name!r} reads {sorted(from_others)} undeclared"
        added = {k for n in graph.nodes for k in set(n.meta) - before.get(id(n), set())}
        assert added <= set(contract.provides), f"pass {name!r} sets {sorted(added - set(contract.provides))}"
        written |= added
        verify_stage(graph, PIPELINE[:PIPELINE.index(name) + 1], options)
    assert {"device", "reason", "start_us", "end_us", "memory", "offsets"} <= written
    assert ("split" in written) == (placement == "split")
