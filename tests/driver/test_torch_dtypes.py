"""f16 and bf16 torch models through hetflow.compile on the host, against eager.

Tolerances (relative to the output's largest magnitude), written down here and in the README: f16 2e-3 (ONNX
Runtime computes in f16; eager accumulates some ops in f32), bf16 3e-2 (8 bits of mantissa; ONNX Runtime has no
bf16 kernels for these partitions, so they run on the reference interpreter, and the compiled model says so).
bf16 tensors cross the boundary as a same-size integer view, never through float32.
"""
from __future__ import annotations

import pytest
import torch

import hetflow
from hetflow.examples import models

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 3e-2}


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)), \
        (torch.randn(8, 64),)


def _gpt2():
    return models.build_gpt2(n_layer=1, n_embd=64, n_head=4, seq=16, vocab=100)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("build", [_mlp, _gpt2], ids=["mlp", "gpt2"])
def test_half_precision_models_equal_eager(build, dtype):
    module, inputs = build()
    module = module.to(dtype).eval()
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    with torch.no_grad():
        expected = module(*inputs)
    compiled = hetflow.compile(module, inputs, platform="host")
    got = compiled(*inputs)
    assert got.dtype == dtype and got.shape == expected.shape
    error = float((got.float() - expected.float()).abs().max() / expected.float().abs().max())
    assert error <= TOLERANCE[dtype], error
    if dtype == torch.bfloat16:
        assert any("bf16" in note and "reference interpreter" in note for note in compiled.executor.fallbacks)


def test_bf16_values_cross_the_boundary_bit_for_bit():
    from hetflow.frontends.torch import numpy_to_tensor, tensor_to_numpy
    x = torch.randn(4, 5).to(torch.bfloat16)
    back = numpy_to_tensor(tensor_to_numpy(x))
    assert back.dtype == torch.bfloat16 and torch.equal(back.view(torch.int16), x.view(torch.int16))
