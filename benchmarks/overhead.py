"""Per-call latency where the work per call is small: hetflow's loaded artifact against ONNX Runtime, paired.

    python benchmarks/overhead.py                         # the tiny MLP (host, mobile-soc) and seven zoo models
    python benchmarks/overhead.py --models t5,bert --rounds 60
    python benchmarks/overhead.py --threads 2 --no-spin   # two intra-op threads on both sides
    python benchmarks/overhead.py --json out.json

Each model is built in torch (the 16-32-4 MLP; the zoo's toy transformers, audio encoders and UNet,
``hetflow.examples.zoo``, random weights, nothing downloaded), exported to ONNX by torch (``peers.export_onnx``)
and compiled from that file as ``hetflow compile`` does, saved, and loaded with ``hetflow.runtime.load``. The
peers, on the same export and the same inputs, in this process:

  hetflow    ``load(path, threads=T, spin=S).run(feeds)``, what a user of the artifact calls
  ORT run    ``InferenceSession.run(None, feeds)``, ORT_ENABLE_ALL, sequential, the same T and S
  ORT bind   the same session through an IOBinding with the inputs and outputs bound once (ORT's floor)

Both sides use the same intra-op thread count (``--threads``, default 1) and the same spinning policy. One
thread is the default because two sessions whose idle threads spin (ONNX Runtime's default) take each other's
cores on a 2-core machine: a paired measurement with spinning pools measures which pool was still spinning.
Timing: ``--rounds`` rounds; in each, every peer runs a block of calls in turn (the order rotated each round),
the block's mean is one sample; medians over rounds, by the wall clock and by the calling thread's CPU time
(``time.thread_time``). With one intra-op thread ONNX Runtime computes in the calling thread, so its CPU
time is the whole cost of a call, and unlike the wall clock it does not count the time other processes
of a shared machine held the core; the targets are judged on it then, and on the wall clock with more
threads. The outputs are checked against ORT's first.

The last line compares the ratios with issue #17's targets: the tiny MLP on host at or below 1.25x ORT's plain
``run``, and the geometric mean over the small models (those ORT runs in under 5 ms here) at or below 1.0x.
Every number is measured in this run on this machine; on a shared machine they move from run to run.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_MODELS = ["t5", "bart", "whisper_encoder", "wav2vec2", "deberta_v2", "bert", "unet2d"]
TARGET_MLP, TARGET_GEOMEAN, SMALL_MS = 1.25, 1.0, 5.0
PEERS = ("hetflow", "ort_run", "ort_bind")


def tiny_mlp():
    """The issue's 16-32-4 MLP, batch 1."""
    import torch
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    return module, (torch.randn(1, 16),)


def ort_session(path: Path, threads: int, spin: bool):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bound_call(session, feeds: dict):
    """ORT's IOBinding with the inputs and outputs bound once: a call is ``run_with_iobinding`` alone."""
    import numpy as np
    binding = session.io_binding()
    kept = []
    for name, array in feeds.items():
        binding.bind_cpu_input(name, array)
    for meta, result in zip(session.get_outputs(), session.run(None, feeds)):
        out = np.empty_like(result)
        kept.append(out)
        binding.bind_output(meta.name, "cpu", 0, out.dtype, out.shape, out.ctypes.data)

    def run():
        session.run_with_iobinding(binding)
        return kept  # (the bound outputs live as long as this call does)
    return run


def paired(runs: dict, rounds: int, block: int) -> tuple[dict, dict]:
    """Median seconds per call of each peer over ``rounds`` rounds of ``block`` calls each, order rotated:
    by the wall clock, and by this thread's CPU time (what the call cost, whatever else the machine ran)."""
    names = list(runs)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for run in runs.values():  # warm-up
        for _ in range(3):
            run()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            run = runs[name]
            start, start_cpu = time.perf_counter(), time.thread_time()
            for _ in range(block):
                run()
            cpu[name].append((time.thread_time() - start_cpu) / block)
            wall[name].append((time.perf_counter() - start) / block)
    return ({name: statistics.median(s) for name, s in wall.items()},
            {name: statistics.median(s) for name, s in cpu.items()})


def block_for(seconds_per_call: float) -> int:
    """Calls per timed block: about 2 ms of work, at least 1, at most 200."""
    return max(1, min(200, int(2e-3 / max(seconds_per_call, 1e-7))))


def prepare(name: str, build, platform: str, workdir: Path, args):
    """Export, compile, save, load; return the three peers' calls and what was checked."""
    import numpy as np
    import torch

    import hetflow
    from hetflow.runtime import load
    from peers import export_onnx, flat_tensors
    from zoo import quiet
    module, inputs = build()
    onnx_path = workdir / f"{name}.onnx"
    if not onnx_path.exists():
        with quiet(), torch.no_grad():
            export_onnx(module, inputs, onnx_path)
    artifact = workdir / f"{name}-{platform}"
    hetflow.compile(str(onnx_path), platform=platform).save(artifact)
    model = load(artifact, threads=args.threads, spin=args.spin)
    session = ort_session(onnx_path, args.threads, args.spin)
    arrays = [t.detach().numpy() for t in flat_tensors(inputs)]
    feeds = dict(zip([i.name for i in session.get_inputs()], arrays))
    ours = dict(zip(model.input_names, arrays))
    expected = session.run(None, feeds)[0]
    got = model.run(ours)[model.output_names[0]]
    error = float(np.abs(got - expected).max() / max(float(np.abs(expected).max()), 1e-30))
    runs = {"hetflow": lambda: model.run(ours), "ort_run": lambda: session.run(None, feeds),
            "ort_bind": bound_call(session, feeds)}
    info = {"partitions": len(model.partitions), "lean": model.executor.lean_refused or "yes", "error": error}
    return runs, info


def measure(name: str, build, platform: str, workdir: Path, args) -> dict:
    runs, info = prepare(name, build, platform, workdir, args)
    start = time.perf_counter()
    runs["ort_run"]()
    block = block_for(time.perf_counter() - start)
    wall, cpu = paired(runs, args.rounds, block)
    row = {"model": name, "platform": platform, **info, **{f"{p}_us": wall[p] * 1e6 for p in PEERS},
           **{f"{p}_cpu_us": cpu[p] * 1e6 for p in PEERS}}
    for suffix, medians in (("", wall), ("_cpu", cpu)):
        row[f"vs_run{suffix}"] = medians["hetflow"] / medians["ort_run"]
        row[f"vs_bind{suffix}"] = medians["hetflow"] / medians["ort_bind"]
    return row


HEADER = (f"{'model':16s} {'platform':10s} {'parts':>5s} {'lean path':>10s} {'error':>7s} {'hetflow':>9s} "
          f"{'ORT run':>9s} {'ORT bind':>9s} {'hf/run':>7s} {'hf/bind':>7s} | {'hetflow':>9s} {'ORT run':>9s} "
          f"{'ORT bind':>9s} {'hf/run':>7s} {'hf/bind':>7s}")


def print_row(row: dict) -> None:
    def us(v):
        return f"{v:9.1f}" if v < 1e4 else f"{v / 1e3:7.2f}ms"
    cells = [f"{us(row[f'{p}{clock}_us'])}" for clock in ("", "_cpu") for p in PEERS]
    print(f"{row['model']:16s} {row['platform']:10s} {row['partitions']:>5d} {row['lean'][:10]:>10s} "
          f"{row['error']:7.0e} {' '.join(cells[:3])} {row['vs_run']:7.2f} {row['vs_bind']:7.2f} | "
          f"{' '.join(cells[3:])} {row['vs_run_cpu']:7.2f} {row['vs_bind_cpu']:7.2f}", flush=True)


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated zoo names for the small-model rows (the MLP always runs)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads, the same on both sides")
    parser.add_argument("--no-spin", dest="spin", action="store_false",
                        help="idle ONNX Runtime threads sleep instead of spinning (both sides)")
    parser.add_argument("--rounds", type=int, default=40, help="paired rounds per model")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    import peers
    peers.set_threads(args.threads, args.spin)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    from hetflow.examples.zoo import ZOO
    print(f"intra-op threads {args.threads} on both sides, spinning {'on' if args.spin else 'off'}, "
          f"{args.rounds} paired rounds; times are medians per call in us", flush=True)
    print(f"{'':73s}wall clock{'':44s}| this thread's CPU time", flush=True)
    print(HEADER, flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hetflow-overhead-") as tmp:
        workdir = Path(tmp)
        for platform in ("host", "mobile-soc"):
            rows.append(measure("mlp-16-32-4", tiny_mlp, platform, workdir, args))
            print_row(rows[-1])
        for name in [n for n in args.models.split(",") if n]:
            try:
                rows.append(measure(name, ZOO[name].build, "host", workdir, args))
            except Exception as exc:  # noqa: BLE001  (the row says why; the summary counts what ran)
                print(f"{name:16s} skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
                continue
            print_row(rows[-1])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    wrong = [r["model"] for r in rows if r["error"] > 1e-4]
    # the clock the targets are judged by: the thread's CPU time when ORT computes in the calling thread alone
    # (one intra-op thread: robust to what else this shared machine runs), else the wall clock
    clock = "_cpu" if args.threads == 1 else ""
    mlp = next(r for r in rows if r["model"] == "mlp-16-32-4" and r["platform"] == "host")
    small = [r for r in rows if r["model"] != "mlp-16-32-4" and r[f"ort_run{clock}_us"] < SMALL_MS * 1e3]

    def geomean(key):
        return math.exp(statistics.fmean(math.log(r[key]) for r in small)) if small else float("nan")
    ratio = geomean(f"vs_run{clock}")
    print(f"measured ({'CPU time' if clock else 'wall clock'}; wall clock: MLP {mlp['vs_run']:.2f}x, geomean "
          f"{geomean('vs_run'):.2f}x): tiny MLP {mlp[f'vs_run{clock}']:.2f}x ORT run (target <= {TARGET_MLP}: "
          f"{'met' if mlp[f'vs_run{clock}'] <= TARGET_MLP else 'NOT met'}), {mlp[f'vs_bind{clock}']:.2f}x ORT "
          f"IOBinding; {len(small)} models under {SMALL_MS:g} ms geomean {ratio:.2f}x ORT run (target <= "
          f"{TARGET_GEOMEAN}: {'met' if ratio <= TARGET_GEOMEAN and len(small) >= 6 else 'NOT met'}), "
          f"{geomean(f'vs_bind{clock}'):.2f}x IOBinding; threads {args.threads}, spin {'on' if args.spin else 'off'}"
          + (f"; OUTPUTS DIFFER: {', '.join(wrong)}" if wrong else "; outputs equal ORT's within 1e-4"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
