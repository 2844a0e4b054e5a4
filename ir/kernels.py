"""Fast NumPy reference kernels for the hot ops.

onnx.reference is the spec, but a few of its kernels (convolution, pooling) are
written for clarity, not speed. Each ``make`` function here takes the node and
the opset and returns a kernel, or ``None`` when the node uses a corner of the op
(an auto_pad mode, 3-D pooling...) that it does not cover: the op row then falls
back to onnx.reference. The tests check every kernel here against onnx.reference.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def relu(node, opset):
    return lambda ins: [np.maximum(ins[0], ins[0].dtype.type(0))]


def _binary(fn, float_only=False):
    def make(node, opset):
        if float_only:
            def run(ins):
                a, b = ins
                if a.dtype.kind != "f":
                    return None
                return [fn(a, b)]
            return _with_fallback(node, opset, run)
        return lambda ins: [np.asarray(fn(ins[0], ins[1]))]
    return make


def _with_fallback(node, opset, fast):
    """Run ``fast``; where it returns None (a case it does not cover) use onnx.reference."""
    from .ops import _onnx_reference_kernel
    slow = []

    def run(ins):
        out = fast(ins)
        if out is not None:
            return out
        if not slow:
            slow.append(_onnx_reference_kernel(node, opset))
        return slow[0](ins)
    return run


BINARY = {
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": _binary(np.divide, float_only=True),
}


def gather_elements(node, opset):
    """np.take_along_axis (onnx.reference's version fails once the gathered axis is longer than 64)."""
    axis = node.attrs.get("axis", 0)

    def run(ins):
        data, indices = ins
        dim = data.shape[axis]
        if indices.size and (indices.min() < -dim or indices.max() >= dim):
            raise IndexError(f"GatherElements: an index is outside [-{dim}, {dim})")
        return [np.take_along_axis(data, np.where(indices < 0, indices + dim, indices), axis=axis)]
    return run


def softmax(node, opset):
    if opset < 13:
        return None
    axis = node.attrs.get("axis", -1)

    def run(ins):
        x = ins[0]
        e = np.exp(x - np.max(x, axis=axis, keepdims=True))
        return [(e / np.sum(e, axis=axis, keepdims=True)).astype(x.dtype, copy=False)]
    return run


def matmul(node, opset):
    return lambda ins: [np.matmul(ins[0], ins[1])]


def gemm(node, opset):
    alpha = node.attrs.get("alpha", 1.0)
    beta = node.attrs.get("beta", 1.0)
    trans_a = node.attrs.get("transA", 0)
    trans_b = node.attrs.get("transB", 0)

    def run(ins):
        a, b = ins[0], ins[1]
        c = ins[2] if len(ins) > 2 else None
        a = a.T if trans_a else a
        b = b.T if trans_b else b
        y = a @ b
        if alpha != 1.0:
            y = y * a.dtype.type(alpha)
        if c is not None:
            y = y + (c * c.dtype.type(beta) if beta != 1.0 else c)
        return [y.astype(a.dtype, copy=False)]
    return run


def _conv_params(node, spatial):
    if node.attrs.get("auto_pad", "NOTSET") != "NOTSET":
        return None
    strides = node.attrs.get("strides", [1] * spatial)
    dilations = node.attrs.get("dilations", [1] * spatial)
    pads = node.attrs.get("pads", [0] * (2 * spatial))
    return strides, dilations, pads


def conv(node, opset):
    """2-D convolution as one matrix product over an im2col view (grouped and dilated too)."""
    w_type = node.inputs[1].type
    if w_type is None or w_type.rank != 4:
        return None
    params = _conv_params(node, 2)
    if params is None:
        return None
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = params
    group = node.attrs.get("group", 1)

    def run(ins):
        x, w = ins[0], ins[1]
        bias = ins[2] if len(ins) > 2 else None
        n, c, _, _ = x.shape
        m, cg, kh, kw = w.shape
        if pt or pl or pb or pr:
            x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        ekh, ekw = (kh - 1) * dh + 1, (kw - 1) * dw + 1
        windows = sliding_window_view(x, (ekh, ekw), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
        oh, ow = windows.shape[2], windows.shape[3]
        mg = m // group
        outs = []
        for g in range(group):
            xg = windows[:, g * cg:(g + 1) * cg]  # n, cg, oh, ow, kh, kw
            cols = xg.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, cg * kh * kw)
            wg = w[g * mg:(g + 1) * mg].reshape(mg, cg * kh * kw)
            outs.append((cols @ wg.T).reshape(n, oh, ow, mg))
        y = outs[0] if group == 1 else np.concatenate(outs, axis=3)
        y = y.transpose(0, 3, 1, 2)
        if bias is not None:
            y = y + bias.reshape(1, m, 1, 1)
        return [np.ascontiguousarray(y, dtype=x.dtype)]
    return run


def _pool_windows(node, x, pad_value, tail_value=None):
    """The pooling windows of ``x`` [N, C, oh, ow, kh, kw]: ``pads`` filled with ``pad_value``; with ceil_mode,
    the windows that run past the padded input (the declared output's last row/column) read ``tail_value``
    there (default ``pad_value``)."""
    kh, kw = node.attrs["kernel_shape"]
    sh, sw = node.attrs.get("strides", [1, 1])
    pt, pl, pb, pr = node.attrs.get("pads", [0, 0, 0, 0])
    if pt or pl or pb or pr:
        x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=pad_value)
    if node.attrs.get("ceil_mode", 0):
        oh, ow = node.outputs[0].type.shape[-2:]
        extra_h = max(0, (oh - 1) * sh + kh - x.shape[2])
        extra_w = max(0, (ow - 1) * sw + kw - x.shape[3])
        if extra_h or extra_w:
            tail = pad_value if tail_value is None else tail_value
            x = np.pad(x, ((0, 0), (0, 0), (0, extra_h), (0, extra_w)), constant_values=tail)
        return sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw][:, :, :oh, :ow]
    return sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]


def _plain_2d_pool(node) -> bool:
    attrs = node.attrs
    out = node.outputs[0].type if node.outputs else None
    ceil_ok = not attrs.get("ceil_mode", 0) or (out is not None and out.is_static and len(out.shape) == 4)
    return (len(attrs.get("kernel_shape", [])) == 2 and attrs.get("auto_pad", "NOTSET") == "NOTSET"
            and ceil_ok and all(d == 1 for d in attrs.get("dilations", [1, 1]))
            and len(node.outputs) == 1)


def max_pool(node, opset):
    if not _plain_2d_pool(node):
        return None

    def run(ins):
        x = ins[0]
        if x.dtype.kind != "f":
            return None
        windows = _pool_windows(node, x, -np.inf)
        return [np.ascontiguousarray(windows.max(axis=(4, 5)))]
    return _with_fallback(node, opset, run)


def average_pool(node, opset):
    if not _plain_2d_pool(node):
        return None
    include_pad = node.attrs.get("count_include_pad", 0)

    def run(ins):
        x = ins[0]
        if x.dtype.kind != "f":
            return None
        sums = _pool_windows(node, x, 0.0).sum(axis=(4, 5))
        # the divisor: the window's elements inside the input, and inside the pads too with count_include_pad;
        # never the part of a ceil_mode window past the padded input (ONNX Runtime's and torch's rule)
        ones = np.ones((1, 1) + x.shape[2:], dtype=x.dtype)
        counts = _pool_windows(node, ones, 1.0 if include_pad else 0.0, 0.0).sum(axis=(4, 5))
        return [(sums / counts).astype(x.dtype)]
    return _with_fallback(node, opset, run)
