"""The executor: runs a partitioned program, one worker per device, synchronised by flags in shared memory.

Memory: every value that crosses a partition boundary lives in the arena of its
memory space (one NumPy buffer per space, the offsets from the memory plan; a
unified space is one buffer every worker sees). Partitions read and write their
arena views in place (ONNX Runtime through IOBinding).

Synchronisation (HeteroInfer's scheme): each cross-device value has a flag word in
a shared array; the producer writes the value, then stores the run's number in
its flag; the consumer sleeps until the producer's predicted finish (never more
than ``sync.MAX_SLEEP``), then polls the flag. No locks, no driver-level waits on
the path. The memory plan needs no other synchronisation: the plan checker
(``plancheck``) proves at load that values sharing bytes are ordered by the queues
and flags alone, and a plan it refuses is never run.

With one device the executor simply runs the partitions in the calling thread. A
graph that is one ONNX Runtime partition of static shapes takes the lean call path
(``prebound``): its inputs checked against a signature precompiled at load, its
inputs and outputs bound once; any other input form goes through the checks here.

Calls: ``run`` may be called from several threads; runs are serialised (one at a
time, each with its own inputs, flags and record). Each run starts with every
flag clear, so a failed run leaves the model usable. Every wait is bounded (the
producer's predicted finish times ``WAIT_FACTOR``, at least ``wait_timeout``
seconds, by default ``HETFLOW_WAIT_TIMEOUT`` or 120) and ends in an error naming
the partition and the value. Ctrl-C during a run stops the workers (at their next
wait or partition) and the run.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field

import numpy as np

from hetflow.ir import Graph
from hetflow.ir.errors import HetflowError

from hetflow.ir.interpreter import check_inputs
from hetflow.ir.symbolic import bind, concrete_shape, max_nbytes

from .plancheck import check_memory_plan
from .prebound import InputSignature, PreboundCall, static_signature
from .runners import load_runner
from .sync import Flags, SyncFailure, SyncTimeout

ALIGNMENT = 64
WAIT_FACTOR = 100.0      # a wait gives up at this many times the producer's predicted finish...
WAIT_CEILING = 3600.0    # ...capped here, whatever the prediction...
WAIT_FLOOR = 120.0       # ...and never before this many seconds (HETFLOW_WAIT_TIMEOUT overrides)
STOP_GRACE = 1.0         # after a failure, how long the other workers get to stop before the run reports it
SPIN_MODES = (None, True, False, "call")   # ONNX Runtime's idle threads: see ``hetflow.runtime.load``


from .errors import RunnerError, RuntimeFailure  # noqa: E402  (hetflow.runtime.executor.RuntimeFailure is public)


class DeviceWorkers:
    """One thread per device, started at the first run that needs it and kept for every later run: a run hands
    each its device's work and waits on an event (about 120 us a run here), where starting and joining two
    threads a run cost about 380 us. The threads hold the executor only while they run its work, and stop
    when it is collected."""

    def __init__(self):
        self._jobs: dict[str, queue.SimpleQueue] = {}

    def submit(self, device: str, work) -> threading.Event:
        """Run ``work()`` on ``device``'s thread; the event is set when it has returned (or raised: ``work``
        keeps its own errors)."""
        jobs = self._jobs.get(device)
        if jobs is None:
            jobs = self._jobs[device] = queue.SimpleQueue()
            threading.Thread(target=_device_loop, args=(jobs,), name=f"hetflow-{device}", daemon=True).start()
        done = threading.Event()
        jobs.put((work, done))
        return done

    def stop(self) -> None:
        for jobs in self._jobs.values():
            jobs.put(None)
        self._jobs = {}


def _device_loop(jobs: queue.SimpleQueue) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        work, done = job
        try:
            work()
        finally:
            del work, job      # (the executor is not kept alive between runs)
            done.set()


@dataclass
class Measured:
    name: str
    device: str
    start: float
    end: float
    backend: str
    modelled: float | None = None  # a device simulator's time for the partition (seconds), None when measured

    def as_dict(self) -> dict:
        return {"name": self.name, "device": self.device, "start_us": self.start * 1e6, "end_us": self.end * 1e6,
                "kind": self.backend if self.modelled is None else
                f"{self.backend} (simulator: {self.modelled * 1e6:.1f} us modelled; this bar is its NumPy wall time)",
                "ops": "", "flops": 0, "bytes": 0,
                **({"modelled_us": self.modelled * 1e6} if self.modelled is not None else {})}


@dataclass
class RunRecord:
    events: list[Measured] = field(default_factory=list)
    waits: list[tuple[str, float, float]] = field(default_factory=list)  # (value, flag set at, consumer saw it at)
    seconds: float = 0.0


ORT_BINDABLE = {"f16", "f32", "f64", "i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64", "bool"}


def _arena_type(t, dims: dict | None = None) -> bool:
    """Values the arena holds: the plain numeric types, of static shapes or (a dynamic graph) of shapes
    bounded by the declared sizes (a slot of the size at the maximum, viewed at each call's shape)."""
    if t is None or t.dtype.value not in ORT_BINDABLE:
        return False
    return t.is_static or (bool(dims) and max_nbytes(t, dims) is not None)


def naive_layout(sizes: dict[str, int]) -> tuple[dict[str, int], int]:
    """Offsets with no reuse (each value its own aligned slot): the layout when no plan is given."""
    offsets, cursor = {}, 0
    for name, size in sizes.items():
        offsets[name] = cursor
        cursor += -(-max(size, 1) // ALIGNMENT) * ALIGNMENT
    return offsets, cursor


def _host(value):
    """A NumPy view of ``value`` (a torch tensor of the GPU arena is copied to host memory)."""
    if value is None or isinstance(value, np.ndarray) or np.isscalar(value):
        return value
    from .runners.cuda import to_numpy
    return to_numpy(value)


def _copy_into(destination, value) -> None:
    if isinstance(destination, np.ndarray) and (isinstance(value, np.ndarray) or np.isscalar(value)):
        destination[...] = value
        return
    from .runners.cuda import copy_into
    copy_into(destination, value)


class Executor:
    def __init__(self, graph: Graph, partitions: list, platform=None, memory_plan: dict | None = None,
                 threads: int | None = None, fallback: str | None = None, gpu_kernels: str = "triton",
                 wait_timeout: float | None = None, plan_checked: bool = False,
                 trust_native_code: bool | str = False, artifact_digest: str | None = None,
                 spin: bool | str | None = None):
        self.graph = graph
        self.trust_native_code = trust_native_code  # native libraries of an artifact load only when trusted...
        self.artifact_digest = artifact_digest      # ...(None: the partitions were compiled by this process)
        self.partitions = partitions
        self.platform = platform
        self.wait_timeout = float(wait_timeout if wait_timeout is not None else
                                  os.environ.get("HETFLOW_WAIT_TIMEOUT", WAIT_FLOOR))
        if memory_plan and not plan_checked:  # (checked already when it comes from this process's compile)
            # never run a plan that could race: the checker proves every overlap ordered, at every load
            check_memory_plan(graph, [(p.device, p.nodes) for p in partitions], memory_plan, self.memory_of,
                              ALIGNMENT)
        self.types = {v.name: v.type for v in graph.values()}
        self.weights = {w.name: w.data for w in graph.weights.values()}
        self.threads = threads
        if spin not in SPIN_MODES:
            raise RunnerError(f"spin must be one of {', '.join(map(repr, SPIN_MODES))}, got {spin!r}")
        self.spin = spin  # ONNX Runtime's idle threads spin (None: only when one CPU partition has the cores)
        self.fallback = fallback
        self.gpu_kernels = gpu_kernels
        self.copy_into = _copy_into
        self.fallbacks: list[str] = []
        self.device_memories: set[str] = set()  # memories whose arena lives on the GPU
        self.runners = [load_runner(part, self) for part in partitions]  # one registry, by backend name
        self.dims = dict(graph.dims)  # dynamic shapes: each size's declared (min, max)
        produced = [n for p in partitions for n in p.output_names if _arena_type(self.types[n], self.dims)]
        self.producer = {n: i for i, p in enumerate(partitions) for n in p.output_names}
        self._arenas(memory_plan, produced)
        self.cross = sorted({n for i, p in enumerate(partitions) for n in p.input_names
                             if n in self.producer and partitions[self.producer[n]].device != p.device})
        self.flag_index = {n: i for i, n in enumerate(self.cross)}
        self.flags = Flags(len(self.cross))
        self.handed_out: dict[str, np.ndarray] = {}  # the output arrays the last run returned
        self.staged_inputs = self._staged_inputs()
        self.run_id = 0
        self._lock = threading.Lock()   # one run at a time
        self._stragglers: list[tuple[str, threading.Event]] = []  # (device, done) of a stopped run's work
        self._workers = DeviceWorkers()     # device threads kept across runs (a multi-device plan)
        weakref.finalize(self, self._workers.stop)
        self._last = RunRecord()
        self.devices = list(dict.fromkeys(p.device for p in partitions))
        self.signature = InputSignature(graph.inputs) if static_signature(graph.inputs) else None
        self.lean_refused = PreboundCall.plan(self)  # None: calls take the lean path (``prebound``)
        self.lean = PreboundCall(self, self.runners[0], partitions[0]) if self.lean_refused is None else None

    @property
    def last(self) -> RunRecord:
        """The last run's record (a lean call's is made when asked for, not on the call's path)."""
        if isinstance(self._last, tuple):
            start, end = self._last
            part = self.partitions[0]
            self._last = RunRecord([Measured(part.file or f"part{part.index}", part.device, 0.0, end - start,
                                             part.backend)], [], end - start)
        return self._last

    @last.setter
    def last(self, record: RunRecord) -> None:
        self._last = record

    # --- memory ---------------------------------------------------------------------------------
    def memory_of(self, device: str) -> str:
        """The memory space a partition on ``device`` writes (the platform's one function for it)."""
        return "dram" if self.platform is None else self.platform.memory_space(device)

    def _arenas(self, memory_plan: dict | None, produced: list[str]) -> None:
        self.buffers: dict[str, np.ndarray] = {}
        self.arenas: dict[str, np.ndarray] = {}
        self.slots: dict[str, tuple] = {}  # a dynamic shape's value: (arena, first byte, dtype, symbolic shape)
        self.views: dict[tuple, dict[str, np.ndarray]] = {}  # sizes -> those values' views at them
        by_memory: dict[str, dict[str, int]] = {}
        for name in produced:
            memory = self.memory_of(self.partitions[self.producer[name]].device)
            by_memory.setdefault(memory, {})[name] = max_nbytes(self.types[name], self.dims)
        for memory, sizes in by_memory.items():
            planned = (memory_plan or {}).get(memory)
            if planned:
                missing = [n for n in sizes if n not in planned["offsets"]]
                if missing:
                    raise RuntimeFailure(f"the memory plan for memory {memory!r} has no offset for %{missing[0]} "
                                         f"(written by partition {self.producer[missing[0]]}"
                                         f"{f' and {len(missing) - 1} more values' if len(missing) > 1 else ''})")
                offsets, total = planned["offsets"], planned["size"]
            elif memory_plan:
                raise RuntimeFailure(f"the memory plan has no arena for memory {memory!r}, which partition "
                                     f"{self.producer[next(iter(sizes))]} writes")
            else:
                offsets, total = naive_layout(sizes)  # no plan (a pipeline without plan_memory): no reuse
            if memory in self.device_memories:  # the GPU's memory: one CUDA buffer
                dynamic = next((n for n in sizes if not self.types[n].is_static), None)
                if dynamic is not None:
                    raise RuntimeFailure(f"%{dynamic} ({self.types[dynamic]}) is written in the GPU's memory: "
                                         "partitions on a CUDA GPU replay CUDA graphs of fixed shapes, and this "
                                         "graph has dynamic sizes")
                from .runners.cuda import arena_view, device_arena
                arena = self.arenas[memory] = device_arena(total + ALIGNMENT)
                for name, size in sizes.items():
                    t = self.types[name]
                    self.buffers[name] = arena_view(arena, offsets[name], size, t.dtype.value, t.shape)
                continue
            arena = np.zeros(total + ALIGNMENT, np.uint8)
            base = (-arena.ctypes.data) % ALIGNMENT
            self.arenas[memory] = arena
            for name, size in sizes.items():
                t = self.types[name]
                start = base + offsets[name]
                if not t.is_static:
                    self.slots[name] = (arena, start, t.dtype.numpy, t.shape)
                    continue
                self.buffers[name] = arena[start:start + size].view(t.dtype.numpy).reshape(t.shape)

    def _sized(self, sizes: dict[str, int]) -> None:
        """The dynamic-shape values' arena slots viewed at this call's sizes (kept for the last few sizes)."""
        key = tuple(sorted(sizes.items()))
        views = self.views.get(key)
        if views is None:
            views = {}
            for name, (arena, start, dtype, shape) in self.slots.items():
                concrete = concrete_shape(shape, sizes)
                count = int(np.prod(concrete, dtype=np.int64)) * np.dtype(dtype).itemsize
                views[name] = arena[start:start + count].view(dtype).reshape(concrete)
            if len(self.views) >= 32:
                self.views.pop(next(iter(self.views)))
            self.views[key] = views
        self.buffers.update(views)

    def _staged_inputs(self) -> dict:
        """Device buffers for the graph inputs that partitions on the GPU read (copied in once per run,
        however many partitions read them). Only where every reader is on the GPU."""
        if not self.device_memories:
            return {}
        from .runners.cuda import to_torch
        staged = {}
        for v in self.graph.inputs:
            readers = [i for i, p in enumerate(self.partitions) if v.name in p.input_names]
            if readers and all(getattr(self.runners[i], "on_gpu", False) for i in readers) and v.type is not None \
                    and v.type.is_static and _arena_type(v.type):
                staged[v.name] = to_torch(np.zeros(v.type.shape, v.type.dtype.numpy), "cuda")
        return staged

    # --- running --------------------------------------------------------------------------------
    def run(self, feeds) -> dict[str, np.ndarray]:
        """One run; calls from several threads are serialised."""
        with self._lock:
            if self.lean is not None:
                out = self.lean(feeds)
                if out is not None:
                    self._last = self.lean.seconds
                    return out
            return self._run(feeds)

    def _run(self, feeds) -> dict[str, np.ndarray]:
        for device, done in self._stragglers:  # workers of a stopped run finish their partition first
            if not done.wait(self.wait_timeout):
                raise RuntimeFailure(f"worker hetflow-{device} of an earlier, failed run is still inside a "
                                     f"partition after {self.wait_timeout:g} s more; this model cannot run again")
        self._stragglers = []
        matched = self.signature.arrays(feeds) if self.signature is not None else None
        if matched is not None:  # exactly the precompiled signature: nothing more to check
            arrays = dict(zip(self.signature.names, matched))
        else:
            arrays = check_inputs(self.graph, feeds if isinstance(feeds, dict) else
                                  dict(zip([v.name for v in self.graph.inputs], feeds)))
        if self.dims:  # each size within its declared range, one error line naming the input and dim if not
            self._sized(bind(self.graph.inputs, arrays, self.dims))
        # (np.ascontiguousarray would make a 0-d input 1-d: a size dynamo passes as a scalar input)
        env = {n: a if a.flags.c_contiguous else np.ascontiguousarray(a) for n, a in arrays.items()}
        env.update(self.weights)
        for name, staged in self.staged_inputs.items():  # graph inputs the GPU reads: one copy in, per run
            _copy_into(staged, env[name])
            env[name] = staged
        # graph outputs go straight into arrays the caller keeps (bound like arena slots): no copy out
        fresh = {v.name for v in self.graph.outputs
                 if v.name in self.buffers and isinstance(self.buffers[v.name], np.ndarray)}
        for name in fresh:
            target = self.buffers[name]  # (a dynamic shape's: this call's view of its slot)
            last = self.handed_out.get(name)
            # the last run's result, if the caller has let go of it (our references, ``last`` and
            # getrefcount's argument are all that remain): written again, with no new pages to fault in
            if last is not None and last.shape == target.shape and \
                    sys.getrefcount(last) <= (5 if target is last else 3):  # (+ target's and buffers' own)
                self.buffers[name] = last
                continue
            self.buffers[name] = np.empty_like(target)
            self.handed_out[name] = self.buffers[name]
        self.run_id += 1
        self.flags.reset()  # a failure left by an earlier run is gone
        record = RunRecord()
        start = time.perf_counter()
        if len(self.devices) == 1:
            for index in range(len(self.partitions)):
                self._execute(index, env, record, start)
        else:
            self._run_concurrent(env, record, start)
        record.seconds = time.perf_counter() - start
        self.last = record
        out = {}
        for v in self.graph.outputs:
            if v.name in fresh and v.name not in out:
                out[v.name] = self.buffers[v.name]
                continue
            value = self.buffers.get(v.name) if v.name in self.buffers else env[v.name]
            out[v.name] = _host(value) if not isinstance(value, np.ndarray) else np.array(value, copy=True)
        return out

    def _execute(self, index: int, env: dict, record: RunRecord, start: float) -> None:
        part = self.partitions[index]
        runner = self.runners[index]
        began = time.perf_counter()
        try:
            inputs = {n: self.buffers.get(n, env.get(n)) for n in part.input_names}
            if runner.host_inputs:
                inputs = {n: _host(v) for n, v in inputs.items()}
            if all(n in self.buffers for n in part.output_names):
                runner.run(inputs, {n: self.buffers[n] for n in part.output_names})
            else:
                for name, value in runner.run_dynamic(inputs).items():
                    self._store(name, value, env)
        except HetflowError:
            raise
        except Exception as exc:
            raise RuntimeFailure(f"partition {part.index} ({part.file}, device {part.device}) failed: "
                                 f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                                 ) from exc
        record.events.append(Measured(part.file or f"part{part.index}", part.device, began - start,
                                      time.perf_counter() - start, part.backend,
                                      getattr(runner, "last_seconds", None)))  # a simulator's modelled time

    def _store(self, name: str, value, env: dict) -> None:
        if name in self.buffers:
            _copy_into(self.buffers[name], value)
        else:
            env[name] = _host(value)

    def _deadline(self, start: float, predicted_end: float) -> float:
        """When a wait for a partition predicted to finish at ``predicted_end`` (seconds into the run) gives up."""
        predicted = min(max(float(predicted_end), 0.0), WAIT_CEILING)
        return start + min(max(self.wait_timeout, WAIT_FACTOR * predicted), max(WAIT_CEILING, self.wait_timeout))

    def _run_concurrent(self, env: dict, record: RunRecord, start: float) -> None:
        """Each device's partitions in order on its own thread (``DeviceWorkers``; the first device's on the
        calling thread), synchronised through the flags."""
        errors: list[BaseException] = []
        cancelled = threading.Event()
        queues = {d: [i for i, p in enumerate(self.partitions) if p.device == d] for d in self.devices}
        caller = threading.current_thread()

        def worker(device: str) -> None:
            try:
                for index in queues[device]:
                    if errors or cancelled.is_set():
                        return
                    part = self.partitions[index]
                    for name in part.input_names:
                        if name in self.flag_index:
                            self._wait(name, start, record, part)
                    self._execute(index, env, record, start)
                    for name in part.output_names:
                        if name in self.flag_index:
                            self.flags.signal(self.flag_index[name], self.run_id)
            except KeyboardInterrupt:
                if threading.current_thread() is caller:
                    raise       # Ctrl-C in the calling thread: handled below
                errors.append(RuntimeFailure("interrupted"))
                self.flags.fail_all()
            except BaseException as exc:  # noqa: BLE001  (re-raised in the calling thread)
                errors.append(exc)
                self.flags.fail_all()  # wake every waiter

        others = [(d, self._workers.submit(d, lambda d=d: worker(d))) for d in self.devices[1:]]
        try:
            worker(self.devices[0])
            failed_at = None
            for _, done in others:
                while not done.wait(0.05):
                    if errors and failed_at is None:
                        failed_at = time.perf_counter()
                    if failed_at is not None and time.perf_counter() - failed_at > STOP_GRACE:
                        break  # a worker stuck in a partition: report the failure now, wait for it next run
            self._stragglers = [(d, done) for d, done in others if not done.is_set()]
        except KeyboardInterrupt:
            cancelled.set()
            self.flags.fail_all()  # every waiting worker wakes and stops; a running one stops after its partition
            for _, done in others:
                done.wait(1.0)
            self._stragglers = [(d, done) for d, done in others if not done.is_set()]
            raise
        if errors:
            # the failure itself, not a waiter it woke
            primary = [e for e in errors if not isinstance(e, _WokenByFailure)]
            raise primary[0] if primary else errors[0]

    def _wait(self, name: str, start: float, record: RunRecord, consumer=None) -> None:
        """Sleep until the producer's predicted finish (capped), then poll its flag, until the deadline."""
        slot = self.flag_index[name]
        producer = self.partitions[self.producer[name]]
        deadline = self._deadline(start, producer.predicted_end)
        reader = f"partition {consumer.index} ({consumer.device})" if consumer is not None else "a partition"
        try:
            seen, _ = self.flags.wait(slot, self.run_id, start + min(producer.predicted_end, WAIT_CEILING), deadline)
        except SyncTimeout:
            raise _Timeout(f"{reader} waited {deadline - start:.3g} s for %{name} from partition {producer.index} "
                           f"({producer.file}, device {producer.device}) and gave up: that partition never "
                           "finished (HETFLOW_WAIT_TIMEOUT sets the bound)") from None
        except SyncFailure:
            raise _WokenByFailure(f"the producer of {name!r} (partition {producer.index}) failed") from None
        record.waits.append((name, self.flags.set_at[slot] - start, seen - start))


class _WokenByFailure(RuntimeFailure):
    """A waiter woken because another partition failed (not the failure itself)."""


class _Timeout(RuntimeFailure):
    pass
