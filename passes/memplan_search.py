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

Static orders (the tie-breaking rank; ties go by input order) are tried
round-robin under a doubling node limit, as MiniMalloc does. The search runs
compiled where it can (``_KERNEL_C``, a C version of ``_Search`` built with the
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
        cols = [self.perm] + [-keys[c] for c in reversed(heuristic)]
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


# The same search in C: compiled with the system's C compiler on first use and cached
# (as runtime/sync.py does); without a compiler the Python search above runs instead.
# It keeps the rules of _Search and the order of candidates, so it visits the same
# tree. Its table of failed states has a fixed size (a full slot is overwritten,
# which only loses pruning) and names a state by two independent 64-bit hashes
# instead of the state itself (a wrong prune would need both to collide). It stops
# early on one rule that _Search gets from its stranded-buffer check: when a buffer
# with no unplaced neighbour (nothing can ever be stacked on it, MiniMalloc's
# "hatless" case) fails, its later siblings fail too, as it would stay stranded
# below them. Section checks keep each section's unplaced buffers in a list and try
# first the section that failed last and those of the buffers just raised.
_KERNEL_C = r"""
/* hetflow memplan: the canonical search of memplan_search.py in C (same rules). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { FOUND = 0, NOT_FOUND = 1, LIMIT = 2, TIMEOUT = 3, STOPPED = 4, NOMEM = 5 };

typedef struct {
    int32_t n, S;
    int64_t C, align;
    const int32_t *slo, *shi, *first_of, *twin_prev, *nbr_start, *nbr, *sec_start;
    const int64_t *size, *width, *orig;
    int64_t *rank, *tkey;       /* rank: the order of the current part (see solve_parts) */
    int32_t heur[4], dynamic;   /* heuristic letters as codes: 0 T, 1 W, 2 A, 3 Z, -1 none */
    uint64_t epoch;             /* names the state the current part's order was made in */
    int64_t *minoff, *total, *solution, *eff, *low_of;
    int32_t *cuts, *strand, hint;
    int64_t *table, table_mask;  /* failed states: (key1, key2, o, r) per slot */
    /* each section's unplaced buffers first in its slice of sec_list (sec_count of
       them); pos[pair_start[j] + t - slo[j]] is where buffer j sits in section t's */
    int32_t *sec_list, *sec_count, *pos, *pair_start;
    char *placed;
    int64_t nodes, limit;
    double deadline;
    volatile int32_t *stop;
    int32_t *cand; int64_t cand_cap, cand_top;   /* candidate lists, one block per open node */
    int64_t *undo; int64_t undo_cap, undo_top;   /* (buffer, old minoff) pairs */
} Search;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static int reserve_cand(Search *s, int64_t more) {
    if (s->cand_top + more <= s->cand_cap) return 1;
    int64_t cap = 2 * (s->cand_top + more);
    int32_t *p = realloc(s->cand, cap * sizeof *p);
    if (!p) return 0;
    s->cand = p; s->cand_cap = cap;
    return 1;
}

static int reserve_undo(Search *s, int64_t more) {
    if (s->undo_top + 2 * more <= s->undo_cap) return 1;
    int64_t cap = 2 * (s->undo_top + 2 * more);
    int64_t *p = realloc(s->undo, cap * sizeof *p);
    if (!p) return 0;
    s->undo = p; s->undo_cap = cap;
    return 1;
}

/* Whether section t can no longer hold its unplaced buffers: all of them start above
   C - total[t] (eff[] holds their lowest offsets). Stops at the first that does not. */
static int section_fails(const Search *s, int32_t t) {
    int64_t room = s->C - s->total[t];
    const int32_t *m = s->sec_list + s->sec_start[t];
    for (int32_t i = 0, k = s->sec_count[t]; i < k; i++)
        if (s->eff[m[i]] <= room) return 0;
    return s->sec_count[t] > 0;
}

/* Take buffer c out of (or, undoing the last take, back into) its sections' lists. */
static void take(Search *s, int32_t c) {
    for (int32_t t = s->slo[c]; t < s->shi[c]; t++) {
        int32_t *m = s->sec_list + s->sec_start[t];
        int32_t p = s->pos[s->pair_start[c] + t - s->slo[c]], last = --s->sec_count[t];
        int32_t other = m[last];
        m[p] = other;
        s->pos[s->pair_start[other] + t - s->slo[other]] = p;
        m[last] = c;
        s->pos[s->pair_start[c] + t - s->slo[c]] = last;
    }
}

static void put_back(Search *s, int32_t c) {
    for (int32_t t = s->slo[c]; t < s->shi[c]; t++) s->sec_count[t]++;
}

/* Section inference after placing a buffer at o with rank r (see _Search._feasible).
   Cheap refutations first: the section that failed last, then the sections
   [d0, d1) of the buffers just raised (only these can fail before the stranded
   buffers are raised: the parent passed, and o + total fits everywhere). */
static int feasible(Search *s, int32_t s0, int32_t s1, int32_t b0, int32_t b1, int64_t o, int64_t r,
                    int32_t d0, int32_t d1) {
    const int64_t BIG = INT64_MAX / 4;
    int64_t *eff = s->eff, *low_of = s->low_of;
    for (int32_t j = b0; j < b1; j++)
        if (!s->placed[j]) eff[j] = s->minoff[j] > o ? s->minoff[j] : o;
    if (s->hint >= s0 && s->hint < s1 && section_fails(s, s->hint)) return 0;
    if (d0 < s0) d0 = s0;
    if (d1 > s1) d1 = s1;
    for (int32_t t = d0; t < d1; t++)
        if (section_fails(s, t)) { s->hint = t; return 0; }
    int32_t nst = 0;
    for (int32_t j = b0; j < b1; j++) {
        if (s->placed[j]) continue;
        int64_t mo = s->minoff[j];
        if (!(mo < o || (mo == o && s->rank[j] < r))) continue;
        /* stranded: it must sit on a buffer not yet placed, which must reach into its slot */
        int64_t near = BIG, low = BIG;
        for (int32_t e = s->nbr_start[j]; e < s->nbr_start[j + 1]; e++) {
            int32_t k = s->nbr[e];
            if (s->placed[k]) continue;
            if (eff[k] < near) near = eff[k];
            if (eff[k] + s->size[k] < low) low = eff[k] + s->size[k];
        }
        if (near >= mo + s->size[j]) return 0;
        if (low + s->size[j] > s->C) return 0;
        s->strand[nst] = j;
        low_of[nst++] = low;
    }
    for (int32_t i = 0; i < nst; i++) eff[s->strand[i]] = low_of[i];
    for (int32_t t = s0; t < s1; t++)
        if (section_fails(s, t)) { s->hint = t; return 0; }
    return 1;
}

static uint64_t mix(uint64_t z) {  /* splitmix64's finaliser */
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* The table slot of a state (the unplaced buffers of [b0, b1) and their minoff),
   named by two independent 64-bit hashes; -1 when it is not there. */
static int64_t table_find(const Search *s, uint64_t k1, uint64_t k2, int64_t *free_slot) {
    *free_slot = -1;
    for (int64_t i = 0; i < 4; i++) {
        int64_t slot = (int64_t)((k1 + (uint64_t)i) & (uint64_t)s->table_mask);
        int64_t *e = s->table + 4 * slot;
        if ((uint64_t)e[0] == k1 && (uint64_t)e[1] == k2) return slot;
        if (e[0] == 0 && e[1] == 0 && *free_slot < 0) *free_slot = slot;
    }
    if (*free_slot < 0) *free_slot = (int64_t)(k1 & (uint64_t)s->table_mask);  /* evict */
    return -1;
}

static int dfs(Search *s, int32_t s0, int32_t s1, int32_t b0, int32_t b1, int64_t o, int64_t r);

static __thread Search *sort_ctx;

static int64_t order_key(const Search *s, int32_t j, int32_t code) {
    switch (code) {
        case 0: return s->tkey[j];
        case 1: return s->width[j];
        case 2: return s->width[j] * s->size[j];
        default: return s->size[j];
    }
}

static int by_order(const void *pa, const void *pb) {
    const Search *s = sort_ctx;
    int32_t a = *(const int32_t *)pa, b = *(const int32_t *)pb;
    for (int i = 0; i < 4 && s->heur[i] >= 0; i++) {
        int64_t ka = order_key(s, a, s->heur[i]), kb = order_key(s, b, s->heur[i]);
        if (ka != kb) return ka > kb ? -1 : 1;
    }
    return s->orig[a] < s->orig[b] ? -1 : s->orig[a] > s->orig[b];
}

static void state_key(const Search *s, int32_t b0, int32_t b1, uint64_t *k1, uint64_t *k2);

/* Solve the unplaced buffers of sections [s0, s1), split where no unplaced
   buffer crosses. With s->dynamic, each part is searched under its own order,
   its T (the largest total of a buffer's sections) counting unplaced buffers
   only, as MiniMalloc re-sorts each part it decomposes. */
static int solve_parts(Search *s, int32_t s0, int32_t s1) {
    int32_t a = s0;
    for (int32_t t = s0; t < s1; t++) {
        if (t + 1 < s1 && s->cuts[t] != 0) continue;
        int32_t b = t + 1, b0 = s->first_of[a], b1 = s->first_of[b], open = 0;
        for (int32_t j = b0; j < b1 && !open; j++) open = !s->placed[j];
        if (open) {
            int32_t *members = NULL, k = 0;
            int64_t *saved = NULL;
            uint64_t epoch = s->epoch;
            if (s->dynamic) {
                members = malloc((b1 - b0) * sizeof *members);
                saved = malloc((b1 - b0) * sizeof *saved);
                if (!members || !saved) { free(members); free(saved); return NOMEM; }
                for (int32_t j = b0; j < b1; j++) {
                    if (s->placed[j]) continue;
                    int64_t most = 0;
                    for (int32_t u = s->slo[j]; u < s->shi[j]; u++)
                        if (s->total[u] > most) most = s->total[u];
                    s->tkey[j] = most;
                    members[k] = j;
                    saved[k++] = s->rank[j];
                }
                sort_ctx = s;
                qsort(members, k, sizeof *members, by_order);
                for (int32_t i = 0; i < k; i++) s->rank[members[i]] = i;
                uint64_t k1, k2;
                state_key(s, b0, b1, &k1, &k2);
                s->epoch = k1 ^ (k2 >> 1);
            }
            int st = dfs(s, a, b, b0, b1, -1, -1);
            if (s->dynamic) {
                /* saved[] follows the unsorted order: walk it again */
                int32_t i = 0;
                for (int32_t j = b0; j < b1; j++)
                    if (!s->placed[j]) s->rank[j] = saved[i++];
                s->epoch = epoch;
                free(members); free(saved);
            }
            if (st != FOUND) return st;
        }
        a = b;
    }
    return FOUND;
}

/* Two independent 64-bit hashes of a state: the unplaced buffers of [b0, b1),
   their minoff, and the order in force (epoch). */
static void state_key(const Search *s, int32_t b0, int32_t b1, uint64_t *k1, uint64_t *k2) {
    uint64_t h1 = mix((((uint64_t)b0 << 32) | (uint32_t)b1) ^ s->epoch), h2 = mix(h1 ^ 0x5bd1e995ULL ^ (s->epoch << 1));
    for (int32_t j = b0; j < b1; j++) {
        if (s->placed[j]) continue;
        uint64_t v = ((uint64_t)j << 40) ^ (uint64_t)s->minoff[j];
        h1 += mix(v);
        h2 ^= mix(v ^ 0xc2b2ae3d27d4eb4fULL);
    }
    *k1 = h1 | 1;  /* never the empty slot */
    *k2 = h2;
}

static int dfs(Search *s, int32_t s0, int32_t s1, int32_t b0, int32_t b1, int64_t o, int64_t r) {
    if (++s->nodes > s->limit) return LIMIT;
    if ((s->nodes & 255) == 0) {
        if (now() > s->deadline) return TIMEOUT;
        if (*s->stop) return STOPPED;
    }
    int64_t min_height = INT64_MAX;
    int any = 0;
    for (int32_t j = b0; j < b1; j++) {
        if (s->placed[j]) continue;
        any = 1;
        if (s->minoff[j] + s->size[j] < min_height) min_height = s->minoff[j] + s->size[j];
    }
    if (!any) return FOUND;
    uint64_t k1, k2;
    state_key(s, b0, b1, &k1, &k2);
    int64_t slot = -1, free_slot = -1;
    if (s->table) {
        slot = table_find(s, k1, k2, &free_slot);
        if (slot >= 0) {
            const int64_t *e = s->table + 4 * slot;
            if (o > e[2] || (o == e[2] && r >= e[3])) return NOT_FOUND;  /* failed from here or earlier */
        }
    }
    if (!reserve_cand(s, b1 - b0)) return NOMEM;
    int64_t base = s->cand_top, k = 0;
    int32_t *cand = s->cand + base;
    for (int32_t j = b0; j < b1; j++) {
        if (s->placed[j]) continue;
        int64_t mo = s->minoff[j];
        if (mo >= min_height || mo < o || (mo == o && s->rank[j] <= r)) continue;
        /* insertion by (minoff, rank) */
        int64_t i = k++;
        while (i > 0) {
            int32_t p = cand[i - 1];
            if (s->minoff[p] < mo || (s->minoff[p] == mo && s->rank[p] < s->rank[j])) break;
            cand[i] = p;
            i--;
        }
        cand[i] = j;
    }
    s->cand_top = base + k;
    int64_t tmax = 0;
    for (int32_t t = s0; t < s1; t++)
        if (s->total[t] > tmax) tmax = s->total[t];
    int status = NOT_FOUND;
    for (int64_t i = 0; i < k; i++) {
        int32_t c = s->cand[base + i];
        int64_t x = s->minoff[c];
        if (x + tmax > s->C) break;  /* some section could no longer be filled from x up */
        int32_t twin = s->twin_prev[c];
        if (twin >= 0 && !s->placed[twin]) continue;
        int64_t h = x + s->size[c];
        if (s->align > 1) h = (h + s->align - 1) / s->align * s->align;
        int32_t e0 = s->nbr_start[c], e1 = s->nbr_start[c + 1];
        if (!reserve_undo(s, e1 - e0)) { status = NOMEM; break; }
        int64_t u0 = s->undo_top;
        int hat = 0, over = 0;
        int32_t d0 = s->slo[c], d1 = s->shi[c];
        for (int32_t e = e0; e < e1; e++) {
            int32_t j = s->nbr[e];
            if (s->placed[j]) continue;
            hat = 1;
            if (s->minoff[j] >= h) continue;
            if (h + s->size[j] > s->C) { over = 1; break; }
            if (s->slo[j] < d0) d0 = s->slo[j];
            if (s->shi[j] > d1) d1 = s->shi[j];
            s->undo[s->undo_top++] = j;
            s->undo[s->undo_top++] = s->minoff[j];
            s->minoff[j] = h;
        }
        int st = NOT_FOUND;
        if (!over) {
            int32_t lo = s->slo[c], hi = s->shi[c], cut = 0;
            s->placed[c] = 1;
            take(s, c);
            for (int32_t t = lo; t < hi; t++) s->total[t] -= s->size[c];
            for (int32_t t = lo; t < hi - 1; t++) cut |= (--s->cuts[t] == 0);
            s->solution[c] = x;
            if (feasible(s, s0, s1, b0, b1, x, s->rank[c], d0, d1))
                st = cut ? solve_parts(s, s0, s1) : dfs(s, s0, s1, b0, b1, x, s->rank[c]);
            for (int32_t t = lo; t < hi - 1; t++) s->cuts[t]++;
            for (int32_t t = lo; t < hi; t++) s->total[t] += s->size[c];
            put_back(s, c);
            s->placed[c] = 0;
        }
        while (s->undo_top > u0) {
            s->undo_top -= 2;
            s->minoff[s->undo[s->undo_top]] = s->undo[s->undo_top + 1];
        }
        if (st != NOT_FOUND) { status = st; break; }
        if (!over && !hat) break;  /* hatless: c stays where it is, stranded for every later sibling */
    }
    s->cand_top = base;
    if (status == NOT_FOUND && s->table) {
        int64_t *e = s->table + 4 * (slot >= 0 ? slot : free_slot);
        e[0] = (int64_t)k1; e[1] = (int64_t)k2; e[2] = o; e[3] = r;
    }
    return status;
}

int hetflow_memplan_search(int32_t n, int32_t S, int64_t C, int64_t align,
                           const int32_t *slo, const int32_t *shi, const int64_t *size,
                           const int32_t *first_of, const int32_t *twin_prev,
                           const int32_t *nbr_start, const int32_t *nbr,
                           const int32_t *sec_start, const int64_t *rank,
                           const int64_t *width, const int64_t *orig, const int32_t *heur, int32_t dynamic,
                           const int32_t *cuts0, const int64_t *total0,
                           int64_t *table, int64_t table_slots,
                           int64_t node_limit, double seconds, volatile int32_t *stop,
                           int64_t *solution, int64_t *nodes_out) {
    Search s;
    memset(&s, 0, sizeof s);
    s.n = n; s.S = S; s.C = C; s.align = align;
    s.slo = slo; s.shi = shi; s.size = size; s.first_of = first_of; s.twin_prev = twin_prev;
    s.nbr_start = nbr_start; s.nbr = nbr; s.sec_start = sec_start;
    s.hint = -1;
    s.width = width; s.orig = orig; s.dynamic = dynamic;
    for (int i = 0; i < 4; i++) s.heur[i] = heur[i];
    s.rank = malloc((size_t)n * sizeof(int64_t));
    s.tkey = calloc(n, sizeof(int64_t));
    if (s.rank) memcpy(s.rank, rank, (size_t)n * sizeof(int64_t));
    s.table = table_slots > 0 ? table : NULL; s.table_mask = table_slots - 1;
    s.limit = node_limit; s.deadline = now() + seconds; s.stop = stop;
    s.solution = solution;
    s.minoff = calloc(n, sizeof(int64_t));
    s.eff = calloc(n, sizeof(int64_t));
    s.low_of = calloc(n, sizeof(int64_t));
    s.strand = calloc(n, sizeof(int32_t));
    s.total = malloc(S * sizeof(int64_t));
    s.cuts = malloc((S > 1 ? S - 1 : 1) * sizeof(int32_t));
    s.placed = calloc(n, 1);
    int64_t pairs = sec_start[S];
    s.sec_list = malloc((pairs > 0 ? pairs : 1) * sizeof(int32_t));
    s.pos = malloc((pairs > 0 ? pairs : 1) * sizeof(int32_t));
    s.sec_count = malloc(S * sizeof(int32_t));
    s.pair_start = malloc(((size_t)n + 1) * sizeof(int32_t));
    int status = NOMEM;
    if (s.rank && s.tkey && s.minoff && s.eff && s.low_of && s.strand && s.sec_list && s.pos && s.sec_count && s.pair_start && s.total && s.cuts && s.placed && reserve_cand(&s, n) && reserve_undo(&s, n)) {
        memcpy(s.total, total0, S * sizeof(int64_t));
        if (S > 1) memcpy(s.cuts, cuts0, (S - 1) * sizeof(int32_t));
        for (int32_t j = 0; j < n; j++) solution[j] = -1;
        s.pair_start[0] = 0;
        for (int32_t j = 0; j < n; j++) s.pair_start[j + 1] = s.pair_start[j] + shi[j] - slo[j];
        for (int32_t t = 0; t < S; t++) s.sec_count[t] = 0;
        for (int32_t j = 0; j < n; j++)
            for (int32_t t = slo[j]; t < shi[j]; t++) {
                int32_t p = s.sec_count[t]++;
                s.sec_list[sec_start[t] + p] = j;
                s.pos[s.pair_start[j] + t - slo[j]] = p;
            }
        status = solve_parts(&s, 0, S);
    }
    *nodes_out = s.nodes;
    free(s.rank); free(s.tkey); free(s.minoff); free(s.eff); free(s.low_of); free(s.strand);
    free(s.sec_list); free(s.pos); free(s.sec_count); free(s.pair_start); free(s.total); free(s.cuts); free(s.placed);
    free(s.cand); free(s.undo);
    return status;
}
"""
_C_FOUND, _C_NOT_FOUND, _C_LIMIT, _C_TIMEOUT, _C_STOPPED = range(5)
_TABLE_SLOTS = 1 << 18  # failed states kept per order (8 MiB); a full table evicts
_NATIVE_MAX_BUFFERS = 20000  # recursion depth grows with the buffers: stay far from a thread's C stack


@functools.lru_cache(maxsize=1)
def _native_kernel():
    """The compiled search, or None when no C compiler (or no writable cache) is available."""
    from hetflow.support.native import compiled_function
    function = compiled_function("memplan", _KERNEL_C, "hetflow_memplan_search")  # releases the interpreter lock
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
        adj = inst.adj
        self.nbr_start = np.zeros(inst.n + 1, dtype=i32)
        np.cumsum(adj.sum(axis=1), out=self.nbr_start[1:])
        self.nbr = np.ascontiguousarray(np.nonzero(adj)[1], dtype=i32)
        self.sec_start = np.zeros(inst.S + 1, dtype=i32)
        np.cumsum(inst.member.sum(axis=1), out=self.sec_start[1:])
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
    search nor CP-SAT answers within it (``wall``: whether the wall clock stopped it).
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
