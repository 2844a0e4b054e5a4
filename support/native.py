"""Small C kernels compiled on first use with the system's C compiler and cached.

The flag wait of the runtime and the memory planner's search use it. A machine
without a C compiler gets None and the caller runs its Python version instead.

The cache is guarded against what a shared or damaged disk can hold:

- each library ``<name>-<hash of its source>.so`` has a record of its own hash
  beside it (``.so.sha256``, in ``sha256sum``'s format), written after the library
  and renamed into place like it; the library is hashed before it is loaded, so a
  truncated or altered one is never loaded: it is rebuilt once;
- the cache directory, the library and its record must belong to this user and
  not be writable by group or others, else they are refused (not loaded, not
  rebuilt over);
- the compiler runs in its own session under a timeout (``HETFLOW_CC_TIMEOUT``
  seconds, ``DEFAULT_CC_TIMEOUT`` by default) that kills its whole process group.

A library that cannot be used (refused, a compile error, a timeout, still
unloadable after its rebuild) gives None and a ``NativeFallbackWarning`` naming it
and why, once: the failure is remembered for the process, so later calls return
None at once.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import time
import warnings
from pathlib import Path

from .cache import cache_dir

CC_TIMEOUT_ENV = "HETFLOW_CC_TIMEOUT"
DEFAULT_CC_TIMEOUT = 30.0  # seconds; a kernel compiles in about 1 s
_RECORD_SUFFIX = ".sha256"

_loaded: dict[str, object] = {}  # "<library>:<symbol>" -> the function
_failed: dict[str, str] = {}  # "<library>:<symbol>" -> why it is not used (said once)


class NativeFallbackWarning(RuntimeWarning):
    """A compiled kernel is not used (the message names the library and why); its Python version runs."""


class _Unusable(Exception):
    """The library cannot be used; the message says why."""


class _Stale(_Unusable):
    """The library is missing, unrecorded, altered or unloadable: building it afresh may cure it."""


def compiled_function(name: str, source: str, symbol: str, timeout: float | None = None):
    """``symbol`` from ``source`` built as a shared library (cached by the source's hash), or None.

    ``timeout``: seconds the compiler may run (default: ``HETFLOW_CC_TIMEOUT``, else
    ``DEFAULT_CC_TIMEOUT``). ctypes calls into the function release Python's interpreter lock.
    """
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    library = cache_dir() / f"{name}-{digest}.so"
    key = f"{library}:{symbol}"
    if key in _failed:
        return None
    if key not in _loaded:
        try:
            _loaded[key] = _load_or_build(library, source, symbol, compiler, timeout)
        except _Unusable as e:
            _failed[key] = str(e)
            warnings.warn(f"hetflow: the compiled kernel {library.name} is not used ({e}); "
                          f"its Python version runs instead", NativeFallbackWarning, stacklevel=2)
            return None
    return _loaded[key]


def record_path(library: Path) -> Path:
    """Where the hash of ``library`` is recorded."""
    return library.with_name(library.name + _RECORD_SUFFIX)


def _load_or_build(library: Path, source: str, symbol: str, compiler: str, timeout: float | None):
    """The function from the cached library; a stale one is rebuilt once."""
    _trusted_directory(library.parent)
    if library.exists():
        try:
            return _load(library, symbol)
        except _Stale:
            pass  # rebuilt below
    _build(library, source, compiler, _cc_timeout(timeout))
    try:
        return _load(library, symbol)
    except _Stale as e:
        raise _Unusable(f"rebuilt, and still {e}") from None


def _load(library: Path, symbol: str):
    """``symbol`` of ``library``, once its owner, mode and recorded hash are checked."""
    _trusted_file(library)
    record = record_path(library)
    if not record.exists():
        raise _Stale(f"{library} has no hash record")
    _trusted_file(record)
    expected = record.read_text(errors="replace")[:64]
    actual = hashlib.sha256(library.read_bytes()).hexdigest()
    if actual != expected:
        raise _Stale(f"{library} does not match its recorded hash (truncated or altered)")
    try:
        return getattr(ctypes.CDLL(str(library)), symbol)
    except OSError as e:
        raise _Stale(f"{library} does not load ({e})") from None
    except AttributeError:
        raise _Stale(f"{library} has no symbol {symbol}") from None


def _trusted_directory(directory: Path) -> None:
    """Create the cache directory (for this user only) or check that only this user can write it."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.stat(directory)
    except OSError as e:
        raise _Unusable(f"cannot create the cache directory {directory} ({e.strerror})") from None
    if not stat.S_ISDIR(info.st_mode):
        raise _Unusable(f"the cache directory {directory} is not a directory")
    _check_owner_and_mode(directory, info)


def _trusted_file(path: Path) -> None:
    try:
        info = os.stat(path)
    except OSError as e:
        raise _Stale(f"{path} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise _Unusable(f"{path} is not a regular file")
    _check_owner_and_mode(path, info)


def _check_owner_and_mode(path: Path, info: os.stat_result) -> None:
    """Refuse what another user owns or what group or others may write."""
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise _Unusable(f"{path} is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _Unusable(f"{path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})")


def _build(library: Path, source: str, compiler: str, timeout: float) -> None:
    """Compile ``source`` into ``library`` and record its hash, each renamed into place whole.

    The source goes in on stdin, so a build's bytes do not depend on a file name: concurrent
    builds of one source write the same library.
    """
    stamp = f"{os.getpid()}.{time.monotonic_ns()}"
    partial = library.with_name(f"{library.name}.{stamp}.tmp")
    try:
        _run_compiler([compiler, "-O2", "-shared", "-fPIC", "-x", "c", "-", "-o", str(partial)], source, timeout)
        try:
            os.chmod(partial, 0o700)
            digest = hashlib.sha256(partial.read_bytes()).hexdigest()
            _flush(partial)
            partial.replace(library)  # atomic: another process never loads a half-written library
            _write_whole(record_path(library), f"{digest}  {library.name}\n", stamp)
        except OSError as e:
            raise _Unusable(f"cannot write {library} ({e.strerror})") from None
    finally:
        partial.unlink(missing_ok=True)


def _write_whole(path: Path, text: str, stamp: str) -> None:
    """Write ``path`` through a partial file renamed into place (readers see all of it or none)."""
    partial = path.with_name(f"{path.name}.{stamp}.tmp")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def _flush(path: Path) -> None:
    """Put ``path``'s bytes on the disk before it is renamed into place (a crash leaves no empty library)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _run_compiler(argv: list[str], source: str, timeout: float) -> None:
    """Run the compiler on ``source`` in its own session; past ``timeout`` its whole group is killed."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    except OSError as e:
        raise _Unusable(f"cannot run the C compiler {argv[0]} ({e.strerror})") from None
    try:
        _, err = proc.communicate(source, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise _Unusable(f"the C compiler {argv[0]} ran past {timeout:g} s and was killed "
                        f"(set {CC_TIMEOUT_ENV} to allow longer)") from None
    finally:
        _end_group(proc)
    if proc.returncode != 0:
        last = (err or "").strip().splitlines()[-1:] or ["no message"]
        raise _Unusable(f"the C compiler {argv[0]} failed (exit status {proc.returncode}): {last[0][:200]}")


def _end_group(proc: subprocess.Popen) -> None:
    """If the compiler has not ended, kill its whole process group and reap it; close its pipes.

    Until the compiler is reaped its pid names no other process, so neither does the group's id.
    """
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def _cc_timeout(timeout: float | None) -> float:
    """The compiler's time limit: ``timeout``, else ``HETFLOW_CC_TIMEOUT``, else the default."""
    if timeout is not None:
        return float(timeout)
    raw = os.environ.get(CC_TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_CC_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise _Unusable(f"{CC_TIMEOUT_ENV}={raw!r} is not a number of seconds > 0")
    return seconds
