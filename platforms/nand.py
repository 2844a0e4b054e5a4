"""NAND flash timing and Cambricon-LLM's split of a GEMV between in-flash compute and the NPU.

The pure math, shared by placement (``hetflow.passes.flash_cost``) and the flash
simulator (``hetflow.runtime.runners.nand``). Figures come from the platform's
``Flash`` (REFERENCE.md, Cambricon-LLM arXiv 2409.15654): 16 KiB pages, tR = 30 us,
8 / 16 / 32 channels, an 8-bit bus at 1000 MT/s (1 GB/s per channel), an NPU of
2 TOPS int8. ``cores_per_channel`` (4) and ``core_rate`` are unconfirmed (see ``Flash``).

The model, per channel (every channel gets the same share of every tile):

- A core is a die (or plane) with its own page buffer and a small compute unit.
  Sensing a page into the buffer takes tR; the ``cores_per_channel`` cores of a
  channel sense in parallel; the channel's bus moves one page at ``bus_rate``.
- Plain reads use cache read: the next page is sensed while the previous one is on
  the bus, so n pages cost ``tR + P/B`` for the first and ``max(P/B, tR/K)`` for
  each one after (``read_pages_seconds``).
- Tiling (Cambricon-LLM): a tile is ``h x (channels * h)`` elements with
  ``h = sqrt(cores_per_channel * page elements)``; each channel holds one ``h x h``
  block of it, one page per core. For an in-flash block the cores multiply their page
  by the input slice in place; only the input slice (h elements) goes in and h partial
  sums (int32, 4 bytes) come out over the bus, never the weights.
- A share ``alpha`` of the tiles is computed in flash, the rest read to the NPU.
  Three resources work at once and the GEMV takes the longest of them plus one
  pipeline fill (tR + P/B): the dies (every page sensed once; an in-flash page also
  multiplied, overlapped with sensing), the bus (plain pages, plus inputs and partial
  sums of the in-flash blocks), and the NPU (its share of the MACs, streamed).
  ``alpha`` minimises that maximum: the dies' time balances the bus's.

Not modelled: ECC, the NPU's on-chip buffering limits, contention between channels
on the NPU's side, and flash writes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from hetflow.platform import Flash, PlatformError

__all__ = ["NandError", "GemvTime", "check_flash", "tile_shape", "block_pages", "read_pages_seconds",
           "gemv_split", "gemv_seconds", "PARTIAL_SUM_BYTES"]

PARTIAL_SUM_BYTES = 4  # an in-flash core's accumulator (int32 for int8 x int8; Cambricon-LLM runs int8)


class NandError(PlatformError):
    pass


def check_flash(flash: Flash) -> Flash:
    """``flash`` if its NAND figures can drive this model; otherwise one NandError naming the bad field."""
    if flash is None:
        raise NandError("flash: the platform has no [flash] table (the NAND model needs one)")
    checks = (
        ("channels", isinstance(flash.channels, int) and flash.channels >= 1, "a whole number of at least 1"),
        ("cores_per_channel", isinstance(flash.cores_per_channel, int) and flash.cores_per_channel >= 1,
         "a whole number of at least 1"),
        ("page_size", _power_of_two(flash.page_size), "a power of two of bytes (e.g. 16 KiB)"),
        ("read_latency", _positive(flash.read_latency), "a positive time (tR, e.g. 30 us)"),
        ("bus_rate", _positive(flash.bus_rate), "a positive bandwidth (e.g. 1 GB/s per channel)"),
        ("core_rate", _positive(flash.core_rate), "a positive bandwidth (e.g. 1 GB/s)"),
    )
    for name, ok, expected in checks:
        if not ok:
            raise NandError(f"flash.{name}: expected {expected}, got {getattr(flash, name)!r}")
    return flash


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _power_of_two(x) -> bool:
    return _positive(x) and float(x).is_integer() and (int(x) & (int(x) - 1)) == 0


def _check_dims(rows: int, cols: int, dtype_bytes: float) -> None:
    for name, value in (("rows", rows), ("cols", cols)):
        if not isinstance(value, int) or value < 1:
            raise NandError(f"gemv {name}: expected a whole number of at least 1, got {value!r}")
    if not _positive(dtype_bytes):
        raise NandError(f"gemv dtype_bytes: expected a positive size, got {dtype_bytes!r}")


def tile_shape(flash: Flash, dtype_bytes: float = 1) -> tuple[int, int]:
    """Cambricon-LLM's tile in elements: height h = sqrt(cores per channel x page elements), rounded down
    to a power of two so an h x h block fills at most ``cores_per_channel`` pages; width = channels x h.
    For int8 on 16 KiB pages, 4 cores and 8 channels: (256, 2048), the paper's small configuration."""
    check_flash(flash)
    elements = flash.page_size / dtype_bytes
    h = 1 << int(math.floor(math.log2(math.sqrt(flash.cores_per_channel * elements))))
    return h, flash.channels * h


def block_pages(flash: Flash, dtype_bytes: float = 1) -> int:
    """Pages one channel's ``h x h`` block of a tile fills (at most ``cores_per_channel``: one per core)."""
    h, _ = tile_shape(flash, dtype_bytes)
    return math.ceil(h * h * dtype_bytes / flash.page_size)


def read_pages_seconds(pages: float, flash: Flash) -> float:
    """Plain reads of ``pages`` pages spread evenly over the channels, with cache read: the first page of a
    channel costs tR + page/bus, each later one max(page/bus, tR/cores) (the slower of bus and dies)."""
    check_flash(flash)
    if pages <= 0:
        return 0.0
    per_channel = math.ceil(pages / flash.channels)
    transfer = flash.page_size / flash.bus_rate
    step = max(transfer, flash.read_latency / flash.cores_per_channel)
    return flash.read_latency + transfer + (per_channel - 1) * step


@dataclass(frozen=True)
class GemvTime:
    """One GEMV's modelled time (seconds) and where it went. ``in_flash`` is the dies' time (every page
    sensed, the in-flash share also multiplied), ``read`` the channel bus's (plain pages, in-flash inputs and
    partial sums), ``npu`` the NPU's share of the MACs; ``seconds`` = max of the three + ``fill``."""
    seconds: float
    alpha: float
    in_flash: float
    read: float
    npu: float
    fill: float
    tiles: int
    tile: tuple[int, int]

    def breakdown(self) -> dict:
        return {"in_flash": self.in_flash, "read": self.read, "npu": self.npu, "fill": self.fill,
                "tiles": self.tiles, "tile": self.tile}


def _rates(rows: int, cols: int, dtype_bytes: float, flash: Flash, npu_peak: float):
    """The per-channel cost lines a + b * alpha of the dies, the bus and the NPU."""
    h, width = tile_shape(flash, dtype_bytes)
    tiles = math.ceil(rows / h) * math.ceil(cols / width)
    page = flash.page_size
    # each tile gives each channel one h x h block: at most one page per core, all cores sensing at once
    sense = flash.read_latency
    multiply = max(sense, page / flash.core_rate)                 # in-flash page: sensed, then multiplied (overlapped)
    read_block = block_pages(flash, dtype_bytes) * page / flash.bus_rate  # a plain block's pages over the bus
    flash_block = h * (dtype_bytes + PARTIAL_SUM_BYTES) / flash.bus_rate  # input slice in, partial sums out
    macs = rows * cols
    die = (tiles * sense, tiles * (multiply - sense))
    bus = (tiles * read_block, tiles * (flash_block - read_block))
    npu = (2 * macs / npu_peak, -2 * macs / npu_peak + tiles * flash.channels * h / npu_peak)  # + partial-sum adds
    return tiles, (h, width), die, bus, npu


def gemv_split(rows: int, cols: int, dtype_bytes: float, flash: Flash, npu_peak: float,
               alpha: float | None = None) -> GemvTime:
    """The modelled time of y = x @ W for W of ``rows x cols`` elements of ``dtype_bytes`` bytes stored in
    flash, with a share ``alpha`` of its tiles computed in flash and the rest read to an NPU of ``npu_peak``
    ops/s. ``alpha=None`` picks the share that minimises the time (the smallest such share: where the dies'
    time meets the bus's or the NPU's, or an end of [0, 1])."""
    check_flash(flash)
    _check_dims(rows, cols, dtype_bytes)
    if not _positive(npu_peak):
        raise NandError(f"gemv npu_peak: expected a positive ops/s, got {npu_peak!r}")
    if alpha is not None and not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise NandError(f"gemv alpha: expected a share in [0, 1], got {alpha!r}")
    tiles, tile, die, bus, npu = _rates(rows, cols, dtype_bytes, flash, npu_peak)
    fill = flash.read_latency + flash.page_size / flash.bus_rate
    lines = (die, bus, npu)

    def at(a: float) -> float:
        return max(c + s * a for c, s in lines)

    if alpha is None:
        candidates = {0.0, 1.0}
        for i, (c0, s0) in enumerate(lines):  # where two cost lines cross inside [0, 1]
            for c1, s1 in lines[i + 1:]:
                if s0 != s1 and 0 < (c1 - c0) / (s0 - s1) < 1:
                    candidates.add((c1 - c0) / (s0 - s1))
        best = min(at(a) for a in candidates)
        alpha = min(a for a in candidates if at(a) <= best * (1 + 1e-12))
    return GemvTime(at(alpha) + fill, float(alpha), die[0] + die[1] * alpha, bus[0] + bus[1] * alpha,
                    npu[0] + npu[1] * alpha, fill, tiles, tile)


def gemv_seconds(rows: int, cols: int, dtype_bytes: float, flash: Flash, npu_peak: float,
                 alpha: float | None = None) -> tuple[float, float, dict]:
    """``(seconds, alpha, breakdown)`` of ``gemv_split``: the GEMV's modelled time, the in-flash share used,
    and the time of the dies (``in_flash``), the bus (``read``), the NPU and the pipeline fill."""
    t = gemv_split(rows, cols, dtype_bytes, flash, npu_peak, alpha)
    return t.seconds, t.alpha, t.breakdown()
