"""FFN weights streamed from a flash image (``hetflow.runtime.flash_stream``) and the plan of what streams
under a DRAM budget (``hetflow.passes.flash_plan``)."""
from __future__ import annotations

import numpy as np
import pytest

from hetflow.passes.flash_plan import FfnLayer, FlashPlanError, best_chunk, plan_flash, throughput_at
from hetflow.runtime.flash_io import ReaderPool
from hetflow.runtime.flash_stream import (FlashError, FlashImage, StreamedFfn, build_predictor, layout,
                                          write_image)

HIDDEN, NEURONS = 64, 200
CURVE = [(4096, 0.1e9), (32768, 0.7e9), (1 << 20, 1.0e9)]


@pytest.fixture()
def ffn():
    rng = np.random.default_rng(0)
    up = rng.standard_normal((HIDDEN, NEURONS)).astype(np.float32)
    down = rng.standard_normal((NEURONS, HIDDEN)).astype(np.float32)
    b_up = (rng.standard_normal(NEURONS) - 2.0).astype(np.float32)   # sparse: most neurons below zero
    b_down = rng.standard_normal(HIDDEN).astype(np.float32)
    return up, down, b_up, b_down


def _reference(x, up, down, b_up, b_down):
    return np.maximum(x @ up + b_up, 0) @ down + b_down


@pytest.mark.parametrize("bundled", [True, False])
@pytest.mark.parametrize("min_chunk", [1, 4096, 3 * 4096 + 5])   # one neuron a chunk; padded chunks
def test_streaming_a_layer_whole_is_exact(tmp_path, ffn, bundled, min_chunk):
    up, down, b_up, b_down = ffn
    lay = layout("l", HIDDEN, NEURONS, np.float32, False, bundled, min_chunk)
    assert lay.chunk_bytes % 4096 == 0
    image = write_image(tmp_path / "img.bin", [(lay, {"up": up, "down": down})])
    image.verify(tmp_path / "img.bin")
    x = np.random.default_rng(1).standard_normal((3, HIDDEN)).astype(np.float32)
    with ReaderPool(tmp_path / "img.bin", threads=4) as pool:
        layer = StreamedFfn(lay, pool, b_up, b_down)
        np.testing.assert_allclose(layer(x), _reference(x, up, down, b_up, b_down), rtol=1e-5, atol=1e-4)
        assert layer.bytes_read == lay.bytes


@pytest.mark.parametrize("bundled, min_chunk", [(True, 1), (False, 1), (True, 3 * 4096 + 5), (False, 3 * 4096 + 5)])
def test_the_window_cache_returns_what_prediction_alone_computes_and_reads_less(tmp_path, ffn, bundled, min_chunk):
    up, down, b_up, b_down = ffn
    rng = np.random.default_rng(2)
    samples = rng.standard_normal((256, HIDDEN)).astype(np.float32)
    predictor, stats = build_predictor(up, b_up, rank=32, samples=samples, target_recall=0.95)
    assert stats["recall"] >= 0.95 - 1e-3 and stats["predicted_fraction"] >= stats["active_fraction"]
    lay = layout("l", HIDDEN, NEURONS, np.float32, False, bundled, min_chunk)
    write_image(tmp_path / "img.bin", [(lay, {"up": up, "down": down})])
    base = rng.standard_normal(HIDDEN).astype(np.float32)
    tokens = [(base + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)[None] for _ in range(12)]  # correlated
    with ReaderPool(tmp_path / "img.bin", threads=2) as pool:
        alone = StreamedFfn(lay, pool, b_up, b_down, "predict", predictor)
        window = StreamedFfn(lay, pool, b_up, b_down, "window", predictor, window=3, capacity=120)
        assert window.retain                                   # the default: past the window while there is room
        for x in tokens:
            np.testing.assert_array_equal(window(x), alone(x))
            assert window.held <= 120 and len(window.neuron_slot) == window.held
            assert all(window.slot_neuron[slot] == n for n, slot in window.neuron_slot.items())   # swap-delete kept it
        assert window.bytes_read < alone.bytes_read / (2 if lay.chunk_neurons == 1 else 1)
        # an approximation: within the error the predictor's misses make
        x = tokens[-1]
        error = np.abs(window(x) - _reference(x, up, down, b_up, b_down)).max()
        assert error / np.abs(_reference(x, up, down, b_up, b_down)).max() < 0.2


def test_without_retain_neurons_idle_for_the_window_leave_and_with_it_they_stay_while_there_is_room(tmp_path, ffn):
    up, down, b_up, b_down = ffn
    rng = np.random.default_rng(5)
    predictor, _ = build_predictor(up, b_up, rank=32)
    lay = layout("l", HIDDEN, NEURONS, np.float32, False, True, 1)
    write_image(tmp_path / "img.bin", [(lay, {"up": up, "down": down})])
    tokens = [rng.standard_normal((1, HIDDEN)).astype(np.float32) for _ in range(10)]   # uncorrelated
    room = 2 * max(len(predictor.active(x)) for x in tokens)     # two tokens' neurons: less than all ten's
    with ReaderPool(tmp_path / "img.bin", threads=2) as pool:
        paper = StreamedFfn(lay, pool, b_up, b_down, "window", predictor, window=2, capacity=NEURONS, retain=False)
        kept = StreamedFfn(lay, pool, b_up, b_down, "window", predictor, window=2, capacity=NEURONS, retain=True)
        small = StreamedFfn(lay, pool, b_up, b_down, "window", predictor, window=2, capacity=room, retain=True)
        active, last_seen = [], {}
        for step, x in enumerate(tokens):
            np.testing.assert_array_equal(paper(x), kept(x))
            np.testing.assert_array_equal(small(x), kept(x))
            active.append(set(predictor.active(x).tolist()))
            last_seen.update(dict.fromkeys(active[-1], step))
            assert set(paper.neuron_slot) == active[-1] | (active[-2] if len(active) > 1 else set())   # the window
            assert set(kept.neuron_slot) == set().union(*active)   # everything seen: the cache has room for it
            held = set(small.neuron_slot)
            assert len(held) <= room and active[-1] <= held
            if len(last_seen) > len(held):                         # least recently used out first
                assert max(last_seen[n] for n in set(last_seen) - held) <= min(last_seen[n] for n in held)
        assert len(set().union(*active)) > room
        assert kept.bytes_read < small.bytes_read and kept.bytes_read < paper.bytes_read


def test_a_cache_smaller_than_a_tokens_neurons_still_computes_the_same(tmp_path, ffn):
    up, down, b_up, b_down = ffn
    predictor, _ = build_predictor(up, b_up, rank=16)
    predictor.margin = 10.0   # predicts most neurons: more than the cache holds
    lay = layout("l", HIDDEN, NEURONS, np.float32, False, False, 1)
    write_image(tmp_path / "img.bin", [(lay, {"up": up, "down": down})])
    x = np.random.default_rng(3).standard_normal((1, HIDDEN)).astype(np.float32)
    with ReaderPool(tmp_path / "img.bin", threads=2) as pool:
        small = StreamedFfn(lay, pool, b_up, b_down, "window", predictor, window=2, capacity=8)
        alone = StreamedFfn(lay, pool, b_up, b_down, "predict", predictor)
        for _ in range(3):   # the same neurons, summed in batches: equal up to the order of the sums
            np.testing.assert_allclose(small(x), alone(x), rtol=1e-5, atol=1e-5)
        assert small.held <= 8


def test_an_image_that_does_not_match_its_manifest_is_refused(tmp_path, ffn):
    up, down, *_ = ffn
    lay = layout("l", HIDDEN, NEURONS, np.float32, False, True, 1)
    image = write_image(tmp_path / "img.bin", [(lay, {"up": up, "down": down})])
    again = FlashImage.from_json(image.to_json())
    assert again.size == image.size and again.layer("l").chunk_bytes == lay.chunk_bytes
    data = bytearray((tmp_path / "img.bin").read_bytes())
    data[100] ^= 0xFF
    (tmp_path / "img.bin").write_bytes(bytes(data))
    with pytest.raises(FlashError, match="do not match the manifest"):
        again.verify(tmp_path / "img.bin")
    (tmp_path / "img.bin").write_bytes(bytes(data[:-4096]))
    with pytest.raises(FlashError, match="but its manifest says"):
        again.check(tmp_path / "img.bin")
    with pytest.raises(FlashError, match="not a hetflow-flash-image"):
        FlashImage.from_json('{"format": "other"}')


def test_an_image_on_a_file_system_without_room_is_one_error(tmp_path, ffn, monkeypatch):
    import os
    up, down, *_ = ffn

    class Full:
        f_bavail, f_frsize = 1, 4096
    monkeypatch.setattr(os, "statvfs", lambda path: Full())
    with pytest.raises(FlashError, match="the flash image needs .* bytes and the file system has 4096 free"):
        write_image(tmp_path / "img.bin", [(layout("l", HIDDEN, NEURONS, np.float32, False, True, 1),
                                            {"up": up, "down": down})])


# --- the plan -----------------------------------------------------------------------------------------------

LAYERS = [FfnLayer(f"l{i}", 256, 1024, 4) for i in range(8)]   # 2 MiB each


def test_a_budget_below_the_resident_minimum_is_refused_naming_both():
    with pytest.raises(FlashPlanError, match="budget of 10.0 MiB is below the resident minimum of 4[0-9.]+ MiB"):
        plan_flash(LAYERS, 10 << 20, 10 << 20, CURVE)


def test_the_plan_keeps_what_fits_and_streams_the_rest_within_the_budget():
    budget = 48 << 20
    dense = plan_flash(LAYERS, 8 << 20, budget, CURVE, predict=False)
    assert dense.dram_bytes <= budget and 0 < len(dense.streamed) < len(LAYERS)
    sparse = plan_flash(LAYERS, 8 << 20, budget, CURVE, 0.05, 4, window_fraction=0.1, new_fraction=0.01)
    assert sparse.dram_bytes <= budget and all(l.rank > 0 and l.capacity > 0 for l in sparse.streamed)
    everything = plan_flash(LAYERS, 8 << 20, 1 << 30, CURVE)
    assert not everything.streamed                                    # a budget that holds it all streams nothing
    # per-layer fractions: the layer that would read the most per token is the one kept resident
    reads = [0.01] * 8
    reads[5] = 0.5
    budget = 40 << 20
    while True:   # the smallest budget that brings one layer back into DRAM
        try:
            per_layer = plan_flash(LAYERS, 8 << 20, budget, CURVE, 0.05, 4, window_fraction=0.1, new_fraction=reads)
        except FlashPlanError:
            per_layer = None
        if per_layer is not None and len(per_layer.streamed) < len(LAYERS):
            break
        budget += 1 << 18
    assert [i for i, l in enumerate(per_layer.layers) if not l.streamed] == [5]


def test_chunks_grow_where_the_flash_reads_small_chunks_slowly():
    layer = LAYERS[0]   # a bundle is 2 KiB
    assert best_chunk(layer, CURVE, 1.0) > best_chunk(layer, CURVE, 0.01)
    assert throughput_at(CURVE, 32768) == pytest.approx(0.7e9)
    assert 0.1e9 < throughput_at(CURVE, 8192) < 0.7e9


def test_speculative_reads_change_what_is_read_not_what_is_computed(tmp_path, ffn):
    """Two stacked layers (the same weights twice in the image): with speculation on, the first layer starts
    reading the second's likely neurons from its own input; the outputs equal the layers run without it, and
    the second layer takes chunks from the speculative read."""
    up, down, b_up, b_down = ffn
    rng = np.random.default_rng(4)
    samples = rng.standard_normal((256, HIDDEN)).astype(np.float32)
    predictor, _ = build_predictor(up, b_up, rank=32, samples=samples, target_recall=0.95)
    lays = [layout(f"l{i}", HIDDEN, NEURONS, np.float32, False, True, 1) for i in range(2)]
    write_image(tmp_path / "img.bin", [(lay, {"up": up, "down": down}) for lay in lays])
    base = rng.standard_normal(HIDDEN).astype(np.float32)
    tokens = [(base + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)[None] for _ in range(8)]
    with ReaderPool(tmp_path / "img.bin", threads=2) as pool:
        def stack(speculate: bool):
            layers = [StreamedFfn(lay, pool, b_up, b_down, "window", predictor, window=2, capacity=120) for lay in lays]
            layers[0].next, layers[0].speculate_ahead = layers[1], speculate
            return layers
        plain, fast = stack(False), stack(True)
        for x in tokens:
            h = x + 0.05 * plain[0](x)   # the residual stream: the second layer's input is near the first's
            g = x + 0.05 * fast[0](x)
            np.testing.assert_array_equal(g, h)
            np.testing.assert_array_equal(fast[1](g), plain[1](h))
        assert fast[1].speculated_chunks > 0 and 0 < fast[1].speculated_used <= fast[1].speculated_chunks
        assert plain[1].speculated_chunks == 0


def test_rebalancing_moves_cache_room_to_the_layer_that_overflows_and_keeps_the_total(tmp_path, ffn):
    from hetflow.runtime.flash_stream import REBALANCE_EVERY, rebalance_caches
    up, down, b_up, b_down = ffn
    rng = np.random.default_rng(6)
    predictor, _ = build_predictor(up, b_up, rank=32)
    busy, _ = build_predictor(up, b_up, rank=32)
    busy.margin = 10.0                                   # this layer fires most of its neurons every token
    lays = [layout(f"l{i}", HIDDEN, NEURONS, np.float32, False, True, 1) for i in range(2)]
    write_image(tmp_path / "img.bin", [(lay, {"up": up, "down": down}) for lay in lays])
    tokens = [rng.standard_normal((1, HIDDEN)).astype(np.float32) for _ in range(3 * REBALANCE_EVERY)]
    with ReaderPool(tmp_path / "img.bin", threads=2) as pool:
        def model(share: bool):
            quiet = StreamedFfn(lays[0], pool, b_up, b_down, "window", predictor, window=2, capacity=100)
            loud = StreamedFfn(lays[1], pool, b_up, b_down, "window", busy, window=2, capacity=40)
            dense = StreamedFfn(lays[0], pool, b_up, b_down, "dense")        # no cache: takes no part
            for layer in (quiet, loud, dense):
                layer.peers = [quiet, loud, dense] if share else None
            return quiet, loud, dense
        shared, alone = model(True), model(False)
        for x in tokens:
            for a, b in zip(shared, alone):
                np.testing.assert_allclose(a(x), b(x), rtol=1e-4, atol=1e-4)     # unchanged, up to f32 sums
            assert shared[0].capacity + shared[1].capacity <= 140                 # within the plan's total
            assert shared[0].held <= shared[0].capacity and shared[1].held <= shared[1].capacity
        assert shared[1].capacity > 40 and shared[0].capacity < 100               # room moved to the loud layer
        assert shared[1].bytes_read < alone[1].bytes_read
        assert shared[0]._room.copies == shared[1]._room.copies == 0             # resized in place
        for layer in shared[:2]:                                                  # the cache still consistent
            assert all(layer.slot_neuron[slot] == n for n, slot in layer.neuron_slot.items())
        rebalance_caches([shared[2]])                                             # dense only: nothing to do


def test_a_window_cache_resizes_in_place_and_keeps_its_rows():
    from hetflow.runtime.flash_stream import _CacheRoom
    room = _CacheRoom(100, 2, 64)
    rows = np.random.default_rng(0).standard_normal((100, 2, 64)).astype(np.float32)
    room.matrix[:] = rows
    grown = room.resize(400)
    np.testing.assert_array_equal(grown[:100], rows)                  # held rows unchanged...
    assert not grown[100:].any() and grown.shape == (400, 2, 64)
    del grown                                                        # (views of the old size go first)
    shrunk = room.resize(30)
    np.testing.assert_array_equal(shrunk, rows[:30])
    assert room.copies == 0                                          # ...and never copied
    alive = shrunk[:5]                                               # a view still held: it copies, same rows
    del shrunk
    again = room.resize(60)
    np.testing.assert_array_equal(again[:30], rows[:30])
    np.testing.assert_array_equal(alive, rows[:5])
    assert room.copies == 1


@pytest.mark.parametrize("bundled", [True, False])
def test_dense_layers_share_two_read_buffers_across_layers_and_tokens(tmp_path, ffn, bundled):
    """Three layers streamed whole, each prefetching the next (the last the first, as the flash runner does),
    over four tokens: the outputs equal the reference, and every read went into one of two shared buffers."""
    from hetflow.runtime.flash_stream import ReadBuffers
    up, down, b_up, b_down = ffn
    lays = [layout(f"l{i}", HIDDEN, NEURONS, np.float32, False, bundled, 1) for i in range(3)]
    weights = [(up * (i + 1), down) for i in range(3)]
    write_image(tmp_path / "img.bin", [(lay, {"up": u, "down": d}) for lay, (u, d) in zip(lays, weights)])
    rng = np.random.default_rng(7)
    buffers = ReadBuffers(2)
    with ReaderPool(tmp_path / "img.bin", threads=2) as pool:
        layers = [StreamedFfn(lay, pool, b_up, b_down) for lay in lays]
        for i, layer in enumerate(layers):
            layer.next, layer.buffers = layers[(i + 1) % 3], buffers
        for _ in range(4):
            h = rng.standard_normal((1, HIDDEN)).astype(np.float32)
            for layer, (u, d) in zip(layers, weights):
                expected = _reference(h, u, d, b_up, b_down)
                h = layer(h)
                np.testing.assert_allclose(h, expected, rtol=1e-5, atol=1e-3)
                h = h / np.abs(h).max()
    assert buffers.fresh == 0 and len(buffers._owned) == 2


def test_rebalancing_again_and_again_keeps_the_plan_s_room(tmp_path, ffn):
    """The room is the plan's total less a reserve for the largest cache's growth past the plan's largest: the
    same recent calls rebalanced ten times give the same capacities (a reserve taken from the current sum
    each time compounded, and the caches shrank at every rebalance)."""
    from hetflow.runtime.flash_stream import RESERVE_GROWTHS, rebalance_caches
    up, down, b_up, b_down = ffn
    predictor, _ = build_predictor(up, b_up, rank=32)
    lays = [layout(f"l{i}", HIDDEN, NEURONS, np.float32, False, True, 1) for i in range(3)]
    write_image(tmp_path / "img.bin", [(lay, {"up": up, "down": down}) for lay in lays])
    with ReaderPool(tmp_path / "img.bin", threads=2) as pool:
        layers = [StreamedFfn(lay, pool, b_up, b_down, "window", predictor, window=2, capacity=60) for lay in lays]
        rng = np.random.default_rng(8)
        layers[0].recent = [rng.choice(NEURONS, 90, replace=False) for _ in range(4)]   # loud: past its 60
        layers[1].recent = [rng.choice(NEURONS, 10, replace=False) for _ in range(4)]
        layers[2].recent = [np.arange(5) for _ in range(4)]
        rebalance_caches(layers)
        first = [layer.capacity for layer in layers]
        for _ in range(10):
            rebalance_caches(layers)
        assert [layer.capacity for layer in layers] == first
        grow = max(first) - 60
        assert grow > 0 and 180 - RESERVE_GROWTHS * grow - 3 <= sum(first) <= 180 - RESERVE_GROWTHS * grow
        assert first[0] >= 90 and first[1] >= 10 and first[2] >= 5          # each holds its busiest call
