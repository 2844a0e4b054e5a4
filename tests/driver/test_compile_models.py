"""The real models through the whole pipeline (canonicalize, fuse, place, schedule) still equal torch eager."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import hetflow
from hetflow.examples import models

TOLERANCE = 1e-4


def close(got, expected) -> float:
    scale = max(1.0, float(expected.abs().max()))
    return float((got - expected).abs().max()) / scale


class EncoderBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.layer(x)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.body(x)


CASES = {
    "mlp": lambda: __import__("hetflow.examples.mlp", fromlist=["build"]).build(),
    "cnn": lambda: (SmallCNN().eval(), (torch.randn(2, 3, 16, 16),)),
    "encoder": lambda: (EncoderBlock().eval(), (torch.randn(2, 10, 64),)),
    "gpt2": lambda: models.build_gpt2(),
    "resnet18": lambda: models.build_resnet18(),
    "vit": lambda: models.build_vit(hidden=96, layers=2, heads=4),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("platform, placement", [("host", "roofline"), ("mobile-soc", "split")])
def test_compiled_model_equals_eager(name, platform, placement):
    torch.manual_seed(0)
    module, inputs = CASES[name]()
    compiled = hetflow.compile(module, inputs, platform=platform, placement=placement, time_limit=5)
    assert any(n.op == "hetflow.group" for n in compiled.graph.nodes) or name == "mlp"
    assert all("device" in n.meta for n in compiled.graph.nodes)
    with torch.no_grad():
        expected = module(*inputs)
    assert close(compiled(*inputs), expected) <= TOLERANCE
