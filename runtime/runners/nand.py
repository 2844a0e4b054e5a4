"""The NAND flash simulator: Cambricon-LLM's in-flash GEMV run tile by tile in NumPy, and a decode step's time.

``NandGemvSimulator`` executes y = x @ W the way Cambricon-LLM's hybrid does: W
cut into ``h x (channels * h)`` tiles (``hetflow.platform.nand.tile_shape``); a
share of the tiles computed in flash, where each channel's cores multiply their
page of the tile's ``h x h`` block by the input slice and ship only the channel's
h partial sums; the other tiles read whole to the NPU, which multiplies them and
adds the partial sums in. The result equals ``x @ W`` (within float rounding; int
inputs accumulate exactly, returned as int32 as the cores' accumulators are);
the time is the model's (``gemv_split``) for the share of tiles actually placed.

``decode_token_seconds`` models one decode step of a decoder-only LLM on such a
platform: every weight GEMV through the flash model, attention on the NPU with
the KV cache in DRAM, one NPU launch per kernel. Not a runner of a partition
(no backend is named ``nand``): the simulator and model the flash backend and
placement will use.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from hetflow.platform import Flash, Platform
from hetflow.platform.nand import (PARTIAL_SUM_BYTES, NandError, block_pages, check_flash, gemv_split,
                                   read_pages_seconds, tile_shape)

__all__ = ["NandGemvSimulator", "GemvRun", "DecoderConfig", "decode_token_seconds", "with_channels"]


@dataclass(frozen=True)
class GemvRun:
    """What one simulated GEMV did: its result, modelled seconds, the in-flash share of tiles, and counts."""
    y: np.ndarray
    seconds: float
    alpha: float
    flash_tiles: int
    npu_tiles: int
    pages_sensed: int
    bus_bytes: float       # over the channel buses: whole pages of the NPU's tiles, inputs and partial sums
    breakdown: dict


class NandGemvSimulator:
    """Runs y = x @ W over Cambricon-LLM's tiling on ``flash`` with an NPU of ``npu_peak`` ops/s.

    ``alpha`` is the share of tiles computed in flash (None: the model's optimum); it is rounded to whole
    tiles, the first ones in column-then-row order, and the time is modelled for the share placed."""

    def __init__(self, flash: Flash, npu_peak: float, alpha: float | None = None):
        self.flash = check_flash(flash)
        self.npu_peak = npu_peak
        self.alpha = alpha

    def run(self, x: np.ndarray, w: np.ndarray) -> GemvRun:
        x, w = np.asarray(x), np.asarray(w)
        if w.ndim != 2 or x.ndim not in (1, 2) or x.shape[-1] != w.shape[0]:
            raise NandError(f"gemv: x of shape {x.shape} cannot multiply W of shape {w.shape} "
                            "(x is [rows] or [batch, rows], W is [rows, cols])")
        rows, cols = w.shape
        dtype_bytes = w.dtype.itemsize
        h, width = tile_shape(self.flash, dtype_bytes)
        row_tiles, col_tiles = math.ceil(rows / h), math.ceil(cols / width)
        tiles = row_tiles * col_tiles
        share = gemv_split(rows, cols, dtype_bytes, self.flash, self.npu_peak, self.alpha).alpha
        in_flash = round(share * tiles)
        acc = np.int64 if np.issubdtype(np.result_type(x, w), np.integer) else np.float64
        y = np.zeros(x.shape[:-1] + (cols,), dtype=acc)
        pages_per_block = block_pages(self.flash, dtype_bytes)
        bus = 0.0
        for index in range(tiles):
            r0, c0 = (index % row_tiles) * h, (index // row_tiles) * width
            xs = x[..., r0:r0 + h].astype(acc)
            if index < in_flash:
                bus += self._in_flash_tile(xs, w, r0, c0, h, y, acc)
            else:
                y[..., c0:c0 + width] += xs @ w[r0:r0 + h, c0:c0 + width].astype(acc)  # the NPU's tile
                bus += self.flash.channels * pages_per_block * self.flash.page_size
        alpha = in_flash / tiles
        timing = gemv_split(rows, cols, dtype_bytes, self.flash, self.npu_peak, alpha)
        out = y.astype(np.int32) if acc is np.int64 else y.astype(np.result_type(x, w))
        return GemvRun(out, timing.seconds, alpha, in_flash, tiles - in_flash,
                       tiles * self.flash.channels * pages_per_block, bus, timing.breakdown())

    def _in_flash_tile(self, xs, w, r0, c0, h, y, acc) -> float:
        """One tile in flash: per channel, each core multiplies its page (a slab of the h x h block's rows)
        by its slice of the input; the channel adds its cores' partial sums on die and ships h of them."""
        cols = w.shape[1]
        bus = 0.0
        for channel in range(self.flash.channels):
            b0 = c0 + channel * h
            if b0 >= cols:
                break
            block = w[r0:r0 + h, b0:b0 + h].astype(acc)
            slabs = np.array_split(np.arange(block.shape[0]), self.flash.cores_per_channel)
            partial = sum(xs[..., s] @ block[s, :] for s in slabs if len(s))
            y[..., b0:b0 + block.shape[1]] += partial  # the NPU adds the shipped partial sums
            bus += h * (w.dtype.itemsize + PARTIAL_SUM_BYTES)
        return bus


@dataclass(frozen=True)
class DecoderConfig:
    """A decoder-only LLM's shape for the decode-step model. ``weight_bytes`` 1 = int8, as Cambricon-LLM runs;
    ``kv_bytes`` is the KV cache's element size (int8 assumed: unconfirmed); ``gated_ffn`` = Llama's SwiGLU
    (gate and up projections), else OPT's two-matrix FFN."""
    name: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    context: int = 512
    weight_bytes: float = 1
    kv_bytes: float = 1
    gated_ffn: bool = True

    def gemvs(self) -> list[tuple[str, int, int, int]]:
        """``(name, rows, cols, count per token)`` of the weight GEMVs: Q, K and V as one matrix, gate and up
        as one (each one pass over the flash), the output and down projections, the LM head."""
        kv_dim = self.kv_heads * (self.hidden // self.heads)
        up = 2 * self.ffn if self.gated_ffn else self.ffn
        return [("qkv", self.hidden, self.hidden + 2 * kv_dim, self.layers),
                ("o", self.hidden, self.hidden, self.layers),
                ("up", self.hidden, up, self.layers),
                ("down", self.ffn, self.hidden, self.layers),
                ("lm_head", self.hidden, self.vocab, 1)]

    def weight_bytes_per_token(self) -> float:
        """Bytes of weights one decode step reads from flash: every GEMV's matrix and one embedding row."""
        gemv = sum(rows * cols * n for _, rows, cols, n in self.gemvs())
        return (gemv + self.hidden) * self.weight_bytes


LAUNCHES_PER_LAYER_BESIDES_GEMVS = 4  # attention, two norms, the activation (residual adds fused): unconfirmed


def decode_token_seconds(config: DecoderConfig, platform: Platform, flash: Flash | None = None,
                         npu: str = "npu") -> tuple[float, dict]:
    """One decode step's modelled seconds on ``platform`` (its flash, or ``flash`` to try another
    configuration) and the breakdown: weight GEMVs through the in-flash/NPU split, the embedding row read from
    flash, attention on the NPU over the KV cache in DRAM (the slower of DRAM bandwidth and NPU ops), and one
    NPU launch per kernel. Steps run one after another (no overlap between layers is modelled)."""
    flash = check_flash(flash if flash is not None else platform.flash)
    device = platform.device(npu)
    peak = device.peak_for("i8" if config.weight_bytes == 1 else "f16")
    dram = platform.memory_of(npu).bandwidth
    gemv, alphas = 0.0, {}
    for name, rows, cols, count in config.gemvs():
        t = gemv_split(rows, cols, config.weight_bytes, flash, peak)
        gemv += t.seconds * count
        alphas[name] = t.alpha
    embedding = read_pages_seconds(math.ceil(config.hidden * config.weight_bytes / flash.page_size), flash)
    head_dim = config.hidden // config.heads
    kv = 2 * config.context * config.kv_heads * head_dim * config.kv_bytes
    attention_ops = 4 * config.heads * head_dim * config.context  # q.K^T and p.V, a multiply-add each
    attention = config.layers * max(kv / dram, attention_ops / peak)
    launches = (config.layers * (4 + LAUNCHES_PER_LAYER_BESIDES_GEMVS) + 1) * device.launch
    total = gemv + embedding + attention + launches
    return total, {"gemv": gemv, "embedding": embedding, "attention": attention, "launch": launches,
                   "alpha": alphas, "tile": tile_shape(flash, config.weight_bytes), "channels": flash.channels,
                   "weight_bytes": config.weight_bytes_per_token()}


def with_channels(flash: Flash, channels: int) -> Flash:
    """``flash`` with another channel count (Cambricon-LLM's medium and large configurations: 16 and 32)."""
    return check_flash(dataclasses.replace(flash, channels=channels))
