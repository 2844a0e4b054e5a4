"""PyTorch coverage, measured: every torch model of the zoo through hetflow's torch frontend and torch.compile.

    python benchmarks/zoo.py                         # the whole zoo (about 10-15 min on this 2-core machine)
    python benchmarks/zoo.py --models bert,swin      # some of it
    python benchmarks/zoo.py --json out.json

The zoo is ``hetflow.examples.zoo``: transformers and diffusers architectures built from configs at toy sizes
with random weights (nothing downloaded). For each torch model, in this process:

  captured   hetflow.compile(module, inputs, platform="host") succeeded (torch.export capture, the pipeline,
             ONNX Runtime partitions); else the first line of its error, which names the op
  equal      its output equals torch eager within the zoo entry's tolerance (relative to the output's
             largest magnitude; max relative error printed)
  tc equal   the same through torch.compile(module, backend="hetflow")
  eager / hetflow / ORT / tc   median ms of interleaved runs in the same rounds: torch eager under no_grad,
             the compiled model, ONNX Runtime on torch's own ONNX export (dynamo, else TorchScript; "-"
             where torch cannot export the model), torch.compile(backend="hetflow")

The last line: ``captured N/M, equal N/M, torch.compile equal N/M`` (issue #14's targets: 95% captured and
equal). Every number is measured in this run on this machine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:160]


def relative_error(got, expected) -> float:
    """Max |got - expected| over the largest |expected|, the worst over every output (a tuple: each)."""
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return float("inf")
        return max(relative_error(g, e) for g, e in zip(got, expected))
    got, expected = got.detach().float(), expected.detach().float()
    scale = max(float(expected.abs().max()), 1e-30)
    return float((got - expected).abs().max()) / scale


def interleaved(runs: dict, rounds: int, per_round: int = 3) -> dict:
    """Median ms of each callable, measured in rounds where every callable runs ``per_round`` times in turn."""
    times = {name: [] for name in runs}
    for run in runs.values():  # warm-up: first calls allocate, compile kernels, build caches
        run()
    for _ in range(rounds):
        for name, run in runs.items():
            for _ in range(per_round):
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


@contextlib.contextmanager
def quiet():
    """Silence file descriptors 1 and 2 (torch's exporters print whole graphs from C++ when they fail)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def bench(name: str, entry, rounds: int, workdir: Path) -> dict:
    import torch

    import hetflow
    row = {"model": name, "family": entry.family}
    torch._dynamo.reset()
    module, inputs = entry.build()
    with torch.no_grad():
        expected = module(*inputs)
    runs = {"eager": lambda: module(*inputs)}
    start = time.perf_counter()
    try:
        compiled = hetflow.compile(module, inputs, platform="host", cache=False)
        row["compile_s"] = time.perf_counter() - start
        row["captured"] = True
        got = compiled(*inputs)
        row["error"] = relative_error(got, expected)
        row["equal"] = row["error"] <= entry.rtol
        runs["hetflow"] = lambda: compiled(*inputs)
    except Exception as exc:  # noqa: BLE001  (recorded: the row says why)
        row.update(captured=False, equal=False, why=first_line(exc))
    try:
        fast = torch.compile(module, backend="hetflow")
        with torch.no_grad():
            got = fast(*inputs)
        row["tc_error"] = relative_error(got, expected)
        row["tc_equal"] = row["tc_error"] <= entry.rtol
        runs["tc"] = lambda: fast(*inputs)
    except Exception as exc:  # noqa: BLE001
        row.update(tc_equal=False, tc_why=first_line(exc))
    try:
        from peers import export_onnx, prepare_ort
        path = workdir / f"{name}.onnx"
        with quiet():
            export_onnx(module, inputs, path)
        runs["ort"], _ = prepare_ort(path, inputs)
    except Exception as exc:  # noqa: BLE001  (torch cannot export every model)
        row["ort_why"] = first_line(exc)
    with torch.no_grad():
        row.update({f"{k}_ms": v for k, v in interleaved(runs, rounds).items()})
    return row


def cell(row: dict, key: str) -> str:
    value = row.get(f"{key}_ms")
    return "-" if value is None else f"{value:.2f}"


def main(argv=None) -> int:
    import warnings
    warnings.filterwarnings("ignore")  # transformers' and torch's deprecation chatter, not results
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    from hetflow.examples.zoo import ZOO
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated zoo names (default: every torch model)")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (each runs every peer 3 times)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else [n for n, m in ZOO.items() if m.kind == "torch"]
    rows = []
    header = f"{'model':16s} {'family':8s} {'capt':>4s} {'equal':>9s} {'tc eq':>9s} {'eager':>8s} {'hetflow':>8s} " \
             f"{'ORT':>8s} {'tc':>8s} {'hf/eager':>8s} {'hf/ORT':>7s}"
    print(header, flush=True)
    with tempfile.TemporaryDirectory(prefix="hetflow-zoo-") as workdir:
        for name in names:
            row = bench(name, ZOO[name], args.rounds, Path(workdir))
            rows.append(row)
            ratio = lambda a, b: f"{row[a + '_ms'] / row[b + '_ms']:.2f}" if f"{a}_ms" in row and f"{b}_ms" in row \
                else "-"
            equal = f"{row['error']:.0e}" if "error" in row else "-"
            tc = f"{row['tc_error']:.0e}" if "tc_error" in row else "-"
            print(f"{name:16s} {row['family']:8s} {'yes' if row['captured'] else 'NO':>4s} "
                  f"{(equal + (' ' if row['equal'] else '!')):>9s} {(tc + (' ' if row['tc_equal'] else '!')):>9s} "
                  f"{cell(row, 'eager'):>8s} {cell(row, 'hetflow'):>8s} {cell(row, 'ort'):>8s} {cell(row, 'tc'):>8s} "
                  f"{ratio('hetflow', 'eager'):>8s} {ratio('hetflow', 'ort'):>7s}", flush=True)
            for key in ("why", "tc_why"):
                if key in row:
                    print(f"    {'torch.compile' if key == 'tc_why' else 'hetflow.compile'}: {row[key]}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    total = len(rows)
    print(f"captured {sum(r['captured'] for r in rows)}/{total}, equal {sum(r['equal'] for r in rows)}/{total}, "
          f"torch.compile equal {sum(r['tc_equal'] for r in rows)}/{total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
