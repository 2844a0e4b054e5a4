"""hetflow sweep on Ray: embedded Ray gives the serial rows; a Ray worker killed mid-study is retried and
the table has every point once; Tune's random search computes no point twice. One Ray session (2 CPUs)
is shared by the module's tests."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the sweep's Ray engine needs ray: pip install 'hetflow[sweep]'")
pytest.importorskip("pyarrow", reason="the sweep's Parquet table needs pyarrow: pip install 'hetflow[sweep]'")

from hetflow.sweep import equal_rows, grid_points, run_points  # noqa: E402
from hetflow.sweep_table import read_rows  # noqa: E402

HERE = Path(__file__).resolve().parent
TINY = f"{HERE / 'sweep_models.py'}:tiny"
from . import sweep_models  # noqa: E402


@pytest.fixture(scope="module")
def ray_session():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False,
             logging_level="ERROR")
    yield ray
    ray.shutdown()


def test_embedded_ray_gives_the_serial_rows(ray_session, tmp_path):
    points = grid_points([TINY], "duplex", {"device.pim.bandwidth": ["3.4TB/s", "13.4TB/s"]}, batch=[1, 4],
                         placement=["roofline", "optimal"])
    serial = run_points(points, tmp_path / "serial.parquet", engine="serial", progress=False)
    on_ray = run_points(points, tmp_path / "ray.parquet", engine="ray", progress=False)
    assert on_ray.engine.startswith("ray") and on_ray.computed == len(points)
    assert [r["point"] for r in on_ray.rows] == [p.key for p in points]
    assert all(equal_rows(a, b) for a, b in zip(serial.rows, on_ray.rows))
    assert {r["worker"] for r in on_ray.rows}.isdisjoint({r["worker"] for r in serial.rows})  # other processes


def test_a_sim_study_on_ray_gives_the_serial_rows_and_shares_probe_times(ray_session, tmp_path):
    from hetflow.examples.decode_graphs import build_gpt2_decode_step
    from hetflow.api import compile_graph
    from hetflow.simulated_cost import cache_entries, clear_cache
    from hetflow.sweep import Point, _evaluate_on_worker
    points = grid_points([f"{HERE / 'sweep_models.py'}:gpt_decode"], "pim-gpt", args={"context": [16, 32],
                         "tag": [0, 1]}, cost_model="sim")
    serial = run_points(points, tmp_path / "serial.parquet", engine="serial", progress=False)
    on_ray = run_points(points, tmp_path / "ray.parquet", engine="ray", progress=False)
    assert all(r["status"] == "ok" for r in on_ray.rows), [r.get("error") for r in on_ray.rows]
    assert all(equal_rows(a, b) for a, b in zip(serial.rows, on_ray.rows))
    # a task given the study's table runs no simulation it holds: a model no worker has seen (hidden 96),
    # its probes timed here in the driver
    clear_cache()
    compile_graph(build_gpt2_decode_step(layers=1, hidden=96, heads=2, context=24, vocab=50), "pim-gpt",
                  cost_model="sim")
    table = cache_entries()
    point = Point(f"{HERE / 'sweep_models.py'}:gpt_decode", "pim-gpt", (), (("context", 24), ("hidden", 96)),
                  cost_model="sim")
    row, learnt = ray.get(ray.remote(num_cpus=1)(_evaluate_on_worker).remote(point, [ray.put(table)]))
    assert row["status"] == "ok" and row["sim_probes"] == 0 and learnt == {}
    cold, learnt = ray.get(ray.remote(num_cpus=1)(_evaluate_on_worker).remote(
        Point(f"{HERE / 'sweep_models.py'}:gpt_decode", "pim-gpt", (), (("context", 24), ("hidden", 112)),
              cost_model="sim"), [ray.put({})]))
    assert cold["sim_probes"] > 0 and len(learnt) == cold["sim_probes"]   # a model it has not seen: simulated


def test_a_killed_worker_is_retried_and_every_point_is_in_the_table_once(ray_session, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    points = grid_points([TINY], "duplex", args={"sleep": [1.0], "marker_dir": [str(markers)]},
                         batch=[1, 2, 3, 4, 5, 6])
    killed: list[str] = []

    def kill_the_first_worker_that_starts_a_point():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            started = sorted(markers.iterdir(), key=lambda p: p.stat().st_mtime)
            if started:
                killed.append(started[0].name.split(".")[0])
                os.kill(int(started[0].read_text()), signal.SIGKILL)
            time.sleep(0.02)
    killer = threading.Thread(target=kill_the_first_worker_that_starts_a_point)
    killer.start()
    result = run_points(points, tmp_path / "t.parquet", engine="ray", progress=False)
    killer.join()
    assert killed, "no point started within a minute"
    rows = read_rows(tmp_path / "t.parquet")
    assert sorted(r["point"] for r in rows) == sorted(p.key for p in points)   # every point, once
    assert all(r["status"] == "ok" for r in result.rows), [r.get("error") for r in result.rows]
    starts = sweep_models.started(markers)
    assert starts.pop(killed[0]) == 2                      # the killed point: its first try died, Ray retried it
    assert set(starts.values()) == {1}                     # every other point ran once


def test_tune_random_search_draws_the_budget_and_computes_no_point_twice(ray_session, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    from hetflow.sweep import sweep
    result = sweep(TINY, platform="duplex", args={"marker_dir": [str(markers)]}, batch=[1, 2],
                   table=tmp_path / "r.parquet", search="random", budget=4, seed=3, progress=False)
    drawn = {r["arg.batch"] for r in result.rows}
    assert drawn <= {1, 2} and len(result.rows) == len(drawn)
    assert all(count == 1 for count in sweep_models.started(markers).values())   # 4 draws of 2 points: each once
    import signal
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # Tune's Ctrl-C handler is not left behind
    assert len(read_rows(tmp_path / "r.parquet")) == len(drawn)


@pytest.mark.slow
def test_tune_adaptive_search_resumes_from_its_table(ray_session, tmp_path):
    """Optuna's TPE through Tune, seeded: a second run of the same study draws the same points and takes
    every one it drew before from the table."""
    pytest.importorskip("optuna")
    markers = tmp_path / "markers"
    markers.mkdir()
    from hetflow.sweep import sweep
    options = dict(platform="duplex", set={"device.pim.bandwidth": ["1TB/s", "4TB/s", "13.4TB/s"]},
                   args={"marker_dir": [str(markers)], "width": [64, 256]}, batch=[1, 8],
                   table=tmp_path / "a.parquet", search="adaptive", budget=5, seed=1, progress=False)
    first = sweep(TINY, **options)
    again = sweep(TINY, **options)
    assert first.computed >= 1 and again.computed == 0
    assert sorted(r["point"] for r in again.rows) == sorted(r["point"] for r in first.rows)
    assert sum(sweep_models.started(markers).values()) == first.computed == len(first.rows)   # each drawn once
