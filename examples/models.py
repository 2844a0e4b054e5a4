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


def build_gpt2_dynamic(n_layer: int = 2, n_embd: int = 64, n_head: int = 2, max_seq: int = 128, vocab: int = 100):
    """GPT-2 for dynamic shapes (``hetflow compile ... --dynamic batch=1..4,seq=2..128``): eager attention
    (transformers' SDPA path does not export with a dynamic batch) and an example of batch 2 (torch.export
    fixes a size whose example is 1)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab, n_positions=max_seq,
                        bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return _Logits(GPT2LMHeadModel(config).eval(), use_cache=False), (torch.randint(0, vocab, (2, 16)),)


class TinyLM(torch.nn.Module):
    """A GPT-2-style block written out in torch (token and position embeddings, causal self-attention, an MLP,
    a head): no transformers code, so it exports to ONNX with dynamic axes too."""

    def __init__(self, vocab: int = 50, hidden: int = 32, heads: int = 2, max_seq: int = 128):
        super().__init__()
        nn = torch.nn
        self.tok, self.pos = nn.Embedding(vocab, hidden), nn.Embedding(max_seq, hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.head = nn.Linear(hidden, vocab)
        self.heads = heads

    def forward(self, ids):
        batch, seq = ids.shape
        x = self.tok(ids) + self.pos(torch.arange(seq))
        q, k, v = self.qkv(self.ln1(x)).split(x.shape[-1], dim=-1)
        q, k, v = (t.reshape(batch, seq, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        attention = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + self.proj(attention.transpose(1, 2).reshape(batch, seq, -1))
        return self.head(x + self.mlp(self.ln2(x)))


def build_tiny_lm(max_seq: int = 128):
    """``TinyLM`` with an example of batch 2, sequence 16 (for dynamic shapes: torch.export fixes a size whose
    example is 1)."""
    torch.manual_seed(0)
    return TinyLM(max_seq=max_seq).eval(), (torch.randint(0, 50, (2, 16)),)


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


class _GPT2DecodeStep(torch.nn.Module):
    """One decode step of a GPT2LMHeadModel over a fixed-size KV cache (see ``build_gpt2_decode``)."""

    def __init__(self, model, context: int):
        super().__init__()
        self.model = model
        self.context = context
        config = model.config
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        # cache slots 0..context-1, compared with ``position`` to mask the slots not yet written
        self.register_buffer("slots", torch.arange(context, dtype=torch.int64), persistent=False)

    def forward(self, input_ids, position, k_cache, v_cache):
        transformer = self.model.transformer
        n_head, head_dim = self.n_head, self.head_dim
        embd = n_head * head_dim
        hidden = transformer.wte(input_ids) + transformer.wpe(position).reshape(1, 1, embd)
        # [1, 1, context + 1]: True where the key is a written cache slot (< position) or the new token
        new_slot = torch.ones(1, dtype=torch.bool, device=position.device)
        valid = torch.cat([self.slots < position, new_slot]).reshape(1, 1, self.context + 1)
        new_k, new_v = [], []
        for i, block in enumerate(transformer.h):
            attn = block.attn
            qkv = attn.c_attn(block.ln_1(hidden))                          # [1, 1, 3E]
            q, k, v = qkv.split(embd, dim=2)
            q = q.reshape(1, 1, n_head, head_dim).transpose(1, 2)           # [1, H, 1, D]
            k = k.reshape(1, 1, n_head, head_dim).transpose(1, 2)
            v = v.reshape(1, 1, n_head, head_dim).transpose(1, 2)
            keys = torch.cat([k_cache[i], k], dim=2)                        # [1, H, context + 1, D]
            values = torch.cat([v_cache[i], v], dim=2)
            scores = torch.matmul(q, keys.transpose(-1, -2)) * (head_dim ** -0.5)
            scores = torch.where(valid, scores, torch.full_like(scores, -1e9))
            probs = torch.softmax(scores, dim=-1)
            ctx = torch.matmul(probs, values).transpose(1, 2).reshape(1, 1, embd)
            hidden = hidden + attn.c_proj(ctx)
            hidden = hidden + block.mlp(block.ln_2(hidden))
            new_k.append(k)
            new_v.append(v)
        logits = self.model.lm_head(transformer.ln_f(hidden))
        return logits, torch.stack(new_k), torch.stack(new_v)


def build_gpt2_decode(n_layer: int = 2, n_embd: int = 64, n_head: int = 2, context: int = 128, vocab: int = 100):
    """One decode step of GPT-2 with an explicit, fixed-size KV cache (static shapes for torch.export).

    The weights are a ``GPT2LMHeadModel`` built from a ``GPT2Config`` (n_positions 1024, as GPT-2's)
    with random weights after ``torch.manual_seed(0)``; the step uses its own submodules and weights.

    Inputs, in order (D = n_embd // n_head):
      ``input_ids`` int64[1, 1]  the new token;
      ``position``  int64[1]     its position = the number of tokens already in the cache;
      ``k_cache``, ``v_cache``   float32[n_layer, 1, n_head, context, D]: slot j holds token j's key
                                 (value) for j < position; slots >= position are ignored (masked).
    Outputs, in order:
      ``logits``    float32[1, 1, vocab] for the next token;
      ``new_k``, ``new_v``       float32[n_layer, 1, n_head, 1, D]: the new token's key and value, which
                                 the caller writes into slot ``position`` before the next step.
    The step attends over the cache slots < position plus the new token, so position must be < context.
    ``module.model`` is the underlying ``GPT2LMHeadModel``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab,
                        n_positions=max(1024, context), bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    head_dim = n_embd // n_head
    cache = (n_layer, 1, n_head, context, head_dim)
    inputs = (torch.randint(0, vocab, (1, 1)), torch.tensor([3], dtype=torch.int64),
              torch.randn(cache), torch.randn(cache))
    return _GPT2DecodeStep(model, context).eval(), inputs
