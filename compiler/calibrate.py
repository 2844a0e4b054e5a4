"""Calibration of the ``host`` platform: this machine's GEMM FLOP/s and memory bandwidth, measured once and cached;
of a platform's simulated devices (their analytic model fitted to the simulators); and of a flash platform's
disk (``calibrate_disk``: read throughput by chunk size and thread count, ``write_disk_platform``).

The cache lives in ``$HETFLOW_CACHE_DIR`` (default ``~/.cache/hetflow``), keyed by
the machine, its core count and the NumPy version; ``hetflow platforms show host``
says when it was measured.
"""
from __future__ import annotations

import json
import os
import platform as py_platform
import time
from pathlib import Path

import numpy as np

from hetflow.ir.errors import HetflowError
from hetflow.support.cache import cache_dir  # noqa: F401  (calibrate.cache_dir is public)




def _key() -> str:
    return f"{py_platform.node()}|{py_platform.machine()}|{os.cpu_count()}|numpy {np.__version__}"


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure() -> dict:
    n = 1024
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    gemm = 2 * n**3 / _median_seconds(lambda: a @ b, 5)
    src = np.ones(32 * 1024 * 1024, np.float32)  # 128 MiB
    dst = np.empty_like(src)
    copy = 2 * src.nbytes / _median_seconds(lambda: np.copyto(dst, src), 5)  # read + write
    return {"gemm_flops": gemm, "memory_bandwidth": copy, "key": _key(),
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def host_calibration(refresh: bool = False) -> dict:
    path = cache_dir() / "host-calibration.json"
    if not refresh and path.exists():
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == _key():
                return cached
        except (json.JSONDecodeError, OSError):
            pass
    result = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    except OSError:
        pass  # a read-only home: measure again next time
    return result


def cuda_calibration() -> dict | None:
    """The CUDA GPU's f32/f16 GEMM FLOP/s, memory and PCIe bandwidth; None without torch or a GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    path = cache_dir() / "cuda-calibration.json"
    name = torch.cuda.get_device_name(0)
    if path.exists():
        try:
            cached = json.loads(path.read_text())
            if cached.get("name") == name and cached.get("key") == _key():
                return cached
        except (json.JSONDecodeError, OSError):
            pass
    device = torch.device("cuda")

    def timed(fn, repeats=10):
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    n = 4096
    a32 = torch.randn(n, n, device=device)
    a16 = a32.half()
    big = torch.empty(256 * 1024 * 1024 // 4, device=device)
    host = torch.empty(64 * 1024 * 1024 // 4, pin_memory=True)
    result = {
        "name": name, "key": _key(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "f32_flops": 2 * n**3 / timed(lambda: a32 @ a32),
        "f16_flops": 2 * n**3 / timed(lambda: a16 @ a16),
        "memory_bandwidth": 2 * big.numel() * 4 / timed(lambda: big.clone()),
        "pcie_bandwidth": host.numel() * 4 / timed(lambda: host.to(device, non_blocking=False)),
        "memory_bytes": torch.cuda.get_device_properties(0).total_memory,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    except OSError:
        pass
    return result


# --- fitting the host's cost model to measured runs ----------------------------------------------------

def suite():
    """Models the calibration measures: different mixes of compute-bound and memory-bound groups.

    The decode steps stream several times more weight bytes than the caches hold (about 160 and 270 MB;
    a smaller one, partly cache-resident, ran at two speeds depending on its neighbours), which pins the
    bandwidth weight streaming reaches apart from the per-op cost; the
    others pin the GEMM rate and the fixed costs. Their GEMMs have the sizes of the models people run
    (hidden 384 to 768, 128 to 197 tokens, convolutions at 160x160): small GEMMs run well below the
    rate of large ones, and a rate fitted on toy sizes would overpredict real models.
    """
    from hetflow.examples import models
    from hetflow.examples.mlp import build as build_mlp
    return {
        "mlp": build_mlp,
        "resnet18@160": lambda: models.build_resnet18(image=160),
        "gpt2-4x768": lambda: models.build_gpt2(n_layer=4, n_embd=768, n_head=12, seq=128, vocab=8192),
        "vit-4x384": lambda: models.build_vit(hidden=384, layers=4, heads=6),
        "bert-4x512": lambda: models.build_bert(hidden=512, layers=4, heads=8, seq=128),
        "gpt2-decode-4x768": lambda: models.build_gpt2_decode(n_layer=4, n_embd=768, n_head=12, context=64,
                                                              vocab=16384),
        "gpt2-decode-6x768": lambda: models.build_gpt2_decode(n_layer=6, n_embd=768, n_head=12, context=64,
                                                              vocab=32000),
    }


def measure_model(compiled, inputs, repeats: int = 10) -> float:
    compiled(*inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        compiled(*inputs)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


CALLS = np.array([0, 25, 50, 75, 100, 150, 200, 300]) * 1e-6
LAUNCHES = np.array([0, 1, 2, 4, 8, 16, 32, 64]) * 1e-6
OP_LAUNCHES = np.array([0, 0.5, 1, 2, 3, 4, 6, 8, 12, 16]) * 1e-6


def predict(groups, peak: float, bandwidth: float, launch: float, op_launch: float, call: float = 0.0) -> float:
    """The one-device host's latency: a fixed cost per call, then the sum over groups of
    max(flops / peak, bytes / bandwidth) + a cost per group + a cost per op in it."""
    return call + sum(max(f / peak, b / bandwidth) + launch + op_launch * ops for f, b, ops in groups)


# the fit's axes, log10 (from, to, points): the host 1 GFLOP/s to 3 TFLOP/s and 1 to 500 GB/s;
# a GPU 0.1 to 3,000 TFLOP/s and 10 GB/s to 16 TB/s
HOST_GRID = {"peaks": (9, 12.5, 80), "bandwidths": (9, 11.7, 70)}
GPU_GRID = {"peaks": (11, 15.5, 120), "bandwidths": (10, 13.2, 100)}


def fit(samples: list[dict], grid: dict = HOST_GRID) -> dict:
    """Peak FLOP/s, bandwidth, per-call, per-node and per-op costs minimising the squared log error of
    predicted latency.

    Each sample: {"groups": [(flops, bytes, ops), ...], "measured": seconds}; ``predict`` is the model.
    A grid search: the model has four parameters and a handful of samples, and a grid cannot wander
    into a negative or absurd value. ``grid``: the peak and bandwidth axes (``HOST_GRID``, ``GPU_GRID``).
    """
    peaks = np.logspace(*grid["peaks"])
    bandwidths = np.logspace(*grid["bandwidths"])
    parts = []
    for sample in samples:
        flops = np.array([g[0] for g in sample["groups"]], np.float64)
        moved = np.array([g[1] for g in sample["groups"]], np.float64)
        compute = flops[None, :] / peaks[:, None]                          # peaks x groups
        memory = moved[None, :] / bandwidths[:, None]                      # bandwidths x groups
        roof = np.maximum(compute[:, None, :], memory[None, :, :]).sum(axis=2)
        parts.append((roof, len(flops), sum(g[2] for g in sample["groups"]), sample["measured"]))
    best = (np.inf, None)
    for call in CALLS:
        for launch in LAUNCHES:
            for op_launch in OP_LAUNCHES:
                error = sum(np.log((roof + call + launch * nodes + op_launch * ops) / measured) ** 2
                            for roof, nodes, ops, measured in parts)
                i, j = np.unravel_index(np.argmin(error), error.shape)
                if error[i, j] < best[0]:
                    best = (error[i, j], (peaks[i], bandwidths[j], launch, op_launch, call))
    peak, bandwidth, launch, op_launch, call = best[1]
    return {"gemm_flops": float(peak), "memory_bandwidth": float(bandwidth), "launch": float(launch),
            "op_launch": float(op_launch), "call_overhead": float(call)}


class CalibrationError(HetflowError):
    """A calibration that cannot run here (no CUDA GPU for host+cuda, too few models placed)."""


def fit_to_runs(platform, devices: list[str] | None, grid: dict, progress=print, repeats: int = 10,
                rounds: int = 5) -> dict:
    """Compile the suite for ``platform`` (placed on ``devices`` only when given), time each model, and fit the
    cost model to the times: the figures, and ``fitted_on`` (each model's measured and predicted seconds).

    The models are timed in ``rounds`` interleaved rounds (each round: every model, ``repeats`` runs,
    their median) and a model's time is the median over rounds: a virtual machine's speed drifts
    between minutes, and models timed one after another would each see a different machine. A model the
    devices cannot run is left out, with a line saying so; fewer than four left is an error.
    """
    import hetflow
    from hetflow.passes.cost import cost_node, inner_nodes
    samples, programs = [], []
    for name, build in suite().items():
        module, inputs = build()
        try:
            compiled = hetflow.compile(module, inputs, platform=platform, devices=devices, cache=False)
        except HetflowError as exc:
            progress(f"  left out {name}: {str(exc).splitlines()[0]}")
            continue
        groups = [(c.flops, c.bytes, len(inner_nodes(c.node))) for c in (cost_node(n, compiled.platform)
                                                                        for n in compiled.graph.nodes)]
        samples.append({"model": name, "groups": groups, "rounds": []})
        programs.append((compiled, inputs))
        progress(f"  compiled {name} ({len(groups)} groups)")
    if len(samples) < 4:
        raise CalibrationError(f"calibration needs at least four models the devices run; {len(samples)} compiled")
    for r in range(rounds):
        for sample, (compiled, inputs) in zip(samples, programs):
            sample["rounds"].append(measure_model(compiled, inputs, repeats))
        progress(f"  timed round {r + 1} of {rounds}")
    for sample in samples:
        sample["measured"] = float(np.median(sample["rounds"]))
        progress(f"  measured {sample['model']}: {sample['measured'] * 1e3:.2f} ms "
                 f"(rounds {', '.join(f'{t * 1e3:.2f}' for t in sample['rounds'])})")
    fitted = fit(samples, grid)
    for sample in samples:
        sample["predicted"] = predict(sample["groups"], fitted["gemm_flops"], fitted["memory_bandwidth"],
                                      fitted["launch"], fitted["op_launch"], fitted["call_overhead"])
        del sample["groups"]
    return {**fitted, "fitted_on": samples}


def calibrate_host(progress=print, repeats: int = 10, rounds: int = 5) -> dict:
    """Measure the suite on the host, fit the cost model, save it as the host calibration; returns the result."""
    from hetflow.platform import load_platform
    fitted = fit_to_runs(load_platform("host"), None, HOST_GRID, progress, repeats, rounds)
    result = {**fitted, "key": _key(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "source": "fitted to measured runs of the calibration models"}
    path = cache_dir() / "host-calibration.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    load_platform.cache_clear()
    return result


def calibrate_cuda(progress=print, repeats: int = 10, rounds: int = 5) -> dict:
    """``hetflow calibrate --platform host+cuda``: the suite compiled onto the CUDA GPU alone and timed there,
    the GPU's achieved GEMM rate, bandwidth and per-call, per-kernel and per-op costs fitted to the times as
    the host's are (``fit_to_runs``), and kept with the GPU's peak measurement: host+cuda uses the fit from
    then on. Without torch or a CUDA GPU: ``CalibrationError``."""
    from hetflow.platform import load_platform
    measured = cuda_calibration()
    if measured is None:
        raise CalibrationError("host+cuda calibration times models on a CUDA GPU, and torch sees none here "
                               "(torch.cuda.is_available() is False)")
    fitted = fit_to_runs(load_platform("host+cuda"), ["gpu"], GPU_GRID, progress, repeats, rounds)
    result = {**measured, "fitted": {**fitted, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}
    path = cache_dir() / "cuda-calibration.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    load_platform.cache_clear()
    return result


# --- filling in the presets measured on this machine (registered with hetflow.platform by the driver) ---------

def fill_host(data: dict) -> dict:
    """``calibrate = "host"``: the CPU's measured (or fitted) figures."""
    return _apply_calibration(data, host_calibration())


def fill_cuda(data: dict) -> dict:
    """``cuda = true``: the CUDA GPU, measured, listing exactly what the GPU backend emits."""
    from hetflow.backends.gpu import GPU_DTYPES, GPU_OPS
    return _add_cuda(data, cuda_calibration(), GPU_OPS, GPU_DTYPES)


def _add_cuda(data: dict, gpu: dict | None, gpu_ops=(), gpu_dtypes=()) -> dict:
    """host+cuda: add the CUDA GPU (its HBM, and a PCIe link to DRAM) when one is present."""
    if gpu is None:
        data = dict(data)
        data["description"] = data.get("description", "") + " No CUDA GPU is present: the platform is the host alone."
        return data
    data = json.loads(json.dumps(data))
    fitted = gpu.get("fitted")
    bandwidth = fitted["memory_bandwidth"] if fitted else gpu["memory_bandwidth"]
    data["memory"]["hbm"] = {"capacity": gpu["memory_bytes"], "bandwidth": bandwidth, "unified": True,
                             "source": f"measured: {gpu['name']}"}
    data["device"]["gpu"] = {"kind": "gpu", "memory": "hbm", "launch": "10 us", "measured": True,
                             "peak": {"f32": gpu["f32_flops"], "f16": gpu["f16_flops"]},
                             "ops": list(gpu_ops), "dtypes": list(gpu_dtypes),
                             "source": f"peak GEMM and copy measured on {gpu['name']} ({gpu['when']}); not "
                                       "calibrated to model runs ('hetflow calibrate --platform host+cuda')"}
    if fitted:   # 'hetflow calibrate --platform host+cuda': the rates and costs real runs achieved
        scale = fitted["gemm_flops"] / gpu["f32_flops"]
        data["device"]["gpu"].update(
            peak={"f32": fitted["gemm_flops"], "f16": gpu["f16_flops"] * scale}, bandwidth=bandwidth,
            launch=fitted["launch"], op_launch=fitted["op_launch"],
            source=(f"fitted to timed runs of the calibration models on {gpu['name']} ({fitted['when']}): "
                    f"{fitted['gemm_flops'] / 1e12:.1f} TFLOP/s, {bandwidth / 1e9:.0f} GB/s, "
                    f"{fitted['launch'] * 1e6:g} us per kernel"))
        data["call_overhead"] = fitted["call_overhead"]   # a call's fixed cost, the GPU's launch and copies in it
    data.setdefault("link", {})["pcie"] = {"from": "dram", "to": "hbm", "bandwidth": gpu["pcie_bandwidth"],
                                          "latency": "10 us"}
    return data


def _apply_calibration(data: dict, calibration: dict) -> dict:
    data = json.loads(json.dumps(data))
    for device in data["device"].values():
        if device.get("kind") == "cpu":
            device["peak"] = {"f32": calibration["gemm_flops"], "f64": calibration["gemm_flops"] / 2}
            device["bandwidth"] = calibration["memory_bandwidth"]
            device["measured"] = True
            for key in ("launch", "op_launch"):
                if key in calibration:
                    device[key] = calibration[key]
            if "call_overhead" in calibration:
                data["call_overhead"] = calibration["call_overhead"]
            how = "fitted to measured model runs" if "fitted_on" in calibration else "measured GEMM and copy"
            device["source"] = (f"measured on this machine ({how}): {calibration['gemm_flops'] / 1e9:.1f} GFLOP/s, "
                                f"{calibration['memory_bandwidth'] / 1e9:.1f} GB/s ({calibration['when']})")
    for memory in data["memory"].values():
        memory["bandwidth"] = calibration["memory_bandwidth"]
        memory["shared_bandwidth"] = [calibration["memory_bandwidth"]]
    return data


# --- the analytic model of a simulated device (NPU, PIM) fitted to its simulator ---------------------------

SIM_KINDS = ("npu", "pim")
SCALES = np.logspace(-1.5, 1.5, 97)       # multipliers of a device's peak and bandwidth the fit tries
LAUNCH_STEPS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0)   # multiples of the preset's launch tried
WITHIN = 0.2                              # the agreement the issue asks for: within 20%


def simulated_suite(platform) -> list:
    """The benchmark graphs the simulated devices are fitted on: decode steps (GEMVs, attention on a KV
    cache; batch 64: prefill-like GEMMs), a GPT-2 prefill (f32, from torch), a Mixtral-like MoE layer at
    three batch sizes, and GEMMs across the NPU's tile staircase."""
    from hetflow.examples.decode_graphs import build_gpt2_decode_step, build_mixtral_decode_layer
    from hetflow.ir import DType, Graph, TensorType
    graphs = [build_gpt2_decode_step(layers=2, hidden=768, heads=12, context=128, vocab=1000),
              build_gpt2_decode_step(layers=1, hidden=1024, heads=16, context=512, vocab=1000, batch=4),
              build_gpt2_decode_step(layers=1, hidden=256, heads=4, context=64, vocab=1000, batch=64)]
    graphs += [build_mixtral_decode_layer(batch, hidden=1024, heads=8, kv_heads=2, head_dim=128, context=256,
                                          ffn=2048) for batch in (1, 16, 64)]
    graphs.append(_gpt2_prefill())
    for m, k, n in [(8, 1024, 1024), (32, 1024, 1024), (40, 1024, 1024), (128, 1024, 1024), (64, 4096, 1024),
                    (64, 1024, 4096), (256, 768, 768), (512, 256, 1024), (1, 2048, 2048), (4, 768, 3072)]:
        for dtype in ("f16", "f32"):
            g = Graph(f"mm_{m}x{k}x{n}_{dtype}")
            x = g.add_input("x", TensorType(DType(dtype), (m, k)))
            w = g.add_weight("w", np.zeros((k, n), DType(dtype).numpy))
            y = g.add_node("MatMul", [x, w], [TensorType(DType(dtype), (m, n))]).outputs[0]
            g.outputs = [g.add_node("Relu", [y], [TensorType(DType(dtype), (m, n))]).outputs[0]]
            graphs.append(g)
    return graphs


def _gpt2_prefill():
    """GPT-2 (2 layers, 256 wide) over 64 tokens in f32, captured from torch: prefill's GEMMs and the
    vector work around them (LayerNorm, GELU, softmax)."""
    import torch

    from hetflow.api import capture
    from hetflow.examples.models import build_gpt2
    module, inputs = build_gpt2(n_layer=2, n_embd=256, n_head=4, seq=64, vocab=1000)
    with torch.no_grad():
        return capture(module, inputs, None)[0]


def simulated_samples(platform, device_name: str, graphs) -> list[dict]:
    """Every fused group of ``graphs`` the device runs (for a PIM: those of decode-like Op/B, at most
    ``PIM_MAX_ROWS`` rows, the work PIM is for): what the analytic model needs to time it again with
    other figures, and the simulator's time."""
    from hetflow.passes import CompileOptions
    from hetflow.passes.cost import cost_node, inner_nodes
    from hetflow.pipeline import run_pipeline
    from hetflow.simulated_cost import simulated_seconds
    device = platform.devices[device_name]
    samples = []
    for graph in graphs:
        fused, _ = run_pipeline(graph, "canonicalize,fuse", options=CompileOptions(platform))
        for node in fused.nodes:
            cost = cost_node(node, platform, fused.opset)
            if device_name not in cost.times:
                continue
            if device.kind == "pim" and (_rows(node) or 1) > PIM_MAX_ROWS:
                continue
            simulated = simulated_seconds(fused, node, device)
            if simulated is None:
                continue
            samples.append({"graph": graph.name, "group": cost.name, "kind": cost.kind, "node": node,
                            "bytes": cost.bytes, "dtype": cost.dtype, "ops": len(inner_nodes(node)),
                            "simulated": simulated})
    return samples


PIM_MAX_ROWS = 16


def _rows(node) -> int | None:
    """M of the first contraction in the node (rows of activations a PIM streams the weights for)."""
    from hetflow.passes.cost import inner_nodes
    for inner in inner_nodes(node):
        if inner.op in ("MatMul", "Gemm") and inner.inputs[0] is not None and inner.inputs[0].type is not None:
            shape = inner.inputs[0].type.shape
            if shape and all(isinstance(d, int) for d in shape):
                return int(np.prod(shape[:-1]))
    return None


def predict_simulated(sample: dict, device) -> float:
    from hetflow.passes.cost import device_time
    return device_time(sample["node"], device, sample["bytes"], sample["dtype"])


def _log_error(samples: list[dict], device) -> tuple[int, float]:
    """(groups off by more than ``WITHIN``, squared log error): the fit's objective, lexicographic (the
    agreement the issue asks for first; among equals, the closest overall)."""
    errors = np.array([np.log(predict_simulated(s, device) / s["simulated"]) for s in samples])
    return int((np.abs(errors) > np.log1p(WITHIN)).sum()), float((errors ** 2).sum())


def fit_simulated(samples: list[dict], device, rounds: int = 3):
    """The device's figures (its peak per dtype, bandwidth, launch, per-op launch, overlap loss and, for an
    NPU, its stationary penalty)
    minimising the squared log error of the analytic time against the simulator's: coordinate descent,
    each figure in turn over a grid (multipliers 0.03x to 30x of the preset's; a penalty of 1 to 8), a
    few rounds. Returns the fitted Device."""
    import dataclasses
    best = device
    for _ in range(rounds):
        # each float type the groups use gets its own peak (one the preset lacks starts from the one it falls
        # back to: a PIM's f32 runs at half its f16 rate, its weights being twice the bytes); others stay
        for dtype in sorted({s["dtype"] for s in samples if s["dtype"]}):
            base = device.peak_for(dtype)
            tries = [dataclasses.replace(best, peak={**best.peak, dtype: base * f}) for f in SCALES]
            best = min(tries, key=lambda d: _log_error(samples, d))
        tries = [dataclasses.replace(best, bandwidth=device.bandwidth * f) for f in SCALES]
        best = min(tries, key=lambda d: _log_error(samples, d))
        tries = [dataclasses.replace(best, launch=device.launch * f) for f in LAUNCH_STEPS]
        best = min(tries, key=lambda d: _log_error(samples, d))
        tries = [dataclasses.replace(best, op_launch=device.launch * f) for f in (0.0,) + LAUNCH_STEPS[1:]]
        best = min(tries, key=lambda d: _log_error(samples, d))
        tries = [dataclasses.replace(best, overlap_loss=f) for f in np.linspace(0, 1, 11)]
        best = min(tries, key=lambda d: _log_error(samples, d))
        if device.kind == "npu" and device.stationary_penalty > 1:
            tries = [dataclasses.replace(best, stationary_penalty=p) for p in (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)]
            best = min(tries, key=lambda d: _log_error(samples, d))
    return best


def agreement(samples: list[dict], device) -> dict:
    """How the analytic model with ``device``'s figures stands against the simulator: median ratio
    (simulated / analytic), how many within ``WITHIN``, the worst."""
    ratios = [s["simulated"] / predict_simulated(s, device) for s in samples]
    within = sum(1 for r in ratios if 1 / (1 + WITHIN) <= r <= 1 + WITHIN)
    return {"median": float(np.median(ratios)) if ratios else float("nan"), "within": within, "of": len(ratios),
            "worst": float(max(ratios, key=lambda r: abs(np.log(r)))) if ratios else float("nan")}


def calibrate_simulated(platform_name: str, progress=print) -> dict:
    """Fit each NPU and PIM device of the preset to its simulator on ``simulated_suite``; returns
    {device: {fitted figures, before/after agreement}} (``write_calibrated_platform`` saves it)."""
    from hetflow.platform import load_platform
    platform = load_platform(platform_name)
    devices = [d for d, spec in platform.devices.items() if spec.kind in SIM_KINDS]
    if not devices:
        from hetflow.platform import PlatformError
        raise PlatformError(f"platform {platform.name!r} has no simulated device (npu or pim) to fit: "
                            "'hetflow calibrate' without --platform fits the host CPU to measured runs")
    graphs = simulated_suite(platform)
    result = {}
    for name in devices:
        spec = platform.devices[name]
        samples = simulated_samples(platform, name, graphs)
        progress(f"  {name} ({spec.kind}): {len(samples)} groups emitted and simulated; fitting")
        fitted = fit_simulated(samples, spec)
        result[name] = {"device": fitted, "before": agreement(samples, spec), "after": agreement(samples, fitted),
                        "samples": len(samples)}
    return result


def write_calibrated_platform(platform_name: str, result: dict, path: Path) -> Path:
    """A platform file over the preset (``base``) giving each fitted device's analytic figures
    (``[device.X.analytic]``): placement's analytic model uses them; the simulators and emitters keep
    the device's own figures (the hardware is the same, the model of it is fitted)."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f'base = "{platform_name}"', f'name = "{platform_name}-sim"',
             f'source = "{platform_name}, its simulated devices\' analytic cost model fitted to their simulators '
             f'(hetflow calibrate --platform {platform_name}, {when})"', ""]
    for name, fit_ in result.items():
        after, device = fit_["after"], fit_["device"]
        peak = ", ".join(f"{k} = {float(v)!r}" for k, v in device.peak.items())
        lines += [f"[device.{name}.analytic]", f"peak = {{ {peak} }}", f"bandwidth = {float(device.bandwidth)!r}",
                  f"launch = {float(device.launch)!r}", f"op_launch = {float(device.op_launch)!r}",
                  f"overlap_loss = {float(device.overlap_loss)!r}"]
        if device.kind == "npu":
            lines.append(f"stationary_penalty = {float(device.stationary_penalty)!r}")
        lines += [f'source = "fitted to the {name} simulator on {fit_["samples"]} groups: '
                  f'{after["within"]}/{after["of"]} within {WITHIN:.0%}, median ratio {after["median"]:.2f} '
                  f'(preset figures: {fit_["before"]["within"]}/{fit_["before"]["of"]}, '
                  f'{fit_["before"]["median"]:.2f})"', ""]
    path.write_text("\n".join(lines))
    return path


# --- the disk a flash platform streams weights from: read throughput by chunk size and thread count ----------

KiB, MiB = 1024, 1024 * 1024
DISK_SIZES = (4 * KiB, 16 * KiB, 32 * KiB, 64 * KiB, 256 * KiB, 1 * MiB)
DISK_THREADS = (1, 2, 4, 8, 16, 32)
DISK_FILE_BYTES = 256 * MiB
DISK_MARGIN = 64 * MiB             # room left free beside the temporary file
DISK_BATCH_BYTES = 8 * MiB         # bytes per timed batch of reads (at least two reads per thread)


class DiskCalibrationError(HetflowError):
    """The disk cannot be measured (no room, the directory is not writable); the message says why."""


def _write_scratch(path: Path, file_bytes: int) -> None:
    """``file_bytes`` of random data (a disk that compresses or deduplicates gets no help), synced."""
    rng = np.random.default_rng(0)
    block = 8 * MiB
    with open(path, "wb") as f:
        for start in range(0, file_bytes, block):
            f.write(rng.bytes(min(block, file_bytes - start)))
        f.flush()
        os.fsync(f.fileno())


def _measure_point(pool, chunk: int, threads: int, blocks: int, seconds: float, rng) -> float:
    """Bytes/s of random-offset aligned reads of ``chunk`` bytes, ``threads`` in flight, for about ``seconds``."""
    from hetflow.runtime.flash_io import aligned_empty
    count = max(2 * threads, DISK_BATCH_BYTES // chunk)
    buffers = [aligned_empty(chunk) for _ in range(count)]
    pool.reset_counters()
    start = time.perf_counter()
    while True:
        offsets = rng.integers(0, blocks, count) * chunk
        pool.read_into(list(zip(offsets.tolist(), buffers)))
        if time.perf_counter() - start >= seconds:
            break
    return pool.bytes_read / max(pool.read_seconds, 1e-9)


def read_curve(path, sizes=DISK_SIZES, in_flight: int = 32, seconds_per_point: float = 0.3,
               direct: bool = True) -> dict[int, float]:
    """{chunk: bytes/s} of random aligned reads of each chunk size from an existing file (at least the largest
    chunk long), ``in_flight`` at once, O_DIRECT where the file system takes it: the disk's rate now. A cloud
    disk's rate drifts by 2x or more within minutes (burst credits, neighbours), so a benchmark measures it
    beside each run rather than once before them all."""
    from hetflow.runtime.flash_io import ReaderPool
    size = os.path.getsize(path)
    if not sizes or any(c <= 0 or c % 4096 for c in sizes) or max(sizes) > size:
        raise ValueError(f"read_curve: chunk sizes must be multiples of 4096 within {path}'s {size} bytes, "
                         f"got {tuple(sizes)}")
    rng = np.random.default_rng(2)
    with ReaderPool(path, threads=in_flight, direct=direct) as pool:
        return {chunk: _measure_point(pool, chunk, in_flight, size // chunk, seconds_per_point, rng)
                for chunk in sizes}


def calibrate_disk(directory, sizes=DISK_SIZES, threads=DISK_THREADS, file_bytes: int = DISK_FILE_BYTES,
                   seconds_per_point: float = 0.5, direct: bool = True, progress=None) -> dict:
    """This machine's disk read throughput by chunk size and thread count, measured in ``directory``.

    Writes a temporary file of ``file_bytes`` there, drops it from the page cache, and for each (chunk,
    threads) times random-offset aligned reads with ``ReaderPool`` (O_DIRECT where the file system takes
    it, else buffered reads dropped from the page cache) for ``seconds_per_point``; deletes the file.
    Returns {"table": {chunk: {threads: bytes/s}}, "best": {chunk: bytes/s}, "best_threads": {chunk: n},
    "channels": one thread count for all chunks, "mode", "engine" (aio or threads), "direct", "when", ...}.
    """
    from hetflow.runtime.flash_io import ReaderPool, drop_page_cache
    if not sizes or not threads or any(c <= 0 or c % 4096 for c in sizes) or min(threads) < 1:
        raise ValueError(f"calibrate_disk: chunk sizes must be multiples of 4096 (O_DIRECT) and thread counts >= 1, "
                         f"got sizes {tuple(sizes)}, threads {tuple(threads)}")
    directory = Path(directory)
    if not directory.is_dir():
        raise DiskCalibrationError(f"{directory}: not a directory (--disk-dir names where the weights will live)")
    largest = max(sizes)
    file_bytes = max(file_bytes, 2 * largest) // largest * largest
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    if free < file_bytes + DISK_MARGIN:
        raise DiskCalibrationError(f"{directory}: not enough room to measure the disk: the temporary file needs "
                                   f"{file_bytes + DISK_MARGIN} bytes ({file_bytes / MiB:.0f} MiB + "
                                   f"{DISK_MARGIN / MiB:.0f} MiB margin) and {free} bytes ({free / MiB:.0f} MiB) "
                                   "are free; free some space or give another directory")
    path = directory / f".hetflow-disk-calibration-{os.getpid()}.bin"
    progress = progress or (lambda line: None)
    try:
        try:
            _write_scratch(path, file_bytes)
        except OSError as exc:
            raise DiskCalibrationError(f"{directory}: cannot write the temporary file {path.name}: "
                                       f"{exc.strerror or exc}") from None
        dropped = drop_page_cache(path)
        rng = np.random.default_rng(1)
        table = {chunk: {} for chunk in sizes}
        for n in threads:
            with ReaderPool(path, threads=n, direct=direct) as pool:
                mode, engine = pool.mode, pool.engine
                for chunk in sizes:
                    table[chunk][n] = _measure_point(pool, chunk, n, file_bytes // chunk, seconds_per_point, rng)
            progress(f"  {n:>2} in flight ({mode}, {engine}): " + "  ".join(f"{chunk_name(c)} {table[c][n] / 1e9:.3f}"
                                                                  for c in sizes) + " GB/s")
    finally:
        path.unlink(missing_ok=True)
    best_threads = {c: max(row, key=row.get) for c, row in table.items()}
    return {"table": table, "best": {c: table[c][best_threads[c]] for c in table}, "best_threads": best_threads,
            "channels": _one_thread_count(table, threads), "mode": mode, "engine": engine,
            "direct": mode == "O_DIRECT",
            "page_cache_dropped": dropped, "file_bytes": file_bytes, "seconds_per_point": seconds_per_point,
            "directory": str(directory), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def chunk_name(chunk: int) -> str:
    """4096 -> "4 KiB", 1048576 -> "1 MiB": the form the presets' throughput tables use."""
    if chunk % MiB == 0:
        return f"{chunk // MiB} MiB"
    if chunk % KiB == 0:
        return f"{chunk // KiB} KiB"
    return f"{chunk} B"


def _one_thread_count(table: dict, threads) -> int:
    """The one thread count (the platform's ``channels``) closest to every chunk's best: the highest geometric
    mean over chunks of throughput / that chunk's best."""
    def score(n):
        return float(np.mean([np.log(row[n] / max(row.values())) for row in table.values()]))
    return max(threads, key=score)


def write_disk_platform(platform_name: str, result: dict, path) -> Path:
    """A platform file over the preset (``base``) whose ``[flash]`` is this machine's disk: throughput by chunk
    at each chunk's best thread count, ``channels`` the one best thread count, ``read_latency`` one
    single-threaded read of the smallest chunk, a ``source`` saying measured, when, and how read."""
    path = Path(path)
    table, best, best_threads = result["table"], result["best"], result["best_threads"]
    smallest = min(table)
    single = min(table[smallest])
    latency = smallest / table[smallest][single]
    curve = ", ".join(f'"{chunk_name(c)}" = "{best[c] / 1e9:.4g} GB/s"' for c in sorted(best))
    threads = ", ".join(f"{chunk_name(c)}: {best_threads[c]}" for c in sorted(best))
    source = (f"{platform_name} with [flash] measured on this machine's disk (hetflow calibrate --platform "
              f"{platform_name}, {result['when']})")
    flash_source = (f"measured on this machine ({result['when']}): random-offset aligned reads of a "
                    f"{result['file_bytes'] // MiB} MiB file in {result['directory']}, read {result['mode']}; "
                    f"throughput at each chunk's best thread count ({threads}); read_latency one "
                    f"{chunk_name(smallest)} read on {single} thread")
    lines = [f"base = {json.dumps(platform_name)}", f"name = {json.dumps(platform_name + '-disk')}",
             f"source = {json.dumps(source)}", "",
             "[flash]",
             f"channels = {int(result['channels'])}",
             f'read_latency = "{latency * 1e6:.4g} us"',
             f"throughput = {{ {curve} }}   # at each chunk's best thread count",
             f"source = {json.dumps(flash_source)}", ""]
    path.write_text("\n".join(lines))
    return path
