"""The flash reader pool (O_DIRECT and page-cache bypass), its helpers, and the disk calibration of a flash platform."""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest

from hetflow.calibrate import DiskCalibrationError, calibrate_disk, write_disk_platform
from hetflow.cli import main
from hetflow.platform import load_platform
from hetflow.runtime import linux_aio
from hetflow.runtime.flash_io import (FlashReadError, ReaderPool, aligned_empty, current_rss_bytes, drop_page_cache,
                                      peak_rss_bytes)

FILE_BYTES = 4 << 20


@pytest.fixture
def data_file(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, FILE_BYTES, dtype=np.uint8)
    path = tmp_path / "weights.bin"
    data.tofile(path)
    return path, data


def direct_refused(path) -> str | None:
    """Why this file system refuses O_DIRECT (open or an aligned read fails), or None when it takes it."""
    if not hasattr(os, "O_DIRECT"):
        return "this OS has no O_DIRECT"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        return f"the file system refuses O_DIRECT at open: {exc.strerror}"
    try:
        os.preadv(fd, [aligned_empty(4096)], 0)
    except OSError as exc:
        return f"the file system refuses an aligned O_DIRECT read: {exc.strerror}"
    finally:
        os.close(fd)
    return None


def pool_for(path, direct: bool, threads: int = 16, engine: str = "auto") -> ReaderPool:
    if direct and (why := direct_refused(path)):
        pytest.skip(why)
    if engine == "aio" and not linux_aio.available():
        pytest.skip("native AIO is not allowed here (io_setup refused)")
    pool = ReaderPool(path, threads=threads, direct=direct, engine=engine)
    assert pool.direct == direct
    assert pool.engine == ("threads" if not direct else engine if engine != "auto" else
                           "aio" if linux_aio.available() else "threads")
    assert pool.mode in (("O_DIRECT",) if direct else ("fadvise-bypass", "buffered"))
    return pool


@pytest.mark.parametrize("nbytes,alignment", [(0, 4096), (1, 4096), (4096, 4096), (10000, 4096), (5, 512),
                                              (3 << 20, 1 << 16)])
def test_aligned_empty(nbytes, alignment):
    for _ in range(5):
        buf = aligned_empty(nbytes, alignment)
        assert buf.dtype == np.uint8 and buf.ndim == 1
        assert len(buf) % alignment == 0 and nbytes <= len(buf) < nbytes + alignment
        if len(buf):
            assert buf.ctypes.data % alignment == 0
    with pytest.raises(ValueError, match="power of two"):
        aligned_empty(10, 3000)


@pytest.mark.parametrize("direct,engine", [(True, "aio"), (True, "threads"), (False, "threads")],
                         ids=["o_direct-aio", "o_direct-threads", "bypass"])
@pytest.mark.parametrize("depth", [3, 16])
def test_reads_exactly_the_bytes_written(data_file, direct, engine, depth):
    path, data = data_file
    rng = np.random.default_rng(1)
    with pool_for(path, direct, threads=depth, engine=engine) as pool:
        requests = []
        for _ in range(300):
            pages = int(rng.integers(1, 17))
            offset = int(rng.integers(0, FILE_BYTES // 4096 - pages)) * 4096
            dest = aligned_empty(pages * 4096)
            requests.append((offset, dest if rng.random() < 0.5 else memoryview(dest)))
        big = aligned_empty(3 << 20)                    # cut into 1 MiB pieces over the threads
        requests.append((4096, big))
        assert pool.read_into(requests) == sum(memoryview(d).nbytes for _, d in requests)
        for offset, dest in requests:
            np.testing.assert_array_equal(np.asarray(dest), data[offset:offset + memoryview(dest).nbytes])


def test_bypass_takes_unaligned_requests(data_file):
    path, data = data_file
    with ReaderPool(path, threads=4, direct=False) as pool:
        dest = np.empty(1001, np.uint8)
        pool.read_into([(12345, dest)])
        np.testing.assert_array_equal(dest, data[12345:13346])


def test_unaligned_request_under_o_direct_is_named(data_file):
    path, _ = data_file
    with pool_for(path, True) as pool:
        with pytest.raises(ValueError, match=r"weights\.bin: request 1 \(offset 100, length 4096\).*O_DIRECT"):
            pool.read_into([(0, aligned_empty(4096)), (100, aligned_empty(4096))])
        with pytest.raises(ValueError, match=r"length 1000"):
            pool.read_into([(0, aligned_empty(4096)[:1000])])
        with pytest.raises(ValueError, match=r"destination address"):
            pool.read_into([(0, aligned_empty(8192)[1:4097])])
        assert pool.requests == 0 and pool.bytes_read == 0


@pytest.mark.parametrize("direct,engine", [(True, "aio"), (True, "threads"), (False, "threads")],
                         ids=["o_direct-aio", "o_direct-threads", "bypass"])
def test_read_past_end_is_a_clear_error(data_file, direct, engine):
    path, _ = data_file
    with pool_for(path, direct, threads=2, engine=engine) as pool:
        offset = FILE_BYTES - 4096
        with pytest.raises(FlashReadError, match=rf"weights\.bin: short read of 8192 bytes at offset {offset}: "
                                                 rf"got 4096 \(the file ends at {FILE_BYTES} bytes\)"):
            pool.read_into([(0, aligned_empty(4096)), (offset, aligned_empty(8192))])
        with pytest.raises(FlashReadError, match="short read"):
            pool.submit([(FILE_BYTES, aligned_empty(4096))]).result()


def test_engine_choices_are_checked(data_file):
    path, _ = data_file
    with pytest.raises(ValueError, match="engine must be 'auto', 'aio' or 'threads', got 'uring'"):
        ReaderPool(path, engine="uring")
    with pytest.raises(ValueError, match=r"weights\.bin: native AIO needs O_DIRECT"):
        ReaderPool(path, direct=False, engine="aio")
    with ReaderPool(path, direct=False) as pool:       # auto without O_DIRECT: threads (buffered AIO blocks)
        assert pool.engine == "threads"


def test_a_file_native_aio_refuses_is_read_with_threads(data_file, monkeypatch):
    """A file system may take O_DIRECT preads and refuse native AIO on the file: the pool's probe read fails,
    "auto" reads with threads, "aio" says why."""
    path, data = data_file
    if direct_refused(path) or not linux_aio.available():
        pytest.skip("needs O_DIRECT and native AIO")

    def refused(self, context):
        raise linux_aio.AioError(22, f"{self.path}: a native AIO read failed: Invalid argument")
    monkeypatch.setattr(ReaderPool, "_probe", refused)
    with ReaderPool(path, threads=4) as pool:
        assert pool.engine == "threads" and pool.direct
        dest = aligned_empty(8192)
        pool.read_into([(8192, dest)])
        np.testing.assert_array_equal(dest, data[8192:16384])
    with pytest.raises(ValueError, match=r"native AIO is not available here: .*weights\.bin: a native AIO read failed"):
        ReaderPool(path, engine="aio")


def test_aio_context_queues_past_its_depth_and_reports_each_read(data_file):
    path, data = data_file
    if direct_refused(path) or not linux_aio.available():
        pytest.skip("needs O_DIRECT and native AIO")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    context = linux_aio.AioContext(4)
    try:
        buffers = {i: aligned_empty(8192) for i in range(40)}
        context.submit(fd, [(i * 8192, buffers[i].ctypes.data, 8192, i) for i in range(40)])
        context.submit(987654, [(0, buffers[0].ctypes.data, 4096, "bad fd")])   # refused at submit: EBADF
        assert context.in_flight <= 4
        results = {}
        while len(results) < 41:
            results.update(context.reap(5.0))
        assert results.pop("bad fd") == -9
        assert results == {i: 8192 for i in range(40)}
        for i, buf in buffers.items():
            np.testing.assert_array_equal(buf, data[i * 8192:(i + 1) * 8192])
        assert context.in_flight == 0 and context.queued == 0
    finally:
        context.close()
        os.close(fd)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FlashReadError, match=r"nope\.bin: cannot open it"):
        ReaderPool(tmp_path / "nope.bin")


def test_submit_overlaps_and_counters(data_file):
    path, data = data_file
    with ReaderPool(path, threads=8) as pool:
        first = [(i * 65536, aligned_empty(65536)) for i in range(16)]
        second = [(FILE_BYTES // 2 + i * 4096, aligned_empty(4096)) for i in range(32)]
        futures = [pool.submit(first), pool.submit(second)]
        assert [f.result(timeout=60) for f in futures] == [16 * 65536, 32 * 4096]
        for offset, dest in first + second:
            np.testing.assert_array_equal(dest, data[offset:offset + len(dest)])
        assert pool.bytes_read == 16 * 65536 + 32 * 4096
        assert pool.requests == 48
        assert pool.read_seconds > 0
        assert pool.submit([]).result() == 0
        pool.reset_counters()
        assert (pool.bytes_read, pool.requests, pool.read_seconds) == (0, 0, 0.0)
    with pytest.raises(ValueError, match="closed"):
        pool.submit(first)
    pool.close()                                        # a second close is harmless


def test_one_pool_read_from_many_threads(data_file):
    from concurrent.futures import ThreadPoolExecutor
    path, data = data_file
    with ReaderPool(path, threads=4) as pool:
        def read(i):
            dest = aligned_empty(8192)
            pool.read_into([(i * 8192, dest)])
            return bool((dest == data[i * 8192:(i + 1) * 8192]).all())
        with ThreadPoolExecutor(8) as callers:
            assert all(callers.map(read, range(64)))
        assert pool.requests == 64 and pool.bytes_read == 64 * 8192


def test_memory_helpers(data_file):
    path, _ = data_file
    assert drop_page_cache(path) is (hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED"))
    assert drop_page_cache(path.parent / "missing.bin") is False
    assert current_rss_bytes() > 1 << 20
    assert peak_rss_bytes() >= current_rss_bytes() // 2


def tiny_calibration(directory):
    return calibrate_disk(directory, sizes=(4096, 16384), threads=(1, 2), file_bytes=1 << 20,
                          seconds_per_point=0.01)


def test_calibrate_disk_small(tmp_path):
    result = tiny_calibration(tmp_path)
    assert set(result["table"]) == {4096, 16384}
    for row in result["table"].values():
        assert set(row) == {1, 2} and all(v > 0 for v in row.values())
    assert result["best_threads"][4096] in (1, 2) and result["channels"] in (1, 2)
    assert result["best"][4096] == max(result["table"][4096].values())
    assert result["mode"] in ("O_DIRECT", "fadvise-bypass", "buffered")
    assert list(tmp_path.iterdir()) == []                # the temporary file is gone


def test_calibrate_disk_not_enough_room(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "statvfs", lambda _: SimpleNamespace(f_bavail=100, f_frsize=4096))
    with pytest.raises(DiskCalibrationError) as info:
        calibrate_disk(tmp_path, file_bytes=256 << 20)
    message = str(info.value)
    assert str(tmp_path) in message and "not enough room" in message
    assert str((256 + 64) << 20) in message and "409600 bytes" in message
    assert list(tmp_path.iterdir()) == []


def test_written_platform_has_the_measured_curve(tmp_path):
    result = tiny_calibration(tmp_path)
    path = write_disk_platform("laptop-ssd", result, tmp_path / "laptop-ssd-disk.toml")
    platform = load_platform(str(path))
    preset = load_platform("laptop-ssd")
    assert platform.name == "laptop-ssd-disk"
    assert set(platform.devices) == set(preset.devices)  # the preset's devices and memory, its flash measured
    chunks = [c for c, _ in platform.flash.throughput]
    assert chunks == [4096, 16384]                      # the preset's curve is replaced, not mixed in
    for chunk, throughput in platform.flash.throughput:
        assert throughput == pytest.approx(result["best"][int(chunk)], rel=1e-3)
    assert platform.flash.channels == result["channels"]
    assert platform.flash.read_latency > 0
    assert "measured on this machine" in platform.flash.source and result["mode"] in platform.flash.source


def test_cli_calibrates_the_disk_of_a_flash_platform(tmp_path, capsys):
    out = tmp_path / "ls.toml"
    code = main(["calibrate", "--platform", "laptop-ssd", "--disk-dir", str(tmp_path), "--disk-bytes", "2",
                 "--disk-seconds", "0.005", "-o", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "measured read throughput, GB/s" in stdout and "32 in flight" in stdout and "1 MiB" in stdout
    assert f"wrote {out}" in stdout
    assert len(load_platform(str(out)).flash.throughput) == 6
    assert main(["calibrate", "--disk-dir", str(tmp_path)]) == 1
    assert "--disk-dir measures the disk of a platform with a [flash] section" in capsys.readouterr().err


@pytest.mark.parametrize("engine", ["aio", "threads"])
def test_callers_on_four_threads_each_get_their_own_bytes(data_file, engine):
    """read_into from several threads at once (under AIO one caller reaps for all: each must still return only
    when its own reads are in), with a background submit in flight beside them."""
    import threading
    path, data = data_file
    with pool_for(path, True, threads=4, engine=engine) as pool:
        background = [(i * 8192, aligned_empty(8192)) for i in range(64)]
        future = pool.submit(background)
        failures = []

        def caller(seed):
            rng = np.random.default_rng(seed)
            for _ in range(30):
                offsets = (rng.integers(0, FILE_BYTES // 4096, int(rng.integers(1, 20))) * 4096).tolist()
                requests = [(o, aligned_empty(4096)) for o in offsets]
                pool.read_into(requests)
                if not all((dest == data[o:o + 4096]).all() for o, dest in requests):
                    failures.append(seed)
        threads = [threading.Thread(target=caller, args=(seed,)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert future.result(timeout=60) == 64 * 8192
        assert not failures
        for offset, dest in background:
            np.testing.assert_array_equal(dest, data[offset:offset + 8192])


def test_read_curve_measures_an_existing_file_and_checks_its_sizes(data_file):
    from hetflow.calibrate import read_curve
    path, _ = data_file
    curve = read_curve(path, sizes=(4096, 65536), in_flight=4, seconds_per_point=0.05)
    assert sorted(curve) == [4096, 65536] and all(rate > 0 for rate in curve.values())
    with pytest.raises(ValueError, match=r"multiples of 4096 within .*weights\.bin's 4194304 bytes, got \(1000,\)"):
        read_curve(path, sizes=(1000,))
    with pytest.raises(ValueError, match="within"):
        read_curve(path, sizes=(8 << 20,))
