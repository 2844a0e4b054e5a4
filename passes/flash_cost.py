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


def flash_ffn_seconds(node, platform: Platform, device_name: str) -> tuple[float | None, str]:
    """(modelled seconds, how) of a ``hetflow.flash_ffn`` node on ``device_name``, or (None, why not).

    * a CPU reads the layer's bundles from flash (whole, or the new neurons of a window-cached predictor)
      at the platform's throughput for its chunk size, and computes them: read + compute (the runtime's
      reader pool prefetches the next layer, which the schedule does not model: an upper bound);
    * an NPU beside in-flash compute (flash-edge: ``cores_per_channel``): each token's up and down GEMVs
      split between the flash's cores and the NPU (``flash_gemv_on``: Cambricon-LLM's tiling);
    * nothing else runs it."""
    from hetflow.ir.ops import flash_ffn_weights
    from hetflow.ir.types import DType
    device = platform.device(device_name)
    if platform.flash is None:
        return None, f"platform {platform.name} has no flash"
    roles = flash_ffn_weights(node)
    up = node.inputs[roles["up"]].type
    x = node.inputs[0].type
    if up is None or x is None or x.shape is None:
        return None, "its types are unknown"
    hidden, neurons = (int(d) for d in up.shape)
    tokens = 1
    for d in x.shape[:-1]:
        tokens *= int(d) if isinstance(d, int) else 1
    dtype = up.dtype
    itemsize = dtype.itemsize
    parts = 3 if node.attrs.get("gated") else 2
    if device.kind == "cpu":
        chunk = int(node.attrs.get("chunk_neurons", 1)) * parts * hidden * itemsize
        share = 1.0
        if node.attrs.get("mode", "dense") != "dense":   # the window cache: about the window's new neurons per token
            share = min(1.0, int(node.attrs.get("capacity", neurons)) / max(1, neurons * int(node.attrs.get("window", 1))))
        read = share * parts * hidden * neurons * itemsize / platform.flash.throughput_at(chunk)
        compute = 2 * parts * tokens * hidden * neurons / device.analytic().peak_for(dtype.value)
        return read + compute + device.analytic().launch_for(1), "read from flash at its throughput for the chunk"
    if device.kind == "npu" and platform.flash.cores_per_channel > 0:
        try:
            DType(dtype.value)
            per_token = sum(flash_gemv_on(platform, r, c, dtype.value, device_name)
                            for r, c in [(hidden, neurons)] * (parts - 1) + [(neurons, hidden)])
        except NandError as exc:
            return None, str(exc).splitlines()[0]
        return tokens * per_token + device.analytic().launch_for(1), "in-flash compute with the NPU (Cambricon-LLM)"
    return None, f"{device.name} cannot run a layer streamed from flash (a CPU reads it, or an NPU beside in-flash compute)"
