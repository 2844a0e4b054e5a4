"""The torch frontend against torch eager (the torch.compile backend: test_torch_backend.py).

Every captured graph must verify, round-trip through the text form, and give
the eager outputs (float32, max|a-b| <= 1e-4 * max(1, max|b|)) when the
reference interpreter runs it.
"""
from __future__ import annotations

import tempfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

from hetflow.frontends.torch import capture_module  # noqa: E402
from hetflow.ir import (HetflowError, UnsupportedOpError, graph_difference, load, parse_graph, print_graph,  # noqa: E402
                        save, verify)
from hetflow.runtime.interpreter import Interpreter  # noqa: E402

torch.set_num_threads(2)
TOLERANCE = 1e-4


def relative_error(outputs, expected) -> float:
    expected = [e.detach().numpy() for e in pytree.tree_leaves(expected) if isinstance(e, torch.Tensor)]
    assert len(outputs) == len(expected)
    worst = 0.0
    for got, want in zip(outputs, expected):
        assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
        if want.size == 0:
            continue
        if want.dtype.kind in "biu":
            assert np.array_equal(got, want)
            continue
        scale = max(1.0, float(np.max(np.abs(want))))
        worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - want))) / scale)
    return worst


def check_capture(module: nn.Module, inputs: tuple, dynamic_shapes=None, runs: list[tuple] | None = None) -> float:
    """Capture, verify, round-trip text and save/load, and compare with eager on ``inputs`` (and ``runs``)."""
    module.eval()
    capture = capture_module(module, inputs, dynamic_shapes=dynamic_shapes)
    graph = capture.graph
    verify(graph)
    text = print_graph(graph)
    back = parse_graph(text, resources={name: w.data for name, w in graph.weights.items()})
    assert graph_difference(graph, back) is None, graph_difference(graph, back)
    with tempfile.TemporaryDirectory() as directory:
        save(graph, directory)
        loaded = load(directory)
    assert graph_difference(graph, loaded) is None, graph_difference(graph, loaded)
    assert all(node.loc for node in graph.nodes)
    interpreter = Interpreter(graph)
    worst = 0.0
    for args in [inputs] + (runs or []):
        outputs = interpreter.run([a.numpy() for a in args])
        with torch.no_grad():
            expected = module(*args)
        worst = max(worst, relative_error(outputs, expected))
    assert worst <= TOLERANCE
    return worst


# --- small models --------------------------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(torch.relu(self.fc1(x)))))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.gap(x), 1))


def randomize_batch_norm(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return module


def test_mlp():
    torch.manual_seed(0)
    module = MLP()
    check_capture(module, (torch.randn(4, 32),))
    graph = capture_module(module, (torch.randn(4, 32),)).graph
    assert {"fc1.weight", "fc1.bias", "fc3.weight"} <= set(graph.weights)
    gemms = [n for n in graph.nodes if n.op == "Gemm"]
    assert len(gemms) == 3
    assert "test_torch_frontend.py:" in gemms[0].loc and "(fc1)" in gemms[0].loc


class WithConstants(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("shift", torch.arange(4.0))
        self.register_buffer("scale", torch.full((4,), 0.5), persistent=False)
        self.table = torch.tensor([1.0, -1.0, 2.0, -2.0])  # a plain tensor attribute: a lifted constant

    def forward(self, x):
        return self.fc(x) * self.scale + self.shift + self.table


def test_buffers_and_constants_become_named_weights():
    torch.manual_seed(0)
    module = WithConstants()
    check_capture(module, (torch.randn(2, 4),))
    weights = capture_module(module, (torch.randn(2, 4),)).graph.weights
    assert {"fc.weight", "fc.bias", "shift", "scale"} <= set(weights)
    assert any(np.array_equal(w.data, [1.0, -1.0, 2.0, -2.0]) for w in weights.values())


def test_mlp_dynamic_batch():
    torch.manual_seed(0)
    batch = torch.export.Dim("batch")
    capture = capture_module(MLP(), (torch.randn(4, 32),), dynamic_shapes=({0: batch},))
    assert isinstance(capture.graph.inputs[0].type.shape[0], str)
    check_capture(MLP(), (torch.randn(4, 32),), dynamic_shapes=({0: batch},),
                  runs=[(torch.randn(1, 32),), (torch.randn(9, 32),)])


def test_small_cnn():
    torch.manual_seed(0)
    module = randomize_batch_norm(SmallCNN())
    check_capture(module, (torch.randn(2, 3, 16, 16),))


def test_transformer_encoder_layer():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    check_capture(layer, (torch.randn(2, 10, 32),))


# --- transformers models, from configs with random weights -------------------------------------------------

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2(attn):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=100, n_positions=64,
                                     bos_token_id=0, eos_token_id=0, use_cache=False, attn_implementation=attn)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 100, (1, 16))
    check_capture(model, (ids,))


def test_gpt2_dynamic_sequence():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=100, n_positions=64,
                                     bos_token_id=0, eos_token_id=0, use_cache=False)
    model = transformers.GPT2LMHeadModel(config)
    seq = torch.export.Dim("seq", max=64)
    check_capture(model, (torch.randint(0, 100, (1, 16)),), dynamic_shapes=({1: seq},),
                  runs=[(torch.randint(0, 100, (1, 5)),), (torch.randint(0, 100, (1, 40)),)])


def test_resnet18_layout():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                                       embedding_size=64, num_labels=10)
    model = randomize_batch_norm(transformers.ResNetForImageClassification(config))
    check_capture(model, (torch.randn(1, 3, 224, 224),))


def test_vit():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=224, patch_size=16, hidden_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=192, num_labels=10)
    model = transformers.ViTForImageClassification(config)
    check_capture(model, (torch.randn(1, 3, 224, 224),))


# --- op coverage beyond the models ------------------------------------------------------------------------

class Elementwise(nn.Module):
    def forward(self, x):
        a = torch.clamp(x, -0.5, 0.5) + F.leaky_relu(x, 0.1) + F.hardswish(x) + F.silu(x) + F.softplus(x)
        b = F.elu(x) + F.hardtanh(x) + torch.sigmoid(x) * torch.rsqrt(x.abs() + 1) + torch.log1p(x.abs())
        c = torch.div(x, 0.3, rounding_mode="floor") + torch.remainder(x, 0.7) + torch.fmod(x, 0.7)
        d = torch.where(x > 0, x, 0.25) + (x >= 0.1).float() - (x != 0.2).to(torch.float32) + torch.maximum(x, -x)
        e = F.gelu(x, approximate="tanh") + torch.pow(x, 2) + 2.0 ** x.clamp(max=1.0) + (1 - x)
        return a + b + c + d + e


class Reductions(nn.Module):
    def forward(self, x):
        values, indices = x.max(dim=1)
        return (F.log_softmax(x, -1) + x.var(dim=-1, keepdim=True) + x.amax(-1, keepdim=True),
                x.sum(0), x.mean(), values, indices, x.argmax(-1), torch.cumsum(x, dim=1),
                (x > 0).any(dim=-1), (x > -5).all())


class Movement(nn.Module):
    def forward(self, x, i, j):
        a, b = torch.split(x, [2, 6], dim=-1)
        padded = F.pad(x, (1, 2, 0, 1), value=-1.0)
        return (x[i], x[:, i], x[i, j], x[:, i, j], x[i, :, j], x[..., 1:7:2], x.transpose(0, 2), a * 2, b.sum(-1),
                padded, torch.cat([x, x * 2], dim=1), x.unsqueeze(1).squeeze(1), torch.gather(x, 2, j.view(1, 1, 3)
                                                                                            .expand(4, 5, 3)),
                torch.index_select(x, 1, j), torch.arange(5) * 2, torch.zeros(3, 4) + 1, x.new_ones(2, 2))


class Pools(nn.Module):
    def __init__(self):
        super().__init__()
        self.gn = nn.GroupNorm(2, 8)
        self.conv = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x):
        y = self.gn(x)
        return (F.avg_pool2d(y, 2), F.adaptive_avg_pool2d(y, 2), F.interpolate(y, scale_factor=2, mode="nearest"),
                F.max_pool2d(y, 3, stride=2, padding=1), self.up(self.conv(y)))


@pytest.mark.parametrize("module, inputs", [
    (Elementwise(), (torch.linspace(-3, 3, 60).reshape(3, 4, 5),)),
    (Reductions(), (torch.linspace(-3, 3, 60).reshape(3, 4, 5),)),
    (Movement(), (torch.randn(4, 5, 8), torch.tensor([0, 2, -1]), torch.tensor([1, 0, 3]))),
    (Pools(), (torch.randn(2, 8, 8, 8),)),
], ids=["elementwise", "reductions", "movement", "pools"])
def test_op_coverage(module, inputs):
    torch.manual_seed(0)
    check_capture(module, inputs)


def plain_aten_ops(x, y, b, i):
    """ATen ops that core-ATen decomposition removes but an FX graph from elsewhere may hold."""
    return (F.silu(x), F.hardswish(x), F.hardsigmoid(x), F.softplus(x, beta=2.0), x.transpose(0, 1), x.reshape(-1),
            torch.matmul(x, y), 1 - x, torch.rsub(x, y.t()), x.sin() + x.cos() + x.erf() + x.floor() + x.ceil(),
            x.round() + x.sign(), x.abs().sqrt().log().reciprocal(), torch.minimum(x, y.t()), x.amin(1), x.argmin(0),
            x.min(dim=1).values, x.prod(1), x.sum(), torch.isnan(x), b & b, b | ~b, b ^ b, torch.logical_and(b, b),
            torch.logical_or(b, b), torch.logical_xor(b, b), b.all(), b.all(1), b.any(), i & 6, i | 1, i ^ 3, ~i,
            torch.clamp(x, min=y.t() * 0, max=y.t() + 1), torch.pow(x.abs(), y.t()), x > y.t(), x < 0.2, x <= y.t(),
            x != y.t(), torch.split(x, 2, 1)[1], x.unsqueeze(0).squeeze(), x.unsqueeze(1).squeeze(1),
            torch.zeros_like(x), torch.ones_like(x), torch.zeros(2, 3), torch.ones(3), torch.arange(4),
            torch.arange(1, 5), torch.remainder(x, y.t() + 2), torch.fmod(x, y.t() + 2), x / 2, x - 1)


def test_capture_fx_plain_aten_graph():
    from torch.fx.experimental.proxy_tensor import make_fx

    from hetflow.frontends.torch import capture_fx
    torch.manual_seed(0)
    args = (torch.randn(3, 4), torch.randn(4, 3), torch.tensor([[True, False], [False, False]]), torch.tensor([5, -3, 0]))
    gm = make_fx(plain_aten_ops, tracing_mode="fake")(*args)
    capture = capture_fx(gm, args)
    verify(capture.graph)
    assert capture.input_names == [v.name for v in capture.graph.inputs]
    outputs = Interpreter(capture.graph).run([a.numpy() for a in args])
    assert relative_error(outputs, plain_aten_ops(*args)) <= TOLERANCE


# --- bad input -------------------------------------------------------------------------------------------------

class KthValues(nn.Module):
    def forward(self, x):
        return torch.kthvalue(x, 2, dim=-1).values + 1


def test_unsupported_op_names_op_and_node():
    with pytest.raises(UnsupportedOpError) as info:
        capture_module(KthValues(), (torch.randn(3, 4),))
    message = str(info.value)
    assert "unsupported op aten.kthvalue" in message
    assert "node kthvalue" in message and "test_torch_frontend.py:" in message
    assert isinstance(info.value, HetflowError)
