"""Fusion report: what canonicalize + fuse do to GPT-2, ResNet-18 and ViT.

    python benchmarks/fusion_report.py

For each model: nodes before and after, fused groups by kind, and the bytes that
cross node/group boundaries before and after (the traffic fusion saves). Checks
that attention is one group per layer (GPT-2, ViT) and that every Conv/Gemm in
the ResNet carries its bias/activation epilogue.
"""
from __future__ import annotations

import collections
import sys
import time

from hetflow.examples.models import build_gpt2, build_resnet18, build_vit
from hetflow.frontends.torch import capture_module
from hetflow.pipeline import run_pipeline
from hetflow.report import graph_totals, human_bytes

MODELS = {
    "gpt2 (2 layers)": (lambda: build_gpt2(n_layer=2, n_embd=128, n_head=4, seq=32), 2),
    "resnet18": (build_resnet18, 0),
    "vit (2 layers)": (lambda: build_vit(hidden=192, layers=2, heads=3), 2),
}


def contractions_with_epilogue(graph) -> tuple[int, int]:
    """(contractions carrying an epilogue, all contractions), counted over top-level nodes and groups."""
    carried = total = 0
    for node in graph.nodes:
        body = node.attrs["body"].nodes if node.op == "hetflow.group" else [node]
        for inner in body:
            if inner.op in ("Conv", "Gemm", "MatMul"):
                total += 1
                in_group = node.op == "hetflow.group" and node.attrs["kind"] in ("contraction", "expert")
                bias_inside = inner.op == "Gemm" and len(inner.inputs) == 3  # a classifier: bias, no activation
                carried += (in_group and len(body) > 1) or bias_inside
    return carried, total


def main() -> int:
    ok = True
    for name, (build, layers) in MODELS.items():
        module, inputs = build()
        start = time.perf_counter()
        graph = capture_module(module, inputs).graph
        before = graph_totals(graph)
        convs = sum(1 for n in graph.nodes if n.op in ("Conv", "Gemm"))
        fused, _ = run_pipeline(graph)
        after = graph_totals(fused)
        kinds = collections.Counter(n.attrs["kind"] for n in fused.nodes if n.op == "hetflow.group")
        saved = 1 - after["bytes"] / before["bytes"]
        print(f"{name}: {before['nodes']} nodes -> {after['nodes']} top-level nodes "
              f"({sum(kinds.values())} groups: {', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}); "
              f"bytes across boundaries {human_bytes(before['bytes'])} -> {human_bytes(after['bytes'])} "
              f"({100 * saved:.0f}% less traffic) [{time.perf_counter() - start:.1f} s]")
        if layers:
            good = kinds.get("attention", 0) == layers
            print(f"  attention groups: {kinds.get('attention', 0)} for {layers} layers: {'ok' if good else 'MISSING'}")
            ok &= good
        if name == "resnet18":
            carried, total = contractions_with_epilogue(fused)
            print(f"  Conv/Gemm with their epilogue fused: {carried}/{total} (of {convs} before fusion)")
            ok &= carried == total
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
