"""``torch.compile(m, backend="hetflow")`` against torch eager: the same pipeline, placement and runtime as
``hetflow.compile``, dynamo's graph breaks and recompiles, inference only."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

import hetflow  # noqa: E402
from hetflow.examples import mlp  # noqa: E402
from hetflow.examples.models import build_gpt2  # noqa: E402
from hetflow.torch_backend import BackwardNotSupported  # noqa: E402

torch.set_num_threads(2)
TOLERANCE = 1e-4


def close(got, want, tolerance=TOLERANCE) -> bool:
    assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device
    scale = max(1.0, float(want.abs().max()))
    return float((got.float() - want.float()).abs().max()) <= tolerance * scale


def devices(compiled) -> set[str]:
    return {n.meta["device"] for n in compiled.graph.nodes}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_backend_by_name_runs_the_pipeline():
    import hetflow.torch_backend  # noqa: F401  (the entry point finds it too)
    torch.manual_seed(0)
    module = mlp.MLP().eval()
    compiled = torch.compile(module, backend="hetflow")
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert close(compiled(x), module(x))


@pytest.mark.parametrize("platform, placement", [("host", "roofline"), ("mobile-soc", "split")])
def test_mlp_equals_eager_and_is_placed_as_hetflow_compile(platform, placement):
    torch.manual_seed(0)
    module, x = mlp.MLP(256, 1024, 256).eval(), torch.randn(256, 256)
    backend = hetflow.backend(platform=platform, placement=placement, time_limit=5)
    compiled = torch.compile(module, backend=backend)
    with torch.no_grad():
        assert close(compiled(x), module(x))
    [model] = backend.compiled
    assert model.platform.name == platform
    assert len(model.graph.inputs) == 1  # the lifted parameters are weights again, not inputs
    assert len(model.graph.weights) >= 6
    reference = hetflow.compile(module, (x,), platform=platform, placement=placement, time_limit=5)
    assert devices(model) == devices(reference)
    if platform == "mobile-soc":
        assert len(devices(model)) > 1  # the split placement really ran: not everything on the host CPU


@pytest.mark.parametrize("platform", ["host", "mobile-soc"])
def test_tiny_gpt2_equals_eager(platform):
    module, (tokens,) = build_gpt2(n_layer=2, n_embd=32, n_head=2, seq=8, vocab=50)
    backend = hetflow.backend(platform=platform)
    compiled = torch.compile(module, backend=backend)
    with torch.no_grad():
        assert close(compiled(tokens), module(tokens))
    assert len(backend.compiled) == 1 and len(backend.compiled[0].graph.inputs) == 1
    assert all("device" in n.meta for n in backend.compiled[0].graph.nodes)


class Breaks(nn.Module):
    """A data-dependent Python branch: dynamo breaks the graph at ``.item()`` and compiles both sides."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if h.sum().item() > 0:
            h = h * 2
        print("graph break")
        return self.fc2(h)


def test_graph_break_compiles_each_piece(capsys):
    torch.manual_seed(0)
    module = Breaks().eval()
    backend = hetflow.backend()
    compiled = torch.compile(module, backend=backend)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert close(compiled(x), module(x))
        assert close(compiled(x), module(x))
    assert len(backend.compiled) >= 2  # one CompiledModel per piece
    count = len(backend.compiled)
    with torch.no_grad():
        compiled(x)
    assert len(backend.compiled) == count  # dynamo's cache: no compile on a call its guards pass
    assert "graph break" in capsys.readouterr().out


def test_recompile_on_a_new_shape():
    torch.manual_seed(0)
    module = mlp.MLP().eval()
    backend = hetflow.backend()
    compiled = torch.compile(module, backend=backend, dynamic=False)
    with torch.no_grad():
        for batch in (4, 4, 7, 4, 7):
            x = torch.randn(batch, 64)
            assert close(compiled(x), module(x))
    assert len(backend.compiled) == 2
    assert {tuple(m.graph.inputs[0].type.shape) for m in backend.compiled} == {(4, 64), (7, 64)}


def test_recompile_dynamic_shapes():
    torch.manual_seed(0)
    module = mlp.MLP().eval()
    compiled = torch.compile(module, backend="hetflow")  # the second shape makes dynamo mark the batch dynamic
    with torch.no_grad():
        for batch in (4, 4, 7, 9):
            x = torch.randn(batch, 64)
            assert close(compiled(x), module(x))


def test_backward_is_refused():
    torch.manual_seed(0)
    compiled = torch.compile(mlp.MLP().eval(), backend="hetflow")
    y = compiled(torch.randn(4, 64))
    with pytest.raises(BackwardNotSupported, match="inference only"):
        y.sum().backward()


def test_bf16_crosses_the_boundary():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval().to(torch.bfloat16)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    backend = hetflow.backend()
    compiled = torch.compile(module, backend=backend)
    with torch.no_grad():
        got, want = compiled(x), module(x)
    assert got.dtype == torch.bfloat16
    assert close(got, want, tolerance=2e-2)
    assert backend.compiled[0].graph.inputs[0].type.dtype.name == "bf16"


def test_backend_checks_its_options():
    with pytest.raises(hetflow.api.CompileError, match="cpu_backend"):
        hetflow.backend(cpu_backend="nope")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float32, torch.int64])
def test_boundary_round_trips_bits(dtype):
    from hetflow.torch_backend import _to_numpy, _to_torch
    x = (torch.randn(3, 5) * 4).to(dtype)
    array = _to_numpy(x)
    assert array.dtype.itemsize == x.element_size()  # a same-size view, never through float32
    assert torch.equal(_to_torch(array, x.device).view(torch.uint8), x.view(torch.uint8))
