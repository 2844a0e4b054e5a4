"""The differential harness (benchmarks/differential.py): compiled models compute what the models compute.

The default suite runs a fast subset in this process: three small zoo models on three presets under every
placement policy (both pipelines), and 30 random ONNX graphs, each case compared with the interpreter on
the imported graph and with torch eager / ONNX Runtime. It also checks that the harness can fail: a fault
injected into one partition's output is found and named.

The full run (the whole zoo, every preset, three hash seeds in fresh processes, 500 random graphs) is
marked ``differential`` and is not run by default: ``python3 -m pytest -m differential``.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "differential.py"


def _load():
    name = "hetflow_benchmark_differential"
    if name not in sys.modules:  # registered: dataclasses look their module up
        spec = importlib.util.spec_from_file_location(name, PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


diff = _load()

FAST_MODELS = ["ex_mlp", "resnet", "ir_gpt2_decode"]
FAST_PLATFORMS = ["host", "mobile-soc", "duplex"]
CONFIGS = [(p, pl, pipe) for p in FAST_PLATFORMS for pl in diff.PLACEMENTS for pipe in diff.PIPELINES]


def _explain(cases) -> str:
    return "\n".join(f"{c.model} {c.platform}/{c.placement}/{c.pipeline}: {c.status}: {c.message}"
                     for c in cases if c.status != "pass")


@pytest.mark.parametrize("name", FAST_MODELS)
def test_zoo_model_matches_references(name):
    cases = diff.run_model(name, CONFIGS, seed=0, time_limit=0.5, case_timeout=60)
    assert len(cases) == len(CONFIGS)
    assert all(c.status == "pass" for c in cases), _explain(cases)
    from hetflow.examples.zoo import ZOO
    assert all(c.errors["interpreter"] <= ZOO[name].rtol for c in cases)


def test_random_graphs_match_onnxruntime():
    cases = diff.run_random(0, 30, seed=0, platforms=diff.PLATFORMS, placements=diff.PLACEMENTS,
                            pipelines=list(diff.PIPELINES), time_limit=0.5, case_timeout=60)
    assert len(cases) == 30
    assert len({c.detail["structure"] for c in cases}) >= 20  # distinct graphs, not one drawn 30 times
    assert all(c.status == "pass" for c in cases), _explain(cases)


def test_random_graph_strategy_covers_the_ops():
    from hypothesis import HealthCheck, given, settings
    ops: set[str] = set()

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(diff.random_graph_strategy())
    def draw(drawn):
        model, feeds, description = drawn
        assert set(feeds) == {i.name for i in model.graph.input}
        ops.update(description["ops"])

    draw()
    assert {"MatMul", "Concat", "Split", "Transpose", "Reshape", "Gather"} <= ops
    assert ops & set(diff.UNARY) and ops & set(diff.BINARY) and ops & set(diff.REDUCE)


def _compiled_llama():
    import hetflow
    from hetflow.examples.zoo import ZOO
    module, inputs = ZOO["llama"].build()
    graph, capture = diff.capture_once(module, inputs)
    feeds = {n: t.numpy() for n, t in zip(capture.input_names, inputs)}
    compiled = hetflow.compile(module, inputs, platform="mobile-soc", placement="optimal", time_limit=0.5)
    from hetflow.runtime.interpreter import Interpreter
    return compiled, feeds, Interpreter(graph).run(feeds)


def test_a_wrong_partition_output_is_found_and_named():
    compiled, feeds, reference = _compiled_llama()
    executor = compiled.executor
    if len(executor.partitions) < 3:
        pytest.skip("the placement kept llama on one device")
    target = next(i for i, p in enumerate(executor.partitions) if p.backend == "cpu" and i > 0)
    name = executor.partitions[target].output_names[0]
    original = executor._execute

    def faulty(index, env, *args, **kwargs):
        result = original(index, env, *args, **kwargs)
        if index == target:
            buffer = executor.buffers[name] if name in executor.buffers else env[name]
            buffer *= 2.0  # a wrong value, written by partition ``target``
        return result

    executor._execute = faulty
    found = diff.locate_divergence(compiled, feeds, 1e-4, reference)
    assert found["where"] == "runtime" and found["kind"] == "computed", found
    assert found["value"] == name and found["partition"] == target, found
    assert name in found["message"]


def test_a_value_changed_before_its_reader_is_named_clobbered():
    compiled, feeds, reference = _compiled_llama()
    executor = compiled.executor
    parts = executor.partitions
    # a value one partition writes and a partition on another device (not the next one) waits for and reads
    pairs = [(i, j, n) for j, p in enumerate(parts) for n in p.input_names
             for i, q in enumerate(parts) if n in q.output_names and j > i + 1 and n in executor.buffers
             and n in executor.flag_index]
    if not pairs:
        pytest.skip("no value crosses devices and more than one partition here")
    producer, reader, name = pairs[0]
    original = executor._wait

    def clobbering(value, start, record, consumer=None):
        original(value, start, record, consumer)
        if value == name and consumer is parts[reader]:   # its producer is done, its reader not started: another
            executor.buffers[name][...] = 7.0              # write lands on it (in the reader's thread: no race)

    executor._wait = clobbering
    found = diff.locate_divergence(compiled, feeds, 1e-4, reference)
    assert found["kind"] == "clobbered" and found["value"] == name, found
    # the reader named is one that ran after the write (devices run concurrently: not always ``reader``)
    assert found["partition"] == producer and found["reader"] > producer, found


def test_relative_error():
    a = np.array([1.0, 2.0, 4.0], np.float32)
    assert diff.relative_error(a, a) == 0.0
    assert diff.relative_error(a + np.float32(4e-4), a) == pytest.approx(1e-4, rel=1e-3)
    assert diff.relative_error(a[:2], a) == float("inf")
    assert diff.relative_error(np.array([1, 2]), np.array([1, 3])) == float("inf")
    assert diff.relative_error(np.array([np.nan, 1.0]), np.array([np.nan, 1.0])) == 0.0
    assert diff.relative_error(np.array([np.nan, 1.0]), np.array([0.0, 1.0])) == float("inf")


def test_summary_line_and_table():
    rows = [{"model": "m", "platform": "host", "placement": "roofline", "pipeline": "full", "seed": 0,
             "status": s, "message": "x", "divergence": None} for s in ("pass", "mismatch", "error", "pass")]
    assert diff.summary_line(rows) == "4 cases, 1 mismatches, 1 errors"
    assert "2/1/1" in diff.summarise(rows, ["host"], ["roofline"])


@pytest.mark.differential
def test_full_differential_run(tmp_path):
    """The whole harness, as `python benchmarks/differential.py` runs it (about an hour on 2 cores)."""
    import subprocess
    result = subprocess.run([sys.executable, str(PATH), "--json", str(tmp_path / "results.json")],
                            capture_output=True, text=True)
    last = result.stdout.strip().splitlines()[-1]
    assert last.endswith(" 0 mismatches, 0 errors"), result.stdout[-6000:]
    assert result.returncode == 0
