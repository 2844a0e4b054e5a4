"""The results table of a sweep: one row per point, keyed by the point's hash, streamed to disk as rows finish.

A study that is interrupted (Ctrl-C, a killed driver, a lost cluster) resumes from its table: the points
whose key is there are not computed again. Two files make that safe without a database:

- ``results.parquet`` (or ``results.csv``): the table, rewritten whole and atomically (a temporary file
  renamed over it) at most once a second while the study runs and once at its end, so a reader never sees
  half a file;
- ``results.parquet.rows.jsonl``: a journal beside it, one JSON line appended and flushed per finished row,
  so a row that finished after the last rewrite is not lost when the driver dies. Rewriting the table
  empties the journal; a row in both (a death between the two) is read once, by its key.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from hetflow.ir.errors import HetflowError

KEY = "point"
REWRITE_SECONDS = 1.0


class SweepTableError(HetflowError):
    pass


class ResultTable:
    """Rows by point key, in the order they finished; ``add`` streams one to disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.suffix not in (".parquet", ".csv"):
            raise SweepTableError(f"{self.path}: the results table is a .parquet or .csv file")
        self.journal = self.path.with_name(self.path.name + ".rows.jsonl")
        self.rows: dict[str, dict] = {}
        self._last_write = 0.0
        self._dirty = False
        for row in read_rows(self.path) + _read_journal(self.journal):
            self.rows.setdefault(row[KEY], row)

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def add(self, row: dict) -> None:
        """Record a finished point: appended to the journal now, into the table within a second."""
        if row[KEY] in self.rows:
            return
        self.rows[row[KEY]] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.journal, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
            f.flush()
        self._dirty = True
        if time.monotonic() - self._last_write >= REWRITE_SECONDS:
            self.write()

    def write(self) -> None:
        """The table rewritten from every row, atomically; then the journal is emptied."""
        if not self._dirty and self.path.exists():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        _write_rows(list(self.rows.values()), temporary, self.path.suffix)
        os.replace(temporary, self.path)
        self.journal.unlink(missing_ok=True)
        self._last_write = time.monotonic()
        self._dirty = False


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a table file (none when it does not exist), missing fields dropped from each row."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        if path.suffix == ".csv":
            records = _read_csv(path)
        else:
            import pyarrow.parquet as pq
            records = pq.read_table(path).to_pylist()   # ints stay ints beside nulls (pandas makes them floats)
    except ImportError as exc:
        raise SweepTableError(f"{path}: reading it needs {exc.name} (pip install 'hetflow[sweep]')") from None
    except Exception as exc:  # a truncated or foreign file: say which, never a partial study
        raise SweepTableError(f"{path}: not a readable sweep table ({type(exc).__name__}: {exc})") from None
    if records and KEY not in records[0]:
        raise SweepTableError(f"{path}: not a sweep table (no {KEY!r} column)")
    return [{k: v for k, v in record.items() if not _missing(v)} for record in records]


def _read_csv(path: Path) -> list[dict]:
    """CSV cells read back as the CLI reads values: integers, then floats, then true/false, else text; an
    empty cell is a field the row lacks."""
    import csv
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or KEY not in reader.fieldnames:
            raise SweepTableError(f"{path}: not a sweep table (no {KEY!r} column)")
        return [{k: literal(v) for k, v in row.items() if v != ""} for row in reader]


def literal(text: str):
    """'16' -> 16, '1.5' -> 1.5, 'true' -> True, anything else ('45GB/s') the text itself."""
    text = text.strip()
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _read_journal(path: Path) -> list[dict]:
    """The journal's complete lines (the last may have been cut by a kill: it is dropped, and recomputed)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and KEY in row:
            rows.append(row)
    return rows


def _write_rows(rows: list[dict], path: Path, suffix: str) -> None:
    columns = _columns(rows) or [KEY]   # a study with no rows yet is still a table
    if suffix == ".csv":
        import csv
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, columns, restval="")
            writer.writeheader()
            writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
        return
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise SweepTableError(f"{path}: writing Parquet needs pyarrow (pip install 'hetflow[sweep]'), or name "
                              "a .csv table") from None
    arrays = {c: _column_array(pa, [row.get(c) for row in rows]) for c in columns}
    if not rows:
        arrays = {KEY: pa.array([], pa.string())}
    pq.write_table(pa.table(arrays), path)


def _columns(rows: list[dict]) -> list[str]:
    """Every field of every row, in order of first appearance (different models have different devices)."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _column_array(pa, values: list):
    """One column; a column whose values are of mixed kinds (a user's axis of 1, 2 and 'auto') as text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


