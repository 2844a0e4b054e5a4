"""``hetflow.compile``: a torch module or an ONNX model in, a callable with the model's signature out."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hetflow.ir import Graph, verify
from hetflow.ir.errors import HetflowError

class CompileError(HetflowError):
    pass


def _is_torch_module(model: Any) -> bool:
    torch = sys.modules.get("torch")  # a torch module exists only if torch is imported: never import it here
    return torch is not None and isinstance(model, torch.nn.Module)


def _check_platform(platform):
    """The Platform for a preset name, a .toml path or a Platform (errors name what is wrong)."""
    from hetflow.platform import Platform, load_platform
    return platform if isinstance(platform, Platform) else load_platform(platform)


def capture(model: Any, example_inputs: Sequence[Any] | None = None, dynamic_shapes: Any = None,
            timings: dict[str, float] | None = None):
    """The model as IR: returns ``(graph, torch_capture_or_None)``. ``dynamic_shapes``: torch.export's own
    form for a torch module; for an ONNX model, each dim_param's name -> a ``torch.export.Dim`` or a
    ``(min, max)`` pair. ``timings`` receives the seconds of each capture step."""
    timings = {} if timings is None else timings
    if _is_torch_module(model):
        if example_inputs is None:
            raise CompileError("a torch module needs example_inputs (a tuple of tensors)")
        from hetflow.frontends.torch import capture_module
        if not isinstance(example_inputs, (tuple, list)):
            example_inputs = (example_inputs,)
        captured = capture_module(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes, timings=timings)
        if captured.unbounded_sizes:
            name = captured.unbounded_sizes[0]
            raise CompileError(f"dynamic size {name!r} has no finite max: the memory plan is made for the declared "
                               f"maximum, so give one (torch.export.Dim({name!r}, max=...))")
        return captured.graph, captured
    import onnx
    if isinstance(model, (onnx.ModelProto, bytes, str, Path)):
        from hetflow.frontends.onnx import import_onnx
        start = time.perf_counter()
        graph = import_onnx(model, dynamic_shapes=onnx_dim_ranges(dynamic_shapes))
        timings["capture: onnx import"] = time.perf_counter() - start
        return graph, None
    raise CompileError(f"cannot compile a {type(model).__name__}: give a torch.nn.Module, an onnx.ModelProto "
                       "or a path to a .onnx file")


def onnx_dim_ranges(dynamic_shapes: Any) -> dict[str, tuple[int, int]] | None:
    """``{dim_param: Dim or (min, max)}`` as ``{name: (min, max)}``; a Dim without a max is an error."""
    if dynamic_shapes is None:
        return None
    if not isinstance(dynamic_shapes, dict):
        raise CompileError("dynamic_shapes for an ONNX model is a dict: each dim_param's name -> "
                           "torch.export.Dim(name, min=..., max=...) or (min, max)")
    ranges = {}
    for name, spec in dynamic_shapes.items():
        if isinstance(spec, (tuple, list)) and len(spec) == 2:
            low, high = spec
        else:
            low, high = getattr(spec, "min", None), getattr(spec, "max", None)
        if not isinstance(low, int) or not isinstance(high, int) or not 0 <= low <= high <= 2 ** 40:
            raise CompileError(f"dynamic size {name!r}: give its range as (min, max) or Dim({name!r}, min=..., "
                               f"max=...) with 0 <= min <= max (got {spec!r}); the memory plan is made for the max")
        ranges[str(name)] = (low, high)
    return ranges


# the manifest fields write_artifact writes itself (the rest are a compiled model's ``manifest_extra``)
WRITTEN_BY_WRITE_ARTIFACT = ("schema", "hetflow", "created", "platform", "graph", "inputs", "outputs", "files")


class CompiledModel:
    """What ``hetflow.compile`` returns: call it like the model; ``report()`` says what was built."""

    def __init__(self, graph: Graph, platform, torch_capture=None, compile_seconds: float = 0.0, options=None,
                 cpu_backend: str = "onnxruntime", gpu_kernels: str = "triton"):
        self.graph = graph
        self.gpu_kernels = gpu_kernels
        self.cpu_backend = cpu_backend
        self.platform = platform
        self.options = options
        self.placement = options.results.get("placement") if options else None
        self.schedule = options.results.get("schedule") if options else None
        self.memory_plan = options.results.get("memory_plan") if options else None
        self.quantization = options.results.get("quantization") if options else None  # QuantizationReport
        self.flash_plan = options.results.get("flash_plan") if options else None      # FlashTiling
        self.partitions = None
        self._executor = None
        self.compile_seconds = compile_seconds
        self._torch = torch_capture
        self._weight_versions: list = []   # (name, tensor, version) of the torch module's weights it references
        self.timings: dict[str, float] = {}   # wall seconds per compile stage, in order (``timings_table()``)
        self.cache = None                     # CacheInfo: what the compile cache did (None: not asked)
        self._cached = None                   # (entry, Artifact) when this model was loaded from the cache

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.graph.inputs]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._torch is not None:
            return self._call_torch(args, kwargs)
        feeds = dict(zip(self.input_names, args))
        feeds.update(kwargs)
        outputs = list(self.executor.run({k: np.asarray(v) for k, v in feeds.items()}).values())
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    @property
    def executor(self):
        """The runtime program: ONNX Runtime for CPU partitions, simulators for devices this machine lacks."""
        if self._executor is None and self._cached is not None:
            from hetflow.runtime.executor import Executor
            entry, artifact = self._cached  # a loaded artifact: its plan is checked here, as at any load
            self._executor = Executor(self.graph, self.partitions, self.platform, artifact.manifest.get("memory_plan"),
                                      gpu_kernels=self.gpu_kernels, artifact_digest=artifact.digest)
        if self._executor is None:
            from hetflow.runtime.executor import Executor
            plan = self.memory_plan.as_manifest() if self.memory_plan is not None else None
            # the plan checker ran at the end of this compile (check_plan); an artifact load checks it again
            self._executor = Executor(self.graph, self._build_partitions(), self.platform, plan,
                                      gpu_kernels=self.gpu_kernels, plan_checked=True)
        return self._executor

    def _build_partitions(self):
        if getattr(self, "partitions", None) is None:
            from hetflow.backends import build_partitions
            start = time.perf_counter()
            self.partitions = build_partitions(self.graph, self.platform, self.cpu_backend)
            self.timings["emit partitions"] = time.perf_counter() - start
        return self.partitions

    def timings_table(self) -> str:
        """Wall time per compile stage (capture steps, each pass and the verification after it, the plan check,
        emission, save, the cache), measured in this process."""
        from hetflow.report import timings_table
        return timings_table(self.timings, self.cache)

    def _call_torch(self, args, kwargs):
        import torch
        from torch.utils import _pytree as pytree
        for name, tensor, version in self._weight_versions:
            if tensor._version != version:
                raise CompileError(f"the module's {name} was changed in place after it was compiled: the compiled "
                                   "model reads the module's weights where no pass transformed them, so it would "
                                   "compute with a mix of old and new weights; compile it again")
        if kwargs:
            raise CompileError("keyword arguments are not supported for compiled torch modules yet")
        flat, _ = pytree.tree_flatten(args)
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        names = self._torch.input_names
        if len(tensors) != len(names):
            raise CompileError(f"the compiled module takes {len(names)} tensor inputs, got {len(tensors)}")
        from hetflow.frontends.torch import numpy_to_tensor, tensor_to_numpy
        feeds = {n: tensor_to_numpy(t) for n, t in zip(names, tensors)}  # bf16 as a same-size view, not floats
        device = tensors[0].device if tensors else None  # outputs come back where the inputs were
        outputs = [numpy_to_tensor(o, device) for o in self.executor.run(feeds).values()]
        if self._torch.out_spec is None:
            return outputs[0] if len(outputs) == 1 else tuple(outputs)
        return pytree.tree_unflatten(outputs, self._torch.out_spec)

    def save(self, directory: str | Path, sign_key: str | Path | None = None) -> Path:
        """Write the artifact into ``directory``: built in a fresh directory beside it, then renamed into place
        (an existing artifact there is replaced; anything else there is an error). ``sign_key``: an Ed25519
        private key (PEM) to sign the manifest with (``manifest.sig``)."""
        from hetflow.runtime.artifact import fresh_directory, sign_artifact
        self._build_partitions()
        start = time.perf_counter()
        with fresh_directory(directory) as fresh:
            if self._cached is not None:
                self._write_cached(fresh)
            else:
                self._write(fresh)
            if sign_key is not None:
                sign_artifact(fresh, sign_key)
        self.timings["save"] = time.perf_counter() - start
        return Path(directory)

    def _write_cached(self, directory: Path) -> None:
        """A model loaded from the compile cache, saved as any artifact: the cached partitions' verified bytes,
        the graph with every weight (the module's and the derived ones), the cached manifest's other fields."""
        from hetflow.runtime.artifact import write_artifact
        entry, artifact = self._cached
        written = []
        for part in artifact.manifest.get("partitions", []):
            path = directory / part["file"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(artifact.files[part["file"]])
            written.append(path)
        extra = {k: v for k, v in artifact.manifest.items() if k not in WRITTEN_BY_WRITE_ARTIFACT}
        write_artifact(self.graph, directory, artifact.manifest["platform"], extra, written)

    def _write(self, directory: Path) -> Path:
        from hetflow.backends import write_partitions
        from hetflow.runtime.artifact import write_artifact
        from hetflow.backends.flash import write_flash_image
        written = write_partitions(self.partitions, Path(directory))
        flash_files, streamed = write_flash_image(self.graph, Path(directory))   # the image of streamed FFN layers
        return write_artifact(self.graph, directory, self.platform.name, self.manifest_extra(), written + flash_files,
                              streamed)

    def manifest_extra(self) -> dict:
        """What the manifest says beyond the graph's signature and the files: the platform, the partitions, the
        memory plan, the schedule, the placement, the quantization."""
        extra = {"platform_data": self.platform.raw,
                 "partitions": [p.manifest_entry() for p in self.partitions]}
        if self.memory_plan is not None:
            extra["memory_plan"] = self.memory_plan.as_manifest()
        if self.schedule is not None:
            extra["schedule"] = self.schedule.as_dict()
        if self.quantization is not None:
            q = self.quantization
            extra["quantization"] = {"mode": q.mode, "calibration": q.calibration,
                                     "contractions": [c["node"] for c in q.contractions],
                                     "max_abs_error": q.max_abs_error, "relative_error": q.relative_error}
        if self.placement is not None:
            extra["placement"] = {"policy": self.placement.policy, "chosen": self.placement.chosen,
                                  "solver": self.placement.solver,
                                  "static_makespan_us": {k: v * 1e6 for k, v in self.placement.static_makespan.items()},
                                  "splits": self.placement.splits,
                                  "limit_hit": self.placement.limit_hit, "limit": self.placement.limit}
        return extra

    def report(self, timings: bool = True) -> str:
        """Groups, placement, memory plan, timeline; with ``timings``, the wall time of each compile stage."""
        from hetflow.report import compile_report
        if self._cached is not None:
            entry, artifact = self._cached
            return (entry["report"] + f"\n\nloaded from the compile cache in {self.compile_seconds:.2f} s "
                    f"({artifact.directory.parent}); the compile that stored it took {entry['compile_seconds']:.2f} s")
        return compile_report(self.graph, self.platform, self.placement, self.schedule, self.compile_seconds,
                              self.memory_plan, quantization=self.quantization, flash_plan=self.flash_plan,
                              timings=self.timings if timings else None)


def compile(model: Any, example_inputs: Sequence[Any] | None = None, platform: Any = "host",
            passes: Sequence[str] | str | None = None, placement: str = "roofline",
            devices: Sequence[str] | None = None, time_limit: float = 10.0,
            cpu_backend: str = "onnxruntime", gpu_kernels: str = "triton", dynamic_shapes: Any = None,
            quantize: str | None = None, cost_model: str = "analytic", dram_budget: int | str | None = None,
            flash_predict: bool = False, cache: bool | None = None,
            cache_dir: str | Path | None = None) -> CompiledModel:
    """Compile a torch module (with example inputs) or an ONNX model for ``platform``.

    ``platform`` is a preset name (``hetflow platforms`` lists them), a .toml path or a
    Platform. ``placement`` is roofline, optimal or split; ``devices`` restricts it.
    ``passes`` overrides the pipeline (a list of pass names or "canonicalize,fuse").
    ``cpu_backend`` is what runs the CPU partitions: ``"onnxruntime"`` or ``"tvm"`` (compiled
    here by apache-tvm for LLVM, untuned; a partition TVM cannot compile fails the compile).
    ``gpu_kernels`` is how partitions placed on a CUDA GPU (``host+cuda``) run: ``"triton"``
    (kernels TorchInductor generates) or ``"torch"`` (PyTorch's own), each one CUDA graph replay.
    ``dynamic_shapes``: sizes that vary from call to call, in torch.export's form for a torch
    module (``{"x": {0: Dim("batch", max=4), 1: Dim("seq", min=2, max=128)}}``, every Dim with a
    max), or ``{"batch": (1, 4)}`` by dim_param name for an ONNX model. One compiled model then
    runs every size in the ranges: placement and the memory plan are made for the declared maximum,
    and a call outside the ranges is refused naming the input and dim.
    ``cost_model``: ``"analytic"`` (the roofline model with the papers' quirks) or ``"sim"``: each group
    placement considers for an NPU or PIM is emitted and timed on that device's simulator (cached per
    distinct group), so placement and the simulated run agree; the report says which was used.
    ``quantize="int8"``: the MatMul/Gemm placed on an NPU that runs i8 (mobile-soc, flash-edge) run in int8
    (per-output-channel weights, activations calibrated on ``example_inputs``, else on seeded random
    inputs); the compiled model's error against the reference interpreter on those inputs is measured
    and reported (``report()``, ``CompiledModel.quantization``). A platform without such an NPU is refused.
    ``dram_budget`` (bytes, or "580 MiB"): the DRAM the model may use; feed-forward layers that do not fit
    stream from flash (the tile_flash pass; the platform needs a ``[flash]``: laptop-ssd, flash-edge). Without
    it, the platform's DRAM is the budget when the weights exceed it. ``flash_predict``: stream only the
    neurons a low-rank predictor picks (calibrated on ``example_inputs``; approximate, the report says how).
    A model that streams weights is not kept in the compile cache (its flash image is the artifact's).
    ``cache``: keep the compiled model in the compile cache (``hetflow.compile_cache``: ``cache_dir``, else
    ``$HETFLOW_CACHE_DIR``, else ``~/.cache/hetflow/compile``) under a key of the model's weights, code and
    configuration, the example inputs' shapes, these options and the platform, and load it from there when the
    same compile comes again (None: on unless ``HETFLOW_COMPILE_CACHE=0``). ``CompiledModel.cache`` says
    what happened; a corrupt entry is reported with a warning and compiled afresh.
    Returns a ``CompiledModel``: call it with the model's inputs (torch tensors for a
    torch module, NumPy arrays or keyword arrays by input name for ONNX). ``CompiledModel.timings`` has the
    wall time of each stage (``timings_table()``).
    """
    from hetflow import compile_cache
    _check_backends(cpu_backend, gpu_kernels)
    platform = _check_platform(platform)
    start = time.perf_counter()
    options = dict(passes=passes, placement=placement, devices=devices, time_limit=time_limit,
                   cpu_backend=cpu_backend, gpu_kernels=gpu_kernels, dynamic_shapes=dynamic_shapes,
                   quantize=quantize, cost_model=cost_model, dram_budget=dram_budget, flash_predict=flash_predict)
    cache = compile_cache.default_enabled() if cache is None else cache
    lookup = _cache_lookup(model, example_inputs, platform, options, cache_dir, start) if cache else None
    if isinstance(lookup, CompiledModel):
        return _guard_module_weights(lookup, model)
    timings = dict(lookup.timings) if lookup is not None else {}
    graph, torch_capture = capture(model, example_inputs, dynamic_shapes, timings)
    calibration = _example_feeds(graph, torch_capture, example_inputs) if quantize or flash_predict else None
    compiled = compile_graph(graph, platform, torch_capture, passes, placement, devices, time_limit, cpu_backend,
                             gpu_kernels, start, quantize=quantize, calibration_inputs=calibration,
                             cost_model=cost_model, timings=timings, dram_budget=dram_budget,
                             flash_predict=flash_predict)
    compiled.cache = lookup.info if lookup is not None else compile_cache.CacheInfo("off: cache=False")
    if compiled.flash_plan is not None and compiled.flash_plan.streamed:
        compiled.cache = compile_cache.CacheInfo("off: FFN layers stream from a flash image, which the cache does "
                                                 "not keep")
    elif lookup is not None and lookup.key is not None:
        _cache_store(compiled, lookup, model)
        compiled.compile_seconds = time.perf_counter() - start
    return _guard_module_weights(compiled, model)


def _guard_module_weights(compiled: CompiledModel, model: Any) -> CompiledModel:
    """The compiled model references a torch module's weights (the frontend views them, not copies): remember each
    tensor's in-place version counter, so a call after a weight changed in place is refused (only the weights no
    pass transformed would see the change: a mix of old and new) instead of computing that mix."""
    if compiled._torch is not None and hasattr(model, "named_parameters"):
        tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
        compiled._weight_versions = [(name, t, t._version) for name, t in tensors]
    return compiled


class _Lookup:
    """A cache miss: the key (None when the model cannot be keyed), what the cache said, the key's time."""

    def __init__(self, key, root, info, timings):
        self.key, self.root, self.info, self.timings = key, root, info, timings


def _cache_lookup(model, example_inputs, platform, options, cache_dir, start):
    """The cached ``CompiledModel`` for this compile, or a ``_Lookup`` saying why there is none."""
    import warnings
    from hetflow import compile_cache
    root = compile_cache.cache_directory(cache_dir)
    begin = time.perf_counter()
    why_not = _uncacheable_options(options, platform)
    if why_not is not None:
        return _Lookup(None, root, compile_cache.CacheInfo(f"off: {why_not}"), {})
    try:
        key = compile_cache.compile_key(model, example_inputs, platform, options)
    except compile_cache.Uncacheable as exc:
        return _Lookup(None, root, compile_cache.CacheInfo(f"off: {exc}"), {"cache: key": time.perf_counter() - begin})
    timings = {"cache: key": time.perf_counter() - begin}
    begin = time.perf_counter()
    try:
        found = compile_cache.lookup(root, key, model)
    except compile_cache.CorruptEntry as exc:
        warnings.warn(f"hetflow compile cache: entry {key[:16]}... is corrupt and was not used ({exc}); it is "
                      "removed and the model compiled afresh", RuntimeWarning, stacklevel=3)
        compile_cache.remove(root, key)
        found = None
    if found is None:
        return _Lookup(key, root, compile_cache.CacheInfo("miss", key, root), timings)
    timings["cache: load"] = time.perf_counter() - begin
    return _cached_model(found, platform, options, time.perf_counter() - start, timings,
                         compile_cache.CacheInfo("hit", key, compile_cache.entry_directory(root, key)))


def _uncacheable_options(options: dict, platform) -> str | None:
    """Compiles the cache does not keep: native code (TVM) and CUDA programs are not loaded from a cache."""
    if options["cpu_backend"] != "onnxruntime":
        return f"cpu_backend {options['cpu_backend']!r} builds native libraries, which the cache does not load"
    if any(d.kind == "gpu" and d.measured for d in platform.devices.values()):
        return f"platform {platform.name!r} has a real GPU, whose programs the cache does not keep"
    if os.environ.get("HETFLOW_DUMP_IR"):
        return "HETFLOW_DUMP_IR asks for the IR after each pass"
    return None


def _cached_model(found, platform, options, seconds: float, timings: dict, info) -> CompiledModel:
    """A ``CompiledModel`` on a loaded cache entry: its graph, partitions and plan from the artifact."""
    from hetflow.runtime.runners import read_partitions
    entry, artifact = found
    torch_capture = None
    if entry.get("torch") is not None:
        from hetflow.frontends.torch import TorchCapture
        from torch.utils import _pytree as pytree
        spec = entry["torch"]["out_spec"]
        torch_capture = TorchCapture(None, entry["torch"]["input_names"],
                                     pytree.treespec_loads(spec) if spec is not None else None)
    compiled = CompiledModel(artifact.graph, platform, torch_capture, seconds, None, options["cpu_backend"],
                             options["gpu_kernels"])
    compiled.partitions = read_partitions(artifact.manifest["partitions"], artifact.files, artifact.graph, platform)
    compiled._cached = found
    compiled.timings = timings
    compiled.cache = info
    compiled.pass_records = []
    return compiled


def _cache_store(compiled: CompiledModel, lookup: _Lookup, model: Any) -> None:
    """Keep ``compiled`` under the lookup's key; a failure to store is a warning, the compile stands."""
    import warnings
    from hetflow import compile_cache
    begin = time.perf_counter()
    torch_entry = None
    if compiled._torch is not None:
        from torch.utils import _pytree as pytree
        spec = compiled._torch.out_spec
        try:
            dumped = pytree.treespec_dumps(spec) if spec is not None else None
        except Exception as exc:  # noqa: BLE001  (pytree refuses types without a serialization name)
            compiled.cache = compile_cache.CacheInfo(f"miss (not stored: the output structure cannot be saved: "
                                                     f"{str(exc).splitlines()[0][:100]})", lookup.key)
            return
        torch_entry = {"input_names": compiled._torch.input_names, "out_spec": dumped}
    entry = {"report": compiled.report(), "compile_seconds": compiled.compile_seconds, "torch": torch_entry,
             "timings": compiled.timings}
    try:
        directory = compile_cache.store(lookup.root, lookup.key, compiled, entry, model)
    except (OSError, HetflowError) as exc:
        warnings.warn(f"hetflow compile cache: could not store the compiled model in {lookup.root}: {exc}",
                      RuntimeWarning, stacklevel=3)
        compiled.cache = compile_cache.CacheInfo(f"miss (not stored: {exc})", lookup.key)
        return
    compiled.timings.pop("save", None)  # (the artifact's save is the store's work, counted once)
    compiled.timings["cache: store"] = time.perf_counter() - begin
    compiled.cache = compile_cache.CacheInfo("miss (stored)", lookup.key, directory)


def _example_feeds(graph: Graph, torch_capture, example_inputs) -> list[dict] | None:
    """The example inputs as one calibration sample ``[{graph input name: array}]``; None when there are none."""
    if example_inputs is None:
        return None
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if torch_capture is None:
        return [dict(zip([v.name for v in graph.inputs], (np.asarray(x) for x in example_inputs)))]
    import torch
    from torch.utils import _pytree as pytree
    from hetflow.frontends.torch import tensor_to_numpy
    tensors = [a for a in pytree.tree_flatten(tuple(example_inputs))[0] if isinstance(a, torch.Tensor)]
    return [{n: tensor_to_numpy(t) for n, t in zip(torch_capture.input_names, tensors)}]


def _check_backends(cpu_backend: str, gpu_kernels: str) -> None:
    from hetflow.backends import CPU_BACKENDS
    if cpu_backend not in CPU_BACKENDS:
        raise CompileError(f"cpu_backend {cpu_backend!r} is not one of {', '.join(CPU_BACKENDS)}")
    if gpu_kernels not in ("triton", "torch"):
        raise CompileError(f"gpu_kernels {gpu_kernels!r} is not one of triton, torch")


def compile_graph(graph: Graph, platform: Any = "host", torch_capture=None,
                  passes: Sequence[str] | str | None = None, placement: str = "roofline",
                  devices: Sequence[str] | None = None, time_limit: float = 10.0,
                  cpu_backend: str = "onnxruntime", gpu_kernels: str = "triton",
                  start: float | None = None, quantize: str | None = None,
                  calibration_inputs: list[dict] | None = None, cost_model: str = "analytic",
                  timings: dict[str, float] | None = None, dram_budget: int | str | None = None,
                  flash_predict: bool = False) -> CompiledModel:
    """A captured graph through the pipeline, placement, memory plan and plan check to a ``CompiledModel``:
    the one path ``compile`` and the ``torch.compile`` backend share. ``start``: when capture began (for
    ``compile_seconds``). ``quantize``/``calibration_inputs``: as ``compile``'s (samples of {input name: array})."""
    from hetflow.passes import CompileOptions
    from hetflow.pipeline import run_pipeline
    _check_backends(cpu_backend, gpu_kernels)
    platform = _check_platform(platform)
    _check_quantize(quantize, platform, graph)
    start = time.perf_counter() if start is None else start
    _check_cost_model(cost_model)
    options = CompileOptions(platform, placement, list(devices) if devices else None, time_limit,
                             cost_model=cost_model)
    options.quantize, options.calibration_inputs = quantize, calibration_inputs
    options.dram_budget, options.flash_predict = _dram_budget(dram_budget), bool(flash_predict)
    timings = {} if timings is None else timings
    begin = time.perf_counter()
    verify(graph)
    timings["verify input"] = time.perf_counter() - begin
    _check_dynamic(graph, platform, cpu_backend)
    graph, runner = run_pipeline(graph, passes, options=options)
    for record in runner.records:
        timings[f"pass {record.name}"] = record.seconds
        timings[f"verify after {record.name}"] = record.verify_seconds
    _host_runs_unplaced(graph, platform)
    begin = time.perf_counter()
    check_plan(graph, platform, options.results.get("memory_plan"))
    timings["plan check"] = time.perf_counter() - begin
    compiled = CompiledModel(graph, platform, torch_capture, time.perf_counter() - start, options, cpu_backend,
                             gpu_kernels)
    compiled.timings = timings
    if cpu_backend == "tvm" or any(d.kind == "gpu" and d.measured for d in platform.devices.values()):
        # TVM and the GPU backend emit now, so that a partition they cannot build fails the compile
        compiled._build_partitions()
        compiled.compile_seconds = time.perf_counter() - start
    compiled.pass_records = runner.records
    if quantize and compiled.quantization is None:
        raise CompileError(f"quantize={quantize!r} needs the quantize pass in the pipeline (after place); the passes "
                           f"run were {', '.join(r.name for r in runner.records) or 'none'}")
    if compiled.quantization is not None:
        measure_quantization_error(compiled)
    return compiled


def _dram_budget(budget: int | str | None) -> int | None:
    """Bytes from an int or a quantity ("580 MiB", "2 GiB"); None stays None."""
    if budget is None:
        return None
    if isinstance(budget, str):
        from hetflow.platform import PlatformError, quantity
        try:
            budget = quantity(budget, "bytes", "dram_budget")
        except PlatformError as exc:
            raise CompileError(str(exc).splitlines()[0]) from None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise CompileError(f"dram_budget {budget!r} is not a positive number of bytes (or a quantity: '580 MiB')")
    return int(budget)


def _check_cost_model(cost_model: str) -> None:
    from hetflow.passes.cost import COST_MODELS
    if cost_model not in COST_MODELS:
        raise CompileError(f"cost_model {cost_model!r} is not one of {', '.join(COST_MODELS)}")


def _check_quantize(quantize: str | None, platform, graph: Graph) -> None:
    """An unknown mode, a platform without an NPU that runs i8, or dynamic sizes: one line, before any pass."""
    from hetflow.passes.quantize import check_quantize
    try:
        check_quantize(quantize, platform)
    except HetflowError as exc:
        raise CompileError(str(exc)) from None
    if quantize and graph.dims:
        raise CompileError(f"quantize={quantize!r} calibrates on inputs of one size; this graph has dynamic sizes: "
                           "compile it without dynamic_shapes")


def measure_quantization_error(compiled: CompiledModel) -> None:
    """The accuracy loss of int8: the compiled model against the reference interpreter (the float graph) on the
    calibration inputs, into ``compiled.quantization`` (max abs error; that over the output's largest
    magnitude, the worst output)."""
    from hetflow.ir.interpreter import run_graph
    report = compiled.quantization
    worst_abs = worst_rel = 0.0
    for sample in report.samples:
        got = list(compiled.executor.run(dict(sample)).values())
        want = run_graph(compiled.graph, sample)
        for g, w in zip(got, want):
            w = np.asarray(w)
            if w.dtype.kind != "f":
                continue
            error = float(np.max(np.abs(np.asarray(g, np.float64) - w.astype(np.float64)))) if w.size else 0.0
            scale = float(np.max(np.abs(w.astype(np.float64)))) if w.size else 0.0
            worst_abs = max(worst_abs, error)
            worst_rel = max(worst_rel, error / scale if scale > 0 else error)
    report.max_abs_error, report.relative_error = worst_abs, worst_rel


def _check_dynamic(graph: Graph, platform, cpu_backend: str) -> None:
    """What a graph with dynamic sizes cannot use, said before any pass runs."""
    if not graph.dims:
        return
    from hetflow.ir.symbolic import describe_ranges
    if cpu_backend == "tvm":
        raise CompileError(f"cpu_backend 'tvm' compiles each partition for fixed shapes, and this graph has "
                           f"dynamic sizes ({describe_ranges(graph.dims)}): use cpu_backend='onnxruntime'")
    gpu = [d.name for d in platform.devices.values() if d.kind == "gpu" and d.measured]
    if gpu:
        raise CompileError(f"platform {platform.name!r} runs partitions on a real GPU ({gpu[0]}), whose backend "
                           f"replays CUDA graphs of fixed shapes; this graph has dynamic sizes "
                           f"({describe_ranges(graph.dims)}): compile it for a platform without a CUDA GPU, or "
                           "without dynamic_shapes")


def _host_runs_unplaced(graph: Graph, platform) -> None:
    """A pipeline without ``place`` (``passes="canonicalize,fuse"``): the host CPU runs every node, said in
    each node's reason. A graph placed only in part is an error."""
    unplaced = [n for n in graph.nodes if "device" not in n.meta]
    if not unplaced:
        return
    if len(unplaced) < len(graph.nodes):
        raise CompileError(f"{unplaced[0].describe()} has no device while other nodes have one: every node "
                           "is placed by the place pass, or none is")
    host = platform.host_device()
    for node in graph.nodes:
        node.meta["device"] = host
        node.meta["reason"] = "no place pass in the pipeline: the host CPU runs every node"


def check_plan(graph: Graph, platform, memory_plan) -> None:
    """The plan checker (``hetflow.runtime.plancheck``), apart from the planner, at the end of every compile:
    a plan two values could race on is an error here, never a wrong answer later."""
    if memory_plan is None:
        return
    from hetflow.passes.partition import device_runs
    from hetflow.runtime.plancheck import check_memory_plan
    partitions = [(device, [n.outputs[0].name for n in nodes]) for device, nodes in device_runs(graph)]
    check_memory_plan(graph, partitions, memory_plan.as_manifest(), platform.memory_space, memory_plan.alignment,
                      where="compile: the memory plan")


def backend(platform: Any = "host", placement: str = "roofline", passes: Sequence[str] | str | None = None,
            devices: Sequence[str] | None = None, time_limit: float = 10.0, cpu_backend: str = "onnxruntime",
            gpu_kernels: str = "triton", cost_model: str = "analytic"):
    """A ``torch.compile`` backend with these ``compile`` options bound:
    ``torch.compile(m, backend=hetflow.backend(platform="mobile-soc"))``. Each FX graph dynamo hands it
    (one per graph-break piece and guard set) goes through the same pipeline and runtime as ``compile``;
    the returned backend's ``compiled`` lists the ``CompiledModel`` of each (``report()`` says what was built)."""
    _check_backends(cpu_backend, gpu_kernels)
    _check_cost_model(cost_model)
    _check_platform(platform)
    from hetflow.torch_backend import hetflow_backend
    options = dict(platform=platform, placement=placement, passes=passes, devices=devices, time_limit=time_limit,
                   cpu_backend=cpu_backend, gpu_kernels=gpu_kernels, cost_model=cost_model)

    def compile_fx(gm, example_inputs, **kwargs):
        return hetflow_backend(gm, example_inputs, **options, compiled_models=compile_fx.compiled, **kwargs)
    compile_fx.compiled = []
    return compile_fx
