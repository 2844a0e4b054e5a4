"""Calibration of the ``host`` platform: this machine's GEMM FLOP/s and memory bandwidth, measured once and cached.

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


def cache_dir() -> Path:
    return Path(os.environ.get("HETFLOW_CACHE_DIR", Path.home() / ".cache" / "hetflow"))


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
