"""Tests of the standalone static memory allocator (hetflow.passes.memplan) and its CSV driver (hetflow.memplan_cli)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hetflow import memplan_cli
from hetflow.memplan_cli import read_csv, write_csv
from hetflow.passes import memplan
from hetflow.passes.memplan import (
    Buffer,
    InfeasibleError,
    MemplanInputError,
    PlanError,
    check_plan,
    greedy_by_size,
    lower_bound,
    solve,
)

BENCH = Path(__file__).resolve().parents[2].parent / "shared/benchmarks/minimalloc"


def B(i, lo, up, size):
    return Buffer(str(i), lo, up, size)


# Greedy by size is not optimal here: it peaks at 10, the optimum is the lower bound 9.
TRICKY = [B("a", 1, 5, 3), B("b", 4, 5, 3), B("c", 4, 5, 3), B("d", 3, 4, 4)]


def test_public_api_is_declared():
    assert sorted(memplan.__all__) == sorted([
        "Buffer", "MemoryPlan", "MemplanInputError", "InfeasibleError", "PlanError",
        "lower_bound", "greedy_by_size", "solve", "check_plan"])
    assert sorted(memplan_cli.__all__) == ["cli", "read_csv", "read_problem_csv", "write_csv"]


def test_the_solver_module_has_no_file_or_command_line_code():
    import ast
    tree = ast.parse(Path(memplan.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"argparse", "csv", "sys"}


def test_lower_bound_is_most_live_bytes():
    bufs = [B(0, 0, 10, 5), B(1, 5, 15, 7), B(2, 10, 20, 1), B(3, 20, 30, 100)]
    assert lower_bound(bufs) == 100
    assert lower_bound(bufs[:3]) == 12  # [5,10): 5+7; [10,15): 7+1
    assert lower_bound([]) == 0


def test_half_open_lifetimes_do_not_overlap():
    bufs = [B(0, 0, 5, 10), B(1, 5, 10, 10)]
    plan = solve(bufs)
    assert plan.peak == 10 and plan.optimal
    assert plan.offsets == {"0": 0, "1": 0}


@pytest.mark.parametrize("method", ["greedy", "cpsat", "exact"])
def test_every_method_gives_a_valid_plan(method):
    plan = solve(TRICKY, method=method, time_limit_s=10)
    check_plan(TRICKY, plan)
    assert plan.peak >= plan.lower_bound == 9
    assert plan.method == method
    assert plan.peak == (10 if method == "greedy" else 9)


@pytest.mark.parametrize("method", ["cpsat", "exact"])
def test_exact_methods_reach_the_optimum_on_a_hand_problem(method):
    # Sizes 3,3 on [0,2) and 2,2,2 around them: the optimum is the lower bound 6.
    bufs = [B(0, 0, 4, 3), B(1, 0, 2, 3), B(2, 2, 4, 1), B(3, 2, 3, 2), B(4, 3, 4, 2)]
    plan = solve(bufs, method=method, time_limit_s=10)
    check_plan(bufs, plan)
    assert plan.peak == lower_bound(bufs) == 6
    assert plan.optimal and plan.gap == 0.0


def test_exact_fits_where_greedy_does_not():
    bufs = [B("a", 2, 5, 2), B("b", 3, 4, 2), B("c", 2, 3, 4), B("d", 4, 5, 2), B("e", 3, 5, 3)]
    lb = lower_bound(bufs)
    assert solve(bufs, method="greedy").peak == lb + 1
    with pytest.raises(InfeasibleError, match=f"no plan found within capacity {lb}"):
        solve(bufs, capacity=lb, method="greedy")
    plan = solve(bufs, capacity=lb, time_limit_s=10)
    check_plan(bufs, plan, capacity=lb)
    assert plan.peak == lb and plan.optimal


def test_alignment_is_respected():
    bufs = [B(0, 0, 4, 10), B(1, 1, 3, 7), B(2, 2, 5, 5), B(3, 0, 2, 1)]
    for method in ("greedy", "cpsat", "exact"):
        plan = solve(bufs, method=method, alignment=8, time_limit_s=10)
        check_plan(bufs, plan, alignment=8)
        assert all(off % 8 == 0 for off in plan.offsets.values())


def test_zero_size_buffers_get_an_offset():
    bufs = [B(0, 0, 4, 0), B(1, 0, 4, 8)]
    plan = solve(bufs)
    check_plan(bufs, plan)
    assert plan.peak == 8


def test_infeasible_capacity_below_the_lower_bound():
    bufs = [B(0, 0, 4, 10), B(1, 1, 3, 7)]
    with pytest.raises(InfeasibleError, match=r"infeasible at capacity 16 \(lower bound 17\)"):
        solve(bufs, capacity=16)


def test_infeasible_capacity_above_the_lower_bound_is_proved_by_search():
    # With 4-byte alignment three overlapping 1-byte buffers need offsets 0, 4, 8:
    # the lower bound is 3 bytes but no plan fits in 8.
    bufs = [B("p", 0, 2, 1), B("q", 1, 3, 1), B("r", 0, 3, 1)]
    assert lower_bound(bufs) == 3
    with pytest.raises(InfeasibleError, match=r"infeasible at capacity 8 \(lower bound 3; proved"):
        solve(bufs, capacity=8, alignment=4)
    plan = solve(bufs, capacity=9, alignment=4)
    assert plan.peak == 9
    plan = solve(bufs, alignment=4)
    assert plan.peak == 9 and plan.optimal


def test_plan_never_worse_than_greedy():
    bufs = [B(i, i % 5, i % 5 + 3, 1 + (i * 7) % 11) for i in range(30)]
    greedy_peak = max(o + b.size for b, o in zip(bufs, greedy_by_size(bufs).values()))
    for method in ("cpsat", "exact"):
        plan = solve(bufs, method=method, time_limit_s=5)
        check_plan(bufs, plan)
        assert plan.peak <= greedy_peak


def test_checker_names_the_two_overlapping_buffers():
    bufs = [B("a", 0, 4, 8), B("b", 2, 6, 8)]
    with pytest.raises(PlanError, match=r"'a' \(live \[0, 4\).*'b' \(live \[2, 6\)"):
        check_plan(bufs, {"a": 0, "b": 4})
    with pytest.raises(PlanError, match="no offset"):
        check_plan(bufs, {"a": 0})
    with pytest.raises(PlanError, match="exceeds capacity"):
        check_plan(bufs, {"a": 0, "b": 8}, capacity=12)
    with pytest.raises(PlanError, match="multiple of 16"):
        check_plan(bufs, {"a": 0, "b": 8}, alignment=16)
    with pytest.raises(PlanError, match="negative offset"):
        check_plan(bufs, {"a": -8, "b": 8})
    check_plan(bufs, {"a": 0, "b": 8}, capacity=16)


# ---------------------------------------------------------------- CSV

def _write(tmp_path, text, name="p.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_round_trip(tmp_path):
    path = _write(tmp_path, "id,lower,upper,size\na,0,10,4\nb,5,20,8\n")
    bufs = read_csv(path)
    assert bufs == [Buffer("a", 0, 10, 4), Buffer("b", 5, 20, 8)]
    plan = solve(bufs)
    out = tmp_path / "out.csv"
    write_csv(out, bufs, plan.offsets)
    lines = out.read_text().splitlines()
    assert lines[0] == "id,lower,upper,size,offset"
    assert read_csv(out) == bufs  # the extra column is ignored


@pytest.mark.parametrize("text, message", [
    ("id,lower,upper,size\na,0,10,-4\n", r"p.csv:2: buffer 'a' has negative size -4"),
    ("id,lower,upper,size\na,0,10,4\nb,7,7,1\n", r"p.csv:3: buffer 'b' has upper 7 <= lower 7"),
    ("id,lower,upper,size\na,0,ten,4\n", r"p.csv:2: upper 'ten' is not an integer"),
    ("id,lower,upper,size\na,0,1,4\na,2,3,4\n", r"p.csv:3: duplicate id 'a' \(first on line 2\)"),
    ("id,lower,size\na,0,4\n", r"p.csv:1: missing column\(s\) upper"),
    ("", r"p.csv:1: empty file"),
    ("id,lower,upper,size\na,0,1\n", r"p.csv:2: 3 fields, expected 4"),
])
def test_bad_csv_says_where_and_what(tmp_path, text, message):
    with pytest.raises(MemplanInputError, match=message):
        read_csv(_write(tmp_path, text))


def test_solve_rejects_bad_buffers():
    with pytest.raises(MemplanInputError, match="negative size"):
        solve([B("a", 0, 1, -1)])
    with pytest.raises(MemplanInputError, match="upper 1 <= lower 1"):
        solve([B("a", 1, 1, 4)])
    with pytest.raises(MemplanInputError, match="duplicate"):
        solve([B("a", 0, 1, 4), B("a", 0, 1, 4)])
    with pytest.raises(ValueError, match="unknown method"):
        solve([B("a", 0, 1, 4)], method="magic")


# ---------------------------------------------------------------- CLI

def test_cli_success_and_output(tmp_path, capsys):
    path = _write(tmp_path, "id,lower,upper,size\na,0,10,4\nb,5,20,8\nc,12,30,4\n")
    out = tmp_path / "plan.csv"
    assert memplan_cli.cli([str(path), "--capacity", "12", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fits within capacity 12" in text and "peak:        12" in text and "lower bound: 12" in text
    assert out.exists()
    check_plan(read_csv(path), {r.id: 0 for r in read_csv(path)} | _offsets(out), capacity=12)


def _offsets(path):
    import csv
    with open(path) as f:
        return {row["id"]: int(row["offset"]) for row in csv.DictReader(f)}


def test_cli_infeasible_and_bad_input_exit_1_without_traceback(tmp_path, capsys):
    path = _write(tmp_path, "id,lower,upper,size\na,0,10,4\nb,5,20,8\n")
    assert memplan_cli.cli([str(path), "--capacity", "11"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "hetflow: error: infeasible at capacity 11 (lower bound 12)"
    bad = _write(tmp_path, "id,lower,upper,size\na,0,10,-4\n", "bad.csv")
    assert memplan_cli.cli([str(bad), "--capacity", "11"]) == 1
    err = capsys.readouterr().err
    assert "bad.csv:2" in err and "Traceback" not in err
    assert memplan_cli.cli([str(tmp_path / "missing.csv")]) == 1


def test_cli_help_explains_the_format(capsys):
    with pytest.raises(SystemExit) as e:
        memplan_cli.cli(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "id,lower,upper,size" in text and "[lower, upper)" in text and "offset" in text


def test_module_runs_as_a_script(tmp_path):
    path = _write(tmp_path, "id,lower,upper,size\na,0,10,4\n")
    run = subprocess.run([sys.executable, "-m", "hetflow.memplan_cli", str(path), "--method", "greedy"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "peak:        4" in run.stdout


# ---------------------------------------------------------------- properties

@st.composite
def problems(draw, max_buffers=14):
    n = draw(st.integers(1, max_buffers))
    bufs = []
    for i in range(n):
        lo = draw(st.integers(0, 12))
        up = draw(st.integers(lo + 1, lo + 8))
        size = draw(st.integers(0, 40))
        bufs.append(Buffer(f"b{i}", lo, up, size))
    return bufs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from([1, 1, 4]))
def test_property_plans_are_valid_and_ordered(bufs, alignment):
    lb = lower_bound(bufs)
    greedy = solve(bufs, method="greedy", alignment=alignment)
    exact = solve(bufs, method="exact", alignment=alignment, time_limit_s=5)
    for plan in (greedy, exact):
        check_plan(bufs, plan, alignment=alignment)
        assert plan.peak >= lb
    assert exact.peak <= greedy.peak


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_buffers=10))
def test_property_exact_fits_what_cpsat_fits(bufs):
    cp = solve(bufs, method="cpsat", time_limit_s=5)
    check_plan(bufs, cp)
    plan = solve(bufs, capacity=cp.peak, time_limit_s=5)
    check_plan(bufs, plan, capacity=cp.peak)
    if cp.optimal:
        exact = solve(bufs, time_limit_s=5)
        assert exact.peak == cp.peak


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_buffers=10), st.integers(0, 30))
def test_property_capacity_answers_are_consistent(bufs, slack):
    cap = lower_bound(bufs) + slack
    try:
        plan = solve(bufs, capacity=cap, time_limit_s=5)
    except InfeasibleError as e:
        assert "infeasible at capacity" in str(e)
        cp = solve(bufs, method="cpsat", time_limit_s=5)
        assert cp.peak > cap or not cp.optimal
        return
    check_plan(bufs, plan, capacity=cap)


# ---------------------------------------------------------------- a public instance

@pytest.mark.skipif(not (BENCH / "K.1048576.csv").exists(), reason="benchmark instances not present")
def test_public_instance_fits():
    bufs = read_csv(BENCH / "K.1048576.csv")
    assert len(bufs) == 454
    greedy = solve(bufs, method="greedy")
    assert greedy.peak > 1048576  # greedy does not fit
    plan = solve(bufs, capacity=1048576, time_limit_s=60)
    check_plan(bufs, plan, capacity=1048576)
    assert plan.peak == 1048576 == plan.lower_bound


# ---------------------------------------------------------------- the search alone (no CP-SAT beside it)

from hetflow.passes import memplan_search  # noqa: E402

ENGINES = [False] + ([True] if memplan_search.native_available() else [])


def _fit(bufs, capacity, alignment=1, native=False, stats=None):
    live = [b for b in bufs if b.size > 0]
    found = memplan_search.fit([b.lower for b in live], [b.upper for b in live], [b.size for b in live],
                               capacity, alignment, time_limit=30, workers=1, native=native, stats=stats)
    if found is None:
        return None
    return {b.id: 0 for b in bufs} | {b.id: off for b, off in zip(live, found)}


def _optimum(bufs, alignment):
    cp = solve(bufs, method="cpsat", alignment=alignment, time_limit_s=10)
    return cp.peak if cp.optimal else None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_buffers=12), st.sampled_from([1, 1, 4]))
def test_property_search_alone_fits_the_optimum_and_proves_below_it(bufs, alignment):
    # Every pruning rule (canonical order, dominance, stranded buffers, hatless
    # buffers, identical buffers, the failed-state table) must keep a plan at the
    # optimum and find none below it; CP-SAT does not run beside the search here.
    opt = _optimum(bufs, alignment)
    if opt is None or opt == 0:
        return
    for native in ENGINES:
        plan = _fit(bufs, opt, alignment, native)
        assert plan is not None, f"native={native}: no plan at the optimum {opt}"
        check_plan(bufs, plan, capacity=opt, alignment=alignment)
        assert _fit(bufs, opt - 1, alignment, native) is None, f"native={native}: a plan below the optimum"


@pytest.mark.skipif(len(ENGINES) < 2, reason="no C compiler: only the Python search runs")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_buffers=14), st.integers(0, 12))
@example(bufs=[Buffer(id="b0", lower=0, upper=1, size=0)], slack=1)   # only zero-size buffers: no search runs
def test_property_compiled_and_python_search_walk_the_same_tree(bufs, slack):
    cap = lower_bound(bufs) + slack
    if cap == 0 or not any(b.size for b in bufs):  # answered before any search runs (zero-size buffers take no room)
        return
    results = []
    for native in (False, True):
        stats = {}
        plan = _fit(bufs, cap, 1, native, stats)
        if plan is not None:
            check_plan(bufs, plan, capacity=cap)
        results.append((plan, stats["nodes"], stats["engine"]))
    (py, py_nodes, py_engine), (c, c_nodes, c_engine) = results
    assert (py_engine, c_engine) == ("python", "native")
    assert py == c and py_nodes == c_nodes


def test_native_false_runs_python_and_both_find_the_same_plan_on_a_public_instance():
    path = BENCH / "C.1048576.csv"
    if not path.exists():
        pytest.skip("benchmark instances not present")
    bufs = read_csv(path)
    plans = []
    for native in ENGINES:
        stats = {}
        plan = _fit(bufs, 1048576, 1, native, stats)
        check_plan(bufs, plan, capacity=1048576)
        assert stats["engine"] == ("native" if native else "python")
        plans.append((plan, stats["nodes"]))
    assert all(p == plans[0] for p in plans)


@pytest.mark.skipif(not (BENCH / "I.1048576.csv").exists(), reason="benchmark instances not present")
@pytest.mark.parametrize("native", ENGINES)
def test_search_alone_fits_the_instance_that_needs_a_fresh_order_per_part(native):
    # Instance I thrashes for millions of nodes in a part split off early unless
    # each part is ordered afresh (T from the unplaced buffers' totals).
    bufs = read_csv(BENCH / "I.1048576.csv")
    stats = {}
    plan = _fit(bufs, 1048576, 1, native, stats)
    assert plan is not None and stats["by"] == "search"
    check_plan(bufs, plan, capacity=1048576)


def test_without_a_c_compiler_the_python_search_runs(monkeypatch):
    from hetflow.support import native
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    memplan_search._native_kernel.cache_clear()
    try:
        assert not memplan_search.native_available()
        stats = {}
        plan = _fit(TRICKY, 9, 1, None, stats)
        check_plan(TRICKY, plan, capacity=9)
        assert stats["engine"] == "python"
        with pytest.raises(RuntimeError, match="compiled memplan search is not available"):
            _fit(TRICKY, 9, 1, True)
    finally:
        memplan_search._native_kernel.cache_clear()
