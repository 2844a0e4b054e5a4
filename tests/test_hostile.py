"""Hostile inputs: artifacts, platform files, models and input arrays made by someone else.

Every case gets one clear line (a HetflowError, or ``hetflow: error: ...`` and exit status 1 from the CLI) or,
where the input is valid, the right output. Nothing is written outside the output directory, no file outside
the artifact is read, and no code from the artifact runs (payloads that would create a marker file must not).
The cases of the issue are grouped: artifacts and containment, trusted manifest fields, signing and native
code, compile outputs, platform files, CLI inputs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

import hetflow
from hetflow.cli import main
from hetflow.ir.errors import HetflowError
from hetflow.ir.interpreter import Interpreter
from hetflow.platform import PlatformError, load_platform, platform_from_dict
from hetflow.runtime import ArtifactError, load

from .onnx_models import mlp_model


def one_line(exc_or_text) -> str:
    text = str(exc_or_text.value if hasattr(exc_or_text, "value") else exc_or_text).strip()
    assert text and "\n" not in text and "Traceback" not in text, text
    return text


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (not hang) when the block runs longer than ``seconds``."""
    def expired(*_):
        raise TimeoutError(f"took more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "mlp.onnx"
    onnx.save(mlp_model(width=16, layers=2, batch=4), path)
    return path


@pytest.fixture(scope="module")
def pristine(model_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifact") / "out"
    hetflow.compile(str(model_file), platform="mobile-soc", placement="optimal").save(out)
    return out


@pytest.fixture
def artifact(pristine, tmp_path) -> Path:
    """A fresh copy of a compiled artifact for one test to tamper with."""
    copy = tmp_path / "art"
    shutil.copytree(pristine, copy)
    return copy


def x_input() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)


def reference(artifact_dir: Path, x: np.ndarray) -> np.ndarray:
    from hetflow.runtime.artifact import load_artifact
    return Interpreter(load_artifact(artifact_dir).graph).run({"x": x})[0]


def edit_manifest(directory: Path, change) -> dict:
    """A hostile author: edit the manifest (and its hashes, which nothing stops them from editing too)."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return manifest


def rehash(directory: Path, name: str) -> None:
    digest = "sha256:" + hashlib.sha256((directory / name).read_bytes()).hexdigest()
    edit_manifest(directory, lambda m: m["files"].__setitem__(name, digest))


class OpenedFiles:
    """Records every file Python opens (the ``open`` audit event) while active."""
    active: "OpenedFiles | None" = None
    installed = False

    def __init__(self):
        self.paths: list[str] = []

    @classmethod
    def hook(cls, event, args):
        if event == "open" and cls.active is not None and args and isinstance(args[0], (str, bytes, os.PathLike)):
            cls.active.paths.append(os.fsdecode(args[0]))

    def __enter__(self):
        if not OpenedFiles.installed:
            sys.addaudithook(OpenedFiles.hook)
            OpenedFiles.installed = True
        OpenedFiles.active = self
        return self

    def __exit__(self, *exc):
        OpenedFiles.active = None


# --- artifacts: every path contained, regular files only -------------------------------------------------

def test_an_untouched_artifact_loads_and_runs(artifact):
    x = x_input()
    np.testing.assert_allclose(load(artifact).run({"x": x})["a1"], reference(artifact, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["../secret.txt", "../../etc/passwd", "/etc/passwd", "./graph.json",
                                  "cpu/../../secret.txt", "a\\b", ""])
def test_a_manifest_path_outside_the_artifact_is_refused_without_reading_it(artifact, name):
    secret = artifact.parent / "secret.txt"
    secret.write_text("the user's private data")
    edit_manifest(artifact, lambda m: m["files"].__setitem__(name, "sha256:" + "0" * 64))
    with OpenedFiles() as opened, pytest.raises(ArtifactError) as exc:
        load(artifact)
    message = one_line(exc)
    assert "manifest.json" in message
    assert not any("secret.txt" in p or p.endswith("passwd") for p in opened.paths), opened.paths


@pytest.mark.parametrize("kind", ["symlink-to-device", "symlink-inside", "fifo", "directory", "symlinked-folder"])
def test_only_regular_files_are_read(artifact, kind):
    weights = artifact / "weights.safetensors"
    if kind == "symlink-to-device":
        weights.unlink()
        weights.symlink_to("/dev/zero")
    elif kind == "symlink-inside":
        shutil.move(weights, artifact / "real.safetensors")
        weights.symlink_to("real.safetensors")
    elif kind == "fifo":
        weights.unlink()
        os.mkfifo(weights)
    elif kind == "directory":
        weights.unlink()
        weights.mkdir()
    else:
        outside = artifact.parent / "elsewhere"
        shutil.move(artifact / "cpu", outside)
        (artifact / "cpu").symlink_to(outside)
    with deadline(20), pytest.raises(ArtifactError) as exc:
        load(artifact)
    message = one_line(exc)
    assert {"symlink-to-device": "symbolic link", "symlink-inside": "symbolic link", "fifo": "FIFO",
            "directory": "a directory", "symlinked-folder": "symbolic link"}[kind] in message, message


def test_an_absolute_device_path_does_not_hang(artifact):
    edit_manifest(artifact, lambda m: m["files"].__setitem__("/dev/zero", "sha256:" + "0" * 64))
    with deadline(20), pytest.raises(ArtifactError) as exc:
        load(artifact)
    assert "'/dev/zero'" in one_line(exc)


def test_a_partition_file_not_listed_in_files_is_refused(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    name = manifest["partitions"][0]["file"]
    edit_manifest(artifact, lambda m: m["files"].pop(name))
    with pytest.raises(ArtifactError) as exc:
        load(artifact)
    assert "which files does not list" in one_line(exc)


def test_a_modified_file_is_refused(artifact):
    (artifact / "graph.json").write_text((artifact / "graph.json").read_text().replace("MatMul", "Matmul"))
    with pytest.raises(ArtifactError) as exc:
        load(artifact)
    assert "graph.json was modified" in one_line(exc)


@pytest.mark.parametrize("change, field", [
    (lambda m: m.__setitem__("files", []), "files: expected object"),
    (lambda m: m.__setitem__("partitions", {"0": 1}), "partitions: expected array"),
    (lambda m: m["partitions"][0].__setitem__("predicted_end_us", "soon"), "predicted_end_us: expected number"),
    (lambda m: m["partitions"][0].__setitem__("index", -1), "partitions[0].index"),
    (lambda m: m["partitions"][0].__setitem__("device", "../../x"), "partitions[0].device"),
    (lambda m: m["partitions"][0].__setitem__("file", "../x.onnx"), "partitions[0].file"),
    (lambda m: next(iter(m["memory_plan"].values()))["offsets"].__setitem__("y", -64), "offsets.y"),
    (lambda m: next(iter(m["memory_plan"].values())).__setitem__("size", 2 ** 63), ".size"),
    (lambda m: m.__setitem__("inputs", "x"), "inputs: expected array"),
    (lambda m: m.pop("files"), "missing field 'files'"),
    (lambda m: m.__setitem__("schema", "1"), "schema"),
])
def test_manifest_fields_of_the_wrong_type_are_one_line_naming_the_field(artifact, change, field):
    edit_manifest(artifact, change)
    with pytest.raises(ArtifactError) as exc:
        load(artifact)
    assert field in one_line(exc)


@pytest.mark.parametrize("content", [b"", b"{", b"[1, 2]", b"\xff\xfe{}", b"[" * 100000, b'{"schema": 1e999}'])
def test_a_manifest_that_is_not_a_json_object_is_one_line(artifact, content):
    (artifact / "manifest.json").write_bytes(content)
    with pytest.raises(ArtifactError) as exc:
        load(artifact)
    one_line(exc)


def test_graph_json_with_an_unknown_op_is_one_line(artifact):
    graph = json.loads((artifact / "graph.json").read_text())
    graph["nodes"][0]["op"] = "os.system"
    (artifact / "graph.json").write_text(json.dumps(graph))
    rehash(artifact, "graph.json")
    with pytest.raises(ArtifactError) as exc:
        load(artifact)
    assert "os.system" in one_line(exc)


@pytest.mark.parametrize("junk", [b"\x00" * 8, b"\xff" * 64, (2 ** 40).to_bytes(8, "little") + b"{}"])
def test_corrupt_weights_are_one_line(artifact, junk):
    (artifact / "weights.safetensors").write_bytes(junk)
    rehash(artifact, "weights.safetensors")
    with pytest.raises(ArtifactError) as exc:
        load(artifact)
    assert "weights.safetensors" in one_line(exc)


# --- manifest fields that steer the run are checked, not trusted -----------------------------------------

def test_a_memory_plan_with_every_offset_zero_is_refused(artifact):
    def zero(m):
        for plan in m["memory_plan"].values():
            plan["offsets"] = {k: 0 for k in plan["offsets"]}
    edit_manifest(artifact, zero)
    manifest = json.loads((artifact / "manifest.json").read_text())
    if max(len(p["offsets"]) for p in manifest["memory_plan"].values()) < 2:
        pytest.skip("the plan has a single value: zero offsets are right")
    with pytest.raises(HetflowError) as exc:
        load(artifact)
    assert "share bytes" in one_line(exc)


@pytest.mark.parametrize("backend, words", [("transfer", "cannot run on device"),
                                            ("simulated", "cannot run on device"),
                                            ("bogus", "does not have")])
def test_a_partition_backend_edited_is_refused(artifact, backend, words):
    edit_manifest(artifact, lambda m: m["partitions"][0].__setitem__("backend", backend))
    with pytest.raises(HetflowError) as exc:
        load(artifact)
    assert words in one_line(exc)


def test_partitions_that_disagree_with_the_graph_are_refused(artifact):
    edit_manifest(artifact, lambda m: m["partitions"][0].__setitem__("nodes", m["partitions"][0]["nodes"][:1] * 2))
    with pytest.raises(HetflowError) as exc:
        load(artifact)
    assert "placement makes" in one_line(exc)


def test_a_predicted_time_of_1e12_is_refused(artifact):
    edit_manifest(artifact, lambda m: m["partitions"][0].__setitem__("predicted_end_us", 1e12))
    with deadline(20), pytest.raises(ArtifactError) as exc:
        load(artifact)
    assert "predicted_end_us" in one_line(exc)


# --- signing, and code in the artifact ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    pytest.importorskip("cryptography")
    from hetflow.runtime.artifact import generate_keypair
    folder = tmp_path_factory.mktemp("keys")
    generate_keypair(folder / "me.key", folder / "me.pub")
    generate_keypair(folder / "other.key", folder / "other.pub")
    return folder


def test_a_signed_artifact_verifies_and_an_edit_after_signing_does_not(model_file, keys, tmp_path):
    out = tmp_path / "signed"
    hetflow.compile(str(model_file)).save(out, sign_key=keys / "me.key")
    model = load(out, verify_key=keys / "me.pub")
    assert model.signed
    x = x_input()
    np.testing.assert_allclose(model.run({"x": x})["a1"], reference(out, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ArtifactError) as exc:
        load(out, verify_key=keys / "other.pub")
    assert "does not verify" in one_line(exc)
    weights = out / "weights.safetensors"   # a hostile edit that fixes the hash too: the signature catches it
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    rehash(out, "weights.safetensors")
    with pytest.raises(ArtifactError) as exc:
        load(out, verify_key=keys / "me.pub")
    assert "does not verify" in one_line(exc)
    (out / "manifest.sig").unlink()
    with pytest.raises(ArtifactError) as exc:
        load(out, verify_key=keys / "me.pub")
    assert "not signed" in one_line(exc)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_a_native_library_never_loads_without_trust(artifact, tmp_path):
    """A partition swapped for a shared library whose constructor would create a marker file."""
    marker = tmp_path / "native-payload-ran"
    source = tmp_path / "payload.c"
    source.write_text(textwrap.dedent(f"""
        #include <stdio.h>
        __attribute__((constructor)) static void payload(void) {{ fclose(fopen("{marker}", "w")); }}
    """))
    manifest = json.loads((artifact / "manifest.json").read_text())
    cpu = next(i for i, p in enumerate(manifest["partitions"]) if p["backend"] == "cpu")
    library = Path(manifest["partitions"][cpu]["file"]).with_suffix(".so").as_posix()
    subprocess.run([shutil.which("cc") or shutil.which("gcc"), "-shared", "-fPIC", str(source), "-o",
                    str(artifact / library)], check=True)

    def swap(m):
        m["partitions"][cpu].update(backend="tvm-llvm", file=library, target={"kind": "llvm"})
        m["files"][library] = "sha256:" + hashlib.sha256((artifact / library).read_bytes()).hexdigest()
    edit_manifest(artifact, swap)
    with pytest.raises(HetflowError) as exc:
        load(artifact)
    assert "--trust-native-code" in one_line(exc)
    with pytest.raises(HetflowError) as exc:
        load(artifact, trust_native_code="sha256:" + "0" * 64)   # trusted for another manifest only
    assert "trusted only for manifest" in one_line(exc)
    assert hetflow.cli.main(["inspect", str(artifact)]) == 0    # inspecting loads no code
    assert not marker.exists(), "code from the artifact ran"


def test_a_stored_gpu_program_never_runs(tmp_path):
    from .runtime.test_runtime import CUDA_PLATFORM
    platform_file = tmp_path / "cuda.toml"
    platform_file.write_text(CUDA_PLATFORM)
    out = tmp_path / "out"
    hetflow.compile(mlp_model(width=256), platform=str(platform_file)).save(out)
    program = next((out / "gpu").glob("part*.py"))
    marker = tmp_path / "payload-ran"
    program.write_text(f"open({str(marker)!r}, 'w').close()\n" + program.read_text())
    rehash(out, program.relative_to(out).as_posix())
    with pytest.raises(HetflowError) as exc:
        load(out, fallback="cpu")
    assert "differs from the one hetflow generates" in one_line(exc)
    assert not marker.exists(), "code from the artifact ran"


def test_a_simulated_partition_program_that_differs_is_refused(tmp_path):
    out = tmp_path / "out"
    hetflow.compile(mlp_model(width=256, layers=2, batch=1), platform="duplex").save(out)
    [program] = [p for p in out.rglob("part*.json")]
    graph = json.loads(program.read_text())
    graph["nodes"][0]["op"] = "Neg"   # a different computation, hash fixed up
    program.write_text(json.dumps(graph))
    rehash(out, program.relative_to(out).as_posix())
    with pytest.raises(HetflowError) as exc:
        load(out)
    assert "differs from the partition graph.json gives" in one_line(exc)


# --- compile writes only its output directory -----------------------------------------------------------------

def test_compile_into_an_existing_file_is_one_line(model_file, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("keep me")
    assert main(["compile", str(model_file), "-o", str(target)]) == 1
    assert "exists and is not a directory" in one_line(capsys.readouterr().err)
    assert target.read_text() == "keep me"


def test_compile_never_overwrites_a_directory_that_is_not_an_artifact(model_file, tmp_path, capsys):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.jpg").write_text("precious")
    assert main(["compile", str(model_file), "-o", str(target)]) == 1
    assert "not overwriting" in one_line(capsys.readouterr().err)
    assert (target / "holiday.jpg").read_text() == "precious"


def test_compile_follows_no_link_already_inside_the_output(model_file, artifact, tmp_path):
    victim = tmp_path / "victim.json"
    victim.write_text("untouched")
    (artifact / "graph.json").unlink()
    (artifact / "graph.json").symlink_to(victim)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["compile", str(model_file), "-o", str(artifact)]) == 0
    assert victim.read_text() == "untouched"
    assert not (artifact / "graph.json").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == before   # no temporary directory left behind
    load(artifact)


def test_a_failed_compile_leaves_the_previous_artifact(artifact, tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    before = (artifact / "manifest.json").read_bytes()
    assert main(["compile", str(bad), "-o", str(artifact)]) == 1
    one_line(capsys.readouterr().err)
    assert (artifact / "manifest.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_device_named_like_a_path_is_refused(model_file, tmp_path, capsys):
    data = load_platform("mobile-soc").raw
    platform = tmp_path / "evil.toml"
    text = (Path(hetflow.platform.__file__).parent / "presets" / "mobile-soc.toml").read_text()
    platform.write_text(text.replace("[device.npu]", '[device."../../x"]'))
    assert "npu" in data["device"]
    out = tmp_path / "deep" / "er" / "out"
    assert main(["compile", str(model_file), "--platform", str(platform), "-o", str(out)]) == 1
    assert "name '../../x' is not allowed" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "x").exists() and not (tmp_path / "deep" / "x").exists()


# --- platform files -----------------------------------------------------------------------------------------------

def _platform(change) -> dict:
    data = json.loads(json.dumps(load_platform("flash-edge").raw))
    change(data)
    return data


@pytest.mark.parametrize("change, words", [
    (lambda d: d.__setitem__("memory", "x"), "memory: expected object"),
    (lambda d: d["device"]["npu"].__setitem__("tile", "abc"), "device.npu.tile: expected integer"),
    (lambda d: d["device"]["npu"].__setitem__("ops", "Gemm"), "device.npu.ops: expected array"),
    (lambda d: d["device"]["npu"]["peak"].__setitem__("f16", float("inf")), "must be finite"),
    (lambda d: d["device"]["npu"]["peak"].__setitem__("f16", "1e999 TFLOP/s"), "must be finite"),
    (lambda d: d["memory"]["dram"].__setitem__("capacity", "-1 GiB"), "must be positive"),
    (lambda d: d["device"]["cpu"].__setitem__("launch", True), "expected string or number"),
    (lambda d: d.__setitem__("devices", {}), "unknown field 'devices'"),
    (lambda d: d["device"]["npu"].__setitem__("memory", "sram"), "no memory space 'sram'"),
])
def test_bad_platform_fields_are_one_line_naming_the_field(change, words):
    with pytest.raises(PlatformError) as exc:
        platform_from_dict(_platform(change), "evil.toml")
    assert words in one_line(exc)


@pytest.mark.parametrize("content", [b"\xff\xfe", b"name = ", b"[device]\nx = 1"])
def test_a_platform_file_that_is_not_toml_is_one_line(tmp_path, content):
    path = tmp_path / "p.toml"
    path.write_bytes(content)
    with pytest.raises(PlatformError) as exc:
        load_platform(str(path))
    one_line(exc)


# --- the CLI: inputs, outputs and other people's files ------------------------------------------------------------

def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def truncated_npy(path: Path, array: np.ndarray, cut: int) -> None:
    np.save(path, array)
    path.write_bytes(path.read_bytes()[:-cut])


def test_an_npy_header_declaring_terabytes_allocates_nothing(artifact, tmp_path, capsys):
    path = tmp_path / "huge.npy"
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1048576, 1048576), }"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\0" * 64)
    with deadline(20):
        code, _, err = run_cli(["run", artifact, "--input", f"x={path}"], capsys)
    assert code == 1 and "header declares" in one_line(err)


@pytest.mark.parametrize("make, words", [
    (lambda p: p.write_bytes(b""), "not a .npy array file"),
    (lambda p: p.write_bytes(b"\x93NUMPY"), "not a .npy array file"),
    (lambda p: p.mkdir(), "not a regular file"),
    (lambda p: truncated_npy(p, np.zeros((4, 16), np.float32), 10), "holds 246 bytes"),
    (lambda p: np.save(p, np.zeros((4, 15), np.float32)), "expected shape f32[4,16], got f32[4,15]"),
    (lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True), "objects or records"),
])
def test_bad_npy_inputs_are_one_line(artifact, tmp_path, capsys, make, words):
    path = tmp_path / "x.npy"
    make(path)
    code, _, err = run_cli(["run", artifact, "--input", f"x={path}"], capsys)
    assert code == 1 and words in one_line(err), err


def test_a_big_endian_input_gives_the_right_output(artifact, tmp_path, capsys):
    x = x_input()
    np.save(tmp_path / "x.npy", x.astype(">f4"))
    code, _, err = run_cli(["run", artifact, "--input", f"x={tmp_path / 'x.npy'}", "--output-dir",
                            tmp_path / "res"], capsys)
    assert code == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "res" / "a1.npy"), reference(artifact, x), rtol=1e-5, atol=1e-6)


def test_an_existing_file_as_output_dir_is_one_line(artifact, tmp_path, capsys):
    (tmp_path / "res").write_text("keep")
    code, _, err = run_cli(["run", artifact, "--random", "--output-dir", tmp_path / "res"], capsys)
    assert code == 1 and "exists and is not a directory" in one_line(err)
    assert (tmp_path / "res").read_text() == "keep"


def test_an_unwritable_dump_ir_directory_is_one_line(model_file, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("HETFLOW_DUMP_IR", str(tmp_path / "file" / "ir"))
    code, _, err = run_cli(["compile", model_file, "-o", tmp_path / "out"], capsys)
    assert code == 1 and "HETFLOW_DUMP_IR" in one_line(err)
    assert not (tmp_path / "out").exists()


def test_an_unwritable_plot_directory_is_one_line(artifact, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(["inspect", artifact, "--plot", tmp_path / "file" / "plots"], capsys)
    assert code == 1 and "plot directory" in one_line(err)


def test_os_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    (tmp_path / "keys.key").write_text("")
    code, _, err = run_cli(["keygen", tmp_path / "missing" / "keys"], capsys)
    assert code == 1 and "No such file or directory" in one_line(err) and "--debug" in err
    code, _, err = run_cli(["keygen", tmp_path / "missing" / "keys", "--debug"], capsys)
    assert code == 1 and "Traceback" in err


def test_an_artifact_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "out").write_text("")
    code, _, err = run_cli(["run", tmp_path / "out", "--random"], capsys)
    assert code == 1 and "not a directory" in one_line(err)
