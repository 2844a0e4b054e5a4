"""``hetflow sweep``: a design-space study from the command line, and ``hetflow sweep plot`` for its table."""
from __future__ import annotations

import argparse

from .sweep import SweepError, parse_set
from .sweep_table import literal

__all__ = ["add_sweep_parser", "cmd_sweep", "cmd_sweep_plot", "plot_parser"]

SWEEP_EPILOG = """\
examples:
  # Duplex: the MoE decode layer over Logic-PIM bandwidth x batch x experts per token (48 points)
  hetflow sweep hetflow.examples.decode_graphs:build_mixtral_decode_layer --platform duplex \\
      --set device.pim.bandwidth=6.7TB/s,13.4TB/s,26.8TB/s --batch 1,8,32,128 --arg top_k=1,2,4,8 \\
      --placement optimal -o moe.parquet
  # PIM-GPT: GPT-2 decode over channel count and memory bandwidth, with the PIM simulator in placement
  hetflow sweep hetflow.examples.decode_graphs:build_gpt2_decode_step --platform pim-gpt \\
      --set device.pim.channels=4,8,16,32 --set memory.gddr6.bandwidth=128GB/s,256GB/s --cost-model sim -o gpt.csv
  hetflow sweep ... --address auto            on the Ray cluster this machine belongs to (or ray://host:10001)
  hetflow sweep ... --search random --budget 50     50 points drawn by Ray Tune (adaptive: Optuna, minimising --metric)
  hetflow sweep plot moe.parquet --cost device.pim.bandwidth --heatmap batch,top_k -o plots/

MODEL is a .onnx file (--arg NAME=N sets its dim_param NAME) or 'module:function' / 'file.py:function'
returning an ir.Graph or (torch_module, example_inputs); --arg and --batch are the function's keyword
arguments. --set PATH=V1,V2 addresses the platform's TOML (device.NAME.FIELD, memory.NAME.FIELD, sync.flag,
link.NAME.FIELD, flash.FIELD), values with units as in a platform file. Every row is one point: makespan,
per-device busy time, bytes and groups, each memory space's peak, the solver's status, compile time, or the
error. Rerunning the same command resumes from the table: finished points are never computed again.
Needs Ray: pip install 'hetflow[sweep]'.
"""

PLOT_EPILOG = """\
examples:
  hetflow sweep plot moe.parquet --cost device.pim.bandwidth --maximise-cost -o plots/
  hetflow sweep plot gpt.csv --heatmap device.pim.channels,memory.gddr6.bandwidth --where model=... -o plots/
Columns are named as in the table (set.device.pim.channels, arg.batch, busy_us.pim) or by their short name.
"""


def add_sweep_parser(sub) -> None:
    """The ``sweep`` subcommand of ``hetflow``."""
    p = sub.add_parser("sweep", help="a design-space study: compile and predict over models x platform "
                       "parameters x placements x batch sizes, on Ray (or 'hetflow sweep plot TABLE')",
                       description="Compile (placement, schedule, memory plan) and predict every point of a grid "
                                   "of models x platform parameters x placements x batch sizes x cost models, as "
                                   "Ray tasks (embedded on this machine, or a cluster with --address), streaming "
                                   "one row per point into a resumable table. 'hetflow sweep plot TABLE --help' "
                                   "for the plots.",
                       epilog=SWEEP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="MODEL", help="a .onnx file or module:function (several allowed)")
    p.add_argument("--platform", default="host", metavar="P1,P2",
                   help="presets or platform .toml files, comma-separated (default host)")
    p.add_argument("--set", action="append", default=[], metavar="PATH=V1,V2",
                   help="a platform parameter axis, e.g. device.pim.channels=16,32,64 (repeatable)")
    p.add_argument("--arg", action="append", default=[], metavar="NAME=V1,V2",
                   help="a builder argument axis, e.g. top_k=1,2 or layers=12,24 (repeatable)")
    p.add_argument("--batch", metavar="B1,B2", help="batch sizes: the builder's 'batch' argument")
    p.add_argument("--placement", default="roofline", metavar="POLICY,...",
                   help="roofline, optimal and/or split, comma-separated (default roofline)")
    p.add_argument("--cost-model", default="analytic", metavar="MODEL,...",
                   help="analytic and/or sim (the NPU/PIM simulators time placement's candidates)")
    p.add_argument("--time-limit", type=float, default=10.0, metavar="S", help="seconds for each exact solver")
    p.add_argument("-o", "--output", default="sweep.parquet", metavar="TABLE",
                   help="the results table, .parquet or .csv (default sweep.parquet); an existing one is resumed")
    p.add_argument("--address", metavar="ADDR", help="a Ray cluster: 'auto' (the one this machine joined) or "
                   "ray://host:port; default: Ray embedded here, one worker per core")
    p.add_argument("--workers", type=int, metavar="N", help="embedded Ray's workers (default: the cores)")
    p.add_argument("--serial", action="store_true", help="run the points one by one in this process, no Ray")
    p.add_argument("--search", choices=["grid", "random", "adaptive"], default="grid",
                   help="grid: every point (default); random or adaptive: --budget points drawn from the grid's "
                        "values by Ray Tune (random sampling, or Optuna's TPE minimising --metric)")
    p.add_argument("--budget", type=int, metavar="N", help="points to run with --search random/adaptive")
    p.add_argument("--seed", type=int, default=0, help="the search's seed (default 0)")
    p.add_argument("--metric", default="makespan_us", help="what adaptive search minimises (default makespan_us)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)


def _axis(text: str, option: str) -> list:
    values = [literal(v) for v in text.split(",") if v.strip()]
    if not values:
        raise SweepError(f"{option} {text!r}: give values separated by commas")
    return values


def _named_axes(items: list[str], option: str) -> dict:
    axes = {}
    for item in items:
        name, values = parse_set(item) if option == "--set" else _named(item, option)
        if name in axes:
            raise SweepError(f"{option} {name} is given twice: give its values once, comma-separated")
        axes[name] = values
    return axes


def _named(item: str, option: str) -> tuple[str, list]:
    name, sep, values = item.partition("=")
    if not sep or not name.strip():
        raise SweepError(f"{option} {item!r}: expected NAME=V1,V2,...")
    return name.strip(), _axis(values, option)


def cmd_sweep(args) -> int:
    from .sweep import sweep
    if args.models[0] == "plot":
        raise SweepError("'plot' must come right after 'sweep': hetflow sweep plot TABLE ...")
    result = sweep(args.models, platform=_axis(args.platform, "--platform"), set=_named_axes(args.set, "--set"),
                   args=_named_axes(args.arg, "--arg"),
                   batch=_axis(args.batch, "--batch") if args.batch else None,
                   placement=_axis(args.placement, "--placement"), cost_model=_axis(args.cost_model, "--cost-model"),
                   table=args.output, engine="serial" if args.serial else "ray", address=args.address,
                   workers=args.workers, search=args.search, budget=args.budget, seed=args.seed, metric=args.metric,
                   time_limit=args.time_limit, progress=not args.quiet)
    print(result.summary())
    for row in result.rows:
        if row.get("status") == "failed":
            print(f"  failed {row['point']} ({row['model']}): {row.get('error')}")
    return 0


def plot_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetflow sweep plot", description="Plot a sweep's table: the Pareto front of "
                                "makespan against a cost axis (pareto.png) and a heatmap over two parameters "
                                "(heatmap.png).", epilog=PLOT_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", metavar="TABLE", help="a table 'hetflow sweep' wrote (.parquet or .csv)")
    p.add_argument("--cost", metavar="COLUMN", help="the cost axis of the Pareto front (e.g. device.pim.channels)")
    p.add_argument("--maximise-cost", action="store_true", help="a larger cost is better (the front keeps the "
                   "largest cost for each makespan)")
    p.add_argument("--heatmap", metavar="A,B", help="two parameters: rows A, columns B")
    p.add_argument("--y", default="makespan_us", metavar="COLUMN", help="the value plotted (default makespan_us)")
    p.add_argument("--aggregate", choices=["min", "mean", "max"], default="min",
                   help="how the heatmap folds the other axes (default min: the best the rest reaches)")
    p.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE", help="only these rows")
    p.add_argument("-o", "--output", default=".", metavar="DIR", help="where to write the PNGs (default .)")
    return p


def cmd_sweep_plot(argv: list[str]) -> int:
    from .sweep_plot import plot_table
    args = plot_parser().parse_args(argv)
    heatmap = None
    if args.heatmap:
        heatmap = tuple(part.strip() for part in args.heatmap.split(","))
        if len(heatmap) != 2:
            raise SweepError(f"--heatmap {args.heatmap!r}: name two parameters, A,B")
    where = dict(item.split("=", 1) for item in args.where if "=" in item)
    for path in plot_table(args.table, args.output, args.cost, heatmap, args.y, args.maximise_cost, args.aggregate,
                           where):
        print(path)
    return 0
