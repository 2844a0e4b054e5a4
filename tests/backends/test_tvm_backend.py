"""The TVM CPU backend (``cpu_backend="tvm"``): same outputs as the interpreter, a hashed .so in the artifact,
clean errors for what TVM cannot compile and for a machine without TVM."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import helper

import hetflow
from hetflow.backends.cpu import BackendError
from hetflow.runtime import ArtifactError, load
from hetflow.runtime.interpreter import Interpreter

from ..onnx_models import mlp_model as _mlp_model

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tvm():
    return pytest.importorskip("tvm", reason="apache-tvm is not importable: the TVM CPU backend cannot be tested")


def interpreter_outputs(compiled, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return Interpreter(compiled.graph).run(feeds)


def close(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(got - expected))) / max(1.0, float(np.max(np.abs(expected))))


def mlp_model(width=32, layers=3) -> onnx.ModelProto:
    return _mlp_model(width, layers, batch=8)


@pytest.fixture(scope="module")
def mlp_artifact(tvm, tmp_path_factory):
    """The torch example MLP compiled with TVM for host, saved once for the tests that read the artifact."""
    import torch  # noqa: F401  (the example is a torch module)
    from hetflow.examples import mlp
    module, inputs = mlp.build()
    compiled = hetflow.compile(module, inputs, platform="host", cpu_backend="tvm")
    out = tmp_path_factory.mktemp("tvm") / "mlp"
    compiled.save(out)
    x = inputs[0].numpy()
    return compiled, out, x


def test_mlp_equals_interpreter(mlp_artifact):
    compiled, _, x = mlp_artifact
    assert {p.backend for p in compiled.partitions} == {"tvm-llvm"}
    expected = interpreter_outputs(compiled, {compiled.input_names[0]: x})[0]
    assert close(compiled(__import__("torch").from_numpy(x)).numpy(), expected) <= TOLERANCE


def test_small_transformer_equals_interpreter(tvm):
    import torch
    from hetflow.examples import models
    module, inputs = models.build_gpt2(n_layer=1, n_embd=32, n_head=2, seq=8, vocab=50)
    compiled = hetflow.compile(module, inputs, platform="host", cpu_backend="tvm")
    assert any(p.backend == "tvm-llvm" for p in compiled.partitions)
    feeds = {compiled.input_names[0]: inputs[0].numpy()}
    expected = interpreter_outputs(compiled, feeds)[0]
    with torch.no_grad():
        eager = module(*inputs).numpy()
    got = compiled(*inputs).numpy()
    assert close(got, expected) <= TOLERANCE
    assert close(got, eager) <= TOLERANCE


def test_manifest_records_backend_and_hashes_the_library(mlp_artifact):
    _, out, _ = mlp_artifact
    manifest = json.loads((out / "manifest.json").read_text())
    [entry] = manifest["partitions"]
    assert entry["backend"] == "tvm-llvm" and entry["file"].endswith(".so")
    assert entry["target"]["kind"] == "llvm"
    assert manifest["files"][entry["file"]].startswith("sha256:")
    assert not (out / entry["file"].replace(".so", ".onnx")).exists()


def test_artifact_runs_in_a_fresh_process(mlp_artifact, tmp_path):
    compiled, out, x = mlp_artifact
    np.save(tmp_path / "x.npy", x)
    name = compiled.input_names[0]
    proc = subprocess.run([sys.executable, "-m", "hetflow", "run", str(out), "--input", f"{name}={tmp_path / 'x.npy'}",
                           "--output-dir", str(tmp_path / "res"), "--trust-native-code"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "TVM LLVM, measured" in proc.stdout
    [result] = list((tmp_path / "res").glob("*.npy"))
    expected = interpreter_outputs(compiled, {name: x})[0]
    assert close(np.load(result), expected) <= TOLERANCE


def test_tampered_library_is_refused(mlp_artifact, tmp_path):
    import shutil
    _, out, _ = mlp_artifact
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    lib = copy / "cpu" / "part0.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"part0\.so was modified"):
        load(copy)


def test_loading_without_tvm_is_one_clean_line(mlp_artifact):
    _, out, _ = mlp_artifact
    script = textwrap.dedent(f"""
        import sys
        sys.modules["tvm"] = None            # any 'import tvm' now fails
        from hetflow.cli import main
        sys.exit(main(["run", r"{out}", "--random", "--trust-native-code"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "partition 0 (cpu/part0.so)" in lines[0] and "pip install apache-tvm" in lines[0]


def test_a_tvm_artifact_runs_only_when_trusted(mlp_artifact, capsys):
    from hetflow.cli import main
    _, out, _ = mlp_artifact
    assert main(["run", str(out), "--random"]) == 1
    assert "--trust-native-code" in capsys.readouterr().err
    digest = load(out, prepare=False).digest
    assert main(["run", str(out), "--random", "--trust-manifest", digest]) == 0
    assert main(["run", str(out), "--random", "--trust-manifest", "sha256:" + "0" * 64]) == 1


def test_onnxruntime_artifact_runs_without_tvm_or_torch(tmp_path):
    hetflow.compile(mlp_model()).save(tmp_path / "out")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None
        sys.modules["tvm"] = None
        from hetflow.cli import main
        sys.exit(main(["run", r"{tmp_path / 'out'}", "--random"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ONNX Runtime, measured" in proc.stdout


def test_op_tvm_lacks_fails_the_compile(tvm):
    model = mlp_model(layers=1)
    model.graph.node.append(helper.make_node("Celu", ["a0"], ["y"], name="my_celu"))
    model.graph.output[0].name = "y"
    with pytest.raises(BackendError, match=r"partition 0 \(cpu/part0\.so\).*Celu.*my_celu"):
        hetflow.compile(model, cpu_backend="tvm")
    assert hetflow.compile(model)(np.ones((8, 32), np.float32)).shape == (8, 32)  # ONNX Runtime has Celu


def test_converter_failure_names_the_op(tvm, monkeypatch):
    from tvm.relax.frontend.onnx import onnx_frontend

    def broken(cls, bb, inputs, attr, params):
        raise ValueError("no Relu today")
    monkeypatch.setattr(onnx_frontend.Relu, "_impl_v13", classmethod(broken))
    with pytest.raises(BackendError, match=r"partition 0 .*op Relu \(ONNX node 'n\d+ .*act0.*no Relu today"):
        hetflow.compile(mlp_model(layers=1), cpu_backend="tvm")


def test_unknown_cpu_backend_is_refused():
    from hetflow.api import CompileError
    with pytest.raises(CompileError, match="tensorrt.*onnxruntime, tvm"):
        hetflow.compile(mlp_model(), cpu_backend="tensorrt")


def test_tvm_partitions_beside_a_simulated_device(tvm):
    """mobile-soc split puts part of a small GPT-2 on the NPU (its simulator): TVM's CPU partitions run in their
    worker thread, synchronised by flags, and give the ONNX Runtime build's outputs."""
    from hetflow.examples import models
    module, inputs = models.build_gpt2(n_layer=1, n_embd=128, n_head=2, seq=64, vocab=50)
    options = dict(platform="mobile-soc", placement="split", time_limit=3)
    reference = hetflow.compile(module, inputs, **options)
    compiled = hetflow.compile(module, inputs, cpu_backend="tvm", **options)
    backends = {p.backend for p in compiled.partitions}
    if not {"tvm-llvm", "npu"} <= backends:
        pytest.skip(f"placement gave partitions {sorted(backends)}: no mix of TVM and a simulated device to test")
    assert close(compiled(*inputs).numpy(), reference(*inputs).numpy()) <= TOLERANCE
    assert compiled.executor.last.waits


def test_library_for_a_cpu_with_more_features_is_refused(tvm):
    from hetflow.platform.targets import TargetError, check_target, host_target
    from tvm.target import codegen
    check_target(host_target(), "partition 0 (cpu/part0.so)")  # this machine's own target passes
    newer = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"})
    if not {f for f in codegen.llvm_get_cpu_features(newer) if f.startswith("avx512")} - \
            codegen.llvm_get_cpu_features(tvm.target.Target(host_target())):
        pytest.skip("this CPU has AVX-512: no CPU LLVM knows is missing features here")
    with pytest.raises(TargetError, match=r"partition 0 \(cpu/part0\.so\) was compiled by TVM for CPU "
                                           r"sapphirerapids.*lacks.*avx512"):
        check_target({"kind": "llvm", "mcpu": "sapphirerapids"}, "partition 0 (cpu/part0.so)")
