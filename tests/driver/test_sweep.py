"""hetflow sweep without Ray: platform overrides, the grid, a point's row, the table, resuming, plots, the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hetflow
from hetflow.sweep import (Point, SweepError, equal_rows, evaluate_point, grid_points, parse_set, platform_with,
                           run_points)
from hetflow.sweep_table import ResultTable, read_rows

HERE = Path(__file__).resolve().parent
TINY = f"{HERE / 'sweep_models.py'}:tiny"
BROKEN = f"{HERE / 'sweep_models.py'}:broken"
from . import sweep_models  # noqa: E402


def test_set_overrides_platform_fields_with_units():
    platform = platform_with("duplex", [("device.pim.channels", 320), ("memory.hbm.bandwidth", "6.7TB/s"),
                                        ("device.pim.peak.f16", "50 TFLOP/s"), ("sync.flag", "1 us")])
    assert platform.devices["pim"].channels == 320
    assert platform.memories["hbm"].bandwidth == pytest.approx(6.7e12)
    assert platform.devices["pim"].peak["f16"] == pytest.approx(50e12)
    assert platform.sync == pytest.approx(1e-6)
    assert platform_with("duplex").devices["pim"].channels == 160   # the preset itself is untouched


@pytest.mark.parametrize("path, words", [
    ("device.npu.channels", ["'npu'", "device", "valid keys: xpu, pim"]),
    ("device.pim.banks", ["'banks'", "device.pim", "channels", "bandwidth"]),
    ("memory.hbm", ["memory.hbm", "table", "capacity"]),
    ("devices.pim.channels", ["'devices'", "top level", "device"]),
])
def test_unknown_set_path_names_the_path_and_valid_keys(path, words):
    with pytest.raises(SweepError) as error:
        platform_with("duplex", [(path, 1)])
    message = str(error.value)
    assert path in message and all(w in message for w in words), message


def test_set_value_errors_are_the_platform_loaders():
    with pytest.raises(SweepError, match="integer"):
        platform_with("duplex", [("device.pim.channels", "many")])
    with pytest.raises(Exception, match="bandwidth"):
        platform_with("duplex", [("memory.hbm.bandwidth", "3 GiB")])     # a size where a bandwidth goes
    with pytest.raises(SweepError, match="memory.hbm.bandwidth"):        # the study says so before any point runs
        hetflow.sweep(TINY, platform="duplex", set={"memory.hbm.bandwidth": ["3 ms"]}, engine="serial",
                      table="unused.csv", progress=False)


def test_parse_set_reads_numbers_and_keeps_quantities():
    assert parse_set("device.pim.channels=16,32,64") == ("device.pim.channels", [16, 32, 64])
    assert parse_set("memory.lpddr.bandwidth=45GB/s,68GB/s") == ("memory.lpddr.bandwidth", ["45GB/s", "68GB/s"])
    with pytest.raises(SweepError, match="PATH=V1,V2"):
        parse_set("device.pim.channels")


def test_grid_is_the_product_of_the_axes_with_stable_keys():
    points = grid_points([TINY], "duplex", {"device.pim.channels": [80, 160]}, {"width": [32, 64]}, batch=[1, 2, 4],
                         placement=["roofline", "optimal"])
    assert len(points) == 2 * 2 * 3 * 2
    assert len({p.key for p in points}) == len(points)
    again = grid_points([TINY], "duplex", {"device.pim.channels": [80, 160]}, {"width": [32, 64]}, batch=[1, 2, 4],
                        placement=["roofline", "optimal"])
    assert [p.key for p in again] == [p.key for p in points]
    assert Point(TINY, "duplex", args=(("batch", 1),)).key != Point(TINY, "duplex", args=(("batch", 2),)).key


def test_a_point_records_what_was_compiled():
    row = evaluate_point(Point(TINY, "duplex", (("device.pim.bandwidth", "13.4 TB/s"),), (("batch", 4),),
                               placement="optimal"))
    assert row["status"] == "ok", row.get("error")
    assert row["makespan_us"] > 0
    busy = {k: v for k, v in row.items() if k.startswith("busy_us.")}
    assert busy and all(v > 0 for v in busy.values())
    assert sum(v for k, v in row.items() if k.startswith("groups.")) >= 2
    assert any(k.startswith("bytes.") and v > 0 for k, v in row.items())
    assert row["peak_bytes.hbm"] > 0
    assert "CP-SAT" in row["solver"] and row["solver_limit_hit"] is False
    assert row["compile_s"] > 0 and row["set.device.pim.bandwidth"] == "13.4 TB/s" and row["arg.batch"] == 4


def test_a_point_is_deterministic_and_moves_with_its_parameters():
    slow = Point(TINY, "duplex", (("memory.hbm.bandwidth", "0.5 TB/s"), ("device.xpu.bandwidth", "0.5 TB/s"),
                                  ("device.pim.bandwidth", "0.5 TB/s")), (("batch", 8), ("width", 512)))
    fast = Point(TINY, "duplex", (), (("batch", 8), ("width", 512)))
    assert equal_rows(evaluate_point(slow), evaluate_point(slow))
    assert evaluate_point(slow)["makespan_us"] > evaluate_point(fast)["makespan_us"]


def test_simulated_points_sharing_probes_are_not_started_side_by_side():
    from hetflow.sweep import _next_point
    sim = grid_points([TINY], "pim-gpt", {"device.pim.channels": [16, 32]}, {"batch": [1, 2]}, cost_model="sim")
    assert [dict(p.sets)["device.pim.channels"] for p in sim] == [16, 16, 32, 32]
    queue = list(sim)
    running = [_next_point(queue, [])]
    running.append(_next_point(queue, running))
    assert running[1] is sim[2]                             # not the other channels=16 point beside the first
    assert _next_point(queue, running) is sim[1]           # both variants busy: the first of the queue
    analytic = grid_points([TINY], "pim-gpt", batch=[1, 2])
    assert _next_point(list(analytic), analytic[:1]) is analytic[0]   # analytic points share nothing: in order


def test_a_failed_point_is_a_row_and_the_study_goes_on(tmp_path):
    points = grid_points([BROKEN, TINY], "duplex", batch=[1, 2])
    result = run_points(points, tmp_path / "t.csv", engine="serial", progress=False)
    assert [r["status"] for r in result.rows] == ["failed", "failed", "ok", "ok"]
    assert result.failed == 2 and "no model for batch 2" in result.rows[1]["error"]
    assert len(read_rows(tmp_path / "t.csv")) == 4


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_round_trips_and_resumes_without_recomputing(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    markers = tmp_path / "markers"
    markers.mkdir()
    points = grid_points([TINY], "duplex", {"device.pim.channels": [80, 160]}, {"marker_dir": [str(markers)]},
                         batch=[1, 2])
    table = tmp_path / f"t{suffix}"
    first = run_points(points[:2], table, engine="serial", progress=False)
    assert first.computed == 2
    result = run_points(points, table, engine="serial", progress=False)
    assert (result.computed, result.reused) == (2, 2)
    assert sweep_models.started(markers) == {"1_64": 2, "2_64": 2}   # each point once: 2 channel counts each
    rows = read_rows(table)
    assert sorted(r["point"] for r in rows) == sorted(p.key for p in points)
    written = {r["point"]: r for r in result.rows}
    assert all(equal_rows(r, written[r["point"]]) for r in rows)


def test_journal_keeps_rows_the_table_has_not_taken_yet(tmp_path):
    table = ResultTable(tmp_path / "t.csv")
    table.write()
    row = evaluate_point(Point(TINY, "duplex"))
    table._last_write = time.monotonic()        # within the second: the row is in the journal only
    table.add(row)
    assert not read_rows(tmp_path / "t.csv")
    with open(table.journal, "a") as f:
        f.write('{"point": "cut-by-a-ki')       # a line a kill cut short is dropped
    assert list(ResultTable(tmp_path / "t.csv").rows) == [row["point"]]


def test_interrupted_study_resumes_from_its_table(tmp_path):
    """A study killed (SIGKILL, the hardest stop) in the middle resumes: the points it finished are not started
    again, and the table ends with every point once."""
    markers = tmp_path / "markers"
    markers.mkdir()
    table = tmp_path / "study.parquet"
    pytest.importorskip("pyarrow")
    command = [sys.executable, "-m", "hetflow.cli", "sweep", TINY, "--platform", "duplex", "--batch", "1,2,3,4,5,6",
               "--arg", "sleep=0.4", "--arg", f"marker_dir={markers}", "--serial", "--quiet", "-o", str(table)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = table.with_name(table.name + ".rows.jsonl")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _rows_on_disk(table, journal) < 2:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished_before = {r["arg.batch"] for r in _rows(table, journal)}
    assert 2 <= len(finished_before) < 6
    starts_before = sweep_models.started(markers)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{len(finished_before)} from the table" in done.stdout
    rows = read_rows(table)
    assert sorted(r["arg.batch"] for r in rows) == [1, 2, 3, 4, 5, 6]
    assert len({r["point"] for r in rows}) == 6 and all(r["status"] == "ok" for r in rows)
    starts = sweep_models.started(markers)
    for batch in finished_before:
        assert starts[f"{batch}_64"] == 1, f"batch {batch} was finished before the kill and started again"
    assert sum(starts.values()) - sum(starts_before.values()) == 6 - len(finished_before)


def _rows(table: Path, journal: Path) -> list[dict]:
    rows = {r["point"]: r for r in read_rows(table)} if table.exists() else {}
    if journal.exists():
        for line in journal.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows.setdefault(row["point"], row)
    return list(rows.values())


def _rows_on_disk(table: Path, journal: Path) -> int:
    try:
        return len(_rows(table, journal))
    except Exception:   # the table mid-rename: look again
        return 0


def test_pareto_front_keeps_points_no_other_beats():
    from hetflow.sweep_plot import pareto_front
    points = [(1, 10), (2, 5), (2, 7), (3, 6), (4, 1), (5, 1)]
    assert pareto_front(points) == [(1, 10), (2, 5), (4, 1)]


def test_plot_writes_the_pareto_front_and_a_heatmap(tmp_path):
    from hetflow.sweep_plot import numeric
    points = grid_points([TINY], "duplex", {"device.pim.bandwidth": ["3.4TB/s", "13.4 TB/s"]}, batch=[1, 8])
    run_points(points, tmp_path / "t.csv", engine="serial", progress=False)
    assert numeric("3.4TB/s") == pytest.approx(3.4e12) and numeric("16 GiB") == 16 * 1024**3
    from hetflow.cli import main
    assert main(["sweep", "plot", str(tmp_path / "t.csv"), "--cost", "device.pim.bandwidth", "--maximise-cost",
                 "--heatmap", "device.pim.bandwidth,batch", "-o", str(tmp_path / "plots")]) == 0
    for name in ("pareto.png", "heatmap.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_names_a_missing_column(tmp_path, capsys):
    run_points(grid_points([TINY], "duplex"), tmp_path / "t.csv", engine="serial", progress=False)
    from hetflow.cli import main
    assert main(["sweep", "plot", str(tmp_path / "t.csv"), "--cost", "banks", "-o", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert "no column 'banks'" in error and "makespan_us" in error


def test_cli_sweep_serial_prints_a_summary(tmp_path, capsys):
    from hetflow.cli import main
    assert main(["sweep", TINY, BROKEN, "--platform", "duplex", "--set", "device.pim.channels=80,160", "--serial",
                 "--quiet", "-o", str(tmp_path / "s.csv")]) == 0
    out = capsys.readouterr().out
    assert "4 points (4 computed, 0 from the table, 2 failed)" in out and "no model for batch 1" in out
    assert main(["sweep", TINY, "--platform", "duplex", "--set", "device.pim.bank=1", "--serial",
                 "-o", str(tmp_path / "s.csv")]) == 1
    assert "valid keys" in capsys.readouterr().err


def test_without_ray_one_line_says_what_to_install(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(SweepError, match=r"pip install 'hetflow\[sweep\]'"):
        hetflow.sweep(TINY, platform="duplex", table=tmp_path / "t.csv", progress=False)


def test_hetflow_sweep_is_callable_and_the_module():
    import hetflow.sweep as module
    assert callable(hetflow.sweep) and hetflow.sweep is module and callable(module.sweep)


def test_onnx_model_args_fix_its_dim_params(tmp_path):
    import onnx
    from ..onnx_models import mlp_model
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(batch="batch"), path)
    rows = run_points(grid_points(str(path), "duplex", batch=[1, 8]), tmp_path / "t.csv", engine="serial",
                      progress=False).rows
    assert [r["status"] for r in rows] == ["ok", "ok"], [r.get("error") for r in rows]
    assert rows[1]["peak_bytes.hbm"] == 8 * rows[0]["peak_bytes.hbm"]
