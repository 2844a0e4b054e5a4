"""Hostile inputs: artifacts, platform files, models and input arrays made by someone else.

Every case gets one clear line (a HetflowError, or ``hetflow: error: ...`` and exit status 1 from the CLI) or,
where the input is valid, the right output. Nothing is written outside the output directory, no file outside
the artifact is read, and no code from the artifact runs (payloads that would create a marker file must not).
The cases of the issue are grouped: artifacts and containment, trusted manifest fields, signing and native
code, compile outputs, platform files, CLI inputs.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import hetflow
from hetflow.cli import main
from hetflow.cli import main as hetflow_main
from hetflow.frontends.onnx import FrontendError, ImporterBug, import_onnx
from hetflow.ir import parse_graph
from hetflow.ir.errors import HetflowError
from hetflow.ir.interpreter import Interpreter
from hetflow.ir.program import VIEW_OUTPUTS
from hetflow.ir.serialize import SerializationError
from hetflow.ir.types import DType, ShapeError, TensorType
from hetflow.memplan_cli import read_problem_csv
from hetflow.passes import memplan_search
from hetflow.passes.memplan import Buffer, InfeasibleError, MemplanInputError, check_plan, solve
from hetflow.passes.plan_memory import PlanTooLargeError
from hetflow.platform import PlatformError, load_platform, platform_from_dict
from hetflow.runtime import ArtifactError, load
from hetflow.runtime.artifact import sha256_file
from hetflow.runtime.errors import RunnerError
from hetflow.support import native

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
    # duplex's PIM partitions are command streams now (tests/backends/test_pim.py tampers with those); its
    # modelled xPU's partitions are still the partition's IR as JSON
    from hetflow.api import compile_graph
    from hetflow.examples.decode_graphs import build_gpt2_decode_step
    out = tmp_path / "out"
    compile_graph(build_gpt2_decode_step(layers=1, hidden=64, heads=2, context=16, vocab=100), "duplex").save(out)
    program = sorted(out.glob("xpu/part*.json"))[0]
    graph = json.loads(program.read_text())
    graph["nodes"][0]["op"] = "Neg"   # a different computation, hash fixed up
    program.write_text(json.dumps(graph))
    rehash(out, program.relative_to(out).as_posix())
    with pytest.raises(HetflowError) as exc:
        load(out)
    assert "differs from the partition graph.json gives" in one_line(exc)


def test_without_a_registered_emitter_a_stored_program_is_refused(artifact):
    from hetflow.platform import PROGRAM_EMITTERS
    emit = PROGRAM_EMITTERS.pop("cpu")
    try:
        with pytest.raises(RunnerError) as exc:
            load(artifact)
    finally:
        PROGRAM_EMITTERS["cpu"] = emit
    assert "no program emitter is registered for backend 'cpu'" in one_line(exc)


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


# ====================================================================================================
# Hostile inputs: ONNX models, partition programs, names in emitted code, shapes and sizes
# ====================================================================================================
# Hostile inputs (issue #13): ONNX models and artifacts made by someone else.
#
# 1. A CPU partition's ONNX model is checked before ONNX Runtime sees it: no external
#    data but hetflow's own weights, the partition's inputs and outputs, views that
#    fit their buffers. The hostile author edits ``cpu/partN.onnx`` and its hash in
#    the manifest (the manifest is not signed).
# 2. Names from a model never become code in an emitted GPU program.
# 3. Negative and absurd dims are refused where they enter; element counts do not
#    overflow; a memory plan larger than its memory is a compile error.
# 4. ``import_onnx`` for any bytes returns a graph or raises a HetflowError, quickly.
#
# Every refusal is one line naming the thing refused.


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and "\r" not in message, message
    return message


# --- 1. partition models, edited by a hostile author -------------------------------------------------

def _saved(tmp_path, model=None, platform="host"):
    compiled = hetflow.compile(model if model is not None else mlp_model(width=64, layers=2, batch=8),
                               platform=platform)
    return compiled.save(tmp_path / "m")


def _rewrite_partition(path, edit) -> str:
    """Edit the artifact's CPU partition model with ``edit(model)`` (or write ``edit``'s bytes), and its
    sha256 in the manifest with it. Returns the partition's file name."""
    manifest = json.loads((path / "manifest.json").read_text())
    entry = next(e for e in manifest["partitions"] if e["backend"] == "cpu")
    file = path / entry["file"]
    if isinstance(edit, bytes):
        file.write_bytes(edit)
    else:
        model = onnx.load_from_string(file.read_bytes())
        edit(model)
        file.write_bytes(model.SerializeToString())
    manifest["files"][entry["file"]] = sha256_file(file)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return entry["file"]


@contextlib.contextmanager
def _without_regeneration():
    """As if the stored program were taken as it is: what the partition-model check alone does."""
    from hetflow.runtime import runners
    regenerated = runners._regenerated
    runners._regenerated = lambda backend, graph, stored, entry, where, device=None: stored
    try:
        yield
    finally:
        runners._regenerated = regenerated


def _refused(path) -> str:
    """Refused twice over: the stored model differs from the one regenerated from graph.json, and the check every
    model passes before ONNX Runtime sees it refuses it too (its line is returned)."""
    with pytest.raises(RunnerError) as info:
        load(path)
    assert "differs from the one hetflow generates" in _one_line(info.value)
    with _without_regeneration(), pytest.raises(RunnerError) as info:
        load(path)
    return _one_line(info.value)


def _external(tensor: TensorProto, location: str) -> TensorProto:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return tensor


def test_an_initializer_with_external_data_is_refused_and_the_file_never_read(tmp_path, monkeypatch):
    """ONNX Runtime resolves a partition's external-data location against the working directory: the
    file's bytes would come back as the model's outputs."""
    monkeypatch.chdir(tmp_path)
    secret = np.arange(8 * 64, dtype=np.float32) + 12345.0
    (tmp_path / "secret.bin").write_bytes(secret.tobytes())
    path = _saved(tmp_path)

    def leak(model):
        model.graph.initializer.append(_external(numpy_helper.from_array(np.zeros((8, 64), np.float32), "leak"),
                                                 "secret.bin"))
        last = model.graph.node[-1]  # the final Relu becomes Add(h, leak): the output would be the file
        last.op_type = "Add"
        last.input.append("leak")

    file = _rewrite_partition(path, leak)
    message = _refused(path)
    assert file in message and "'leak'" in message and "external" in message and "secret.bin" in message


def test_a_tensor_attribute_with_external_data_is_refused(tmp_path):
    path = _saved(tmp_path)

    def constant(model):
        tensor = _external(numpy_helper.from_array(np.zeros(4, np.float32), "c"), "/etc/passwd")
        model.graph.node.insert(0, helper.make_node("Constant", [], ["unused"], name="sneaky", value=tensor))

    file = _rewrite_partition(path, constant)
    message = _refused(path)
    assert file in message and "'sneaky'" in message and "'value'" in message and "/etc/passwd" in message


def test_a_handed_over_weight_must_keep_its_type(tmp_path):
    """hetflow's own weights are external-data initializers it hands over by name: declared in other dims
    they are refused."""
    path = _saved(tmp_path)

    def redeclare(model):
        weight = next(t for t in model.graph.initializer if t.name == "w0")
        weight.dims[:] = [64, 128]

    file = _rewrite_partition(path, redeclare)
    message = _refused(path)
    assert file in message and "'w0'" in message and "[64, 128]" in message


def test_a_partition_model_onnx_cannot_parse_is_refused(tmp_path):
    path = _saved(tmp_path)
    file = _rewrite_partition(path, b"\x0a\xff\xff\xff\xff\x0f not a model")
    message = _refused(path)
    assert file in message and "not an ONNX model" in message


def _rename_output(model):
    model.graph.output[0].name = "other"
    model.graph.node[-1].output[0] = "other"


def _input_as_f64(model):
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE


def _output_dim(model):
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 9


def _extra_input(model):
    model.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))


@pytest.mark.parametrize("edit, expected", [
    (_rename_output, ["output 0 is 'other'", "'a1'"]),
    (_input_as_f64, ["input 'x' is f64 in the model, f32"]),
    (_output_dim, ["output 'a1' is f32[9,64] in the model, f32[8,64]"]),
    (_extra_input, ["input 1 is 'extra'", "nothing"]),
])
def test_the_model_declares_the_partitions_inputs_and_outputs(tmp_path, edit, expected):
    path = _saved(tmp_path)
    file = _rewrite_partition(path, edit)
    message = _refused(path)
    assert file in message and all(part in message for part in expected), message


VIEWED = """graph g(%x: f32[4,8]) -> (%y: f32[1,4,6]) opset 18 {
  weight %w: f32[6,8] = dense<f32[6,8]: [VALUES]>
  weight %shape: i64[3] = dense<i64[3]: [1, 4, 6]>
  %h: f32[4,6] = Gemm(%x, %w) {transB = 1}
  %y: f32[1,4,6] = Reshape(%h, %shape)
  return %y
}""".replace("VALUES", ", ".join(f"{0.01 * (i % 13 - 6)}" for i in range(48)))


def _viewed(tmp_path):
    """An artifact whose CPU partition writes its output as a view: Gemm's [4,6] into the [1,4,6] buffer."""
    from hetflow.backends.cpu import lower_partition
    graph = parse_graph(VIEWED)
    path = _saved(tmp_path, lower_partition(graph)[0])
    model = onnx.load_from_string((path / "cpu" / "part0.onnx").read_bytes())
    assert {p.key: p.value for p in model.metadata_props}.get(VIEW_OUTPUTS) == '{"y": [1, 4, 6]}'
    return path, graph


def test_a_view_output_computes_right(tmp_path):
    path, graph = _viewed(tmp_path)
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    np.testing.assert_allclose(load(path).run({"x": x})["y"], Interpreter(graph).run({"x": x})[0],
                               rtol=1e-6, atol=1e-6)


def _metadata(value: str):
    def edit(model):
        for prop in model.metadata_props:
            if prop.key == VIEW_OUTPUTS:
                prop.value = value
    return edit


def _larger_view(model):
    """The crafted model that crashed the runtime: a view shape with more elements than the buffer, and a
    Gemm that writes them."""
    dims = model.graph.output[0].type.tensor_type.shape.dim
    dims[0].dim_value = 4000


def _symbolic_view(model):
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "n"


@pytest.mark.parametrize("edit, expected", [
    (_larger_view, "output 'y' is bound as a view of f32[4000,6] over its buffer of f32[1,4,6]"),
    (_symbolic_view, "output 'y' is bound as a view but the model declares it f32[n,6]"),
    (_metadata("{not json"), "is not JSON"),
    (_metadata("[1, 4, 6]"), "is a JSON list, not an object"),
    (_metadata('{"elsewhere": [1, 4, 6]}'), "names 'elsewhere', which is not an output"),
    (_metadata('{"y": [1, 4, 60]}'), "gives output 'y' the shape [1, 4, 60], the partition (graph.json) declares"),
    (_metadata('{"y": [1, -4, 6]}'), "not a list of dims"),
    (_metadata('{"y": "1,4,6"}'), "not a list of dims"),
])
def test_a_view_binding_must_fit_its_buffer(tmp_path, edit, expected):
    path, _ = _viewed(tmp_path)
    file = _rewrite_partition(path, edit)
    message = _refused(path)
    assert file in message and expected in message, message


def test_a_view_is_checked_again_before_it_is_bound(tmp_path):
    """At run time too, before ONNX Runtime gets the pointer: a buffer that does not hold the view is an
    error, not a write past its end."""
    path, _ = _viewed(tmp_path)
    loaded = load(path)
    runner = next(r for r in loaded.executor.runners if hasattr(r, "view_shapes"))
    x = np.zeros((4, 8), np.float32)
    with pytest.raises(RunnerError) as info:
        runner.run({"x": x}, {"y": np.empty((1, 2, 6), np.float32)})
    assert "'y'" in _one_line(info.value) and "48 bytes" in str(info.value)


# --- 2. names from a model never become code ---------------------------------------------------------

def _hostile_mlp(marker) -> tuple[onnx.ModelProto, str]:
    """An MLP whose every name carries a payload behind a carriage return, a newline or quotes."""
    payload = f"__import__('os').system('touch {marker}')"
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32),
                                       f"w'{i}\r{payload}") for i in range(2)]
    x, h1, h2, y = f"in\r{payload}", f"h\r{payload}", f'h2"""{payload}', f"y\n{payload}\n#"
    nodes = [helper.make_node("MatMul", [x, weights[0].name], [h1], name=f"fc\r{payload}\r"),
             helper.make_node("Relu", [h1], [h2], name=f"act\n{payload}\n#"),
             helper.make_node("MatMul", [h2, weights[1].name], [y], name=f'q"""\'\r\n{payload}'),
             helper.make_node("LeakyRelu", [y], ["out"], name=f"x\u2028{payload}", alpha=0.1)]
    graph = helper.make_graph(nodes, f'g"""\r{payload}', [helper.make_tensor_value_info(x, TensorProto.FLOAT, [16, 64])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [16, 64])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), x


def _only_quoted_names(source: str) -> None:
    """The program is the emitter's shape: a docstring, imports, assignments of literals and one function of
    assignments; no name from the model as code."""
    tree = ast.parse(source)
    for statement in tree.body:
        assert isinstance(statement, (ast.Expr, ast.Import, ast.ImportFrom, ast.Assign, ast.FunctionDef)), \
            ast.dump(statement)
        if isinstance(statement, ast.Expr):
            assert statement is tree.body[0] and isinstance(statement.value, ast.Constant)
    run = next(s for s in tree.body if isinstance(s, ast.FunctionDef))
    assert all(isinstance(s, (ast.Assign, ast.Return)) for s in run.body)
    assert not any(isinstance(n, ast.Name) and n.id in ("__import__", "os", "open", "exec", "eval")
                   for n in ast.walk(tree))


def test_hostile_names_in_a_gpu_program_stay_strings(tmp_path):
    """Compiled for a GPU (the program regenerated and run on the CPU with --fallback cpu): the right
    output, and the payload in the names never runs."""
    pytest.importorskip("torch")
    from .runtime.test_runtime import CUDA_PLATFORM
    marker = tmp_path / "payload-ran"
    model, x_name = _hostile_mlp(marker)
    platform = tmp_path / "cuda.toml"
    platform.write_text(CUDA_PLATFORM)
    compiled = hetflow.compile(model, platform=str(platform))
    assert "cuda" in {p.backend for p in compiled._build_partitions()}
    compiled.save(tmp_path / "out")
    programs = list((tmp_path / "out" / "gpu").glob("part*.py"))
    assert programs
    for program in programs:
        _only_quoted_names(program.read_text())
    loaded = load(tmp_path / "out", fallback="cpu")
    x = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    want = Interpreter(import_onnx(model)).run({x_name: x})[0]
    np.testing.assert_allclose(loaded.run({x_name: x})["out"], want, rtol=1e-5, atol=1e-5)
    assert not marker.exists(), "a name from the model ran as code"


def test_a_hostile_graph_name_stays_a_string(tmp_path):
    """The whole imported graph emitted as one program (its name, the model's, goes into it) and run."""
    pytest.importorskip("torch")
    from hetflow.backends.gpu import emit_program
    from hetflow.runtime.runners.cuda import GpuPartition
    marker = tmp_path / "payload-ran"
    model, x_name = _hostile_mlp(marker)
    graph = import_onnx(model)
    source = emit_program(graph, graph.name)
    _only_quoted_names(source)
    runner = GpuPartition(source, {n: w.data for n, w in graph.weights.items()}, [v.name for v in graph.inputs],
                          [v.name for v in graph.outputs], kernels="torch", device="cpu")
    x = np.ones((16, 64), np.float32)
    got = runner.run_dynamic({x_name: x})["out"]
    np.testing.assert_allclose(got, Interpreter(graph).run({x_name: x})[0], rtol=1e-5, atol=1e-5)
    assert not marker.exists()


def test_error_messages_keep_a_hostile_name_on_one_line():
    model, _ = _hostile_mlp("/nonexistent")
    node = import_onnx(model).nodes[0]
    assert "\r" not in node.describe() and "\n" not in node.describe() and "\\r" in node.describe()


# --- 3. shapes and sizes -----------------------------------------------------------------------------

def test_element_counts_do_not_overflow():
    """np.prod in int64 made [2**62, 4] zero elements ("0 bytes and a 64-byte arena"); counts are Python
    ints now, and such shapes are refused where they are made."""
    assert TensorType(DType.f32, (2 ** 20, 2 ** 20)).numel() == 2 ** 40
    assert TensorType(DType.f32, (2 ** 20, 2 ** 20)).nbytes() == 2 ** 42
    assert TensorType(DType.u4, (3,)).nbytes() == 2
    for shape, words in [((3, -2), "dim 1 of shape [3,-2] is negative"),
                         ((2 ** 62, 4), "more than 2**40 elements"),
                         ((2 ** 32, 2 ** 32), "more than 2**40 elements"),
                         ((0, 2 ** 50), "dim 1"),
                         (("batch", -1), "dim 1 of shape [batch,-1] is negative")]:
        with pytest.raises(ShapeError) as info:
            TensorType(DType.f32, shape)
        assert words in _one_line(info.value)


def _model(input_dims=(2, 3), value_info=(), shape=(4, 2), init_dims=None) -> bytes:
    w = numpy_helper.from_array(np.ones((3, 4), np.float32), "w")
    if init_dims is not None:
        w.dims[:] = init_dims
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Reshape", ["h", "shape"], ["y"], name="reshape")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_dims))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * len(shape))],
                              [w, numpy_helper.from_array(np.array(shape, np.int64), "shape")],
                              value_info=list(value_info))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


@pytest.mark.parametrize("edit, words", [
    (dict(input_dims=(2, -3)), ["value 'x' (a graph input)", "dim 1", "negative (-3)"]),
    (dict(value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, [-2, 4])]),
     ["value 'h' (output of node 'mm' (MatMul))", "negative (-2)"]),
    (dict(shape=(2 ** 62,)), ["value 'y' (output of node 'reshape' (Reshape))", "more than 2**40 elements"]),
    (dict(input_dims=(2 ** 21, 2 ** 20)), ["value 'x'", "more than 2**40 elements"]),
    (dict(init_dims=[3, -4]), ["initializer 'w'", "dim 1 of shape [3,-4] is negative (-4)"]),
    (dict(init_dims=[2 ** 32, 2 ** 32]), ["initializer 'w'", "more than 2**40 elements"]),
], ids=["negative-input", "negative-intermediate", "reshape-2**62", "huge-input", "negative-initializer",
        "huge-initializer"])
def test_negative_and_absurd_dims_are_refused_at_import(edit, words):
    with pytest.raises(FrontendError) as info:
        import_onnx(_model(**edit))
    message = _one_line(info.value)
    assert all(w in message for w in words), message


def test_a_model_with_sane_dims_imports():
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(Interpreter(import_onnx(_model())).run({"x": x})[0], np.full((4, 2), 3.0))


def test_compile_refuses_a_negative_dim():
    with pytest.raises(HetflowError) as info:
        hetflow.compile(onnx.load_from_string(_model(input_dims=(-1, 3))))
    assert "negative" in _one_line(info.value)


def test_an_artifact_graph_with_a_negative_dim_is_refused(tmp_path):
    path = _saved(tmp_path)
    graph = json.loads((path / "graph.json").read_text())
    node = graph["nodes"][0]
    node["outputs"][0]["type"] = "f32[8,-64]"
    (path / "graph.json").write_text(json.dumps(graph))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["graph.json"] = sha256_file(path / "graph.json")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HetflowError) as info:
        load(path)
    message = _one_line(info.value)
    assert f"%{node['outputs'][0]['name']}" in message and "negative (-64)" in message


def test_the_text_form_refuses_a_negative_dim():
    with pytest.raises(HetflowError, match=r"dim 1 of shape \[2,-3\] is negative"):
        parse_graph("graph g(%x: f32[2,-3]) -> (%x: f32[2,-3]) opset 18 {\n  return %x\n}")


TINY = """
name = "tiny"
[memory.dram]
capacity = "CAPACITY"
bandwidth = "10 GB/s"
[device.cpu]
kind = "cpu"
memory = "dram"
peak = { f32 = "1 GFLOP/s" }
"""


def test_a_plan_larger_than_its_memory_is_a_compile_error(tmp_path):
    """Small weights (16 KiB each), large activations (1 MiB each): the weights fit, the plan does not."""
    platform = tmp_path / "tiny.toml"
    platform.write_text(TINY.replace("CAPACITY", "100 KiB"))
    model = mlp_model(width=64, layers=2, batch=4096)
    with pytest.raises(PlanTooLargeError) as info:
        hetflow.compile(model, platform=str(platform))
    message = _one_line(info.value)
    for words in ("pass 'plan_memory'", "memory 'dram' of platform 'tiny'", "needs 2.00 MiB (2097152 bytes)",
                  "capacity is 100.00 KiB", "over by 1.90 MiB (1994752 bytes)", "f32[4096,64]"):
        assert words in message, message
    roomy = tmp_path / "roomy.toml"  # (platforms are cached by path)
    roomy.write_text(TINY.replace("CAPACITY", "2 MiB").replace('"tiny"', '"roomy"'))
    hetflow.compile(model, platform=str(roomy))  # exactly the plan's size: it fits


# --- 4. the importer as a fuzz target ----------------------------------------------------------------

def _small_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4) / 10, "w")
    b = numpy_helper.from_array(np.ones(4, np.float32), "b")
    shape = numpy_helper.from_array(np.array([4, 2], np.int64), "shape")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["q"], name="reshape"),
             helper.make_node("Constant", [], ["k"], name="const", value_float=0.5),
             helper.make_node("Mul", ["q", "k"], ["m"], name="mul"),
             helper.make_node("Softmax", ["m"], ["y"], name="softmax", axis=1)]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2])], [w, b, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


DIMS = st.one_of(st.sampled_from([-1, -2, -2 ** 63, 0, 1, 2 ** 31, 2 ** 40, 2 ** 40 + 1, 2 ** 62, 2 ** 63 - 1]),
                 st.integers(-2 ** 63, 2 ** 63 - 1), st.integers(-4, 8))
OPS = st.one_of(st.sampled_from(["MatMul", "Add", "Relu", "Reshape", "Softmax", "Conv", "Gemm", "Transpose",
                                 "Gather", "Slice", "Expand", "ConstantOfShape", "Range", "If", "Loop", "Split",
                                 "Concat", "Einsum", "Cast", "Pad", "Tile", "Resize", "TopK", "NonZero", "Where",
                                 "CumSum", "Trilu", "NoSuchOp", ""]), st.text(max_size=8))
ATTRIBUTE_VALUES = st.one_of(
    st.integers(-2 ** 63, 2 ** 63 - 1), st.floats(allow_nan=True), st.text(max_size=6),
    st.lists(st.integers(-2 ** 63, 2 ** 63 - 1), min_size=1, max_size=4),
    st.lists(st.floats(allow_nan=True, width=32), min_size=1, max_size=3),
    st.builds(lambda dims: numpy_helper.from_array(np.zeros([max(0, min(d, 3)) for d in dims], np.float32)),
              st.lists(st.integers(-1, 4), max_size=3)))


def _value_infos(model):
    return list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info)


@st.composite
def _mutation(draw, model):
    """One structure-aware edit: a dim, an initializer's dims, an op, an input, an attribute, an element
    type, the opset, a node dropped or repeated, the shape constant, a name."""
    g = model.graph
    nodes = list(g.node)
    kind = draw(st.sampled_from(["dim", "init_dims", "op", "input", "attr", "elem", "opset", "drop", "dup",
                                 "shape_const", "name", "output_name", "domain", "ir_version"]))
    if kind == "dim":
        dims = draw(st.sampled_from(_value_infos(model))).type.tensor_type.shape.dim
        d = dims[draw(st.integers(0, len(dims) - 1))] if dims and draw(st.booleans()) else dims.add()
        if draw(st.booleans()):
            d.dim_value = draw(DIMS)
        else:
            d.dim_param = draw(st.text(max_size=4))
    elif kind == "init_dims":
        t = draw(st.sampled_from(list(g.initializer)))
        t.dims[:] = draw(st.lists(DIMS, max_size=4))
    elif kind == "op" and nodes:
        draw(st.sampled_from(nodes)).op_type = draw(OPS)
    elif kind == "input" and nodes:
        node = draw(st.sampled_from(nodes))
        choice = draw(st.sampled_from(["drop", "undefined", "empty", "add"]))
        if choice == "drop" and node.input:
            del node.input[draw(st.integers(0, len(node.input) - 1))]
        elif choice == "undefined":
            node.input.append("nowhere")
        elif choice == "empty" and node.input:
            node.input[0] = ""
        else:
            node.input.append(draw(st.sampled_from(["x", "w", "b", "shape", "h", "y", "q"])))
    elif kind == "attr" and nodes:
        node = draw(st.sampled_from(nodes))
        name = draw(st.sampled_from(["axis", "perm", "to", "alpha", "value", "shape", "equation", "mode",
                                     "pads", "axes", "transA", "kernel_shape", "value_float", "zz"]))
        if draw(st.booleans()):
            del node.attribute[:]
        node.attribute.append(helper.make_attribute(name, draw(ATTRIBUTE_VALUES)))
    elif kind == "elem":
        if draw(st.booleans()):
            draw(st.sampled_from(_value_infos(model))).type.tensor_type.elem_type = draw(st.integers(0, 30))
        else:
            draw(st.sampled_from(list(g.initializer))).data_type = draw(st.integers(0, 30))
    elif kind == "opset":
        model.opset_import[0].version = draw(st.integers(-2, 30))
    elif kind == "drop" and nodes:
        g.node.remove(draw(st.sampled_from(nodes)))
    elif kind == "dup" and nodes:
        g.node.append(draw(st.sampled_from(nodes)))
    elif kind == "shape_const":
        shape = next((t for t in g.initializer if t.name == "shape"), None)
        if shape is not None:
            shape.CopyFrom(numpy_helper.from_array(np.array(draw(st.lists(DIMS, max_size=4)), np.int64), "shape"))
    elif kind == "name" and nodes:
        draw(st.sampled_from(nodes)).name = draw(st.text(max_size=12))
    elif kind == "output_name" and nodes:
        draw(st.sampled_from(nodes)).output[:1] = [draw(st.sampled_from(["x", "w", "h", "y", "", "fresh"]))]
    elif kind == "domain" and nodes:
        draw(st.sampled_from(nodes)).domain = draw(st.sampled_from(["", "ai.onnx", "com.microsoft", "x"]))
    elif kind == "ir_version":
        model.ir_version = draw(st.integers(-1, 20))


@st.composite
def mutated_models(draw) -> bytes:
    model = _small_model()
    for _ in range(draw(st.integers(1, 6))):
        draw(_mutation(model))
    return model.SerializeToString()


@st.composite
def flipped_bytes(draw) -> bytes:
    data = bytearray(_small_model().SerializeToString())
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _import_any(data: bytes) -> None:
    """A graph, or a HetflowError that hetflow meant (not ImporterBug), in well under 10 s."""
    began = time.perf_counter()
    try:
        import_onnx(data)
    except ImporterBug as exc:
        raise AssertionError(f"the importer failed unexpectedly: {exc} (cause: {exc.__cause__!r})") from exc
    except HetflowError:
        pass
    assert time.perf_counter() - began < 10.0


@FUZZ
@given(st.binary(max_size=400))
def test_any_bytes_import_or_raise_a_hetflow_error(data):
    _import_any(data)


@FUZZ
@given(mutated_models())
def test_mutated_models_import_or_raise_a_hetflow_error(data):
    _import_any(data)


@FUZZ
@given(flipped_bytes())
def test_corrupted_models_import_or_raise_a_hetflow_error(data):
    _import_any(data)


def test_the_small_model_imports_and_computes_right():
    graph = import_onnx(_small_model().SerializeToString())
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    h = np.maximum(x @ (np.arange(12, dtype=np.float32).reshape(3, 4) / 10) + 1, 0).reshape(4, 2) * 0.5
    want = np.exp(h) / np.exp(h).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(Interpreter(graph).run({"x": x})[0], want, rtol=1e-6)


def test_bytes_with_external_data_are_refused_and_the_file_never_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.bin").write_bytes(np.full(12, 7.0, np.float32).tobytes())
    model = _small_model()
    _external(model.graph.initializer[0], "secret.bin")
    with pytest.raises(FrontendError) as info:
        import_onnx(model.SerializeToString())
    message = _one_line(info.value)
    assert "initializer 'w'" in message and "'secret.bin'" in message


def test_a_name_that_is_not_utf8_is_refused():
    data = _small_model().SerializeToString().replace(b"MatMul", b"\x8datMul")
    with pytest.raises(FrontendError) as info:
        import_onnx(data)
    assert "op_type is not UTF-8" in _one_line(info.value) and "'mm'" in str(info.value)


def _derived_length_model(side: int) -> bytes:
    """Shape(big) -> d0 * d1 -> Reshape(x, [d0 * d1]) -> Mul: only onnx's data propagation learns the
    1-D length side**2, and it then spends memory in proportion to it (2**40 here: all the machine has)."""
    nodes = [helper.make_node("Shape", ["big"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["d0"], axis=0),
             helper.make_node("Gather", ["s", "i1"], ["d1"], axis=0),
             helper.make_node("Mul", ["d0", "d1"], ["n"]),
             helper.make_node("Reshape", ["x", "n"], ["q"]),
             helper.make_node("Mul", ["q", "half"], ["y"])]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "i0"),
             numpy_helper.from_array(np.array([1], np.int64), "i1"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [side * side]),
                                           helper.make_tensor_value_info("big", TensorProto.FLOAT, [side, side])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def test_shape_propagation_stays_bounded():
    """A small derived length is propagated (y's shape known); 2**40 costs at most the child's bounds, and
    the import still gives a graph."""
    small = import_onnx(_derived_length_model(3))
    assert str(small.outputs[0].type) == "f32[9]"
    began = time.perf_counter()
    import_onnx(_derived_length_model(2 ** 20))
    assert time.perf_counter() - began < 10.0


def test_hostile_names_in_a_gantt_plot_are_plain_text(tmp_path):
    """A '$' in a node name is a dollar sign (matplotlib would parse "$\\frac{$" as mathtext and fail), a
    newline is escaped."""
    pytest.importorskip("matplotlib")
    from hetflow.passes.schedule import Event, Schedule
    from hetflow.plots import gantt_plot
    events = [Event("mm $\\frac{$ \r\n__import__('os')", "cpu", 0.0, 1e-3, "matmul", "MatMul"),
              Event("relu $x^{", "cpu", 1e-3, 2e-3, "elementwise", "Relu")]
    path = gantt_plot(Schedule("synthetic", events), tmp_path / "hostile.png", title="hostile")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ====================================================================================================
# Hostile inputs: the C kernel cache
# ====================================================================================================
# Hostile inputs to the C kernel cache (issue #13): a truncated or altered cached library, files
# others may write, a compiler that hangs, fails or writes garbage.


NEEDS_CC = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler here")

SOURCE = "int hetflow_test_add(int a, int b) { return a + b; }\n"
SYMBOL = "hetflow_test_add"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory (this user's, mode 700) and a process that remembers nothing yet."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("HETFLOW_CACHE_DIR", str(directory))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_failed", {})
    return directory


def _library(cache: Path) -> Path:
    (library,) = cache.glob("add-*.so")
    return library


def _in_a_fresh_process(cache: Path) -> subprocess.CompletedProcess:
    """Load and call the kernel in a new Python (as a later run would): prints its answer or None."""
    code = textwrap.dedent(f"""
        import warnings
        warnings.simplefilter("always")
        from hetflow.support.native import compiled_function
        f = compiled_function("add", {SOURCE!r}, {SYMBOL!r})
        print(None if f is None else f(2, 3))
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HETFLOW_CACHE_DIR=str(cache)))


def _build_in_a_fresh_process(cache):
    run = _in_a_fresh_process(cache)
    assert run.returncode == 0 and run.stdout.strip() == "5", run
    library = _library(cache)
    assert native.record_path(library).exists()
    return library


def _add():
    return native.compiled_function("add", SOURCE, SYMBOL)


@NEEDS_CC
def test_built_library_has_its_hash_recorded_and_is_this_users_only(cache):
    assert _add()(2, 3) == 5
    library = _library(cache)
    digest = native.record_path(library).read_text().split()[0]
    assert digest == hashlib.sha256(library.read_bytes()).hexdigest()
    for path in (cache, library, native.record_path(library)):
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, path
    assert not list(cache.glob("*.tmp"))


@NEEDS_CC
def test_truncated_library_is_rebuilt_and_works(cache):
    library = _build_in_a_fresh_process(cache)
    size = library.stat().st_size
    library.write_bytes(library.read_bytes()[: size // 3])  # as a crash mid-write leaves it
    run = _in_a_fresh_process(cache)
    assert run.returncode == 0, run  # was: SIGBUS in every later run
    assert run.stdout.strip() == "5" and "NativeFallbackWarning" not in run.stderr, run
    assert library.stat().st_size == size


@NEEDS_CC
def test_library_altered_behind_its_record_is_rebuilt_not_loaded(cache, tmp_path):
    library = _build_in_a_fresh_process(cache)
    other = tmp_path / "other.so"
    subprocess.run([shutil.which("cc") or "gcc", "-shared", "-fPIC", "-x", "c", "-", "-o", str(other)], check=True,
                   input="int hetflow_test_add(int a, int b) { return 99; }\n", text=True, timeout=120)
    library.write_bytes(other.read_bytes())  # a loadable library, just not the one recorded
    assert _add()(2, 3) == 5


@NEEDS_CC
def test_unrecorded_library_is_rebuilt(cache):
    library = _build_in_a_fresh_process(cache)
    native.record_path(library).unlink()
    assert _add()(2, 3) == 5
    assert native.record_path(library).exists()


@NEEDS_CC
@pytest.mark.parametrize("target", ["library", "record", "directory"])
@pytest.mark.parametrize("mode", [0o775, 0o757])
def test_group_or_world_writable_cache_is_refused_and_said(cache, target, mode):
    library = _build_in_a_fresh_process(cache)
    path = {"library": library, "record": native.record_path(library), "directory": cache}[target]
    os.chmod(path, mode)
    with pytest.warns(native.NativeFallbackWarning, match=r"writable by group or others") as said:
        assert _add() is None
    assert str(path) in str(said[0].message) and library.name in str(said[0].message)
    assert os.stat(path).st_mode & 0o777 == mode  # refused, not rebuilt over
    _said_nothing(lambda: _add() is None)  # remembered: said once


@NEEDS_CC
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give a file away")
def test_library_owned_by_another_user_is_refused(cache):
    library = _build_in_a_fresh_process(cache)
    os.chown(library, os.getuid() + 4242, -1)
    with pytest.warns(native.NativeFallbackWarning, match=rf"owned by uid {os.getuid() + 4242}"):
        assert _add() is None


def _said_nothing(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert call()
    assert not caught, [str(w.message) for w in caught]


def _fake_compiler(tmp_path, monkeypatch, body: str) -> Path:
    """A ``cc`` first on PATH running ``body`` (sh); it logs each start to ``runs``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    runs = tmp_path / "runs"
    script = bin_dir / "cc"
    script.write_text(f"#!/bin/sh\necho \"$$\" >> {runs}\n{body}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return runs


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has ended (this container's init may not reap it)


@NEEDS_CC
def test_hanging_compiler_is_killed_with_its_children_and_remembered(cache, tmp_path, monkeypatch):
    runs = _fake_compiler(tmp_path, monkeypatch, f"sleep 300 &\necho \"$!\" >> {tmp_path / 'runs'}\nwait")
    monkeypatch.setenv("HETFLOW_CC_TIMEOUT", "1")
    start = time.monotonic()
    with pytest.warns(native.NativeFallbackWarning, match=r"ran past 1 s and was killed.*HETFLOW_CC_TIMEOUT"):
        assert _add() is None
    assert time.monotonic() - start < 10
    pids = [int(line) for line in runs.read_text().split()]
    assert len(pids) == 2  # the compiler and the sleep it started
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids), pids
    start = time.monotonic()
    _said_nothing(lambda: _add() is None)
    assert time.monotonic() - start < 1
    assert len(runs.read_text().split()) == 2  # not run again


@NEEDS_CC
def test_compile_error_is_said_and_remembered(cache, tmp_path, monkeypatch):
    runs = _fake_compiler(tmp_path, monkeypatch, "echo 'x.c:1: error: no such type' >&2\nexit 1")
    with pytest.warns(native.NativeFallbackWarning, match=r"failed \(exit status 1\): x.c:1: error: no such type"):
        assert _add() is None
    _said_nothing(lambda: _add() is None)
    assert len(runs.read_text().split()) == 1


@NEEDS_CC
def test_unloadable_library_is_rebuilt_once_then_said(cache, tmp_path, monkeypatch):
    # The cache holds a library that is recorded but does not load; the compiler writes the same garbage.
    cache.mkdir(mode=0o700)
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:12]
    library = cache / f"add-{digest}.so"
    library.write_bytes(b"not an ELF file")
    os.chmod(library, 0o700)
    native._write_whole(native.record_path(library),
                        f"{hashlib.sha256(b'not an ELF file').hexdigest()}  {library.name}\n", "t")
    runs = _fake_compiler(tmp_path, monkeypatch,
                          'while [ "$1" != "-o" ]; do shift; done\nprintf "not an ELF file" > "$2"')
    with pytest.warns(native.NativeFallbackWarning, match=r"rebuilt, and still .*does not load"):
        assert _add() is None
    assert len(runs.read_text().split()) == 1  # rebuilt once, not in a loop
    _said_nothing(lambda: _add() is None)


@NEEDS_CC
def test_bad_timeout_setting_is_said(cache, monkeypatch):
    monkeypatch.setenv("HETFLOW_CC_TIMEOUT", "soon")
    with pytest.warns(native.NativeFallbackWarning, match=r"HETFLOW_CC_TIMEOUT='soon' is not a number"):
        assert _add() is None



@NEEDS_CC
def test_processes_building_at_once_all_load_a_whole_library(cache):
    code = textwrap.dedent(f"""
        from hetflow.support.native import compiled_function
        f = compiled_function("add", {SOURCE!r}, {SYMBOL!r})
        print(None if f is None else f(2, 3))
    """)
    env = dict(os.environ, HETFLOW_CACHE_DIR=str(cache))
    procs = [subprocess.Popen([sys.executable, "-W", "error", "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [(p.returncode, out.strip()) for p, (out, _) in zip(procs, outs)] == [(0, "5")] * 4, outs
    assert not list(cache.glob("*.tmp"))
    assert _add()(2, 3) == 5


# ====================================================================================================
# Hostile inputs: the memory planner's input
# ====================================================================================================
# Hostile inputs to the memory planner (issue #13): malformed or oversized MiniMalloc CSVs,
# values past 2**62, and a problem of thousands of buffers.


HEADER = "id,lower,upper,size\n"
# Greedy by size peaks at 10 here, the optimum is the lower bound 9 (as in test_memplan's TRICKY).
TRICKY = [Buffer("a", 1, 5, 3), Buffer("b", 4, 5, 3), Buffer("c", 4, 5, 3), Buffer("d", 3, 4, 4)]


@pytest.mark.parametrize("data, fragments", [
    (HEADER + "a,0,10,-4\n", ["p.csv:2", "'a'", "negative size -4"]),
    (HEADER + "a,0,10,4\nb,7,7,1\n", ["p.csv:3", "'b'", "upper 7 <= lower 7"]),
    (HEADER + "a,9,3,1\n", ["p.csv:2", "'a'", "upper 3 <= lower 9"]),
    (HEADER + "a,0,ten,4\n", ["p.csv:2", "upper 'ten' is not an integer"]),
    (HEADER + "a,0,1.5,4\n", ["p.csv:2", "upper '1.5' is not an integer"]),
    (HEADER + "a,0,1_0,4\n", ["p.csv:2", "upper '1_0' is not an integer"]),
    (HEADER + "a,0,\u0661\u0662,4\n", ["p.csv:2", "is not an integer"]),  # Arabic-Indic digits
    (HEADER + "a,0,,4\n", ["p.csv:2", "upper '' is not an integer"]),
    (HEADER + "a,0,1,4\na,2,3,4\n", ["p.csv:3", "duplicate id 'a' (first on line 2)"]),
    ("id,lower,size\na,0,4\n", ["p.csv:1", "missing column(s) upper"]),
    ("id,lower,upper,size,size\na,0,1,2,3\n", ["p.csv:1", "size appear more than once"]),
    ("", ["p.csv:1", "empty file"]),
    ("\n \n\n", ["p.csv:1", "empty file"]),
    (HEADER + "a,0,1\n", ["p.csv:2", "3 fields, expected 4"]),
    (HEADER + ",0,1,2\n", ["p.csv:2", "empty id"]),
    (HEADER + 'a,0,1,"2\n3"\n', ["p.csv:3", "size '2\\n3' is not an integer"]),  # a quoted newline
    (HEADER.encode() + b"a,0,1,\xff\xfe\n", ["p.csv:2", "not UTF-8", "0xff"]),
    (HEADER + "a,0,1," + "9" * 200_000 + "\n", ["p.csv:2", "not valid CSV", "field larger than field limit"]),
    (HEADER + f"a,0,1,{'9' * 6000}\n", ["p.csv:2", "'a'", "size 999", "beyond the limit 2**62"]),
])
def test_bad_csv_is_one_line_naming_the_row(data, fragments):
    with pytest.raises(MemplanInputError) as info:
        read_problem_csv(data, name="p.csv")
    message = str(info.value)
    assert "\n" not in message
    assert len(message) < 300, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("column, row", [
    ("size", "big,0,10,9223372036854775808"),  # 2**63
    ("size", "big,0,10,4611686018427387905"),  # 2**62 + 1
    ("lower", "big,-9223372036854775809,10,1"),
    ("upper", "big,0,18446744073709551616,1"),  # 2**64
])
def test_values_past_2_62_are_refused_naming_the_buffer_and_the_value(column, row):
    with pytest.raises(MemplanInputError) as info:
        read_problem_csv(HEADER + row + "\n", name="p.csv")
    value = row.split(",")[("id", "lower", "upper", "size").index(column)]
    message = str(info.value)
    assert "\n" not in message
    assert "p.csv:2" in message and "'big'" in message and f"{column} {value}" in message, message


def test_2_62_itself_is_taken_and_planned_by_greedy_with_a_note():
    top = 1 << 62
    buffers = read_problem_csv(HEADER + f"a,0,10,{top}\nb,5,20,{top}\nc,-{top},{top},1\n")
    assert [b.size for b in buffers] == [top, top, 1]
    plan = solve(buffers, time_limit_s=1)
    check_plan(buffers, plan)
    assert plan.peak == plan.lower_bound == 2 * top + 1  # Python integers: past int64, still exact


def test_solve_refuses_oversized_and_non_integer_buffers():
    with pytest.raises(MemplanInputError, match=r"buffer 'x': size 9223372036854775808 is beyond the limit"):
        solve([Buffer("x", 0, 1, 1 << 63)])
    with pytest.raises(MemplanInputError, match=r"buffer 'x': lower 0.5 is not an integer"):
        solve([Buffer("x", 0.5, 1, 4)])
    with pytest.raises(ValueError, match="time limit"):
        solve([Buffer("x", 0, 1, 4)], time_limit_s=float("inf"))


def test_the_exact_search_skips_numbers_past_its_limit_and_says_so():
    unit = 1 << 59  # TRICKY scaled past 2**60, and made coprime so that no common unit scales it back
    buffers = [Buffer(b.id, b.lower, b.upper, b.size * unit + (b.id == "d")) for b in TRICKY]
    plan = solve(buffers, time_limit_s=1)
    check_plan(buffers, plan)
    assert plan.method == "greedy" and plan.peak > plan.lower_bound
    assert "exact search was skipped" in plan.note and "2**60" in plan.note, plan.note
    scaled = [Buffer(b.id, b.lower, b.upper, b.size * unit) for b in TRICKY]  # a common unit of 2**59 bytes
    assert solve(scaled, time_limit_s=1).peak == 9 * unit


def _cli_lines(argv, capsys):
    code = hetflow_main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("data, fragment", [
    (HEADER + "a,0,10,9223372036854775808\n", "size 9223372036854775808"),
    (HEADER.encode() + b"a,0,\x80,1\n", "not UTF-8"),
    (b"", "empty file"),
    (HEADER + "a,0,1,2\na,0,1,2\n", "duplicate id"),
])
def test_hetflow_memplan_on_bad_input_exits_1_with_one_line(tmp_path, capsys, data, fragment):
    path = tmp_path / "bad.csv"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    code, lines = _cli_lines(["memplan", str(path)], capsys)
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("hetflow: error: ") and "bad.csv:" in lines[0], lines
    assert fragment in lines[0] and "Traceback" not in lines[0]


def test_hetflow_memplan_unwritable_output_is_one_line(tmp_path, capsys):
    path = tmp_path / "p.csv"
    path.write_text(HEADER + "a,0,1,2\n")
    code, lines = _cli_lines(["memplan", str(path), "-o", str(tmp_path / "no" / "such" / "dir.csv")], capsys)
    assert code == 1 and len(lines) == 1 and "cannot write the plan" in lines[0], lines


def _many(n, seed=0):
    rng = random.Random(seed)
    buffers = []
    for i in range(n):
        lower = rng.randrange(0, 4 * n)
        buffers.append(Buffer(f"b{i}", lower, lower + rng.randrange(1, 200), rng.randrange(1, 1 << 20)))
    return buffers


def test_six_thousand_buffers_solve():
    buffers = _many(6000)
    plan = solve(buffers, time_limit_s=2)
    check_plan(buffers, plan)
    assert plan.peak <= plan.greedy_peak and plan.peak >= plan.lower_bound


def test_the_sparse_tables_match_the_dense_ones():
    import numpy as np
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 40))
        lowers = rng.integers(-5, 30, n)
        uppers = lowers + rng.integers(1, 15, n)
        inst = memplan_search._Instance(lowers, uppers, rng.integers(0, 100, n), 1000, 1)
        slo, shi = inst.slo, inst.shi
        dense = (slo[:, None] < shi[None, :]) & (slo[None, :] < shi[:, None])
        np.fill_diagonal(dense, False)
        assert (inst.adj == dense).all()
        assert memplan_search._overlapping_pairs(lowers, uppers) == dense.sum() // 2
        start, members = inst.section_members()
        for s in range(inst.S):
            assert members[start[s]:start[s + 1]].tolist() == np.flatnonzero(inst.member[s]).tolist()


def test_too_many_overlapping_pairs_keep_greedy_and_say_so(monkeypatch):
    assert solve(TRICKY, time_limit_s=1).peak == 9
    monkeypatch.setattr(memplan_search, "MAX_PAIRS", 6)  # TRICKY has 4 pairs: 8 neighbour entries
    plan = solve(TRICKY, time_limit_s=1)
    check_plan(TRICKY, plan)
    assert plan.method == "greedy" and plan.peak == 10 and not plan.optimal
    assert "exact search was skipped (4 pairs of buffers live at the same time" in plan.note, plan.note
    with pytest.raises(InfeasibleError, match="no plan found within capacity 9 by greedy"):
        solve(TRICKY, capacity=9, time_limit_s=1)


def test_the_python_search_has_its_own_limit(monkeypatch):
    monkeypatch.setattr(memplan_search, "PYTHON_MAX_CELLS", 10)
    lowers, uppers, sizes = zip(*[(b.lower, b.upper, b.size) for b in TRICKY])
    assert "too many for the Python search" in memplan_search.too_large(lowers, uppers, sizes, 9, native=False)
    with pytest.raises(memplan_search.TooLarge):
        memplan_search.fit(lowers, uppers, sizes, 9, native=False)


# ---------------------------------------------------------------- fuzz

def _reads_or_says_why(data):
    try:
        buffers = read_problem_csv(data, name="fuzz.csv")
    except MemplanInputError as e:
        assert isinstance(e, HetflowError)
        assert "\n" not in str(e) and str(e).startswith("fuzz.csv:"), str(e)
        return
    for b in buffers:
        assert b.size >= 0 and b.lower < b.upper and max(abs(b.lower), abs(b.upper), b.size) <= 1 << 62


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_any_bytes(data):
    _reads_or_says_why(data)
    _reads_or_says_why(HEADER.encode() + data)


_FIELD = st.one_of(
    st.integers(-(1 << 70), 1 << 70).map(str),
    st.sampled_from(["", " ", "-", "+", "0x10", "1e3", "1_000", "nan", "\u0663", '"', '""', "\x00", "a,b"]),
    st.text(max_size=8),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(_FIELD, min_size=0, max_size=6), max_size=8),
       st.sampled_from(["\n", "\r\n", "\r"]),
       st.permutations(["id", "lower", "upper", "size"]))
def test_fuzz_csv_like_text(rows, newline, header):
    text = ",".join(header) + newline + newline.join(",".join(r) for r in rows)
    _reads_or_says_why(text)
    _reads_or_says_why(text.encode("utf-8", "surrogatepass"))


# ====================================================================================================
# The fuzzers' kept corpus (benchmarks/fuzz.py), replayed: each input a HetflowError or nothing
# ====================================================================================================

@pytest.mark.parametrize("target", ["manifest", "onnx", "platform", "memplan", "npy"])
def test_the_kept_fuzz_corpus_replays_without_a_crash(target):
    from .benchmarks_path import load_benchmark
    fuzz = load_benchmark("fuzz")
    with deadline(300):
        count, crashes = fuzz.replay(target)
    assert count > 0, f"tests/fuzz_corpus/{target}/ is empty: run benchmarks/fuzz.py {target}"
    assert crashes == [], crashes


ATTENDING = """graph g(%q: f32[1,1,64], %k: f32[1,1,64], %v: f32[1,1,64], %kc: f32[1,2,8,32], %vc: f32[1,2,8,32], %pos: i64[1]) -> (%y: f32[1,1,64]) opset 18 {
  %a: f32[1,1,64] = hetflow.decode_attention(%q, %k, %v, %kc, %vc, %pos) {scale = 0.25}
  %y: f32[1,1,64] = Add(%a, %q)
  return %y
}"""


def _attending(tmp_path):
    """An artifact whose CPU partition writes a KV cache in place: decode_attention as GroupQueryAttention, its
    present outputs bound to the cache inputs' buffers (metadata ``hetflow.inplace_outputs``)."""
    from hetflow.api import compile_graph
    from hetflow.ir.program import INPLACE_OUTPUTS
    path = compile_graph(parse_graph(ATTENDING), platform="host").save(tmp_path / "m")
    model = onnx.load_from_string((path / "cpu" / "part0.onnx").read_bytes())
    declared = json.loads({p.key: p.value for p in model.metadata_props}[INPLACE_OUTPUTS])
    assert {e["input"] for e in declared.values()} == {"kc", "vc"}
    return path


def _inplace_metadata(edit_entries):
    def edit(model):
        from hetflow.ir.program import INPLACE_OUTPUTS
        for prop in model.metadata_props:
            if prop.key == INPLACE_OUTPUTS:
                prop.value = edit_entries(json.loads(prop.value))
    return edit


def _entry(field, value):
    def edit(entries):
        first = next(iter(entries))
        entries[first][field] = value
        return json.dumps(entries)
    return edit


def _larger_present(model):
    model.graph.output[1].type.tensor_type.shape.dim[2].dim_value = 4000


def _undeclared_present(model):
    del model.metadata_props[:]


@pytest.mark.parametrize("edit, expected", [
    (_larger_present, "output 'kc_present' is written into input 'kc''s buffer but is declared f32[1,2,4000,32]"),
    (_undeclared_present, "the model's outputs after the partition's are ['kc_present', 'vc_present']; the "
                          "metadata 'hetflow.inplace_outputs' declares []"),
    (_inplace_metadata(_entry("input", "q")), "writes 'kc_present' into 'q', which is not a partition input of a "
                                              "static floating [B, H, S, D] type"),
    (_inplace_metadata(_entry("input", "vc")), "writes 'vc_present' into 'vc', which is not a partition input"),
    (_inplace_metadata(_entry("position", "q")), "gives 'kc_present' the position 'q', which is not an i64"),
    (_inplace_metadata(_entry("input", 7)), "entry for 'kc_present' is not {input, position, node} names"),
    (_inplace_metadata(lambda entries: "[1]"), "is a JSON list, not an object"),
    (_inplace_metadata(lambda entries: json.dumps({"y": entries["kc_present"], "vc_present": entries["vc_present"]})),
     "names 'y', an input or output of the partition, as an output written in place"),
])
def test_an_inplace_binding_must_name_a_cache_input_of_its_type(tmp_path, edit, expected):
    path = _attending(tmp_path)
    _rewrite_partition(path, edit)
    assert expected in _refused(path)


def test_an_inplace_artifact_runs_and_leaves_its_inputs_unchanged(tmp_path):
    path = _attending(tmp_path)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(s, dtype=np.float32) for n, s in
             (("q", (1, 1, 64)), ("k", (1, 1, 64)), ("v", (1, 1, 64)), ("kc", (1, 2, 8, 32)), ("vc", (1, 2, 8, 32)))}
    feeds["pos"] = np.array([5])
    before = {n: a.copy() for n, a in feeds.items()}
    expected = Interpreter(parse_graph(ATTENDING)).run(feeds)[0]
    np.testing.assert_allclose(load(path).run(feeds)["y"], expected, rtol=1e-5, atol=1e-6)
    assert all(np.array_equal(feeds[n], before[n]) for n in feeds)
