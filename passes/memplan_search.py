"""Exact search for static memory allocation: does a plan fit a capacity?

The search follows MiniMalloc (Moffitt, ASPLOS 2023); this is an independent
implementation in Python and NumPy, with extra inference, run beside CP-SAT.

A *canonical* plan places buffers in order of increasing (offset, rank), each
at the lowest offset its already-placed, time-overlapping neighbours allow (its
``minoff``). Every feasible problem has one (take a plan with the smallest sum
of offsets: no buffer can move down, so each sits on a neighbour), so a
depth-first search over canonical sequences is complete. It prunes with:

- section inference: time is cut into sections at the distinct endpoints; in
  a section, the unplaced buffers stack above the lowest offset any of them can
  still take, so that offset plus their total size must fit;
- stranded buffers: a buffer whose ``minoff`` lies behind the current position
  in the canonical order must sit on a neighbour that is yet to be placed (its
  lowest offset rises to the lowest top of those), and one of those must reach
  into its slot at ``minoff``, or it could move down there;
- dominance: no buffer is placed at or above the top of the lowest slot still
  free for another unplaced buffer; identical buffers go in index order;
- decomposition: when no unplaced buffer crosses a section boundary, the two
  sides are solved apart, each under an order made afresh (as MiniMalloc's
  dynamic decomposition does): T counts the unplaced buffers only, so a part
  starts with the buffers of its now most crowded sections. Without this the
  search can thrash for minutes in a part split off early (MiniMalloc's
  instance I: millions of nodes, against 2,641 with it);
- a table of failed states (the unplaced buffers and their ``minoff``).

The instance keeps sparse tables (each buffer's time-overlapping neighbours, each
section's buffers), built by a sweep over the endpoints; the dense n x n and
sections x n tables exist only for the Python search, built on first use.
``too_large`` bounds all of them before a search starts.

Static orders (the tie-breaking rank; ties go by input order) are tried
round-robin under a doubling node limit, as MiniMalloc does. The search runs
compiled where it can (``memplan_search.c``, a C version of ``_Search`` built with the
system's C compiler on first use and cached: it visits the same nodes, some 20
to 100 times faster) and in Python otherwise. ``fit`` runs it and, on a second
core, CP-SAT with one NoOverlap per section (which refutes some dead ends that
the search only finds by enumeration).

Determinism: the answer depends only on the problem and the budget, never on
the machine's speed or on which thread finishes first. The search is bounded by
a node budget and CP-SAT by its deterministic time with one worker and a fixed
seed. The search runs alone for its first ``SOLO_NODES`` nodes (so the nodes an
easy instance takes are exact), then CP-SAT starts beside it; a plan the search
finds within its budget is the answer; CP-SAT stops the search only when it
proves that no plan fits (a fact, whoever proves it); CP-SAT's own plan is used
only when the search spends its budget. The wall clock is a safety net only:
when it stops a search, ``SearchTimeout.wall`` (and ``stats["limit"]``) say so.
"""
from __future__ import annotations

import ctypes
import functools
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np

FOUND, NOT_FOUND = 0, 1
HEURISTICS = ("TWA", "AT", "TA")


SOLO_NODES = 20_000  # nodes the search runs alone before CP-SAT starts beside it
# A time limit of S seconds becomes a deterministic budget: S x NODES_PER_SECOND search nodes
# (the compiled search takes 1-5 s for 100,000 nodes of a few hundred buffers on this 2-core
# machine; the Python one 20-100x longer) and S x DTIME_PER_SECOND of CP-SAT's deterministic
# time (which advanced 0.02-0.07 per wall second on the memory models of MiniMalloc's instances
# here: it is a count of work, not seconds). The wall clock stops everything at
# WALL_FACTOR x S + WALL_SLACK s, a safety net that the plan reports.
NODES_PER_SECOND = 20_000
DTIME_PER_SECOND = 0.02
WALL_FACTOR, WALL_SLACK = 3.0, 1.0


class Budget:
    """What a search may spend: ``nodes`` of the exact search, ``dtime`` of CP-SAT's deterministic
    time (both deterministic), and a wall-clock ``deadline`` (``time.perf_counter()``) as a safety net."""

    def __init__(self, nodes: int, dtime: float, deadline: float):
        self.nodes, self.dtime, self.deadline = max(int(nodes), 1), max(float(dtime), 0.0), deadline

    @classmethod
    def for_seconds(cls, seconds: float, start: float | None = None) -> "Budget":
        """The deterministic budget sized to about ``seconds`` of work on a 2-core machine, with the wall
        clock stopping it at ``WALL_FACTOR * seconds + WALL_SLACK`` s."""
        start = time.perf_counter() if start is None else start
        seconds = max(float(seconds), 0.0)
        return cls(seconds * NODES_PER_SECOND, seconds * DTIME_PER_SECOND, start + WALL_FACTOR * seconds + WALL_SLACK)

    def share(self, nodes: int) -> "Budget":
        """``nodes`` of this budget, with CP-SAT's deterministic time in proportion and the same deadline."""
        nodes = max(int(nodes), 1)
        return Budget(nodes, self.dtime * nodes / self.nodes, self.deadline)

    def left(self) -> float:
        return self.deadline - time.perf_counter()


# What the exact search takes on (``too_large`` says why it would not). Its tables grow with the
# time-overlapping pairs and the buffers' sections (MAX_PAIRS each, some 16 MiB as int32), the Python
# search's with buffers x (buffers + sections) (PYTHON_MAX_CELLS); its 64-bit arithmetic needs
# capacity + a size + the alignment below SEARCH_VALUE_LIMIT (its "infinity" is 2**61).
MAX_PAIRS = 4_000_000
PYTHON_MAX_CELLS = 4_000_000
SEARCH_VALUE_LIMIT = 1 << 60


class TooLarge(ValueError):
    """The problem is past what the exact search takes on (the message says which limit)."""


def too_large(lowers, uppers, sizes, capacity: int, alignment: int = 1, native=None) -> str:
    """Why ``fit`` would refuse this problem, or "" when it takes it on.

    ``native`` as for ``fit`` (whether the Python search would run decides its own limit).
    """
    n = len(sizes)
    if n == 0:
        return ""
    unit = max(math.gcd(*(int(z) for z in sizes), int(alignment) if alignment > 1 else 0), 1)
    top = (int(capacity) + int(max(sizes)) + int(alignment)) // unit  # the search counts in units
    if top >= SEARCH_VALUE_LIMIT:
        return (f"capacity + largest size + alignment is {top} units of {unit} bytes, "
                f"past the search's limit 2**60")
    lowers, uppers = np.asarray(lowers, dtype=np.int64), np.asarray(uppers, dtype=np.int64)
    pairs = _overlapping_pairs(lowers, uppers)
    if 2 * pairs > MAX_PAIRS:
        return f"{pairs} pairs of buffers live at the same time (the exact search takes {MAX_PAIRS // 2})"
    points = np.unique(np.concatenate([lowers, uppers]))
    memberships = int((np.searchsorted(points, uppers) - np.searchsorted(points, lowers)).sum())
    if memberships > MAX_PAIRS:
        return f"{memberships} buffer-section memberships (the exact search takes {MAX_PAIRS})"
    python = native is False or n > _NATIVE_MAX_BUFFERS or (native is None and _native_kernel() is None)
    cells = n * (n + len(points))
    if python and cells > PYTHON_MAX_CELLS:
        return (f"{n} buffers over {len(points) - 1} time sections are too many for the Python search "
                f"(the compiled search is not available here)")
    return ""


def _overlapping_pairs(lowers, uppers) -> int:
    """How many pairs of buffers are live at the same time (counted, not listed)."""
    n = len(lowers)
    starts, ends = np.sort(lowers), np.sort(uppers)
    later = n - np.searchsorted(starts, uppers, side="left")  # start at or after b's end
    earlier = np.searchsorted(ends, lowers, side="right")  # end at or before b's start
    return int((n - 1 - later - earlier).sum()) // 2


class SearchTimeout(Exception):
    """The budget ran out before the search (and CP-SAT) answered.

    ``wall`` is True when the wall clock stopped it (the outcome can then differ between runs),
    False when the deterministic budget did (the same outcome every run)."""

    def __init__(self, wall: bool = False):
        super().__init__("the wall-clock time limit ran out" if wall else "the search budget ran out")
        self.wall = wall


class _NodeLimit(Exception):
    pass


class _Stopped(Exception):
    pass


class _Stop:
    """Set by the CP-SAT thread when it has an answer: an event for Python, a flag word for C."""

    def __init__(self):
        self.event = threading.Event()
        self.flag = np.zeros(1, dtype=np.int32)

    def set(self):
        self.flag[0] = 1
        self.event.set()

    def is_set(self):
        return self.event.is_set()


class _Instance:
    """Buffers sorted by first section, sizes in units of their gcd."""

    def __init__(self, lowers, uppers, sizes, capacity, alignment):
        lowers = np.asarray(lowers, dtype=np.int64)
        uppers = np.asarray(uppers, dtype=np.int64)
        sizes = np.asarray(sizes, dtype=np.int64)
        unit = alignment if alignment > 1 else 0
        for s in set(sizes.tolist()):
            unit = math.gcd(unit, s)
        self.unit = max(unit, 1)
        self.capacity = capacity // self.unit
        self.alignment = max(alignment // self.unit, 1)
        top = self.capacity + int(sizes.max(initial=0)) // self.unit + self.alignment
        if top < 4000:  # sums of two "big" values and a size must fit the dtype
            self.dtype, self.big = np.int16, 14000
        elif top < (1 << 28):
            self.dtype, self.big = np.int32, 1 << 29
        else:
            self.dtype, self.big = np.int64, 1 << 61
        points = np.unique(np.concatenate([lowers, uppers]))
        slo = np.searchsorted(points, lowers)
        shi = np.searchsorted(points, uppers)
        self.perm = np.lexsort((shi, slo))  # buffer b here is perm[b] outside
        self.slo = slo[self.perm]
        self.shi = shi[self.perm]
        self.sizes = (sizes[self.perm] // self.unit).astype(self.dtype)
        self.width = (uppers - lowers)[self.perm]
        self.n = n = len(sizes)
        self.S = S = max(len(points) - 1, 1)
        self.first_of = np.searchsorted(self.slo, np.arange(S + 1))  # first buffer with slo >= s
        self.section_count, self.section_total = _section_sums(self.slo, self.shi, self.sizes, S)
        self.nbr_start, self.nbr = _neighbours(self.slo, self.shi, self.first_of)
        self.twin_prev = np.full(n, -1, dtype=np.int64)
        last = {}
        for b, key in enumerate(zip(self.slo.tolist(), self.shi.tolist(), self.sizes.tolist())):
            self.twin_prev[b] = last.get(key, -1)
            last[key] = b

    # Dense tables, built on first use: only the Python search reads them (``too_large`` bounds
    # buffers x (buffers + sections) for it); the compiled search and CP-SAT use the sparse lists.

    @functools.cached_property
    def member(self) -> np.ndarray:
        """member[s, b]: buffer b is live in section s."""
        member = np.zeros((self.S, self.n), dtype=bool)
        for b in range(self.n):
            member[self.slo[b]:self.shi[b], b] = True
        return member

    @functools.cached_property
    def member_inf(self) -> np.ndarray:
        return np.where(self.member, 0, self.big).astype(self.dtype)

    @functools.cached_property
    def adj(self) -> np.ndarray:
        """adj[a, b]: buffers a and b are live at the same time (a != b)."""
        adj = np.zeros((self.n, self.n), dtype=bool)
        for b in range(self.n):
            adj[b, self.nbr[self.nbr_start[b]:self.nbr_start[b + 1]]] = True
        return adj

    @functools.cached_property
    def adj_inf(self) -> np.ndarray:
        return np.where(self.adj, 0, self.big).astype(self.dtype)

    def section_members(self):
        """(start, members): the buffers live in section s are members[start[s]:start[s + 1]], ascending."""
        widths = (self.shi - self.slo).astype(np.int64)
        owner = np.repeat(np.arange(self.n, dtype=np.int32), widths)
        first = np.cumsum(widths) - widths
        section = self.slo[owner] + (np.arange(len(owner)) - first[owner])
        members = owner[np.argsort(section, kind="stable")]
        start = np.zeros(self.S + 1, dtype=np.int64)
        np.cumsum(self.section_count, out=start[1:])
        return start, members

    def rank(self, heuristic: str) -> np.ndarray:
        """rank[b]: position of b in the static order (W width, A area, T section total, Z size)."""
        total = np.array([self.section_total[a:b].max() for a, b in zip(self.slo, self.shi)])
        sizes = self.sizes.astype(np.int64)
        keys = {"W": self.width, "A": self.width * sizes, "T": total, "Z": sizes}
        cols = [self.perm] + [-keys[c] for c in reversed(heuristic)]
        order = np.lexsort(tuple(cols))
        rank = np.empty(self.n, dtype=np.int64)
        rank[order] = np.arange(self.n)
        return rank

    def offsets(self, solution) -> list[int]:
        out = np.empty(self.n, dtype=np.int64)
        out[self.perm] = np.asarray(solution, dtype=np.int64) * self.unit
        return out.tolist()


def _section_sums(slo, shi, sizes, S):
    """(buffers live, their total size) in each of the S sections, by a sweep over the endpoints."""
    count = np.zeros(S + 1, dtype=np.int64)
    total = np.zeros(S + 1, dtype=np.int64)
    np.add.at(count, slo, 1)
    np.add.at(count, shi, -1)
    np.add.at(total, slo, sizes.astype(np.int64))
    np.add.at(total, shi, -sizes.astype(np.int64))
    return np.cumsum(count)[:S], np.cumsum(total)[:S]


def _neighbours(slo, shi, first_of):
    """(start, nbr): the buffers live at the same time as b are nbr[start[b]:start[b + 1]], ascending.

    The buffers are sorted by (slo, shi), so those after b that overlap it are the run
    b + 1 .. first_of[shi[b]] - 1; each pair is listed from both of its ends.
    """
    n = len(slo)
    after = (first_of[shi] - np.arange(n) - 1).astype(np.int64)
    src = np.repeat(np.arange(n, dtype=np.int32), after)
    first = np.cumsum(after) - after
    dst = (src + 1 + (np.arange(len(src)) - first[src])).astype(np.int32)
    rows, cols = np.concatenate([src, dst]), np.concatenate([dst, src])
    del src, dst
    order = np.lexsort((cols, rows))
    start = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=n), out=start[1:])
    return start, np.ascontiguousarray(cols[order], dtype=np.int32)


class _Search:
    """One depth-first search under one static order and one node limit."""

    def __init__(self, inst: _Instance, rank, deadline, node_limit, table, stop, heuristic="", dynamic=True):
        self.inst = inst
        self.rank = np.array(rank, dtype=np.int64)  # the current part's order (see solve_parts)
        self.heuristic = heuristic
        self.dynamic = dynamic
        self.epoch = None  # the state the current part's order was made in (part of table keys)
        self.deadline = deadline
        self.node_limit = node_limit
        self.table = table
        self.stop = stop
        self.nodes = 0
        n = inst.n
        self.C = inst.capacity
        self.placed = np.zeros(n, dtype=bool)
        self.minoff = np.zeros(n, dtype=inst.dtype)
        self.total = inst.section_total.copy()
        self.cuts = np.zeros(max(inst.S - 1, 0), dtype=np.int64)
        for a, b in zip(inst.slo, inst.shi):
            self.cuts[a:b - 1] += 1
        self.solution = np.full(n, -1, dtype=np.int64)

    def solve_parts(self, s0, s1):
        """Solve the unplaced buffers within sections [s0, s1), split at zero cuts."""
        inst = self.inst
        cuts = np.flatnonzero(self.cuts[s0:s1 - 1] == 0) + s0 + 1
        bounds = [s0] + cuts.tolist() + [s1]
        for a, b in zip(bounds[:-1], bounds[1:]):
            b0, b1 = inst.first_of[a], inst.first_of[b]
            if self.placed[b0:b1].all():
                continue
            if not self.dynamic:
                if self.dfs(a, b, b0, b1, -1, -1) != FOUND:
                    return NOT_FOUND
                continue
            idx, saved, epoch = self._order_part(b0, b1)
            try:
                status = self.dfs(a, b, b0, b1, -1, -1)
            finally:
                self.rank[idx] = saved
                self.epoch = epoch
            if status != FOUND:
                return NOT_FOUND
        return FOUND

    def _order_part(self, b0, b1):
        """Order the unplaced buffers of [b0, b1) afresh, T counting unplaced buffers only.

        MiniMalloc sorts each part that a placement splits off anew: the section
        totals have dropped by then, so T (the largest total among a buffer's
        sections) says which buffers are still in the most crowded sections.
        Returns what to restore: the buffers, their old ranks, the old epoch.
        """
        inst = self.inst
        unpl = ~self.placed[b0:b1]
        idx = np.flatnonzero(unpl) + b0
        total, slo, shi = self.total, inst.slo, inst.shi
        tkey = np.array([total[slo[j]:shi[j]].max() for j in idx.tolist()], dtype=np.int64)
        sizes = inst.sizes[idx].astype(np.int64)
        width = inst.width[idx].astype(np.int64)
        keys = {"T": tkey, "W": width, "A": width * sizes, "Z": sizes}
        cols = [inst.perm[idx]] + [-keys[c] for c in reversed(self.heuristic)]
        order = np.lexsort(tuple(cols))
        saved, epoch = self.rank[idx].copy(), self.epoch
        self.rank[idx[order]] = np.arange(len(idx))
        # the table compares positions (o, rank): only those made under the same order
        self.epoch = (b0, b1, unpl.tobytes(), (self.minoff[b0:b1] * unpl).tobytes())
        return idx, saved, epoch

    def dfs(self, s0, s1, b0, b1, o, r):
        """Place the rest of buffers [b0, b1) canonically after position (o, r)."""
        self.nodes += 1
        if self.nodes > self.node_limit:
            raise _NodeLimit()
        if (self.nodes & 63) == 0:
            if time.perf_counter() > self.deadline:
                raise SearchTimeout(wall=True)
            if self.stop.is_set():
                raise _Stopped()
        unpl = ~self.placed[b0:b1]
        if not unpl.any():
            return FOUND
        mo = self.minoff[b0:b1]
        key = (self.epoch, b0, b1, unpl.tobytes(), (mo * unpl).tobytes())
        prev = self.table.get(key)
        if prev is not None and (o, r) >= prev:
            return NOT_FOUND
        status = self._expand(s0, s1, b0, b1, o, r, unpl, mo)
        if status == NOT_FOUND and (prev is None or (o, r) < prev):
            self.table[key] = (o, r)
        return status

    def _expand(self, s0, s1, b0, b1, o, r, unpl, mo):
        inst = self.inst
        C = self.C
        sizes = inst.sizes[b0:b1]
        rank = self.rank[b0:b1]
        min_height = np.where(unpl, mo + sizes, inst.big).min()
        ok = unpl & (mo < min_height) & ((mo > o) | ((mo == o) & (rank > r)))
        cands = np.flatnonzero(ok)
        if len(cands) == 0:
            return NOT_FOUND
        if len(cands) > 1:
            keys = mo[cands].astype(np.int64) * (inst.n + 1) + rank[cands]
            cands = cands[np.argsort(keys)]
        total = self.total
        tmax = int(total[s0:s1].max())
        align = inst.alignment
        adj, slo, shi, allsizes, twin_prev = inst.adj, inst.slo, inst.shi, inst.sizes, inst.twin_prev
        minoff, placed, cuts = self.minoff, self.placed, self.cuts
        for c in (cands + b0).tolist():
            x = int(minoff[c])
            if x + tmax > C:
                break  # some section could no longer be filled from x up
            twin = twin_prev[c]
            if twin >= 0 and not placed[twin]:
                continue
            lo, hi = slo[c], shi[c]
            size = int(allsizes[c])
            h = x + size
            if align > 1:
                h = -(-h // align) * align
            seg = minoff[b0:b1]
            saved = seg.copy()
            raised = adj[c, b0:b1] & unpl & (seg < h)
            if raised.any():
                if h + sizes[raised].max() > C:
                    continue
                seg[raised] = h
            placed[c] = True
            unpl[c - b0] = False
            total[lo:hi] -= size
            cuts[lo:hi - 1] -= 1
            self.solution[c] = x
            rc = int(self.rank[c])
            status = NOT_FOUND
            if self._feasible(s0, s1, b0, b1, x, rc, unpl):
                if hi - lo > 1 and not cuts[lo:hi - 1].all():
                    status = self.solve_parts(s0, s1)
                else:
                    status = self.dfs(s0, s1, b0, b1, x, rc)
            cuts[lo:hi - 1] += 1
            total[lo:hi] += size
            placed[c] = False
            unpl[c - b0] = True
            minoff[b0:b1] = saved
            if status == FOUND:
                return FOUND
        return NOT_FOUND

    def _feasible(self, s0, s1, b0, b1, o, r, unpl):
        """Section inference after a placement; (o, r) is the new position."""
        inst = self.inst
        big = inst.big
        mo = self.minoff[b0:b1]
        eff = np.where(unpl, np.maximum(mo, o), big)
        stranded = unpl & ((mo < o) | ((mo == o) & (self.rank[b0:b1] < r)))
        if stranded.any():
            st = np.flatnonzero(stranded)
            near = inst.adj_inf[st + b0, b0:b1] + eff
            st_size = inst.sizes[st + b0]
            if (near.min(axis=1) >= mo[st] + st_size).any():
                return False  # nothing left can reach into its slot: it could move down
            low = (near + inst.sizes[b0:b1]).min(axis=1)
            if (low + st_size).max() > self.C:
                return False
            eff[st] = low
        lb = (inst.member_inf[s0:s1, b0:b1] + eff).min(axis=1)
        total = self.total[s0:s1]
        return not ((lb > self.C - total) & (total > 0)).any()


# The same search in C (memplan_search.c, shipped beside this module): compiled with the system's
# C compiler on first use and cached; without a compiler the Python search above runs instead.
_C_FOUND, _C_NOT_FOUND, _C_LIMIT, _C_TIMEOUT, _C_STOPPED = range(5)
_TABLE_SLOTS = 1 << 18  # failed states kept per order (8 MiB); a full table evicts
_NATIVE_MAX_BUFFERS = 20000  # recursion depth grows with the buffers: stay far from a thread's C stack


@functools.lru_cache(maxsize=1)
def _native_kernel():
    """The compiled search, or None when no C compiler (or no writable cache) is available."""
    from hetflow.support.native import compiled_function
    source = Path(__file__).with_name("memplan_search.c")
    if not source.exists():
        return None
    function = compiled_function("memplan", source.read_text(), "hetflow_memplan_search")  # releases the GIL
    if function is None:
        return None
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    function.restype = ctypes.c_int
    function.argtypes = ([i32, i32, i64, i64] + [ptr] * 12 + [i32] + [ptr] * 3
                          + [i64, i64, ctypes.c_double] + [ptr] * 3)
    return function


def native_available() -> bool:
    """Whether the compiled search can run here (else ``fit`` searches in Python)."""
    return _native_kernel() is not None


class _Native:
    """The instance's arrays laid out for the C search."""

    def __init__(self, kernel, inst: _Instance, stop: _Stop):
        self.kernel, self.inst, self.stop = kernel, inst, stop
        i32 = np.int32
        self.nbr_start = np.ascontiguousarray(inst.nbr_start, dtype=i32)
        self.nbr = np.ascontiguousarray(inst.nbr, dtype=i32)
        self.sec_start = np.zeros(inst.S + 1, dtype=i32)
        np.cumsum(inst.section_count, out=self.sec_start[1:])
        self.slo = np.ascontiguousarray(inst.slo, dtype=i32)
        self.shi = np.ascontiguousarray(inst.shi, dtype=i32)
        self.size = np.ascontiguousarray(inst.sizes, dtype=np.int64)
        self.first_of = np.ascontiguousarray(inst.first_of, dtype=i32)
        self.twin_prev = np.ascontiguousarray(inst.twin_prev, dtype=i32)
        cuts = np.zeros(max(inst.S - 1, 1), dtype=i32)
        for a, b in zip(inst.slo.tolist(), inst.shi.tolist()):
            cuts[a:b - 1] += 1
        self.cuts = cuts
        self.total = np.ascontiguousarray(inst.section_total, dtype=np.int64)
        self.solution = np.full(inst.n, -1, dtype=np.int64)
        self.width = np.ascontiguousarray(inst.width, dtype=np.int64)
        self.orig = np.ascontiguousarray(inst.perm, dtype=np.int64)

    def table(self):
        """An empty table of failed states for one order (kept across its restarts)."""
        return np.zeros((_TABLE_SLOTS, 4), dtype=np.int64)

    def run(self, rank, table, node_limit, seconds, heuristic="", dynamic=True):
        """(status, nodes) of one search under one order and node limit."""
        inst = self.inst
        rank = np.ascontiguousarray(rank, dtype=np.int64)
        heur = np.full(4, -1, dtype=np.int32)
        codes = [ "TWAZ".index(ch) for ch in heuristic[:4]]
        heur[:len(codes)] = codes
        nodes = np.zeros(1, dtype=np.int64)
        p = lambda a: a.ctypes.data  # noqa: E731
        status = self.kernel(inst.n, inst.S, inst.capacity, inst.alignment,
                             p(self.slo), p(self.shi), p(self.size), p(self.first_of), p(self.twin_prev),
                             p(self.nbr_start), p(self.nbr), p(self.sec_start), p(rank),
                             p(self.width), p(self.orig), p(heur), int(dynamic), p(self.cuts), p(self.total),
                             p(table), len(table),
                             node_limit, max(seconds, 0.0), p(self.stop.flag), p(self.solution), p(nodes))
        if status > _C_STOPPED:
            raise MemoryError("memplan search: out of memory")
        return status, int(nodes[0])


class _BudgetSpent(Exception):
    pass


def _round_robin(inst, deadline, stop, heuristics, stats, native=None, node_budget=None, solo=None, on_solo=None):
    """MiniMalloc's restarts: each order in turn, the node limit doubling.

    At most ``node_budget`` nodes in all (``_BudgetSpent`` past it); ``on_solo()`` is called once,
    between two runs, when ``solo`` nodes have been spent. Both points depend on node counts only.
    """
    ranks = [inst.rank(h) for h in heuristics]
    kernel = _native_kernel() if native is not False and inst.n <= _NATIVE_MAX_BUFFERS else None
    if native and kernel is None:
        raise RuntimeError("the compiled memplan search is not available here")
    stats["engine"] = "native" if kernel is not None else "python"
    stats.setdefault("nodes", 0)
    budget = math.inf if node_budget is None else node_budget

    def next_limit(limit):
        """The node limit of the next run, or _BudgetSpent; calls on_solo once solo nodes are spent."""
        nonlocal on_solo
        if on_solo is not None and solo is not None and stats["nodes"] >= solo:
            on_solo()
            on_solo = None
        left = budget - stats["nodes"]
        if left <= 0:
            raise _BudgetSpent()
        return int(min(limit, left))

    if kernel is not None:
        runner = _Native(kernel, inst, stop)
        tables = [runner.table() for _ in ranks]
        limit = inst.n
        while True:
            limit *= 2
            for heuristic, rank, table in zip(heuristics, ranks, tables):
                status, nodes = runner.run(rank, table, next_limit(limit), deadline - time.perf_counter(),
                                           heuristic, dynamic=True)
                stats["nodes"] += nodes
                if status == _C_LIMIT:
                    continue
                if status == _C_TIMEOUT:
                    raise SearchTimeout(wall=True)
                if status == _C_STOPPED:
                    raise _Stopped()
                return None if status == _C_NOT_FOUND else runner.solution.copy()
    tables = [{} for _ in heuristics]
    limit = inst.n
    while True:
        limit *= 2
        for heuristic, rank, table in zip(heuristics, ranks, tables):
            s = _Search(inst, rank, deadline, next_limit(limit), table, stop, heuristic)
            try:
                status = s.solve_parts(0, inst.S)
            except _NodeLimit:
                continue
            finally:
                stats["nodes"] += s.nodes
            if status == NOT_FOUND:
                return None
            return s.solution


class _SectionModel:
    """CP-SAT over the sections: one NoOverlap of address intervals per distinct section."""

    def __init__(self, inst: _Instance, hint=None):
        from ortools.sat.python import cp_model

        self.cp_model = cp_model
        m = cp_model.CpModel()
        C, align = inst.capacity, inst.alignment
        sizes = inst.sizes.tolist()
        self.slots = [m.NewIntVar(0, max((C - z) // align, 0), f"k{i}") for i, z in enumerate(sizes)]
        intervals = []
        for i, z in enumerate(sizes):
            start = self.slots[i] * align if align > 1 else self.slots[i]
            intervals.append(m.NewFixedSizeIntervalVar(start, z, f"i{i}"))
        seen = set()
        start, listed = inst.section_members()
        for s in range(inst.S):
            members = tuple(listed[start[s]:start[s + 1]].tolist())
            if len(members) > 1 and members not in seen:
                seen.add(members)
                m.AddNoOverlap([intervals[i] for i in members])
        if hint is not None:
            for v, off in zip(self.slots, hint):
                m.AddHint(v, int(off) // align)
        self.model = m
        self.align = align
        self.solver = cp_model.CpSolver()
        self.result = None  # offsets (scaled), False (infeasible), or None

    def run(self, time_limit, dtime=None):
        """One worker, a fixed seed and a deterministic-time limit: the same answer every run unless the
        wall clock (``time_limit``, a safety net) stops it first (then ``wall_hit``)."""
        params = self.solver.parameters
        params.max_time_in_seconds = max(time_limit, 0.01)
        if dtime is not None:
            params.max_deterministic_time = max(dtime, 1e-3)
        params.num_workers = 1
        params.random_seed = 0
        status = self.solver.Solve(self.model)
        if status in (self.cp_model.OPTIMAL, self.cp_model.FEASIBLE):
            self.result = [self.solver.Value(v) * self.align for v in self.slots]
        elif status == self.cp_model.INFEASIBLE:
            self.result = False
        elif dtime is None or self.solver.deterministic_time < 0.999 * dtime:
            self.wall_hit = True

    wall_hit = False

    def stop(self):
        self.solver.StopSearch()


def fit(lowers, uppers, sizes, capacity, alignment=1, time_limit=60.0,
        workers=2, heuristics=HEURISTICS, stats=None, native=None, budget: Budget | None = None):
    """Offsets (multiples of alignment) that fit capacity, or None when none exist.

    ``budget`` bounds the work deterministically (search nodes, CP-SAT's deterministic time);
    without one it is ``Budget.for_seconds(time_limit)``. Raises SearchTimeout when neither the
    search nor CP-SAT answers within it (``wall``: whether the wall clock stopped it), TooLarge
    when the problem is past what the search takes on (``too_large``).
    ``workers`` > 1 runs CP-SAT in a second thread beside the search, once the search has spent
    ``SOLO_NODES`` nodes alone. ``native``: None runs the compiled search where it is available,
    else the Python one; False always runs Python; True requires the compiled one.

    ``stats`` gets ``nodes``, ``engine``, ``by`` (who answered: "search" or "cp-sat"), ``side``
    (whether CP-SAT ran: the node count is exact only when it did not, or when the search found
    the plan) and ``limit`` ("", "budget" or "wall").
    """
    stats = {} if stats is None else stats
    stats.update(limit="", side=False)
    n = len(sizes)
    if n == 0:
        stats.update(nodes=0, by="no search: no buffers")
        return []
    reason = too_large(lowers, uppers, sizes, capacity, alignment, native)
    if reason:
        raise TooLarge(reason)
    budget = Budget.for_seconds(time_limit) if budget is None else budget
    deadline = budget.deadline
    inst = _Instance(lowers, uppers, sizes, capacity, alignment)
    if int(inst.sizes.max()) > inst.capacity:
        stats.update(nodes=0, by="no search: a buffer exceeds the capacity")
        return None
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 8 * n + 1000))
    stop = _Stop()
    side, thread = None, None

    def start_side():
        nonlocal side, thread
        side = _SectionModel(inst)
        stats["side"] = True

        def run_side():
            side.run(deadline - time.perf_counter(), budget.dtime)
            if side.result is False:  # proved: no plan fits (the search could only agree)
                stop.set()

        thread = threading.Thread(target=run_side, daemon=True)
        thread.start()

    def from_side(wall):
        """After the search stopped without an answer: CP-SAT's, once it has finished."""
        if side is None:
            stats["limit"] = "wall" if wall else "budget"
            raise SearchTimeout(wall)
        thread.join()
        if side.result is None:
            wall = wall or side.wall_hit
            stats["limit"] = "wall" if wall else "budget"
            raise SearchTimeout(wall)
        stats["by"] = "cp-sat"
        if wall and side.result is not False:  # with more time the search might have found its own plan
            stats["limit"] = "wall"
        return None if side.result is False else inst.offsets(side.result)

    try:
        found = _round_robin(inst, deadline, stop, heuristics, stats, native, budget.nodes,
                             SOLO_NODES if workers > 1 else None, start_side if workers > 1 else None)
        stats["by"] = "search"
        return None if found is None else inst.offsets(found)
    except _Stopped:
        stats["by"] = "cp-sat"
        thread.join()
        return None
    except _BudgetSpent:
        return from_side(False)
    except SearchTimeout:
        return from_side(True)
    finally:
        if thread is not None and thread.is_alive():
            side.stop()
            thread.join()
