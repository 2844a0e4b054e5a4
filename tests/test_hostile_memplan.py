"""Hostile inputs to the memory planner (issue #13): malformed or oversized MiniMalloc CSVs,
values past 2**62, and a problem of thousands of buffers."""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetflow.cli import main as hetflow_main
from hetflow.ir.errors import HetflowError
from hetflow.memplan_cli import read_problem_csv
from hetflow.passes import memplan_search
from hetflow.passes.memplan import Buffer, InfeasibleError, MemplanInputError, check_plan, solve

HEADER = "id,lower,upper,size\n"
# Greedy by size peaks at 10 here, the optimum is the lower bound 9 (as in test_memplan's TRICKY).
TRICKY = [Buffer("a", 1, 5, 3), Buffer("b", 4, 5, 3), Buffer("c", 4, 5, 3), Buffer("d", 3, 4, 4)]


@pytest.mark.parametrize("data, fragments", [
    (HEADER + "a,0,10,-4\n", ["p.csv:2", "'a'", "negative size -4"]),
    (HEADER + "a,0,10,4\nb,7,7,1\n", ["p.csv:3", "'b'", "upper 7 <= lower 7"]),
    (HEADER + "a,9,3,1\n", ["p.csv:2", "'a'", "upper 3 <= lower 9"]),
    (HEADER + "a,0,ten,4\n", ["p.csv:2", "upper 'ten' is not an integer"]),
    (HEADER + "a,0,1.5,4\n", ["p.csv:2", "upper '1.5' is not an integer"]),
    (HEADER + "a,0,1_0,4\n", ["p.csv:2", "upper '1_0' is not an integer"]),
    (HEADER + "a,0,\u0661\u0662,4\n", ["p.csv:2", "is not an integer"]),  # Arabic-Indic digits
    (HEADER + "a,0,,4\n", ["p.csv:2", "upper '' is not an integer"]),
    (HEADER + "a,0,1,4\na,2,3,4\n", ["p.csv:3", "duplicate id 'a' (first on line 2)"]),
    ("id,lower,size\na,0,4\n", ["p.csv:1", "missing column(s) upper"]),
    ("id,lower,upper,size,size\na,0,1,2,3\n", ["p.csv:1", "size appear more than once"]),
    ("", ["p.csv:1", "empty file"]),
    ("\n \n\n", ["p.csv:1", "empty file"]),
    (HEADER + "a,0,1\n", ["p.csv:2", "3 fields, expected 4"]),
    (HEADER + ",0,1,2\n", ["p.csv:2", "empty id"]),
    (HEADER + 'a,0,1,"2\n3"\n', ["p.csv:3", "size '2\\n3' is not an integer"]),  # a quoted newline
    (HEADER.encode() + b"a,0,1,\xff\xfe\n", ["p.csv:2", "not UTF-8", "0xff"]),
    (HEADER + "a,0,1," + "9" * 200_000 + "\n", ["p.csv:2", "not valid CSV", "field larger than field limit"]),
    (HEADER + f"a,0,1,{'9' * 6000}\n", ["p.csv:2", "'a'", "size 999", "beyond the limit 2**62"]),
])
def test_bad_csv_is_one_line_naming_the_row(data, fragments):
    with pytest.raises(MemplanInputError) as info:
        read_problem_csv(data, name="p.csv")
    message = str(info.value)
    assert "\n" not in message
    assert len(message) < 300, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("column, row", [
    ("size", "big,0,10,9223372036854775808"),  # 2**63
    ("size", "big,0,10,4611686018427387905"),  # 2**62 + 1
    ("lower", "big,-9223372036854775809,10,1"),
    ("upper", "big,0,18446744073709551616,1"),  # 2**64
])
def test_values_past_2_62_are_refused_naming_the_buffer_and_the_value(column, row):
    with pytest.raises(MemplanInputError) as info:
        read_problem_csv(HEADER + row + "\n", name="p.csv")
    value = row.split(",")[("id", "lower", "upper", "size").index(column)]
    message = str(info.value)
    assert "\n" not in message
    assert "p.csv:2" in message and "'big'" in message and f"{column} {value}" in message, message


def test_2_62_itself_is_taken_and_planned_by_greedy_with_a_note():
    top = 1 << 62
    buffers = read_problem_csv(HEADER + f"a,0,10,{top}\nb,5,20,{top}\nc,-{top},{top},1\n")
    assert [b.size for b in buffers] == [top, top, 1]
    plan = solve(buffers, time_limit_s=1)
    check_plan(buffers, plan)
    assert plan.peak == plan.lower_bound == 2 * top + 1  # Python integers: past int64, still exact


def test_solve_refuses_oversized_and_non_integer_buffers():
    with pytest.raises(MemplanInputError, match=r"buffer 'x': size 9223372036854775808 is beyond the limit"):
        solve([Buffer("x", 0, 1, 1 << 63)])
    with pytest.raises(MemplanInputError, match=r"buffer 'x': lower 0.5 is not an integer"):
        solve([Buffer("x", 0.5, 1, 4)])
    with pytest.raises(ValueError, match="time limit"):
        solve([Buffer("x", 0, 1, 4)], time_limit_s=float("inf"))


def test_the_exact_search_skips_numbers_past_its_limit_and_says_so():
    unit = 1 << 59  # TRICKY scaled past 2**60, and made coprime so that no common unit scales it back
    buffers = [Buffer(b.id, b.lower, b.upper, b.size * unit + (b.id == "d")) for b in TRICKY]
    plan = solve(buffers, time_limit_s=1)
    check_plan(buffers, plan)
    assert plan.method == "greedy" and plan.peak > plan.lower_bound
    assert "exact search was skipped" in plan.note and "2**60" in plan.note, plan.note
    scaled = [Buffer(b.id, b.lower, b.upper, b.size * unit) for b in TRICKY]  # a common unit of 2**59 bytes
    assert solve(scaled, time_limit_s=1).peak == 9 * unit


def _cli_lines(argv, capsys):
    code = hetflow_main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("data, fragment", [
    (HEADER + "a,0,10,9223372036854775808\n", "size 9223372036854775808"),
    (HEADER.encode() + b"a,0,\x80,1\n", "not UTF-8"),
    (b"", "empty file"),
    (HEADER + "a,0,1,2\na,0,1,2\n", "duplicate id"),
])
def test_hetflow_memplan_on_bad_input_exits_1_with_one_line(tmp_path, capsys, data, fragment):
    path = tmp_path / "bad.csv"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    code, lines = _cli_lines(["memplan", str(path)], capsys)
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("hetflow: error: ") and "bad.csv:" in lines[0], lines
    assert fragment in lines[0] and "Traceback" not in lines[0]


def test_hetflow_memplan_unwritable_output_is_one_line(tmp_path, capsys):
    path = tmp_path / "p.csv"
    path.write_text(HEADER + "a,0,1,2\n")
    code, lines = _cli_lines(["memplan", str(path), "-o", str(tmp_path / "no" / "such" / "dir.csv")], capsys)
    assert code == 1 and len(lines) == 1 and "cannot write the plan" in lines[0], lines


def _many(n, seed=0):
    rng = random.Random(seed)
    buffers = []
    for i in range(n):
        lower = rng.randrange(0, 4 * n)
        buffers.append(Buffer(f"b{i}", lower, lower + rng.randrange(1, 200), rng.randrange(1, 1 << 20)))
    return buffers


def test_six_thousand_buffers_solve():
    buffers = _many(6000)
    plan = solve(buffers, time_limit_s=2)
    check_plan(buffers, plan)
    assert plan.peak <= plan.greedy_peak and plan.peak >= plan.lower_bound


def test_the_sparse_tables_match_the_dense_ones():
    import numpy as np
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 40))
        lowers = rng.integers(-5, 30, n)
        uppers = lowers + rng.integers(1, 15, n)
        inst = memplan_search._Instance(lowers, uppers, rng.integers(0, 100, n), 1000, 1)
        slo, shi = inst.slo, inst.shi
        dense = (slo[:, None] < shi[None, :]) & (slo[None, :] < shi[:, None])
        np.fill_diagonal(dense, False)
        assert (inst.adj == dense).all()
        assert memplan_search._overlapping_pairs(lowers, uppers) == dense.sum() // 2
        start, members = inst.section_members()
        for s in range(inst.S):
            assert members[start[s]:start[s + 1]].tolist() == np.flatnonzero(inst.member[s]).tolist()


def test_too_many_overlapping_pairs_keep_greedy_and_say_so(monkeypatch):
    assert solve(TRICKY, time_limit_s=1).peak == 9
    monkeypatch.setattr(memplan_search, "MAX_PAIRS", 6)  # TRICKY has 4 pairs: 8 neighbour entries
    plan = solve(TRICKY, time_limit_s=1)
    check_plan(TRICKY, plan)
    assert plan.method == "greedy" and plan.peak == 10 and not plan.optimal
    assert "exact search was skipped (4 pairs of buffers live at the same time" in plan.note, plan.note
    with pytest.raises(InfeasibleError, match="no plan found within capacity 9 by greedy"):
        solve(TRICKY, capacity=9, time_limit_s=1)


def test_the_python_search_has_its_own_limit(monkeypatch):
    monkeypatch.setattr(memplan_search, "PYTHON_MAX_CELLS", 10)
    lowers, uppers, sizes = zip(*[(b.lower, b.upper, b.size) for b in TRICKY])
    assert "too many for the Python search" in memplan_search.too_large(lowers, uppers, sizes, 9, native=False)
    with pytest.raises(memplan_search.TooLarge):
        memplan_search.fit(lowers, uppers, sizes, 9, native=False)


# ---------------------------------------------------------------- fuzz

def _reads_or_says_why(data):
    try:
        buffers = read_problem_csv(data, name="fuzz.csv")
    except MemplanInputError as e:
        assert isinstance(e, HetflowError)
        assert "\n" not in str(e) and str(e).startswith("fuzz.csv:"), str(e)
        return
    for b in buffers:
        assert b.size >= 0 and b.lower < b.upper and max(abs(b.lower), abs(b.upper), b.size) <= 1 << 62


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_any_bytes(data):
    _reads_or_says_why(data)
    _reads_or_says_why(HEADER.encode() + data)


_FIELD = st.one_of(
    st.integers(-(1 << 70), 1 << 70).map(str),
    st.sampled_from(["", " ", "-", "+", "0x10", "1e3", "1_000", "nan", "\u0663", '"', '""', "\x00", "a,b"]),
    st.text(max_size=8),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(_FIELD, min_size=0, max_size=6), max_size=8),
       st.sampled_from(["\n", "\r\n", "\r"]),
       st.permutations(["id", "lower", "upper", "size"]))
def test_fuzz_csv_like_text(rows, newline, header):
    text = ",".join(header) + newline + newline.join(",".join(r) for r in rows)
    _reads_or_says_why(text)
    _reads_or_says_why(text.encode("utf-8", "surrogatepass"))
