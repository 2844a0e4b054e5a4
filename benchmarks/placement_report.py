"""Placement report: hetflow's decisions on the platform presets, against the papers'.

    python benchmarks/placement_report.py [--part a|b|c]

(a) duplex: a Mixtral-like MoE decode layer (8 experts, top-2, GQA group 4) at batch
    1, 32 and 128: where experts, attention and dense FC layers go, and the
    predicted speedup over the xPU alone (Duplex saw 2.07x mean, up to 2.67x).
(b) mobile-soc: HeteroInfer's five Llama-8B matmul shapes, GPU vs NPU: the split
    decision against the paper's (split 1:1, split 3:1, GPU only, NPU only, split
    2:3), accepted within one step of ratio (a quarter of the work).
(c) a GPT-2 decode step on pim-gpt and the ResNet-18 on mobile-soc, as tables.

Every time here is modelled from the platform files (REFERENCE.md), none measured.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from hetflow.examples.decode_graphs import build_gpt2_decode_step, build_mixtral_decode_layer
from hetflow.ir import DType, Graph, TensorType
from hetflow.passes import CompileOptions
from hetflow.passes.place import place_graph
from hetflow.pipeline import run_pipeline
from hetflow.platform import load_platform
from hetflow.report import placement_table, table, timeline_text


def compile_graph(graph, platform, placement="optimal", devices=None):
    options = CompileOptions(platform=platform, placement=placement, devices=devices)
    placed, _ = run_pipeline(graph, options=options)
    return placed, options.results["placement"], options.results["schedule"]


def part_a() -> bool:
    print("(a) duplex: Mixtral-like MoE decode layer (8 experts, top-2, GQA group 4, context 2048, fp16)")
    rows, speedups = [], []
    for batch in (1, 32, 128):
        _, roofline, _ = compile_graph(build_mixtral_decode_layer(batch), "duplex", "roofline")
        _, xpu_only, xpu_schedule = compile_graph(build_mixtral_decode_layer(batch), "duplex", devices=["xpu"])
        _, placement, schedule = compile_graph(build_mixtral_decode_layer(batch), "duplex", "optimal")
        by_kind: dict[str, list[str]] = {}
        for cost in roofline.costs:
            if cost.kind in ("expert", "attention") or (cost.kind == "contraction" and "MatMul" in cost.ops):
                label = {"expert": "experts", "attention": "attention"}.get(cost.kind, "dense FC")
                by_kind.setdefault(label, []).append(f"{cost.intensity:.0f}->{cost.node.meta['device']}")
        speedup = xpu_schedule.makespan / schedule.makespan
        speedups.append(speedup)
        rows.append([str(batch), " ".join(by_kind.get("experts", [])), " ".join(by_kind.get("attention", [])),
                     " ".join(by_kind.get("dense FC", [])), f"{xpu_schedule.makespan * 1e6:.0f}",
                     f"{schedule.makespan * 1e6:.0f}", f"{speedup:.2f}x"])
    print(table(rows, ["batch", "experts Op/B->device (roofline)", "attention", "dense FC (q,k,v,o,router)",
                       "xPU only us", "optimal us", "speedup"]))
    print(f"predicted speedup over the xPU alone: mean {np.mean(speedups):.2f}x, max {max(speedups):.2f}x "
          "(Duplex: 2.07x mean, up to 2.67x; modelled)")
    _, roof, _ = compile_graph(build_mixtral_decode_layer(128), "duplex", "roofline")
    few = [c for c in roof.costs if c.kind == "expert" and c.intensity < 32]
    many = [c for c in roof.costs if c.kind == "expert" and c.intensity >= 32]
    dense = [c for c in roof.costs if c.kind == "contraction" and c.intensity >= 64]
    attention = [c for c in roof.costs if c.kind == "attention"]
    ok = (all(c.node.meta["device"] == "pim" for c in few + attention)
          and all(c.node.meta["device"] == "xpu" for c in many + dense))
    print(f"rule check at batch 128 (few-token experts and attention on PIM, dense FC and busy experts on the "
          f"xPU): {'ok' if ok else 'NOT MET'}\n")
    return ok


HETEROINFER = [  # (weight [out, in], tokens, paper decision, GPU share of the work in the paper)
    ((4096, 4096), 1, "split 1:1", 0.5),
    ((28672, 4096), 1, "split 3:1", 0.75),
    ((4096, 14336), 1, "GPU only", 1.0),
    ((4096, 4096), 128, "NPU only", 0.0),
    ((4096, 14336), 256, "split 2:3", 0.4),
]


def matmul_graph(out_features: int, in_features: int, tokens: int) -> Graph:
    graph = Graph(f"matmul_{out_features}x{in_features}_x{tokens}")
    x = graph.add_input("x", TensorType(DType.f16, (tokens, in_features)))
    w = graph.add_weight("w", np.broadcast_to(np.zeros((), np.float16), (in_features, out_features)))
    graph.outputs = [graph.add_node("MatMul", [x, w], [TensorType(DType.f16, (tokens, out_features))],
                                    output_names=["y"]).outputs[0]]
    return graph


def gpu_share(report) -> float:
    if not report.splits:
        return 1.0 if report.costs[0].node.meta.get("device") == "gpu" else 0.0
    split = report.splits[0]
    first = split["eighths_on_first"] / 8
    return first if split["devices"][0] == "gpu" else 1 - first


def describe(share: float) -> str:
    if share >= 1:
        return "GPU only"
    if share <= 0:
        return "NPU only"
    from fractions import Fraction
    f = Fraction(share).limit_denominator(8)
    return f"split {f.numerator}:{f.denominator - f.numerator}"


def part_b() -> bool:
    print("(b) mobile-soc: HeteroInfer's Llama-8B matmuls, GPU vs NPU (fp16, flag sync 5 us)")
    platform = load_platform("mobile-soc")
    rows, ok = [], True
    for (out_f, in_f), tokens, paper, paper_share in HETEROINFER:
        report = place_graph(matmul_graph(out_f, in_f, tokens), platform, "split", devices=["gpu", "npu"])
        cost = report.costs[0]
        share = gpu_share(report)
        within = abs(share - paper_share) <= 0.25 + 1e-9
        ok &= within
        rows.append([f"[{out_f},{in_f}]x{tokens}", f"{cost.times['gpu'] * 1e6:.0f}", f"{cost.times['npu'] * 1e6:.0f}",
                     describe(share), paper, "yes" if within else "NO"])
    print(table(rows, ["shape", "GPU us", "NPU us", "hetflow", "HeteroInfer", "within one step"]))
    print("(paper's times, GPU/NPU us: 511/693, 1903/3886, 1467/6506, 7306/912, 35231/23445)\n")
    return ok


def part_c() -> bool:
    print("(c1) pim-gpt: one GPT-2 (small) decode step, KV cache of 128 tokens")
    _, placement, schedule = compile_graph(build_gpt2_decode_step(), "pim-gpt", "optimal")
    print(placement_table(placement.costs, limit=24))
    print(timeline_text(schedule, limit=0))
    print("\n(c2) mobile-soc: ResNet-18 (transformers config, 1x3x224x224, fp32)")
    from hetflow.examples.models import build_resnet18
    from hetflow.frontends.torch import capture_module
    module, inputs = build_resnet18()
    _, placement, schedule = compile_graph(capture_module(module, inputs).graph, "mobile-soc", "optimal")
    print(placement_table(placement.costs))
    print(timeline_text(schedule, limit=0))
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["a", "b", "c"], action="append")
    args = parser.parse_args(argv)
    parts = args.part or ["a", "b", "c"]
    ok = True
    for name in parts:
        ok &= {"a": part_a, "b": part_b, "c": part_c}[name]()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
