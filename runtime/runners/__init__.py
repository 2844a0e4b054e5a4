"""Runners: what runs a partition of a loaded artifact, one module each, behind one registry.

The registry is keyed by the backend name the artifact's manifest gives each
partition (``cpu``, ``cuda``, ``tvm-llvm``, ``npu``, ``simulated``, ``transfer``). A loader
``(partition, executor) -> runner`` builds what runs it; a runner has

    run(inputs, outputs)     read ``inputs``, write the preallocated ``outputs`` (the arena's slots)
    run_dynamic(inputs)      return {name: array}, for outputs of shapes known only at run time
    host_inputs              True when it reads host (NumPy) arrays only

Adding a device's runner: a module here with ``@register_runner("name")``, imported
below. Nothing outside this registry branches on backend names.
"""
from __future__ import annotations

import importlib
from typing import Callable

from hetflow.ir.errors import HetflowError
from hetflow.runtime.errors import RunnerError

RUNNERS: dict[str, Callable] = {}
MODULES = {"cpu": "onnxruntime", "cuda": "cuda", "tvm-llvm": "tvm", "simulated": "interpreter",
           "transfer": "transfer", "npu": "npu", "pim": "pim", "flash": "flash"}
MEASURED = {"cpu", "cuda", "tvm-llvm"}  # backends that run on this machine's real device: their times are measured


def register_runner(backend: str):
    def wrap(loader: Callable) -> Callable:
        RUNNERS[backend] = loader
        return loader
    return wrap


def backends() -> list[str]:
    return sorted(MODULES)


def load_runner(part, executor):
    """The runner for a partition, by its backend name (its module imported on first use: tvm and torch
    are imported only by the partitions that need them)."""
    if part.backend not in MODULES:
        raise RunnerError(f"partition {part.index} ({part.file}) names backend {part.backend!r}, which this "
                          f"runtime does not have (backends: {', '.join(backends())})")
    check_native_trust(part, executor.trust_native_code, executor.artifact_digest)
    if part.backend not in RUNNERS:
        importlib.import_module(f"{__name__}.{MODULES[part.backend]}")
    return RUNNERS[part.backend](part, executor)


# what each backend's partition file holds, and where it goes on the Partition
FILES = {"cpu": ("onnx_bytes", "bytes"), "cuda": ("source", "text"), "tvm-llvm": ("library", "bytes"),
         "simulated": ("graph", "graph"), "transfer": (None, None), "npu": ("source", "text"),
         "pim": ("source", "text"), "flash": ("source", "text")}
NATIVE = {"tvm-llvm"}   # backends whose program is native code: loaded only when the caller trusts the artifact


def read_partitions(entries: list[dict], files: dict[str, bytes], graph, platform=None):
    """Partitions of a loaded artifact, checked against the graph rather than trusted.

    The partitions must be exactly the graph's device runs (``device_runs``: each node in one partition, on the
    device its meta names, in order), each backend one the platform allows on its device, each partition's
    inputs and outputs those the graph gives it. The standalone graphs are rebuilt from the main graph; each
    program comes from ``files`` (bytes already hash-checked); nothing is loaded or run here."""
    import json

    from hetflow.ir.graph import extract_subgraph
    from hetflow.ir.program import Partition, device_runs
    try:
        runs = device_runs(graph)
    except HetflowError as exc:
        raise RunnerError(f"the artifact's graph is not placed: {exc}") from None
    if len(runs) != len(entries):
        raise RunnerError(f"the manifest lists {len(entries)} partitions, but the graph's placement makes "
                          f"{len(runs)}")
    partitions = []
    for position, (entry, (device, nodes)) in enumerate(zip(entries, runs)):
        where = f"partition {entry['index']} ({entry['file']})"
        names = [n.outputs[0].name for n in nodes]
        if entry["index"] != position or entry["device"] != device or entry["nodes"] != names:
            raise RunnerError(f"{where}: the manifest says index {entry['index']}, device {entry['device']!r}, "
                              f"{len(entry['nodes'])} nodes from %{entry['nodes'][0]}; the graph's placement makes "
                              f"partition {position} on {device!r} with {len(names)} nodes from %{names[0]}")
        backend = entry["backend"]
        if backend not in FILES:
            raise RunnerError(f"{where} names backend {backend!r}, which this runtime does not have "
                              f"(backends: {', '.join(backends())})")
        if platform is not None:
            try:
                allowed = platform.backends(device)
            except HetflowError as exc:
                raise RunnerError(f"{where}: {exc}") from None
            if backend not in allowed:
                raise RunnerError(f"{where}: backend {backend!r} cannot run on device {device!r} "
                                  f"(allowed: {', '.join(allowed)})")
        sub = extract_subgraph(graph, nodes, f"part{entry['index']}")[0]
        part = Partition(entry["index"], device, backend, sub, entry["nodes"],
                         entry["predicted_start_us"] / 1e6, entry["predicted_end_us"] / 1e6, entry["file"],
                         target=entry.get("target"))
        if entry["inputs"] != part.input_names or entry["outputs"] != part.output_names:
            raise RunnerError(f"{where}: the manifest's inputs/outputs differ from those the graph gives it "
                              f"(inputs {part.input_names[:4]}, outputs {part.output_names[:4]})")
        part.device_spec = platform.devices.get(device) if platform is not None else None
        field, kind = FILES[backend]
        if kind in ("bytes", "text"):
            stored = files[entry["file"]] if kind == "bytes" else _text(files[entry["file"]], where)
            setattr(part, field, _regenerated(backend, sub, stored, entry, where, part.device_spec))
        elif kind == "graph":  # the stored program must be the partition the main graph gives, exactly
            from hetflow.ir.serialize import graph_to_json
            try:
                stored = json.loads(_text(files[entry["file"]], where))
            except (json.JSONDecodeError, RecursionError) as exc:
                raise RunnerError(f"{where} is not valid JSON: {str(exc)[:120]}") from None
            if stored != json.loads(json.dumps(graph_to_json(sub))):
                raise RunnerError(f"{where} differs from the partition graph.json gives (it is refused, not run)")
            part.graph = sub
        partitions.append(part)
    return partitions


def _regenerated(backend: str, graph, stored, entry: dict, where: str, device=None):
    """The partition's program as hetflow's own emitter generates it from graph.json (``PROGRAM_EMITTERS``,
    registered by the driver): a stored program that differs is refused, so what runs never comes from the
    artifact, and the runners use the program this returns. Only native libraries (``NATIVE``, TVM's), which
    cannot be regenerated, keep the stored bytes; those load only when trusted (``check_native_trust``).
    Emitters registered ``takes_device`` (the NPU's, the PIM's) need the partition's ``Device``: never None."""
    from hetflow.platform import DEVICE_EMITTERS, PROGRAM_EMITTERS
    emit = PROGRAM_EMITTERS.get(backend)
    if emit is None:
        if backend in NATIVE:
            return stored
        raise RunnerError(f"{where}: no program emitter is registered for backend {backend!r} (the driver "
                          "registers them: import hetflow); a stored program is never run as it is")
    if backend in DEVICE_EMITTERS and device is None:
        raise RunnerError(f"{where}: its {backend} program depends on the device's figures; load it with its platform")
    try:
        program = emit(graph, f"{entry['index']} ({entry['file']})", device)  # device: the platform's Device
    except HetflowError as exc:
        raise RunnerError(f"{where}: hetflow cannot generate its program from graph.json: "
                          f"{str(exc).splitlines()[0]}") from None
    if program != stored:
        raise RunnerError(f"{where}: the stored program differs from the one hetflow generates from graph.json; "
                          "it is not run")
    return program


def check_native_trust(part, trust: bool | str, digest: str | None) -> None:
    """A native library (``NATIVE``) runs its author's code when loaded: only with ``trust`` (True, or the
    sha256 of the manifest the caller pinned; ``digest`` None: this process compiled it)."""
    if part.backend not in NATIVE or digest is None:
        return
    where = f"partition {part.index} ({part.file})"
    if isinstance(trust, str) and trust.lower() not in ("", "1", "true", "yes"):
        pinned = trust if trust.startswith("sha256:") else "sha256:" + trust
        if pinned != digest:
            raise RunnerError(f"{where}: native code is trusted only for manifest {pinned[:19]}..., and this "
                              f"manifest is {digest[:19]}...")
        return
    if not trust:
        raise RunnerError(f"{where} is a native library (backend {part.backend}); loading it runs its code. Load it "
                          "only if you trust who made this artifact: --trust-native-code (trust_native_code=True), "
                          "ideally with --verify-key")


def _text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RunnerError(f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
