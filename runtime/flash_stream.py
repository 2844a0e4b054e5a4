"""Feed-forward weights streamed from flash: the flash image, activation prediction and the window cache
(LLM in a flash, arXiv 2312.11514), run with NumPy on the host.

The flash image
---------------
One file holding the streamed FFN layers one after another; ``FlashImage`` (its manifest, JSON) says
where each layer is and how it is laid out. A layer of ``neurons`` neurons over ``hidden`` inputs, its
weights ``up`` [hidden, neurons] (and ``gate`` for a gated FFN) and ``down`` [neurons, hidden]:

* bundled (row-column bundling): neuron i's bundle is up[:, i], gate[:, i], down[i, :] side by side, so
  one read fetches all of a neuron. Bundles of ``chunk_neurons`` consecutive neurons make a chunk.
* unbundled: three regions, up^T, gate^T, down, each [neurons, hidden] in chunks of ``chunk_neurons``
  rows: a neuron costs one read per region.

Every chunk starts at a multiple of ``ALIGN`` (4 KiB) and is padded to it, so each read is a direct
(O_DIRECT) read of whole chunks; ``chunk_neurons`` is chosen so a chunk is at least the size the flash
reads fast (``hetflow.passes.flash_plan.best_chunk``, from the platform's throughput-by-chunk curve).

Running a layer (``StreamedFfn``)
---------------------------------
* ``dense``: every chunk of the layer read for each call (what streaming a layer without prediction
  does; exact);
* ``predict``: a low-rank predictor of the up projection (``Predictor``: a truncated SVD of it as the
  calibration inputs see it, rank chosen from the budget) picks the neurons whose ReLU input is predicted above ``-margin``; only their chunks are
  read, and the FFN is computed over them (approximate: a neuron missed by the predictor is left out);
* ``window``: with prediction, the neurons active over the last ``window`` tokens stay in DRAM in a
  preallocated matrix (one row per neuron, ``slots``) with swap-delete: a neuron leaving the window is
  overwritten by the last row; each token reads only the neurons not already held.

Counters (``bytes_read``, ``io_seconds``, ``compute_seconds``) say what each call cost; everything is
measured on this machine.
"""
from __future__ import annotations

import mmap
import threading
import time

import numpy as np

from hetflow.ir.flash_image import (  # noqa: F401  (the image format and the predictor, re-exported)
    ALIGN, FORMAT, VERSION, FlashError, FlashImage, LayerLayout, Predictor, aligned_chunk_neurons, build_predictor,
    image_weights, layout, write_image,
)

from .flash_io import ALIGNMENT, aligned_empty

assert ALIGN == ALIGNMENT, "the image format and the reader agree on the direct-I/O unit"

# --- running a streamed layer -----------------------------------------------------------------------------

REBALANCE_EVERY = 8     # single-token calls between two rebalances of a model's window caches (sooner when a
                        # layer fires past its cache, at most every other token)
RESERVE_GROWTHS = 2     # kept out of the caches' room when the largest grows by g: RESERVE_GROWTHS x g


class _CacheRoom:
    """A window cache's [rows, parts, hidden] float32 matrix in a private anonymous mapping of its own (untouched
    pages take no memory), resized in place.

    * Its own mapping: freed, it goes back to the system at once. From the heap, a cache freed when the caches
      were rebalanced stayed in this process (malloc raises its mapping threshold after a large free), and the
      run passed its budget by the caches' size.
    * Resized in place (``mremap``): every row keeps its byte offset, so growing keeps the held rows where they
      are and shrinking drops the rows past the new end (the held ones are first: swap-delete keeps them
      packed). A copy into a new matrix held the cache twice for a moment; the budget had to keep room for it.
    """

    def __init__(self, rows: int, parts: int, hidden: int):
        self.parts, self.hidden = parts, hidden
        self._map = mmap.mmap(-1, self._bytes(rows), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.matrix = self._view(rows)
        self.copies = 0      # resizes that had to copy (a view of the matrix was alive)

    def _bytes(self, rows: int) -> int:
        return max(rows * self.parts * self.hidden * 4, 1)

    def _view(self, rows: int) -> np.ndarray:
        return np.frombuffer(self._map, np.float32, rows * self.parts * self.hidden).reshape(rows, self.parts,
                                                                                         self.hidden)

    def resize(self, rows: int) -> np.ndarray:
        """The matrix with room for ``rows`` (rows below both sizes unchanged); drop every other view first."""
        self.matrix = None
        try:
            self._map.resize(self._bytes(rows))
        except BufferError:    # a view of the old matrix is still alive somewhere: copy into a new mapping
            old = self._view(len(self._map) // (self.parts * self.hidden * 4))
            self._map = mmap.mmap(-1, self._bytes(rows), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            keep = min(rows, len(old))
            self._view(rows)[:keep] = old[:keep]
            self.copies += 1
        self.matrix = self._view(rows)
        return self.matrix


class ReadBuffers:
    """The read buffers a model's dense streamed layers share: ``count`` aligned buffers (two: the layer computing
    and the next one being read), taken for a layer's read and given back when the layer has computed.

    A fresh buffer per read cost the page faults of every byte read: 24 layers of 32 MiB a token took 375 ms
    to allocate and touch against 10 ms to reuse (measured here). A take finding no free buffer (layers run
    out of order) gets a fresh one, counted in ``fresh``; the ``count`` owned buffers are what the plan counts
    (``read buffers`` in the flash plan)."""

    def __init__(self, count: int = 2):
        self.count = count
        self._owned: list[np.ndarray] = []
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()
        self.fresh = 0

    def take(self, nbytes: int) -> np.ndarray:
        """A buffer of at least ``nbytes`` (aligned); give it back with ``give``."""
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) >= nbytes:
                    return self._free.pop(i)
            if self._free:                        # a free one too small: replaced by one large enough
                small = self._free.pop()
                self._owned = [b for b in self._owned if b is not small]
            if len(self._owned) < self.count:
                buf = aligned_empty(nbytes)
                self._owned.append(buf)
                return buf
            self.fresh += 1
        return aligned_empty(nbytes)

    def give(self, buf: np.ndarray) -> None:
        with self._lock:
            if any(buf is b for b in self._owned) and not any(buf is b for b in self._free):
                self._free.append(buf)


class StreamedFfn:
    """One FFN layer whose weights stay in the flash image: ``y = act(x @ up + b_up) @ down + b_down``, with
    only what ``mode`` needs read (see the module doc). ``pool``: a ``hetflow.runtime.flash_io.ReaderPool``
    on the image; ``activation``: "relu" (or "silu" for a gated FFN: ``silu(x @ gate) * (x @ up)``)."""

    def __init__(self, lay: LayerLayout, pool, b_up: np.ndarray, b_down: np.ndarray, mode: str = "dense",
                 predictor: Predictor | None = None, window: int = 0, capacity: int | None = None,
                 activation: str = "relu", retain: bool = True):
        if mode not in ("dense", "predict", "window"):
            raise FlashError(f"layer {lay.name}: unknown mode {mode!r}")
        if mode != "dense" and predictor is None:
            raise FlashError(f"layer {lay.name}: mode {mode!r} needs a predictor")
        self.lay, self.pool, self.mode, self.predictor = lay, pool, mode, predictor
        self.b_up, self.b_down = b_up.astype(np.float32), b_down.astype(np.float32)
        self.activation = activation
        self.window = max(window, 1)
        self.capacity = lay.neurons if capacity is None else min(capacity, lay.neurons)
        self.planned_capacity = self.capacity    # what the plan counted (rebalancing moves room, within the sum)
        self.rebalanced_at = 0                   # the step of the last rebalance
        self.next: StreamedFfn | None = None   # the streamed layer after this one (dense mode prefetches it)
        self._prefetch = None                    # (future, buffer, began) of this layer's whole image, being read
        self.buffers: ReadBuffers | None = None  # dense mode: read buffers shared with the model's other layers
        self._read_buffer = None                 # the one taken from them for this layer's read
        # the window cache: one row per held neuron (bundle: parts x hidden), its neuron id, when last active
        self._room = _CacheRoom(self.capacity, lay.parts, lay.hidden)
        self.slots = self._room.matrix
        self.slot_neuron = np.full(self.capacity, -1, np.int64)
        self.slot_of = np.full(lay.neurons, -1, np.int64)       # neuron -> its slot, -1 when not held
        self.last_used = np.full(lay.neurons, -1, np.int64)     # neuron -> the last step it was active
        self.retain = retain    # neurons past the window stay while the cache has room (LRU), else swap-deleted
        self.peers: list[StreamedFfn] | None = None   # the model's streamed layers, whose caches share their room
        self.recent: list[np.ndarray] = []            # the neurons of the last few single-token calls
        self.held = 0
        self.step = 0
        self.bytes_read = 0
        self.io_seconds = 0.0
        self.compute_seconds = 0.0
        self.last_active: np.ndarray | None = None
        self.neurons_predicted = 0       # summed over calls: the neurons the predictor picked
        self.neurons_loaded = 0          # summed over calls: the neurons read from flash
        self.io_log: list | None = None  # when a list: (perf_counter start, end, what) of each read, for traces
        self.speculate_ahead = False     # window/predict: read the next layer's likely neurons while this computes
        self._speculated = None          # (future, buffers, chunks) of a speculative read for this layer
        self.speculated_chunks = 0       # summed over calls: chunks read speculatively...
        self.speculated_used = 0         # ...and those a call then used

    # the reads
    def _requests(self, chunks: np.ndarray) -> tuple[list, list]:
        """The reads for ``chunks`` (sorted, unique): one aligned buffer per region (bundled: one), the chunks in
        it in order, and one request per run of consecutive chunks (per region); returns (buffers, requests)."""
        lay, k = self.lay, len(chunks)
        buffers = [aligned_empty(k * lay.chunk_bytes) for _ in range(1 if lay.bundled else lay.parts)]
        breaks = np.flatnonzero(np.diff(chunks) != 1) + 1
        requests = []
        for first, end in zip([0, *breaks.tolist()], [*breaks.tolist(), k]):
            for buf, offset in zip(buffers, lay.chunk_offsets(int(chunks[first]))):
                requests.append((offset, buf[first * lay.chunk_bytes:end * lay.chunk_bytes]))
        return buffers, requests

    def _rows(self, buffers: list, k: int) -> np.ndarray:
        """[k * chunk_neurons, parts, hidden] float32 from the buffers of ``k`` chunks (a view of them when
        bundled, f32 and unpadded); a last chunk's rows past the layer's neurons are padding, never used."""
        lay = self.lay
        dtype = np.dtype(lay.dtype)
        width = (lay.parts if lay.bundled else 1) * lay.hidden
        used = lay.chunk_neurons * width * dtype.itemsize
        blocks = [b.reshape(k, lay.chunk_bytes)[:, :used].view(dtype).reshape(k * lay.chunk_neurons, width)
                  for b in buffers]
        rows = (blocks[0].reshape(-1, lay.parts, lay.hidden) if lay.bundled else np.stack(blocks, axis=1))
        return rows.astype(np.float32, copy=False)

    def _fetch(self, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, chunk ids) for ``chunks`` (sorted, unique): rows[i * chunk_neurons + j] is neuron j of chunk
        ids[i]. Chunks a speculative read of the layer before fetched are taken from it (waiting for it if it
        is still in flight); the others are read, in as few requests as runs of consecutive chunks allow."""
        per = self.lay.chunk_neurons
        got_rows, got_ids = [], []
        if self._speculated is not None and len(chunks):
            future, buffers, held = self._speculated
            self._speculated = None
            hit = np.isin(held, chunks)
            if hit.any():
                began = time.perf_counter()
                future.result()
                ended = time.perf_counter()
                self.io_seconds += ended - began
                if ended - began > 1e-5:
                    self._log(began, ended, f"waiting for {self.lay.name}'s speculative read")
                rows = self._rows(buffers, len(held)).reshape(len(held), per, self.lay.parts, self.lay.hidden)
                got_rows.append(rows[hit].reshape(-1, self.lay.parts, self.lay.hidden))
                got_ids.append(held[hit])
                self.speculated_used += int(hit.sum())
                chunks = chunks[~np.isin(chunks, held)]
        if len(chunks):
            buffers, requests = self._requests(chunks)
            began = time.perf_counter()
            self.pool.read_into(requests)
            ended = time.perf_counter()
            self.io_seconds += ended - began
            nbytes = sum(len(b) for b in buffers)
            self._log(began, ended, f"read {nbytes >> 10} KiB ({len(requests)} requests)")
            self.bytes_read += nbytes
            got_rows.append(self._rows(buffers, len(chunks)))
            got_ids.append(chunks)
        if len(got_ids) == 1:
            return got_rows[0], got_ids[0]
        return np.concatenate(got_rows), np.concatenate(got_ids)

    def speculate(self, x: np.ndarray, limit: int) -> None:
        """Start reading, in the background, the chunks of the neurons this layer's predictor picks for ``x``
        (an earlier layer's FFN input, standing in for this layer's: the residual stream changes little from
        layer to layer) that the window cache does not hold, at most ``limit`` neurons; the call for this
        layer takes what it needs from them and reads only the rest. Never changes what is computed."""
        if self.predictor is None or self.mode == "dense" or self._speculated is not None:
            return
        ids = self.predictor.active(x)
        missing = ids[self.slot_of[ids] < 0][:max(0, limit)]
        if not len(missing):
            return
        chunks = np.unique(missing // self.lay.chunk_neurons)
        buffers, requests = self._requests(chunks)
        began = time.perf_counter()
        future = self.pool.submit(requests)
        self.bytes_read += sum(len(b) for b in buffers)
        self.speculated_chunks += len(chunks)
        if self.io_log is not None:
            future.add_done_callback(lambda f, began=began: self._log(
                began, time.perf_counter(), f"speculative read {self.lay.name} ({len(chunks)} chunks)"))
        self._speculated = (future, buffers, chunks)

    def _split_one(self, buf: np.ndarray, first: int, n: int, r: int) -> dict[int, np.ndarray]:
        """The chunks ``first .. first + n - 1`` of region ``r`` (0 when bundled) from a buffer read for them."""
        lay, dtype = self.lay, np.dtype(self.lay.dtype)
        out = {}
        for i in range(n):
            chunk = first + i
            raw = buf[i * lay.chunk_bytes:(i + 1) * lay.chunk_bytes]
            count = min(lay.chunk_neurons, lay.neurons - chunk * lay.chunk_neurons)
            if lay.bundled:
                out[chunk] = np.frombuffer(raw, dtype, count * lay.parts * lay.hidden).reshape(
                    count, lay.parts, lay.hidden).astype(np.float32, copy=False)   # f32: a view of the read buffer
            else:
                block = np.zeros((count, lay.parts, lay.hidden), np.float32)
                block[:, r] = np.frombuffer(raw, dtype, count * lay.hidden).reshape(count, lay.hidden)
                out[chunk] = block
        return out

    def _load(self, neurons: np.ndarray) -> np.ndarray:
        """[len(neurons), parts, hidden] for these neurons (sorted, unique), read from flash (whole chunks)."""
        per = self.lay.chunk_neurons
        self.neurons_loaded += len(neurons)
        if not len(neurons):
            return np.zeros((0, self.lay.parts, self.lay.hidden), np.float32)
        rows, ids = self._fetch(np.unique(neurons // per))
        order = np.argsort(ids, kind="stable")
        position = order[np.searchsorted(ids[order], neurons // per)]
        return rows[position * per + neurons % per]

    def _apply(self, x: np.ndarray, rows, ids: np.ndarray, whole: bool = False, bias: bool = True) -> np.ndarray:
        """The FFN over the neurons ``ids`` whose bundles are ``rows``: [n, parts, hidden], or a list of the
        parts, each [n, hidden] (a whole layer, as read: no copy); ``bias=False``: without the down projection's
        bias (a partial sum over some of the neurons)."""
        parts = rows if isinstance(rows, list) else [rows[:, p] for p in range(rows.shape[1])]
        x32 = x.astype(np.float32)
        pre = x32 @ parts[0].T + (self.b_up if whole else self.b_up[ids])
        if self.lay.gated:
            gate = x32 @ parts[1].T
            hidden = gate / (1 + np.exp(-gate)) * pre
        else:
            hidden = np.maximum(pre, 0)
        out = hidden @ parts[-1]
        return out + self.b_down if bias else out

    # the whole layer (dense mode), read in one go and prefetched while the layer before computes
    def _layer_requests(self) -> tuple[np.ndarray, list]:
        lay = self.lay
        if self.buffers is not None:
            self._read_buffer = self.buffers.take(lay.bytes)     # given back once this layer has computed
            buf = self._read_buffer[:lay.bytes]
        else:
            buf = aligned_empty(lay.bytes)
        if lay.bundled:
            return buf, [(lay.offset, buf)]
        region = lay.chunks * lay.chunk_bytes
        return buf, [(lay.offset + r * region, buf[r * region:(r + 1) * region]) for r in range(lay.parts)]

    def prefetch(self) -> None:
        """Start reading this layer's whole image in the background (dense mode)."""
        if self._prefetch is None:
            buf, requests = self._layer_requests()
            began = time.perf_counter()
            future = self.pool.submit(requests)
            if self.io_log is not None:
                future.add_done_callback(lambda f, began=began: self._log(
                    began, time.perf_counter(), f"prefetch {self.lay.name} ({self.lay.bytes >> 10} KiB)"))
            self._prefetch = (future, buf, began)

    def _log(self, began: float, ended: float, what: str) -> None:
        if self.io_log is not None:
            self.io_log.append((began, ended, what))
            del self.io_log[:-4096]   # the recent reads only

    def _whole_layer(self):
        """The layer's parts, each [neurons, hidden] float32: views of the read buffer when the chunks carry no
        padding (bundled: strided rows; unbundled: each region as it lies), else [neurons, parts, hidden]."""
        lay = self.lay
        if self._prefetch is None:
            self.prefetch()
        future, buf, _ = self._prefetch
        self._prefetch = None
        waited = time.perf_counter()
        future.result()
        done = time.perf_counter()
        self.io_seconds += done - waited   # the read time not hidden behind compute
        if done - waited > 1e-5:
            self._log(waited, done, f"waiting for {self.lay.name}'s read")
        self.bytes_read += lay.bytes
        dtype = np.dtype(lay.dtype)
        per = lay.chunk_neurons * lay.hidden * dtype.itemsize * (lay.parts if lay.bundled else 1)
        if per == lay.chunk_bytes:   # no padding: the buffer is the weights, in order
            if lay.bundled:
                rows = buf.view(dtype)[:lay.neurons * lay.parts * lay.hidden].reshape(lay.neurons, lay.parts, lay.hidden)
                parts = [rows[:, p] for p in range(lay.parts)]
            else:
                region = lay.chunks * lay.chunk_bytes
                parts = [buf[r * region:(r + 1) * region].view(dtype)[:lay.neurons * lay.hidden].reshape(
                    lay.neurons, lay.hidden) for r in range(lay.parts)]
            return [p.astype(np.float32, copy=False) for p in parts]
        if lay.bundled:   # padded chunks: taken apart one by one
            got = self._split_one(buf, 0, lay.chunks, 0)
        else:
            region = lay.chunks * lay.chunk_bytes
            got = self._split_one(buf[:region], 0, lay.chunks, 0)
            for r in range(1, lay.parts):
                for chunk, block in self._split_one(buf[r * region:(r + 1) * region], 0, lay.chunks, r).items():
                    got[chunk][:, r] = block[:, r]
        return np.concatenate([got[c] for c in range(lay.chunks)])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.step += 1
        if self.mode == "dense":
            rows = self._whole_layer()
            if self.next is not None and self.next.mode == "dense":
                self.next.prefetch()    # the next streamed layer loads while this one computes
            ids = np.arange(self.lay.neurons)
            began = time.perf_counter()
            y = self._apply(x, rows, ids, whole=True)
            self.compute_seconds += time.perf_counter() - began
            del rows                                  # (views of the read buffer)
            if self._read_buffer is not None:
                self.buffers.give(self._read_buffer)
                self._read_buffer = None
            self.last_active = ids
            return y.astype(x.dtype)
        began = time.perf_counter()
        ids = self.predictor.active(x)
        self.compute_seconds += time.perf_counter() - began
        self.last_active = ids
        self.neurons_predicted += len(ids)
        if len(x) == 1 and self.mode == "window":
            self.recent = [*self.recent[-(REBALANCE_EVERY - 1):], ids]
            if self.retain and self.peers and self.step > self.window:
                due = self.step % REBALANCE_EVERY == 0 and self is next(l for l in self.peers if l.mode == "window")
                overflow = len(ids) > self.capacity and self.step - self.rebalanced_at >= 2   # room misplaced
                if due or overflow:
                    rebalance_caches(self.peers)
        if self.speculate_ahead and self.next is not None and self.next is not self and len(x) == 1:
            self.next.speculate(x, max(1, self.next.capacity // (2 * self.next.lay.chunk_neurons)))
        if self.mode == "predict":
            rows = self._load(ids)
        elif len(x) == 1 and len(ids) > self.capacity:   # more than the cache holds: what it has, the rest read
            began = time.perf_counter()
            y = self._partly_cached(x, ids)
            self.compute_seconds += time.perf_counter() - began
            return y.astype(x.dtype)
        elif len(x) > 1:   # a prompt: its rows' neurons read once; the last ``window`` rows' kept as the window
            rows = self._load(ids)
            recent = self.predictor.active(x[-self.window:])   # a subset of ids (both sorted)
            if len(recent) <= self.capacity:
                self._keep(recent, rows[np.searchsorted(ids, recent)], recent)
        else:
            rows = self._through_window(ids)
        began = time.perf_counter()
        y = self._apply(x, rows, ids)
        self.compute_seconds += time.perf_counter() - began
        return y.astype(x.dtype)

    def _partly_cached(self, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The FFN over more neurons than the cache holds: those it holds from it, the others read and applied in
        batches of at most half its room (so the read buffers stay within what the plan counts); with ``retain``,
        those read fill the room that neurons this token does not use held, else none is kept.
        (Its ``compute_seconds`` include the reads' wait, also counted in ``io_seconds``.)"""
        slot = self.slot_of[ids]
        held = slot >= 0
        x32 = x.astype(np.float32)
        y = np.zeros((len(x), self.lay.hidden), np.float32)
        if held.any():
            cached = ids[held]
            self.last_used[cached] = self.step
            y += self._apply(x32, self.slots[slot[held]], cached, bias=False)
        missing = ids[~held]
        batch = max(16, self.capacity // 2)
        for start in range(0, len(missing), batch):
            part = missing[start:start + batch]
            rows = self._load(part)
            y += self._apply(x32, rows, part, bias=False)
            if self.retain:   # as many as fit stay, in place of neurons this token does not use (the next
                # token's neurons overlap this one's most: a layer firing past its room reads only the rest)
                free = self.capacity - self.held + int((~np.isin(self.slot_neuron[:self.held], ids)).sum())
                if free > 0:
                    self._keep(part[:free], rows[:free], ids)
        return y + self.b_down

    @property
    def neuron_slot(self) -> dict[int, int]:
        """{neuron: slot} of the neurons the window cache holds."""
        held = self.slot_neuron[:self.held]
        return dict(zip(held.tolist(), self.slot_of[held].tolist()))

    def _keep(self, neurons: np.ndarray, rows: np.ndarray, keep: np.ndarray) -> None:
        """Put ``neurons`` (sorted, unique; their rows ``rows``) into the window cache, making room without
        evicting ``keep`` (sorted neuron ids); every one of ``keep`` counts as used now."""
        new = self.slot_of[neurons] < 0
        self._evict(need=int(new.sum()), keep=keep)
        added = neurons[new]
        slots = np.arange(self.held, self.held + len(added))
        self.slots[slots] = rows[new]
        self.slot_neuron[slots] = added
        self.slot_of[added] = slots
        self.held += len(added)
        self.last_used[keep] = self.step

    def _through_window(self, ids: np.ndarray) -> np.ndarray:
        """Rows for ``ids`` from the window cache, reading only the neurons it does not hold; then neurons idle
        for ``window`` tokens leave it (swap-delete), unless ``retain`` keeps them while there is room."""
        missing = ids[self.slot_of[ids] < 0]
        self._keep(missing, self._load(missing), ids)
        rows = self.slots[self.slot_of[ids]]
        self._evict(need=0, keep=ids)
        return rows

    def _evict(self, need: int, keep: np.ndarray) -> None:
        """Make room for ``need`` more neurons, never evicting one of ``keep``: the least recently used go first.
        Without ``retain``, every neuron not used in the last ``window`` steps goes too (LLM in a flash's
        window); with it, those stay until their room is needed."""
        held = self.slot_neuron[:self.held]
        candidates = held[~np.isin(held, keep)]
        age = self.step - self.last_used[candidates]
        order = np.argsort(-age, kind="stable")              # the least recently used first
        candidates, age = candidates[order], age[order]
        count = max(0, self.held + need - self.capacity)
        if not self.retain:
            count = max(count, int((age >= self.window).sum()))
        if count > len(candidates):
            raise FlashError(f"layer {self.lay.name}: {need} neurons to load and the window cache holds "
                             f"{self.capacity}: raise the budget or lower the window")
        for n in candidates[:count].tolist():           # swap-delete: the last row moves into the freed slot
            slot = int(self.slot_of[n])
            last = self.held - 1
            if slot != last:
                moved = int(self.slot_neuron[last])
                self.slots[slot] = self.slots[last]
                self.slot_neuron[slot] = moved
                self.slot_of[moved] = slot
            self.slot_of[n] = -1
            self.slot_neuron[last] = -1
            self.held -= 1

    def resize(self, capacity: int) -> None:
        """Give the window cache room for ``capacity`` neurons: shrinking evicts the least recently used first;
        the held rows stay where they are (the matrix is resized in place: ``_CacheRoom``)."""
        capacity = max(1, min(int(capacity), self.lay.neurons))
        if capacity == self.capacity:
            return
        if self.held > capacity:
            self.capacity = capacity            # (what _evict makes room within)
            self._evict(need=0, keep=np.zeros(0, np.int64))
        self.slots = None                       # (the only view of the cache: it resizes in place)
        self.slots = self._room.resize(capacity)
        slot_neuron = np.full(capacity, -1, np.int64)
        slot_neuron[:self.held] = self.slot_neuron[:self.held]
        self.slot_neuron, self.capacity = slot_neuron, capacity


def rebalance_caches(layers: list[StreamedFfn]) -> None:
    """Move window-cache room between a model's streamed layers within the total the plan counted: each layer
    is first given room for the most neurons one of its last calls used, then for the neurons its last calls
    used (their union) as far as the room goes, and what is left over is shared in proportion. The plan
    sized the caches from calibration inputs; a prompt can fire a layer several times as often (measured:
    900 neurons a token where calibration saw 283), and a layer whose cache cannot hold a token's neurons
    reads most of them every token. Never changes what is computed; only what is read. Layers streamed whole
    (``dense``) have no cache and take no part.

    The total is the plan's (each layer's ``planned_capacity``), not the caches' current sum: a reserve
    taken from the current sum at every rebalance compounded (measured: 7,527 neurons of room became 6,249
    in two rebalances, and quiet layers, shrunk below what they fired, read past their caches)."""
    layers = [layer for layer in layers if layer.mode == "window"]
    if not layers:
        return
    for layer in layers:
        layer.rebalanced_at = layer.step
    total = sum(layer.planned_capacity for layer in layers)
    planned_largest = max(layer.planned_capacity for layer in layers)
    # must: room for the most neurons one recent call used (below it, a call reads past the cache, in
    # batches); want: room for every neuron the recent calls used (the union: what retention can reuse)
    must = np.maximum(np.array([max(len(ids) for ids in layer.recent) if layer.recent else layer.held
                                for layer in layers], np.float64), 1.0)
    want = np.maximum(np.array([len(np.unique(np.concatenate(layer.recent))) if layer.recent else layer.held
                                for layer in layers], np.float64), must)

    def shares(room: int) -> np.ndarray:
        if must.sum() >= room:            # not even the musts fit: in proportion to them
            share = room * must / must.sum()
        elif want.sum() >= room:          # every must, then the rest in proportion to what each wants beyond it
            extra = want - must
            share = must + (room - must.sum()) * extra / max(extra.sum(), 1.0)
        else:                             # every want, then the rest in proportion to it
            share = want + (room - want.sum()) * want / want.sum()
        targets = np.maximum(np.floor(share).astype(np.int64), 1)
        targets[int(np.argmax(want))] += room - int(targets.sum())     # what the rounding left, to the neediest
        return targets
    # a call gathers its layer's rows (a temporary up to its cache's size, and its hidden activations): a
    # largest cache larger by g than the plan's largest costs up to RESERVE_GROWTHS x g more, so the room is
    # the largest r whose shares leave that reserve within the total (larger r, larger g: a bisection)
    def fits(room: int) -> bool:
        return room + RESERVE_GROWTHS * max(0, int(shares(room).max()) - planned_largest) <= total
    low, high = len(layers), total
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    targets = shares(low)
    targets = targets.tolist()

    def worth(layer, target) -> bool:        # not for a few rows
        return abs(target - layer.capacity) > max(8, layer.capacity // 20)
    for layer, target in zip(layers, targets):   # shrink first, then grow within the room freed: the total
        if target < layer.capacity and worth(layer, target):   # never passes what the plan counted
            layer.resize(target)
    room = sum(targets) - sum(layer.capacity for layer in layers)
    for layer, target in zip(layers, targets):
        target = min(target, layer.capacity + room)
        if target > layer.capacity and worth(layer, target):
            room -= target - layer.capacity
            layer.resize(target)
