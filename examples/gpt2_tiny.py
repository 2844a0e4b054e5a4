"""GPT-2 from transformers, built from a small config with random weights (nothing is downloaded)."""
import torch


class LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def build(n_layer: int = 2, n_embd: int = 64, seq: int = 16):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_head=2, n_embd=n_embd, vocab_size=100, n_positions=64)
    model = LogitsOnly(GPT2LMHeadModel(config).eval())
    return model, (torch.randint(0, 100, (1, seq)),)
