"""Outputs come back on the inputs' device: CPU tensors in, CPU tensors out (everywhere); CUDA tensors in,
CUDA tensors out on ``host+cuda`` (marked ``gpu``: run with ``pytest -m gpu`` on a machine with a CUDA GPU)."""
from __future__ import annotations

import pytest
import torch

import hetflow
from hetflow.runtime.runners.cuda import cuda_available

NO_CUDA = pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU on this machine")


def _mlp():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 16)).eval()
    return module, torch.randn(8, 64)


def _compiled_both_ways(module, x, platform):
    backend = hetflow.backend(platform=platform)
    return [hetflow.compile(module, (x,), platform=platform), torch.compile(module, backend=backend)]


def test_cpu_inputs_give_cpu_outputs_on_host_cuda():
    module, x = _mlp()
    with torch.no_grad():
        expected = module(x)
        for compiled in _compiled_both_ways(module, x, "host+cuda"):
            out = compiled(x)
            assert out.device.type == "cpu"
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@NO_CUDA
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_cuda_inputs_give_cuda_outputs_on_host_cuda(kernels):
    module, x = _mlp()
    cuda_module, cuda_x = module.to("cuda"), x.to("cuda")
    with torch.no_grad():
        expected = cuda_module(cuda_x)
        compiled = hetflow.compile(module.cpu(), (x,), platform="host+cuda", gpu_kernels=kernels)
        assert any(p.device != "cpu" for p in compiled._build_partitions()), "something should run on the GPU"
        out = compiled(cuda_x)
        assert out.device.type == "cuda"
        torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
        via_dynamo = torch.compile(cuda_module, backend=hetflow.backend(platform="host+cuda", gpu_kernels=kernels))
        out = via_dynamo(cuda_x)
        assert out.device.type == "cuda"
        torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)

