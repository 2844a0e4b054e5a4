"""End-to-end latency of hetflow against its peers on this CPU: one table from one run.

    python benchmarks/e2e.py                      # resnet18, vit, bert, gpt2, gpt2-decode; no TVM
    python benchmarks/e2e.py --models resnet18,bert --tvm --json out.json
    python benchmarks/e2e.py --no-inductor --repeat 10
    python benchmarks/e2e.py --no-spin            # on a machine other processes keep busy
    python benchmarks/e2e.py --models resnet18 --hetflow-tvm   # also hetflow --cpu-backend tvm

A default run (no TVM) takes about 5-6 min on this 2-core machine; --tvm adds about 11 min.

Models come from ``hetflow.examples.models`` (transformers configs, random weights, batch 1):
ResNet-18 and ViT-Small/16 at 224x224, BERT-base at seq 128, GPT-2 small prefill of 128 tokens,
and one GPT-2 decode step with a 128-token KV cache (``build_gpt2_decode``; the row is skipped,
with the reason printed, while that builder does not exist).

Columns (every number is measured in this run; nothing is copied from elsewhere):
  eager      torch eager, module.eval() under torch.no_grad()
  inductor   torch.compile(backend="inductor"); its compile time (the first call) in its own column
  ORT        ONNX Runtime on the model's own ONNX export (torch.onnx.export dynamo=True, falling
             back to dynamo=False), ORT_ENABLE_ALL, sequential, intra-op threads = --threads
  TVM        apache-tvm untuned: relax ONNX frontend on the same export, tvm.compile(target="llvm"),
             relax.VirtualMachine (only with --tvm: slow)
  hetflow    hetflow.compile(module, inputs, platform="host"), the compiled callable called with
             torch inputs; its compile time in its own column (cold, into an empty compile cache), and the
             same compile again from the cache in 'hf cached s'
  hf TVM     the same with cpu_backend="tvm": hetflow's CPU partitions compiled by TVM (untuned LLVM)
             instead of run by ONNX Runtime (only with --hetflow-tvm: slow, like the TVM column)
Latencies are medians in ms of up to --repeat runs after --warmup warm-up runs; a cell whose runs
would exceed --budget seconds uses fewer runs (never fewer than 3); the runs are in the JSON.
The ratio columns (hf/ORT, hf/eager) come from --paired interleaved rounds: this VM switches speed
between minutes (the same ONNX Runtime session measured 8 ms, then 12 ms), so cells measured one
after another can see different machines; rounds of short blocks of eager, ORT, hetflow in turn see the
same one.
Targets (issue 6): hetflow <= 1.05x ORT, <= 0.8x eager, hetflow compile < 15 s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform as _platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ALL_MODELS = ["resnet18", "vit", "bert", "gpt2", "gpt2-decode"]
TARGET_ORT, TARGET_EAGER, TARGET_COMPILE_S = 1.05, 0.8, 15.0
TARGET_CACHED_S = 1.0   # issue 17: GPT-2 small under 5 s cold (the compile column) and under 1 s from the cache


def model_specs():
    """name -> (description, builder or None, reason when None)."""
    from hetflow.examples import models
    decode = getattr(models, "build_gpt2_decode", None)
    return {
        "resnet18": ("ResNet-18 224x224 b1", models.build_resnet18, None),
        "vit": ("ViT-Small/16 224x224 b1", lambda: models.build_vit(hidden=384, layers=12, heads=6), None),
        "bert": ("BERT-base seq 128", models.build_bert, None),
        "gpt2": ("GPT-2 small prefill 128",
                 lambda: models.build_gpt2(n_layer=12, n_embd=768, n_head=12, seq=128, vocab=50257), None),
        "gpt2-decode": ("GPT-2 small decode, 128 KV",
                        decode and (lambda: decode(n_layer=12, n_embd=768, n_head=12, context=128, vocab=50257)),
                        None if decode else "hetflow.examples.models has no build_gpt2_decode yet"),
    }


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _check(out, ref) -> str | None:
    """None when ``out`` matches the eager output (float32 tolerance), else what differs."""
    import numpy as np
    if ref is None:
        return None
    out, ref = np.asarray(out), np.asarray(ref)
    if out.shape != ref.shape:
        return f"output shape {out.shape} != eager {ref.shape}"
    diff = float(np.max(np.abs(out.astype(np.float64) - ref))) if out.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 1.0
    if diff > 1e-3 * max(scale, 1.0):
        return f"output differs from eager: max |diff| {diff:.3g} (max |eager| {scale:.3g})"
    return None


def bench_model(name, spec, args, peers, workdir: Path) -> dict:
    desc, builder, skip = spec
    row = {"model": name, "desc": desc, "cells": {}}
    if builder is None:
        row["skipped"] = skip
        return row
    import torch
    module, inputs = builder()
    inputs = tuple(inputs)
    cells = row["cells"]
    ref = None
    runs = {}

    def cell(key, prepare, budget=None):
        nonlocal ref
        t0 = time.perf_counter()
        try:
            run, info = prepare()
            out = run()
            res = peers.measure(run, args.warmup, args.repeat, budget or args.budget)
            res.update(info)
            if key in PAIRED:
                runs[key] = run
            if key == "eager":
                ref = out
            bad = _check(out, ref) if key != "eager" else None
            if bad:
                res["check"] = bad
            cells[key] = res
        except Exception as exc:  # noqa: BLE001 - a failing peer is a table cell, not a crash
            cells[key] = {"error": _reason(exc)}
            if args.verbose:
                traceback.print_exc()
        print(f"  {name:12s} {key:9s} {_fmt_cell(cells[key])}  ({time.perf_counter() - t0:.1f} s)", flush=True)

    cell("eager", lambda: peers.prepare_eager(module, inputs))
    if args.no_inductor:
        cells["inductor"] = {"skipped": "--no-inductor"}
    else:
        cell("inductor", lambda: peers.prepare_inductor(module, inputs))
        torch._dynamo.reset()

    onnx_path = workdir / f"{name}.onnx"
    try:
        t0 = time.perf_counter()
        row["onnx"] = peers.export_onnx(module, inputs, onnx_path)
        print(f"  {name:12s} export    {row['onnx']['exporter']} in {time.perf_counter() - t0:.1f} s", flush=True)
    except Exception as exc:  # noqa: BLE001
        row["onnx"] = {"error": _reason(exc)}
        print(f"  {name:12s} export    FAILED {row['onnx']['error']}", flush=True)
    if "error" in row["onnx"]:
        cells["ort"] = {"error": "no ONNX export: " + row["onnx"]["error"]}
        cells["tvm"] = dict(cells["ort"]) if args.tvm else {"skipped": "needs --tvm"}
    else:
        cell("ort", lambda: peers.prepare_ort(onnx_path, inputs))
        if args.tvm:
            cell("tvm", lambda: peers.prepare_tvm(onnx_path, inputs), budget=args.tvm_budget)
        else:
            cells["tvm"] = {"skipped": "needs --tvm"}
    onnx_path.unlink(missing_ok=True)

    cache_dir = None if args.no_compile_cache else tempfile.mkdtemp(prefix="hetflow-cache-", dir=workdir)
    cell("hetflow", lambda: peers.prepare_hetflow(module, inputs, args.platform, cache_dir=cache_dir),
         budget=args.hetflow_budget)
    if cache_dir is not None:
        shutil.rmtree(cache_dir, ignore_errors=True)
    if args.hetflow_tvm:
        cell("hetflow-tvm", lambda: peers.prepare_hetflow(module, inputs, args.platform, "tvm"), budget=args.tvm_budget)
    if args.paired and "hetflow" in runs and len(runs) > 1:
        row["paired"] = paired(runs, args.paired, args.budget)
        print(f"  {name:12s} paired    " + ", ".join(f"{k} {v:.3f}" for k, v in row["paired"]["ratios"].items())
              + f" (median of {row['paired']['rounds']} rounds)", flush=True)
    del module, runs
    return row


PAIRED = ("eager", "ort", "hetflow")


def paired(runs: dict, rounds: int, budget_s: float, block: int = 3, keys=PAIRED, of: str = "hetflow") -> dict:
    """Rounds in which every peer runs a short block in turn (the order rotating): one untimed call,
    then ``block`` timed calls whose median is the peer's time in that round; the ratios are medians
    of the per-round ratios hetflow / peer (``of`` / peer for each of ``keys``).

    A shared or virtual machine changes speed from one minute to the next (measured here: the same
    ONNX Runtime session at 8 ms, then 12 ms); peers measured one after another see different
    machines, peers interleaved round by round see the same one. The untimed call lets each peer's
    threads and caches come back to the steady state the cells measure.
    """
    import statistics
    keys = [k for k in keys if k in runs]
    per_round = {k: [] for k in keys}
    deadline = time.perf_counter() + 3 * budget_s
    for i in range(rounds):
        for k in keys[i % len(keys):] + keys[:i % len(keys)]:
            runs[k]()
            times = []
            for _ in range(block):
                t0 = time.perf_counter()
                runs[k]()
                times.append(time.perf_counter() - t0)
            per_round[k].append(statistics.median(times))
        if time.perf_counter() > deadline and i >= 4:
            break
    n = len(per_round[of])
    ratios = {f"{of}/{k}": statistics.median(h / p for h, p in zip(per_round[of], per_round[k]))
              for k in keys if k != of}
    return {"rounds": n, "ratios": ratios,
            "median_ms": {k: statistics.median(v) * 1e3 for k, v in per_round.items()}}


# ---------------------------------------------------------------- table
def _fmt_cell(c, key="median_ms") -> str:
    if "error" in c:
        return "FAIL " + c["error"]
    if "skipped" in c:
        return "skip (" + c["skipped"] + ")"
    s = f"{c[key]:.2f} ms median of {c['runs']}"
    if "compile_s" in c:
        s += f", compile {c['compile_s']:.1f} s"
    if "cached_compile_s" in c:
        s += f", cached {c['cached_compile_s']:.2f} s"
    if "check" in c:
        s += f", CHECK: {c['check']}"
    return s


def print_table(rows, args, header: str) -> list[str]:
    notes: list[str] = []

    def note(text):
        if text not in notes:
            notes.append(text)
        return f"[{notes.index(text) + 1}]"

    def ms(c, model):
        if "error" in c:
            return "FAIL" + note(f"{model}: {c['error']}")
        if "skipped" in c:
            return "-"
        mark = "*" + note(f"{model}: {c['check']}") if "check" in c else ""
        v = c["median_ms"]
        return (f"{v:.1f}" if v >= 10 else f"{v:.2f}") + mark

    def secs(c):
        return f"{c['compile_s']:.1f}" if "compile_s" in c and "error" not in c else "-"

    cols = ["model", "eager ms", "inductor ms", "ind. compile s", "ORT ms", "TVM ms", "hetflow ms",
            "hf compile s", "hf cached s", "hf/ORT", "hf/eager", "hf predicted ms"] + (
            ["hf TVM ms", "hf TVM compile s"] if args.hetflow_tvm else [])
    lines = []
    for r in rows:
        if "skipped" in r:
            lines.append([r["model"], "skipped" + note(f"{r['model']}: {r['skipped']}")] + [""] * (len(cols) - 2))
            continue
        c = r["cells"]
        hf, ort_c, eager = c.get("hetflow", {}), c.get("ort", {}), c.get("eager", {})
        ratio_ort = ratio_eager = "-"
        pairs = r.get("paired", {}).get("ratios", {})
        if "hetflow/ort" in pairs or ("median_ms" in hf and "median_ms" in ort_c):
            v = pairs.get("hetflow/ort") or hf["median_ms"] / ort_c["median_ms"]
            ratio_ort = f"{v:.2f}x " + ("met" if v <= TARGET_ORT else "NOT")
        if "hetflow/eager" in pairs or ("median_ms" in hf and "median_ms" in eager):
            v = pairs.get("hetflow/eager") or hf["median_ms"] / eager["median_ms"]
            ratio_eager = f"{v:.2f}x " + ("met" if v <= TARGET_EAGER else "NOT")
        hf_compile = secs(hf)
        if hf_compile != "-":
            hf_compile += " met" if hf["compile_s"] < TARGET_COMPILE_S else " NOT"
        hf_cached = "-"
        if "cached_compile_s" in hf and "error" not in hf:
            hf_cached = f"{hf['cached_compile_s']:.2f}" + (" met" if hf["cached_compile_s"] < TARGET_CACHED_S else " NOT")
        predicted = "-"
        if "predicted_ms" in hf and "median_ms" in hf:
            measured = r.get("paired", {}).get("median_ms", {}).get("hetflow") or hf["median_ms"]
            error = hf["predicted_ms"] / measured - 1
            predicted = f"{hf['predicted_ms']:.1f} ({100 * error:+.0f}% {'met' if abs(error) <= 0.25 else 'NOT'})"
        lines.append([r["model"], ms(eager, r["model"]), ms(c.get("inductor", {"skipped": ""}), r["model"]),
                      secs(c.get("inductor", {})), ms(ort_c, r["model"]), ms(c.get("tvm", {"skipped": ""}), r["model"]),
                      ms(hf, r["model"]), hf_compile, hf_cached, ratio_ort, ratio_eager, predicted]
                     + ([ms(c.get("hetflow-tvm", {"skipped": ""}), r["model"]), secs(c.get("hetflow-tvm", {}))]
                        if args.hetflow_tvm else []))
    widths = [max(len(cols[i]), *(len(l[i]) for l in lines)) if lines else len(cols[i]) for i in range(len(cols))]
    out = [header, ""]
    out.append("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(cols, widths))))
    out.append("  ".join("-" * w for w in widths))
    for l in lines:
        out.append("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(l, widths))))
    out.append("")
    if args.paired:
        out.append(f"hf/ORT and hf/eager: medians of per-round ratios from up to {args.paired} interleaved rounds "
                   "(eager, ORT, hetflow a short block each per round; see --paired), and so is the measured time the "
                   "prediction is compared with; the ms columns are the cells' own runs")
    out.append("hf compile s: the first hetflow.compile into an empty compile cache (capture, passes, the key and the "
               "store); hf cached s: the same compile again, loaded from the cache (its outputs checked equal); "
               "--no-compile-cache: the cold compile alone, no cached column")
    out.append(f"targets: hf/ORT <= {TARGET_ORT}x, hf/eager <= {TARGET_EAGER}x, hetflow compile < {TARGET_COMPILE_S:.0f} s"
               f", cached < {TARGET_CACHED_S:.0f} s"
               ", predicted within 25% of measured (met / NOT); '-' = not run (see options), ratios need both cells")
    out.append("'hf predicted ms' is the only modelled number: the calibrated host platform's predicted latency "
               "('hetflow calibrate' fits it on this machine)")
    for r in rows:
        o = r.get("onnx")
        if o and "error" not in o:
            extra = f" (after: {'; '.join(o['errors'])})" if o.get("errors") else ""
            out.append(f"ONNX export {r['model']}: {o['exporter']}, {o['export_s']:.1f} s{extra}")
    for i, n in enumerate(notes, 1):
        out.append(f"[{i}] {n}")
    print("\n".join(out), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(ALL_MODELS), help="comma list of " + ",".join(ALL_MODELS))
    ap.add_argument("--repeat", type=int, default=20, help="timed runs per cell, at most (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up runs per cell (default 3; 1 if a call takes > 2 s)")
    ap.add_argument("--budget", type=float, default=15.0,
                    help="seconds of timed runs per peer cell before --repeat is cut (min 3 runs; default 15)")
    ap.add_argument("--hetflow-budget", type=float, default=20.0, help="the same for hetflow's cells (default 20)")
    ap.add_argument("--tvm-budget", type=float, default=20.0, help="the same for TVM's cells (default 20)")
    ap.add_argument("--threads", type=int, default=2, help="torch, ORT intra-op and TVM threads (default 2)")
    ap.add_argument("--platform", default="host", help="hetflow platform (default host)")
    ap.add_argument("--no-inductor", action="store_true", help="skip torch.compile (cold compiles take 15-60 s)")
    ap.add_argument("--inductor-cache", action="store_true",
                    help="let inductor use its on-disk caches (default: disabled, so compile times are cold)")
    ap.add_argument("--tvm", action="store_true", help="also run TVM untuned (slow: measured here on a loaded 2-core machine, 1.7 s per ResNet-18 run, 37 s BERT, 77 s GPT-2 prefill; the TVM cells took about 11 min in all)")
    ap.add_argument("--hetflow-tvm", action="store_true",
                    help="also hetflow with cpu_backend='tvm' (its CPU partitions compiled by TVM, untuned: slow)")
    ap.add_argument("--no-spin", action="store_true",
                    help="idle worker threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE, ORT "
                         "allow_spinning=0, TVM spin count 0): use on a machine other processes keep busy")
    ap.add_argument("--paired", type=int, default=20,
                    help="interleaved rounds of eager, ORT and hetflow after the cells (default 20; 0: off): the "
                         "ratio columns then come from runs on the same machine state, not from separate minutes")
    ap.add_argument("--no-compile-cache", action="store_true",
                    help="hetflow's compile with the compile cache off (no 'hf cached s' column)")
    ap.add_argument("--json", help="write every measured number to this file")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failing cells")
    args = ap.parse_args(argv)

    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in ALL_MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ALL_MODELS)}")
    if not args.inductor_cache:
        os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    import peers
    peers.set_threads(args.threads, spin=not args.no_spin)
    import warnings
    warnings.filterwarnings("ignore")
    import logging
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    import numpy as np
    import onnxruntime
    import torch
    import hetflow

    load_start = os.getloadavg()
    start = time.perf_counter()
    specs = model_specs()
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), _platform.processor()) if Path("/proc/cpuinfo").exists() else _platform.processor()
    versions = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
                "python": _platform.python_version()}
    if args.tvm or args.hetflow_tvm:
        try:
            import tvm
            versions["tvm"] = tvm.__version__
        except ImportError as exc:
            versions["tvm"] = f"not importable ({exc})"
    print(f"e2e: {', '.join(names)} on {cpu}, {os.cpu_count()} cores; {args.threads} threads for every peer "
          f"(torch.set_num_threads, ORT intra_op_num_threads, TVM_NUM_THREADS)", flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="hetflow-e2e-") as tmp:
        for name in names:
            t0 = time.perf_counter()
            try:
                row = bench_model(name, specs[name], args, peers, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - e.g. the builder itself failed
                row = {"model": name, "desc": specs[name][0], "skipped": "building the model failed: " + _reason(exc)}
            row["seconds"] = time.perf_counter() - t0
            if "skipped" in row:
                print(f"  {name:12s} skipped: {row['skipped']}", flush=True)
            rows.append(row)
    elapsed = time.perf_counter() - start
    load_end = os.getloadavg()
    load = (f"1-min load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end "
            f"({os.cpu_count()} cores; above the core count, other processes inflate these numbers"
            + ("" if args.no_spin or max(load_start[0], load_end[0]) < os.cpu_count() else
               ", spinning threads (eager, inductor, ORT, TVM) most of all: rerun with --no-spin or on an idle machine")
            + ")")

    header = (f"\nhetflow e2e, batch 1, CPU only: {cpu}, {os.cpu_count()} cores, {args.threads} threads for every peer "
              f"(torch.set_num_threads, ORT intra_op_num_threads + sequential, TVM_NUM_THREADS); "
              f"idle threads {'sleep (--no-spin)' if args.no_spin else 'spin (each library default)'}.\n"
              f"Every number below was measured in this run: median ms of up to {args.repeat} runs after "
              f"{args.warmup} warm-up runs (fewer runs, min 3, where a cell would exceed its time budget).\n"
              f"torch {versions['torch']}, onnxruntime {versions['onnxruntime']}"
              + (f", tvm {versions['tvm']}" if "tvm" in versions else "")
              + f"; inductor compile {'with caches' if args.inductor_cache else 'cold (caches disabled)'}; "
              f"hetflow platform={args.platform}; models: "
              + "; ".join(f"{n} = {specs[n][0]}" for n in names) + ".\n" + load)
    print_table(rows, args, header)
    print(f"\ntotal run time {elapsed:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "cpu": cpu, "cores": os.cpu_count(), "threads": args.threads, "versions": versions,
            "options": vars(args), "seconds": elapsed, "loadavg_start": load_start, "loadavg_end": load_end, "rows": rows,
            "targets": {"hf_over_ort": TARGET_ORT, "hf_over_eager": TARGET_EAGER, "compile_s": TARGET_COMPILE_S},
        }, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
