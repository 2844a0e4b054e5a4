"""Reading weights from flash: a pool of reader threads over one file, and the memory helpers a streaming run needs.

``ReaderPool`` opens the file once, with ``O_DIRECT`` when the file system accepts it (checked by a real
aligned read at open), so reads go to the disk and never fill the page cache; otherwise with a normal
descriptor, dropping each range from the page cache after reading it (``posix_fadvise(DONTNEED)``), so a
model larger than DRAM does not push the rest of the machine out of memory and a measured read is a disk read.

``read_into(requests)`` reads a list of ``(offset, dest)`` in parallel and blocks; ``submit(requests)`` does the
same in the background and returns a Future, so the next layer's bundles load while the current layer computes.
Two engines read: under O_DIRECT on Linux, native AIO (``hetflow.runtime.linux_aio``): the whole list handed
to the kernel in one system call, ``threads`` reads in flight, one reaper thread collecting completions, no
Python run per read; otherwise (or ``engine="threads"``) ``threads`` reader threads each calling ``os.preadv``
(which releases the GIL). Under ``O_DIRECT`` every offset, length and
destination address must be a multiple of ``alignment`` (4 KiB): ``aligned_empty`` makes such buffers, and a
caller lays its chunks out aligned.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import numpy as np

from . import linux_aio
from .errors import RuntimeFailure

__all__ = ["ALIGNMENT", "FlashReadError", "ReaderPool", "aligned_empty", "current_rss_bytes", "drop_page_cache",
           "peak_rss_bytes"]

ALIGNMENT = 4096                 # O_DIRECT's unit on Linux file systems (the logical block size or the page)
MAX_PIECE = 1 << 20              # a request larger than this is read as 1 MiB pieces spread over the threads
HAS_FADVISE = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED")


class FlashReadError(RuntimeFailure):
    """A read from the weights file failed or came back short; the message names the file, offset and length."""


def aligned_empty(nbytes: int, alignment: int = ALIGNMENT) -> np.ndarray:
    """An uninitialised uint8 array whose data address is a multiple of ``alignment`` and whose length is
    ``nbytes`` rounded up to it (what O_DIRECT needs of a destination)."""
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"aligned_empty: alignment must be a power of two, got {alignment}")
    if nbytes < 0:
        raise ValueError(f"aligned_empty: nbytes must be >= 0, got {nbytes}")
    length = -(-nbytes // alignment) * alignment
    raw = np.empty(length + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + length]


def drop_page_cache(path) -> bool:
    """Write back and drop ``path``'s pages from the page cache, so the next buffered read goes to the disk.
    Returns whether it could (False without ``posix_fadvise``, e.g. on macOS, or on an error)."""
    if not HAS_FADVISE:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        os.fsync(fd)                                   # dirty pages are not dropped: write them first
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes: ``VmHWM`` of ``/proc/self/status`` where there is one (this
    program's own: ``ru_maxrss`` keeps the peak of the process that started it, across exec), else ``ru_maxrss``
    (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """This process's resident set size now, in bytes (``/proc/self/statm``; the peak where there is no /proc)."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _as_bytes_view(dest, where) -> memoryview:
    view = memoryview(dest)
    if view.readonly:
        raise ValueError(f"{where()}: the destination is read-only")
    if not view.c_contiguous:
        raise ValueError(f"{where()}: the destination is not contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _address(view: memoryview) -> int:
    return np.frombuffer(view, np.uint8).ctypes.data if len(view) else 0


class ReaderPool:
    """``threads`` reader threads over one file: ``read_into`` / ``submit`` a list of ``(offset, dest)``.

    ``.direct`` is True when the file is read with O_DIRECT; ``.mode`` says how it is read, for reports:
    ``"O_DIRECT"``, ``"fadvise-bypass"`` (buffered reads, each range dropped from the page cache after) or
    ``"buffered"`` (neither is available). ``engine``: ``"auto"`` (native AIO when the file is read with
    O_DIRECT and the kernel allows it, else threads), ``"aio"`` or ``"threads"``; ``.engine`` says which runs.
    ``threads``: the reads in flight at most (reader threads, or the AIO queue's depth). Counters:
    ``bytes_read``, ``requests``, ``read_seconds`` (wall time with at least one read in flight);
    ``reset_counters()``. Thread-safe; a context manager.
    """

    def __init__(self, path, threads: int = 8, direct: bool = True, alignment: int = ALIGNMENT,
                 engine: str = "auto"):
        if threads < 1:
            raise ValueError(f"ReaderPool: threads must be >= 1, got {threads}")
        if engine not in ("auto", "aio", "threads"):
            raise ValueError(f"ReaderPool: engine must be 'auto', 'aio' or 'threads', got {engine!r}")
        self.path = str(path)
        self.threads = threads
        self.alignment = alignment
        self.fd, self.direct = self._open(direct)
        self.mode = "O_DIRECT" if self.direct else ("fadvise-bypass" if HAS_FADVISE else "buffered")
        self._aio = self._aio_now = None
        self._reap_now = threading.Lock()
        if engine == "aio" and not self.direct:
            os.close(self.fd)
            raise ValueError(f"ReaderPool: {self.path}: native AIO needs O_DIRECT, which this file system refuses")
        if engine != "threads" and self.direct:
            contexts = []
            try:
                contexts.append(linux_aio.AioContext(threads))     # submit(): reaped by the reaper thread
                contexts.append(linux_aio.AioContext(threads))     # read_into(): reaped by the caller
                self._probe(contexts[1])
                self._aio, self._aio_now = contexts
            except linux_aio.AioError as exc:
                for context in contexts:
                    context.close()
                if engine == "aio":
                    os.close(self.fd)
                    raise ValueError(f"ReaderPool: native AIO is not available here: {exc}") from None
        self.engine = "aio" if self._aio is not None else "threads"
        self._executor = None
        if self._aio is None:
            self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hetflow-reader")
        self._lock = threading.Lock()
        self._closed = False
        self._in_flight = 0
        self._busy_since = 0.0
        self.reset_counters()
        if self._aio is not None:
            self._reaper = threading.Thread(target=self._reap_forever, name="hetflow-aio-reaper", daemon=True)
            self._reaper.start()

    def _probe(self, context) -> None:
        """One aligned read at offset 0 through ``context``: a file system may take O_DIRECT preads and still
        refuse native AIO on the file (the read comes back -EINVAL); AioError then, and the pool uses threads."""
        buf = aligned_empty(self.alignment, self.alignment)
        context.submit(self.fd, [(0, buf.ctypes.data, len(buf), "probe")])
        done = context.reap(30.0)
        if not done:
            raise linux_aio.AioError(110, f"{self.path}: a native AIO read did not complete in 30 s")
        got = done[0][1]
        if got < 0:
            raise linux_aio.AioError(-got, f"{self.path}: a native AIO read failed: {os.strerror(-got)}")

    def _open(self, direct: bool) -> tuple[int, bool]:
        try:
            if not (direct and hasattr(os, "O_DIRECT")):
                return os.open(self.path, os.O_RDONLY), False
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            except OSError:                            # tmpfs and some others refuse O_DIRECT at open
                return os.open(self.path, os.O_RDONLY), False
        except OSError as exc:
            raise FlashReadError(f"{self.path}: cannot open it for reading: {exc.strerror or exc}") from None
        try:                                           # others accept the flag and fail the first read
            os.preadv(fd, [aligned_empty(self.alignment, self.alignment)], 0)
            return fd, True
        except OSError:
            os.close(fd)
            return os.open(self.path, os.O_RDONLY), False

    # --- counters ---------------------------------------------------------------------------------------------

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_read = 0
            self.requests = 0
            self.read_seconds = 0.0
            if self._in_flight:
                self._busy_since = time.perf_counter()

    def _begin(self) -> None:
        with self._lock:
            if self._in_flight == 0:
                self._busy_since = time.perf_counter()
            self._in_flight += 1

    def _end(self, nbytes: int, nrequests: int) -> None:
        with self._lock:
            self._in_flight -= 1
            self.bytes_read += nbytes
            self.requests += nrequests
            if self._in_flight == 0:
                self.read_seconds += time.perf_counter() - self._busy_since

    # --- reading ----------------------------------------------------------------------------------------------

    def _pieces(self, requests: Sequence) -> list[tuple[int, memoryview]]:
        """The requests checked (alignment under O_DIRECT) and cut into pieces of at most ``MAX_PIECE``."""
        pieces = []
        for i, (offset, dest) in enumerate(requests):
            view = _as_bytes_view(dest, lambda i=i, offset=offset, dest=dest: self._where(i, offset, dest))
            if offset < 0:
                raise ValueError(f"{self._where(i, offset, dest)}: negative offset")
            if self.direct:
                a = self.alignment
                if offset % a or len(view) % a or _address(view) % a:
                    raise ValueError(f"{self._where(i, offset, dest)}: under O_DIRECT the offset, the length and the destination address "
                                     f"must be multiples of {a} (destination at {_address(view):#x}); "
                                     "lay chunks out aligned and use aligned_empty")
            for start in range(0, len(view), MAX_PIECE):
                pieces.append((offset + start, view[start:start + MAX_PIECE]))
        return pieces

    def _where(self, i: int, offset: int, dest) -> str:
        return f"{self.path}: request {i} (offset {offset}, length {memoryview(dest).nbytes})"

    def _read_one(self, offset: int, view: memoryview, done: int = 0) -> None:
        """Read ``view`` from ``offset`` in full, its first ``done`` bytes already in."""
        length = len(view)
        while done < length:
            try:
                n = os.preadv(self.fd, [view[done:]], offset + done)
            except OSError as exc:
                raise FlashReadError(f"{self.path}: reading {length} bytes at offset {offset} failed "
                                     f"({self.mode}): {exc.strerror or exc}") from None
            if n == 0:
                raise FlashReadError(f"{self.path}: short read of {length} bytes at offset {offset}: got {done} "
                                     f"(the file ends at {os.fstat(self.fd).st_size} bytes)")
            done += n
        if not self.direct and HAS_FADVISE:
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)

    def _read_batch(self, batch: list[tuple[int, memoryview]]) -> None:
        for offset, view in batch:
            self._read_one(offset, view)

    def submit(self, requests: Sequence) -> Future:
        """Start reading every ``(offset, dest)`` on the pool's threads; the Future's result is the number of
        bytes read, or it raises the first read's error. Alignment errors raise here, at once."""
        return self._dispatch(requests, inline=False)

    def read_into(self, requests: Sequence) -> int:
        """Read every ``(offset, dest)`` in parallel and return when all are in; returns the bytes read. The
        calling thread reads one share itself (a thread hand-off costs about as much as a 1 MiB read)."""
        return self._dispatch(requests, inline=True).result()

    def _dispatch(self, requests: Sequence, inline: bool) -> Future:
        pieces = self._pieces(requests)
        total = sum(len(v) for _, v in pieces)
        result: Future = Future()
        result.set_running_or_notify_cancel()
        with self._lock:
            if self._closed:
                raise ValueError(f"{self.path}: the reader pool is closed")
        if not pieces:
            result.set_result(0)
            return result
        remaining = [len(pieces) if self._aio is not None else min(self.threads, len(pieces))]
        errors: list[BaseException] = []
        count_lock = threading.Lock()
        self._begin()

        def finished(error: BaseException | None) -> None:
            with count_lock:
                if error is not None:
                    errors.append(error)
                remaining[0] -= 1
                last = remaining[0] == 0
            if not last:
                return
            self._end(total if not errors else 0, len(requests) if not errors else 0)
            if errors:
                result.set_exception(errors[0])
            else:
                result.set_result(total)

        if self._aio is not None:
            context = self._aio_now if inline else self._aio
            context.submit(self.fd, [(offset, _address(view), len(view), (offset, view, finished))
                                     for offset, view in pieces])
            while inline and not result.done():   # the caller reaps its own reads: no thread hand-off
                with self._reap_now:              # (whoever holds it finishes every caller's completed reads)
                    if not result.done():
                        self._complete(context.reap(0.05))
            return result
        batches = [pieces[i::self.threads] for i in range(remaining[0])]
        for batch in batches[1:] if inline else batches:
            self._executor.submit(self._read_batch, batch).add_done_callback(lambda f: finished(f.exception()))
        if inline:
            try:
                self._read_batch(batches[0])
                finished(None)
            except Exception as exc:  # noqa: BLE001  (handed to the Future like the pool threads' errors)
                finished(exc)
        return result

    def _reap_forever(self) -> None:
        """The AIO engine's reaper: collects completions and finishes each request's share of its batch."""
        aio = self._aio
        while True:
            try:
                done = aio.reap(0.05)
            except linux_aio.AioError:
                if self._closed:
                    return
                raise
            self._complete(done)
            if self._closed and not aio.in_flight and not aio.queued:
                return

    def _complete(self, done: list) -> None:
        """Finish each AIO completion's share of its batch (a short read's rest read here, in place)."""
        for (offset, view, finished), got in done:
            error = None
            try:
                if got < 0:
                    raise FlashReadError(f"{self.path}: reading {len(view)} bytes at offset {offset} failed "
                                         f"({self.mode}, native AIO): {os.strerror(-got)}")
                if got < len(view):
                    self._read_one(offset, view, done=got)   # the rest (rare), in this thread
            except Exception as exc:  # noqa: BLE001  (handed to the batch's Future)
                error = exc
            finished(error)

    # --- lifetime ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        else:
            self._reaper.join()
            self._aio.close()
            self._aio_now.close()
        os.close(self.fd)

    def __enter__(self) -> "ReaderPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ReaderPool({self.path!r}, threads={self.threads}, mode={self.mode}, engine={self.engine})"
