"""Random and adaptive studies: ``budget`` points of a grid drawn by Ray Tune's search algorithms.

``search="random"`` samples each axis uniformly (Tune's ``BasicVariantGenerator``, seeded); ``"adaptive"``
asks Optuna's TPE sampler (Tune's ``OptunaSearch``, seeded) for the next point from the results so far,
minimising ``metric`` (a failed point counts as the worst). Each trial is one point, declaring one CPU.

A searcher may draw a point twice, and a resumed study draws its finished points again (the same seed gives
the same draws): a trial whose point is in the table reports that row, and one whose point another trial of
this study is computing waits for that row (a small Ray actor, the ledger, records who computes what), so
no point is computed twice. Rows stream into the table from the driver as trials report.
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time

from .sweep import (Point, Progress, SweepError, SweepResult, connect_ray, evaluate_point, import_ray)
from .sweep_table import ResultTable

__all__ = ["search_points", "axes_of"]

WORST = 1e30   # a failed point's objective: worse than any makespan


def axes_of(points: list[Point]) -> dict[str, list]:
    """The grid's axes: each field of a point, with the values the grid gives it (in the grid's order)."""
    axes: dict[str, list] = {}
    for point in points:
        for name, value in _fields(point):
            values = axes.setdefault(name, [])
            if value not in values:
                values.append(value)
    return axes


def _fields(point: Point) -> list[tuple[str, object]]:
    return ([("model", point.model), ("platform", point.platform), ("placement", point.placement),
             ("cost_model", point.cost_model), ("time_limit", point.time_limit)]
            + [(f"set.{p}", v) for p, v in point.sets] + [(f"arg.{n}", v) for n, v in point.args])


def _point_of(config: dict, axes: dict[str, list]) -> Point:
    """A trial's config (an index per axis) as the grid point it names."""
    value = {name: axes[name][config[name]] for name in axes}
    sets = tuple((n[4:], v) for n, v in value.items() if n.startswith("set."))
    args = tuple((n[4:], v) for n, v in value.items() if n.startswith("arg."))
    return Point(value["model"], value["platform"], sets, args, value["placement"], value["cost_model"],
                 value["time_limit"])


def search_points(points: list[Point], table, search: str, budget: int | None, seed: int, metric: str,
                  address: str | None, workers: int | None, progress: bool) -> SweepResult:
    if search not in ("random", "adaptive"):
        raise SweepError(f"search {search!r} is not one of grid, random, adaptive")
    if not budget or budget < 1:
        raise SweepError(f"search {search!r} draws --budget points: give a budget of at least 1")
    ray = import_ray()
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")   # the table is the study's record
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from ray import tune
    axes = axes_of(points)
    results = ResultTable(table)
    known = dict(results.rows)
    bar = Progress(budget, enabled=progress)
    seen: dict[str, dict] = {}
    computed = [0]

    def record(row: dict) -> None:
        computed[0] += row["point"] not in known and row["point"] not in seen
        results.add(row)
        seen.setdefault(row["point"], row)
        bar.advance(row)

    start = time.perf_counter()
    started_here = connect_ray(ray, address, workers)
    try:
        ledger = _Ledger.options(num_cpus=0).remote()
        trainable = tune.with_parameters(_trial, axes=axes, known=known, ledger=ledger, metric=metric)
        space = {name: tune.choice(list(range(len(values)))) for name, values in axes.items()}
        tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": 1}), param_space=space,
                           tune_config=tune.TuneConfig(num_samples=budget, metric="objective", mode="min",
                                                       search_alg=_searcher(search, seed)),
                           run_config=tune.RunConfig(storage_path=tempfile.mkdtemp(prefix="hetflow-tune-"),
                                                     verbose=0, callbacks=[_rows_callback(tune, record)],
                                                     failure_config=tune.FailureConfig(max_failures=3)))
        handler = signal.getsignal(signal.SIGINT)
        try:
            tuner.fit()
        finally:   # Tune installs its own Ctrl-C handler (a flag, no KeyboardInterrupt) and leaves it installed
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, handler)
    finally:
        results.write()
        bar.show(end="\n")
        if started_here:
            ray.shutdown()
    rows = list(seen.values())
    return SweepResult(results.path, rows, computed[0], len(rows) - computed[0],
                       sum(r.get("status") == "failed" for r in rows), time.perf_counter() - start,
                       f"ray tune ({search}, budget {budget}, seed {seed})")


def _rows_callback(tune, record):
    """A Tune callback handing each trial's row to ``record`` in the driver. Tune pickles its callbacks with
    the experiment's state; the pickled copy records nothing (the table is the study's record)."""

    class Rows(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if self.__dict__.get("record") is not None:
                self.record(json.loads(result["row"]))

        def __getstate__(self):
            return {}
    callback = Rows()
    callback.record = record
    return callback


def _searcher(search: str, seed: int):
    if search == "random":
        from ray.tune.search import BasicVariantGenerator
        return BasicVariantGenerator(random_state=seed)
    try:
        from ray.tune.search.optuna import OptunaSearch
        import optuna  # noqa: F401  (Tune's wrapper imports it lazily: say what is missing now)
    except ImportError:
        raise SweepError("adaptive search uses Optuna through Ray Tune: pip install 'hetflow[sweep]' "
                         "(ray[tune], pyarrow, optuna)") from None
    import optuna
    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed))


def _trial(config: dict, axes: dict, known: dict, ledger, metric: str) -> None:
    """One Tune trial: its point's row (from the table, from the trial computing it, or computed here)."""
    import ray
    from ray import tune
    point = _point_of(config, axes)
    row = known.get(point.key)
    owner = tune.get_context().get_trial_id()   # a trial Tune retries after its worker died claims again
    if row is None and ray.get(ledger.claim.remote(point.key, owner)):
        row = evaluate_point(point)
        ray.get(ledger.put.remote(point.key, row))
    while row is None:
        row = ray.get(ledger.get.remote(point.key))
        if row is None:
            time.sleep(0.2)
    value = row.get(metric)
    objective = float(value) if row.get("status") == "ok" and isinstance(value, (int, float)) else WORST
    tune.report({"objective": objective, "row": json.dumps(row)})


def _ledger_class():
    import ray

    @ray.remote
    class Ledger:
        """Which point a trial of this study is computing, and its row once done."""

        def __init__(self):
            self.rows: dict[str, dict | None] = {}
            self.owners: dict[str, str] = {}

        def claim(self, key: str, owner: str) -> bool:
            if key in self.rows and self.owners[key] != owner:
                return False
            self.rows[key], self.owners[key] = None, owner
            return True

        def put(self, key: str, row: dict) -> None:
            self.rows[key] = row

        def get(self, key: str):
            return self.rows.get(key)
    return Ledger


class _LazyLedger:
    """The ledger's Ray actor class, made on first use (importing this module needs no Ray)."""

    def options(self, **kwargs):
        return _ledger_class().options(**kwargs)


_Ledger = _LazyLedger()
