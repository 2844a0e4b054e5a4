"""Static allocation on MiniMalloc's public "challenging" instances (A to K, 1 MiB).

For each instance: the lower bound (most bytes live at once), then greedy by
size, plain CP-SAT (NoOverlap2D, hinted with greedy) and hetflow's exact mode,
each with its peak, whether it fits the capacity, and its solve time.

    python3 benchmarks/memplan.py [--cpsat-limit 60] [--exact-limit 60] [--only A,B]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from hetflow.passes import memplan_search
from hetflow.memplan_cli import read_csv
from hetflow.passes.memplan import InfeasibleError, check_plan, lower_bound, solve

CAPACITY = 1_048_576
DEFAULT_DIR = Path(__file__).resolve().parents[1].parent / "shared/benchmarks/minimalloc"


def _run(bufs, method, limit):
    """(peak or None, fits, seconds) for one method at the benchmark capacity."""
    start = time.perf_counter()
    try:
        plan = solve(bufs, capacity=CAPACITY, time_limit_s=limit, method=method)
    except InfeasibleError:
        secs = time.perf_counter() - start
        if method == "greedy":
            return solve(bufs, method="greedy").peak, False, secs
        return None, False, secs
    check_plan(bufs, plan, capacity=CAPACITY)
    return plan.peak, True, time.perf_counter() - start


def _cell(peak, fits, secs, timed=True):
    text = f"{peak:>9,}" if peak is not None else f"{'-':>9}"
    text += " yes" if fits else "  no"
    return text + (f" {secs:6.1f}s" if timed else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="folder with the *.1048576.csv instances")
    p.add_argument("--cpsat-limit", type=float, default=60.0, help="seconds for plain CP-SAT (default 60)")
    p.add_argument("--exact-limit", type=float, default=60.0, help="seconds for exact mode (default 60)")
    p.add_argument("--only", default="", help="comma-separated instance letters, e.g. A,E")
    p.add_argument("--skip-cpsat", action="store_true", help="leave out plain CP-SAT")
    args = p.parse_args(argv)

    files = sorted(args.dir.glob("*.1048576.csv"))
    if args.only:
        wanted = set(args.only.split(","))
        files = [f for f in files if f.name.split(".")[0] in wanted]
    if not files:
        print(f"no instances in {args.dir}", file=sys.stderr)
        return 1
    engine = "compiled" if memplan_search.native_available() else "Python (no C compiler)"
    print(f"capacity {CAPACITY:,} bytes; {os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}; "
          f"CP-SAT limit {args.cpsat_limit:g} s, exact limit {args.exact_limit:g} s; exact search: {engine}")
    header = (f"{'inst':4} {'buffers':>7} {'lower bound':>11}  {'greedy peak fits':>22}  "
              f"{'cpsat peak fits time':>22}  {'exact peak fits time':>22}")
    print(header)
    print("-" * len(header))
    fits = {"greedy": 0, "cpsat": 0, "exact": 0}
    for path in files:
        bufs = read_csv(path)
        name = path.name.split(".")[0]
        lb = lower_bound(bufs)
        g = _run(bufs, "greedy", 1)
        c = _run(bufs, "cpsat", args.cpsat_limit) if not args.skip_cpsat else (None, False, 0.0)
        e = _run(bufs, "exact", args.exact_limit)
        for key, res in (("greedy", g), ("cpsat", c), ("exact", e)):
            fits[key] += res[1]
        print(f"{name:4} {len(bufs):>7} {lb:>11,}  {_cell(*g)}  {_cell(*c)}  {_cell(*e)}", flush=True)
    print(f"fit within capacity: greedy {fits['greedy']}/{len(files)}, "
          f"cpsat {fits['cpsat']}/{len(files)}, exact {fits['exact']}/{len(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
