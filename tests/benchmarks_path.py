"""Lets tests reuse the benchmark scripts' reference tables (benchmarks/ is not a package)."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def load_benchmark(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def heteroinfer_shares() -> list[tuple[float, float]]:
    """(paper's GPU share, hetflow's GPU share) for HeteroInfer's five shapes on mobile-soc."""
    from hetflow.passes.place import place_graph
    from hetflow.platform import load_platform
    report = load_benchmark("placement_report")
    platform = load_platform("mobile-soc")
    pairs = []
    for (out_f, in_f), tokens, _, paper_share in report.HETEROINFER:
        placed = place_graph(report.matmul_graph(out_f, in_f, tokens), platform, "split", devices=["gpu", "npu"])
        pairs.append((paper_share, report.gpu_share(placed)))
    return pairs
