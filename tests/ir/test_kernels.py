"""hetflow's fast NumPy kernels against onnx.reference (the spec) on random shapes and attributes."""
from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from onnx.reference import ReferenceEvaluator

from hetflow.ir import DType, Graph, TensorType, make_kernel
from hetflow.ir.ops import _onnx_reference_kernel


def node_for(op, inputs, attrs, opset=18):
    g = Graph("k", opset)
    values = [g.add_input(f"in{i}", TensorType.of(a)) for i, a in enumerate(inputs)]
    return g.add_node(op, values, [None], attrs=attrs)


def check(op, inputs, attrs, rtol=1e-5, atol=1e-5):
    node = node_for(op, inputs, attrs)
    fast = make_kernel(node, 18)(list(inputs))[0]
    ref = _onnx_reference_kernel(node, 18)(list(inputs))[0]
    assert fast.dtype == ref.dtype and fast.shape == ref.shape
    np.testing.assert_allclose(fast, ref, rtol=rtol, atol=atol)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 2), group=st.sampled_from([1, 2]), cg=st.integers(1, 3), mg=st.integers(1, 3),
       k=st.integers(1, 3), stride=st.integers(1, 2), dil=st.integers(1, 2), pad=st.integers(0, 2),
       hw=st.integers(5, 9), bias=st.booleans())
def test_conv_matches_reference(n, group, cg, mg, k, stride, dil, pad, hw, bias):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, cg * group, hw, hw + 1)).astype(np.float32)
    w = rng.standard_normal((mg * group, cg, k, k)).astype(np.float32)
    ins = [x, w] + ([rng.standard_normal(mg * group).astype(np.float32)] if bias else [])
    check("Conv", ins, {"group": group, "strides": [stride, stride], "dilations": [dil, dil],
                        "pads": [pad, pad, pad, pad]}, rtol=1e-4, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 3), stride=st.integers(1, 3), pad=st.integers(0, 1), hw=st.integers(4, 8),
       include_pad=st.sampled_from([0, 1]), op=st.sampled_from(["MaxPool", "AveragePool"]))
def test_pool_matches_reference(k, stride, pad, hw, include_pad, op):
    if pad >= k:
        pad = k - 1
    x = np.random.default_rng(1).standard_normal((1, 2, hw, hw)).astype(np.float32)
    attrs = {"kernel_shape": [k, k], "strides": [stride, stride], "pads": [pad] * 4}
    if op == "AveragePool":
        attrs["count_include_pad"] = include_pad
    check(op, [x], attrs)


@settings(max_examples=20, deadline=None)
@given(trans_a=st.sampled_from([0, 1]), trans_b=st.sampled_from([0, 1]), alpha=st.sampled_from([1.0, 0.5]),
       beta=st.sampled_from([1.0, 2.0]), with_c=st.booleans())
def test_gemm_matches_reference(trans_a, trans_b, alpha, beta, with_c):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3, 4) if not trans_a else (4, 3)).astype(np.float32)
    b = rng.standard_normal((4, 5) if not trans_b else (5, 4)).astype(np.float32)
    ins = [a, b] + ([rng.standard_normal(5).astype(np.float32)] if with_c else [])
    check("Gemm", ins, {"transA": trans_a, "transB": trans_b, "alpha": alpha, "beta": beta})


def test_softmax_and_binary_ops_match_reference():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    for axis in (-1, 0, 1):
        check("Softmax", [x], {"axis": axis})
    for op in ("Add", "Sub", "Mul", "Div"):
        check(op, [x, rng.standard_normal(4).astype(np.float32)], {})
    check("Div", [np.array([7, -7], np.int32), np.array([2, 2], np.int32)], {})  # integer division: truncation
    check("Relu", [x], {})


@settings(max_examples=20, deadline=None)
@given(axis=st.integers(-2, 1), rows=st.integers(1, 3), length=st.integers(1, 5), negative=st.booleans())
def test_gather_elements_matches_the_definition(axis, rows, length, negative):
    rng = np.random.default_rng(3)
    data = rng.standard_normal((rows, 6)).astype(np.float32)
    dim = data.shape[axis]
    shape = (length, 6) if axis % 2 == 0 else (rows, length)
    indices = rng.integers(-dim if negative else 0, dim, size=shape).astype(np.int64)
    node = node_for("GatherElements", [data, indices], {"axis": axis})
    got = make_kernel(node, 18)([data, indices])[0]
    expected = np.empty(shape, np.float32)  # the spec's definition, element by element
    for i in range(shape[0]):
        for j in range(shape[1]):
            k = indices[i, j] % dim
            expected[i, j] = data[k, j] if axis % 2 == 0 else data[i, k]
    np.testing.assert_array_equal(got, expected)


def test_gather_elements_along_a_long_axis():
    """onnx.reference's GatherElements breaks once the axis is longer than 64 (BERT's position ids: 512)."""
    data = np.arange(512, dtype=np.int64).reshape(1, 512)
    indices = np.arange(16, dtype=np.int64).reshape(1, 16)
    node = node_for("GatherElements", [data, indices], {"axis": 1})
    np.testing.assert_array_equal(make_kernel(node, 18)([data, indices])[0], data[:, :16])
