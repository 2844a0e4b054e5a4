"""What the device simulators model: NPU GEMM sweep, PIM GEMV sweep, and simulator against cost model.

    python benchmarks/sim_report.py            # (a) to (e); a few minutes
    python benchmarks/sim_report.py --only a

(a) GEMMs on mobile-soc's NPU simulator: latency against M in steps of 8 (the 32-wide array makes a
    staircase), and the operand-order effect (HeteroInfer: the large weight as the stationary operand).
(b) A GEMV on pim-gpt's bank-level PIM simulator: achieved internal bandwidth against the banks
    computing, and the row-buffer hit rate (``benchmarks/pim_sweep.py``).
(e) The calibration check: per group, the analytic model with the presets' figures and with the figures
    ``hetflow calibrate --platform P`` fits, against the simulators, on the benchmark groups; then per
    partition of whole models compiled and run, the schedule's prediction against the simulator's time
    under three cost models: analytic (preset), analytic (fitted) and sim.

(c) A decode step (batch 1, 512 tokens of context) of the eight GPT models PIM-GPT ran (GPT-2 small to XL,
    GPT-3 small to XL, up to 1.5B parameters): pim-gpt's time (its PIM partitions timed by the PIM
    simulator, the ASIC's by the cost model, one after another) against a T4-class GPU (65 TFLOP/s FP16,
    320 GB/s; NVIDIA's datasheet figures, the cost model), beside PIM-GPT's published 41x-137x.

(d) Duplex's Mixtral-like MoE decode layer (``benchmarks/placement_report.py`` (a)) at batch 1, 32, 128,
    placed on duplex (optimal) with ``cost_model="sim"``: every group placement considers for the PIM is
    timed by the PIM simulator, and the schedule (xPU and PIM concurrent, sharing the HBM) runs on those
    times; its makespan against the xPU alone (cost model), beside Duplex's 2.07x mean.

Every time here is modelled (the simulators' timing models, from REFERENCE.md's figures), never measured.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _matmul(m: int, k: int, n: int, dtype="f16"):
    from hetflow.ir import DType, Graph, TensorType
    graph = Graph(f"mm_{m}x{k}x{n}")
    x = graph.add_input("x", TensorType(DType(dtype), (m, k)))
    w = graph.add_weight("w", np.zeros((k, n), DType(dtype).numpy))
    graph.outputs = [graph.add_node("MatMul", [x, w], [TensorType(DType(dtype), (m, n))]).outputs[0]]
    return graph


def _npu_seconds(graph, device) -> float:
    from hetflow.backends.npu import emit_npu_program
    from hetflow.runtime.runners.npu import NpuSimulator
    weights = {w.name: w.data for w in graph.weights.values()}
    simulator = NpuSimulator(emit_npu_program(graph, device), weights)
    feeds = {v.name: np.zeros(v.type.shape, v.type.dtype.numpy) for v in graph.inputs}
    simulator.run(feeds)
    return simulator.last_seconds


def report_a() -> None:
    from hetflow.platform import load_platform
    device = load_platform("mobile-soc").devices["npu"]
    print("(a) NPU simulator (mobile-soc, 32x32 array), MatMul [M x 1024] @ [1024 x 1024] f16, modelled")
    rows = [(m, _npu_seconds(_matmul(m, 1024, 1024), device)) for m in range(8, 129, 8)]
    for m, seconds in rows:
        print(f"  M {m:4d}: {seconds * 1e6:8.1f} us  {'#' * int(seconds / rows[-1][1] * 40)}")
    jumps = [(rows[i][0], rows[i][1] - rows[i - 1][1]) for i in range(1, len(rows))]
    typical = statistics.median(d for _, d in jumps)
    steps = [m for m, d in jumps if d > 3 * typical]
    print(f"  latency jumps at M = {', '.join(map(str, steps))} (the array's 32-row tiles); between them "
          f"+{typical * 1e6:.1f} us per 8 rows (the input's DMA)")
    print("  operand order (the same FLOPs): the weight's reduction dim against its output dim")
    for m, k, n in ((64, 4096, 1024), (64, 1024, 4096)):
        seconds = _npu_seconds(_matmul(m, k, n), device)
        print(f"  [{m} x {k}] @ [{k} x {n}]: {seconds * 1e6:8.1f} us, {2 * m * k * n / seconds / 1e12:.2f} TFLOP/s")


def report_b() -> None:
    import pim_sweep
    print("(b) PIM simulator")
    pim_sweep.main()


def _partition_ratios(platform, build, cost_model: str = "analytic") -> list[tuple[str, float, float]]:
    """(partition, predicted by the schedule, simulated by the runtime) for each NPU/PIM partition of the model
    compiled for ``platform`` and run once."""
    import torch

    import hetflow
    from hetflow.api import compile_graph
    model, inputs = build()
    compiled = hetflow.compile(model, inputs, platform=platform, cost_model=cost_model) if inputs is not None \
        else compile_graph(model, platform, cost_model=cost_model)
    feeds = {v.name: np.zeros(v.type.shape, v.type.dtype.numpy) for v in compiled.graph.inputs}
    if inputs is not None:
        feeds = {v.name: t.numpy() for v, t in zip(compiled.graph.inputs, inputs)}
    with torch.no_grad():
        compiled.executor.run(feeds)
    events = {e.name: e for e in compiled.executor.last.events}
    rows = []
    for part in compiled.partitions:
        event = events.get(part.file)
        if part.backend in ("npu", "pim") and event is not None and event.modelled:
            rows.append((part.file, part.predicted_end - part.predicted_start, event.modelled))
    return rows


def _summary(ratios: list[float]) -> str:
    within = sum(1 for r in ratios if 1 / 1.2 <= r <= 1.2)
    return f"median {statistics.median(ratios):5.2f}, {within:3d}/{len(ratios):3d} within 20%"


def report_e() -> None:
    import tempfile

    from hetflow.calibrate import calibrate_simulated, write_calibrated_platform
    from hetflow.examples import decode_graphs, models
    print("(e) the analytic cost model against the simulators (modelled both)")
    print("  per group (hetflow calibrate --platform P: the benchmark groups, simulator / analytic):")
    calibrated = {}
    folder = Path(tempfile.mkdtemp(prefix="hetflow-sim-report-"))
    total_before = total_after = total = 0
    for platform in ("mobile-soc", "pim-gpt", "duplex", "flash-edge"):
        result = calibrate_simulated(platform, progress=lambda *_: None)
        calibrated[platform] = str(write_calibrated_platform(platform, result, folder / f"{platform}-sim.toml"))
        for device, fit in result.items():
            before, after = fit["before"], fit["after"]
            total += after["of"]
            total_before += before["within"]
            total_after += after["within"]
            print(f"    {platform:10s} {device:4s}: preset figures median {before['median']:5.2f}, "
                  f"{before['within']:3d}/{before['of']:3d} within 20%; fitted median {after['median']:5.2f}, "
                  f"{after['within']:3d}/{after['of']:3d} within 20% (worst {after['worst']:.2f})")
    print(f"    all: {total_before}/{total} within 20% before the fit, {total_after}/{total} after")
    print("  per partition of whole models, compiled and run (the schedule's prediction against the simulator's time):")
    cases = [("mobile-soc", "GPT-2 2 layers, 256 wide, seq 64 (prefill)",
              lambda: models.build_gpt2(n_layer=2, n_embd=256, n_head=4, seq=64, vocab=1000)),
             ("pim-gpt", "GPT-2 decode step, 2 layers, 768 wide",
              lambda: (decode_graphs.build_gpt2_decode_step(layers=2, hidden=768, heads=12, context=128, vocab=1000), None)),
             ("duplex", "Mixtral-like MoE decode layer, batch 16",
              lambda: (decode_graphs.build_mixtral_decode_layer(16, hidden=1024, heads=8, kv_heads=2, context=256,
                                                                ffn=2048), None)),
             ("flash-edge", "GPT-2 2 layers, 256 wide, seq 64 (prefill)",
              lambda: models.build_gpt2(n_layer=2, n_embd=256, n_head=4, seq=64, vocab=1000))]
    for platform, what, build in cases:
        print(f"    {platform}: {what}")
        for label, target, cost_model in (("analytic, preset figures", platform, "analytic"),
                                          ("analytic, fitted figures", calibrated[platform], "analytic"),
                                          ("sim cost model", platform, "sim")):
            rows = _partition_ratios(target, build, cost_model)
            ratios = [simulated / predicted for _, predicted, simulated in rows if predicted > 0]
            print(f"      {label:26s} {len(rows):3d} simulated partitions: simulator / predicted "
                  + (_summary(ratios) if ratios else "-"))


T4_TOML = """
name = "t4"
source = "a T4-class GPU (NVIDIA T4 datasheet: 65 TFLOP/s FP16 with tensor cores, 320 GB/s GDDR6; unconfirmed)"
[memory.gddr6]
capacity = "16 GiB"
bandwidth = "320 GB/s"
unified = true
[device.host]
kind = "cpu"
memory = "gddr6"
peak = { f32 = "0.5 TFLOP/s" }
bandwidth = "50 GB/s"
launch = "5 us"
[device.gpu]
kind = "gpu"
memory = "gddr6"
peak = { f16 = "65 TFLOP/s", f32 = "8.1 TFLOP/s" }
bandwidth = "320 GB/s"
launch = "5 us"
"""

GPT_MODELS = [("GPT-2 small", 12, 768, 12), ("GPT-2 medium", 24, 1024, 16), ("GPT-2 large", 36, 1280, 20),
              ("GPT-2 XL", 48, 1600, 25), ("GPT-3 small", 12, 768, 12), ("GPT-3 medium", 24, 1024, 16),
              ("GPT-3 large", 24, 1536, 16), ("GPT-3 XL", 24, 2048, 16)]


def report_c() -> None:
    import tempfile

    from hetflow.api import compile_graph
    from hetflow.examples.decode_graphs import build_gpt2_decode_step
    from hetflow.platform import load_platform
    from hetflow.runtime.runners.pim import PimSimulator
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(T4_TOML)
    t4 = load_platform(f.name)
    print("(c) one decode step (batch 1, context 512, f16): pim-gpt (PIM simulator + cost model for the ASIC) "
          "against a T4-class GPU (cost model); PIM-GPT published 41x-137x")
    speedups = []
    for name, layers, hidden, heads in GPT_MODELS:
        graph = build_gpt2_decode_step(layers=layers, hidden=hidden, heads=heads, context=512)
        params = sum(w.data.size for w in graph.weights.values()) / 1e9
        timed = "canonicalize,fuse,place,schedule"  # (no memory plan: only times are read here)
        gpu = compile_graph(graph.clone(), t4, passes=timed, devices=["gpu"]).schedule.makespan
        compiled = compile_graph(graph, "pim-gpt", passes=timed)
        pim_time = asic_time = 0.0
        for part in compiled._build_partitions():
            if part.backend == "pim":
                pim_time += PimSimulator(part.source).last_seconds
            else:
                asic_time += part.predicted_end - part.predicted_start
        total = pim_time + asic_time
        speedups.append(gpu / total)
        print(f"  {name:13s} {params:5.2f} B params: T4 {gpu * 1e3:7.3f} ms, pim-gpt {total * 1e3:7.3f} ms "
              f"(PIM {pim_time * 1e3:.3f}, ASIC {asic_time * 1e3:.3f}): {gpu / total:5.1f}x")
    print(f"  modelled speedup over the T4-class GPU: {min(speedups):.1f}x to {max(speedups):.1f}x "
          "(PIM-GPT: 41x to 137x against a T4, its own simulator)")


def report_d() -> None:
    from hetflow.api import compile_graph
    from hetflow.examples.decode_graphs import build_mixtral_decode_layer
    print("(d) duplex: Mixtral-like MoE decode layer, placed and scheduled with the PIM simulator in the loop "
          "(cost_model='sim': PIM groups timed by the simulator, xPU groups by the cost model)")
    timed = "canonicalize,fuse,place,schedule"
    speedups = []
    for batch in (1, 32, 128):
        alone = compile_graph(build_mixtral_decode_layer(batch), "duplex", passes=timed, devices=["xpu"],
                              placement="optimal").schedule.makespan
        compiled = compile_graph(build_mixtral_decode_layer(batch), "duplex", passes=timed, placement="optimal",
                                 cost_model="sim")
        busy = compiled.schedule.busy()
        speedups.append(alone / compiled.schedule.makespan)
        print(f"  batch {batch:3d}: xPU alone {alone * 1e6:8.1f} us; xPU + PIM {compiled.schedule.makespan * 1e6:8.1f} us "
              f"(xPU busy {busy.get('xpu', 0) * 1e6:7.1f} us, PIM busy {busy.get('pim', 0) * 1e6:7.1f} us, "
              f"simulated): {speedups[-1]:4.2f}x")
    print(f"  modelled speedup over the xPU alone: mean {np.mean(speedups):.2f}x, up to {max(speedups):.2f}x; "
          "Duplex: 2.07x mean, up to 2.67x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="abcde", help="which parts: any of a, b, c, d, e")
    args = parser.parse_args(argv)
    for part, report in (("a", report_a), ("b", report_b), ("c", report_c), ("d", report_d), ("e", report_e)):
        if part in args.only:
            report()
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
