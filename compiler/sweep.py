"""Design-space sweeps: compile (place, schedule, plan memory) and predict over a grid of models x platform
parameters x placements x batch sizes x cost models, one row per point, on Ray.

    import hetflow
    result = hetflow.sweep("hetflow.examples.decode_graphs:build_mixtral_decode_layer", platform="duplex",
                           set={"device.pim.bandwidth": ["6.7 TB/s", "13.4 TB/s"]}, batch=[1, 32],
                           placement="optimal", table="moe.parquet")

People who model NPUs, PIM and flash are often designing them, and ask "what if the PIM had twice the banks?"
over many models. A study is the product of its axes (a grid), or ``budget`` points drawn by Ray Tune's
search algorithms (``search="random"`` or ``"adaptive"``: ``hetflow.sweep_tune``). Each point is a Ray task
declaring one CPU: with no ``address`` Ray starts embedded on this machine (one worker per core), with
``address="auto"`` or ``"ray://host:port"`` it joins a cluster; a worker that dies is retried by Ray. Rows
stream into a table keyed by a hash of the point (``hetflow.sweep_table``), so an interrupted study resumes
where it stopped and never computes a finished point twice. ``engine="serial"`` runs the points in this
process (no Ray). A point that fails is a row with its error, never the end of the study.

A point's result is deterministic (the placement solver runs on one thread with a deterministic limit), so
the same study gives the same rows serially, embedded or on a cluster; only ``compile_s`` (wall time),
``worker`` and ``sim_probes`` (the simulations the point ran itself rather than found in the study's shared
table of probe times) differ, and ``NONDETERMINISTIC`` names them.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import os
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from hetflow.ir.errors import HetflowError

from .sweep_table import KEY, ResultTable, literal

__all__ = ["Point", "SweepError", "SweepResult", "grid_points", "evaluate_point", "run_points", "sweep",
           "platform_with", "parse_set", "NONDETERMINISTIC"]

NONDETERMINISTIC = ("compile_s", "worker", "sim_probes")   # row fields that differ between runs of a point
RAY_MISSING = "hetflow sweep runs its points on Ray: pip install 'hetflow[sweep]' (ray[tune] and pyarrow)"
OBJECT_STORE_BYTES = 200 * 1024**2   # an embedded Ray's object store: rows are small


class SweepError(HetflowError):
    pass


# --- points --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """One compile of the study: a model (and its builder's arguments) on a platform variant."""
    model: str                                  # a .onnx path or 'module:function' / 'file.py:function'
    platform: str = "host"                      # a preset or a platform .toml
    sets: tuple[tuple[str, Any], ...] = ()      # platform parameter overrides: (path, value)
    args: tuple[tuple[str, Any], ...] = ()      # the builder's keyword arguments (batch among them)
    placement: str = "roofline"
    cost_model: str = "analytic"
    time_limit: float = 10.0

    def spec(self) -> dict:
        return {"model": self.model, "platform": self.platform, "set": dict(self.sets), "args": dict(self.args),
                "placement": self.placement, "cost_model": self.cost_model, "time_limit": self.time_limit}

    @property
    def key(self) -> str:
        """A hash of what the point computes: its row's key in the table."""
        text = json.dumps(self.spec(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def columns(self) -> dict:
        """The point's parameters as table columns: ``set.<path>`` and ``arg.<name>`` for the axes."""
        row = {KEY: self.key, "model": self.model, "platform": self.platform, "placement": self.placement,
               "cost_model": self.cost_model}
        row.update({f"set.{path}": value for path, value in self.sets})
        row.update({f"arg.{name}": value for name, value in self.args})
        return row


def grid_points(models: Iterable[str] | str, platform: Iterable[str] | str = "host",
                set: dict[str, Iterable] | None = None, args: dict[str, Iterable] | None = None,
                batch: Iterable[int] | None = None, placement: Iterable[str] | str = "roofline",
                cost_model: Iterable[str] | str = "analytic", time_limit: float = 10.0) -> list[Point]:
    """Every combination of the axes, in a stable order (the models outermost)."""
    args = dict(args or {})
    if batch is not None:
        args["batch"] = list(_listed(batch))
    sets = {path: list(_listed(values)) for path, values in (set or {}).items()}
    axes = [(name, list(_listed(values))) for name, values in args.items()]
    for name, values in list(sets.items()) + axes:
        if not values:
            raise SweepError(f"the axis {name!r} has no values")
    points = []
    for model, preset, place, cost in itertools.product(_listed(models), _listed(platform), _listed(placement),
                                                         _listed(cost_model)):
        for set_values in itertools.product(*sets.values()):
            for arg_values in itertools.product(*(v for _, v in axes)):
                points.append(Point(model, preset, tuple(zip(sets, set_values)),
                                    tuple(zip((n for n, _ in axes), arg_values)), place, cost, time_limit))
    return points


def _listed(values) -> list:
    return [values] if isinstance(values, (str, int, float)) else list(values)


# --- platform parameters ----------------------------------------------------------------------------

def parse_set(text: str) -> tuple[str, list]:
    """``device.pim.channels=16,32,64`` -> ('device.pim.channels', [16, 32, 64]); quantities stay text
    ('45GB/s'), read by the platform loader as a platform file's are."""
    path, sep, values = text.partition("=")
    if not sep or not path.strip() or not values.strip():
        raise SweepError(f"--set {text!r}: expected PATH=V1,V2,... (e.g. device.pim.channels=16,32,64)")
    return path.strip(), [literal(v) for v in values.split(",")]


def platform_with(platform: str, sets: Iterable[tuple[str, Any]] = ()):
    """The platform ``platform`` (a preset or .toml) with each ``(path, value)`` laid over its TOML data
    (``device.pim.channels``, ``memory.lpddr.bandwidth``, ``sync.flag``...), then read by the platform loader
    (units and ranges checked as in a file). An unknown path is an error naming it and the valid keys."""
    from hetflow.platform import load_platform, platform_from_dict
    base = load_platform(platform)
    sets = tuple(sets)
    if not sets:
        return base
    data = copy.deepcopy(base.raw)
    for path, value in sets:
        _assign(data, path, value, base.name)
    described = ", ".join(f"{p}={v}" for p, v in sets)
    return platform_from_dict(data, f"{base.name} with {described}")


def _assign(data: dict, path: str, value, platform: str) -> None:
    from hetflow.platform.schema import PLATFORM
    parts = path.split(".")
    table, schema = data, PLATFORM
    for depth, part in enumerate(parts):
        keys = _valid_keys(table, schema)
        if part not in keys:
            where = ".".join(parts[:depth]) or "the top level"
            raise SweepError(f"--set {path}: platform {platform!r} has no {part!r} under {where} "
                             f"(valid keys: {', '.join(keys)})")
        schema = schema.get("properties", {}).get(part) or schema.get("additionalProperties") or {}
        if depth < len(parts) - 1:
            if schema.get("type") != "object":
                raise SweepError(f"--set {path}: {'.'.join(parts[:depth + 1])} is a value, not a table")
            table = table.setdefault(part, {})
    if schema.get("type") in ("object", "array"):
        raise SweepError(f"--set {path}: is a {'table' if schema['type'] == 'object' else 'list'}; set one of "
                         f"its fields (valid keys: {', '.join(_valid_keys(table.get(parts[-1], {}), schema))})")
    table[parts[-1]] = _typed(value, schema, path)


def _valid_keys(table: dict, schema: dict) -> list[str]:
    """The fields a schema table declares, or for a table of names (devices, memories) the names it has."""
    if "properties" in schema:
        return list(schema["properties"])
    return list(table)


def _typed(value, schema: dict, path: str):
    kind = schema.get("type")
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise SweepError(f"--set {path}: expected an integer, got {value!r}")
    if kind == "number" and not isinstance(value, (int, float)):
        raise SweepError(f"--set {path}: expected a number, got {value!r}")
    return value


# --- one point ------------------------------------------------------------------------------------------

def evaluate_point(point: Point) -> dict:
    """Compile the point and read its prediction: a row. Never raises for the point's own failure (its
    error is the row's ``error``); dies only with its process, which Ray then retries."""
    from hetflow.simulated_cost import cache_info
    row = point.columns()
    start, simulated = time.perf_counter(), cache_info()["misses"]
    try:
        compiled = _compile(point)
        row.update(_measures(compiled))
        row["status"] = "ok"
    except Exception as exc:  # a failed point is a row, never the end of the study
        row["status"] = "failed"
        row["error"] = _one_line(exc)
    row["compile_s"] = time.perf_counter() - start
    row["sim_probes"] = cache_info()["misses"] - simulated
    row["worker"] = f"{os.uname().nodename}:{os.getpid()}"
    return row


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, HetflowError) else f"{type(exc).__name__}: {text}"[:400]


def _compile(point: Point):
    from hetflow.api import compile, compile_graph
    from hetflow.ir import Graph
    platform = platform_with(point.platform, point.sets)
    options = dict(placement=point.placement, cost_model=point.cost_model, time_limit=point.time_limit)
    if point.model.endswith(".onnx"):
        return compile(point.model, platform=platform, dynamic_shapes=_onnx_sizes(point.args), **options)
    built = load_builder(point.model)(**dict(point.args))
    if isinstance(built, Graph):
        return compile_graph(built, platform, **options)
    if isinstance(built, tuple) and len(built) == 2:
        model, inputs = built
        return compile(model, inputs if isinstance(inputs, (tuple, list)) else (inputs,), platform=platform,
                       **options)
    raise SweepError(f"{point.model} returned a {type(built).__name__}: a builder returns an ir.Graph or "
                     "(torch_module, example_inputs)")


def _onnx_sizes(args: tuple) -> dict | None:
    """An ONNX model's arguments are sizes of its dim_params (batch=8: every 'batch' dim is 8)."""
    return {name: (value, value) for name, value in args} or None


@functools.lru_cache(maxsize=64)
def load_builder(spec: str) -> Callable:
    """'package.module:function' or 'path/file.py:function' -> the function (a file is run once per process)."""
    from .user_function import import_function

    def error(message: str) -> SweepError:
        return SweepError(f"model {spec!r}: {message}")
    return import_function(spec, error, module_prefix="hetflow_sweep_")


def _measures(compiled) -> dict:
    """What a point records: makespan, per device busy time, bytes moved and groups placed, the peak of each
    memory space, and what the solvers did."""
    schedule, placement, plan = compiled.schedule, compiled.placement, compiled.memory_plan
    row: dict[str, Any] = {"makespan_us": schedule.makespan * 1e6 if schedule else None}
    if schedule is not None:
        for device, seconds in sorted(schedule.busy().items()):
            row[f"busy_us.{device}"] = seconds * 1e6
        for event in schedule.events:
            row[f"bytes.{event.device}"] = row.get(f"bytes.{event.device}", 0) + int(event.bytes)
    for node in compiled.graph.nodes:
        device = node.meta.get("device", "?")
        row[f"groups.{device}"] = row.get(f"groups.{device}", 0) + 1
    if plan is not None:
        for memory, space in sorted(plan.spaces.items()):
            row[f"peak_bytes.{memory}"] = int(space.size)
        row["memplan_limit_hit"] = any(s.limit_hit for s in plan.spaces.values())
    if placement is not None:
        row["placement_chosen"] = placement.chosen
        row["solver"] = placement.solver or placement.policy
        row["solver_limit_hit"] = bool(placement.limit_hit)
    return row


# --- running a study --------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    table: Path
    rows: list[dict]                 # every point of the study, in the study's order
    computed: int = 0                # points computed by this run
    reused: int = 0                  # points found in the table (an earlier run)
    failed: int = 0                  # rows of the study whose compile failed
    seconds: float = 0.0
    engine: str = ""

    def summary(self) -> str:
        return (f"{len(self.rows)} points ({self.computed} computed, {self.reused} from the table, "
                f"{self.failed} failed) in {self.seconds:.1f} s on {self.engine}: {self.table}")


@dataclass
class Progress:
    """One line on stderr: points done, failed and per second (rewritten in place on a terminal)."""
    total: int
    reused: int = 0
    stream: Any = field(default_factory=lambda: sys.stderr)
    enabled: bool = True
    done: int = 0
    failed: int = 0
    start: float = field(default_factory=time.perf_counter)
    _shown: float = 0.0

    def advance(self, row: dict) -> None:
        self.done += 1
        self.failed += row.get("status") == "failed"
        now = time.perf_counter()
        if now - self._shown >= (0.2 if self.stream.isatty() else 5.0):
            self._shown = now
            self.show(now)

    def show(self, now: float | None = None, end: str = "") -> None:
        if not self.enabled:
            return
        elapsed = (now or time.perf_counter()) - self.start
        width = 30
        filled = int(width * (self.done + self.reused) / max(self.total, 1))
        rate = self.done / elapsed if elapsed > 0 else 0.0
        line = (f"sweep [{'#' * filled}{'.' * (width - filled)}] {self.done + self.reused}/{self.total} "
                f"(failed {self.failed}, from table {self.reused}) {rate:.2f} points/s")
        terminal = self.stream.isatty()
        self.stream.write(("\r" + line + end) if terminal else line + "\n")
        self.stream.flush()


def run_points(points: list[Point], table: str | Path, engine: str = "ray", address: str | None = None,
               workers: int | None = None, progress: bool = True,
               on_row: Callable[[dict], None] | None = None) -> SweepResult:
    """Compute the points not already in ``table`` (serially, or as Ray tasks) and stream their rows into it."""
    if engine not in ("ray", "serial"):
        raise SweepError(f"engine {engine!r} is not one of ray, serial")
    unique = list({p.key: p for p in points}.values())
    results = ResultTable(table)
    pending = [p for p in unique if p.key not in results]
    bar = Progress(len(unique), reused=len(unique) - len(pending), enabled=progress)
    start = time.perf_counter()
    label = "this process"

    def record(row: dict) -> None:
        results.add(row)
        bar.advance(row)
        if on_row is not None:
            on_row(row)
    try:
        if engine == "serial":
            for point in pending:
                record(evaluate_point(point))
        elif pending:
            label = _run_on_ray(pending, record, address, workers)
        else:
            label = "ray (nothing left to compute)"
    finally:
        results.write()
        bar.show(end="\n")
    rows = [results.rows[p.key] for p in unique]
    return SweepResult(results.path, rows, len(pending), len(unique) - len(pending),
                       sum(r.get("status") == "failed" for r in rows), time.perf_counter() - start, label)


def _run_on_ray(pending: list[Point], record: Callable[[dict], None], address: str | None,
                workers: int | None) -> str:
    """Each point a Ray task declaring one CPU, retried by Ray when its worker dies; rows recorded as they
    finish, one task in flight per CPU (an interrupt leaves little work thrown away). The
    simulated cost model's probe times are shared across the study: each task returns the probes it timed,
    and later tasks start from all the study has timed (one process's cache, as a serial study has)."""
    ray = import_ray()
    started_here = connect_ray(ray, address, workers)
    queue, running = list(pending), {}
    try:
        task = ray.remote(num_cpus=1, max_retries=5)(_evaluate_on_worker)
        # one task in flight per CPU: a task is given the table as it stands when it is submitted, so a
        # queue of waiting tasks would start from an older one (a point is 0.1-2 s; the gap is milliseconds)
        slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
        timed: dict = {}                                  # the study's simulated probe times
        shared, shared_entries = ray.put({}), 0
        while queue or running:
            if len(timed) != shared_entries:
                shared, shared_entries = ray.put(dict(timed)), len(timed)
            while queue and len(running) < slots:
                point = _next_point(queue, running.values())
                running[task.remote(point, [shared])] = point
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                point = running.pop(ref)
                row, learnt = _task_row(ray, ref, point)
                timed.update(learnt)
                record(row)
        where = address or "embedded"
        return f"ray ({where}, {int(ray.cluster_resources().get('CPU', 0))} CPUs)"
    except BaseException:      # an interrupt: the tasks still running are stopped, their points left to a resume
        for ref in running:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started_here:
            ray.shutdown()


def _next_point(queue: list[Point], running: Iterable[Point], look: int = 64) -> Point:
    """The next point to start: the first of the queue's first ``look`` that is not a simulated point of the
    same model and platform variant as one running (those share most of their probes: run side by side,
    both would simulate them, run one after the other, the second finds them in the table), else the first."""
    busy = {(p.model, p.platform, p.sets) for p in running if p.cost_model == "sim"}
    for index, point in enumerate(queue[:look]):
        if point.cost_model != "sim" or (point.model, point.platform, point.sets) not in busy:
            return queue.pop(index)
    return queue.pop(0)


_MERGED: set[str] = set()      # the shared probe tables this worker process has merged already


def _evaluate_on_worker(point: Point, shared: list) -> tuple[dict, dict]:
    """A Ray task: the point's row, and the simulated probe times it added (``shared``: [a reference to the
    study's table], in a list so that Ray passes the reference, fetched only when new to this worker)."""
    import ray
    from hetflow import simulated_cost
    (reference,) = shared
    if reference.hex() not in _MERGED:
        simulated_cost.merge_cache(ray.get(reference))
        _MERGED.add(reference.hex())
    known = set(simulated_cost.cache_entries())
    row = evaluate_point(point)
    return row, simulated_cost.cache_entries(leave_out=known)


def _task_row(ray, ref, point: Point) -> tuple[dict, dict]:
    """The task's row and probe times; a task Ray gave up on (its worker died past every retry) is a failed
    row too."""
    try:
        return ray.get(ref)
    except Exception as exc:
        row = point.columns()
        row.update(status="failed", error=f"ray: {_one_line(exc)}", compile_s=None, worker=None, sim_probes=None)
        return row, {}


def import_ray():
    try:
        import ray
    except ImportError:
        raise SweepError(RAY_MISSING) from None
    return ray


def connect_ray(ray, address: str | None, workers: int | None) -> bool:
    """Join the running Ray session, the cluster at ``address``, or start Ray embedded here (one worker per
    core, or ``workers``). True when this call started it (and so shuts it down)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray runs its workers at nice 15 by default: on a machine doing anything else a study would get only
    # its idle cycles. The points are the work here, so the workers Ray starts here run at normal priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    else:
        ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                 object_store_memory=OBJECT_STORE_BYTES, logging_level="ERROR")
    return True


def sweep(models: Iterable[str] | str, platform: Iterable[str] | str = "host", set: dict | None = None,
          args: dict | None = None, batch: Iterable[int] | None = None, placement: Iterable[str] | str = "roofline",
          cost_model: Iterable[str] | str = "analytic", table: str | Path = "sweep.parquet",
          engine: str = "ray", address: str | None = None, workers: int | None = None,
          search: str = "grid", budget: int | None = None, seed: int = 0, metric: str = "makespan_us",
          time_limit: float = 10.0, progress: bool = True) -> SweepResult:
    """A study: every point of the grid of ``models`` x ``platform`` (presets or .toml) x ``set`` (platform
    parameter path -> values, e.g. ``{"device.pim.channels": [16, 32]}``) x ``args`` (the builders' keyword
    arguments -> values) x ``batch`` x ``placement`` x ``cost_model``, compiled and predicted, one row each in
    ``table`` (.parquet or .csv; an existing table is resumed). ``search="random"`` or ``"adaptive"``: only
    ``budget`` points, drawn by Ray Tune's search algorithms (adaptive minimises ``metric``)."""
    points = grid_points(models, platform, set, args, batch, placement, cost_model, time_limit)
    check_platforms(points)
    if search == "grid":
        return run_points(points, table, engine, address, workers, progress)
    if engine != "ray":
        raise SweepError(f"search {search!r} runs on Ray Tune: it has no serial engine (use the grid, or Ray)")
    from .sweep_tune import search_points
    return search_points(points, table, search, budget, seed, metric, address, workers, progress)


def check_platforms(points: list[Point]) -> None:
    """Every platform variant of the study read once before any point runs: a wrong --set path or value is
    one error now, not a failed row per point."""
    for platform, sets in {(p.platform, p.sets) for p in points}:
        try:
            platform_with(platform, sets)
        except SweepError:
            raise
        except HetflowError as exc:
            raise SweepError(f"platform {platform!r} with {dict(sets)}: {exc}") from None


def equal_rows(a: dict, b: dict) -> bool:
    """Two rows of the same point equal in everything the point computes (not its wall time or worker)."""
    def kept(row):
        return {k: v for k, v in row.items() if k not in NONDETERMINISTIC and v is not None}
    return kept(a) == kept(b)


class _CallableModule(types.ModuleType):
    """``hetflow.sweep(...)`` is the study function, and ``hetflow.sweep`` is this module once it is imported
    (Python sets a package's attribute to its submodule): so the module itself calls ``sweep``."""

    def __call__(self, *args, **kwargs) -> SweepResult:
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
