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
  sides are solved apart;
- a table of failed states (the unplaced buffers and their ``minoff``).

Static orders (the tie-breaking rank) are tried round-robin under a doubling
node limit, as MiniMalloc does. ``fit`` runs this search and, on a second core,
CP-SAT with one NoOverlap per section (which refutes some dead ends that the
search only finds by enumeration); the first answer wins.
"""
from __future__ import annotations

import math
import sys
import threading
import time

import numpy as np

FOUND, NOT_FOUND = 0, 1
HEURISTICS = ("TWA", "AT", "TA")


class SearchTimeout(Exception):
    """The time limit ran out before the search finished."""


class _NodeLimit(Exception):
    pass


class _Stopped(Exception):
    pass


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
        member = np.zeros((S, n), dtype=bool)
        for b in range(n):
            member[self.slo[b]:self.shi[b], b] = True
        self.member = member
        self.member_inf = np.where(member, 0, self.big).astype(self.dtype)
        self.adj = (self.slo[:, None] < self.shi[None, :]) & (self.slo[None, :] < self.shi[:, None])
        np.fill_diagonal(self.adj, False)
        self.adj_inf = np.where(self.adj, 0, self.big).astype(self.dtype)
        self.section_total = member.astype(np.int64) @ self.sizes.astype(np.int64)
        self.twin_prev = np.full(n, -1, dtype=np.int64)
        last = {}
        for b, key in enumerate(zip(self.slo.tolist(), self.shi.tolist(), self.sizes.tolist())):
            self.twin_prev[b] = last.get(key, -1)
            last[key] = b
        self.first_of = np.searchsorted(self.slo, np.arange(S + 1))  # first buffer with slo >= s

    def rank(self, heuristic: str) -> np.ndarray:
        """rank[b]: position of b in the static order (W width, A area, T section total, Z size)."""
        total = np.array([self.section_total[a:b].max() for a, b in zip(self.slo, self.shi)])
        sizes = self.sizes.astype(np.int64)
        keys = {"W": self.width, "A": self.width * sizes, "T": total, "Z": sizes}
        cols = [np.arange(self.n)] + [-keys[c] for c in reversed(heuristic)]
        order = np.lexsort(tuple(cols))
        rank = np.empty(self.n, dtype=np.int64)
        rank[order] = np.arange(self.n)
        return rank

    def offsets(self, solution) -> list[int]:
        out = np.empty(self.n, dtype=np.int64)
        out[self.perm] = np.asarray(solution, dtype=np.int64) * self.unit
        return out.tolist()


class _Search:
    """One depth-first search under one static order and one node limit."""

    def __init__(self, inst: _Instance, rank, deadline, node_limit, table, stop):
        self.inst = inst
        self.rank = rank
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
            if self.dfs(a, b, b0, b1, -1, -1) != FOUND:
                return NOT_FOUND
        return FOUND

    def dfs(self, s0, s1, b0, b1, o, r):
        """Place the rest of buffers [b0, b1) canonically after position (o, r)."""
        self.nodes += 1
        if self.nodes > self.node_limit:
            raise _NodeLimit()
        if (self.nodes & 63) == 0:
            if time.perf_counter() > self.deadline:
                raise SearchTimeout()
            if self.stop.is_set():
                raise _Stopped()
        unpl = ~self.placed[b0:b1]
        if not unpl.any():
            return FOUND
        mo = self.minoff[b0:b1]
        key = (b0, b1, unpl.tobytes(), (mo * unpl).tobytes())
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


def _round_robin(inst, deadline, stop, heuristics, stats):
    """MiniMalloc's restarts: each order in turn, the node limit doubling."""
    ranks = [inst.rank(h) for h in heuristics]
    tables = [{} for _ in heuristics]
    limit = inst.n
    while True:
        limit *= 2
        for rank, table in zip(ranks, tables):
            s = _Search(inst, rank, deadline, limit, table, stop)
            try:
                status = s.solve_parts(0, inst.S)
            except _NodeLimit:
                continue
            finally:
                stats["nodes"] = stats.get("nodes", 0) + s.nodes
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
        for s in range(inst.S):
            members = tuple(np.flatnonzero(inst.member[s]).tolist())
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

    def run(self, time_limit, workers=1):
        self.solver.parameters.max_time_in_seconds = max(time_limit, 0.01)
        self.solver.parameters.num_workers = workers
        status = self.solver.Solve(self.model)
        if status in (self.cp_model.OPTIMAL, self.cp_model.FEASIBLE):
            self.result = [self.solver.Value(v) * self.align for v in self.slots]
        elif status == self.cp_model.INFEASIBLE:
            self.result = False

    def stop(self):
        self.solver.StopSearch()


def fit(lowers, uppers, sizes, capacity, alignment=1, time_limit=60.0,
        workers=2, heuristics=HEURISTICS, stats=None):
    """Offsets (multiples of alignment) that fit capacity, or None when none exist.

    Raises SearchTimeout when neither the search nor CP-SAT answers in time.
    ``workers`` > 1 runs CP-SAT in a second thread beside the search.
    """
    stats = {} if stats is None else stats
    n = len(sizes)
    if n == 0:
        return []
    deadline = time.perf_counter() + time_limit
    inst = _Instance(lowers, uppers, sizes, capacity, alignment)
    if int(inst.sizes.max()) > inst.capacity:
        return None
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 8 * n + 1000))
    stop = threading.Event()
    side = None
    if workers > 1:
        side = _SectionModel(inst)

        def run_side():
            side.run(deadline - time.perf_counter())
            if side.result is not None:
                stop.set()

        thread = threading.Thread(target=run_side, daemon=True)
        thread.start()
    try:
        found = _round_robin(inst, deadline, stop, heuristics, stats)
        stats["by"] = "search"
        return None if found is None else inst.offsets(found)
    except _Stopped:
        stats["by"] = "cp-sat"
        thread.join()
        return None if side.result is False else inst.offsets(side.result)
    except SearchTimeout:
        if side is not None:
            thread.join()
            if side.result is not None:
                stats["by"] = "cp-sat"
                return None if side.result is False else inst.offsets(side.result)
        raise
    finally:
        if side is not None and thread.is_alive():
            side.stop()
            thread.join()
