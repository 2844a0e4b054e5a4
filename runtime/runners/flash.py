"""Runner ``flash``: a feed-forward layer whose weights stream from the artifact's flash image.

Loaded from an artifact, the layer's up and down projections are never in DRAM as a whole: each call reads
them from ``flash.bin`` with the reader pool (``hetflow.runtime.flash_io.ReaderPool``: O_DIRECT, else
reads that drop their pages from the cache) and computes with NumPy (``hetflow.runtime.flash_stream``):

* ``dense``: the whole layer, its read started while the layer before computed (every flash partition
  prefetches the next one, the last the first, for the next token): exact;
* ``window``: the neurons the predictor picks, those not already in the window cache read (approximate,
  as the compile report states: the node's NumPy spec computes the same neurons).

On a CPU the time is measured. On an NPU beside in-flash compute (flash-edge) the same computation runs on the
host and the time is modelled with ``hetflow.platform.nand`` (Cambricon-LLM's split between the flash's cores
and the NPU): ``last_seconds``.

Compiled in this process and not saved, the weights are in memory already (the model was): the layer is
computed from them by its NumPy spec and ``streamed`` is False; the report says so.
"""
from __future__ import annotations

import json
import time

import numpy as np

from hetflow.ir.flash_image import FlashError, Predictor
from hetflow.ir.ops import flash_ffn_weights, make_kernel

from . import RunnerError, register_runner
from .interpreter import HostRunner

READER_THREADS = 8
PROGRAM_FORMAT = "hetflow-flash-program"


class FlashRunner(HostRunner):
    def __init__(self, part, executor):
        super().__init__(part.output_names, executor.copy_into)
        where = f"partition {part.index} ({part.file})"
        try:
            program = json.loads(part.source)
        except (TypeError, json.JSONDecodeError) as exc:
            raise RunnerError(f"{where}: not a flash program ({exc})") from None
        if program.get("format") != PROGRAM_FORMAT:
            raise RunnerError(f"{where}: not a flash program (format {program.get('format')!r})")
        self.program, self.where = program, where
        self.node = part.graph.nodes[0]
        self.input_name = part.input_names[0] if part.input_names else program["operands"]["x"]
        weights = {w.name: w.data for w in part.graph.weights.values()}
        operands = program["operands"]
        self.kernel_inputs = [operands[role] for role in flash_ffn_weights(self.node)]   # in the op's order
        self.weights = weights
        self.last_seconds = None
        self.modelled_per_token = _modelled_per_token(program, part, executor.platform)
        self.stream = None
        image = getattr(part, "flash_image", None)
        if image is not None:
            self.stream = self._streamed(image, weights, operands, executor)
        else:
            self.kernel = make_kernel(self.node, part.graph.opset)

    @property
    def streamed(self) -> bool:
        return self.stream is not None

    def _streamed(self, image, weights: dict, operands: dict, executor):
        from hetflow.runtime.flash_io import ReaderPool
        from hetflow.runtime.flash_stream import ReadBuffers, StreamedFfn
        path, manifest = image
        p = self.program
        try:
            lay = manifest.layer(p["layer"])
        except FlashError as exc:
            raise RunnerError(f"{self.where}: {exc}") from None
        if (lay.hidden, lay.neurons, lay.dtype, lay.gated, lay.bundled, lay.chunk_neurons) != (
                p["hidden"], p["neurons"], p["dtype"], p["gated"], p["bundled"], p["chunk_neurons"]):
            raise RunnerError(f"{self.where}: layer {lay.name} in the flash image is laid out otherwise than its "
                              "program says (the image was written for another compile)")
        shared = executor.__dict__.setdefault("flash_streams", {"pools": {}, "layers": [], "io_log": [],
                                                                 "buffers": ReadBuffers(2)})
        pool = shared["pools"].get(str(path))
        if pool is None:
            pool = shared["pools"][str(path)] = ReaderPool(path, threads=READER_THREADS)
        predictor = None
        if p["mode"] != "dense":
            predictor = Predictor(np.ascontiguousarray(weights[operands["pred_left"]], np.float32),
                                  np.ascontiguousarray(weights[operands["pred_right"]], np.float32),
                                  np.asarray(weights[operands["b_up"]], np.float32), p["margin"])
        stream = StreamedFfn(lay, pool, np.asarray(weights[operands["b_up"]]), np.asarray(weights[operands["b_down"]]),
                             mode=p["mode"], predictor=predictor, window=p["window"],
                             capacity=p["capacity"] or None, activation="silu" if p["gated"] else p["activation"])
        stream.io_log = shared["io_log"]
        stream.buffers = shared["buffers"]      # dense layers reuse two read buffers (the plan counts two)
        layers = shared["layers"]
        if layers:   # each streamed layer prefetches the next while it computes; the last the first
            layers[-1].next = stream
            layers[-1].speculate_ahead = True   # (not the last: its next is the next token's first layer)
        stream.next = layers[0] if layers else stream
        layers.append(stream)
        for layer in layers:        # the window caches share their room (rebalance_caches)
            layer.peers = layers
        return stream

    def run_dynamic(self, inputs: dict) -> dict:
        self.call_began = time.perf_counter()
        x = np.asarray(inputs[self.input_name])
        if self.stream is None:
            ins = [x if name == self.input_name else self.weights[name] for name in self.kernel_inputs]
            y = self.kernel(ins)[0]
        else:
            y = self.stream(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        if self.modelled_per_token is not None:
            self.last_seconds = self.modelled_per_token * int(np.prod(x.shape[:-1]))
        return {self.output_names[0]: y}

    def io_events(self, call_start: float) -> list[dict]:
        """This layer's reads logged since ``call_start`` (perf_counter seconds; the run's start), shaped like the
        executor's events (``Measured.as_dict``), on a track of their own: the trace shows I/O beside compute."""
        if self.stream is None or self.stream.io_log is None:
            return []
        return [{"name": what, "device": "flash reads", "start_us": (a - call_start) * 1e6,
                 "end_us": (b - call_start) * 1e6, "kind": f"{self.stream.pool.mode} reads (measured)",
                 "ops": "", "flops": 0, "bytes": 0} for a, b, what in list(self.stream.io_log) if a >= call_start]

    def stats(self) -> dict:
        s = self.stream
        if s is None:
            return {"layer": self.program["layer"], "streamed": False}
        return {"layer": self.program["layer"], "streamed": True, "mode": s.mode, "bytes_read": s.bytes_read,
                "io_seconds": s.io_seconds, "compute_seconds": s.compute_seconds, "reader": s.pool.mode}


def _modelled_per_token(program: dict, part, platform) -> float | None:
    """Seconds per token on a device this machine lacks (an NPU beside in-flash compute): the layer's GEMVs,
    each split between the flash's cores and the NPU (``hetflow.platform.nand``); None on a CPU (measured)."""
    device = getattr(part, "device_spec", None)
    if device is None or device.kind == "cpu" or platform is None or platform.flash is None:
        return None
    from hetflow.platform.nand import gemv_split
    itemsize = np.dtype(program["dtype"]).itemsize
    peak = device.peak_for({"float16": "f16", "float32": "f32"}.get(program["dtype"], "f16"))
    h, n = program["hidden"], program["neurons"]
    shapes = [(h, n)] * (2 if program["gated"] else 1) + [(n, h)]
    return sum(gemv_split(r, c, itemsize, platform.flash, peak).seconds for r, c in shapes)


@register_runner("flash")
def load_flash(part, executor):
    return FlashRunner(part, executor)
