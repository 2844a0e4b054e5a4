"""The runtime: artifacts run without torch, partitions on several devices synchronise, bad artifacts are refused."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import hetflow
from hetflow.runtime import load
from hetflow.runtime.executor import RuntimeFailure
from hetflow.runtime.interpreter import Interpreter
from hetflow.runtime.sync import Flags

from ..onnx_models import mlp_model


def test_run_without_torch(tmp_path):
    model = mlp_model()
    hetflow.compile(model).save(tmp_path / "out")
    np.save(tmp_path / "x.npy", np.ones((32, 64), np.float32))
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None          # any 'import torch' now fails
        sys.modules["transformers"] = None
        from hetflow.cli import main
        code = main(["run", r"{tmp_path / 'out'}", "--input", r"x={tmp_path / 'x.npy'}"])
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        sys.exit(code)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ONNX Runtime, measured" in proc.stdout


def test_multi_device_run_synchronises_and_matches(tmp_path):
    model = mlp_model(width=256, layers=6)
    compiled = hetflow.compile(model, platform="mobile-soc", placement="optimal")
    devices = {p.device for p in compiled.executor.partitions}
    x = np.random.default_rng(1).standard_normal((32, 256)).astype(np.float32)
    expected = Interpreter(hetflow.frontends.onnx.import_onnx(model)).run({"x": x})[0]
    got = compiled(x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    if len(devices) > 1:
        waits = compiled.executor.last.waits
        assert waits and all(seen >= signalled for _, signalled, seen in waits)
    compiled.save(tmp_path / "out")
    again = load(tmp_path / "out").run({"x": x})
    np.testing.assert_allclose(next(iter(again.values())), expected, rtol=1e-5, atol=1e-5)


CUDA_PLATFORM = """
name = "cpu-and-cuda"
source = "a test platform: a CPU and a (pretend) measured CUDA GPU"
[memory.dram]
capacity = "8 GiB"
bandwidth = "10 GB/s"
[memory.hbm]
capacity = "8 GiB"
bandwidth = "1000 GB/s"
[link.pcie]
from = "dram"
to = "hbm"
bandwidth = "10 GB/s"
latency = "5 us"
[device.cpu]
kind = "cpu"
memory = "dram"
peak = { f32 = "1 GFLOP/s" }
[device.gpu]
kind = "gpu"
memory = "hbm"
peak = { f32 = "50 TFLOP/s" }
measured = true
"""


def test_cuda_artifact_on_a_machine_without_cuda(tmp_path):
    from hetflow.runtime.runners.cuda import cuda_available
    if cuda_available():
        pytest.skip("this machine has a CUDA GPU: the refusal cannot be shown here")
    platform_file = tmp_path / "cuda.toml"
    platform_file.write_text(CUDA_PLATFORM)
    model = mlp_model(width=256)
    compiled = hetflow.compile(model, platform=str(platform_file))
    assert any(p.backend == "cuda" for p in compiled._build_partitions())
    compiled.save(tmp_path / "out")
    with pytest.raises(RuntimeFailure, match=r"runs on device 'gpu' \(CUDA\).*--fallback cpu"):
        load(tmp_path / "out")
    loaded = load(tmp_path / "out", fallback="cpu")
    assert loaded.fallbacks and "PyTorch program runs on the CPU" in loaded.fallbacks[0]
    assert (tmp_path / "out" / "gpu").is_dir() and list((tmp_path / "out" / "gpu").glob("part*.py"))
    x = np.ones((32, 256), np.float32)
    expected = Interpreter(hetflow.frontends.onnx.import_onnx(model)).run({"x": x})[0]
    np.testing.assert_allclose(next(iter(loaded.run({"x": x}).values())), expected, rtol=1e-5, atol=1e-5)


def test_flags_wait_for_the_run_number():
    import threading
    import time
    flags = Flags(2)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(flags.wait(1, 7, time.perf_counter() + 0.002)))
    thread.start()
    time.sleep(0.01)
    assert not seen  # still waiting: the flag holds another run's number
    flags.signal(1, 7)
    thread.join(timeout=5)
    assert seen and seen[0][0] >= flags.set_at[1]


def test_gelu_argument_is_lowered_as_a_division():
    """The CPU lowering writes Erf(x * 1/sqrt2) as Erf(x / sqrt2), the form ONNX Runtime fuses into Gelu;
    the results stay the interpreter's."""
    import onnxruntime as ort
    from hetflow.backends.cpu import lower_partition
    from hetflow.ir import parse_graph
    text = """graph g(%x: f32[4,8]) -> (%y: f32[4,8]) opset 18 {
  weight %half: f32[] = dense<f32[]: [0.5]>
  weight %r: f32[] = dense<f32[]: [0.7071067690849304]>
  weight %one: f32[] = dense<f32[]: [1.0]>
  %a: f32[4,8] = Mul(%x, %r)
  %e: f32[4,8] = Erf(%a)
  %b: f32[4,8] = Add(%e, %one)
  %h: f32[4,8] = Mul(%x, %half)
  %y: f32[4,8] = Mul(%h, %b)
  return %y
}"""
    graph = parse_graph(text)
    model, _ = lower_partition(graph)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Div") == 1 and ops.count("Mul") == 2
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, Interpreter(graph).run({"x": x})[0], rtol=1e-6, atol=1e-6)


def test_outputs_belong_to_the_caller():
    """Outputs are written straight into arrays the caller keeps: a second call does not touch the first's."""
    model = mlp_model(width=64, layers=2)
    compiled = hetflow.compile(model, platform="host")
    rng = np.random.default_rng(2)
    x1, x2 = (rng.standard_normal((32, 64)).astype(np.float32) for _ in range(2))
    expected = Interpreter(hetflow.frontends.onnx.import_onnx(model))
    y1 = compiled(x1)
    keep = np.array(y1, copy=True)
    y2 = compiled(x2)
    assert not np.shares_memory(y1, y2)
    np.testing.assert_array_equal(y1, keep)
    np.testing.assert_allclose(y2, expected.run({"x": x2})[0], rtol=1e-5, atol=1e-5)
    assert not any(np.shares_memory(y1, arena) for arena in compiled.executor.arenas.values())


def test_an_output_reshape_is_bound_as_a_view_and_results_are_never_overwritten():
    """GPT-2's logits are Reshape(Gemm): the lowering drops the Reshape and ONNX Runtime writes the Gemm
    straight into the caller's array. A result the caller still holds is never written again; one it let go
    of is reused (no fresh pages each call)."""
    import onnx as onnx_lib
    from hetflow.backends.cpu import lower_partition
    from hetflow.ir import parse_graph
    values = ", ".join(f"{0.01 * (i % 13 - 6)}" for i in range(8 * 6))
    text = f"""graph g(%x: f32[4,8]) -> (%y: f32[1,4,6]) opset 18 {{
  weight %w: f32[6,8] = dense<f32[6,8]: [{values}]>
  weight %shape: i64[3] = dense<i64[3]: [1, 4, 6]>
  %h: f32[4,6] = Gemm(%x, %w) {{transB = 1}}
  %y: f32[1,4,6] = Reshape(%h, %shape)
  return %y
}}"""
    graph = parse_graph(text)
    model, _ = lower_partition(graph, view_outputs=True)
    assert [n.op_type for n in model.graph.node] == ["Gemm"]
    onnx_lib.checker.check_model(model)
    compiled = hetflow.compile(lower_partition(graph)[0], platform="host")
    lowered = onnx_lib.load_from_string(compiled._build_partitions()[0].onnx_bytes)
    assert "Reshape" not in {n.op_type for n in lowered.graph.node}
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    expected = Interpreter(graph).run({"x": x})[0]
    first = compiled(x)
    np.testing.assert_allclose(first, expected, rtol=1e-6, atol=1e-6)
    kept = first.copy()
    second = compiled(x * 2)
    assert second is not first  # the caller still holds the first result: it stays as it was
    np.testing.assert_array_equal(first, kept)
    address = second.__array_interface__["data"][0]
    del second
    third = compiled(x)
    assert third.__array_interface__["data"][0] == address  # let go of: written again in place
    np.testing.assert_allclose(third, expected, rtol=1e-6, atol=1e-6)


def test_artifact_weights_are_views_of_the_verified_bytes_equal_to_safetensors_own_load():
    import json as _json

    from safetensors.numpy import load, save

    from hetflow.runtime.artifact import ArtifactError, safetensors_views
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, -2], np.int64),
               "h": np.ones((2, 2), np.float16), "e": np.zeros((0, 3), np.float32)}
    data = save(tensors)
    views = safetensors_views(data, "weights.safetensors")
    expected = load(data)
    assert views.keys() == expected.keys()
    for name, array in expected.items():
        assert views[name].dtype == array.dtype and np.array_equal(views[name], array)
    assert not views["w"].flags.writeable and views["w"].base is not None      # a view, not a copy

    length = int.from_bytes(data[:8], "little")
    header = _json.loads(data[8:8 + length])

    def rebuilt(change) -> bytes:
        h = _json.loads(_json.dumps(header))
        change(h)
        text = _json.dumps(h).encode()
        return len(text).to_bytes(8, "little") + text + data[8 + length:]
    first, second = sorted((k for k in header if k != "__metadata__" and tensors[k].size),
                           key=lambda k: header[k]["data_offsets"])[:2]
    cases = {
        "shorter than": data[:5],
        "header claims": (10 ** 9).to_bytes(8, "little") + data[8:],
        "not JSON": (4).to_bytes(8, "little") + b"{{{{" + data[8 + length:],
        "do not hold": rebuilt(lambda h: h[first].update(shape=[99])),
        "overlaps": rebuilt(lambda h: h[second].update(data_offsets=[0, h[second]["data_offsets"][1] -
                                                                    h[second]["data_offsets"][0]])),
        "known dtype": rebuilt(lambda h: h[first].update(dtype="BF17")),
        "belong to no tensor": data + b"\0" * 8,
    }
    for words, bad in cases.items():
        with pytest.raises(ArtifactError, match=words):
            safetensors_views(bad, "weights.safetensors")
