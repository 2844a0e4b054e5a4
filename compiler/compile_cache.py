"""The compile cache: a compiled model kept as an artifact under a key of everything its compile reads, so that
compiling the same model again loads the artifact instead of capturing and running the passes.

    ~/.cache/hetflow/compile/          (or $HETFLOW_CACHE_DIR; HETFLOW_COMPILE_CACHE=0 turns it off by default)
      ab/abcdef.../entry.json          the key, the artifact's manifest digest, the report, the call signature,
                                       the weights that are the module's own tensors (views of them)
      ab/abcdef.../artifact/           an artifact as ``CompiledModel.save`` writes it; for a torch module its
                                       weights file leaves out the module's own tensors (see ``store``)

The key is computed *before* ``torch.export`` (which is most of a cold compile), so it has to name everything
the export and the passes read (``compile_key``):

* the model's weights: every parameter and buffer by name, dtype, shape, stride and the SHA-256 of its bytes
  (tied weights once, with the tie);
* the model's code: the source of every Python module that defines a class of the module tree (outside torch),
  and of every module loaded from the same top-level packages (``transformers.*``, the user's package), and
  hetflow's own loaded source, each by content; the versions of torch, numpy, onnx and Python;
* the model's configuration: every submodule's class and plain attributes (configs, sizes,
  hooks by qualified name), walked recursively; an attribute with no stable description (an object whose repr
  is its address) makes the model uncacheable, and the compile says so instead of guessing;
* the example inputs' pytree, dtypes and shapes (their values too with ``quantize``, which calibrates on them),
  ``dynamic_shapes``, every compile option, and the platform's resolved content (calibrated figures included).

An ONNX model is keyed by its bytes (and its external data files). Not covered: global state the model's
forward reads (environment variables, module-level globals mutated at run time, torch's global flags): compile
with ``cache=False`` when that changes the graph.

A hit is loaded with the artifact's own checks (``hetflow.runtime.artifact.load_artifact``: every file's
SHA-256 against the manifest, the manifest against the entry); a corrupt entry is reported with a warning,
removed and compiled afresh, never used.
"""
from __future__ import annotations

import enum
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hetflow.ir.errors import HetflowError
from hetflow.support.version import VERSION

CACHE_ENV = "HETFLOW_CACHE_DIR"
ENABLE_ENV = "HETFLOW_COMPILE_CACHE"
ENTRY_FILE = "entry.json"
ARTIFACT_DIR = "artifact"
ENTRY_SCHEMA = 1
HASH_THREADS = 2            # hashlib releases the GIL: the weights are hashed on two threads
MAX_ATTRIBUTE_DEPTH = 8
# attributes whose value differs from one Python process to the next and that no forward reads, left out of the
# key (else no entry would ever be found again by another process): transformers' GenerationConfig keeps the
# hash() of its own text, which string hashing's per-process seed changes
PROCESS_LOCAL_ATTRIBUTES = frozenset({"_original_object_hash"})


class Uncacheable(HetflowError):
    """The model has something the key cannot describe; the compile runs without the cache and says why."""


class CorruptEntry(HetflowError):
    """A cache entry that fails its checks: never used, removed, recompiled."""


@dataclass
class CacheInfo:
    """What the cache did for one compile (``CompiledModel.cache``)."""
    status: str              # "hit", "miss (stored)", "miss (not stored: ...)", "off: ..."
    key: str | None = None
    directory: Path | None = None


def default_enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1").strip().lower() not in ("0", "off", "no", "false")


def cache_directory(directory: str | Path | None = None) -> Path:
    if directory is not None:
        return Path(directory)
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env) if env else Path.home() / ".cache" / "hetflow" / "compile"


def entry_directory(root: Path, key: str) -> Path:
    return root / key[:2] / key


# --- the key -------------------------------------------------------------------------------------------------
def compile_key(model: Any, example_inputs: Any, platform, options: dict[str, Any]) -> str:
    """The SHA-256 of everything the compile of ``model`` reads (see the module's docstring); ``Uncacheable``
    when the model holds something without a stable description."""
    key = _KeyBuilder()
    key.add("cache", {"schema": ENTRY_SCHEMA, "hetflow": VERSION, "versions": _versions()})
    key.add("options", key.stable(options, "options"))
    key.add("platform", key.stable(platform.raw, "platform"))
    if _is_torch_module(model):
        _add_torch_model(key, model, example_inputs, quantized=bool(options.get("quantize")))
    else:
        key.add("onnx", _onnx_digest(model))
    key.add_tensors()
    key.add("code", key.code_digests())
    return key.hexdigest()


def _versions() -> dict[str, str]:
    import onnx
    versions = {"python": sys.version.split()[0], "numpy": np.__version__, "onnx": onnx.__version__}
    torch = sys.modules.get("torch")
    if torch is not None:
        versions["torch"] = torch.__version__
    return versions


def _is_torch_module(model: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


class _KeyBuilder:
    """Framed items into one SHA-256; tensors hashed on threads; the source files the model's code comes from."""

    def __init__(self):
        self._hash = hashlib.sha256()
        self._packages: set[str] = {"hetflow"}
        self._modules: set[str] = set()
        self._tensors: list[tuple[str, Any]] = []

    def add(self, tag: str, item: Any) -> None:
        text = json.dumps(item, sort_keys=True, separators=(",", ":"), default=str)
        self._hash.update(f"{tag}\0{len(text)}\0{text}\0".encode())

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def note_code(self, obj: Any) -> str:
        """``module.qualname`` of a class or function, its module's source added to the key."""
        module = getattr(obj, "__module__", None) or "?"
        self._modules.add(module)
        top = module.split(".")[0]
        if top not in ("torch", "builtins"):
            self._packages.add(top)
        return f"{module}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"

    def code_digests(self) -> list[tuple[str, str]]:
        """The source the model's code comes from, by content: every module that defines a class or function of
        the model; every .py file of a package that is not an installed distribution (hetflow itself, the user's
        package); the version of an installed one (site-packages: editing its files in place goes unseen)."""
        digests = []
        for top in sorted(self._packages):
            package = sys.modules.get(top)
            if package is None:
                continue
            if top == "hetflow" or not _installed(package):
                digests += [(path, _file_digest(path)) for path in _package_sources(top, package)]
            else:
                digests.append((top, f"version {getattr(package, '__version__', '?')}"))
        for name in sorted(self._modules):
            path = getattr(sys.modules.get(name), "__file__", None)
            if name.split(".")[0] in ("torch", "builtins"):
                continue
            digests.append((name, _file_digest(path) if path and os.path.isfile(path) else "no source file"))
        return digests

    def stable(self, obj: Any, where: str, depth: int = 0, path: frozenset = frozenset()) -> Any:
        """A JSON-able description that changes whenever ``obj`` does; ``Uncacheable`` when there is none."""
        if obj is None or isinstance(obj, (bool, int, str)):
            return obj
        if isinstance(obj, float):
            return repr(obj)
        if isinstance(obj, enum.Enum):
            return f"{self.note_code(type(obj))}.{obj.name}"
        if isinstance(obj, (bytes, bytearray)):
            return "bytes:" + hashlib.sha256(obj).hexdigest()
        if id(obj) in path:
            return "cycle"
        if depth > MAX_ATTRIBUTE_DEPTH:
            raise Uncacheable(f"{where} nests deeper than {MAX_ATTRIBUTE_DEPTH} levels")
        inner = path | {id(obj)}
        if isinstance(obj, (list, tuple)):
            return [type(obj).__name__] + [self.stable(x, f"{where}[{i}]", depth + 1, inner) for i, x in enumerate(obj)]
        if isinstance(obj, dict):
            return ["dict"] + sorted(([repr(k), self.stable(v, f"{where}[{k!r}]", depth + 1, inner)]
                                      for k, v in obj.items() if k not in PROCESS_LOCAL_ATTRIBUTES),
                                     key=lambda kv: kv[0])
        if isinstance(obj, (set, frozenset)):
            return ["set"] + sorted(json.dumps(self.stable(x, where, depth + 1, inner), default=str) for x in obj)
        return self._stable_object(obj, where, depth, inner)

    def _stable_object(self, obj: Any, where: str, depth: int, path: frozenset) -> Any:
        torch = sys.modules.get("torch")
        if isinstance(obj, np.ndarray):
            return ["ndarray", str(obj.dtype), list(obj.shape), _array_digest(np.ascontiguousarray(obj))]
        if torch is not None:
            if isinstance(obj, torch.Tensor):
                name = f"tensor#{len(self._tensors)}"
                self._tensors.append((name, obj))
                return ["tensor", str(obj.dtype), list(obj.shape), name]
            if isinstance(obj, torch.nn.Module):      # a reference to a module (the tree itself is walked apart)
                return ["module", self.note_code(type(obj))]
            if isinstance(obj, (torch.dtype, torch.device, torch.Size, torch.memory_format, torch.layout)):
                return str(obj)
        if isinstance(obj, functools.partial):
            return ["partial", self.stable(obj.func, where, depth + 1, path),
                    self.stable(obj.args, where, depth + 1, path), self.stable(obj.keywords, where, depth + 1, path)]
        if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)):
            bound = getattr(obj, "__self__", None)
            described = ["code", self.note_code(getattr(obj, "__func__", obj))]
            if isinstance(obj, types.MethodType) and bound is not None:
                described.append(self.stable(bound, f"{where}.__self__", depth + 1, path))
            return described
        if hasattr(obj, "__dict__") and not isinstance(obj, types.ModuleType):
            return ["object", self.note_code(type(obj)), self.stable(vars(obj), where, depth + 1, path)]
        text = repr(obj)
        if " at 0x" in text or isinstance(obj, types.ModuleType):
            raise Uncacheable(f"{where} is a {type(obj).__name__} with no stable description ({text[:60]})")
        return ["repr", self.note_code(type(obj)), text]

    def add_tensors(self) -> None:
        """Every tensor met so far: its SHA-256 (tied storage hashed once), on ``HASH_THREADS`` threads."""
        arrays = [(name, _tensor_bytes(t)) for name, t in self._tensors]
        with ThreadPoolExecutor(HASH_THREADS) as pool:
            digests = list(pool.map(lambda item: _array_digest(item[1]), arrays))
        self.add("tensor data", [[name, digest] for (name, _), digest in zip(arrays, digests)])
        self._tensors.clear()


# walked apart (the tree, the weights), or not read: capture exports in eval mode whatever ``training`` says
_MODULE_STATE = ("_parameters", "_buffers", "_modules", "training")


def _add_torch_model(key: _KeyBuilder, model, example_inputs, quantized: bool) -> None:
    """The module tree (classes, flags, attributes), its weights and the example inputs into the key."""
    import torch
    from torch.utils import _pytree as pytree
    tree = []
    for name, sub in model.named_modules(remove_duplicate=False):
        for cls in type(sub).__mro__:
            if cls is not object:
                key.note_code(cls)
        attributes = {k: v for k, v in vars(sub).items() if k not in _MODULE_STATE}
        tree.append([name, key.note_code(type(sub)), key.stable(attributes, f"module {name or 'root'}")])
    key.add("modules", tree)
    weights, storages = [], {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.stride()),
                   tuple(tensor.shape), tensor.dtype)   # the same view of the same memory: a tied weight
        tied = storages.setdefault(storage, name)
        weights.append([name, str(tensor.dtype), list(tensor.shape), list(tensor.stride()), tensor.requires_grad,
                        key.stable(tensor, name) if tied == name else ["tied to", tied]])
    key.add("weights", weights)
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    leaves, spec = pytree.tree_flatten(tuple(example_inputs))
    described = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            described.append(["tensor", str(leaf.dtype), list(leaf.shape), str(leaf.device)]
                             + ([key.stable(leaf, f"example input {i}")] if quantized else []))
        else:
            described.append(key.stable(leaf, f"example input {i}"))
    key.add("example inputs", [str(spec), described])


def _tensor_bytes(tensor) -> np.ndarray:
    """A tensor's bytes as a flat uint8 array (a view where the tensor is contiguous on the CPU)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return t.reshape(-1).view(sys.modules["torch"].uint8).numpy() if t.numel() else np.zeros(0, np.uint8)


SITE_DIRECTORIES = ("site-packages", "dist-packages")
HETFLOW_PACKAGES = ("", ".frontends", ".ir", ".passes", ".backends", ".runtime", ".runtime.runners", ".support",
                    ".platform", ".examples")


def _installed(package) -> bool:
    path = getattr(package, "__file__", None) or ""
    return any(part in SITE_DIRECTORIES for part in Path(path).parts)


def _package_sources(top: str, package) -> list[str]:
    """Every .py (and .c) file of a package on disk, in a stable order; hetflow's subpackages live in separate
    directories (pyproject's package-dir), so each is listed."""
    import importlib.util
    directories = []
    if top == "hetflow":
        for suffix in HETFLOW_PACKAGES:
            spec = importlib.util.find_spec("hetflow" + suffix)
            directories += [(Path(d), False) for d in (spec.submodule_search_locations or [])] if spec else []
    elif getattr(package, "__path__", None):
        directories = [(Path(d), True) for d in package.__path__]
    elif getattr(package, "__file__", None):
        return [package.__file__]
    files = []
    for directory, recursive in directories:
        pattern = "**/*" if recursive else "*"
        files += [str(p) for p in directory.glob(pattern) if p.suffix in (".py", ".c") and p.is_file()]
    return sorted(set(files))


def _array_digest(array: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()


@functools.lru_cache(maxsize=4096)
def _file_digest_cached(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _file_digest(path: str) -> str:
    """A source file's SHA-256 (re-read whenever its modification time or size changes)."""
    stat = os.stat(path)
    return _file_digest_cached(path, stat.st_mtime_ns, stat.st_size)


def _onnx_digest(model: Any) -> str:
    """An ONNX model's bytes (a path: the file and the external data files it names)."""
    import onnx
    if isinstance(model, onnx.ModelProto):
        return hashlib.sha256(model.SerializeToString()).hexdigest()
    if isinstance(model, (bytes, bytearray)):
        return hashlib.sha256(model).hexdigest()
    path = Path(model)
    digest = hashlib.sha256(path.read_bytes())
    proto = onnx.load(str(path), load_external_data=False)
    for name in sorted(_external_files(proto)):
        digest.update(f"\0{name}\0".encode() + hashlib.sha256((path.parent / name).read_bytes()).digest())
    return digest.hexdigest()


def _external_files(proto) -> set[str]:
    files = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                files.add(entry.value)
    return files


# --- storing and loading -------------------------------------------------------------------------------------
def store(root: Path, key: str, compiled, entry: dict[str, Any], model: Any = None) -> Path:
    """Save ``compiled`` as the artifact of ``key``, then its entry (written last, so a half-written entry is a
    miss, never a hit).

    For a torch module the artifact's weights file holds only the weights the passes made: the entry names each
    graph weight that is a view of a module tensor (the frontend references weights, never copies them; a
    folded transpose is a view too) with the view's offset, shape and strides, and a hit takes those from the
    module, whose bytes the key has just hashed. Storing GPT-2 small then writes and hashes a few MB instead of
    500 MB, and a hit reads them instead of 500 MB. ``CompiledModel.save`` of a hit writes a whole artifact."""
    from hetflow.runtime.artifact import MANIFEST, fresh_directory, sha256_bytes
    directory = entry_directory(root, key)
    referenced = _module_weight_views(compiled.graph, model) if _is_torch_module(model) else {}
    if referenced:
        compiled._build_partitions()
        with fresh_directory(directory / ARTIFACT_DIR) as fresh:
            _write_entry_artifact(compiled, fresh, set(referenced))
    else:
        compiled.save(directory / ARTIFACT_DIR)
    manifest = (directory / ARTIFACT_DIR / MANIFEST).read_bytes()
    record = {"schema": ENTRY_SCHEMA, "key": key, "manifest": sha256_bytes(manifest), "module_weights": referenced,
              **entry}
    fd, temporary = tempfile.mkstemp(prefix=".entry.", dir=directory)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.replace(temporary, directory / ENTRY_FILE)
    return directory


def _write_entry_artifact(compiled, directory: Path, referenced: set[str]) -> None:
    """An artifact as ``CompiledModel.save`` writes it, except that its weights file leaves out ``referenced``."""
    from safetensors.numpy import save_file

    from hetflow.backends import write_partitions
    from hetflow.ir.serialize import graph_to_json
    from hetflow.runtime.artifact import GRAPH_FILE, MANIFEST, SCHEMA, WEIGHTS_FILE, sha256_file, signature
    graph = compiled.graph
    written = write_partitions(compiled.partitions, directory)
    (directory / GRAPH_FILE).write_text(json.dumps(graph_to_json(graph), indent=1))
    derived = {name: np.ascontiguousarray(w.data) for name, w in graph.weights.items()
               if name not in referenced and _safetensors_holds(w.data)}
    save_file(derived, str(directory / WEIGHTS_FILE))
    written += [directory / GRAPH_FILE, directory / WEIGHTS_FILE]
    manifest = {"schema": SCHEMA, "hetflow": VERSION, "platform": compiled.platform.name, "graph": graph.name,
                **signature(graph), **compiled.manifest_extra(),
                "files": {p.relative_to(directory).as_posix(): sha256_file(p) for p in written}}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _safetensors_holds(data: np.ndarray) -> bool:
    """What ``hetflow.ir.serialize`` puts in a weights file (the rest it writes into graph.json)."""
    return data.dtype.name in {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                               "float16", "float32", "float64"}


def _module_tensors(model) -> dict[str, Any]:
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return dict(named)


def _module_weight_views(graph, model) -> dict[str, list]:
    """``{weight: [state-dict name, byte offset, shape, byte strides]}`` for each graph weight that is a view of
    a module tensor (itself, or a transpose canonicalize folded)."""
    spans = []   # (start address, end address, name, dtype) of every CPU module tensor's memory
    for name, tensor in _module_tensors(model).items():
        if tensor.device.type == "cpu" and tensor.is_contiguous():
            start = tensor.data_ptr()
            spans.append((start, start + tensor.numel() * tensor.element_size(), name, str(tensor.dtype)))
    views = {}
    for name, value in graph.weights.items():
        view = _view_of(value.data, spans)
        if view is not None:
            views[name] = view
    return views


def _view_of(data: np.ndarray, spans) -> list | None:
    """``[tensor name, byte offset, shape, byte strides]`` when ``data`` lies inside one module tensor's memory
    with that tensor's dtype; None otherwise."""
    if data.size == 0:
        return None
    address = data.__array_interface__["data"][0]
    low, high = _extent(address, data.shape, data.strides, data.itemsize)
    dtype = str(_torch_dtype_of(data.dtype))
    for start, end, name, tensor_dtype in spans:
        if start <= low and high <= end and dtype == tensor_dtype:
            return [name, address - start, list(data.shape), list(data.strides)]
    return None


def _extent(address: int, shape, strides, itemsize: int) -> tuple[int, int]:
    """The lowest and one past the highest byte a strided view touches."""
    low = address + sum(min(0, (n - 1) * s) for n, s in zip(shape, strides))
    high = address + sum(max(0, (n - 1) * s) for n, s in zip(shape, strides)) + itemsize
    return low, high


def _module_view(tensor, offset: int, shape: list, strides: list, where: str) -> np.ndarray:
    """The strided view an entry recorded, of ``tensor``'s memory, read-only; refused unless it lies wholly
    inside the tensor and starts on an element."""
    from hetflow.frontends.torch import tensor_to_numpy
    from hetflow.runtime.artifact import ArtifactError
    base = tensor_to_numpy(tensor)
    if not base.flags.c_contiguous or not all(isinstance(v, int) for v in [offset, *shape, *strides]) \
            or len(shape) != len(strides) or any(n <= 0 for n in shape) or offset % base.itemsize:
        raise ArtifactError(f"{where}: the view it records is not a view of this tensor")
    low, high = _extent(offset, shape, strides, base.itemsize)
    if low < 0 or high > base.nbytes:
        raise ArtifactError(f"{where}: the view it records reaches outside the tensor's {base.nbytes} bytes")
    first = base.reshape(-1)[offset // base.itemsize:]
    return np.lib.stride_tricks.as_strided(first, shape=shape, strides=strides, writeable=False)


def _torch_dtype_of(dtype: np.dtype):
    import torch
    try:
        return torch.from_numpy(np.zeros(0, dtype)).dtype
    except TypeError:
        return None


def lookup(root: Path, key: str, model: Any = None):
    """``(entry, Artifact)`` for ``key``, None when there is none; ``CorruptEntry`` when it fails a check."""
    from hetflow.runtime.artifact import ArtifactError, load_artifact
    directory = entry_directory(root, key)
    entry_path = directory / ENTRY_FILE
    if not entry_path.is_file():
        return None
    try:
        entry = json.loads(entry_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptEntry(f"{entry_path} cannot be read: {str(exc)[:120]}") from None
    if not isinstance(entry, dict) or entry.get("key") != key or entry.get("schema") != ENTRY_SCHEMA:
        raise CorruptEntry(f"{entry_path} is not the entry of key {key[:16]}...")
    try:
        if entry.get("module_weights") and _is_torch_module(model):
            artifact = _load_with_module_weights(directory, entry, model)
        else:
            artifact = load_artifact(directory / ARTIFACT_DIR)
    except (ArtifactError, HetflowError) as exc:
        raise CorruptEntry(str(exc).splitlines()[0]) from None
    if artifact.digest != entry.get("manifest"):
        raise CorruptEntry(f"{directory / ARTIFACT_DIR}/manifest.json is not the manifest the entry recorded "
                           f"({str(entry.get('manifest'))[7:19]}..., found {artifact.digest[7:19]}...)")
    return entry, artifact


def _load_with_module_weights(directory: Path, entry: dict, model):
    """The entry's artifact with ``load_artifact``'s checks (the manifest's schema, every file contained and
    hash-checked, the graph verified), its weights file holding the derived weights, and the weights the entry
    names taken from the module (their bytes are in the key just computed)."""
    from safetensors.numpy import load as load_safetensors

    from hetflow.ir.serialize import graph_from_json
    from hetflow.ir.verify import verify
    from hetflow.runtime.artifact import GRAPH_FILE, WEIGHTS_FILE, Artifact, ArtifactError, read_manifest, verify_files
    where = directory / ARTIFACT_DIR
    manifest, digest, _ = read_manifest(where)
    files = verify_files(where, manifest)
    weights = load_safetensors(files[WEIGHTS_FILE])
    tensors = _module_tensors(model)
    for weight, (source, offset, shape, strides) in entry["module_weights"].items():
        if source not in tensors:
            raise ArtifactError(f"{directory / ENTRY_FILE}: weight {weight!r} is module tensor {source!r}, which "
                                "the module does not have")
        weights[weight] = _module_view(tensors[source], offset, shape, strides,
                                       f"{directory / ENTRY_FILE} weight {weight!r}")
    try:
        graph = graph_from_json(json.loads(files[GRAPH_FILE].decode("utf-8")), weights)
        verify(graph)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{where}/{GRAPH_FILE} is not valid JSON: {str(exc)[:160]}") from None
    artifact = Artifact(where, manifest, files, digest)
    artifact.graph = graph
    return artifact


def remove(root: Path, key: str) -> None:
    shutil.rmtree(entry_directory(root, key), ignore_errors=True)


def cache_usage(root: Path) -> tuple[int, int]:
    """(entries, bytes) under ``root``."""
    entries = total = 0
    if not root.is_dir():
        return 0, 0
    for entry in root.glob(f"*/*/{ENTRY_FILE}"):
        entries += 1
        total += sum(p.stat().st_size for p in entry.parent.rglob("*") if p.is_file())
    return entries, total


def clear(root: Path) -> int:
    """Remove every entry under ``root``; the number removed."""
    removed = 0
    if not root.is_dir():
        return 0
    for entry in list(root.glob(f"*/*/{ENTRY_FILE}")):
        shutil.rmtree(entry.parent, ignore_errors=True)
        removed += 1
    return removed
