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
