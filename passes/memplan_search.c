/* hetflow memplan: the canonical search of memplan_search.py in C (same rules).
 *
 * Compiled with the system's C compiler on first use and cached, keyed by this file's
 * hash (hetflow.support.native, as runtime/flagwait.c is); without a compiler the
 * Python search (_Search in memplan_search.py) runs instead.
 * It keeps the rules of _Search and the order of candidates, so it visits the same
 * tree. Its table of failed states has a fixed size (a full slot is overwritten,
 * which only loses pruning) and names a state by two independent 64-bit hashes
 * instead of the state itself (a wrong prune would need both to collide). It stops
 * early on one rule that _Search gets from its stranded-buffer check: when a buffer
 * with no unplaced neighbour (nothing can ever be stacked on it, MiniMalloc's
 * "hatless" case) fails, its later siblings fail too, as it would stay stranded
 * below them. Section checks keep each section's unplaced buffers in a list and try
 * first the section that failed last and those of the buffers just raised.
 */
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
