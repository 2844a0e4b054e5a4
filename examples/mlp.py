"""A small MLP: the smallest model worth compiling. ``build()`` returns (module, example_inputs)."""
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 64, d_hidden: int = 256, d_out: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.fc3 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return torch.softmax(self.fc3(torch.relu(self.fc2(self.act(self.fc1(x))))), dim=-1)


def build():
    torch.manual_seed(0)
    return MLP().eval(), (torch.randn(8, 64),)
