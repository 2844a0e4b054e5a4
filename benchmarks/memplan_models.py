"""Memory plans of the real models: the activation arena against its lower bound, greedy best-fit and no reuse.

    python benchmarks/memplan_models.py

For GPT-2 (small config), ResNet-18, ViT and BERT-base (configs, random weights),
compiled for the host: the arena hetflow plans for the values that cross fused
groups, the lower bound (the most bytes live at once), TFLite-style greedy by size,
and no reuse (every buffer its own slot). Target: within 1% of the lower bound.
"""
from __future__ import annotations

import sys
import time

from hetflow.examples import models
from hetflow.frontends.torch import capture_module
from hetflow.passes import CompileOptions
from hetflow.pipeline import run_pipeline
from hetflow.report import human_bytes, table

MODELS = {
    "gpt2 (12x768, seq 128)": lambda: models.build_gpt2(n_layer=12, n_embd=768, n_head=12, seq=128, vocab=50257),
    "resnet18": models.build_resnet18,
    "vit-small": lambda: models.build_vit(hidden=384, layers=12, heads=6),
    "bert-base": models.build_bert,
}


def main() -> int:
    rows, ok = [], True
    for name, build in MODELS.items():
        module, inputs = build()
        graph = capture_module(module, inputs).graph
        options = CompileOptions(platform="host")
        start = time.perf_counter()
        run_pipeline(graph, options=options)
        elapsed = time.perf_counter() - start
        for memory, plan in options.results["memory_plan"].spaces.items():
            within = plan.gap <= 0.01
            ok &= within
            rows.append([name, memory, str(plan.buffers), human_bytes(plan.size), human_bytes(plan.lower_bound),
                         f"{100 * plan.gap:.2f}%", human_bytes(plan.greedy), human_bytes(plan.no_reuse),
                         plan.method, f"{plan.seconds:.2f}", "yes" if within else "NO", plan.note[:50]])
        print(f"  {name}: pipeline {elapsed:.1f} s", flush=True)
    print(table(rows, ["model", "memory", "buffers", "arena", "lower bound", "gap", "greedy", "no reuse",
                       "method", "solve s", "within 1%", "note"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
