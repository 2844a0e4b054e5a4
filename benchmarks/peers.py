"""The peers that ``benchmarks/e2e.py`` measures hetflow against, and the timing helper.

Each ``prepare_*`` function takes a torch module and its example inputs (or an ONNX
file) and returns ``(run, info)``: ``run()`` executes the model once on the example
inputs and returns its first output as a NumPy array; ``info`` holds what was measured
while preparing (compile or export seconds, which exporter was used). Every peer runs
with ``THREADS`` intra-op threads (torch, ONNX Runtime, TVM).

Import this module before numpy/torch/tvm are imported elsewhere, or call
``set_threads`` first: the thread-count environment variables are read at import.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

THREADS = 2
SPIN = True  # False: worker threads sleep instead of spinning while idle (for a loaded machine)


def set_threads(n: int, spin: bool = True) -> None:
    """Set the thread count for every peer (env vars for BLAS/OpenMP/TVM, then torch).

    ``spin=False`` makes idle worker threads sleep rather than spin (OMP_WAIT_POLICY=PASSIVE for
    torch eager and inductor's OpenMP, ORT's allow_spinning=0, TVM_THREAD_POOL_SPIN_COUNT=0): on a
    machine whose other processes keep the cores busy, spinning threads slow every op down many
    times over. Takes effect only if called before torch is imported.
    """
    global THREADS, SPIN
    THREADS, SPIN = n, spin
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TVM_NUM_THREADS"):
        os.environ[var] = str(n)
    if not spin:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = "0"
    import torch
    torch.set_num_threads(n)


def _first(out):
    """The first tensor of a model output, as a NumPy array."""
    import numpy as np
    import torch
    while isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if isinstance(out, torch.Tensor):
        return out.detach().cpu().numpy()
    if hasattr(out, "numpy"):
        return out.numpy()
    return np.asarray(out)


def flat_tensors(inputs):
    """The example inputs flattened to a list of torch tensors (pytree order)."""
    import torch
    from torch.utils import _pytree as pytree
    flat, _ = pytree.tree_flatten(tuple(inputs))
    return [t for t in flat if isinstance(t, torch.Tensor)]


def measure(run, warmup: int, repeat: int, budget_s: float, min_repeat: int = 3) -> dict:
    """Median wall time of ``run()`` in ms after warm-up.

    ``repeat`` runs at most, fewer when ``repeat`` runs would exceed ``budget_s`` (estimated
    from the warm-up), but never fewer than ``min_repeat``. A slow first call (over 2 s)
    cuts the warm-up to that one call.
    """
    times = []
    for i in range(max(1, warmup)):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        if i == 0 and times[0] > 2.0:
            break
    per_call = min(times)
    n = max(min_repeat, min(repeat, int(budget_s / max(per_call, 1e-9))))
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        run()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return {"median_ms": statistics.median(samples) * 1e3, "min_ms": samples[0] * 1e3,
            "max_ms": samples[-1] * 1e3, "runs": n, "warmup": len(times)}


# ---------------------------------------------------------------- torch
def prepare_eager(module, inputs):
    import torch
    module.eval()

    def run():
        with torch.no_grad():
            return module(*inputs)
    return (lambda: _first(run())), {}


def prepare_inductor(module, inputs):
    """torch.compile with inductor; the first call (compilation included) is timed as compile time."""
    import torch
    torch._dynamo.reset()
    module.eval()
    compiled = torch.compile(module, backend="inductor")

    def run():
        with torch.no_grad():
            return compiled(*inputs)
    t0 = time.perf_counter()
    run()
    return (lambda: _first(run())), {"compile_s": time.perf_counter() - t0}


# ---------------------------------------------------------------- ONNX export
def export_onnx(module, inputs, path: Path) -> dict:
    """torch.onnx.export with dynamo=True, falling back to dynamo=False; returns what was used."""
    import torch
    module.eval()
    errors = []
    for dynamo in (True, False):
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                if dynamo:
                    torch.onnx.export(module, tuple(inputs), str(path), dynamo=True, external_data=False)
                else:
                    torch.onnx.export(module, tuple(inputs), str(path), dynamo=False, opset_version=17)
            return {"exporter": "dynamo" if dynamo else "torchscript", "export_s": time.perf_counter() - t0,
                    "errors": errors}
        except Exception as exc:  # noqa: BLE001 - any export failure means: try the other exporter
            errors.append(f"dynamo={dynamo}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise RuntimeError("ONNX export failed: " + " | ".join(errors))


def _onnx_feeds(input_names, inputs):
    tensors = flat_tensors(inputs)
    if len(tensors) != len(input_names):
        raise RuntimeError(f"ONNX model takes {len(input_names)} inputs, module has {len(tensors)} tensors")
    return {name: t.detach().cpu().numpy() for name, t in zip(input_names, tensors)}


# ---------------------------------------------------------------- ONNX Runtime
def prepare_ort(onnx_path: Path, inputs):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not SPIN:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    setup = time.perf_counter() - t0
    feeds = _onnx_feeds([i.name for i in sess.get_inputs()], inputs)
    first = sess.get_outputs()[0].name
    return (lambda: sess.run([first], feeds)[0]), {"session_s": setup}


# ---------------------------------------------------------------- TVM (untuned, LLVM)
def prepare_tvm(onnx_path: Path, inputs):
    """apache-tvm 0.27: relax ONNX frontend, tvm.compile(target="llvm"), relax.VirtualMachine. Untuned."""
    os.environ["TVM_NUM_THREADS"] = str(THREADS)
    import onnx
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx
    t0 = time.perf_counter()
    model = onnx.load(str(onnx_path))
    names = [i.name for i in model.graph.input
             if i.name not in {init.name for init in model.graph.initializer}]
    feeds = _onnx_feeds(names, inputs)
    shape_dict = {k: list(v.shape) for k, v in feeds.items()}
    dtype_dict = {k: str(v.dtype) for k, v in feeds.items()}
    mod = from_onnx(model, shape_dict=shape_dict, dtype_dict=dtype_dict, keep_params_in_input=False)
    del model
    exe = tvm.compile(mod, target="llvm")
    dev = tvm.cpu()
    vm = relax.VirtualMachine(exe, dev)
    args = [tvm.runtime.tensor(feeds[n], dev) for n in names]
    main = vm["main"]
    setup = time.perf_counter() - t0

    def run():
        out = main(*args)
        while not hasattr(out, "numpy"):  # a tuple output comes back as a TVM Array
            out = out[0]
        return out.numpy()
    return run, {"compile_s": setup}


# ---------------------------------------------------------------- hetflow
def prepare_hetflow_torch_compile(module, inputs, platform: str = "host"):
    """torch.compile(module, backend=hetflow.backend(platform=...)); the first call (dynamo, aot_autograd and
    the hetflow compile) is timed as compile time."""
    import torch

    import hetflow
    torch._dynamo.reset()
    module.eval()
    backend = hetflow.backend(platform=platform)
    compiled = torch.compile(module, backend=backend)

    def run():
        with torch.no_grad():
            return compiled(*inputs)
    t0 = time.perf_counter()
    run()
    return (lambda: _first(run())), {"compile_s": time.perf_counter() - t0, "graphs": len(backend.compiled)}


def prepare_hetflow(module, inputs, platform: str = "host", cpu_backend: str = "onnxruntime", cache_dir=None):
    """hetflow.compile(module, inputs, platform=..., cpu_backend=...): whatever hetflow does when called.

    Without ``cache_dir`` the compile cache is off (``compile_s`` is a compile from nothing). With ``cache_dir``
    (an empty directory) the first compile is cold and stores its artifact there (``compile_s`` includes the
    key and the store), then the same compile again is timed as ``cached_compile_s`` and its outputs are checked
    equal to the cold one's."""
    import numpy as np

    import hetflow
    t0 = time.perf_counter()
    compiled = hetflow.compile(module, inputs, platform=platform, cpu_backend=cpu_backend,
                               cache=cache_dir is not None, cache_dir=cache_dir)
    compile_s = time.perf_counter() - t0
    info = {"compile_s": compile_s, "timings_s": dict(compiled.timings), "cache": compiled.cache.status}
    if cache_dir is not None:
        t0 = time.perf_counter()
        cached = hetflow.compile(module, inputs, platform=platform, cpu_backend=cpu_backend, cache=True,
                                 cache_dir=cache_dir)
        info["cached_compile_s"] = time.perf_counter() - t0
        info["cached_status"] = cached.cache.status
        info["cached_timings_s"] = dict(cached.timings)
        if cached.cache.status != "hit":
            raise RuntimeError(f"the second compile did not hit the compile cache: {cached.cache.status}")
        if not np.array_equal(_first(cached(*inputs)), _first(compiled(*inputs))):
            raise RuntimeError("the cached compile's outputs differ from the cold compile's")
    if compiled.schedule is not None:
        info["predicted_ms"] = compiled.schedule.makespan * 1e3  # modelled by the calibrated host platform
    return (lambda: _first(compiled(*inputs))), info
