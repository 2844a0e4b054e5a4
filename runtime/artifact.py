"""The compiled artifact: a directory the runtime loads without torch. An artifact is data.

    out/
      manifest.json        schema version, platform, signature, sha256 of every other file
      manifest.sig         optional: an Ed25519 signature of manifest.json (``sign_artifact``)
      graph.json           the IR (JSON)
      weights.safetensors  the weights
      <device>/partN.*     each partition's program

Loading trusts nothing in the directory (see the README's trust model):

* every path the manifest names is relative, stays inside the directory, passes
  through no symbolic link and is a regular file (no device, FIFO or directory);
  each file is opened once, hashed and kept in memory, so what was checked is
  what runs;
* the manifest and ``graph.json`` are checked against their JSON Schemas before
  a field is read, and each violation is one line naming the field;
* every file a partition uses must be listed in ``files`` with its sha256;
* with a public key (``verify_key``), ``manifest.sig`` must verify over the
  manifest's bytes, which covers every file through its hash;
* nothing read here is executed: GPU programs are regenerated from graph.json at
  load (``runners.cuda``) and native libraries load only when the caller says
  ``trust_native_code`` (``runners.tvm``).
"""
from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from hetflow.ir import Graph, save
from hetflow.ir.errors import HetflowError
from hetflow.support.schema import SAFE_NAME, check
from hetflow.support.version import VERSION

SCHEMA = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
GRAPH_FILE = "graph.json"
WEIGHTS_FILE = "weights.safetensors"
MAX_MANIFEST_BYTES = 256 << 20
MAX_PREDICTED_US = 86400e6          # a predicted time beyond a day is refused, not waited for
MAX_PATH_PARTS = 8


class ArtifactError(HetflowError):
    pass


# --- the manifest's schema (JSON Schema) -----------------------------------------------------------------
NAME = {"type": "string", "minLength": 1, "maxLength": 4096}
NAMES = {"type": "array", "items": NAME}
PATH = {"type": "string", "minLength": 1, "maxLength": 512, "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_.+/-]*$"}
MICROSECONDS = {"type": "number", "minimum": 0, "maximum": MAX_PREDICTED_US}
BYTES = {"type": "integer", "minimum": 0, "maximum": 1 << 62}
SIGNATURE_ENTRY = {"type": "object", "required": ["name", "type"],
                   "properties": {"name": NAME, "type": {"type": "string", "maxLength": 4096}}}
PARTITION = {
    "type": "object",
    "required": ["index", "device", "backend", "file", "inputs", "outputs", "nodes",
                 "predicted_start_us", "predicted_end_us"],
    "properties": {
        "index": {"type": "integer", "minimum": 0},
        "device": {"type": "string", "pattern": r"^(link:[A-Za-z0-9_.+-]{1,64}->[A-Za-z0-9_.+-]{1,64}|"
                                                 + SAFE_NAME[1:-1] + ")$"},
        "backend": {"type": "string", "maxLength": 64},
        "file": PATH,
        "inputs": NAMES, "outputs": NAMES, "weights": NAMES, "nodes": {**NAMES, "minItems": 1},
        "predicted_start_us": MICROSECONDS, "predicted_end_us": MICROSECONDS,
        "target": {"type": "object"},
    },
}
MEMORY_PLAN = {
    "type": "object",
    "required": ["size", "offsets"],
    "properties": {
        "size": BYTES, "lower_bound": BYTES, "greedy": BYTES, "no_reuse": BYTES,
        "offsets": {"type": "object", "additionalProperties": BYTES},
        "method": {"type": "string"}, "note": {"type": "string"},
        "limit_hit": {"type": "boolean"}, "limit": {"type": "string"},
    },
}
EVENT = {"type": "object", "required": ["name", "device", "start_us", "end_us", "kind", "ops", "flops", "bytes"],
         "properties": {"name": {"type": "string"}, "device": {"type": "string"}, "start_us": MICROSECONDS,
                        "end_us": MICROSECONDS, "kind": {"type": "string"}, "ops": {"type": "string"},
                        "flops": {"type": "number", "minimum": 0}, "bytes": {"type": "number", "minimum": 0}}}
MANIFEST_SCHEMA = {
    "type": "object",
    "required": ["schema", "hetflow", "platform", "graph", "inputs", "outputs", "files"],
    "properties": {
        "schema": {"const": SCHEMA},
        "hetflow": {"type": "string", "maxLength": 64},
        "created": {"type": "string", "maxLength": 64},
        "platform": {"type": "string", "maxLength": 4096},
        "graph": {"type": "string", "maxLength": 4096},
        "inputs": {"type": "array", "items": SIGNATURE_ENTRY},
        "outputs": {"type": "array", "items": SIGNATURE_ENTRY},
        "platform_data": {"type": "object"},   # checked by the platform's own schema when it is read
        "partitions": {"type": "array", "items": PARTITION},
        "memory_plan": {"type": "object", "additionalProperties": MEMORY_PLAN},
        "schedule": {"type": "object", "required": ["platform", "events"],
                     "properties": {"platform": {"type": "string"}, "events": {"type": "array", "items": EVENT},
                                    "makespan_us": MICROSECONDS, "modelled": {"type": "boolean"}}},
        "placement": {"type": "object"},
        "quantization": {"type": "object"},   # quantize="int8": what was quantised, the calibration, the error
        "files": {"type": "object", "propertyNames": PATH,
                  "additionalProperties": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}},
    },
}


# --- writing -----------------------------------------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def signature(graph: Graph) -> dict[str, Any]:
    return {
        "inputs": [{"name": v.name, "type": str(v.type)} for v in graph.inputs],
        "outputs": [{"name": v.name, "type": str(v.type)} for v in graph.outputs],
    }


def created_stamp() -> str | None:
    """The manifest's ``created`` time: only from ``SOURCE_DATE_EPOCH`` (reproducible builds), else none.

    The same model, options and platform give byte-identical artifacts, so the wall
    clock never goes into one; a build that wants a date sets ``SOURCE_DATE_EPOCH``
    (seconds since 1970, UTC), as reproducible-build tools do.
    """
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not epoch:
        return None
    try:
        seconds = int(epoch)
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
    except (ValueError, OverflowError, OSError):
        raise ArtifactError(f"SOURCE_DATE_EPOCH={epoch[:40]!r} is not a number of seconds since 1970") from None


def write_artifact(graph: Graph, directory: str | Path, platform: str = "host",
                   extra: dict[str, Any] | None = None, also_written: list[Path] | None = None,
                   external: set[str] | frozenset = frozenset()) -> Path:
    """Write the graph, its weights and the manifest; the same inputs give the same bytes (no clock, no paths).
    ``external``: weights the flash image holds (written by the backend, listed in ``flash.json``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = save(graph, directory, external=external)
    created = created_stamp()
    manifest = {
        "schema": SCHEMA,
        "hetflow": VERSION,
        **({"created": created} if created is not None else {}),
        "platform": platform,
        "graph": graph.name,
        **signature(graph),
        **(extra or {}),
        "files": {p.relative_to(directory).as_posix(): sha256_file(p) for p in written + list(also_written or [])},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    for path in written:  # (safetensors creates its file private; an artifact is for others to read)
        os.chmod(path, 0o666 & ~umask)
    return directory


@contextlib.contextmanager
def fresh_directory(target: str | Path):
    """Yield a new empty directory beside ``target``; on success it replaces ``target`` by rename.

    What was at ``target`` is kept until the new artifact is complete, and replaced only when it is a previous
    artifact (or an empty directory): a file, or a directory holding something else, is an error, and nothing
    is lost. Links already inside ``target`` are never followed, since nothing is written into it."""
    target = Path(target)
    if os.path.islink(target):
        raise ArtifactError(f"{target} is a symbolic link: give the real output directory")
    if target.exists() and not target.is_dir():
        raise ArtifactError(f"{target} exists and is not a directory: give a directory for the artifact")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise ArtifactError(f"{target} exists, is not empty and is not a hetflow artifact: not overwriting it "
                            "(give a new or empty directory)")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(fresh, 0o777 & ~umask)
        yield fresh
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=parent))
            os.rmdir(old)
            os.rename(target, old)
        os.rename(fresh, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise


# --- signing (Ed25519, the ``cryptography`` package) --------------------------------------------------------
def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ArtifactError("signing and verifying artifacts needs the 'cryptography' package "
                            "(pip install 'hetflow[sign]')") from None
    return serialization, ed25519


def _read_key_file(path: str | Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{what} {path}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > 16384:
        raise ArtifactError(f"{what} {path} is {len(data)} bytes: not a PEM key")
    return data


def generate_keypair(private_path: str | Path, public_path: str | Path) -> None:
    """A new Ed25519 key pair as PEM files (the private one readable by its owner only)."""
    serialization, ed25519 = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    Path(public_path).write_bytes(public)


def sign_artifact(directory: str | Path, private_key: str | Path) -> Path:
    """Write ``manifest.sig``: an Ed25519 signature of manifest.json's bytes (which hash every other file)."""
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(_read_key_file(private_key, "signing key"), password=None)
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"signing key {private_key}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ArtifactError(f"signing key {private_key} is a {type(key).__name__}, not an Ed25519 key")
    directory = Path(directory)
    manifest = (directory / MANIFEST).read_bytes()
    path = directory / SIGNATURE
    path.write_text("ed25519:" + base64.b64encode(key.sign(manifest)).decode() + "\n")
    return path


def verify_signature(manifest: bytes, signature_text: bytes | None, public_key: str | Path, where: str) -> None:
    serialization, ed25519 = _crypto()
    from cryptography.exceptions import InvalidSignature
    try:
        key = serialization.load_pem_public_key(_read_key_file(public_key, "verify key"))
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"verify key {public_key}: not a PEM public key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ArtifactError(f"verify key {public_key} is a {type(key).__name__}, not an Ed25519 key")
    if signature_text is None:
        raise ArtifactError(f"{where} is not signed ({SIGNATURE} is missing) and a verify key was given")
    text = signature_text.decode("ascii", "replace").strip()
    try:
        if not text.startswith("ed25519:"):
            raise ValueError
        key.verify(base64.b64decode(text[len("ed25519:"):], validate=True), manifest)
    except (ValueError, InvalidSignature):
        raise ArtifactError(f"{where}/{SIGNATURE} does not verify with {public_key}: the manifest was changed "
                            "after signing, or signed by another key") from None


# --- reading: every path contained, every file regular, every byte checked ----------------------------------
def check_relative_path(name: Any, where: str) -> tuple[str, ...]:
    """The components of ``name``, a path that must stay inside the artifact: relative, no '..', no '.'."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise ArtifactError(f"{where}: {str(name)[:80]!r} is not a relative path inside the artifact")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or any(p in ("..", ".") for p in parts) or len(parts) > MAX_PATH_PARTS \
            or name != "/".join(parts):
        raise ArtifactError(f"{where}: {name[:80]!r} is not a relative path inside the artifact "
                            "(absolute paths and '..' are refused)")
    return parts


def read_contained(directory: Path, name: str, where: str, limit: int | None = None) -> bytes:
    """The bytes of ``name`` inside ``directory``, opened component by component without following a link.

    A symbolic link anywhere on the way, or a final file that is not regular (a device, a FIFO, a directory), is
    refused; the file is opened once, so what is checked is what is read."""
    parts = check_relative_path(name, where)
    flags_dir = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise ArtifactError(f"{directory}: cannot open the artifact directory: {exc.strerror}") from None
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                next_fd = os.open(part, flags_dir, dir_fd=fd)
            except OSError as exc:
                raise ArtifactError(_open_failure(directory, name, parts[:i + 1], exc, where)) from None
            os.close(fd)
            fd = next_fd
        try:
            file_fd = os.open(parts[-1], os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK, dir_fd=fd)
        except OSError as exc:
            raise ArtifactError(_open_failure(directory, name, parts, exc, where)) from None
    finally:
        os.close(fd)
    info = os.fstat(file_fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(file_fd)
        raise ArtifactError(f"{where}: {directory / name} is not a regular file "
                            f"({_file_kind(info.st_mode)}); an artifact holds regular files only")
    with os.fdopen(file_fd, "rb") as f:
        if limit is not None and info.st_size > limit:
            raise ArtifactError(f"{where}: {directory / name} is {info.st_size} bytes, more than the {limit} "
                                "this file may have")
        return f.read()


def _open_failure(directory: Path, name: str, prefix: tuple[str, ...], exc: OSError, where: str) -> str:
    if exc.errno in (errno.ELOOP, errno.EMLINK) or os.path.islink(directory.joinpath(*prefix)):
        return (f"{where}: {directory / name} passes through a symbolic link ({'/'.join(prefix)}); "
                "an artifact holds none")
    if exc.errno == errno.ENOTDIR:
        return f"{where}: {directory / name}: {'/'.join(prefix)} is not a directory"
    if exc.errno == errno.ENOENT:
        return f"{where}: {directory / name} is missing"
    return f"{where}: cannot open {directory / name}: {exc.strerror}"


def _file_kind(mode: int) -> str:
    for test, word in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return word
    return "not a regular file"


@dataclass
class Artifact:
    """A loaded artifact: its checked manifest, every file's verified bytes, and the graph."""
    directory: Path
    manifest: dict[str, Any]
    files: dict[str, bytes]           # name -> the bytes whose hash matched the manifest
    digest: str                       # sha256 of manifest.json's bytes (what a signature or a pin covers)
    signed: bool = False
    graph: Graph | None = field(default=None, repr=False)
    flash: tuple | None = field(default=None, repr=False)   # (image path, FlashImage) when weights stream from flash


def read_manifest(directory: str | Path, verify_key: str | Path | None = None) -> tuple[dict[str, Any], str, bool]:
    """The manifest, checked against its schema (and its signature, with ``verify_key``); its digest."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such artifact directory" if not directory.exists()
                            else f"{directory} is not a directory (an artifact is a directory)")
    where = str(directory)
    if not os.path.lexists(directory / MANIFEST):
        raise ArtifactError(f"{directory} is not a hetflow artifact: {MANIFEST} is missing")
    raw = read_contained(directory, MANIFEST, where, MAX_MANIFEST_BYTES)
    signed = False
    if verify_key is not None:
        sig = read_contained(directory, SIGNATURE, where, 4096) if os.path.lexists(directory / SIGNATURE) else None
        verify_signature(raw, sig, verify_key, where)
        signed = True
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{directory / MANIFEST} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{directory / MANIFEST} is not valid JSON: {str(exc)[:160]}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{directory / MANIFEST}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("schema") != SCHEMA:
        raise ArtifactError(f"{directory / MANIFEST}: artifact schema {str(manifest.get('schema'))[:20]!r} is not "
                            f"supported (this hetflow reads schema {SCHEMA})")
    check(manifest, MANIFEST_SCHEMA, str(directory / MANIFEST), ArtifactError)
    return manifest, sha256_bytes(raw), signed


def verify_files(directory: str | Path, manifest: dict[str, Any]) -> dict[str, bytes]:
    """Every file the manifest lists, read (contained, regular) and hash-checked: name -> bytes."""
    directory = Path(directory)
    files = {}
    for name, expected in manifest["files"].items():
        if name in (MANIFEST, SIGNATURE):
            raise ArtifactError(f"{directory / MANIFEST}: files lists {name!r}, which cannot hash itself")
        data = read_contained(directory, name, f"{directory / MANIFEST} files")
        actual = sha256_bytes(data)
        if actual != expected:
            raise ArtifactError(f"artifact file {directory / name} was modified: its sha256 does not match the "
                                f"manifest (expected {expected[7:19]}..., found {actual[7:19]}...)")
        files[name] = data
    for name in (GRAPH_FILE, WEIGHTS_FILE):
        if name not in files:
            raise ArtifactError(f"{directory / MANIFEST}: files does not list {name}, which every artifact has")
    for entry in manifest.get("partitions", []):
        if entry["file"] not in files:
            raise ArtifactError(f"{directory / MANIFEST}: partition {entry['index']} uses {entry['file']}, which "
                                "files does not list (every file a partition uses is listed with its hash)")
    return files


def flash_weights(directory: Path, files: dict[str, bytes]) -> tuple[dict[str, np.ndarray], tuple | None]:
    """The weights the artifact's flash image holds, as read-only maps of it, by name, and (image path, its
    manifest); nothing when the artifact has no image. The image is not listed in ``files`` (it is not read
    whole into memory): its size and SHA-256 are checked against flash.json (hash-checked itself) here, once,
    and the pages that check read are dropped from the page cache again."""
    from hetflow.ir.flash_image import MANIFEST_FILE, FlashError, FlashImage, image_weights
    if MANIFEST_FILE not in files:
        return {}, None
    where = f"{directory}/{MANIFEST_FILE}"
    try:
        manifest = json.loads(files[MANIFEST_FILE].decode("utf-8"))
        image = FlashImage.from_json(json.dumps(manifest["layers"]), where)
        name, held = manifest["image"], manifest["weights"]
        check_relative_path(name, where)
        path = directory / name
        image.verify(path)
        from .flash_io import drop_page_cache
        drop_page_cache(path)
        views = image_weights(path, image)
        return {w: views[layer][role] for w, (layer, role) in held.items()}, (path, image)
    except FlashError as exc:
        raise ArtifactError(f"flash image: {str(exc).splitlines()[0]}") from None
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{where} is malformed ({type(exc).__name__}: {str(exc)[:120]})") from None


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
                       "U8": np.uint8, "BOOL": np.bool_}


def safetensors_views(data: bytes, where: str) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file's verified bytes, as read-only views of those bytes: no second copy
    of the weights (``safetensors.numpy.load`` copies each tensor out, which held a model's resident weights
    twice while it loaded). The header is checked as strictly as safetensors does: every tensor's bytes
    inside the data and matching its dtype and shape, none overlapping, no byte left over."""
    def bad(why: str) -> ArtifactError:
        return ArtifactError(f"{where} is not a valid safetensors file: {why}")
    if len(data) < 8:
        raise bad(f"{len(data)} bytes, shorter than its header's length")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise bad(f"its header claims {length} bytes; the file has {len(data) - 8} after the length")
    try:
        header = json.loads(bytes(data[8:8 + length]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise bad(f"its header is not JSON ({str(exc)[:80]})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    start, size = 8 + length, len(data) - 8 - length
    spans, views = [], {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and entry.get("dtype") in _SAFETENSORS_DTYPES
                and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
                and all(type(d) is int and d >= 0 for d in entry["shape"])
                and len(entry["data_offsets"]) == 2 and all(type(o) is int for o in entry["data_offsets"])):
            raise bad(f"tensor {name!r}: its entry is not {{dtype, shape, data_offsets}} of a known dtype")
        dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        count = int(np.prod(entry["shape"], dtype=np.int64))
        if not 0 <= begin <= end <= size or end - begin != count * dtype.itemsize:
            raise bad(f"tensor {name!r}: bytes {begin}..{end} do not hold {entry['dtype']}{entry['shape']} inside "
                      f"the {size} data bytes")
        spans.append((begin, end, name))
        view = np.frombuffer(data, dtype, count, start + begin).reshape(entry["shape"])
        views[name] = view if view.flags.aligned else view.copy()
    covered = 0
    for begin, end, name in sorted(spans):
        if begin != covered:
            raise bad(f"tensor {name!r} starts at {begin}: " + ("it overlaps the one before" if begin < covered
                      else f"bytes {covered}..{begin} belong to no tensor"))
        covered = end
    if covered != size:
        raise bad(f"bytes {covered}..{size} belong to no tensor")
    return views


def graph_from_files(files: dict[str, bytes], where: str, external: dict[str, np.ndarray] | None = None) -> Graph:
    """The graph from graph.json's and weights.safetensors' verified bytes (verified as IR, too); ``external``:
    the weights the flash image holds."""
    from hetflow.ir.serialize import graph_from_json
    from hetflow.ir.verify import verify
    try:
        data = json.loads(files[GRAPH_FILE].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{where}/{GRAPH_FILE} is not valid JSON: {str(exc)[:160]}") from None
    weights = safetensors_views(files[WEIGHTS_FILE], f"{where}/{WEIGHTS_FILE}")
    try:
        graph = graph_from_json(data, weights, external)
        verify(graph)
    except RecursionError:
        raise ArtifactError(f"{where}/{GRAPH_FILE}: nested too deeply") from None
    except HetflowError as exc:
        raise ArtifactError(f"{where}/{GRAPH_FILE}: {str(exc).splitlines()[0]}") from None
    return graph


def load_artifact(directory: str | Path, verify_key: str | Path | None = None) -> Artifact:
    """Check the manifest (schema, signature with ``verify_key``), every file's containment and hash, then load
    the graph with its weights from the verified bytes."""
    directory = Path(directory)
    manifest, digest, signed = read_manifest(directory, verify_key)
    files = verify_files(directory, manifest)
    artifact = Artifact(directory, manifest, files, digest, signed)
    external, artifact.flash = flash_weights(directory, files)
    artifact.graph = graph_from_files(files, str(directory), external)
    return artifact
