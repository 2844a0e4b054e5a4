"""plots: the roofline of a placed graph, the Gantt chart of its predicted timeline, and a Chrome trace.

Everything drawn here is the cost model's prediction (modelled, not measured);
the titles say so. matplotlib is imported inside the functions, through its
object-oriented API and the Agg canvas (no pyplot, no global backend switch), so
``import hetflow`` stays light and a user's interactive session is untouched.

* ``roofline_plot``: Op/B against attainable FLOP/s, log-log; one roofline per
  device; every group a point per device that supports it (filled where placed).
* ``gantt_plot``: one row per device and link, one bar per event coloured by kind.
* ``chrome_trace``: trace-event JSON for chrome://tracing or ui.perfetto.dev, the
  prediction in one process and, optionally, a measured run in a second one.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from hetflow.ir.errors import HetflowError


class PlotError(HetflowError):
    pass


if TYPE_CHECKING:
    from hetflow.passes.cost import NodeCost
    from hetflow.passes.schedule import Schedule
    from hetflow.platform import Platform

# colours of event kinds (fusion kinds of groups and lone ops, transfers, flash loads); others cycle FALLBACK
KIND_COLORS = {
    "attention": "#d62728",
    "contraction": "#1f77b4",
    "expert": "#9467bd",
    "reduction": "#ff7f0e",
    "elementwise": "#2ca02c",
    "broadcast": "#98df8a",
    "injective": "#bcbd22",
    "window": "#17becf",
    "opaque": "#8c564b",
    "transfer": "#7f7f7f",
    "flash": "#e7ba52",
    "sync": "#e377c2",
}
FALLBACK_COLORS = ("#aec7e8", "#ffbb78", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#c7c7c7")
DEVICE_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
DEVICE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")
ANNOTATE = 5          # the largest groups (by FLOPs) named on the roofline
LABEL_BARS = 300      # name the bars of a Gantt chart with at most this many events (where they are wide enough)


# --- units ----------------------------------------------------------------------------------------------

def _label(name: str) -> str:
    """A name from a model as plot text: control characters escaped (a newline would split the label);
    the text is drawn with parse_math=False, so a '$' is a dollar sign, not mathtext to parse."""
    return name if name.isprintable() else repr(name)[1:-1]


def _si(value: float, unit: str) -> str:
    """1.5e12, 'FLOP/s' -> '1.5 TFLOP/s'."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _time_unit(seconds: float) -> tuple[float, str]:
    """The scale and name of the unit that fits a span of ``seconds``."""
    if seconds < 1e-3:
        return 1e6, "µs"
    if seconds < 1.0:
        return 1e3, "ms"
    return 1.0, "s"


def _kind_colors(kinds: list[str]) -> dict[str, str]:
    colors, spare = {}, 0
    for kind in kinds:
        if kind in KIND_COLORS:
            colors[kind] = KIND_COLORS[kind]
        elif kind.startswith("transfer") or kind.startswith("hetflow.transfer"):
            colors[kind] = KIND_COLORS["transfer"]
        else:
            colors[kind] = FALLBACK_COLORS[spare % len(FALLBACK_COLORS)]
            spare += 1
    return colors


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _load(platform) -> "Platform":
    if isinstance(platform, str):
        from hetflow.platform import load_platform
        return load_platform(platform)
    return platform


def _peak_dtype(device, dtype: str | None) -> str:
    """The precision whose peak ``Device.peak_for(dtype)`` uses, spelled for a label ('f16 for f32' on a fallback)."""
    if dtype in device.peak:
        return dtype
    peak = device.peak_for(dtype)
    used = next((k for k, v in device.peak.items() if v == peak), "?")
    return f"{used} for {dtype}" if dtype else used


def dominant_dtype(costs: list["NodeCost"]) -> str | None:
    """The dtype carrying most of the graph's FLOPs (most groups when there are no FLOPs)."""
    by_flops: Counter = Counter()
    by_count: Counter = Counter()
    for c in costs:
        if c.dtype is not None:
            by_flops[c.dtype] += c.flops
            by_count[c.dtype] += 1
    if by_flops and max(by_flops.values()) > 0:
        return by_flops.most_common(1)[0][0]
    return by_count.most_common(1)[0][0] if by_count else None


# --- roofline --------------------------------------------------------------------------------------------

def roofline_plot(costs: list["NodeCost"], platform: "Platform", path) -> Path:
    """A PNG roofline: Op/B (x) against attainable FLOP/s (y), log-log, one roof per device (its peak for the
    graph's dominant dtype), every group as a point per device that supports it at (Op/B, FLOPs / its time
    there): filled on the device it is placed on, hollow elsewhere. Groups without FLOPs have no place on a
    log axis and are counted in a note instead."""
    import numpy as np
    from matplotlib.lines import Line2D

    platform = _load(platform)
    dtype = dominant_dtype(costs)
    devices = list(platform.devices)
    style = {d: (DEVICE_COLORS[i % len(DEVICE_COLORS)], DEVICE_MARKERS[i % len(DEVICE_MARKERS)])
             for i, d in enumerate(devices)}
    plotted = [c for c in costs if c.flops > 0 and c.bytes > 0 and c.times]
    skipped = len(costs) - len(plotted)

    ridges = [platform.devices[d].peak_for(dtype) / platform.devices[d].bandwidth for d in devices]
    intensities = [c.intensity for c in plotted]
    lo = min(intensities + ridges) / 4
    hi = max(intensities + ridges) * 4
    xs = np.logspace(np.log10(lo), np.log10(hi), 256)

    fig = _figure(10, 6.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    handles = []
    for d, ridge in zip(devices, ridges):
        dev = platform.devices[d]
        peak = dev.peak_for(dtype)
        color, marker = style[d]
        ax.plot(xs, np.minimum(peak, dev.bandwidth * xs), color=color, linewidth=2.2, alpha=0.85, zorder=2)
        ax.plot([ridge], [peak], marker="|", color=color, markersize=12, zorder=2)
        who = d if d == dev.kind else f"{d} ({dev.kind})"
        label = f"{who}: {_si(peak, 'FLOP/s')} {_peak_dtype(dev, dtype)}, {_si(dev.bandwidth, 'B/s')}"
        handles.append(Line2D([], [], color=color, linewidth=2.2, marker=marker, markersize=8, label=label))

    low_y = []
    for d in devices:
        color, marker = style[d]
        chosen = [c for c in plotted if d in c.times and c.node.meta.get("device") == d]
        others = [c for c in plotted if d in c.times and c.node.meta.get("device") != d]
        for group, filled in ((others, False), (chosen, True)):
            if not group:
                continue
            x = [c.intensity for c in group]
            y = [c.flops / c.times[d] for c in group]
            low_y.extend(y)
            ax.scatter(x, y, s=46 if filled else 40, marker=marker, linewidths=1.3, zorder=4 if filled else 3,
                       facecolors=color if filled else "none", edgecolors=color if not filled else "black",
                       alpha=0.95 if filled else 0.7)

    peaks = [platform.devices[d].peak_for(dtype) for d in devices]
    y_lo = (min(low_y) if low_y else min(peaks) / 1e3) / 3
    ax.set_ylim(y_lo, max(peaks) * 3)
    ax.set_xlim(lo, hi)

    # number the largest groups at the point of the device they are placed on (nudged apart where points
    # crowd, with a leader line); a key at the lower right names them
    largest = sorted(plotted, key=lambda c: c.flops, reverse=True)[:ANNOTATE]
    key, taken = [], []
    points_per_pixel = 72 / fig.dpi
    for rank, c in enumerate(largest, 1):
        d = c.node.meta.get("device")
        d = d if d in c.times else c.fastest()
        xy = (c.intensity, c.flops / c.times[d])
        px, py = ax.transData.transform(xy)
        offset = _free_offset(px, py, taken, points_per_pixel)
        ax.annotate(str(rank), xy, xytext=offset, textcoords="offset points", ha="center", va="center",
                    fontsize=8.5, fontweight="bold", zorder=6,
                    bbox={"boxstyle": "circle,pad=0.15", "facecolor": "white", "edgecolor": "0.5", "linewidth": 0.6},
                    arrowprops={"arrowstyle": "-", "color": "0.45", "linewidth": 0.6, "shrinkA": 0, "shrinkB": 3})
        name = _label(c.name)
        name = name if len(name) <= 24 else name[:23] + "…"
        key.append(f"{rank}  {name}: {c.kind}, {_si(c.flops, 'FLOP')}, {_si(c.bytes, 'B')} on {d}")
    if skipped:
        key.append(f"({skipped} group(s) without FLOPs not shown)")
    if key:
        heading = "largest groups" if largest else ""
        ax.text(0.985, 0.025, "\n".join([heading] + key if heading else key), transform=ax.transAxes,
                ha="right", va="bottom", fontsize=9, linespacing=1.45, multialignment="left", zorder=6,
                parse_math=False,
                bbox={"boxstyle": "round,pad=0.4", "facecolor": "white", "edgecolor": "0.75", "alpha": 0.92})

    ax.grid(True, which="major", color="0.85", linewidth=0.8)
    ax.grid(True, which="minor", color="0.93", linewidth=0.5)
    ax.set_axisbelow(True)
    ax.set_xlabel("arithmetic intensity (Op/B: FLOPs per byte moved)", fontsize=12)
    ax.set_ylabel("attainable FLOP/s", fontsize=12)
    ax.tick_params(labelsize=10.5)
    ax.set_title(f"Roofline of {len(costs)} groups on {platform.name} (modelled)", fontsize=14)

    handles.append(Line2D([], [], linestyle="none", marker="o", markersize=8, markerfacecolor="0.4",
                          markeredgecolor="black", label="placed here"))
    handles.append(Line2D([], [], linestyle="none", marker="o", markersize=8, markerfacecolor="none",
                          markeredgecolor="0.4", label="alternative device"))
    ax.legend(handles=handles, loc="upper left", fontsize=9.5, framealpha=0.92)
    return _save(fig, path)


def _free_offset(px: float, py: float, taken: list[tuple[float, float]], points_per_pixel: float,
                 gap: float = 17.0) -> tuple[float, float]:
    """An offset (in points) for a label of the point at pixel (px, py), at least ``gap`` pixels from every
    label already placed (``taken``, which it extends): up-left first, then outward in a ring."""
    import math
    for radius in (15, 26, 38, 50, 64):
        for step in range(12):
            angle = math.radians(120 - 30 * step)
            lx, ly = px + radius * math.cos(angle), py + radius * math.sin(angle)
            if all(math.hypot(lx - tx, ly - ty) >= gap for tx, ty in taken):
                taken.append((lx, ly))
                return (lx - px) * points_per_pixel, (ly - py) * points_per_pixel
    taken.append((px, py + 12))
    return 0.0, 12 * points_per_pixel


# --- Gantt chart -----------------------------------------------------------------------------------------

def _rows(schedule: "Schedule", devices: list[str] | None) -> list[str]:
    """Devices first (the platform's order when given, else first appearance), then links and other queues."""
    seen = list(dict.fromkeys(e.device for e in schedule.events))
    rows = list(devices or [])
    rows += [d for d in seen if d not in rows and not d.startswith("link:")]
    rows += [d for d in seen if d not in rows]
    return rows


def gantt_plot(schedule: "Schedule", path, title: str = "", devices: list[str] | None = None) -> Path:
    """A PNG Gantt chart of the predicted timeline: a row per device (``devices`` adds idle ones, in that order)
    and per link, a bar per event coloured by its kind, the makespan marked. Bars are drawn as one collection
    per (row, kind), so thousands of events render quickly."""
    from matplotlib.colors import to_rgb
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    events = schedule.events
    rows = _rows(schedule, devices)
    makespan = schedule.makespan
    scale, unit = _time_unit(makespan if makespan > 0 else 1e-6)
    kinds = list(dict.fromkeys(e.kind for e in events))
    colors = _kind_colors(kinds)

    fig = _figure(12, 1.6 + 0.62 * max(len(rows), 1))
    ax = fig.add_subplot(1, 1, 1)
    bars: dict[tuple[int, str], list[tuple[float, float]]] = {}
    index = {r: i for i, r in enumerate(rows)}
    for e in events:
        bars.setdefault((index[e.device], e.kind), []).append((e.start * scale, (e.end - e.start) * scale))
    height = 0.7
    for (row, kind), spans in bars.items():
        ax.broken_barh(spans, (row - height / 2, height), facecolors=colors[kind],
                       edgecolors="white" if len(events) <= 2000 else "none", linewidth=0.4)

    if 0 < len(events) <= LABEL_BARS and makespan > 0:
        min_width = makespan * scale * 0.045
        for e in events:
            width = (e.end - e.start) * scale
            if width >= min_width:
                chars = max(int(width / (makespan * scale) * 120), 3)
                name = _label(e.name)
                name = name if len(name) <= chars else name[:chars - 1] + "…"
                r, g, b = to_rgb(colors[e.kind])
                ink = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
                ax.text((e.start * scale) + width / 2, index[e.device], name, ha="center", va="center",
                        fontsize=8, color=ink, clip_on=True, parse_math=False)

    if makespan > 0:
        ax.axvline(makespan * scale, color="black", linestyle="--", linewidth=1.4)
        ax.set_xlim(0, makespan * scale * 1.02)
    ax.set_ylim(len(rows) - 0.4, -0.6)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=11)
    ax.set_xlabel(f"time ({unit})", fontsize=12)
    ax.tick_params(axis="x", labelsize=10.5)
    ax.grid(True, axis="x", color="0.88", linewidth=0.8)
    ax.set_axisbelow(True)
    heading = title or f"{schedule.platform}"
    ax.set_title(f"{heading}: predicted (modelled) timeline, {len(events)} events, "
                 f"makespan {makespan * scale:.4g} {unit}", fontsize=13)
    handles = [Patch(facecolor=colors[k], label=k) for k in kinds]
    if makespan > 0:
        handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1.4,
                              label=f"makespan\n{makespan * scale:.4g} {unit}"))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=10, title="kind",
                  title_fontsize=10, frameon=False)
    return _save(fig, path)


# --- Chrome / Perfetto trace ------------------------------------------------------------------------------

PREDICTED_PID = 1
MEASURED_PID = 2


def _trace_process(pid: int, label: str, events: list[dict], devices: list[str] | None) -> list[dict]:
    """Trace events of one timeline; ``events`` are dicts shaped like ``Event.as_dict()`` (start_us, end_us)."""
    rows = list(devices or [])
    rows += [e["device"] for e in events if e["device"] not in rows]
    rows = list(dict.fromkeys(rows))
    tids = {d: i + 1 for i, d in enumerate(rows)}
    out = [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": label}},
           {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}}]
    for d, tid in tids.items():
        out.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": d}})
        out.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
    for e in events:
        start, end = float(e["start_us"]), float(e["end_us"])
        args = {k: e[k] for k in ("kind", "ops", "flops", "bytes") if k in e}
        args.update({k: v for k, v in e.items() if k not in ("name", "device", "start_us", "end_us") and k not in args})
        out.append({"name": e["name"], "cat": e.get("kind", ""), "ph": "X", "pid": pid, "tid": tids[e["device"]],
                    "ts": start, "dur": max(end - start, 0.0), "args": args})
    return out


def _simulated_tracks(measured: list[dict]) -> list[dict]:
    """A partition a simulator ran (``modelled_us``) is drawn on its device's track for its modelled time,
    marked modelled; the host's wall time running the simulator goes on a track of its own beside it."""
    out = []
    for e in measured:
        if e.get("modelled_us") is None:
            stand_in = e.get("kind") == "simulated"  # the reference interpreter running a device's partition
            out.append(dict(e, time="host wall time of the reference interpreter standing in for the device "
                                     "(no device time model)" if stand_in else "measured"))
            continue
        wall = float(e["end_us"]) - float(e["start_us"])
        out.append(dict(e, end_us=float(e["start_us"]) + float(e["modelled_us"]), time="modelled",
                        kind=f"modelled ({str(e.get('kind', '')).split(' ')[0]} simulator)", host_wall_us=wall))
        out.append(dict(e, device=f"{e['device']} simulator (host wall time)", time="measured (the simulator's "
                        "NumPy run on the host, not the device)", kind="simulator on the host"))
    return out


def chrome_trace(schedule: "Schedule", path, measured: list[dict] | None = None,
                 devices: list[str] | None = None) -> Path:
    """Chrome/Perfetto trace-event JSON of the predicted timeline: "X" events (ts and dur in µs) in process
    "predicted", a thread per device and link (named by metadata events), args with kind, ops, FLOPs, bytes.
    ``measured`` (dicts shaped like ``Event.as_dict()``) becomes a second process "measured" beside it, where
    each partition a simulator ran shows its modelled time on its device's track (args ``time: modelled``)
    and the simulator's wall time on the host on a track of its own."""
    rows = _rows(schedule, devices)
    trace = _trace_process(PREDICTED_PID, f"predicted ({schedule.platform}, modelled)",
                           [e.as_dict() for e in schedule.events], rows)
    if measured is not None:
        label = "measured (simulated devices: modelled)" if any(e.get("modelled_us") is not None for e in measured) \
            else "measured"
        trace += _trace_process(MEASURED_PID, label, _simulated_tracks(measured), rows)
    doc = {"traceEvents": trace, "displayTimeUnit": "ns",
           "otherData": {"platform": schedule.platform, "makespan_us": schedule.makespan * 1e6, "modelled": True}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


# --- all three --------------------------------------------------------------------------------------------

def write_plots(directory, costs: list["NodeCost"], platform: "Platform", schedule: "Schedule") -> list[Path]:
    """roofline.png, timeline.png and trace.json in ``directory`` (created); returns their paths."""
    platform = _load(platform)
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PlotError(f"cannot create the plot directory {directory}: {exc.strerror or exc}") from None
    devices = list(platform.devices)
    return [roofline_plot(costs, platform, directory / "roofline.png"),
            gantt_plot(schedule, directory / "timeline.png", title=platform.name, devices=devices),
            chrome_trace(schedule, directory / "trace.json", devices=devices)]
