"""Cross-device synchronisation: hetflow's flag words against a threading.Event, in the same run.

    python benchmarks/sync.py [--rounds 2000] [--work-us 300]

A producer thread runs a "kernel" for a while (it holds no interpreter lock, as
an ONNX Runtime call or a device kernel does not), then signals; a consumer thread waits and records when it
resumes. Latency = consumer resume - producer signal. The flag consumer sleeps
until the producer's predicted finish, then polls; its busy polling time after
the predicted finish must stay within a small margin. All numbers are measured.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import numpy as np

from hetflow.runtime.sync import Flags


def _work(seconds: float, a: np.ndarray) -> None:
    time.sleep(seconds)  # the kernel runs elsewhere; this thread holds no interpreter lock meanwhile


def run_flags(rounds: int, work: float) -> tuple[list[float], list[float]]:
    flags = Flags(1)
    a = np.random.rand(64, 64).astype(np.float32)
    latencies, overrun = [], []
    ready = threading.Barrier(2)

    def producer():
        for r in range(1, rounds + 1):
            ready.wait()
            _work(work, a)
            flags.signal(0, r)

    thread = threading.Thread(target=producer)
    thread.start()
    for r in range(1, rounds + 1):
        ready.wait()
        predicted = time.perf_counter() + work
        seen, _ = flags.wait(0, r, predicted)
        latencies.append(seen - flags.set_at[0])
        overrun.append(max(0.0, seen - max(predicted, flags.set_at[0])))
    thread.join()
    return latencies, overrun


def run_event(rounds: int, work: float) -> list[float]:
    a = np.random.rand(64, 64).astype(np.float32)
    latencies = []
    ready = threading.Barrier(2)
    events = [threading.Event() for _ in range(rounds + 1)]
    signalled = [0.0] * (rounds + 1)

    def producer():
        for r in range(1, rounds + 1):
            ready.wait()
            _work(work, a)
            signalled[r] = time.perf_counter()
            events[r].set()

    thread = threading.Thread(target=producer)
    thread.start()
    for r in range(1, rounds + 1):
        ready.wait()
        events[r].wait()
        latencies.append(time.perf_counter() - signalled[r])
    thread.join()
    return latencies


def p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--work-us", type=float, default=300.0, help="producer work per round (microseconds)")
    args = parser.parse_args(argv)
    work = args.work_us * 1e-6
    event = run_event(args.rounds, work)
    flag, overrun = run_flags(args.rounds, work)
    print(f"signal -> consumer start over {args.rounds} rounds, producer work {args.work_us:.0f} us (measured; "
          f"flag poll in {'C, without the interpreter lock' if Flags(1).native else 'Python (no C compiler found)'})")
    print(f"{'scheme':28s} {'median us':>10s} {'p99 us':>10s}")
    print(f"{'threading.Event':28s} {p(event, 50):10.1f} {p(event, 99):10.1f}")
    print(f"{'hetflow flags (sleep+poll)':28s} {p(flag, 50):10.1f} {p(flag, 99):10.1f}")
    ratio = statistics.median(flag) / statistics.median(event)
    print(f"flags / Event median latency: {ratio:.2f}x ({'faster' if ratio < 1 else 'NOT faster'})")
    print(f"consumer polling past max(predicted finish, signal): median {p(overrun, 50):.1f} us, "
          f"p99 {p(overrun, 99):.1f} us")
    return 0 if ratio < 1 else 1


if __name__ == "__main__":
    sys.exit(main())
