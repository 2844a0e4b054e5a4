"""The compiled artifact: a directory the runtime loads without torch.

    out/
      manifest.json        schema version, platform, signature, sha256 of every other file
      graph.json           the IR (JSON)
      weights.safetensors  the weights

Loading checks that every file named in the manifest exists and has the hash the
manifest records, so an edited or truncated file is refused with its name.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from hetflow.ir import Graph, load, save
from hetflow.ir.errors import HetflowError
from hetflow.support.version import VERSION

SCHEMA = 1
MANIFEST = "manifest.json"


class ArtifactError(HetflowError):
    pass


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
    except ValueError:
        raise ArtifactError(f"SOURCE_DATE_EPOCH={epoch!r} is not an integer number of seconds") from None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def write_artifact(graph: Graph, directory: str | Path, platform: str = "host",
                   extra: dict[str, Any] | None = None, also_written: list[Path] | None = None) -> Path:
    """Write the graph, its weights and the manifest; the same inputs give the same bytes (no clock, no paths)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = save(graph, directory)
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
    return directory


def read_manifest(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such artifact directory")
    path = directory / MANIFEST
    if not path.exists():
        raise ArtifactError(f"{directory} is not a hetflow artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("schema") != SCHEMA:
        raise ArtifactError(f"{path}: artifact schema {manifest.get('schema')!r} is not supported "
                            f"(this hetflow reads schema {SCHEMA})")
    return manifest


def verify_files(directory: str | Path, manifest: dict[str, Any]) -> None:
    directory = Path(directory)
    for name, expected in manifest.get("files", {}).items():
        path = directory / name
        if not path.exists():
            raise ArtifactError(f"artifact file {path} is missing (the manifest lists it)")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(f"artifact file {path} was modified: its sha256 does not match the manifest "
                                f"(expected {expected[7:19]}..., found {actual[7:19]}...)")


def load_artifact(directory: str | Path) -> tuple[Graph, dict[str, Any]]:
    """Check the manifest and hashes, then load the graph with its weights."""
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    return load(directory), manifest
