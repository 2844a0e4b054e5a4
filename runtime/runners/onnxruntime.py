"""Runner ``cpu``: a CPU partition's ONNX model in ONNX Runtime, run through IOBinding on the runtime's buffers.

A partition ONNX Runtime has no kernel for, or whose tensors it cannot exchange,
runs on the reference interpreter instead, and the executor says so. The model is
checked against the partition's IR before ONNX Runtime sees it
(``partition_model``): no external data but hetflow's weights, the partition's
inputs and outputs, views that fit their buffers.
"""
from __future__ import annotations

import functools

import numpy as np

from hetflow.ir.interpreter import Interpreter
from hetflow.ir.onnx_convert import names_read_in_subgraphs
from hetflow.ir.program import inline_weight

from . import RunnerError, register_runner
from .interpreter import InterpreterRunner
from .partition_model import InPlaceOutput, ViewOutput, check_partition_model

ORT_BINDABLE = {"f16", "f32", "f64", "i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64", "bool"}

# ONNX Runtime copies every initializer handed to it (``add_external_initializers``; measured on 1.32: a
# 32 MiB table costs 32 MiB more at session creation, whatever reads it), and the kernels below pack their
# constant weights into a layout of their own besides. A weight of at least BOUND_WEIGHT_BYTES that only
# other ops read is therefore made a graph input and bound to hetflow's buffer (read where it lies, never
# copied); weights a packing kernel reads stay initializers (packing is what makes their GEMMs fast), except
# in an artifact compiled under a DRAM budget (one that streams weights from flash): there every large weight
# is bound, since a second copy of the resident GEMM weights would break the budget the plan kept (a
# CPU-only streamed OPT-style model: +1294 MiB peak for a 580 MiB budget with them copied).
PACKING_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "FusedMatMul", "FusedGemm", "FusedConv",
                         "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "DynamicQuantizeMatMul",
                         "MatMulNBits", "Attention", "QAttention", "MultiHeadAttention", "LSTM", "GRU", "RNN",
                         "DynamicQuantizeLSTM", "Einsum"})
BOUND_WEIGHT_BYTES = 1 << 20

_SHARED_ARENA: list = []    # [True] once this process's CPU sessions share one arena, [False] if it could not


def _shared_cpu_arena() -> bool:
    """Register one CPU arena with ONNX Runtime's environment for hetflow's sessions to share (a session's own
    arena keeps what its largest call needed: 73 sessions of a streamed model held 21 MiB more apart than
    together). Grows by what is asked (not by powers of two). False if the environment refused (another
    library registered a CPU allocator first: the sessions then keep their own arenas)."""
    if not _SHARED_ARENA:
        import onnxruntime as ort
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
            _SHARED_ARENA.append(True)
        except Exception:  # noqa: BLE001  (ONNX Runtime raises its own Fail when one is registered already)
            _SHARED_ARENA.append(False)
    return _SHARED_ARENA[0]


def bind_large_weights(model_bytes: bytes, weights: dict[str, np.ndarray],
                       packed_too: bool = False) -> tuple[bytes, list[str]]:
    """``model_bytes`` with each initializer in ``weights`` of at least ``BOUND_WEIGHT_BYTES`` that no packing
    kernel reads (``PACKING_OPS``; ``packed_too``: whatever reads it), no node whose inputs are all constant
    reads (ONNX Runtime folds those at load: T5's relative-position table gathered at constant buckets) and no
    subgraph names, turned into a graph input; returns (the model, the names turned). Unchanged bytes when
    there is none."""
    import onnx
    candidates = {n for n, a in weights.items() if a.nbytes >= BOUND_WEIGHT_BYTES}
    if not candidates:
        return model_bytes, []
    model = onnx.load_from_string(model_bytes)
    constants = {t.name for t in model.graph.initializer}
    readers: dict[str, set] = {}
    for node in model.graph.node:
        foldable = all(not name or name in constants for name in node.input)   # ONNX Runtime folds it at load
        for name in node.input:
            readers.setdefault(name, set()).add("(folded)" if foldable else node.op_type)
    in_subgraphs = names_read_in_subgraphs(model)
    kept = {"(folded)"} if packed_too else PACKING_OPS | {"(folded)"}
    bound = [t for t in model.graph.initializer if t.name in candidates and readers.get(t.name)
             and not readers[t.name] & kept and t.name not in in_subgraphs]
    if not bound:
        return model_bytes, []
    keep = [t for t in model.graph.initializer if t not in bound]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    for t in bound:
        model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return model.SerializeToString(), [t.name for t in bound]



def _span(array: np.ndarray) -> tuple[int, int]:
    start = array.__array_interface__["data"][0]
    return start, start + array.nbytes


class InPlaceSlots:
    """The outputs a partition's ONNX Runtime session writes into its inputs' own buffers (``decode_attention``
    as GroupQueryAttention over a KV cache: it writes the token's key and value into slot ``position`` of the
    cache it reads, instead of copying the cache into a fresh ``present``).

    For a call (``bind``): every position is checked to lie in [0, S) (a RunnerError naming the node, before
    ONNX Runtime reads or writes a byte); a cache array that is read-only, or whose memory overlaps another
    input's, is copied first and the copy bound in its place (the caller's array is then never written);
    otherwise the slot's old contents are kept, and ``restore`` puts them back after the call. The caller's
    arrays are left as they were: the op is pure, as the IR says. One binding's state (what its in-place
    outputs are bound to): a binding of its own per ``IOBinding``."""

    def __init__(self, partition: str, entries: dict[str, InPlaceOutput]):
        self.partition = partition
        self.entries = list(entries.items())
        self.inputs = {e.input for _, e in self.entries}
        self._bound: dict[str, np.ndarray] = {}   # output -> the array it is bound to (held: its pointer)
        self._checked: list = []      # the input arrays the last overlap check saw (held: their memory stays)
        self._overlapping: set[str] = set()

    def positions(self, inputs: dict[str, np.ndarray]) -> list[int]:
        """Each entry's position, checked to lie in its cache."""
        found, values = [], {}
        for _, entry in self.entries:
            position = values.get(entry.position)
            if position is None:
                position = values[entry.position] = int(np.asarray(inputs[entry.position]).reshape(-1)[0])
            if not 0 <= position < entry.slots:
                raise RunnerError(f"{self.partition}: decode_attention node {entry.node}: position {position} is "
                                  f"outside the {entry.slots} slots [0, {entry.slots}) of cache {entry.input!r}")
            found.append(position)
        return found

    def bind(self, inputs: dict[str, np.ndarray], bind_input, bind_output) -> list:
        """Bind every in-place output for a call on ``inputs`` (the arrays bound as the inputs, C-contiguous);
        returns what ``restore`` takes after the call."""
        positions = self.positions(inputs)
        private = self._shared(inputs)
        saved = []
        for (name, entry), position in zip(self.entries, positions):
            array = inputs[entry.input]
            if entry.input in private or not array.flags.writeable:
                array = np.array(array, copy=True)      # this call's own copy: the caller's is never written
                bind_input(entry.input, array)
            else:
                saved.append((array, position, array[:, :, position].copy()))
            if self._bound.get(name) is not array:
                bind_output(name, array)
                self._bound[name] = array
        return saved

    def _shared(self, inputs: dict[str, np.ndarray]) -> set[str]:
        """Cache inputs whose memory overlaps another input's (written in place, the other would see it). The
        same array objects as the last call's (a generator's cache views) hold the same memory: not checked
        again."""
        arrays = list(inputs.values())
        if len(arrays) == len(self._checked) and all(a is b for a, b in zip(arrays, self._checked)):
            return self._overlapping
        self._checked = arrays
        spans = sorted((_span(a), n) for n, a in inputs.items() if a.nbytes)
        shared, reach, reacher = set(), -1, None   # the furthest end so far, and whose it is
        for (start, end), name in spans:
            if start < reach:
                shared |= {name, reacher}
            if end > reach:
                reach, reacher = end, name
        self._overlapping = shared & self.inputs
        return self._overlapping

    @staticmethod
    def restore(saved: list) -> None:
        for array, position, old in saved:
            array[:, :, position] = old


class CpuPartition:
    """A loaded CPU partition: an ONNX Runtime session with its weights, run through IOBinding."""

    host_inputs = False

    def __init__(self, model: bytes, weights: dict[str, np.ndarray], input_names: list[str],
                 output_names: list[str], threads: int | None = None, name: str = "partition",
                 providers: list[str] | None = None, spin: bool | str = True,
                 views: dict[str, ViewOutput] | None = None, bind_packed: bool = False,
                 inplace: dict[str, InPlaceOutput] | None = None):
        """``model``: checked already (``check_partition_model``), which also gives ``views``: the outputs
        bound as views of their buffers in another shape, and ``inplace``: the outputs written into an input's
        own buffer (``InPlaceSlots``). ``bind_packed``: bind GEMM weights too (never copied, never packed: see
        ``PACKING_OPS``)."""
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads or _cores()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        if spin == "call":  # spin while a call runs, sleep when it returns: the next call is not near, and a
            # thread spinning on after it would take a core from whatever runs next (a decode step after a
            # prefill ran at half speed: 54 against 28 ms)
            options.add_session_config_entry("session.force_spinning_stop", "1")
        elif not spin:  # several sessions share the cores: idle threads sleep instead of spinning
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if _shared_cpu_arena():
            options.add_session_config_entry("session.use_env_allocators", "1")
        model, bound = bind_large_weights(model, weights, packed_too=bind_packed)
        # weights bound as inputs (read where they lie); the others handed over as initializers (ORT copies them)
        self.bound_weights = {n: np.ascontiguousarray(weights[n]) for n in bound}
        handed = [n for n in weights if n not in self.bound_weights]
        self._keep = [np.ascontiguousarray(weights[n]) for n in handed]
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._keep]
        if values:
            options.add_external_initializers(handed, values)
        try:
            self.session = ort.InferenceSession(model, options, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:
            raise RunnerError(f"ONNX Runtime cannot load {name}: {str(exc).strip().splitlines()[0]}") from None
        self.input_names = input_names
        self.output_names = output_names
        self.binding = self.session.io_binding()
        types = [t.type for t in list(self.session.get_inputs()) + list(self.session.get_outputs())]
        self.bindable = all("string" not in t for t in types)  # IOBinding takes numeric tensors only
        for name, array in self.bound_weights.items():   # bound once: run() rebinds only the partition's inputs
            self.binding.bind_input(name, "cpu", 0, array.dtype.type, array.shape, array.ctypes.data)
        self.name = name
        views = views or {}
        self.view_shapes = {n: v.shape for n, v in views.items()}   # outputs bound as views in these shapes
        self.view_nbytes = {n: v.nbytes for n, v in views.items()}
        self.ir_shapes = {n: v.ir_shape for n, v in views.items()}
        self.inplace_outputs = dict(inplace or {})
        self.inplace = InPlaceSlots(name, self.inplace_outputs) if inplace else None

    def run_dynamic(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """For shapes known only at run time: ONNX Runtime allocates the outputs (an in-place output too: then
        its cache is copied, never written)."""
        if self.inplace is not None:
            self.inplace.positions(inputs)
        results = self.session.run(self.output_names, {**{n: inputs[n] for n in self.input_names},
                                                       **self.bound_weights})
        return {n: r.reshape(self.ir_shapes[n]) if n in self.ir_shapes else r
                for n, r in zip(self.output_names, results)}

    def run(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Read ``inputs`` and write the results into the preallocated ``outputs`` arrays (no copies)."""
        if not self.bindable:
            if self.inplace is not None:
                self.inplace.positions(inputs)
            results = self.session.run(self.output_names, {**{n: inputs[n] for n in self.input_names},
                                                           **self.bound_weights})
            for name, result in zip(self.output_names, results):
                outputs[name][...] = result.reshape(outputs[name].shape)
            return
        binding = self.binding
        bound = {}
        for name in self.input_names:
            array = inputs[name]
            if not array.flags.c_contiguous:  # ONNX Runtime reads shape x itemsize bytes from the pointer
                array = inputs[name] = np.ascontiguousarray(array)
            binding.bind_input(name, "cpu", 0, array.dtype.type, array.shape, array.ctypes.data)
            bound[name] = array
        for name in self.output_names:
            array = outputs[name]
            shape = self.view_shapes.get(name, array.shape)  # a view of the same contiguous buffer
            if not array.flags.c_contiguous or array.nbytes != self.view_nbytes.get(name, array.nbytes):
                raise RunnerError(f"{self.name}: output {name!r} would be written as {list(shape)} "
                                  f"({self.view_nbytes.get(name, array.nbytes)} bytes) into a "
                                  f"{'non-contiguous ' if not array.flags.c_contiguous else ''}buffer of "
                                  f"{array.nbytes} bytes")
            binding.bind_output(name, "cpu", 0, array.dtype.type, shape, array.ctypes.data)
        if self.inplace is None:
            self.session.run_with_iobinding(binding)
            return
        saved = self.inplace.bind(
            bound, lambda n, a: binding.bind_input(n, "cpu", 0, a.dtype.type, a.shape, a.ctypes.data),
            lambda n, a: binding.bind_output(n, "cpu", 0, a.dtype.type, a.shape, a.ctypes.data))
        try:
            self.session.run_with_iobinding(binding)
        finally:
            self.inplace.restore(saved)

    def fixed_binding(self) -> "FixedBinding":
        """An IOBinding of its own on this session, for the lean call path (``runtime.prebound``)."""
        return FixedBinding(self)


class FixedBinding:
    """An IOBinding kept across calls: what is bound stays bound, and a call runs the session on it.

    Its own binding, not the partition's: the executor's checked path rebinds that one on every call, and
    must not move what this one holds. ONNX Runtime's Python wrappers rebuild the device object and check
    the session on every bind and run; their C handles, when this ONNX Runtime has them, do not."""

    def __init__(self, partition: CpuPartition, c_handles: bool = True):
        import onnxruntime as ort
        self.partition = partition
        binding = partition.session.io_binding()
        self._c_binding = getattr(binding, "_iobinding", None) if c_handles else None
        self._c_session = getattr(partition.session, "_sess", None) if c_handles else None
        self._c_device = ort.OrtDevice.make("cpu", 0)._get_c_device()
        self._binding = binding
        if self._c_binding is None or self._c_session is None:
            self._c_binding = self._c_session = None
            self.run = functools.partial(partition.session.run_with_iobinding, binding)
        else:  # run(): the session on what is bound, called straight into ONNX Runtime's C++ (no Python frame)
            self.run = functools.partial(self._c_session.run_with_iobinding, self._c_binding, None)
        for name, array in partition.bound_weights.items():   # (the partition keeps them alive)
            self.bind_input(name, array)

    def bind_input(self, name: str, array: np.ndarray) -> None:
        """``array`` (C-contiguous) is read by every run until bound again; the caller keeps it alive."""
        if self._c_binding is None:
            self._binding.bind_input(name, "cpu", 0, array.dtype.type, array.shape, array.ctypes.data)
            return
        self._c_binding.bind_input(name, self._c_device, array.dtype.type, array.shape, array.ctypes.data)

    def bind_output(self, name: str, array: np.ndarray) -> None:
        """Every run writes output ``name`` into ``array`` (in the shape ONNX Runtime gives it, when the
        partition binds it as a view of another shape)."""
        partition = self.partition
        shape = partition.view_shapes.get(name, array.shape)
        if not array.flags.c_contiguous or array.nbytes != partition.view_nbytes.get(name, array.nbytes):
            raise RunnerError(f"{partition.name}: output {name!r} would be written as {list(shape)} into a "
                              f"buffer of {array.nbytes} bytes")
        if self._c_binding is None:
            self._binding.bind_output(name, "cpu", 0, array.dtype.type, shape, array.ctypes.data)
            return
        self._c_binding.bind_output(name, self._c_device, array.dtype.type, shape, array.ctypes.data)


@register_runner("cpu")
def load_cpu(part, executor):
    """ONNX Runtime for a CPU partition; the interpreter, stated, where ONNX Runtime has no kernel."""
    exotic = [v.name for v in list(part.graph.inputs) + list(part.graph.outputs)
              if v.type is not None and v.type.dtype.value not in ORT_BINDABLE]
    if exotic:
        executor.fallbacks.append(f"partition {part.index} ({part.file}): ONNX Runtime cannot exchange "
                                  f"{executor.types[exotic[0]].dtype.value} tensors ({exotic[0]}); it runs on the "
                                  "reference interpreter")
        return InterpreterRunner(Interpreter(part.graph), part.output_names, executor.copy_into)
    weights = {n: w.data for n, w in part.graph.weights.items() if not inline_weight(w)}
    views, inplace = check_partition_model(part.onnx_bytes, part, weights)  # before ONNX Runtime reads a byte
    alone = sum(p.backend == "cpu" for p in executor.partitions) == 1
    chosen = getattr(executor, "spin", None)  # (a loader context other than the Executor may not say)
    spin = alone if chosen is None else chosen
    budgeted = any(p.backend == "flash" for p in executor.partitions)   # compiled under a DRAM budget
    try:
        return CpuPartition(part.onnx_bytes, weights, part.input_names, part.output_names, executor.threads,
                            name=part.file, spin=spin, views=views, bind_packed=budgeted, inplace=inplace)
    except RunnerError as exc:
        if "NOT_IMPLEMENTED" not in str(exc):
            raise
        executor.fallbacks.append(f"partition {part.index} ({part.file}): ONNX Runtime has no kernel for it "
                                  f"({str(exc).split('NOT_IMPLEMENTED : ')[-1][:120]}); it runs on the reference "
                                  "interpreter")
        return InterpreterRunner(Interpreter(part.graph), part.output_names, executor.copy_into)


def _cores() -> int:
    import os
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
