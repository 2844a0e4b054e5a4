"""flash_cost: what a weight GEMV costs when its matrix lives in NAND flash, for placement.

The hook placement calls for a MatMul whose weight is stored in flash (issue 16:
models larger than DRAM). The timing is ``hetflow.platform.nand``'s model of
Cambricon-LLM (arXiv 2409.15654): the matrix cut into ``h x (channels * h)``
tiles, a share ``alpha`` computed by the flash's own cores (only inputs and
partial sums cross the bus), the rest read page by page to the NPU, ``alpha``
chosen so that neither the dies nor the bus waits on the other. The same math
drives the flash simulator (``hetflow.runtime.runners.nand``), so placement and
simulation agree by construction. Not wired into ``place`` yet.
"""
from __future__ import annotations

from hetflow.ir.types import DType
from hetflow.platform import Flash, Platform
from hetflow.platform.nand import NandError, gemv_split

__all__ = ["flash_gemv_seconds", "flash_gemv_on"]


def _dtype_bytes(dtype: DType | str) -> float:
    try:
        return DType(dtype).itemsize
    except ValueError:
        raise NandError(f"flash gemv dtype: {dtype!r} is not a hetflow dtype (e.g. 'i8', 'f16')") from None


def flash_gemv_seconds(rows: int, cols: int, dtype: DType | str, flash: Flash, npu_peak: float) -> float:
    """Modelled seconds of y = x @ W, W of ``rows x cols`` elements of ``dtype`` in ``flash``, the work split
    between in-flash compute and an NPU of ``npu_peak`` ops/s at the best share."""
    return gemv_split(rows, cols, _dtype_bytes(dtype), flash, npu_peak).seconds


def flash_gemv_on(platform: Platform, rows: int, cols: int, dtype: DType | str, npu: str = "npu") -> float:
    """``flash_gemv_seconds`` with the figures of ``platform``: its flash and its NPU's peak for ``dtype``."""
    if platform.flash is None:
        raise NandError(f"platform {platform.name!r} has no [flash] table: a weight cannot live in flash there")
    peak = platform.device(npu).peak_for(DType(dtype).value)
    return flash_gemv_seconds(rows, cols, dtype, platform.flash, peak)
