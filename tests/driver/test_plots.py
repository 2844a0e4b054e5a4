"""Plots of a placed graph: the roofline and Gantt PNGs, and the Chrome/Perfetto trace of the predicted timeline."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import time

import pytest

from hetflow.passes.schedule import Event, Schedule
from hetflow.platform import load_platform
from hetflow.plots import chrome_trace, dominant_dtype, gantt_plot, write_plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def placed():
    """GPT-2 (small default config) placed on mobile-soc by the optimal policy: (costs, platform, schedule)."""
    from hetflow.examples.models import build_gpt2
    from hetflow.frontends.torch import capture_module
    from hetflow.passes import CompileOptions
    from hetflow.pipeline import run_pipeline

    model, example = build_gpt2()
    graph = capture_module(model, example).graph
    options = CompileOptions(platform="mobile-soc", placement="optimal")
    run_pipeline(graph, options=options)
    report, schedule = options.results["placement"], options.results["schedule"]
    return report.costs, load_platform(report.platform), schedule


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def check_png(path, min_w=600, min_h=250):
    width, height = png_size(path)
    assert min_w <= width <= 4000 and min_h <= height <= 4000, (width, height)
    import matplotlib.image
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.01, "blank image"


def test_write_plots(placed, tmp_path):
    costs, platform, schedule = placed
    assert dominant_dtype(costs) == "f32"
    paths = write_plots(tmp_path / "plots", costs, platform.name, schedule)  # a preset's name or a Platform
    assert [p.name for p in paths] == ["roofline.png", "timeline.png", "trace.json"]
    check_png(paths[0], min_h=450)
    check_png(paths[1])
    trace = json.loads(paths[2].read_text())
    assert trace["displayTimeUnit"] == "ns"


def test_trace_matches_schedule(placed, tmp_path):
    costs, platform, schedule = placed
    path = chrome_trace(schedule, tmp_path / "trace.json", devices=list(platform.devices))
    events = json.loads(path.read_text())["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == len(schedule.events)
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    processes = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert list(processes) == [1] and processes[1].startswith("predicted")
    assert set(platform.devices) <= set(threads.values())
    for x, ev in zip(complete, schedule.events):
        assert x["name"] == ev.name and x["pid"] == 1 and threads[(1, x["tid"])] == ev.device
        assert x["ts"] == pytest.approx(ev.start * 1e6)
        assert x["dur"] == pytest.approx((ev.end - ev.start) * 1e6)
        assert x["args"]["kind"] == ev.kind and x["args"]["flops"] == ev.flops and x["args"]["bytes"] == ev.bytes


def test_trace_with_measured_timeline(placed, tmp_path):
    _, _, schedule = placed
    measured = [dict(e.as_dict(), start_us=e.start * 2e6, end_us=e.end * 2e6) for e in schedule.events]
    events = json.loads(chrome_trace(schedule, tmp_path / "t.json", measured=measured).read_text())["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert processes == {1: f"predicted ({schedule.platform}, modelled)", 2: "measured"}
    by_pid = {pid: [e for e in events if e["ph"] == "X" and e["pid"] == pid] for pid in (1, 2)}
    assert len(by_pid[1]) == len(by_pid[2]) == len(schedule.events)
    for p, m in zip(by_pid[1], by_pid[2]):
        assert m["dur"] == pytest.approx(2 * p["dur"])


def test_trace_puts_a_simulated_partition_on_its_device_track_for_its_modelled_time(placed, tmp_path):
    _, _, schedule = placed
    measured = [{"name": "npu/part1.npu.json", "device": "npu", "start_us": 10.0, "end_us": 5010.0, "kind": "npu",
                 "ops": "", "flops": 0, "bytes": 0, "modelled_us": 42.0},
                {"name": "cpu/part0.onnx", "device": "cpu", "start_us": 0.0, "end_us": 10.0, "kind": "cpu",
                 "ops": "", "flops": 0, "bytes": 0}]
    events = json.loads(chrome_trace(schedule, tmp_path / "t.json", measured=measured).read_text())["traceEvents"]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    bars = {(threads[(2, e["tid"])], e["name"]): e for e in events if e["ph"] == "X" and e["pid"] == 2}
    on_device = bars[("npu", "npu/part1.npu.json")]
    assert on_device["dur"] == pytest.approx(42.0) and on_device["args"]["time"] == "modelled"
    host = bars[("npu simulator (host wall time)", "npu/part1.npu.json")]
    assert host["dur"] == pytest.approx(5000.0) and host["args"]["time"].startswith("measured")
    assert bars[("cpu", "cpu/part0.onnx")]["args"]["time"] == "measured"
    processes = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert processes[2] == "measured (simulated devices: modelled)"


def test_gantt_thousands_of_events_with_links(tmp_path):
    kinds = ["contraction", "attention", "reduction", "elementwise", "expert", "Softmax"]
    clocks = {"cpu": 0.0, "gpu": 0.0, "npu": 0.0, "link:pcie": 0.0}
    events = []
    for i in range(4000):
        device = list(clocks)[i % 4]
        kind = "transfer" if device.startswith("link:") else kinds[i % len(kinds)]
        start, duration = clocks[device], 1e-6 * (1 + i % 7)
        events.append(Event(f"n{i}", device, start, start + duration, kind, "MatMul", 100, 100))
        clocks[device] = start + 1.3 * duration
    t0 = time.perf_counter()
    path = gantt_plot(Schedule("synthetic", events), tmp_path / "big.png", title="synthetic")
    assert time.perf_counter() - t0 < 10
    check_png(path)


def test_empty_schedule(tmp_path):
    check_png(gantt_plot(Schedule("none"), tmp_path / "empty.png", devices=["cpu"]), min_w=300, min_h=100)
    trace = json.loads(chrome_trace(Schedule("none"), tmp_path / "empty.json").read_text())
    assert [e for e in trace["traceEvents"] if e["ph"] == "X"] == []


def test_import_hetflow_does_not_load_matplotlib():
    code = "import sys, hetflow, hetflow.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
