"""The hetflow CLI and the artifact: compile, run, inspect; bad input gives one clear line and exit 1."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hetflow.cli import main


def mlp_onnx(path, op="Relu"):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node(op, ["h"], ["y"], name="act")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, path)
    return model


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_compile_run_inspect_roundtrip(tmp_path, capsys):
    model = mlp_onnx(tmp_path / "m.onnx")
    code, out, _ = run_cli(["compile", tmp_path / "m.onnx", "-o", tmp_path / "out"], capsys)
    assert code == 0 and "MatMul" in out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["schema"] == 1
    assert set(manifest["files"]) == {"graph.json", "weights.safetensors", "cpu/part0.onnx"}
    assert manifest["partitions"][0]["backend"] == "cpu"
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, _ = run_cli(["run", tmp_path / "out", "--input", f"x={tmp_path / 'x.npy'}",
                            "--output-dir", tmp_path / "res"], capsys)
    assert code == 0 and out.startswith("y: float32[4, 8]")
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(np.load(tmp_path / "res" / "y.npy"), expected, rtol=1e-5, atol=1e-5)
    code, out, _ = run_cli(["inspect", tmp_path / "out", "--ir"], capsys)
    assert code == 0 and "platform host" in out and "= MatMul(%x, %w)" in out


def one_line_error(code, err, *fragments):
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hetflow: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_truncated_onnx_file(tmp_path, capsys):
    mlp_onnx(tmp_path / "m.onnx")
    data = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "t.onnx").write_bytes(data[: len(data) // 2])
    one_line_error(*run_cli(["compile", tmp_path / "t.onnx", "-o", tmp_path / "o"], capsys)[::2],
                   "t.onnx", "not a valid ONNX model")


def test_unknown_op(tmp_path, capsys):
    model = mlp_onnx(tmp_path / "m.onnx")
    model.graph.node[1].op_type = "FancyAct"
    onnx.save(model, tmp_path / "u.onnx")
    code, _, err = run_cli(["compile", tmp_path / "u.onnx", "-o", tmp_path / "o"], capsys)
    assert code == 1 and "FancyAct" in err and "act" in err


def test_wrong_inputs_at_run_time(tmp_path, capsys):
    mlp_onnx(tmp_path / "m.onnx")
    assert run_cli(["compile", tmp_path / "m.onnx", "-o", tmp_path / "out"], capsys)[0] == 0
    cases = {
        "shape": (np.zeros((4, 15), np.float32), "x", ["input 'x'", "expected shape f32[4,16]", "f32[4,15]"]),
        "dtype": (np.zeros((4, 16), np.float64), "x", ["input 'x'", "expected dtype f32", "f64"]),
        "name": (np.zeros((4, 16), np.float32), "z", ["unknown input 'z'", "['x']"]),
    }
    for label, (array, name, fragments) in cases.items():
        np.save(tmp_path / f"{label}.npy", array)
        code, _, err = run_cli(["run", tmp_path / "out", "--input", f"{name}={tmp_path / label}.npy"], capsys)
        one_line_error(code, err, *fragments)
    code, _, err = run_cli(["run", tmp_path / "out"], capsys)
    one_line_error(code, err, "missing input 'x'")


def test_tampered_and_missing_artifact_files(tmp_path, capsys):
    mlp_onnx(tmp_path / "m.onnx")
    assert run_cli(["compile", tmp_path / "m.onnx", "-o", tmp_path / "out"], capsys)[0] == 0
    weights = tmp_path / "out" / "weights.safetensors"
    original = weights.read_bytes()
    data = bytearray(original)
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, _, err = run_cli(["run", tmp_path / "out", "--random"], capsys)
    one_line_error(code, err, "weights.safetensors", "was modified")
    weights.write_bytes(original)
    partition = tmp_path / "out" / "cpu" / "part0.onnx"
    partition.write_bytes(partition.read_bytes() + b"\0")
    code, _, err = run_cli(["run", tmp_path / "out", "--random"], capsys)
    one_line_error(code, err, "part0.onnx", "was modified")
    weights.unlink()
    code, _, err = run_cli(["run", tmp_path / "out", "--random"], capsys)
    one_line_error(code, err, "weights.safetensors", "missing")
    code, _, err = run_cli(["inspect", tmp_path / "nowhere"], capsys)
    one_line_error(code, err, "nowhere", "no such artifact")


@pytest.mark.parametrize("command", [[], ["compile"], ["run"], ["inspect"]])
def test_help_teaches(command, capsys):
    with pytest.raises(SystemExit) as info:
        main(command + ["--help"])
    assert info.value.code == 0
    assert "usage: hetflow" in capsys.readouterr().out


def test_console_script_gives_no_traceback(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage")
    proc = subprocess.run([sys.executable, "-m", "hetflow", "compile", str(tmp_path / "bad.onnx"), "-o",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "bad.onnx" in proc.stderr


def test_run_profile_times_each_group_on_its_own(tmp_path, capsys):
    """``--profile`` builds a runner per group: its context must answer what every loader asks (it once
    lacked the native-code trust fields and failed for every backend)."""
    mlp_onnx(tmp_path / "m.onnx")
    code, _, _ = run_cli(["compile", tmp_path / "m.onnx", "-o", tmp_path / "out"], capsys)
    assert code == 0
    code, out, err = run_cli(["run", tmp_path / "out", "--random", "--profile"], capsys)
    assert code == 0, err
    assert "measured" in out and "groups on real devices" in out
