"""Static memory allocation: an offset for every buffer, no two live ones overlapping.

A buffer is live on the half-open interval [lower, upper) and needs ``size``
bytes. A plan gives every buffer an offset so that buffers live at the same
time never share an address; its peak is the largest offset + size. This module
knows nothing about graphs: the memory-planning pass turns a schedule into
buffers and calls ``solve``.

Methods:

- ``greedy``: TFLite's greedy by size (largest first, best-fitting gap).
- ``cpsat``: OR-Tools CP-SAT with NoOverlap2D over time x address, hinted with
  the greedy plan.
- ``exact`` (default): a search over canonical plans after MiniMalloc, with CP-SAT
  beside it (``memplan_search``; the search runs compiled where a C compiler is
  available, in Python otherwise); without a capacity it bisects the peak
  between the lower bound and the greedy peak.

Every plan is checked, never worse than greedy, and reports the lower bound
(the most bytes live at once) beside its peak.

Limits: sizes and times beyond 2**62 are refused (``MemplanInputError``). A problem
past what the exact search takes on (``memplan_search.too_large``: too many
time-overlapping pairs or section memberships for its tables, or numbers past
2**60) keeps its greedy plan, and the note says why; memory stays linear in the
buffers plus those bounded tables.

MiniMalloc's CSV format and the ``hetflow memplan`` command are the driver's
(``hetflow.memplan_cli``); this module is the solver alone.

Determinism: the time limit is turned into a deterministic budget
(``memplan_search.Budget``: search nodes and CP-SAT's deterministic time, one
CP-SAT worker with a fixed seed), so the same buffers give the same plan on any
machine at any load. The wall clock (``memplan_search.WALL_FACTOR`` x the limit
+ 1 s) is only a safety net. A plan cut short by either says so: ``limit_hit`` and the note
(``NOTE_BUDGET`` or ``NOTE_WALL``, the latter when the plan may differ between runs).
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field

from hetflow.ir.errors import HetflowError

from . import memplan_search

__all__ = [
    "Buffer",
    "MemoryPlan",
    "MemplanInputError",
    "InfeasibleError",
    "PlanError",
    "lower_bound",
    "greedy_by_size",
    "solve",
    "check_plan",
]

METHODS = ("exact", "cpsat", "greedy")
NOTE_BUDGET = "best found within the search budget (not proved optimal)"
NOTE_WALL = ("best found before the wall-clock time limit (not proved optimal; the search was cut short "
             "by the clock, so the plan may differ between runs)")
NOTE_WALL_OPTIMAL = ("proved optimal, but the wall-clock time limit stopped a search step that CP-SAT then "
                     "answered: the offsets may differ between runs")


VALUE_LIMIT = 1 << 62  # sizes and times past this are refused (the solvers are 64-bit)


class MemplanInputError(HetflowError, ValueError):
    """A malformed allocation problem (bad CSV row, negative size, ...)."""


class InfeasibleError(HetflowError, RuntimeError):
    """No plan fits the capacity (proved, or not found in time: see the message)."""


class PlanError(AssertionError):
    """A plan breaks a rule: a missing offset, overlap, misalignment, over capacity."""


@dataclass(frozen=True)
class Buffer:
    """``size`` bytes live on the half-open time interval [lower, upper)."""

    id: str
    lower: int
    upper: int
    size: int


@dataclass
class MemoryPlan:
    offsets: dict[str, int]
    peak: int
    lower_bound: int
    method: str
    optimal: bool  # proved: no plan has a smaller peak (or, with a capacity, fits and is proved minimal)
    solve_seconds: float
    note: str = ""
    greedy_peak: int | None = field(default=None)
    limit_hit: bool = False  # a limit cut the search short: the plan is the best found, not proved optimal
    limit: str = ""  # which: "budget" (the deterministic budget: the same every run) or "wall" (the clock)

    @property
    def gap(self) -> float:
        """How far the peak is above the lower bound, as a fraction of the lower bound."""
        if self.lower_bound <= 0:
            return 0.0
        return (self.peak - self.lower_bound) / self.lower_bound


# ---------------------------------------------------------------- basics

def _validate(buffers: list[Buffer]) -> None:
    seen = set()
    for b in buffers:
        if b.id in seen:
            raise MemplanInputError(f"duplicate buffer id {b.id!r}")
        seen.add(b.id)
        for name in ("lower", "upper", "size"):
            _check_integer(b, name)
        if b.size < 0:
            raise MemplanInputError(f"buffer {b.id!r}: negative size {b.size}")
        if b.upper <= b.lower:
            raise MemplanInputError(f"buffer {b.id!r}: upper {b.upper} <= lower {b.lower} (lifetime is empty)")


def _check_integer(b: Buffer, name: str) -> None:
    value = getattr(b, name)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise MemplanInputError(f"buffer {b.id!r}: {name} {value!r} is not an integer")
    if abs(int(value)) > VALUE_LIMIT:
        raise MemplanInputError(f"buffer {b.id!r}: {name} {value} is beyond the limit 2**62 ({VALUE_LIMIT})")


def lower_bound(buffers: list[Buffer]) -> int:
    """The most bytes live at any one time: no plan's peak is below it."""
    events = {}
    for b in buffers:
        events[b.lower] = events.get(b.lower, 0) + b.size
        events[b.upper] = events.get(b.upper, 0) - b.size
    live = best = 0
    for t in sorted(events):
        live += events[t]
        best = max(best, live)
    return best


def _align_up(x: int, alignment: int) -> int:
    return -(-x // alignment) * alignment


def _peak(buffers: list[Buffer], offsets: dict[str, int]) -> int:
    return max((offsets[b.id] + b.size for b in buffers), default=0)


def greedy_by_size(buffers: list[Buffer], alignment: int = 1) -> dict[str, int]:
    """TFLite's greedy by size: largest first, each into the best-fitting gap.

    The gaps are those left by already-placed buffers that overlap it in time;
    the smallest gap that holds it wins, else it goes on top of them.
    """
    order = sorted(buffers, key=lambda b: (-b.size, b.lower, b.id))
    placed: list[tuple[int, int, int, int]] = []  # offset, top, lower, upper (sorted by offset)
    offsets: dict[str, int] = {}
    for b in order:
        best, best_gap, cursor = None, math.inf, 0
        for off, top, lo, up in placed:
            if up <= b.lower or b.upper <= lo:
                continue
            gap = off - _align_up(cursor, alignment)
            if gap >= b.size and gap < best_gap:
                best, best_gap = _align_up(cursor, alignment), gap
            cursor = max(cursor, top)
        if best is None:
            best = _align_up(cursor, alignment)
        offsets[b.id] = best
        entry = (best, best + b.size, b.lower, b.upper)
        placed.insert(_bisect(placed, best), entry)
    return offsets


def _bisect(placed, offset):
    lo, hi = 0, len(placed)
    while lo < hi:
        mid = (lo + hi) // 2
        if placed[mid][0] <= offset:
            lo = mid + 1
        else:
            hi = mid
    return lo


def check_plan(buffers: list[Buffer], plan_or_offsets, capacity: int | None = None,
               alignment: int = 1) -> None:
    """Raise PlanError unless the plan is valid for these buffers."""
    offsets = plan_or_offsets.offsets if isinstance(plan_or_offsets, MemoryPlan) else plan_or_offsets
    for b in buffers:
        if b.id not in offsets:
            raise PlanError(f"buffer {b.id!r} has no offset")
        off = offsets[b.id]
        if off < 0:
            raise PlanError(f"buffer {b.id!r}: negative offset {off}")
        if off % alignment:
            raise PlanError(f"buffer {b.id!r}: offset {off} is not a multiple of {alignment}")
        if capacity is not None and off + b.size > capacity:
            raise PlanError(f"buffer {b.id!r}: [{off}, {off + b.size}) exceeds capacity {capacity}")
    live = sorted((b for b in buffers if b.size > 0), key=lambda b: b.lower)
    active: list[Buffer] = []
    for b in live:
        active = [a for a in active if a.upper > b.lower]
        lo, hi = offsets[b.id], offsets[b.id] + b.size
        for a in active:
            alo, ahi = offsets[a.id], offsets[a.id] + a.size
            if lo < ahi and alo < hi:
                raise PlanError(
                    f"buffers {a.id!r} (live [{a.lower}, {a.upper}), bytes [{alo}, {ahi})) and "
                    f"{b.id!r} (live [{b.lower}, {b.upper}), bytes [{lo}, {hi})) overlap")
        active.append(b)


# ---------------------------------------------------------------- solvers

def _limit_note(limit: str, optimal: bool = False) -> str:
    if limit == "wall" and optimal:
        return NOTE_WALL_OPTIMAL
    return {"": "", "budget": NOTE_BUDGET, "wall": NOTE_WALL}[limit]


def _cpsat(buffers, capacity, alignment, budget, hint, upper):
    """Plain CP-SAT: NoOverlap2D over time x address. Returns (offsets | None, proved, limit).

    One worker, a fixed seed and a deterministic-time limit (the same answer on every run);
    ``limit`` is "" (answered), "budget" (deterministic time spent) or "wall" (the clock).
    """
    from ortools.sat.python import cp_model

    m = cp_model.CpModel()
    top = capacity if capacity is not None else upper
    peak = m.NewIntVar(0, top, "peak")
    xs, ys, starts = [], [], {}
    for b in buffers:
        k = m.NewIntVar(0, max((top - b.size) // alignment, 0), f"k_{b.id}")
        start = k * alignment if alignment > 1 else k
        starts[b.id] = k
        xs.append(m.NewFixedSizeIntervalVar(b.lower, b.upper - b.lower, f"t_{b.id}"))
        ys.append(m.NewFixedSizeIntervalVar(start, b.size, f"a_{b.id}"))
        m.Add(start + b.size <= peak)
        m.AddHint(k, hint[b.id] // alignment)
    m.AddNoOverlap2D(xs, ys)
    if capacity is None:
        m.Minimize(peak)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(budget.left(), 0.01)
    solver.parameters.max_deterministic_time = max(budget.dtime, 1e-3)
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = 0
    status = solver.Solve(m)
    limit = ""
    if status not in (cp_model.OPTIMAL, cp_model.INFEASIBLE):
        limit = "budget" if solver.deterministic_time >= 0.999 * max(budget.dtime, 1e-3) else "wall"
    if status == cp_model.INFEASIBLE:
        return None, True, ""
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None, False, limit
    offsets = {bid: solver.Value(k) * alignment for bid, k in starts.items()}
    return offsets, status == cp_model.OPTIMAL, limit


def _exact_fit(buffers, capacity, alignment, budget, stats=None):
    """Offsets that fit capacity; None if proved impossible; raises SearchTimeout."""
    live = [b for b in buffers if b.size > 0]
    found = memplan_search.fit([b.lower for b in live], [b.upper for b in live],
                               [b.size for b in live], capacity, alignment, budget=budget, stats=stats)
    if found is None:
        return None
    offsets = {b.id: 0 for b in buffers}
    offsets.update({b.id: off for b, off in zip(live, found)})
    return offsets


def _exact_min(buffers, lb, greedy, greedy_peak, alignment, budget):
    """Bisect the peak between the lower bound and the greedy peak. Returns (offsets, proved, limit).

    Each target gets half the nodes left (the last possible one all of them). A target is charged
    the nodes its search took when that count is exact (the search found the plan, or refuted the
    target before CP-SAT started beside it), else its whole share: so which targets run, and with
    what budget, never depends on timing. A target left undecided by its share is stepped over
    (the bisection goes on above it, unproved). ``limit``: "", "budget" or "wall".
    """
    best, best_peak = greedy, greedy_peak
    lo = lb  # proved: no plan peaks below lo
    probe = lb  # the lowest target still worth trying (undecided targets raise it, unproved)
    first = True
    nodes_left = budget.nodes
    limit = ""
    while probe < best_peak:
        if budget.left() <= 0:
            limit = "wall"
            break
        if nodes_left <= 0:
            limit = "budget"
            break
        target = probe if first else (probe + best_peak - 1) // 2
        first = False
        share = nodes_left // 2 if target < best_peak - 1 and nodes_left > 1 else nodes_left
        stats = {}
        try:
            found = _exact_fit(buffers, target, alignment, budget.share(share), stats)
        except memplan_search.SearchTimeout as e:
            if e.wall:
                limit = "wall"
                break
            limit = "budget"
            nodes_left -= share
            probe = target + 1
            continue
        exact = stats.get("by") == "search" and (found is not None or not stats.get("side"))
        nodes_left -= min(stats.get("nodes", 0), share) if exact else share
        if stats.get("limit") == "wall":  # answered by CP-SAT after the clock stopped the search
            limit = "wall"
        if found is None:
            lo = target + 1
            probe = max(probe, lo)
        else:
            best, best_peak = found, _peak(buffers, found)
    if lo >= best_peak:
        return best, True, limit if limit == "wall" else ""
    return best, False, limit or "budget"


def _too_large(buffers, capacity, alignment, method) -> str:
    """Why ``method`` would not run on these buffers (its tables or numbers too big), or "".

    The exact search bounds its tables (``memplan_search.too_large``); CP-SAT's model is linear in
    the buffers (NoOverlap2D), so only its numbers are bounded.
    """
    live = [b for b in buffers if b.size > 0]
    if method == "exact":
        return memplan_search.too_large([b.lower for b in live], [b.upper for b in live],
                                        [b.size for b in live], capacity, alignment)
    top = capacity + max((b.size for b in live), default=0) + alignment
    if top >= memplan_search.SEARCH_VALUE_LIMIT:
        return f"capacity + largest size + alignment is {top}, past CP-SAT's limit 2**60"
    return ""


def solve(buffers: list[Buffer], capacity: int | None = None, time_limit_s: float = 60.0,
          method: str = "exact", alignment: int = 1) -> MemoryPlan:
    """Plan offsets for buffers.

    Without a capacity, minimise the peak. With one, find a plan that fits it,
    or raise InfeasibleError: "infeasible at capacity N (lower bound M)" when
    that is proved, "no plan found within capacity N (...)" otherwise.
    The plan is never worse than greedy's. ``time_limit_s`` sizes a deterministic
    budget (``memplan_search.Budget.for_seconds``): the same buffers give the same
    plan on every run; ``limit_hit`` and ``note`` say when a limit cut the search short.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if not 1 <= alignment <= VALUE_LIMIT:
        raise ValueError(f"alignment must be between 1 and 2**62, got {alignment}")
    if not 0 <= time_limit_s < math.inf:
        raise ValueError(f"the time limit must be a finite number of seconds >= 0, got {time_limit_s}")
    buffers = list(buffers)
    _validate(buffers)
    start = time.perf_counter()
    budget = memplan_search.Budget.for_seconds(time_limit_s, start)
    lb = lower_bound(buffers)
    greedy = greedy_by_size(buffers, alignment)
    greedy_peak = _peak(buffers, greedy)

    def plan(offsets, method_used, optimal, note="", limit=""):
        check_plan(buffers, offsets, capacity, alignment)
        note = "; ".join(t for t in (note, _limit_note(limit, optimal)) if t)
        return MemoryPlan(offsets, _peak(buffers, offsets), lb, method_used, optimal,
                          time.perf_counter() - start, note, greedy_peak, bool(limit), limit)

    if capacity is not None and lb > capacity:
        raise InfeasibleError(f"infeasible at capacity {capacity} (lower bound {lb})")
    if capacity is not None and any(b.size > capacity for b in buffers):
        big = max(buffers, key=lambda b: b.size)
        raise InfeasibleError(f"infeasible at capacity {capacity} (buffer {big.id!r} alone needs {big.size})")

    def not_found(best_peak, proved=False, wall=False, skipped=""):
        secs = time.perf_counter() - start
        if proved:
            return InfeasibleError(f"infeasible at capacity {capacity} (lower bound {lb}; "
                                   f"proved by exhaustive search in {secs:.1f} s)")
        why = (f"by greedy (the {method} search was skipped: {skipped})" if skipped else
               f"before the wall-clock time limit ({secs:.1f} s)" if wall else
               f"within the search budget for a {time_limit_s:g} s time limit")
        return InfeasibleError(f"no plan found within capacity {capacity} {why} "
                               f"(best peak {best_peak}, lower bound {lb})")

    if capacity is not None and greedy_peak <= capacity and method == "greedy":
        return plan(greedy, "greedy", greedy_peak == lb)
    if method == "greedy":
        if capacity is not None:
            raise not_found(greedy_peak)
        return plan(greedy, "greedy", greedy_peak == lb)
    if greedy_peak == lb or (capacity is not None and greedy_peak <= capacity):
        return plan(greedy, method, greedy_peak == lb, "greedy plan fits" if greedy_peak > lb else "")
    skipped = _too_large(buffers, capacity if capacity is not None else greedy_peak, alignment, method)
    if skipped:
        if capacity is not None:
            raise not_found(greedy_peak, skipped=skipped)
        return plan(greedy, "greedy", False, f"greedy plan kept: the {method} search was skipped ({skipped})")

    if method == "cpsat":
        offsets, proved, limit = _cpsat(buffers, capacity, alignment, budget, greedy, greedy_peak)
        if offsets is None:
            if capacity is not None:
                raise not_found(greedy_peak, proved, limit == "wall")
            return plan(greedy, "cpsat", False, "greedy plan used", limit or "budget")
        if _peak(buffers, offsets) > greedy_peak:
            offsets = greedy
        optimal = proved if capacity is None else _peak(buffers, offsets) == lb
        return plan(offsets, "cpsat", optimal, "", "" if proved or capacity is not None else limit or "budget")

    if capacity is not None:
        try:
            offsets = _exact_fit(buffers, capacity, alignment, budget)
        except memplan_search.SearchTimeout as e:
            raise not_found(greedy_peak, wall=e.wall) from None
        if offsets is None:
            raise not_found(greedy_peak, proved=True)
        return plan(offsets, "exact", _peak(buffers, offsets) == lb)
    offsets, proved, limit = _exact_min(buffers, lb, greedy, greedy_peak, alignment, budget)
    return plan(offsets, "exact", proved, "", limit)
