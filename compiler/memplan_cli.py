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
import io
import re
import sys
from pathlib import Path

from hetflow.passes.memplan import METHODS, VALUE_LIMIT, Buffer, InfeasibleError, MemplanInputError, solve

__all__ = ["read_csv", "read_problem_csv", "write_csv", "cli"]


# ---------------------------------------------------------------- CSV

COLUMNS = ("id", "lower", "upper", "size")
_INTEGER = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: no '1_000', no other scripts' digits
_SHOWN = 40  # characters of a bad value or id quoted in a message


def read_csv(path) -> list[Buffer]:
    """Read MiniMalloc's format from a file (see ``read_problem_csv``)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MemplanInputError(f"{path}: cannot read ({e.strerror})") from None
    return read_problem_csv(data, name=str(path))


def read_problem_csv(data: bytes | str, name: str = "<csv>") -> list[Buffer]:
    """The buffers of a CSV in MiniMalloc's format: a header ``id,lower,upper,size`` (extra columns
    ignored), one buffer per row.

    Any input either gives the buffers or raises MemplanInputError with one line that names
    ``name``, the line and the buffer: nothing else is raised (a fuzz target).
    """
    rows = csv.reader(io.StringIO(_decode(data, name), newline=""))
    try:
        header = next((row for row in rows if not _blank(row)), None)
        if header is None:
            raise MemplanInputError(f"{name}:1: empty file; expected a header id,lower,upper,size")
        col = _columns([h.strip() for h in header], name, rows.line_num)
        buffers, seen = [], {}
        for row in rows:
            if _blank(row):
                continue
            buffer = _buffer(row, col, len(header), f"{name}:{rows.line_num}")
            if buffer.id in seen:
                raise MemplanInputError(f"{name}:{rows.line_num}: duplicate id {_shown(buffer.id)} "
                                        f"(first on line {seen[buffer.id]})")
            seen[buffer.id] = rows.line_num
            buffers.append(buffer)
    except csv.Error as e:
        raise MemplanInputError(f"{name}:{rows.line_num}: not valid CSV ({e})") from None
    return buffers


def _blank(row: list[str]) -> bool:
    return all(not c.strip() for c in row)


def _decode(data: bytes | str, name: str) -> str:
    """The text of the file: UTF-8 (a leading byte-order mark is dropped)."""
    if isinstance(data, str):
        return data.removeprefix("\ufeff")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise MemplanInputError(f"{name}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} "
                                f"at offset {e.start})") from None


def _columns(header: list[str], name: str, line: int) -> dict[str, int]:
    """The position of each of id, lower, upper and size in the header (on ``line``)."""
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise MemplanInputError(f"{name}:{line}: missing column(s) {', '.join(missing)} "
                                f"(header is {_shown(','.join(header))}; expected id,lower,upper,size)")
    twice = [c for c in COLUMNS if header.count(c) > 1]
    if twice:
        raise MemplanInputError(f"{name}:{line}: column(s) {', '.join(twice)} appear more than once")
    return {c: header.index(c) for c in COLUMNS}


def _buffer(row: list[str], col: dict[str, int], width: int, where: str) -> Buffer:
    """One row as a Buffer, or MemplanInputError naming ``where`` and the buffer."""
    if len(row) < width:
        raise MemplanInputError(f"{where}: {len(row)} fields, expected {width}")
    bid = row[col["id"]].strip()
    if not bid:
        raise MemplanInputError(f"{where}: empty id")
    values = {c: _integer(row[col[c]].strip(), c, bid, where) for c in ("lower", "upper", "size")}
    if values["size"] < 0:
        raise MemplanInputError(f"{where}: buffer {_shown(bid)} has negative size {values['size']}")
    if values["upper"] <= values["lower"]:
        raise MemplanInputError(f"{where}: buffer {_shown(bid)} has upper {values['upper']} <= "
                                f"lower {values['lower']} (lifetimes are [lower, upper))")
    return Buffer(bid, values["lower"], values["upper"], values["size"])


def _integer(raw: str, column: str, bid: str, where: str) -> int:
    """A field as an integer within [-2**62, 2**62]."""
    if not _INTEGER.fullmatch(raw):
        raise MemplanInputError(f"{where}: {column} {_shown(raw)} is not an integer")
    digits = raw.lstrip("+-").lstrip("0")
    if len(digits) > 19 or abs(int(raw)) > VALUE_LIMIT:  # the length first: int() of 5,000 digits raises
        raise MemplanInputError(f"{where}: buffer {_shown(bid)} has {column} {_shown(raw, quote=False)}, "
                                f"beyond the limit 2**62 ({VALUE_LIMIT})")
    return int(raw)


def _shown(text: str, quote: bool = True) -> str:
    """``text`` for a one-line message: quoted with escapes, cut to ``_SHOWN`` characters."""
    cut = text if len(text) <= _SHOWN else text[:_SHOWN] + "..."
    return repr(cut) if quote else cut


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
        return _failed(str(e))
    _print_summary(args, buffers, result)
    if args.output:
        try:
            write_csv(args.output, buffers, result.offsets)
        except OSError as e:
            return _failed(f"{args.output}: cannot write the plan ({e.strerror})")
        print(f"wrote {args.output}")
    return 0


def _failed(message: str) -> int:
    """Say ``message`` on one line as the hetflow command does; the exit status 1."""
    print(f"hetflow: error: {message}", file=sys.stderr)
    return 1


def _print_summary(args, buffers: list[Buffer], result) -> None:
    cap = f" within capacity {args.capacity}" if args.capacity is not None else ""
    print(f"fits{cap}: {len(buffers)} buffers")
    print(f"peak:        {result.peak}")
    print(f"lower bound: {result.lower_bound}")
    print(f"gap:         {100 * result.gap:.2f}%{' (proved optimal)' if result.optimal else ''}")
    print(f"greedy peak: {result.greedy_peak}")
    print(f"method:      {result.method}, {result.solve_seconds:.2f} s")
    if result.note:
        print(f"note:        {result.note}")


if __name__ == "__main__":
    sys.exit(cli(prog="python3 -m hetflow.memplan_cli"))
