"""The GPU backend (backends/gpu.py): the emitted PyTorch programs against the reference interpreter.

On a machine without a CUDA GPU (CI) the emitted programs run on the CPU with
PyTorch: every row of the backend's table is checked there, through the example
models and the ONNX node tests. The tests marked ``needs CUDA`` run the same
programs on a real GPU, in CUDA graphs, as Triton kernels and as PyTorch's.
"""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import hetflow
from hetflow.backends.cpu import BackendError
from hetflow.backends.gpu import CONSTANT_OPERANDS, TORCH_OPS, emit_failure, emit_program
from hetflow.runtime.runners.cuda import GpuPartition, cuda_available
from hetflow.examples import models
from hetflow.ir import parse_graph
from hetflow.runtime import load
from hetflow.runtime.interpreter import Interpreter

from ..runtime.test_runtime import CUDA_PLATFORM

MODELS = {
    "mlp": lambda: importlib.import_module("hetflow.examples.mlp").build(),
    "gpt2": lambda: models.build_gpt2(),
    "gpt2-decode": lambda: models.build_gpt2_decode(),
    "resnet18": lambda: models.build_resnet18(image=64),
    "vit": lambda: models.build_vit(hidden=96, layers=2, heads=4, image=64),
    "bert": lambda: models.build_bert(hidden=64, layers=2, heads=2, seq=16),
}
_NO_CUDA = pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU on this machine: the emitted programs "
                              "are checked on the CPU by the other tests of this file")


def NEEDS_CUDA(test):  # noqa: N802  (a decorator read like a mark); select them with pytest -m gpu
    return pytest.mark.gpu(_NO_CUDA(test))


def _feeds(graph, inputs) -> dict[str, np.ndarray]:
    return {v.name: t.numpy() for v, t in zip(graph.inputs, inputs)}


def _error(got: dict, want: list, graph) -> float:
    return max(float(np.abs(got[v.name].astype(np.float64) - w).max() / max(1.0, float(np.abs(w).max())))
               for v, w in zip(graph.outputs, want))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_program_of_a_whole_model_equals_the_interpreter(name):
    """The whole compiled graph emitted as one program and run by PyTorch on the CPU."""
    module, inputs = MODELS[name]()
    graph = hetflow.compile(module, inputs, platform="host", time_limit=5).graph
    source = emit_program(graph, name)
    ast.parse(source)  # a readable Python module: one line per op, each naming its op and source location
    ops = sum(len(n.attrs["body"].nodes) if n.op == "hetflow.group" else 1 for n in graph.nodes)
    assert sum("  # " in line for line in source.splitlines()) == ops
    runner = GpuPartition(source, {n: w.data for n, w in graph.weights.items()}, [v.name for v in graph.inputs],
                          [v.name for v in graph.outputs], name=name, kernels="torch", device="cpu")
    feeds = _feeds(graph, inputs)
    want = Interpreter(graph).run(feeds)
    assert _error(runner.run_dynamic(feeds), want, graph) <= 1e-5
    outputs = {v.name: np.empty(v.type.shape, v.type.dtype.numpy) for v in graph.outputs}
    runner.run(feeds, outputs)  # the runtime's path: results written into preallocated arrays
    assert _error(outputs, want, graph) <= 1e-5


def _gpu_cases():
    from hetflow.conformance import node_test_cases
    return [c for c in node_test_cases() if {n.op_type for n in c.model.graph.node} <= set(TORCH_OPS)]


def test_onnx_node_tests_are_emitted_right_or_refused_clearly():
    """Every ONNX node test made of the table's ops (and passed by onnx's reference): the program's outputs
    equal the expected ones, or emission refuses with an error naming the backend, node and op.
    Never a wrong answer, never a crash."""
    from hetflow.conformance import prepare_hetflow_gpu_program, prepare_reference, run_case
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in _gpu_cases():
            if run_case(case, prepare_reference).passed:
                results.append(run_case(case, lambda m: prepare_hetflow_gpu_program(m, device="cpu")))
    wrong = [(r.name, r.category, r.message[:120]) for r in results
             if r.category in ("mismatch", "crash") or (r.category == "error" and "backends.gpu" not in r.message)]
    assert not wrong, wrong[:10]
    passed = sum(r.passed for r in results)
    assert passed >= 0.75 * len(results), f"{passed}/{len(results)}"


GRAPH_WITH_RUNTIME_BOUNDS = """graph g(%x: f32[4,8], %start: i64[1]) -> (%y: f32[4,6], %z: f32[4,8]) opset 18 {
  weight %end: i64[1] = dense<i64[1]: [6]>
  weight %axes: i64[1] = dense<i64[1]: [1]>
  weight %axis: i64[] = dense<i64[]: [1]>
  weight %w: f32[8,8] = dense<f32[8,8]: [WEIGHTS]>
  %m: f32[4,8] = MatMul(%x, %w)
  %s: f32[4,6] = Slice(%m, %start, %end, %axes)
  %y: f32[4,6] = Relu(%s)
  %c: f32[4,8] = CumSum(%m, %axis)
  %z: f32[4,8] = Relu(%c)
  return %y, %z
}""".replace("WEIGHTS", ", ".join(f"{0.125 * (i % 7 - 3)}" for i in range(64)))


def test_placement_keeps_what_the_gpu_backend_refuses_off_the_gpu(tmp_path):
    """A Slice whose bounds arrive at run time and an op the table lacks (CumSum) go to the CPU, with the
    backend's reason; the MatMul goes to the GPU; the result equals the interpreter's."""
    graph = parse_graph(GRAPH_WITH_RUNTIME_BOUNDS)
    nodes = {n.outputs[0].name: n for n in graph.nodes}
    assert "given at run time" in emit_failure(nodes["s"])
    assert "CumSum" in emit_failure(nodes["c"]) and "has no GPU kernel" in emit_failure(nodes["c"])
    assert emit_failure(nodes["m"]) is None
    platform_file = tmp_path / "cuda.toml"
    platform_file.write_text(CUDA_PLATFORM)
    model = _onnx_of(GRAPH_WITH_RUNTIME_BOUNDS)
    compiled = hetflow.compile(model, platform=str(platform_file), passes=["place", "schedule", "plan_memory"])
    placed = {n.outputs[0].name: n.meta["device"] for n in compiled.graph.nodes}
    assert placed["m"] == "gpu" and placed["s"] == "cpu" and placed["c"] == "cpu"
    reasons = " ".join(str(n.meta.get("reason", "")) for n in compiled.graph.nodes)
    assert "given at run time" in reasons or "CumSum" in reasons
    compiled.save(tmp_path / "out")
    loaded = load(tmp_path / "out", fallback="cpu")
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32),
             "start": np.array([0], np.int64)}
    want = Interpreter(graph).run(feeds)
    for _ in range(5):  # the plan reuses the CPU's slot of s for c: the GPU must read s before it is overwritten
        got = loaded.run(feeds)
        for value, expected in zip(graph.outputs, want):
            np.testing.assert_allclose(got[value.name], expected, rtol=1e-5, atol=1e-5)


def _onnx_of(text: str):
    from hetflow.backends.cpu import lower_partition
    return lower_partition(parse_graph(text))[0]  # small weights: all inline


def test_an_op_the_table_lacks_is_an_error_naming_node_and_op():
    graph = parse_graph(GRAPH_WITH_RUNTIME_BOUNDS)
    with pytest.raises(BackendError, match=r"backends\.gpu: partition p: .*given at run time"):
        emit_program(graph, "p")
    graph = parse_graph(GRAPH_WITH_RUNTIME_BOUNDS.replace("%x: f32[4,8], %start: i64[1]", "%x: f32[4,8]")
                        .replace("weight %end", "weight %start: i64[1] = dense<i64[1]: [2]>\n  weight %end"))
    with pytest.raises(BackendError, match=r"op CumSum \(CumSum node \(%c\).*\) has no GPU kernel"):
        emit_program(graph, "p")


def test_every_constant_operand_row_reads_its_operand_at_emission():
    """CONSTANT_OPERANDS lists what the rows read at emission: each op there has a row."""
    assert set(CONSTANT_OPERANDS) <= set(TORCH_OPS)


def test_a_tampered_program_is_refused(tmp_path):
    platform_file = tmp_path / "cuda.toml"
    platform_file.write_text(CUDA_PLATFORM)
    from ..onnx_models import mlp_model
    compiled = hetflow.compile(mlp_model(width=256), platform=str(platform_file))
    compiled.save(tmp_path / "out")
    program = next((tmp_path / "out" / "gpu").glob("part*.py"))
    program.write_text(program.read_text().replace("torch.relu", "torch.sigmoid"))
    result = subprocess.run([sys.executable, "-m", "hetflow", "run", str(tmp_path / "out"), "--random",
                             "--fallback", "cpu"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "sha256" in result.stderr and program.name in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_stored_program_never_runs_even_with_its_hash_updated(tmp_path):
    """The manifest is not signed: whoever edits a program can edit its hash. The runtime regenerates the
    program from graph.json and refuses a stored one that differs, so the payload never runs."""
    import hashlib
    import json
    platform_file = tmp_path / "cuda.toml"
    platform_file.write_text(CUDA_PLATFORM)
    from ..onnx_models import mlp_model
    hetflow.compile(mlp_model(width=256), platform=str(platform_file)).save(tmp_path / "out")
    program = next((tmp_path / "out" / "gpu").glob("part*.py"))
    marker = tmp_path / "payload-ran"
    program.write_text(f"open({str(marker)!r}, 'w').close()\n" + program.read_text())
    manifest_path = tmp_path / "out" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    key = str(program.relative_to(tmp_path / "out"))
    manifest["files"][key] = "sha256:" + hashlib.sha256(program.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    result = subprocess.run([sys.executable, "-m", "hetflow", "run", str(tmp_path / "out"), "--random",
                             "--fallback", "cpu"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "differs from the one hetflow generates" in result.stderr, result.stderr
    assert not marker.exists(), "code from the artifact ran"


# --- on a real GPU ---------------------------------------------------------------------------------

@NEEDS_CUDA
@pytest.mark.parametrize("name, kernels", [("mlp", "torch"), ("mlp", "triton"), ("gpt2", "torch"),
                                           ("gpt2", "triton"), ("resnet18", "torch"), ("gpt2-decode", "torch")])
def test_host_cuda_runs_on_the_gpu_and_equals_the_interpreter(name, kernels, tmp_path):
    module, inputs = MODELS[name]()
    devices = ["gpu"]  # these small models would be placed on the CPU; test_placement... covers mixed plans
    compiled = hetflow.compile(module, inputs, platform="host+cuda", time_limit=5, devices=devices)
    backends = {p.backend for p in compiled._build_partitions()}
    assert "cuda" in backends, f"nothing was placed on the GPU: {backends}"
    compiled.save(tmp_path / "out")
    loaded = load(tmp_path / "out", gpu_kernels=kernels)
    assert not loaded.fallbacks
    feeds = _feeds(compiled.graph, inputs)
    want = Interpreter(compiled.graph).run(feeds)
    for _ in range(3):  # the first call captures the CUDA graphs; later ones replay them
        got = loaded.run(feeds)
    assert _error(got, want, compiled.graph) <= 1e-4
    runners = [r for r in loaded.executor.runners if isinstance(r, GpuPartition)]
    assert runners and all(r.graph is not None for r in runners), [r.note for r in runners]


@NEEDS_CUDA
def test_hetflow_run_on_the_gpu_from_the_command_line(tmp_path):
    from ..onnx_models import mlp_model
    model = tmp_path / "mlp.onnx"
    import onnx
    onnx.save(mlp_model(width=1024, layers=4), model)
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "hetflow", "compile", str(model), "--platform", "host+cuda", "-o",
                    str(out)], check=True, capture_output=True)
    assert list((out / "gpu").glob("part*.py"))
    result = subprocess.run([sys.executable, "-m", "hetflow", "run", str(out), "--random", "--profile"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "gpu" in result.stdout


@NEEDS_CUDA
def test_the_gpu_arena_is_device_memory(tmp_path):
    module, inputs = MODELS["gpt2"]()
    compiled = hetflow.compile(module, inputs, platform="host+cuda", time_limit=5, devices=["gpu"])
    executor = compiled.executor
    gpu_memories = executor.device_memories
    assert gpu_memories and all(isinstance(executor.arenas[m], torch.Tensor) and executor.arenas[m].is_cuda
                                for m in gpu_memories)


def test_the_triton_path_compiles_the_program_with_inductor():
    """kernels="triton": torch.fx traces the emitted program and TorchInductor compiles it (on the CPU it
    generates C++, on a GPU Triton): the same outputs as PyTorch's kernels, Split's outputs included."""
    graph = parse_graph("""graph g(%x: f32[4,8]) -> (%a: f32[4,3], %b: f32[4,5]) opset 18 {
  weight %sizes: i64[2] = dense<i64[2]: [3, 5]>
  %e: f32[4,8] = Exp(%x)
  %a: f32[4,3], %b: f32[4,5] = Split(%e, %sizes) {axis = 1}
  return %a, %b
}""")
    source = emit_program(graph, "split")
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)}
    want = Interpreter(graph).run(feeds)
    runner = GpuPartition(source, {n: w.data for n, w in graph.weights.items()}, ["x"], ["a", "b"], name="split",
                          kernels="triton", device="cpu")
    got = runner.run_dynamic(feeds)
    np.testing.assert_allclose(got["a"], want[0], rtol=1e-6)
    np.testing.assert_allclose(got["b"], want[1], rtol=1e-6)
