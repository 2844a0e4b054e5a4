"""Cross-device synchronisation by flag words in shared memory (HeteroInfer's scheme).

The producer writes its output, then stores the run number in the value's flag
word. The consumer sleeps until the producer's predicted finish (minus a margin
for the sleep's granularity), then polls the flag. No lock, condition variable or
driver call sits on the path.

The poll runs in a few lines of C (``flagwait.c``, compiled on first use with the
system's C compiler and cached, called through ctypes, which releases the Python
interpreter lock): a Python poll loop would hand the interpreter lock back and
forth with the producer, which costs as much as the kernel wake-up it avoids.
Without a C compiler the poll falls back to Python (``Flags.native`` says which).
"""
from __future__ import annotations

import ctypes
import functools
import time
from pathlib import Path

import numpy as np

from hetflow.support.native import compiled_function

SLEEP_MARGIN = 100e-6   # wake this much before the predicted finish: sleep overshoots by ~50-100 us
MIN_SLEEP = 200e-6      # below this, polling alone is cheaper than a sleep
MAX_SLEEP = 0.05        # the longest sleep, whatever the prediction says (then the poll takes over)
POLL_CHUNK = 0.1        # seconds the C poll spins before it comes back to check the deadline


class SyncFailure(RuntimeError):
    pass


class SyncTimeout(SyncFailure):
    pass


@functools.lru_cache(maxsize=1)
def _native_wait():
    """The compiled poll, or None when no C compiler is available."""
    source = Path(__file__).with_name("flagwait.c")
    if not source.exists():
        return None
    function = compiled_function("flagwait", source.read_text(), "hetflow_wait_flag")
    if function is None:
        return None  # no writable cache or no working compiler: poll in Python
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.POINTER(ctypes.c_double)]
    return function


class Flags:
    def __init__(self, slots: int, native: bool = True):
        self.words = np.zeros(max(1, slots), np.int64)
        self.set_at = np.zeros(max(1, slots), np.float64)
        self._native = _native_wait() if native else None

    @property
    def native(self) -> bool:
        return self._native is not None

    def signal(self, slot: int, run_id: int) -> None:
        self.set_at[slot] = time.perf_counter()
        self.words[slot] = run_id  # stored after the data the flag guards

    def fail_all(self) -> None:
        self.words[:] = -1

    def reset(self) -> None:
        """Clear every flag (and a failure left by an earlier run): called at the start of each run."""
        self.words[:] = 0
        self.set_at[:] = 0.0

    def wait(self, slot: int, run_id: int, predicted_ready: float, deadline: float | None = None) -> tuple[float, int]:
        """Wait for ``slot`` to reach ``run_id``; ``predicted_ready`` and ``deadline`` are perf_counter() times.

        Sleeps until the predicted finish (at most ``MAX_SLEEP``, whatever the prediction), then polls.
        Raises ``SyncFailure`` when the producer failed (or the run was cancelled: the flag reads -1) and
        ``SyncTimeout`` past ``deadline``. Returns (the time the consumer saw the flag, the number of polls).
        """
        words = self.words
        remaining = predicted_ready - time.perf_counter()
        if remaining > MIN_SLEEP and words[slot] != run_id:
            time.sleep(min(remaining - SLEEP_MARGIN, MAX_SLEEP))
        if self._native is not None:
            address = words.ctypes.data + slot * words.itemsize
            seen = ctypes.c_double()
            while True:
                status = self._native(address, run_id, POLL_CHUNK, ctypes.byref(seen))
                if status == 0:
                    return time.perf_counter(), 0
                if status == -1:
                    raise SyncFailure("the producer failed")
                if deadline is not None and time.perf_counter() > deadline:
                    raise SyncTimeout("timed out")
        polls = 0
        while words[slot] != run_id:
            if words[slot] == -1:
                raise SyncFailure("the producer failed")
            polls += 1
            if deadline is not None and not polls % 1024 and time.perf_counter() > deadline:
                raise SyncTimeout("timed out")
            time.sleep(0)
        return time.perf_counter(), polls
