"""Hostile inputs to the C kernel cache (issue #13): a truncated or altered cached library, files
others may write, a compiler that hangs, fails or writes garbage."""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from hetflow.support import native

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
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


def test_built_library_has_its_hash_recorded_and_is_this_users_only(cache):
    assert _add()(2, 3) == 5
    library = _library(cache)
    digest = native.record_path(library).read_text().split()[0]
    assert digest == hashlib.sha256(library.read_bytes()).hexdigest()
    for path in (cache, library, native.record_path(library)):
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, path
    assert not list(cache.glob("*.tmp"))


def test_truncated_library_is_rebuilt_and_works(cache):
    library = _build_in_a_fresh_process(cache)
    size = library.stat().st_size
    library.write_bytes(library.read_bytes()[: size // 3])  # as a crash mid-write leaves it
    run = _in_a_fresh_process(cache)
    assert run.returncode == 0, run  # was: SIGBUS in every later run
    assert run.stdout.strip() == "5" and "NativeFallbackWarning" not in run.stderr, run
    assert library.stat().st_size == size


def test_library_altered_behind_its_record_is_rebuilt_not_loaded(cache, tmp_path):
    library = _build_in_a_fresh_process(cache)
    other = tmp_path / "other.so"
    subprocess.run([shutil.which("cc") or "gcc", "-shared", "-fPIC", "-x", "c", "-", "-o", str(other)], check=True,
                   input="int hetflow_test_add(int a, int b) { return 99; }\n", text=True, timeout=120)
    library.write_bytes(other.read_bytes())  # a loadable library, just not the one recorded
    assert _add()(2, 3) == 5


def test_unrecorded_library_is_rebuilt(cache):
    library = _build_in_a_fresh_process(cache)
    native.record_path(library).unlink()
    assert _add()(2, 3) == 5
    assert native.record_path(library).exists()


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


def test_compile_error_is_said_and_remembered(cache, tmp_path, monkeypatch):
    runs = _fake_compiler(tmp_path, monkeypatch, "echo 'x.c:1: error: no such type' >&2\nexit 1")
    with pytest.warns(native.NativeFallbackWarning, match=r"failed \(exit status 1\): x.c:1: error: no such type"):
        assert _add() is None
    _said_nothing(lambda: _add() is None)
    assert len(runs.read_text().split()) == 1


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


def test_bad_timeout_setting_is_said(cache, monkeypatch):
    monkeypatch.setenv("HETFLOW_CC_TIMEOUT", "soon")
    with pytest.warns(native.NativeFallbackWarning, match=r"HETFLOW_CC_TIMEOUT='soon' is not a number"):
        assert _add() is None



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
