"""Calibration of the host's cost model: the fit recovers known parameters; the platform takes them."""
from __future__ import annotations

import tomllib
from importlib.resources import files

import numpy as np
import pytest

from hetflow.calibrate import CALLS, LAUNCHES, OP_LAUNCHES, fit, predict
from hetflow.calibrate import _apply_calibration
from hetflow.platform import platform_from_dict


def _samples(peak, bandwidth, launch, op_launch, call, seed=0):
    """Six synthetic models: compute-bound, memory-bound and many-small-op mixes, timed by the model itself."""
    rng = np.random.default_rng(seed)
    samples = []
    for kind in ("gemm", "stream", "tiny", "mixed", "gemm", "tiny"):
        n = int(rng.integers(20, 200))
        if kind == "gemm":
            groups = [(float(rng.uniform(1e8, 1e9)), float(rng.uniform(1e5, 1e6)), 3) for _ in range(n)]
        elif kind == "stream":
            groups = [(float(rng.uniform(1e5, 1e6)), float(rng.uniform(5e6, 3e7)), 2) for _ in range(n)]
        elif kind == "tiny":
            groups = [(1e3, 4e3, int(rng.integers(1, 12))) for _ in range(n)]
        else:
            groups = [(float(rng.uniform(0, 5e8)), float(rng.uniform(0, 1e7)), int(rng.integers(1, 20)))
                      for _ in range(n)]
        samples.append({"groups": groups, "measured": predict(groups, peak, bandwidth, launch, op_launch, call)})
    return samples


@pytest.mark.parametrize("launch,op_launch,call", [(LAUNCHES[3], OP_LAUNCHES[2], CALLS[4]),
                                                   (LAUNCHES[0], OP_LAUNCHES[5], CALLS[0])])
def test_fit_recovers_the_parameters_that_timed_the_samples(launch, op_launch, call):
    peak, bandwidth = np.logspace(9, 12.5, 80)[50], np.logspace(9, 11.7, 70)[40]
    fitted = fit(_samples(peak, bandwidth, launch, op_launch, call))
    assert fitted["gemm_flops"] == pytest.approx(peak, rel=0.12)
    assert fitted["memory_bandwidth"] == pytest.approx(bandwidth, rel=0.12)
    assert fitted["launch"] == pytest.approx(launch, abs=2e-6)
    assert fitted["op_launch"] == pytest.approx(op_launch, abs=1e-6)
    assert fitted["call_overhead"] == pytest.approx(call, abs=30e-6)


def test_calibration_reaches_the_cost_model():
    data = tomllib.loads(files("hetflow.platform").joinpath("presets/host.toml").read_text())
    calibration = {"gemm_flops": 1e11, "memory_bandwidth": 2e10, "launch": 4e-6, "op_launch": 2e-6,
                   "call_overhead": 1e-4, "when": "now", "fitted_on": []}
    platform = platform_from_dict(_apply_calibration(data, calibration), "host")
    assert platform.call_overhead == pytest.approx(1e-4)
    cpu = platform.devices["cpu"]
    assert cpu.measured and cpu.peak["f32"] == 1e11 and cpu.bandwidth == 2e10
    assert cpu.launch_for(1) == pytest.approx(6e-6)
    assert cpu.launch_for(10) == pytest.approx(24e-6)


def test_the_call_overhead_delays_the_timeline():
    """Nothing starts before the runtime's entry cost; the makespan includes it."""
    import dataclasses
    import hetflow
    from hetflow.examples.mlp import build
    from hetflow.passes.schedule import simulate
    module, inputs = build()
    compiled = hetflow.compile(module, inputs, platform="host")
    base = dataclasses.replace(compiled.platform, call_overhead=0.0)
    delayed = dataclasses.replace(compiled.platform, call_overhead=1e-3)
    a, b = simulate(compiled.graph, base), simulate(compiled.graph, delayed)
    assert min(e.start for e in b.events) >= 1e-3
    assert b.makespan == pytest.approx(a.makespan + 1e-3)


def test_the_gpu_grid_recovers_a_gpu_s_figures():
    from hetflow.calibrate import GPU_GRID
    peak, bandwidth = np.logspace(*GPU_GRID["peaks"])[100], np.logspace(*GPU_GRID["bandwidths"])[85]
    assert peak > 1e13 and bandwidth > 1e12                       # tens of TFLOP/s, TB/s: the host's grid ends lower
    samples = _samples(peak, bandwidth, LAUNCHES[3], OP_LAUNCHES[1], CALLS[2])
    for sample in samples:   # a GPU's groups are larger: scale the work so both roofs are reached
        sample["groups"] = [(f * 1e3, b * 1e2, ops) for f, b, ops in sample["groups"]]
        sample["measured"] = predict(sample["groups"], peak, bandwidth, LAUNCHES[3], OP_LAUNCHES[1], CALLS[2])
    fitted = fit(samples, GPU_GRID)
    assert fitted["gemm_flops"] == pytest.approx(peak, rel=0.12)
    assert fitted["memory_bandwidth"] == pytest.approx(bandwidth, rel=0.12)
    assert fitted["launch"] == pytest.approx(LAUNCHES[3], abs=2e-6)


def test_host_cuda_takes_the_fitted_figures_over_the_peak_measurement():
    from hetflow.calibrate import _add_cuda
    data = tomllib.loads(files("hetflow.platform").joinpath("presets/host.toml").read_text())
    gpu = {"name": "a GPU", "when": "then", "f32_flops": 50e12, "f16_flops": 400e12, "memory_bandwidth": 4e12,
           "pcie_bandwidth": 25e9, "memory_bytes": 80 << 30}
    peak_only = platform_from_dict(_add_cuda(data, gpu, ("MatMul",), ("f32",)), "host+cuda").devices["gpu"]
    assert peak_only.peak["f32"] == 50e12 and "not calibrated" in peak_only.source
    gpu["fitted"] = {"gemm_flops": 20e12, "memory_bandwidth": 2.5e12, "launch": 8e-6, "op_launch": 1e-6,
                     "call_overhead": 60e-6, "when": "now", "fitted_on": []}
    platform = platform_from_dict(_add_cuda(data, gpu, ("MatMul",), ("f32",)), "host+cuda")
    fitted = platform.devices["gpu"]
    assert fitted.peak["f32"] == 20e12 and fitted.peak["f16"] == pytest.approx(160e12)   # f16 scaled alike
    assert fitted.bandwidth == 2.5e12 and platform.memories["hbm"].bandwidth == 2.5e12
    assert fitted.launch_for(3) == pytest.approx(11e-6) and platform.call_overhead == pytest.approx(60e-6)
    assert "fitted to timed runs" in fitted.source


def _mlp_builder(width: int, hidden: int, rows: int):
    """A calibration-suite entry: an MLP width -> hidden -> width (seeded) and a [rows, width] input."""
    def make():
        import torch
        from hetflow.examples import mlp
        torch.manual_seed(0)
        return mlp.MLP(width, hidden, width).eval(), (torch.randn(rows, width),)
    return make


def test_fit_to_runs_times_the_suite_on_the_devices_and_fits_it(monkeypatch):
    """The routine host+cuda calibration runs on the GPU, run here on the CPU: four small models compiled onto
    the given devices, timed in rounds, fitted (no assertion on the times themselves: they are this machine's)."""
    from hetflow import calibrate
    from hetflow.platform import load_platform
    build = lambda width: _mlp_builder(width, 2 * width, 32)   # noqa: E731
    monkeypatch.setattr(calibrate, "suite", lambda: {f"mlp{w}": build(w) for w in (32, 128, 256, 512)})
    lines = []
    result = calibrate.fit_to_runs(load_platform("host"), ["cpu"], calibrate.HOST_GRID, lines.append,
                                   repeats=3, rounds=1)
    assert [s["model"] for s in result["fitted_on"]] == ["mlp32", "mlp128", "mlp256", "mlp512"]
    assert any("timed round 1 of 1" in line for line in lines)
    for sample in result["fitted_on"]:
        assert len(sample["rounds"]) == 1 and sample["measured"] > 0 and sample["predicted"] > 0
        assert "groups" not in sample                                   # the fit's inputs are not kept
    grid = np.logspace(*calibrate.HOST_GRID["peaks"])
    assert grid[0] <= result["gemm_flops"] <= grid[-1] and result["launch"] in LAUNCHES
    monkeypatch.setattr(calibrate, "suite", lambda: {"mlp32": build(32)})
    with pytest.raises(calibrate.CalibrationError, match="at least four models"):
        calibrate.fit_to_runs(load_platform("host"), ["cpu"], calibrate.HOST_GRID, lines.append, 1, 1)


def test_host_cuda_calibration_without_a_gpu_is_one_clear_line(capsys):
    from hetflow.cli import main
    from hetflow.runtime.runners.cuda import cuda_available
    if cuda_available():
        pytest.skip("this machine has a CUDA GPU: the calibration would run (pytest -m gpu covers the GPU)")
    assert main(["calibrate", "--platform", "host+cuda"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hetflow: error:") and "CUDA GPU" in err[-1] and "torch sees none" in err[-1]


def _cuda() -> bool:
    from hetflow.runtime.runners.cuda import cuda_available
    return cuda_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU (run pytest -m gpu on a machine with one)")
def test_host_cuda_calibration_fits_the_gpu_and_host_cuda_uses_it(monkeypatch, tmp_path):
    """On a machine with a CUDA GPU (pytest -m gpu): four MLPs compiled onto the GPU alone, timed and fitted;
    host+cuda then carries the fit."""
    from hetflow import calibrate
    from hetflow.platform import load_platform
    monkeypatch.setenv("HETFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "suite",
                        lambda: {f"mlp{w}": _mlp_builder(w, 4 * w, 256) for w in (256, 1024, 2048, 4096)})
    result = calibrate.calibrate_cuda(repeats=5, rounds=2)
    assert [s["model"] for s in result["fitted"]["fitted_on"]] == ["mlp256", "mlp1024", "mlp2048", "mlp4096"]
    gpu = load_platform("host+cuda").devices["gpu"]
    assert "fitted to timed runs" in gpu.source and gpu.peak["f32"] == result["fitted"]["gemm_flops"]
