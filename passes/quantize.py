"""The quantize pass: int8 for the contractions an NPU runs (opt-in: ``CompileOptions.quantize == "int8"``).

What it marks: every MatMul and Gemm (top-level, or a member of a fused group) placed on an NPU that runs i8
(``int8_devices``: i8 in its dtypes and its peak), whose first operand is a float activation (f32, f16) and
whose second is a constant 2-D weight of the same dtype. On each it sets ``node.meta["int8"] =
{"activation_scale": s}``: the symmetric per-tensor scale of the first operand, ``s = max |A| / 127`` over
the calibration inputs (1.0 for an operand that was zero throughout). That is everything the NPU emitter needs; it survives graph.json (node meta is
serialised, a group's members' too), so the program regenerated at load is the same.

The weight needs nothing stored: its per-output-channel int8 values and scales are a pure function of the
float weight (``scale_j = max_i |W_ij| / 127``, ``q = clip(rint(W / scale), -127, 127)``), applied when the
NPU program is loaded (``hetflow.runtime.runners.npu``; the format is in ``hetflow.backends.npu``).

Calibration: the graph runs on the calibration inputs with the op table's NumPy kernels (the kernels of
``hetflow.ir.interpreter``, the executable spec; fused groups entered so that a member's operand is seen):
``CompileOptions.calibration_inputs`` (the example inputs ``hetflow.compile`` was given), else
``RANDOM_SAMPLES`` seeded random inputs (said in the report). The result, ``options.results["quantization"]``
(a ``QuantizationReport``; None when the option is off), says what was quantised and on what it was
calibrated; the driver adds the accuracy loss it measures on the compiled model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hetflow.ir import Graph, Node
from hetflow.ir.ops import make_kernel

from .base import CompileOptions, PassError, PassResult, register_pass

__all__ = ["INT8_DTYPES", "INT8_RTOL", "QUANTIZE_MODES", "QuantizationReport", "int8_devices", "quantize"]

QUANTIZE_MODES = ("int8",)
# The stated accuracy of int8: max |int8 - f32| <= INT8_RTOL x the output's largest magnitude, per output (the
# tests and the differential harness hold compiled models to it). Measured on the example inputs when set: the
# MLP example 0.34% (f16: 0.25%), GPT-2 tiny 1.0%, GPT-2 2x256 all on mobile-soc's NPU 2.3% (f16: 2.0%)
# (tests/backends/test_npu_int8.py).
INT8_RTOL = 0.05
INT8_DTYPES = ("f32", "f16")        # the activation dtypes a contraction may be quantised from
RANDOM_SAMPLES = 2                  # seeded random calibration samples when no example inputs were given
RANDOM_SEED = 0
GROUP = "hetflow.group"


@dataclass
class QuantizationReport:
    """What the quantize pass did (and, once the driver measured it, what it cost in accuracy)."""
    mode: str
    calibration: str                                  # where the calibration inputs came from, in words
    samples: list[dict] = field(repr=False)           # the calibration inputs: one {input name: array} per sample
    contractions: list[dict] = field(default_factory=list)   # {"node", "op", "device", "activation_scale"}
    max_abs_error: float | None = None                # compiled vs the reference interpreter, on the samples
    relative_error: float | None = None               # max abs error / the output's largest magnitude (worst output)

    def line(self) -> str:
        devices = sorted({c["device"] for c in self.contractions})
        text = (f"{self.mode}: {len(self.contractions)} contraction(s) quantised on {', '.join(devices) or 'no NPU'} "
                f"(per-output-channel int8 weights, per-tensor int8 activations calibrated on {self.calibration})")
        if self.max_abs_error is not None:
            text += (f"; outputs vs the reference interpreter on those inputs: max abs error {self.max_abs_error:.3g}, "
                     f"{100 * self.relative_error:.3g}% of the output's largest magnitude")
        return text


def int8_devices(platform) -> list[str]:
    """The platform's NPUs that run i8: their dtypes allow it (``i8``, or ``*``: any) and their peak gives an
    i8 figure to time it by."""
    return [d.name for d in platform.devices.values()
            if d.kind == "npu" and ("i8" in d.dtypes or "*" in d.dtypes) and "i8" in d.peak]


def check_quantize(mode: str | None, platform) -> None:
    """Raise ``PassError`` (one line) for an unknown mode or a platform without an NPU that runs i8."""
    if mode is None:
        return
    if mode not in QUANTIZE_MODES:
        raise PassError(f"quantize={mode!r} is not one of {', '.join(QUANTIZE_MODES)} (or None for floats)")
    if not int8_devices(platform):
        npus = [d.name for d in platform.devices.values() if d.kind == "npu"]
        raise PassError(f"quantize='int8' needs an NPU that runs i8 (i8 in its dtypes and its peak); platform "
                        f"{platform.name!r} has " + (f"NPU(s) {', '.join(npus)} without i8" if npus else "no NPU")
                        + " (the presets mobile-soc and flash-edge have one)")


@register_pass("quantize", needs=("device",), provides=("int8",), provides_results=("quantization",))
def quantize(graph: Graph, options: CompileOptions | None = None) -> PassResult:
    options = options or CompileOptions()
    mode = getattr(options, "quantize", None)
    if mode is None:
        options.results["quantization"] = None
        return PassResult(graph, False)
    platform = options.resolved_platform()
    check_quantize(mode, platform)
    if graph.dims:
        raise PassError("quantize='int8' calibrates on inputs of one size; this graph has dynamic sizes "
                        f"({', '.join(graph.dims)}): compile it without dynamic_shapes")
    npus = set(int8_devices(platform))
    targets = [(node, top) for top in graph.nodes if top.meta.get("device") in npus
               for node in _contractions(top) if _quantizable(node, top)]
    samples, calibration = _calibration_samples(graph, getattr(options, "calibration_inputs", None))
    peaks = _calibrate(graph, samples, {id(node) for node, _ in targets}) if targets else {}
    report = QuantizationReport(mode, calibration, samples)
    modified = False
    for node, top in targets:
        peak = peaks.get(id(node), 0.0)
        mark = {"activation_scale": float(peak / 127.0) if peak > 0 else 1.0}
        modified |= node.meta.get("int8") != mark
        node.meta["int8"] = mark
        report.contractions.append({"node": node.outputs[0].name, "op": node.op, "device": top.meta["device"],
                                    "activation_scale": mark["activation_scale"]})
    options.results["quantization"] = report
    return PassResult(graph, modified)


def _contractions(top: Node) -> list[Node]:
    """The MatMul/Gemm nodes ``top`` runs: itself, or its fused group's members."""
    if top.op == GROUP:
        return [n for n in top.attrs["body"].nodes if n.op in ("MatMul", "Gemm")]
    return [top] if top.op in ("MatMul", "Gemm") else []


def _quantizable(node: Node, top: Node) -> bool:
    """A float activation times a constant 2-D weight of the same dtype, static shapes (what the NPU's array
    takes in int8: ``hetflow.backends.npu``)."""
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return False
    a, b = node.inputs[0], node.inputs[1]
    if b.data is None and top is not node:   # a group member's weight is the group's input
        outer = dict(zip((id(v) for v in top.attrs["body"].inputs), top.inputs))
        b = outer.get(id(b), b)
    if b.data is None or a.type is None or b.type is None or not a.type.is_static or not b.type.is_static:
        return False
    if a.type.dtype.value not in INT8_DTYPES or b.type.dtype != a.type.dtype or len(b.type.shape) != 2:
        return False
    return len(a.type.shape) == 2 if node.op == "Gemm" else len(a.type.shape) >= 2


def _calibration_samples(graph: Graph, given) -> tuple[list[dict], str]:
    """The calibration inputs (a list of {input name: array}) and where they came from, in words."""
    if given:
        samples = [dict(s) for s in given]
        return samples, f"the example inputs ({len(samples)} sample{'s' if len(samples) > 1 else ''})"
    rng = np.random.default_rng(RANDOM_SEED)
    samples = []
    for _ in range(RANDOM_SAMPLES):
        sample = {}
        for v in graph.inputs:
            dtype = v.type.dtype.numpy
            if np.issubdtype(dtype, np.floating):
                sample[v.name] = rng.standard_normal(v.type.shape).astype(dtype)
            elif dtype == np.bool_:
                sample[v.name] = rng.integers(0, 2, v.type.shape).astype(bool)
            else:   # token ids and the like: small non-negative integers
                sample[v.name] = rng.integers(0, 8, v.type.shape).astype(dtype)
        samples.append(sample)
    return samples, (f"{RANDOM_SAMPLES} seeded random samples (seed {RANDOM_SEED}, standard normal floats, "
                     "integers in [0, 8)): no example inputs were given")


def _calibrate(graph: Graph, samples: list[dict], targets: set[int]) -> dict[int, float]:
    """max |first operand| of each target node over the samples."""
    peaks: dict[int, float] = {}
    kernels: dict[int, object] = {}
    for sample in samples:
        missing = [v.name for v in graph.inputs if v.name not in sample]
        if missing:
            raise PassError(f"quantize: the calibration inputs lack graph input(s) {', '.join(missing)}")
        _evaluate(graph, [np.asarray(sample[v.name]) for v in graph.inputs], targets, peaks, kernels)
    return peaks


def _evaluate(graph: Graph, args: list, targets: set[int], peaks: dict, kernels: dict) -> list[np.ndarray]:
    """The graph's outputs, each node by its NumPy kernel, fused groups entered; records the targets' peaks."""
    env = {id(v): a for v, a in zip(graph.inputs, args)}
    env.update({id(w): w.data for w in graph.weights.values()})
    last_read = {id(v): i for i, node in enumerate(graph.nodes) for v in node.inputs if v is not None}
    keep = {id(v) for v in graph.outputs}
    for index, node in enumerate(graph.nodes):
        ins = [None if v is None else env[id(v)] if id(v) in env else v.data for v in node.inputs]
        for v in node.inputs:   # a value read for the last time here is dropped (what the interpreter does)
            if v is not None and last_read.get(id(v)) == index and id(v) not in keep and v.producer is not None:
                env.pop(id(v), None)
        if id(node) in targets:
            peaks[id(node)] = max(peaks.get(id(node), 0.0), float(np.max(np.abs(ins[0]))) if ins[0].size else 0.0)
        if node.op == GROUP:
            results = _evaluate(node.attrs["body"], ins, targets, peaks, kernels)
        else:
            if id(node) not in kernels:
                kernels[id(node)] = make_kernel(node, graph.opset)
            results = kernels[id(node)](ins)
        for out, result in zip(node.outputs, results):
            a = np.asarray(result)
            if out.type is not None and out.type.dtype.value != "str" and a.dtype != out.type.dtype.numpy:
                a = a.astype(out.type.dtype.numpy)
            env[id(out)] = a
    return [env[id(v)] for v in graph.outputs]
