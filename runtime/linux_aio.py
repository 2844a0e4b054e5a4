"""Linux native asynchronous I/O (``io_setup`` / ``io_submit`` / ``io_getevents``) through ctypes, for O_DIRECT reads.

A reader thread per request in flight costs the GIL at every completion: each thread must take it back to
return from ``preadv`` and fetch its next read, and while the main thread runs Python between NumPy calls it
holds the GIL for up to the switch interval (5 ms). Native AIO hands the kernel a whole batch of reads in one
system call and reports their completions in another, so a layer's few dozen reads are all in flight at once
with no Python running per read.

``AioContext(depth)`` is one kernel context with room for ``depth`` reads in flight: ``submit(fd, reads)``
queues ``(offset, address, length, tag)`` reads (more than ``depth`` wait their turn and go in as earlier
ones complete), and ``reap(timeout)`` waits for completions and returns ``(tag, result)`` pairs, ``result``
the bytes read or ``-errno``. Only for files opened with O_DIRECT: buffered files make ``io_submit`` block
until the read is done. ``available()`` says whether this kernel and its sandbox allow it (seccomp filters
and gVisor often refuse ``io_setup``).
"""
from __future__ import annotations

import ctypes
import os
import platform
import threading
from collections import deque

import numpy as np

__all__ = ["AioContext", "AioError", "available"]

_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}   # io_setup, io_destroy, io_getevents, io_submit
_IOCB_CMD_PREAD = 0

# struct iocb (64 bytes) and struct io_event (32 bytes), little-endian layout (both machines above)
IOCB = np.dtype([("data", "<u8"), ("key", "<u4"), ("rw_flags", "<i4"), ("opcode", "<u2"), ("reqprio", "<i2"),
                 ("fildes", "<u4"), ("buf", "<u8"), ("nbytes", "<u8"), ("offset", "<i8"), ("reserved2", "<u8"),
                 ("flags", "<u4"), ("resfd", "<u4")])
IO_EVENT = np.dtype([("data", "<u8"), ("obj", "<u8"), ("res", "<i8"), ("res2", "<i8")])
assert IOCB.itemsize == 64 and IO_EVENT.itemsize == 32


class AioError(OSError):
    """A native AIO system call failed (not a read: a read's error comes back as its result)."""


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = None


def _syscall():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)     # CDLL: the GIL is released for the call
        _libc.syscall.restype = ctypes.c_long
    return _libc.syscall


def _numbers():
    return _SYSCALLS.get(platform.machine())


def available() -> bool:
    """Whether this process may use native AIO (Linux on x86_64 or aarch64, and ``io_setup`` allowed)."""
    if not os.sys.platform.startswith("linux") or _numbers() is None:
        return False
    try:
        AioContext(1).close()
        return True
    except (AioError, OSError):
        return False


class AioContext:
    """One kernel AIO context; ``depth`` reads in flight at most (see the module doc). Thread-safe: any thread
    may ``submit``; one thread at a time should ``reap``."""

    def __init__(self, depth: int = 64):
        numbers = _numbers()
        if numbers is None:
            raise AioError(f"native AIO: no system call numbers for {platform.machine()}")
        self._setup, self._destroy, self._getevents, self._submit = numbers
        self.depth = max(1, int(depth))
        self._ctx = ctypes.c_ulong(0)
        call = _syscall()
        if call(ctypes.c_long(self._setup), ctypes.c_long(self.depth), ctypes.byref(self._ctx)) < 0:
            err = ctypes.get_errno()
            raise AioError(err, f"io_setup({self.depth}): {os.strerror(err)}")
        self._lock = threading.Lock()
        self._queue: deque = deque()            # (fd, offset, address, length, tag) not yet handed to the kernel
        self._in_flight = 0
        self._iocbs = np.zeros(self.depth, IOCB)       # one slot per read in flight (the kernel reads it at submit)
        self._free = list(range(self.depth))
        self._slot_tag: dict[int, object] = {}
        self._pointers = np.zeros(self.depth, np.uint64)
        self._events = np.zeros(self.depth, IO_EVENT)
        self._refused: list = []                # (tag, -errno) of reads io_submit refused, for the next reap
        self._closed = False

    # --- submitting -------------------------------------------------------------------------------------------

    def submit(self, fd: int, reads) -> None:
        """Queue ``(offset, address, length, tag)`` reads of ``fd`` and hand the kernel as many as fit."""
        with self._lock:
            if self._closed:
                raise AioError("native AIO: the context is closed")
            self._queue.extend((fd, offset, address, length, tag) for offset, address, length, tag in reads)
            self._pump()

    def _pump(self) -> None:
        """Hand queued reads to the kernel while there is room (under the lock)."""
        while self._queue and self._free:
            count = min(len(self._queue), len(self._free))
            slots = [self._free.pop() for _ in range(count)]
            for slot in slots:
                fd, offset, address, length, tag = self._queue.popleft()
                iocb = self._iocbs[slot]
                iocb["data"], iocb["opcode"], iocb["fildes"] = slot, _IOCB_CMD_PREAD, fd
                iocb["buf"], iocb["nbytes"], iocb["offset"] = address, length, offset
                self._slot_tag[slot] = tag
            base = self._iocbs.ctypes.data
            self._pointers[:count] = [base + slot * IOCB.itemsize for slot in slots]
            done = _syscall()(ctypes.c_long(self._submit), self._ctx, ctypes.c_long(count),
                              ctypes.c_void_p(self._pointers.ctypes.data))
            refused = 0
            if done < 0:
                err = ctypes.get_errno()
                done = 0
                if err != 11:                     # the first read refused (EAGAIN: the kernel is full, wait)
                    refused = 1                   # it completes at once with -errno; the rest are tried again
                    self._refused.append((self._slot_tag.pop(slots[0]), -err))
                    self._free.append(slots[0])
            for slot in reversed(slots[done + refused:]):   # not taken: back to the front of the queue, in order
                self._requeue(slot)
            self._in_flight += done
            if done + refused < count and not refused:
                return

    def _requeue(self, slot: int) -> None:
        iocb = self._iocbs[slot]
        self._queue.appendleft((int(iocb["fildes"]), int(iocb["offset"]), int(iocb["buf"]), int(iocb["nbytes"]),
                                self._slot_tag.pop(slot)))
        self._free.append(slot)

    # --- completing -------------------------------------------------------------------------------------------

    def reap(self, timeout: float | None = None) -> list:
        """Wait up to ``timeout`` seconds (None: until one completes) for completions; returns ``(tag, result)``
        for each, ``result`` the bytes read or ``-errno``; queued reads take the freed room."""
        with self._lock:
            if self._refused:
                refused, self._refused = self._refused, []
                return refused
        if timeout is None:
            spec = None
        else:
            spec = _Timespec(int(timeout), int((timeout - int(timeout)) * 1e9))
        got = _syscall()(ctypes.c_long(self._getevents), self._ctx, ctypes.c_long(1), ctypes.c_long(self.depth),
                         ctypes.c_void_p(self._events.ctypes.data), ctypes.byref(spec) if spec is not None else None)
        if got < 0:
            err = ctypes.get_errno()
            if err == 4:                          # EINTR
                return []
            raise AioError(err, f"io_getevents: {os.strerror(err)}")
        done = []
        with self._lock:
            for event in self._events[:got]:
                slot = int(event["data"])
                done.append((self._slot_tag.pop(slot), int(event["res"])))
                self._free.append(slot)
            self._in_flight -= got
            if not self._closed:
                self._pump()
        return done

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        """Destroy the context (the kernel waits for reads still in flight)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.clear()
        _syscall()(ctypes.c_long(self._destroy), self._ctx)
