"""Torch-frontend ops through ``hetflow.compile`` (host, ONNX Runtime) against eager: sort, strided views, scatters,
index_put, masked where; Swin tiny; the Mixtral-style MoE in its static-shape form.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.utils import _pytree as pytree  # noqa: E402

import hetflow  # noqa: E402
import hetflow.frontends.torch  # noqa: E402
from hetflow.frontends.torch import capture_module  # noqa: E402
from hetflow.ir import UnsupportedOpError, parse_graph, print_graph  # noqa: E402
from hetflow.runtime.interpreter import Interpreter  # noqa: E402

TOLERANCE = 1e-5


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def check(module, inputs, tolerance=TOLERANCE):
    module = module.eval()
    compiled = hetflow.compile(module, inputs, platform="host")
    with torch.no_grad():
        want = pytree.tree_leaves(module(*inputs))
    _compare(pytree.tree_leaves(compiled(*inputs)), want, tolerance)
    captured = capture_module(module, inputs)  # the reference interpreter, the executable spec, agrees too
    _compare(Interpreter(captured.graph).run([a.numpy() for a in inputs]), want, tolerance)
    text = print_graph(captured.graph)  # and the graph's text parses back to the same graph
    resources = {name: w.data for name, w in captured.graph.weights.items()}
    assert print_graph(parse_graph(text, resources=resources)) == text


def _compare(got, want, tolerance):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g, w = np.asarray(g), w.numpy()
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        if w.dtype.kind in "biu":
            assert np.array_equal(g, w)
        else:
            assert np.max(np.abs(g - w), initial=0.0) <= tolerance * max(1.0, float(np.max(np.abs(w), initial=0)))


def distinct(*shape):
    """Random values without ties (so every sort order is unique)."""
    return torch.randperm(int(np.prod(shape))).reshape(shape).float() / 7 - 3


@pytest.mark.parametrize("shape,dim", [((5,), 0), ((3, 6), -1), ((3, 6), 0), ((2, 3, 4), 1), ((2, 3, 4), -3)])
@pytest.mark.parametrize("descending", [False, True])
def test_sort(shape, dim, descending):
    torch.manual_seed(0)
    check(Fn(lambda x: torch.sort(x, dim=dim, descending=descending)), (distinct(*shape),))


@pytest.mark.parametrize("descending", [False, True])
def test_sort_stable_ties_and_argsort(descending):
    x = torch.tensor([[3, 1, 3, 2, 1, 3], [0, 0, 5, 0, 5, 0]], dtype=torch.int64)
    check(Fn(lambda x: (torch.sort(x, dim=-1, descending=descending, stable=True),
                        torch.argsort(x, dim=1, descending=descending, stable=True))), (x,))


@pytest.mark.parametrize("k,dim,largest", [(2, -1, True), (1, 0, False), (3, 1, False), (4, -1, True)])
def test_topk(k, dim, largest):
    check(Fn(lambda x: torch.topk(x, k, dim=dim, largest=largest)), (distinct(3, 4, 5),))


@pytest.mark.parametrize("dim,dtype", [(0, torch.float32), (-1, torch.float32), (1, torch.int64), (-2, torch.int32)])
def test_cumsum(dim, dtype):
    x = torch.randint(-5, 5, (3, 4, 2)).to(dtype)
    check(Fn(lambda x: torch.cumsum(x, dim)), (x,))


@pytest.mark.parametrize("size,stride,offset", [((3, 2), (2, 3), 1), ((2, 2, 2), (1, 4, 8), 0), ((4, 4), (1, 6), 0),
                                                ((2, 6), (12, 1), 0), ((6, 2), (2, 1), 3)])
def test_as_strided(size, stride, offset):
    check(Fn(lambda x: (x * 2).as_strided(size, stride, offset) + 1), (torch.randn(4, 6),))


@pytest.mark.parametrize("dim,size,step", [(0, 2, 1), (1, 3, 2), (-1, 2, 2), (-2, 5, 1), (2, 1, 3)])
def test_unfold(dim, size, step):
    check(Fn(lambda x: x.unfold(dim, size, step)), (torch.randn(6, 5, 4),))


def _index(*shape):
    """An index with every position along dim 0 distinct per column (scatter without duplicates)."""
    return torch.stack([torch.randperm(6)[: shape[0]] for _ in range(shape[1])], dim=1)


@pytest.mark.parametrize("dim", [0, -2])
def test_scatter(dim):
    torch.manual_seed(1)
    index = _index(3, 4)
    check(Fn(lambda x, src: (x.scatter(dim, index, src), x.scatter(dim, index, 2.5),
                             x.scatter_add(dim, index, src))), (torch.randn(6, 4), torch.randn(5, 4)))


@pytest.mark.parametrize("reduce", ["sum", "prod", "amax", "amin", "mean"])
@pytest.mark.parametrize("include_self", [True, False])
def test_scatter_reduce(reduce, include_self):
    torch.manual_seed(2)
    index = torch.randint(0, 3, (4, 5))  # duplicates: the reduction combines them
    check(Fn(lambda x, src: x.scatter_reduce(1, index, src, reduce, include_self=include_self)),
          (torch.randn(4, 6), torch.randn(4, 5)))


def test_scatter_reduce_int_amax():
    index = torch.tensor([[0, 1, 0], [2, 2, 1]])
    check(Fn(lambda x, src: x.scatter_reduce(-1, index, src, "amax", include_self=False)),
          (torch.randint(-9, 9, (2, 4)), torch.randint(-9, 9, (2, 3))))


@pytest.mark.parametrize("accumulate", [False, True])
def test_index_put(accumulate):
    torch.manual_seed(3)
    rows, cols = torch.tensor([0, -1, 2]), torch.tensor([1, 3, 0])
    dup = torch.tensor([1, 1, 4])
    check(Fn(lambda x, v: (torch.index_put(x, (rows,), v, accumulate=accumulate),          # rows, values broadcast
                           torch.index_put(x, (rows, cols), torch.tensor(7.0), accumulate=accumulate),  # pairs
                           torch.index_put(x, (dup,), v[:1], accumulate=True))),            # duplicates add up
          (torch.randn(5, 4, 3), torch.randn(3, 4, 3)))


def test_index_put_middle_and_non_adjacent_dims():
    cols, rows, last = torch.tensor([1, 3, 0]), torch.tensor([0, 2]), torch.tensor([1, 0])

    def fn(x, v):
        y = x.clone()
        y[:, cols] = v                          # dim 1 indexed: the broadcast dims stay in the middle
        z = x.clone()
        z[rows, :, last] = torch.tensor([[5.0], [6.0]])  # dims 0 and 2: the broadcast dims go first
        w = x.clone()
        w[:, cols, -1] += 1.0
        return y, z, w
    check(Fn(fn), (torch.randn(3, 4, 2), torch.randn(3, 3, 2)))


def test_masked_fill_where_and_setitem():
    mask = torch.rand(4, 6) > 0.5

    def fn(x):
        y = x.clone()
        y[mask] = 0.5
        z = x.clone()
        z[:, torch.tensor([1, 3])] = -2.0
        return x.masked_fill(mask, 1.5), torch.where(mask, x, 0.0), torch.where(x > 0, x, -x), y, z
    check(Fn(fn), (torch.randn(4, 6),))


def test_masked_put_of_several_values_is_a_clear_error():
    mask = torch.tensor([True, False, True])
    with pytest.raises(UnsupportedOpError, match=r"aten\.index_put\.default.*data-dependent"):
        hetflow.compile(Fn(lambda x: torch.index_put(x, (mask,), torch.tensor([1.0, 2.0]))), (torch.randn(3),),
                        platform="host")


@pytest.mark.parametrize("bins,low,high", [(4, -1.0, 1.0), (5, 0.0, 4.0), (3, -0.5, 0.25)])
def test_histc(bins, low, high):
    x = torch.cat([torch.randn(20), torch.tensor([low, high, high + 1, low - 1])])
    check(Fn(lambda x: (torch.histc(x, bins=bins, min=low, max=high),
                        torch.histc(x.reshape(4, 6).floor(), bins=bins, min=low, max=high))), (x,))


# --- models ------------------------------------------------------------------------------------------------------

def test_swin_tiny_equals_eager():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                     window_size=2)
    check(transformers.SwinModel(config), (torch.randn(1, 3, 32, 32),))


def _mixtral(experts_implementation):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, vocab_size=100, max_position_embeddings=64,
                                        use_cache=False, experts_implementation=experts_implementation)
    return transformers.MixtralModel(config)


@pytest.mark.parametrize("experts_implementation", ["grouped_mm", "batched_mm"])
def test_mixtral_moe_equals_eager(experts_implementation):
    """transformers' static-shape expert dispatch: grouped_mm (its default: tokens sorted by expert, a per-row
    expert weight) and batched_mm (each token's top-k experts' weights gathered)."""
    check(_mixtral(experts_implementation), (torch.randint(0, 100, (2, 8)),))


def test_mixtral_eager_experts_loop_is_refused_by_export():
    """The "eager" experts loop over ``nonzero()`` experts has data-dependent trip counts: torch.export refuses."""
    with pytest.raises(hetflow.frontends.torch.FrontendError, match="torch.export failed.*data-dependent"):
        hetflow.compile(_mixtral("eager"), (torch.randint(0, 100, (1, 8)),), platform="host")
