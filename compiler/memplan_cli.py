"""``hetflow memplan``: the static memory allocator on MiniMalloc's CSV format.

The driver's side of ``hetflow.passes.memplan``: reading and writing the CSV
(``id,lower,upper,size``, one buffer per row; the plan adds an ``offset``
column) and the command line around ``memplan.solve``. The solver itself knows
nothing about files. Run as ``hetflow memplan problem.csv --capacity N [-o plan.csv]``
or ``python -m hetflow.memplan_cli ...``.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from hetflow.passes.memplan import METHODS, Buffer, InfeasibleError, MemplanInputError, solve

__all__ = ["read_csv", "write_csv", "cli"]


# ---------------------------------------------------------------- CSV

def read_csv(path) -> list[Buffer]:
    """Read MiniMalloc's format: a header ``id,lower,upper,size`` (extra columns ignored)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise MemplanInputError(f"{path}: cannot read ({e.strerror})") from None
    rows = csv.reader(text.splitlines())
    header = next(rows, None)
    if header is None:
        raise MemplanInputError(f"{path}:1: empty file; expected a header id,lower,upper,size")
    header = [h.strip() for h in header]
    missing = [c for c in ("id", "lower", "upper", "size") if c not in header]
    if missing:
        raise MemplanInputError(f"{path}:1: missing column(s) {', '.join(missing)} "
                                f"(header is {','.join(header)}; expected id,lower,upper,size)")
    col = {c: header.index(c) for c in ("id", "lower", "upper", "size")}
    buffers, seen = [], {}
    for lineno, row in enumerate(rows, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        where = f"{path}:{lineno}"
        if len(row) < len(header):
            raise MemplanInputError(f"{where}: {len(row)} fields, expected {len(header)}")
        bid = row[col["id"]].strip()
        vals = {}
        for c in ("lower", "upper", "size"):
            raw = row[col[c]].strip()
            try:
                vals[c] = int(raw)
            except ValueError:
                raise MemplanInputError(f"{where}: {c} {raw!r} is not an integer") from None
        if bid in seen:
            raise MemplanInputError(f"{where}: duplicate id {bid!r} (first on line {seen[bid]})")
        seen[bid] = lineno
        if vals["size"] < 0:
            raise MemplanInputError(f"{where}: buffer {bid!r} has negative size {vals['size']}")
        if vals["upper"] <= vals["lower"]:
            raise MemplanInputError(f"{where}: buffer {bid!r} has upper {vals['upper']} <= "
                                    f"lower {vals['lower']} (lifetimes are [lower, upper))")
        buffers.append(Buffer(bid, vals["lower"], vals["upper"], vals["size"]))
    return buffers


def write_csv(path, buffers: list[Buffer], offsets: dict[str, int]) -> None:
    """Write the buffers with an ``offset`` column added."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "lower", "upper", "size", "offset"])
        for b in buffers:
            w.writerow([b.id, b.lower, b.upper, b.size, offsets[b.id]])


# ---------------------------------------------------------------- CLI

_DESCRIPTION = """\
Plan a static memory arena: give every buffer an offset so that buffers that
are live at the same time never overlap, within a capacity.

The input is a CSV in MiniMalloc's format, one buffer per row:

    id,lower,upper,size
    a,0,10,4096
    b,5,20,1024

A buffer is live on the half-open interval [lower, upper) (any integer time
unit: op index, cycle, ...) and needs size bytes.

The output (-o) is the same CSV with an 'offset' column. The summary gives
whether the plan fits, its peak (largest offset + size), the lower bound (the
most bytes live at once, which no plan can beat), the gap between them and the
solve time. Exit status: 0 when a plan fits, 1 when none was found or the input
is malformed.
"""

_EPILOG = """\
methods:
  exact   search over canonical plans (as MiniMalloc) with CP-SAT beside it (default)
  cpsat   OR-Tools CP-SAT, NoOverlap2D over time x address, hinted with greedy
  greedy  TFLite's greedy by size: largest first into the best-fitting gap

example:
  hetflow memplan problem.csv --capacity 1048576 -o plan.csv
"""


def _parser(prog="hetflow memplan"):
    p = argparse.ArgumentParser(prog=prog, description=_DESCRIPTION, epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("problem", help="CSV with columns id,lower,upper,size")
    p.add_argument("--capacity", type=int, default=None,
                   help="bytes available; without it the peak is minimised")
    p.add_argument("--method", choices=METHODS, default="exact", help="solver (default: exact)")
    p.add_argument("--time-limit", type=float, default=60.0, metavar="S",
                   help="a deterministic search budget of about S seconds (the same plan on every run); "
                        "the wall clock stops the search at 3S+1 s as a safety net (default: 60)")
    p.add_argument("--alignment", type=int, default=1, metavar="A",
                   help="every offset a multiple of A bytes (default: 1)")
    p.add_argument("-o", "--output", metavar="OUT.csv", help="write the plan here")
    return p


def cli(argv=None, prog="hetflow memplan") -> int:
    args = _parser(prog).parse_args(argv)
    try:
        buffers = read_csv(args.problem)
        result = solve(buffers, args.capacity, args.time_limit, args.method, args.alignment)
    except (MemplanInputError, InfeasibleError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cap = f" within capacity {args.capacity}" if args.capacity is not None else ""
    print(f"fits{cap}: {len(buffers)} buffers")
    print(f"peak:        {result.peak}")
    print(f"lower bound: {result.lower_bound}")
    print(f"gap:         {100 * result.gap:.2f}%{' (proved optimal)' if result.optimal else ''}")
    print(f"greedy peak: {result.greedy_peak}")
    print(f"method:      {result.method}, {result.solve_seconds:.2f} s")
    if result.note:
        print(f"note:        {result.note}")
    if args.output:
        write_csv(args.output, buffers, result.offsets)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(prog="python3 -m hetflow.memplan_cli"))
