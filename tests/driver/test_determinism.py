"""Determinism: the same model, options and platform give byte-identical artifacts.

Each compile runs in a fresh process with its own PYTHONHASHSEED (and one config twice in
one process), and every file of the artifacts is compared byte for byte. A placement or
memory plan cut short by a limit says so (``limit_hit``, the solver text and the note).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hetflow.passes import memplan, memplan_search, place
from hetflow.passes.memplan import Buffer

# (name, model builder, platform, placement): multi-device placements (CP-SAT), a split, the host
CONFIGS = [
    ("gpt2-mobile-optimal", "gpt2", "mobile-soc", "optimal"),
    ("mlp-mobile-split", "mlp_big", "mobile-soc", "split"),
    ("mlp-duplex-optimal", "mlp", "duplex", "optimal"),
    ("gpt2-host", "gpt2_small", "host", "roofline"),
]

SCRIPT = r"""
import sys, torch, hetflow
from hetflow.examples import mlp
from hetflow.examples.models import build_gpt2

def build(name):
    if name == "gpt2":  # wide enough that mobile-soc puts groups on the NPU as well as the CPU
        return build_gpt2(n_layer=2, n_embd=256, n_head=4, seq=64)
    if name == "gpt2_small":
        return build_gpt2(n_layer=2)
    if name == "mlp_big":
        torch.manual_seed(0)
        return mlp.MLP(256, 1024, 256).eval(), (torch.randn(256, 256),)
    return mlp.build()

out, repeats, onnx_path, configs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
for config in configs:
    name, model, platform, placement = config.split(":")
    module, inputs = build(model)
    for k in range(repeats):
        compiled = hetflow.compile(module, inputs, platform=platform, placement=placement, time_limit=10)
        compiled.save(f"{out}/{name}/{k}")
import contextlib, io
from hetflow.cli import main
for k in range(repeats):  # the command line, from an ONNX file
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["compile", onnx_path, "--platform", "mobile-soc", "--placement", "split",
                     "-o", f"{out}/cli-onnx-mobile-split/{k}"]) == 0
"""


def _onnx_mlp(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((256, 1024)).astype(np.float32)
    w2 = rng.standard_normal((1024, 256)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["a"], name="act"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256, 256])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def _compile_in_fresh_process(out: Path, seed: int, repeats: int, cache: Path, onnx_path: Path) -> None:
    env = dict(os.environ, PYTHONHASHSEED=str(seed), HETFLOW_CACHE_DIR=str(cache))
    env.pop("SOURCE_DATE_EPOCH", None)
    args = [":".join(c) for c in CONFIGS]
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(repeats), str(onnx_path), *args], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def _files(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _differences(a: Path, b: Path) -> list[str]:
    fa, fb = _files(a), _files(b)
    diffs = [f"{name}: only in one artifact" for name in sorted(set(fa) ^ set(fb))]
    diffs += [f"{name}: bytes differ" for name in sorted(set(fa) & set(fb)) if fa[name] != fb[name]]
    if (a / "manifest.json").exists() and (b / "manifest.json").exists():
        ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
        diffs += [f"manifest[{key!r}]: {str(ma.get(key))[:200]} != {str(mb.get(key))[:200]}"
                  for key in sorted(set(ma) | set(mb)) if ma.get(key) != mb.get(key)]
    return diffs


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Two fresh processes, hash seeds 1 and 2 (the first compiles each config twice), one calibration cache."""
    root = tmp_path_factory.mktemp("determinism")
    cache = root / "cache"  # the first process measures the host once; the second reads what it wrote
    onnx_path = _onnx_mlp(root / "mlp.onnx")
    _compile_in_fresh_process(root / "seed1", 1, 2, cache, onnx_path)
    _compile_in_fresh_process(root / "seed2", 2, 1, cache, onnx_path)
    return root


NAMES = [c[0] for c in CONFIGS] + ["cli-onnx-mobile-split"]


@pytest.mark.parametrize("name", NAMES)
def test_two_processes_with_different_hash_seeds_write_identical_artifacts(artifacts, name):
    a, b = artifacts / "seed1" / name / "0", artifacts / "seed2" / name / "0"
    assert _differences(a, b) == []
    manifest = json.loads((a / "manifest.json").read_text())
    assert "created" not in manifest  # no clock in the artifact unless SOURCE_DATE_EPOCH asks for one
    listed = set(manifest["files"])
    assert listed == set(_files(a)) - {"manifest.json"}  # the manifest hashes every other file
    assert manifest["files"] == json.loads((b / "manifest.json").read_text())["files"]
    for rel, digest in manifest["files"].items():
        assert digest == "sha256:" + _files(a)[rel]


@pytest.mark.parametrize("name", NAMES)
def test_compiling_twice_in_one_process_writes_identical_artifacts(artifacts, name):
    assert _differences(artifacts / "seed1" / name / "0", artifacts / "seed1" / name / "1") == []


def test_multi_device_configs_really_use_several_devices(artifacts):
    # the determinism above is only worth something if CP-SAT had choices to make
    for name in ("gpt2-mobile-optimal", "mlp-mobile-split", "cli-onnx-mobile-split"):
        manifest = json.loads((artifacts / "seed1" / name / "0" / "manifest.json").read_text())
        devices = {p["device"] for p in manifest["partitions"]}
        assert len(devices) >= 2, (name, devices)
        assert manifest["placement"]["solver"].startswith("CP-SAT optimal")


def test_source_date_epoch_sets_created(tmp_path, monkeypatch):
    from hetflow.runtime.artifact import created_stamp
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert created_stamp() == "2023-11-14T22:13:20Z"
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    assert created_stamp() is None


# ---------------------------------------------------------------- limits are reported

def _placement_problem():
    from hetflow.examples.models import build_gpt2
    from hetflow.frontends.torch import capture_module
    from hetflow.passes.cost import cost_node
    from hetflow.pipeline import run_pipeline
    from hetflow.platform import load_platform
    module, inputs = build_gpt2(n_layer=2, n_embd=256, n_head=4, seq=64)
    graph, _ = run_pipeline(capture_module(module, inputs).graph, "canonicalize,fuse")
    platform = load_platform("mobile-soc")
    costs = [cost_node(n, platform, graph.opset) for n in graph.nodes]
    return place.placement_problem(graph, costs, platform)


@pytest.fixture(scope="module")
def placement_problem():
    return _placement_problem()


def test_placement_cut_short_by_a_tiny_limit_says_so_and_is_reproducible(placement_problem):
    hint = place.roofline_assignment(placement_problem)
    results = [place.solve_optimal(placement_problem, hint, 1e-4) for _ in range(2)]
    (assignment, text, limit), again = results[0], results[1]
    assert limit == "budget"
    assert "not proved optimal" in text or "found no plan" in text
    assert "deterministic" in text
    assert again == results[0]  # a deterministic limit: the same plan (or none) every run
    done, text, limit = place.solve_optimal(placement_problem, hint, 10)
    assert limit == "" and text.startswith("CP-SAT optimal") and done is not None


def test_placement_stopped_by_the_wall_clock_says_it_may_differ(placement_problem, monkeypatch):
    monkeypatch.setattr(place, "WALL_FACTOR", 0.0)
    monkeypatch.setattr(place, "WALL_SLACK", 1e-4)
    monkeypatch.setattr(place, "DTIME_PER_SECOND", 1e6)
    hint = place.roofline_assignment(placement_problem)
    _, text, limit = place.solve_optimal(placement_problem, hint, 10)
    assert limit == "wall" and ("differ between runs" in text)


def test_compile_report_and_manifest_carry_a_placement_limit(tmp_path):
    import hetflow
    from hetflow.examples.models import build_gpt2
    module, inputs = build_gpt2(n_layer=2, n_embd=256, n_head=4, seq=64)
    compiled = hetflow.compile(module, inputs, platform="mobile-soc", placement="optimal", time_limit=1e-5)
    assert compiled.placement.limit_hit and compiled.placement.limit == "budget"
    report = compiled.report()
    assert "placement cut short by the solver's deterministic budget" in report
    assert "not proved optimal" in report
    compiled.save(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    solver = manifest["placement"]["solver"]
    assert ("not proved optimal" in solver or "found no plan" in solver) and " s)" not in solver
    ok = hetflow.compile(module, inputs, platform="mobile-soc", placement="optimal", time_limit=10)
    assert not ok.placement.limit_hit and "cut short" not in ok.report()


def _hard_buffers(n=160, seed=3):
    rng = np.random.default_rng(seed)
    bufs = []
    for i in range(n):
        lo = int(rng.integers(0, 200))
        bufs.append(Buffer(f"b{i}", lo, lo + int(rng.integers(1, 40)), int(rng.integers(1, 64)) * 64))
    return bufs


def test_memory_plan_cut_short_by_its_budget_says_so_and_is_reproducible():
    bufs = _hard_buffers()
    greedy_peak = memplan._peak(bufs, memplan.greedy_by_size(bufs))
    assert greedy_peak > memplan.lower_bound(bufs)  # something to search for
    plans = [memplan.solve(bufs, time_limit_s=0.002) for _ in range(2)]  # 40 nodes: not even one full plan
    for plan in plans:
        assert plan.limit_hit and plan.limit == "budget" and not plan.optimal
        assert memplan.NOTE_BUDGET in plan.note
    assert plans[0].offsets == plans[1].offsets
    full = memplan.solve(bufs, time_limit_s=10)
    assert full.limit == "" or full.limit == "budget"  # never the clock on this small instance
    assert (full.limit_hit, full.optimal) in ((False, True), (True, False))


def test_memory_plan_search_is_the_same_whoever_answers_first():
    # CP-SAT beside the search may only stop it by proving infeasibility; the plan comes from the
    # search when it finds one in budget, so repeated solves give the same offsets.
    bufs = _hard_buffers(n=120, seed=5)
    plans = [memplan.solve(bufs, time_limit_s=5) for _ in range(3)]
    assert all(p.offsets == plans[0].offsets and p.note == plans[0].note for p in plans)


def test_memory_plan_stopped_by_the_wall_clock_says_it_may_differ(monkeypatch):
    monkeypatch.setattr(memplan_search, "WALL_FACTOR", 0.0)
    monkeypatch.setattr(memplan_search, "WALL_SLACK", 0.0)
    plan = memplan.solve(_hard_buffers(), time_limit_s=10)
    assert plan.limit_hit and plan.limit == "wall" and memplan.NOTE_WALL in plan.note
    assert not plan.optimal


def test_cpsat_placement_uses_one_worker_and_a_fixed_seed(placement_problem, monkeypatch):
    from ortools.sat.python import cp_model
    seen = []
    original = cp_model.CpSolver.solve

    def spy(self, *args, **kwargs):
        seen.append((self.parameters.num_workers, self.parameters.random_seed,
                     self.parameters.max_deterministic_time))
        return original(self, *args, **kwargs)
    monkeypatch.setattr(cp_model.CpSolver, "solve", spy)
    monkeypatch.setattr(cp_model.CpSolver, "Solve", spy)
    place.solve_optimal(placement_problem, place.roofline_assignment(placement_problem), 10)
    assert seen and seen[0] == (1, place.SEED, 10 * place.DTIME_PER_SECOND)
