"""The NAND flash model (hetflow.platform.nand), its simulator and decode model (hetflow.runtime.runners.nand)
and placement's hook (hetflow.passes.flash_cost): hand-computed timings, the alpha split, the functional GEMV."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hetflow.platform import Flash, PlatformError, load_platform, platform_from_dict
from hetflow.platform.nand import NandError, block_pages, check_flash, gemv_split, read_pages_seconds, tile_shape
from hetflow.passes.flash_cost import flash_gemv_on, flash_gemv_seconds
from hetflow.runtime.runners.nand import DecoderConfig, NandGemvSimulator, decode_token_seconds, with_channels

NPU = 2e12  # 2 TOPS int8 (REFERENCE.md, Cambricon-LLM)


@pytest.fixture(scope="module")
def platform():
    return load_platform("flash-edge")


@pytest.fixture(scope="module")
def flash(platform):
    return platform.flash


def test_the_preset_states_cambricon_llms_figures(flash):
    assert (flash.page_size, flash.channels, flash.cores_per_channel) == (16384, 8, 4)
    assert flash.read_latency == pytest.approx(30e-6) and flash.bus_rate == pytest.approx(1e9)


def test_one_page_read_is_tr_then_the_transfer(flash):
    assert read_pages_seconds(1, flash) == pytest.approx(30e-6 + 16384 / 1e9)


def test_pages_spread_over_channels_and_pipeline_with_cache_read(flash):
    # 8 pages on 8 channels: one each, all at once
    assert read_pages_seconds(8, flash) == pytest.approx(30e-6 + 16.384e-6)
    # 40 pages on 8 channels: 5 per channel; after the first, each costs max(16.384 us bus, 30/4 us dies)
    assert read_pages_seconds(40, flash) == pytest.approx(30e-6 + 16.384e-6 + 4 * 16.384e-6)
    # with one core per channel the dies are slower than the bus: each later page costs tR
    one_core = dataclasses.replace(flash, cores_per_channel=1)
    assert read_pages_seconds(40, one_core) == pytest.approx(30e-6 + 16.384e-6 + 4 * 30e-6)
    assert read_pages_seconds(0, flash) == 0


def test_the_small_configuration_tiles_256_by_2048(flash):
    assert tile_shape(flash) == (256, 2048)
    assert tile_shape(with_channels(flash, 16)) == (256, 4096)
    assert tile_shape(flash, dtype_bytes=2) == (128, 1024)  # sqrt(4 x 8192) = 181, rounded down to 128
    assert block_pages(flash) == 4 and block_pages(flash, dtype_bytes=2) == 2
    three = dataclasses.replace(flash, cores_per_channel=3)  # sqrt(3 x 16384) = 221 -> 128: one page a block
    assert tile_shape(three) == (128, 1024) and block_pages(three) == 1


def test_the_best_split_balances_the_dies_against_the_bus(flash):
    best = gemv_split(4096, 4096, 1, flash, NPU)
    assert 0 < best.alpha < 1
    assert best.in_flash == pytest.approx(best.read, rel=1e-9)
    assert best.seconds <= gemv_split(4096, 4096, 1, flash, NPU, alpha=0).seconds
    assert best.seconds <= gemv_split(4096, 4096, 1, flash, NPU, alpha=1).seconds
    # by hand: 32 tiles; dies sense one page per core per tile (32 x 30 us); the bus carries (1 - a) x 32 tiles
    # of 4 pages plus a x 32 x 256 x (1 + 4) bytes; equal at a = (65.536 - 30) / (65.536 - 1.28) us
    alpha = (4 * 16.384 - 30) / (4 * 16.384 - 256 * 5 / 1e3)
    assert best.alpha == pytest.approx(alpha)
    assert best.seconds == pytest.approx(32 * 30e-6 + 30e-6 + 16.384e-6)


def test_slow_in_flash_cores_move_the_split_toward_the_npu(flash):
    slow = dataclasses.replace(flash, core_rate=0.1e9)  # 164 us per page in flash
    fast_alpha = gemv_split(4096, 4096, 1, flash, NPU).alpha
    slow_split = gemv_split(4096, 4096, 1, slow, NPU)
    assert slow_split.alpha < fast_alpha
    assert slow_split.in_flash == pytest.approx(slow_split.read, rel=1e-9)
    for alpha in (0, 0.25, 0.5, 1):
        assert slow_split.seconds <= gemv_split(4096, 4096, 1, slow, NPU, alpha=alpha).seconds + 1e-15


@pytest.mark.parametrize("rows,cols,batch", [(1000, 3000, None), (256, 2048, 1), (300, 70, 3)])
def test_the_simulated_gemv_equals_numpy(flash, rows, cols, batch):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows,) if batch is None else (batch, rows)).astype(np.float32)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    for alpha in (None, 0.0, 0.5, 1.0):
        run = NandGemvSimulator(flash, NPU, alpha).run(x, w)
        np.testing.assert_allclose(run.y, x @ w, rtol=1e-4, atol=1e-4)
        assert run.y.dtype == np.float32 and run.seconds > 0


def test_int8_accumulates_exactly_and_in_flash_tiles_move_no_weights(flash):
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, 512).astype(np.int8)
    w = rng.integers(-128, 128, (512, 4096)).astype(np.int8)
    run = NandGemvSimulator(flash, NPU, alpha=1.0).run(x, w)
    np.testing.assert_array_equal(run.y, x.astype(np.int32) @ w.astype(np.int32))
    assert run.flash_tiles == 4 and run.npu_tiles == 0
    assert run.bus_bytes == 4 * 8 * 256 * (1 + 4)  # per tile per channel: 256 inputs in, 256 int32 sums out
    npu_only = NandGemvSimulator(flash, NPU, alpha=0.0).run(x, w)
    assert npu_only.bus_bytes == 4 * 8 * 4 * 16384 and npu_only.seconds > run.seconds


def test_the_simulator_times_the_share_it_placed(flash):
    x, w = np.ones(1000, np.float32), np.ones((1000, 3000), np.float32)
    run = NandGemvSimulator(flash, NPU).run(x, w)
    assert run.alpha == run.flash_tiles / (run.flash_tiles + run.npu_tiles)
    assert run.seconds == pytest.approx(gemv_split(1000, 3000, 4, flash, NPU, run.alpha).seconds)


def test_decode_step_adds_gemvs_attention_and_launches(platform, flash):
    tiny = DecoderConfig("tiny", layers=2, hidden=512, ffn=1024, heads=8, kv_heads=2, vocab=1000, context=64)
    seconds, parts = decode_token_seconds(tiny, platform)
    gemv = sum(gemv_split(r, c, 1, flash, NPU).seconds * n for _, r, c, n in tiny.gemvs())
    assert parts["gemv"] == pytest.approx(gemv)
    kv_bytes = 2 * 64 * 2 * 64 * 1  # K and V, context 64, 2 kv heads of 64
    assert parts["attention"] == pytest.approx(2 * max(kv_bytes / 40e9, 4 * 8 * 64 * 64 / NPU))
    assert parts["launch"] == pytest.approx((2 * 8 + 1) * 10e-6)
    assert seconds == pytest.approx(parts["gemv"] + parts["embedding"] + parts["attention"] + parts["launch"])
    # more channels, never slower
    assert decode_token_seconds(tiny, platform, with_channels(flash, 16))[0] <= seconds


def test_placement_hook_agrees_with_the_model(platform, flash):
    assert flash_gemv_on(platform, 4096, 4096, "i8") == gemv_split(4096, 4096, 1, flash, NPU).seconds
    assert flash_gemv_seconds(4096, 4096, "f16", flash, 1e12) == gemv_split(4096, 4096, 2, flash, 1e12).seconds
    with pytest.raises(NandError, match="not a hetflow dtype"):
        flash_gemv_seconds(4, 4, "float", flash, NPU)
    with pytest.raises(NandError, match="no \\[flash\\] table"):
        flash_gemv_on(load_platform("mobile-soc"), 4, 4, "i8")


@pytest.mark.parametrize("field,value", [("channels", 0), ("page_size", 12000.0), ("read_latency", 0.0),
                                         ("bus_rate", -1.0), ("cores_per_channel", 0), ("core_rate", float("nan"))])
def test_bad_figures_give_one_error_naming_the_field(flash, field, value):
    bad = dataclasses.replace(flash, **{field: value})
    with pytest.raises(NandError, match=f"^flash\\.{field}: expected"):
        check_flash(bad)
    with pytest.raises(NandError, match=f"flash\\.{field}"):
        gemv_split(64, 64, 1, bad, NPU)
    with pytest.raises(NandError, match=f"flash\\.{field}"):
        NandGemvSimulator(bad, NPU)


def test_bad_gemv_arguments_are_named(flash):
    with pytest.raises(NandError, match="gemv rows"):
        gemv_split(0, 64, 1, flash, NPU)
    with pytest.raises(NandError, match="gemv alpha"):
        gemv_split(64, 64, 1, flash, NPU, alpha=1.5)
    with pytest.raises(NandError, match="cannot multiply"):
        NandGemvSimulator(flash, NPU).run(np.ones(3), np.ones((4, 5)))


def test_the_platform_file_checks_the_new_fields(platform):
    data = dict(platform.raw, flash=dict(platform.raw["flash"], cores_per_channel=0))
    with pytest.raises(PlatformError, match="cores_per_channel"):
        platform_from_dict(data)
    data = dict(platform.raw, flash=dict(platform.raw["flash"], bus_rate="1 us"))
    with pytest.raises(PlatformError, match="bus_rate"):
        platform_from_dict(data)
    old = {k: v for k, v in platform.raw["flash"].items() if k not in ("bus_rate", "cores_per_channel", "core_rate")}
    assert platform_from_dict(dict(platform.raw, flash=old)).flash == platform.flash  # defaults = the preset's
    assert isinstance(platform.flash, Flash)
