#!/usr/bin/env python3
"""Fuzz hetflow's readers of other people's files with atheris (libFuzzer for Python), one target at a time.

    python benchmarks/fuzz.py manifest --minutes 10        # one target, 10 minutes
    python benchmarks/fuzz.py all --minutes 10             # every target in turn
    python benchmarks/fuzz.py onnx --replay                # run the kept corpus once (what the test suite does)

Targets: ``manifest`` (the artifact loader: manifest.json, graph.json, weights, partition programs), ``onnx``
(the ONNX importer), ``platform`` (platform TOML files), ``memplan`` (the memplan CSV reader) and ``npy``
(``hetflow run --input`` arrays). A crash is any exception that is not one of hetflow's own error classes
(``HetflowError``), a signal, or one input taking longer than 10 s (libFuzzer's ``-timeout``).

Each run starts from the kept corpus ``tests/fuzz_corpus/TARGET/`` (the default test suite replays it:
``tests/test_fuzz_corpus.py``), explores in a scratch copy, then merges what found new coverage back into the
kept corpus (``-merge=1``: the smallest set of inputs that covers everything seen). Crashing inputs are written
to ``benchmarks/results/fuzz-crashes/TARGET/``. Needs ``pip install atheris`` (``hetflow[fuzz]``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fuzz_corpus"
CRASHES = ROOT / "benchmarks" / "results" / "fuzz-crashes"
TIMEOUT_S = 10
TARGET_VARIABLE = "HETFLOW_FUZZ_TARGET"   # set: this process is the one libFuzzer drives, for that target


# --- the targets: bytes in, a HetflowError or nothing out ---------------------------------------------------

class ArtifactTarget:
    """A small compiled artifact (three partitions on mobile-soc: ONNX, simulated JSON); the input's first
    byte picks which file the rest replaces (the others' hashes are then fixed up, as a hostile author would),
    and the artifact is loaded, its runners built and run once."""

    FILES = ("manifest.json", "graph.json", "weights.safetensors", "partition")

    def __init__(self):
        import numpy as np

        import hetflow
        from hetflow.runtime import load
        sys.path.insert(0, str(ROOT))
        from tests.onnx_models import mlp_model
        self.folder = Path(tempfile.mkdtemp(prefix="hetflow-fuzz-"))
        self.base = self.folder / "base"
        hetflow.compile(mlp_model(width=16, layers=2, batch=4), platform="mobile-soc",
                        placement="optimal").save(self.base)
        self.original = {p.relative_to(self.base).as_posix(): p.read_bytes()
                         for p in self.base.rglob("*") if p.is_file()}
        self.manifest = json.loads(self.original["manifest.json"])
        self.partition = self.manifest["partitions"][0]["file"]
        self.work = self.folder / "work"
        shutil.copytree(self.base, self.work)
        self.load = load
        self.x = np.ones((4, 16), np.float32)

    def seeds(self) -> list[bytes]:
        return [bytes([i]) + self.original[name if name != "partition" else self.partition]
                for i, name in enumerate(self.FILES)]

    def __call__(self, data: bytes) -> None:
        if not data:
            return
        name = self.FILES[data[0] % len(self.FILES)]
        name = self.partition if name == "partition" else name
        body = data[1:]
        for file, original in self.original.items():  # back to the pristine artifact
            (self.work / file).write_bytes(original)
        (self.work / name).write_bytes(body)
        if name != "manifest.json":
            manifest = json.loads(self.original["manifest.json"])
            manifest["files"][name] = "sha256:" + hashlib.sha256(body).hexdigest()
            (self.work / "manifest.json").write_text(json.dumps(manifest))
        model = self.load(self.work)
        model.run({"x": self.x})


def onnx_target(data: bytes) -> None:
    """The importer on any bytes. Its safety net (an unexpected exception raised as ``ImporterBug``) counts as
    the crash it stands for."""
    from hetflow.frontends.onnx import ImporterBug, import_onnx
    try:
        import_onnx(data)
    except ImporterBug as exc:
        raise AssertionError(str(exc)) from exc


def platform_target(data: bytes) -> None:
    from hetflow.platform import load_platform
    path = _scratch("platform.toml")
    path.write_bytes(data)
    load_platform.cache_clear()
    load_platform(str(path))


def memplan_target(data: bytes) -> None:
    """The CSV reader on any bytes; problems of up to 64 buffers are solved too (with a small budget)."""
    from hetflow.memplan_cli import read_problem_csv
    from hetflow.passes.memplan import solve
    buffers = read_problem_csv(data, "fuzz.csv")
    if 0 < len(buffers) <= 64:
        solve(buffers, time_limit_s=0.5)


def npy_target(data: bytes) -> None:
    from hetflow.cli import read_npy
    from hetflow.ir import DType, TensorType
    path = _scratch("input.npy")
    path.write_bytes(data)
    read_npy(path, "x", None)
    read_npy(path, "x", TensorType(DType.f32, (4, 16)))


_SCRATCH: Path | None = None


def _scratch(name: str) -> Path:
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = Path(tempfile.mkdtemp(prefix="hetflow-fuzz-"))
    return _SCRATCH / name


def _manifest_target():
    return ArtifactTarget()


TARGETS = {"manifest": _manifest_target, "onnx": lambda: onnx_target, "platform": lambda: platform_target,
           "memplan": lambda: memplan_target, "npy": lambda: npy_target}


def seed_inputs(target: str) -> list[bytes]:
    """Valid inputs to start from when the kept corpus is empty."""
    import io

    import numpy as np
    if target == "manifest":
        return ArtifactTarget().seeds()
    if target == "onnx":
        sys.path.insert(0, str(ROOT))
        from tests.onnx_models import mlp_model
        return [mlp_model(width=8, layers=2, batch=2).SerializeToString()]
    if target == "platform":
        presets = ROOT / "platforms" / "presets"
        return [p.read_bytes() for p in sorted(presets.glob("*.toml")) if b"calibrate" not in p.read_bytes()]
    if target == "memplan":
        return [b"id,lower,upper,size\nb0,0,3,64\nb1,1,4,32\nb2,3,6,64\n"]
    buffer = io.BytesIO()
    np.save(buffer, np.ones((4, 16), np.float32))
    return [buffer.getvalue()]


def replay(target: str, corpus: Path | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Run every kept input of ``target`` once: (inputs run, [(file, what crashed)])."""
    from hetflow.ir.errors import HetflowError
    run = TARGETS[target]()
    crashes = []
    files = sorted((corpus or CORPUS / target).glob("*"))
    for path in files:
        try:
            run(path.read_bytes())
        except HetflowError:
            pass
        except Exception as exc:  # noqa: BLE001  (anything else is the crash this records)
            crashes.append((path.name, f"{type(exc).__name__}: {str(exc)[:200]}"))
    return len(files), crashes


# --- the libFuzzer driver ------------------------------------------------------------------------------------

def _fuzz_in_process(target: str, argv: list[str]) -> None:
    """Runs inside the fuzzing process: instrument hetflow, then hand the target to libFuzzer."""
    import atheris
    with atheris.instrument_imports(include=["hetflow"]):
        import hetflow  # noqa: F401
        import hetflow.cli  # noqa: F401
        import hetflow.frontends.onnx  # noqa: F401
        import hetflow.memplan_cli  # noqa: F401
        import hetflow.runtime  # noqa: F401
        import hetflow.runtime.runners.interpreter  # noqa: F401
        import hetflow.runtime.runners.onnxruntime  # noqa: F401
    from hetflow.ir.errors import HetflowError
    run = TARGETS[target]()

    def one_input(data: bytes) -> None:
        try:
            run(data)
        except HetflowError:
            pass

    mutator = json_mutator(atheris) if target == "manifest" else None
    atheris.Setup([sys.argv[0]] + argv, one_input, **({"custom_mutator": mutator} if mutator else {}))
    atheris.Fuzz()


# values a hostile author puts into JSON fields: wrong types, out of range, paths, huge and odd numbers
HOSTILE_VALUES = [None, True, 0, -1, 1, 2 ** 31, 2 ** 63, -(2 ** 63), 1e308, 0.5, "", "x", "../../etc/passwd",
                  "/dev/zero", "a\r\nb", "sha256:" + "0" * 64, "transfer", "tvm-llvm", "cuda", "simulated",
                  "link:dram->hbm", [], [1], {}, {"a": 1}, "f32[-1,4]", "f32[4294967296,4294967296]"]


def json_mutator(atheris):
    """A structure-aware mutation for the artifact target: when the input's file is JSON, replace one value
    (anywhere in the tree) by a hostile one, delete a key, or duplicate a list item; otherwise mutate bytes."""
    import random

    def paths(node, prefix=()):
        yield prefix
        if isinstance(node, dict):
            for key, value in node.items():
                yield from paths(value, prefix + (key,))
        elif isinstance(node, list):
            for i, value in enumerate(node[:8]):
                yield from paths(value, prefix + (i,))

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if len(data) < 2 or rng.random() < 0.3:
            return atheris.Mutate(data, max_size)
        try:
            tree = json.loads(data[1:])
        except (ValueError, RecursionError):
            return atheris.Mutate(data, max_size)
        candidates = list(paths(tree))[1:]
        if not candidates:
            return atheris.Mutate(data, max_size)
        for _ in range(rng.randint(1, 3)):
            path = rng.choice(candidates)
            parent = tree
            for key in path[:-1]:
                parent = parent[key]
            key = path[-1]
            action = rng.random()
            try:
                if action < 0.7:
                    parent[key] = rng.choice(HOSTILE_VALUES)
                elif action < 0.85 and isinstance(parent, dict):
                    del parent[key]
                elif isinstance(parent, list):
                    parent.insert(key, parent[key])
                else:
                    parent[key] = [parent[key]]
            except (KeyError, IndexError, TypeError):
                pass
            candidates = list(paths(tree))[1:] or candidates
        out = data[:1] + json.dumps(tree).encode()
        return out[:max_size]

    return mutate


def fuzz(target: str, minutes: float) -> dict:
    kept = CORPUS / target
    kept.mkdir(parents=True, exist_ok=True)
    if not any(kept.iterdir()):
        for data in seed_inputs(target):
            (kept / hashlib.sha1(data).hexdigest()).write_bytes(data)
    crashes = CRASHES / target
    crashes.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"hetflow-fuzz-{target}-"))
    for path in kept.iterdir():
        shutil.copy(path, scratch / path.name)
    started = time.monotonic()
    log = CRASHES.parent / f"fuzz-{target}.log"
    env = {**os.environ, TARGET_VARIABLE: target}
    with open(log, "w") as out:
        result = subprocess.run([__file__, str(scratch), f"-max_total_time={int(minutes * 60)}",
                                 f"-timeout={TIMEOUT_S}", "-rss_limit_mb=6144", "-max_len=262144", f"-artifact_prefix={crashes}/",
                                 "-print_final_stats=1"], stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = time.monotonic() - started
    text = log.read_text(errors="replace")
    runs = next((line.split()[-1] for line in text.splitlines() if "stat::number_of_executed_units" in line), "?")
    merged = Path(tempfile.mkdtemp(prefix=f"hetflow-fuzz-{target}-merged-"))
    with open(log, "a") as out:
        subprocess.run([__file__, "-merge=1", f"-timeout={TIMEOUT_S}", str(merged), str(kept), str(scratch)],
                       stdout=out, stderr=subprocess.STDOUT, env=env)
    if any(merged.iterdir()):
        shutil.rmtree(kept)
        shutil.copytree(merged, kept)
    found = sorted(p.name for p in crashes.iterdir())
    return {"target": target, "seconds": round(seconds), "executions": runs, "exit": result.returncode,
            "crashes": found, "corpus": len(list(kept.iterdir())), "log": str(log)}


def record(result: dict) -> None:
    """Keep each target's latest run in benchmarks/results/fuzz.json (what the README quotes)."""
    path = CRASHES.parent / "fuzz.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[result["target"]] = {k: v for k, v in result.items() if k != "log"} | {
        "date": time.strftime("%Y-%m-%d"), "atheris": _atheris_version()}
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def _atheris_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("atheris")
    except PackageNotFoundError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get(TARGET_VARIABLE):  # the fuzzing process (libFuzzer re-runs this file for -merge=1 too)
        _fuzz_in_process(os.environ[TARGET_VARIABLE], argv)
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=[*TARGETS, "all"])
    parser.add_argument("--minutes", type=float, default=10.0, help="fuzzing time per target (default 10)")
    parser.add_argument("--replay", action="store_true", help="run the kept corpus once instead of fuzzing")
    args = parser.parse_args(argv)
    targets = list(TARGETS) if args.target == "all" else [args.target]
    failed = False
    for target in targets:
        if args.replay:
            count, crashes = replay(target)
            print(f"{target}: replayed {count} inputs, {len(crashes)} crashes")
            for name, what in crashes:
                print(f"  {name}: {what}")
            failed |= bool(crashes)
            continue
        try:
            import atheris  # noqa: F401
        except ImportError:
            print("fuzzing needs atheris: pip install atheris (or 'hetflow[fuzz]')", file=sys.stderr)
            return 2
        result = fuzz(target, args.minutes)
        record(result)
        print(f"{target}: {result['seconds']} s, {result['executions']} inputs run, {len(result['crashes'])} crashes, "
              f"corpus kept: {result['corpus']} inputs (log {result['log']})")
        for name in result["crashes"]:
            print(f"  crash: {CRASHES / target / name}")
        failed |= bool(result["crashes"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
