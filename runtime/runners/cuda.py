"""Runner ``cuda``: a GPU partition's PyTorch program on a CUDA GPU, captured in a CUDA graph.

Kernels: Triton kernels that TorchInductor generates at the first call
(``triton``), or PyTorch's own (``torch``). The GPU's memory space is one CUDA
buffer laid out from the memory plan. Torch is imported here only, lazily: the
rest of the runtime never imports it.
"""
from __future__ import annotations

import numpy as np

from hetflow.ir.interpreter import Interpreter

from . import RunnerError, register_runner
from .interpreter import InterpreterRunner

TORCH_DTYPES = {"f16": lambda t: t.float16, "bf16": lambda t: t.bfloat16, "f32": lambda t: t.float32,
                "f64": lambda t: t.float64, "i8": lambda t: t.int8, "i16": lambda t: t.int16,
                "i32": lambda t: t.int32, "i64": lambda t: t.int64, "u8": lambda t: t.uint8,
                "bool": lambda t: t.bool}


@register_runner("cuda")
def load_cuda(part, executor):
    """A GPU partition's PyTorch program on the CUDA GPU; on the CPU only when the run asks (--fallback cpu)."""
    where = f"partition {part.index} ({part.file})"
    kernels = executor.gpu_kernels
    if cuda_available():
        device = "cuda"
        memory = executor.memory_of(part.device)
        if all(p.backend == "cuda" or executor.memory_of(p.device) != memory for p in executor.partitions
               if not p.device.startswith("link:")):
            executor.device_memories.add(memory)  # the GPU's own memory: its arena lives there
    elif executor.fallback == "cpu":
        if not torch_installed():
            executor.fallbacks.append(f"{where} was compiled for device {part.device!r} (CUDA); torch is not "
                                      "installed, so it runs on the reference interpreter (--fallback cpu)")
            return InterpreterRunner(Interpreter(part.graph), part.output_names, executor.copy_into)
        executor.fallbacks.append(f"{where} was compiled for device {part.device!r} (CUDA); its PyTorch program "
                                  "runs on the CPU (--fallback cpu)")
        device, kernels = "cpu", "torch"
    else:
        raise RunnerError(f"{where} runs on device {part.device!r} (CUDA), but this machine has no CUDA "
                          "GPU that PyTorch can use; run with --fallback cpu to run it on the CPU instead")
    weights = {n: w.data for n, w in part.graph.weights.items()}
    if part.source is None:
        raise RunnerError(f"{where} has no program")
    # part.source is hetflow's emitter output: emitted by this process's compile, or regenerated from graph.json
    # at load by runners.read_partitions, which refuses a stored program that differs
    return GpuPartition(part.source, weights, part.input_names, part.output_names, name=where,
                        kernels=kernels, device=device)


# --- running -----------------------------------------------------------------------------------------

def torch_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("torch") is not None


def cuda_available() -> bool:
    """A CUDA GPU that PyTorch can use (False, not an error, without torch)."""
    if not torch_installed():
        return False
    import torch
    return torch.cuda.is_available()


def device_arena(nbytes: int):
    """One CUDA buffer for a memory space of the plan (CUDA allocations are 512-byte aligned)."""
    import torch
    return torch.zeros(nbytes, dtype=torch.uint8, device="cuda")


def arena_view(arena, offset: int, nbytes: int, dtype: str, shape):
    """The slot [offset, offset + nbytes) of a device arena as a tensor of the IR ``dtype`` and ``shape``."""
    import torch
    return arena[offset:offset + nbytes].view(TORCH_DTYPES[dtype](torch)).reshape(shape)


def to_torch(array: np.ndarray, device):
    import torch
    array = np.asarray(array)
    if not array.flags.c_contiguous or not array.flags.writeable:  # (np.ascontiguousarray makes 0-d arrays 1-d)
        array = np.array(array, order="C")
    if array.dtype.name == "bfloat16":  # ml_dtypes' bf16: hand over the bits
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).to(device)
    return torch.from_numpy(array).to(device)


def to_numpy(tensor) -> np.ndarray:
    import torch
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        from ml_dtypes import bfloat16
        return tensor.view(torch.int16).numpy().view(bfloat16)
    return tensor.numpy()


def copy_into(destination, source) -> None:
    """destination[...] = source across NumPy arrays and torch tensors (CPU or GPU), no temporary on the way."""
    if isinstance(destination, np.ndarray):
        if isinstance(source, np.ndarray) or np.isscalar(source):
            destination[...] = source
        else:
            destination[...] = to_numpy(source)
        return
    if isinstance(source, np.ndarray):
        source = to_torch(source, "cpu")
    destination.copy_(source)


def _float32_convolutions():
    """cuDNN without TF32: PyTorch lets convolutions round f32 inputs to TF32 by default (about 1e-3
    relative error); the IR's f32 means f32, so the programs run (and are captured) without it."""
    import torch
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                       allow_tf32=False)


class GpuPartition:
    """A loaded GPU partition: its program on a device, weights resident, captured into a CUDA graph."""

    host_inputs = False

    def __init__(self, source: str, weights: dict[str, np.ndarray], input_names: list[str],
                 output_names: list[str], name: str = "partition", kernels: str = "triton",
                 device: str = "cuda", cuda_graph: bool = True):
        import torch
        if kernels not in ("triton", "torch"):
            raise RunnerError(f"{name}: unknown GPU kernels {kernels!r} (triton or torch)")
        namespace: dict = {}
        try:
            # the source is hetflow's own emitter output (regenerated at load by ``read_partitions``, or
            # emitted in this process), never program text read from an artifact
            exec(compile(source, name, "exec"), namespace)  # noqa: S102
        except SyntaxError as exc:
            raise RunnerError(f"{name}: the emitted program does not parse: {exc}") from None
        self.name = name
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" and "cuda:0" must compare equal
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.input_names = input_names
        self.output_names = output_names
        if namespace.get("INPUTS") != list(input_names) or namespace.get("OUTPUTS") != list(output_names):
            raise RunnerError(f"{name}: the program's inputs and outputs do not match the manifest's")
        self.weights = [to_torch(weights[n], self.device) for n in namespace["WEIGHTS"]]
        self.constants = [to_torch(np.array(c["values"], dtype=c["dtype"]).reshape(c["shape"]), self.device)
                          for c in namespace["CONSTANTS"]]
        self.program = namespace["run"]
        self.function = self.program if kernels == "torch" else None  # triton: compiled at the first call
        self.kernels = kernels
        self.use_graph = cuda_graph and self.device.type == "cuda"
        self.on_gpu = self.device.type == "cuda"  # its inputs are best staged in device memory
        self.graph = None
        self.staged: dict[str, object] = {}   # device copies of inputs that arrive in host memory
        self.bound: dict[str, object] = {}    # the arena tensors the graph was captured with
        self.note = ""

    def _arguments(self, inputs: dict) -> list:
        import torch
        arguments = []
        for name in self.input_names:
            value = inputs[name]
            if isinstance(value, torch.Tensor) and value.device == self.device:
                arguments.append(value)
                continue
            if self.device.type == "cpu" and isinstance(value, np.ndarray):
                arguments.append(to_torch(value, "cpu"))  # a view, no copy
                continue
            staged = self.staged.get(name)
            source = value if isinstance(value, torch.Tensor) else to_torch(value, "cpu")
            if staged is None:
                staged = self.staged[name] = torch.empty(source.shape, dtype=source.dtype, device=self.device)
            staged.copy_(source, non_blocking=False)
            arguments.append(staged)
        return arguments + self.weights + self.constants

    def _compile(self, arguments: list) -> None:
        """Triton kernels for the program: torch.fx traces it, TorchInductor compiles the graph for these
        argument shapes and devices (Triton on a GPU, C++ on the CPU). No guards, no recompiles: the
        shapes are static and the runtime always passes the same buffers."""
        import torch._inductor
        import torch.fx
        try:
            traced = torch.fx.symbolic_trace(self.program)
            self.function = torch._inductor.compile(traced, arguments)
        except Exception as exc:  # noqa: BLE001  (reported as the partition's, with the cause)
            raise RunnerError(f"{self.name}: TorchInductor could not compile the program: {type(exc).__name__}: "
                               f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc

    def _step(self, arguments: list, outputs: dict) -> None:
        if self.function is None:
            self._compile(arguments)
        with _float32_convolutions():
            results = self.function(*arguments)
        for name, result in zip(self.output_names, results):
            copy_into(outputs[name], result)

    def run(self, inputs: dict, outputs: dict) -> None:
        """Read ``inputs`` and write the results into the preallocated ``outputs`` (arrays or tensors)."""
        import torch
        arguments = self._arguments(inputs)
        if self.function is None:
            self._compile(arguments)
        if not self.use_graph or not all(isinstance(outputs[n], torch.Tensor) and outputs[n].device == self.device
                                         for n in self.output_names):
            with torch.inference_mode():
                self._step(arguments, outputs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return
        bound = {n: arguments[i] for i, n in enumerate(self.input_names)}
        bound.update({f"out:{n}": outputs[n] for n in self.output_names})
        if self.graph is None or any(bound[k].data_ptr() != self.bound[k].data_ptr() for k in bound):
            self._capture(arguments, outputs)
            self.bound = bound
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.inference_mode():
                self._step(arguments, outputs)
        torch.cuda.synchronize(self.device)

    def _capture(self, arguments: list, outputs: dict) -> None:
        """Warm up (compiling the Triton kernels), then capture one call into a CUDA graph."""
        import torch
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(2):
                self._step(arguments, outputs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.inference_mode(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._step(arguments, outputs)
        except Exception as exc:  # noqa: BLE001  (the partition then runs uncaptured, and says so)
            self.graph = None
            self.use_graph = False
            self.note = (f"{self.name}: not captured in a CUDA graph ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); it runs op by op")
            return
        self.graph = graph

    def run_dynamic(self, inputs: dict) -> dict[str, np.ndarray]:
        import torch
        outputs = {}
        arguments = self._arguments(inputs)
        if self.function is None:
            self._compile(arguments)
        with torch.inference_mode(), _float32_convolutions():
            results = self.function(*arguments)
        for name, result in zip(self.output_names, results):
            outputs[name] = to_numpy(result)
        return outputs
