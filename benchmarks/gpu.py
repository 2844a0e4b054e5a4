"""hetflow on a real CUDA GPU (``host+cuda``) against PyTorch on the same GPU: one table from one run.

    python benchmarks/gpu.py                                  # resnet18, gpt2 (prefill 128), gpt2-decode
    python benchmarks/gpu.py --models resnet18 --no-triton --json out.json

Needs a CUDA GPU (it says so and exits 2 without one). Every number is measured in this run.
Each call takes CPU tensors (NumPy arrays for hetflow) and returns CPU results, so every column
pays the same host-to-GPU copy of the inputs and GPU-to-host copy of the output:

  eager       torch eager on the GPU: module.cuda(), inputs copied in, output copied out
  inductor    torch.compile(module) (Triton kernels) on the GPU, the same copies; compile time apart
  hf torch    hetflow.compile(..., platform="host+cuda"), GPU partitions run with PyTorch's kernels,
              each partition one CUDA graph replay
  hf triton   the same with gpu_kernels="triton": the GPU partitions' programs compiled by
              torch.compile into Triton kernels, each partition one CUDA graph replay

Every column computes in f32: TF32 is off for cuDNN convolutions (PyTorch's default rounds them to
TF32; hetflow's GPU programs never do) and for matmuls (PyTorch's default).
Latencies are medians in ms of --repeat runs after --warmup warm-up runs. ``predicted`` is the
host+cuda platform's modelled makespan (its GPU figures are measured by hetflow's CUDA calibration).
``err`` is the largest difference from eager, relative to eager's largest magnitude.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import _first, measure  # noqa: E402  (the e2e benchmark's helpers)

ALL_MODELS = ["resnet18", "gpt2", "gpt2-decode"]


def model_specs():
    from hetflow.examples import models
    return {
        "resnet18": ("ResNet-18 224x224 b1", models.build_resnet18),
        "vit": ("ViT-Small/16 224x224 b1", lambda: models.build_vit(hidden=384, layers=12, heads=6)),
        "bert": ("BERT-base seq 128", models.build_bert),
        "gpt2": ("GPT-2 small prefill 128",
                 lambda: models.build_gpt2(n_layer=12, n_embd=768, n_head=12, seq=128, vocab=50257)),
        "gpt2-decode": ("GPT-2 small decode, 128 KV",
                        lambda: models.build_gpt2_decode(n_layer=12, n_embd=768, n_head=12, context=128,
                                                         vocab=50257)),
    }


def torch_on_gpu(module, inputs, compiled: bool):
    import torch
    module = module.eval().cuda()
    if compiled:
        torch._dynamo.reset()
        module = torch.compile(module)

    def run():
        with torch.inference_mode():
            out = _first(module(*[t.cuda() for t in inputs]))
        return out
    start = time.perf_counter()
    first = run()
    return run, first, time.perf_counter() - start


def hetflow_on_gpu(module, inputs, kernels: str):
    import hetflow
    from hetflow.runtime.runners.cuda import GpuPartition
    start = time.perf_counter()
    compiled = hetflow.compile(module.cpu(), inputs, platform="host+cuda", gpu_kernels=kernels)
    compile_s = time.perf_counter() - start
    names = compiled.input_names
    feeds = {n: t.numpy() for n, t in zip(names, inputs)}
    executor = compiled.executor

    def run():
        return next(iter(executor.run(feeds).values()))
    start = time.perf_counter()
    first = run()
    load_s = time.perf_counter() - start
    parts = compiled.partitions
    runners = [r for r in executor.runners if isinstance(r, GpuPartition)]
    info = {"compile_s": compile_s, "first_call_s": load_s,
            "predicted_ms": compiled.schedule.makespan * 1e3 if compiled.schedule else None,
            "partitions": {d: sum(p.device == d for p in parts) for d in sorted({p.device for p in parts})},
            "cuda_graphs": sum(r.graph is not None for r in runners), "gpu_partitions": len(runners),
            "notes": [r.note for r in runners if r.note]}
    return run, first, info


def bench(name, description, build, args) -> dict:
    import torch
    row = {"model": name, "description": description}
    torch.manual_seed(0)
    module, inputs = build()
    inputs = tuple(inputs)
    reference = None
    peers = [("eager", lambda: torch_on_gpu(module, inputs, compiled=False))]
    if not args.no_triton:
        peers.append(("inductor", lambda: torch_on_gpu(module, inputs, compiled=True)))
    peers.append(("hf torch", lambda: hetflow_on_gpu(module, inputs, "torch")))
    if not args.no_triton:
        peers.append(("hf triton", lambda: hetflow_on_gpu(module, inputs, "triton")))
    for column, prepare in peers:
        try:
            run, first, info = prepare()
            cell = measure(run, args.warmup, args.repeat, budget_s=1e9, min_repeat=args.repeat)
            if isinstance(info, dict):
                cell.update(info)
            else:
                cell["compile_s"] = info
            if reference is None:
                reference = first
            else:
                scale = max(1.0, float(np.abs(reference).max()))
                cell["err"] = float(np.abs(first.astype(np.float64) - reference).max()) / scale
            row[column] = cell
        except Exception as exc:  # noqa: BLE001  (a failed cell is reported, the run goes on)
            row[column] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"}
            traceback.print_exc()
        print(f"  {name} {column}: {row[column]}", flush=True)
    return row


def print_table(rows) -> None:
    columns = ["eager", "inductor", "hf torch", "hf triton"]
    header = f"{'model':28s}" + "".join(f"{c:>11s}" for c in columns) + "  hf/eager  hf/ind  predicted  err  GPU parts"
    print(header)
    for row in rows:
        cells = []
        for c in columns:
            cell = row.get(c)
            missing = "-" if not cell else "fail"
            cells.append(f"{cell['median_ms']:9.2f}ms" if cell and "median_ms" in cell else f"{missing:>11s}")
        best = min((row[c]["median_ms"], c) for c in ("hf torch", "hf triton") if "median_ms" in row.get(c, {})) \
            if any("median_ms" in row.get(c, {}) for c in ("hf torch", "hf triton")) else None
        eager = row.get("eager", {}).get("median_ms")
        inductor = row.get("inductor", {}).get("median_ms")
        hf = row.get(best[1]) if best else {}
        ratio_eager = f"{best[0] / eager:8.2f}" if best and eager else f"{'-':>8s}"
        ratio_ind = f"{best[0] / inductor:7.2f}" if best and inductor else f"{'-':>7s}"
        predicted = f"{hf.get('predicted_ms'):8.2f}ms" if hf and hf.get("predicted_ms") else f"{'-':>10s}"
        err = f"{hf.get('err', 0):.0e}" if hf else "-"
        parts = (f"{hf.get('cuda_graphs')}/{hf.get('gpu_partitions')} graphs, {hf.get('partitions')}"
                 if hf else "-")
        print(f"{row['description']:28s}" + "".join(f"{c:>11s}" for c in cells)
              + f"  {ratio_eager}  {ratio_ind}  {predicted}  {err}  {parts}")
    print("hf/eager and hf/ind use the faster hetflow column; compile times are in the JSON.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ALL_MODELS),
                        help=f"comma-separated, of {', '.join(model_specs())}")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--no-triton", action="store_true", help="skip the two Triton columns (no compile waits)")
    parser.add_argument("--json", metavar="FILE", help="write every cell (and compile times) here")
    args = parser.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU; this machine has none", file=sys.stderr)
        return 2
    torch.backends.cudnn.allow_tf32 = False  # every column computes in f32, as hetflow's GPU programs do
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; f32 throughout (no TF32)", flush=True)
    specs = model_specs()
    rows = []
    for name in args.models.split(","):
        description, build = specs[name]
        rows.append(bench(name, description, build, args))
        if args.json:
            Path(args.json).write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "rows": rows}, indent=1))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
