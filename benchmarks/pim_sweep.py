"""PIM simulator sweep: a GEMV's achieved internal bandwidth against the banks computing, and the row-buffer
hit rate (issue 15, report (b)); then GPT-2-sized layers on both PIM presets against their roofline.

    python benchmarks/pim_sweep.py

Every time here is modelled by the event-driven DRAM model of ``hetflow.runtime.runners.pim``
(REFERENCE.md's GDDR6 and HBM3 timings), never measured.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from hetflow.backends.pim import emit_pim_program
from hetflow.ir import DType, Graph, TensorType
from hetflow.platform import load_platform
from hetflow.runtime.runners.pim import PimSimulator


def gemv(k: int, n: int) -> Graph:
    graph = Graph(f"gemv_{k}x{n}")
    x = graph.add_input("x", TensorType(DType.f16, (1, k)))
    w = graph.add_weight("w", np.broadcast_to(np.float16(0), (k, n)))   # timing only: values never read
    graph.outputs = [graph.add_node("MatMul", [x, w], [TensorType(DType.f16, (1, n))]).outputs[0]]
    return graph


def main() -> None:
    device = load_platform("pim-gpt").devices["pim"]
    graph = gemv(2048, 4096)
    print("GEMV 2048 x 4096 f16 on pim-gpt's bank-level PIM (modelled)")
    print(f"{'channels':>8} {'banks':>6} {'units':>6} {'us':>9} {'GB/s':>9} {'row hit':>8}")
    for channels, banks in [(1, 1), (1, 2), (1, 4), (1, 8), (1, 16), (2, 16), (4, 16), (8, 16), (16, 16)]:
        sim = PimSimulator(emit_pim_program(graph, dataclasses.replace(device, channels=channels), "",
                                            banks_per_channel=banks))
        print(f"{channels:>8} {banks:>6} {channels * banks:>6} {sim.last_seconds * 1e6:>9.2f} "
              f"{sim.internal_bandwidth / 1e9:>9.1f} {sim.row_hit_rate:>8.3f}")
    print("\nGPT-2-sized layers (modelled against the roofline bytes / bandwidth)")
    for platform in ("pim-gpt", "duplex"):
        device = load_platform(platform).devices["pim"]
        for k, n in [(768, 2304), (768, 3072), (3072, 768), (768, 50257)]:
            sim = PimSimulator(emit_pim_program(gemv(k, n), device))
            roofline = 2 * k * n / device.bandwidth
            print(f"{platform:>8} {k:>5} x {n:<6} {sim.last_seconds * 1e6:8.2f} us  roofline {roofline * 1e6:7.2f} us  "
                  f"{sim.internal_bandwidth / 1e12:6.2f} TB/s  row hit {sim.row_hit_rate:.3f}")


if __name__ == "__main__":
    main()
