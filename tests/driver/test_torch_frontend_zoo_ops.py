"""Converters the differential zoo (hetflow.examples.zoo) needed: each against torch eager on the interpreter.

topk (Mixtral's router), linalg_vector_norm (wav2vec2's weight-normed positional conv), as_strided as a
reshape (Swin's adaptive_avg_pool1d), repeat (DeBERTa, BLOOM), copy and slice_scatter (BEiT's in-place index
table) and bilinear upsampling (BEiT's relative position bias).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

from hetflow.frontends.torch import capture_module  # noqa: E402
from hetflow.ir import UnsupportedOpError, verify  # noqa: E402
from hetflow.runtime.interpreter import Interpreter  # noqa: E402

TOLERANCE = 1e-5


def check(module, inputs):
    module = module.eval()
    captured = capture_module(module, inputs)
    verify(captured.graph)
    outputs = Interpreter(captured.graph).run([a.numpy() for a in inputs])
    with torch.no_grad():
        expected = [e.numpy() for e in pytree.tree_leaves(module(*inputs))]
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected):
        assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
        if want.dtype.kind in "biu":
            assert np.array_equal(got, want)
        else:
            assert np.max(np.abs(got - want)) <= TOLERANCE * max(1.0, float(np.max(np.abs(want))))
    return captured.graph


class TopK(nn.Module):
    def forward(self, x):
        values, indices = torch.topk(x, 3, dim=-1)
        low, low_idx = torch.topk(x, 2, dim=0, largest=False)
        return values, indices, low, low_idx


class Norms(nn.Module):
    def forward(self, x):
        return (torch.linalg.vector_norm(x, 2, dim=-1), torch.linalg.vector_norm(x, 1, dim=(0, 2), keepdim=True),
                torch.linalg.vector_norm(x, float("inf"), dim=1), torch.linalg.vector_norm(x, 3.0, dim=-1),
                torch.linalg.vector_norm(x))


class WeightNormConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 4, 3, padding=1, groups=2), dim=2)

    def forward(self, x):
        return self.conv(x)


class Pool1d(nn.Module):
    def forward(self, x):
        return torch.flatten(F.adaptive_avg_pool1d(x.transpose(1, 2), 1), 1)


class Repeat(nn.Module):
    def forward(self, x):
        return x.repeat(2, 1, 3), x.repeat(2, 1, 1, 2)


class IndexWrites(nn.Module):
    """In-place writes into a fresh tensor, as BEiT builds its relative position index."""

    def forward(self, x):
        table = torch.zeros(5, 6)
        table[1:, 1:] = x
        table[0, 0:] = 3.0
        table[0:, 0] = x[:, 0].sum()
        table[2:4, 2] = 7.0
        return table * 2


class Bilinear(nn.Module):
    def forward(self, x):
        return (F.interpolate(x, size=(7, 9), mode="bilinear"), F.interpolate(x, size=(3, 2), mode="bilinear"),
                F.interpolate(x, size=(8, 10), mode="bilinear", align_corners=True),
                F.interpolate(x, scale_factor=2.0, mode="bilinear"))


@pytest.mark.parametrize("module, inputs", [
    (TopK(), (torch.randn(4, 6),)),
    (Norms(), (torch.randn(3, 4, 5),)),
    (WeightNormConv(), (torch.randn(2, 4, 8),)),
    (Pool1d(), (torch.randn(2, 6, 8),)),
    (Repeat(), (torch.randn(2, 3, 4),)),
    (IndexWrites(), (torch.randn(4, 5),)),
    (Bilinear(), (torch.randn(1, 2, 4, 5),)),
], ids=["topk", "vector_norm", "weight_norm", "adaptive_pool1d", "repeat", "index_writes", "bilinear"])
def test_zoo_converters(module, inputs):
    torch.manual_seed(0)
    check(module, inputs)


def test_topk_converts_to_topk():
    graph = check(TopK(), (torch.randn(4, 6),))
    assert sum(n.op == "TopK" for n in graph.nodes) == 2


class GeneralStride(nn.Module):
    def forward(self, x):
        return torch.as_strided(x, (3, 3), (1, 2)) + 1  # overlapping windows: not a reshape


def test_general_as_strided_is_a_gather():
    check(GeneralStride(), (torch.randn(4, 4),))


class StrideOfTransposed(nn.Module):
    def forward(self, x):
        return torch.as_strided(x.t(), (3, 3), (1, 2)) + 1  # reads a transposed input's memory order


def test_as_strided_of_a_non_contiguous_input_is_refused():
    with pytest.raises(UnsupportedOpError, match="as_strided.*non-contiguous"):
        capture_module(StrideOfTransposed().eval(), (torch.randn(4, 4),))


class AvgPools(nn.Module):
    """Windows past the input's end (ceil_mode, a kernel wider than the input: HF EfficientNet's pooler) divide
    by their part inside the input, and padding counted or not."""

    def forward(self, x):
        return (F.avg_pool2d(x, 5, ceil_mode=True), F.avg_pool2d(x[:, :, :1, :1], 320, ceil_mode=True),
                F.avg_pool2d(x, 3, 2, 1, ceil_mode=True), F.avg_pool2d(x, 3, 2, 1, ceil_mode=True,
                                                                        count_include_pad=False),
                F.avg_pool2d(x, 2, 2, 1), F.avg_pool2d(x, 3, 2, 0, ceil_mode=True), F.max_pool2d(x, 4, 3, ceil_mode=True))


def test_avg_pool_windows_past_the_input_on_the_interpreter_and_onnxruntime():
    import hetflow
    torch.manual_seed(0)
    x = torch.randn(1, 2, 6, 6)
    check(AvgPools(), (x,))                                   # the interpreter
    compiled = hetflow.compile(AvgPools().eval(), (x,), platform="host", time_limit=1)
    with torch.no_grad():
        for got, want in zip(compiled(x), AvgPools()(x)):     # ONNX Runtime
            assert float((got - want).abs().max()) <= TOLERANCE * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("attrs", [
    {"kernel_shape": [5, 5], "strides": [5, 5], "ceil_mode": 1},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1, "count_include_pad": 1},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
    {"kernel_shape": [2, 3], "strides": [3, 2], "pads": [0, 1, 1, 0], "ceil_mode": 1, "count_include_pad": 1},
], ids=["kernel-past-end", "pads-counted", "pads-not-counted", "asymmetric"])
@pytest.mark.parametrize("op", ["AveragePool", "MaxPool"])
def test_ceil_mode_pool_kernel_matches_onnxruntime(op, attrs):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from hetflow.frontends.onnx import import_onnx
    if op == "MaxPool":
        attrs = {k: v for k, v in attrs.items() if k != "count_include_pad"}
    node = helper.make_node(op, ["x"], ["y"], **attrs)
    graph = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 7, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    model = onnx.shape_inference.infer_shapes(model)
    x = np.random.default_rng(0).standard_normal((1, 2, 7, 6)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = Interpreter(import_onnx(model)).run({"x": x})[0]
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= 1e-6
