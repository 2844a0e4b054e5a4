"""Plots of a sweep's table: the Pareto front of makespan against a cost the user names, and a heatmap over
any two parameters (PNG, matplotlib).

    hetflow sweep plot moe.parquet --cost device.pim.bandwidth --heatmap device.pim.bandwidth,batch -o plots/

A column is named as in the table (``set.device.pim.bandwidth``, ``arg.batch``, ``busy_us.pim``) or by its
short name (``device.pim.bandwidth``, ``batch``). Parameter values with units ('45GB/s') are read as the
platform loader reads them (45e9), so axes are numeric and sorted.
"""
from __future__ import annotations

from pathlib import Path

from .sweep import SweepError
from .sweep_table import read_rows

__all__ = ["column", "numeric", "pareto_front", "plot_pareto", "plot_heatmap", "plot_table"]


def column(rows: list[dict], name: str) -> str:
    """The table's column for ``name``: itself, or ``set.<name>`` / ``arg.<name>``; else an error listing them."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    for candidate in (name, f"set.{name}", f"arg.{name}"):
        if candidate in columns:
            return candidate
    raise SweepError(f"the table has no column {name!r} (columns: {', '.join(columns)})")


def numeric(value) -> float | None:
    """A number, or a quantity with a unit ('45GB/s', '16 GiB', '20 us') in base units; None if neither."""
    from hetflow.platform import PlatformError, quantity
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    for kind in ("bandwidth", "bytes", "rate", "time"):
        try:
            return quantity(value, kind, "value", positive=False)
        except PlatformError:
            continue
    return None


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (both minimised), sorted by the first."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(set(points)):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def _ok_rows(rows: list[dict], y: str) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok" and r.get(y) is not None]


def plot_pareto(rows: list[dict], cost: str, out: Path, y: str = "makespan_us", maximise_cost: bool = False) -> Path:
    """Every point's ``y`` against ``cost``, the Pareto front drawn over them. ``maximise_cost``: a larger
    cost is better (a resource given, not paid): the front is then the largest cost for each makespan."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cost_column, y_column = column(rows, cost), column(rows, y)
    pairs = [(numeric(r.get(cost_column)), numeric(r.get(y_column))) for r in _ok_rows(rows, y_column)]
    pairs = [(x, v) for x, v in pairs if x is not None and v is not None]
    if not pairs:
        raise SweepError(f"no successful point has both {cost_column!r} and {y_column!r} as numbers")
    sign = -1.0 if maximise_cost else 1.0
    front = [(sign * x, v) for x, v in pareto_front([(sign * x, v) for x, v in pairs])]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter([x for x, _ in pairs], [v for _, v in pairs], s=14, color="0.6", label=f"{len(pairs)} points")
    ax.plot([x for x, _ in front], [v for _, v in front], "o-", color="C3", label=f"Pareto front ({len(front)})")
    ax.set_xlabel(cost_column)
    ax.set_ylabel(y_column + " (modelled)")
    _log_axes(ax, [x for x, _ in pairs], [v for _, v in pairs])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(f"{y_column} against {cost_column}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _log_axes(ax, xs: list[float], ys: list[float]) -> None:
    """Log scales where the values are positive, labelled as plain numbers: the cost axis at its values when
    the study has a few, the makespan on its minor ticks too when it spans less than a decade."""
    import matplotlib.ticker as ticker
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    if min(xs) > 0:
        ax.set_xscale("log")
        if len(set(xs)) <= 12:
            ax.set_xticks(sorted(set(xs)))
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    if min(ys) > 0:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain if max(ys) / min(ys) < 10 else ticker.NullFormatter())


def plot_heatmap(rows: list[dict], a: str, b: str, out: Path, value: str = "makespan_us",
                 aggregate: str = "min") -> Path:
    """``value`` over parameters ``a`` (rows) x ``b`` (columns); the other axes folded by ``aggregate``
    (min: the best the rest of the study reaches; mean)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    if aggregate not in ("min", "mean", "max"):
        raise SweepError(f"aggregate {aggregate!r} is not one of min, mean, max")
    a_column, b_column, v_column = column(rows, a), column(rows, b), column(rows, value)
    cells: dict[tuple, list[float]] = {}
    for row in _ok_rows(rows, v_column):
        if row.get(a_column) is None or row.get(b_column) is None:
            continue
        cells.setdefault((row[a_column], row[b_column]), []).append(float(row[v_column]))
    if not cells:
        raise SweepError(f"no successful point has {a_column!r}, {b_column!r} and {v_column!r}")
    a_values = _sorted_values({k[0] for k in cells})
    b_values = _sorted_values({k[1] for k in cells})
    grid = np.full((len(a_values), len(b_values)), np.nan)
    fold = {"min": min, "max": max, "mean": lambda v: sum(v) / len(v)}[aggregate]
    for (va, vb), values in cells.items():
        grid[a_values.index(va), b_values.index(vb)] = fold(values)
    label_width = 0.07 * max(len(str(v)) for v in a_values)   # inches for the longest row label
    fig, ax = plt.subplots(figsize=(3.0 + label_width + 0.9 * len(b_values), 1.6 + 0.45 * len(a_values)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis_r")
    for i in range(len(a_values)):
        for j in range(len(b_values)):
            if not np.isnan(grid[i, j]):
                dark = image.norm(grid[i, j]) > 0.5          # viridis_r: high values are dark cells
                ax.text(j, i, f"{grid[i, j]:.4g}", ha="center", va="center", fontsize=7, color="w" if dark else "k")
    ax.set_xticks(range(len(b_values)), [str(v) for v in b_values], rotation=30, fontsize=8)
    ax.set_yticks(range(len(a_values)), [str(v) for v in a_values], fontsize=8)
    ax.set_xlabel(b_column)
    ax.set_ylabel(a_column)
    fig.colorbar(image, ax=ax, label=f"{v_column} ({aggregate} over the other axes, modelled)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _sorted_values(values: set) -> list:
    """Numeric order where every value reads as a number or quantity, else text order."""
    parsed = {v: numeric(v) for v in values}
    if all(p is not None for p in parsed.values()):
        return sorted(values, key=lambda v: parsed[v])
    return sorted(values, key=str)


def plot_table(table: str | Path, out_dir: str | Path, cost: str | None = None, heatmap: tuple[str, str] | None = None,
               y: str = "makespan_us", maximise_cost: bool = False, aggregate: str = "min",
               where: dict | None = None) -> list[Path]:
    """The plots asked for, from a table file, into ``out_dir``: ``pareto.png`` and/or ``heatmap.png``.
    ``where``: only rows whose columns have these values (e.g. one model of a study of several)."""
    rows = read_rows(table)
    if not rows:
        raise SweepError(f"{table}: no rows (no such table, or an empty one)")
    for name, wanted in (where or {}).items():
        key = column(rows, name)
        rows = [r for r in rows if str(r.get(key)) == str(wanted)]
        if not rows:
            raise SweepError(f"{table}: no row has {key} = {wanted}")
    if cost is None and heatmap is None:
        raise SweepError("name a cost axis for the Pareto front (--cost) or two parameters for a heatmap (--heatmap)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if cost is not None:
        written.append(plot_pareto(rows, cost, out_dir / "pareto.png", y, maximise_cost))
    if heatmap is not None:
        written.append(plot_heatmap(rows, heatmap[0], heatmap[1], out_dir / "heatmap.png", y, aggregate))
    return written
