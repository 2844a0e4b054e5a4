"""The reference models, built from transformers configs with random weights (nothing is downloaded).

Each ``build_*`` returns ``(module, example_inputs)``, so each works with
``hetflow compile hetflow.examples.models:build_resnet18 -o out/``.
"""
from __future__ import annotations

import torch


class _Logits(torch.nn.Module):
    """Wraps a transformers model so the module returns a plain tensor."""

    def __init__(self, model, **call_kwargs):
        super().__init__()
        self.model = model
        self.call_kwargs = call_kwargs

    def forward(self, x):
        out = self.model(x, **self.call_kwargs)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def build_gpt2(n_layer: int = 2, n_embd: int = 64, n_head: int = 2, seq: int = 16, vocab: int = 100):
    """GPT-2 (a small config by default; n_layer=12, n_embd=768, n_head=12, vocab=50257 is gpt2-small)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab, n_positions=max(64, seq),
                        bos_token_id=0, eos_token_id=0)
    return _Logits(GPT2LMHeadModel(config).eval(), use_cache=False), (torch.randint(0, vocab, (1, seq)),)


def build_resnet18(image: int = 224):
    """transformers' ResNet in the resnet-18 layout: basic blocks, depths 2-2-2-2."""
    from transformers import ResNetConfig, ResNetForImageClassification
    torch.manual_seed(0)
    config = ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                          embedding_size=64, num_labels=1000)
    return _Logits(ResNetForImageClassification(config).eval()), (torch.randn(1, 3, image, image),)


def build_vit(hidden: int = 192, layers: int = 2, heads: int = 3, image: int = 224):
    """transformers' ViT, patch 16 (hidden=384, layers=12, heads=6 is ViT-Small)."""
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=4 * hidden, image_size=image, patch_size=16, num_labels=1000)
    return _Logits(ViTForImageClassification(config).eval()), (torch.randn(1, 3, image, image),)


def build_bert(hidden: int = 768, layers: int = 12, heads: int = 12, seq: int = 128):
    """BERT-base config (random weights): the encoder's last hidden state."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden)
    return _Logits(BertModel(config).eval()), (torch.randint(0, config.vocab_size, (1, seq)),)
