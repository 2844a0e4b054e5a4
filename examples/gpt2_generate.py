"""GPT-2 for generation: a prefill graph (the whole prompt in one call) and a decode-step graph that reads the
KV cache in place, both from the same ``GPT2LMHeadModel`` (random weights after ``torch.manual_seed(0)``).

``hetflow.runtime.generate.Generator`` runs the pair. The cache is one preallocated buffer
``kv[n_layer, 2, 1, n_head, max_seq, head_dim]`` (``[:, 0]`` keys, ``[:, 1]`` values). The decode step takes
each layer's keys and values as their own inputs (``cache_0, cache_1, ...``: layer i's keys are
``cache_{2i}``, its values ``cache_{2i+1}``): the generator passes views of the
buffer (``kv[i, 0]``, C-contiguous), so the step reads the cache where it lies. A single ``kv`` input would
make the graph slice it per layer, and ONNX Runtime's Slice copies. The step does not concatenate the new key
onto the cache either (a copy of the whole cache per layer): it scores the cache slots and the new token
apart, softmaxes them together and adds the two weighted sums. It returns the new token's keys and values,
which the generator writes into slot ``position`` of the buffer. hetflow's canonicalize makes each layer's
attention written so one ``hetflow.decode_attention`` node (``passes/decode_attention.py``), which ONNX Runtime
runs as GroupQueryAttention over the cache in place; the module itself stays plain torch, and torch.onnx
exports it op by op.

Compile the pair for ``hetflow run DIR --generate N``::

    hetflow compile hetflow.examples.gpt2_generate:build_prefill -o gen/prefill
    hetflow compile hetflow.examples.gpt2_generate:build_decode -o gen/decode
    hetflow run gen/ --generate 16 --prompt 1,2,3

or ``compile_generator(path, ...)`` for other sizes.
"""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["GPT2DecodeStep", "GPT2Prefill", "build_decode", "build_prefill", "compile_generator", "gpt2_model"]

MASKED = -1e9   # the score of a cache slot not yet written: softmax gives it a weight of exactly 0


def gpt2_model(n_layer: int = 2, n_embd: int = 64, n_head: int = 2, vocab: int = 100, n_positions: int = 1024):
    """A ``GPT2LMHeadModel`` with random weights after ``torch.manual_seed(0)`` (the same weights for every call
    with the same sizes, so a prefill and a decode step built apart share them)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab, n_positions=n_positions,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def _split_heads(x, n_head: int, head_dim: int):
    """[1, T, H*D] -> [1, H, T, D]."""
    return x.reshape(1, x.shape[1], n_head, head_dim).transpose(1, 2)


class GPT2Prefill(torch.nn.Module):
    """The whole prompt in one call: ``(input_ids int64[1, P], last int64[1])`` -> ``(logits [1, 1, vocab] of token
    ``last``, kv [n_layer, 2, 1, n_head, P, head_dim])``.

    A shorter prompt is padded on the right: attention is causal, so the tokens up to ``last`` never see the
    padding, and only ``last``'s row goes through the head (the vocabulary projection of every row would be
    the largest cost of the call)."""

    def __init__(self, model, prompt_len: int):
        super().__init__()
        self.model = model
        self.n_head = model.config.n_head
        self.head_dim = model.config.n_embd // model.config.n_head
        # the causal mask as a bias added to the scores: 0 on and below the diagonal, MASKED above. A row's
        # unmasked scores are unchanged (s + 0 == s) and its masked ones get a softmax weight of exactly 0, as
        # with where(causal, scores, MASKED), which ONNX Runtime runs 3x slower than the add (7.5 against 2.4 ms
        # a layer on 12 x 512 x 512 scores here)
        causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool).tril()
        self.register_buffer("causal_bias", torch.zeros(prompt_len, prompt_len).masked_fill(~causal, MASKED),
                             persistent=False)
        self.register_buffer("positions", torch.arange(prompt_len, dtype=torch.int64), persistent=False)

    def forward(self, input_ids, last):
        transformer = self.model.transformer
        n_head, head_dim = self.n_head, self.head_dim
        embd = n_head * head_dim
        hidden = transformer.wte(input_ids) + transformer.wpe(self.positions).unsqueeze(0)
        cache = []
        for block in transformer.h:
            q, k, v = block.attn.c_attn(block.ln_1(hidden)).split(embd, dim=2)
            q, k, v = (_split_heads(t, n_head, head_dim) for t in (q, k, v))
            scores = torch.matmul(q, k.transpose(-1, -2)) * (head_dim ** -0.5)
            scores = scores + self.causal_bias
            ctx = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(1, -1, embd)
            hidden = hidden + block.attn.c_proj(ctx)
            hidden = hidden + block.mlp(block.ln_2(hidden))
            cache.append(torch.stack([k, v]))
        row = torch.index_select(hidden, 1, last)                          # [1, 1, E]
        logits = self.model.lm_head(transformer.ln_f(row))
        return logits, torch.stack(cache)


class GPT2DecodeStep(torch.nn.Module):
    """One token over the cache in place: ``(input_ids int64[1, 1], position int64[1], k0, v0, k1, v1, ...)`` (exported as ``cache_0, cache_1, ...``) ->
    ``(logits [1, 1, vocab], new_kv [n_layer, 2, 1, n_head, 1, head_dim])``.

    ``k<i>``/``v<i>`` are float32[1, n_head, max_seq, head_dim]: slot j holds token j for j < position; the
    slots from ``position`` on are masked (whatever they hold)."""

    def __init__(self, model, max_seq: int):
        super().__init__()
        self.model = model
        self.n_head = model.config.n_head
        self.head_dim = model.config.n_embd // model.config.n_head
        self.register_buffer("slots", torch.arange(max_seq, dtype=torch.int64), persistent=False)

    def forward(self, input_ids, position, *cache):
        transformer = self.model.transformer
        n_head, head_dim = self.n_head, self.head_dim
        embd = n_head * head_dim
        hidden = transformer.wte(input_ids) + transformer.wpe(position).reshape(1, 1, embd)
        written = (self.slots < position).reshape(1, 1, 1, -1)              # [1, 1, 1, max_seq]
        scale = head_dim ** -0.5
        new = []
        for i, block in enumerate(transformer.h):
            keys, values = cache[2 * i], cache[2 * i + 1]
            q, k, v = block.attn.c_attn(block.ln_1(hidden)).split(embd, dim=2)
            q, k, v = (_split_heads(t, n_head, head_dim) for t in (q, k, v))   # [1, H, 1, D]
            cached = torch.matmul(q, keys.transpose(-1, -2)) * scale           # [1, H, 1, max_seq]
            cached = torch.where(written, cached, torch.full_like(cached, MASKED))
            own = (q * k).sum(-1, keepdim=True) * scale                        # [1, H, 1, 1]
            probs = torch.softmax(torch.cat([cached, own], dim=-1), dim=-1)
            ctx = torch.matmul(probs[..., :-1], values) + probs[..., -1:] * v  # [1, H, 1, D]
            hidden = hidden + block.attn.c_proj(ctx.transpose(1, 2).reshape(1, 1, embd))
            hidden = hidden + block.mlp(block.ln_2(hidden))
            new.append(torch.stack([k, v]))
        logits = self.model.lm_head(transformer.ln_f(hidden))
        return logits, torch.stack(new)


def build_prefill(n_layer: int = 2, n_embd: int = 64, n_head: int = 2, vocab: int = 100, prompt_len: int = 16):
    """``GPT2Prefill`` over ``gpt2_model(...)`` with example inputs (a ``hetflow compile`` builder)."""
    module = GPT2Prefill(gpt2_model(n_layer, n_embd, n_head, vocab), prompt_len).eval()
    return module, (torch.randint(0, vocab, (1, prompt_len)), torch.tensor([prompt_len - 1], dtype=torch.int64))


def build_decode(n_layer: int = 2, n_embd: int = 64, n_head: int = 2, vocab: int = 100, max_seq: int = 64):
    """``GPT2DecodeStep`` over ``gpt2_model(...)`` with example inputs (a ``hetflow compile`` builder)."""
    module = GPT2DecodeStep(gpt2_model(n_layer, n_embd, n_head, vocab), max_seq).eval()
    layer_cache = (1, n_head, max_seq, n_embd // n_head)
    cache = tuple(torch.randn(layer_cache) for _ in range(2 * n_layer))
    return module, (torch.randint(0, vocab, (1, 1)), torch.tensor([3], dtype=torch.int64)) + cache


def compile_generator(path, n_layer: int = 2, n_embd: int = 64, n_head: int = 2, vocab: int = 100,
                      prompt_len: int = 16, max_seq: int = 64, platform: str = "host", **options):
    """Compile the prefill and the decode step and save them as ``path/prefill`` and ``path/decode`` (the
    layout ``hetflow run path --generate N`` and ``Generator.load(path)`` read). Returns the model."""
    import hetflow
    path = Path(path)
    prefill, prefill_inputs = build_prefill(n_layer, n_embd, n_head, vocab, prompt_len)
    hetflow.compile(prefill, prefill_inputs, platform=platform, **options).save(path / "prefill")
    decode, decode_inputs = build_decode(n_layer, n_embd, n_head, vocab, max_seq)
    hetflow.compile(decode, decode_inputs, platform=platform, **options).save(path / "decode")
    return decode.model
