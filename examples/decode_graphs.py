"""Decode-step graphs built directly in the IR, at the real models' sizes, for placement studies.

The weights are zero-stride NumPy views (``np.broadcast_to``): the graphs have the
real shapes, bytes and FLOPs of Mixtral and GPT-2 without allocating gigabytes, so
the cost model, placement and schedule see the real problem. They are for
planning, not for numerics: the interpreter would run them, slowly, on zeros.
"""
from __future__ import annotations

import numpy as np

from hetflow.ir import DType, Graph, TensorType, infer_types


class Builder:
    """Adds nodes with inferred output types; weights are zero-stride views of the given shape."""

    def __init__(self, name: str, dtype: DType = DType.f16):
        self.graph = Graph(name, 18)
        self.dtype = dtype

    def input(self, name: str, shape) -> object:
        return self.graph.add_input(name, TensorType(self.dtype, tuple(shape)))

    def weight(self, name: str, shape, dtype: DType | None = None, value=0) -> object:
        dtype = dtype or self.dtype
        data = np.broadcast_to(np.array(value, dtype.numpy), tuple(shape))
        return self.graph.add_weight(self.graph.fresh_name(name), data)

    def const(self, name: str, values, dtype=np.int64) -> object:
        return self.graph.add_weight(self.graph.fresh_name(name), np.array(values, dtype))

    def op(self, op: str, inputs, attrs=None, loc: str = "", outputs: int = 1):
        node = self.graph.add_node(op, inputs, [None] * outputs, attrs or {}, loc=loc)
        for out, t in zip(node.outputs, infer_types(node, self.graph.opset)):
            out.type = t
        return node.outputs[0] if outputs == 1 else node.outputs

    def rms_norm(self, x, hidden: int, loc: str):
        sq = self.op("Mul", [x, x], loc=loc)
        mean = self.op("ReduceMean", [sq, self.const("axes", [-1])], loc=loc)
        eps = self.op("Add", [mean, self.weight("eps", (), value=1e-5)], loc=loc)
        inv = self.op("Reciprocal", [self.op("Sqrt", [eps], loc=loc)], loc=loc)
        return self.op("Mul", [self.op("Mul", [x, inv], loc=loc), self.weight("rms_weight", (hidden,), value=1)], loc=loc)


def attention_decode(b: Builder, q, batch: int, kv_heads: int, group: int, head_dim: int, context: int, loc: str):
    """One new token per sequence attending to a KV cache of ``context`` tokens (grouped-query)."""
    k_cache = b.input(f"{loc}.k_cache", (batch, kv_heads, head_dim, context))   # stored transposed
    v_cache = b.input(f"{loc}.v_cache", (batch, kv_heads, context, head_dim))
    qh = b.op("Reshape", [q, b.const("shape", [batch, kv_heads, group, head_dim])], loc=loc)
    scores = b.op("MatMul", [qh, k_cache], loc=loc)
    scaled = b.op("Mul", [scores, b.weight("scale", (), value=head_dim ** -0.5)], loc=loc)
    probs = b.op("Softmax", [scaled], {"axis": -1}, loc=loc)
    ctx = b.op("MatMul", [probs, v_cache], loc=loc)
    return b.op("Reshape", [ctx, b.const("shape", [batch, kv_heads * group * head_dim])], loc=loc)


def expert_token_counts(batch: int, experts: int = 8, top_k: int = 2) -> list[int]:
    """Tokens routed to each expert: a skewed (Zipf-like) router, as real MoE routers are, summing to batch*top_k."""
    total = batch * top_k
    weights = np.array([1.0 / (i + 1) ** 0.6 for i in range(experts)])
    counts = np.floor(weights / weights.sum() * total).astype(int)
    counts[: total - counts.sum()] += 1
    if batch == 1:
        counts = np.array([1] * top_k + [0] * (experts - top_k))
    return [int(c) for c in counts]


def build_mixtral_decode_layer(batch: int, hidden: int = 4096, heads: int = 32, kv_heads: int = 8,
                               head_dim: int = 128, context: int = 2048, experts: int = 8, top_k: int = 2,
                               ffn: int = 14336) -> Graph:
    """One Mixtral-8x7B-like decoder layer for one decode step of ``batch`` sequences (GQA group 4, top-2 of 8)."""
    b = Builder(f"mixtral_decode_b{batch}")
    x = b.input("x", (batch, hidden))
    h = b.rms_norm(x, hidden, "attn_norm")
    q = b.op("MatMul", [h, b.weight("wq", (hidden, heads * head_dim))], loc="attn.q_proj")
    k = b.op("MatMul", [h, b.weight("wk", (hidden, kv_heads * head_dim))], loc="attn.k_proj")
    v = b.op("MatMul", [h, b.weight("wv", (hidden, kv_heads * head_dim))], loc="attn.v_proj")
    ctx = attention_decode(b, q, batch, kv_heads, heads // kv_heads, head_dim, context, "attn")
    o = b.op("MatMul", [ctx, b.weight("wo", (heads * head_dim, hidden))], loc="attn.o_proj")
    x2 = b.op("Add", [x, o], loc="attn.residual")
    # the new token's K and V are written to the cache by the runtime; keep them as outputs
    h2 = b.rms_norm(x2, hidden, "ffn_norm")
    b.op("MatMul", [h2, b.weight("router", (hidden, experts))], loc="moe.router")
    outs, assignment = [], 0
    for e, tokens in enumerate(expert_token_counts(batch, experts, top_k)):
        if tokens == 0:
            continue
        token_ids = [(assignment + t) % batch for t in range(tokens)]  # the tokens the router sent to expert e
        assignment += tokens
        rows = b.op("Gather", [h2, b.const("token_ids", token_ids)], {"axis": 0}, loc=f"moe.expert{e}.dispatch")
        gate = b.op("MatMul", [rows, b.weight(f"w_gate{e}", (hidden, ffn))], loc=f"moe.expert{e}.w1")
        act = b.op("Mul", [gate, b.op("Sigmoid", [gate], loc=f"moe.expert{e}.act")], loc=f"moe.expert{e}.act")
        up = b.op("MatMul", [rows, b.weight(f"w_up{e}", (hidden, ffn))], loc=f"moe.expert{e}.w3")
        down = b.op("MatMul", [b.op("Mul", [act, up], loc=f"moe.expert{e}.gate"),
                               b.weight(f"w_down{e}", (ffn, hidden))], loc=f"moe.expert{e}.w2")
        outs.append(down)
    combined = b.op("Concat", outs, {"axis": 0}, loc="moe.combine")
    pairs = b.op("Reshape", [combined, b.const("shape", [batch, top_k, hidden])], loc="moe.combine")
    moe = b.op("ReduceSum", [pairs, b.const("axes", [1])], {"keepdims": 0}, loc="moe.combine")
    y = b.op("Add", [x2, moe], loc="ffn.residual")
    b.graph.outputs = [y, k, v]
    return b.graph


def build_gpt2_decode_step(layers: int = 12, hidden: int = 768, heads: int = 12, context: int = 128,
                           vocab: int = 50257, batch: int = 1) -> Graph:
    """GPT-2 (small by default) generating one token with a KV cache of ``context`` tokens."""
    b = Builder(f"gpt2_decode_{layers}x{hidden}")
    x = b.input("token_embedding", (batch, hidden))
    head_dim = hidden // heads
    outputs = []
    for layer in range(layers):
        loc = f"h.{layer}"
        ln = b.op("LayerNormalization", [x, b.weight("ln_1.w", (hidden,), value=1), b.weight("ln_1.b", (hidden,))],
                  {"axis": -1}, loc=f"{loc}.ln_1")
        qkv = b.op("Gemm", [ln, b.weight("c_attn.w", (hidden, 3 * hidden)), b.weight("c_attn.b", (3 * hidden,))],
                   loc=f"{loc}.attn.c_attn")
        q, k, v = b.op("Split", [qkv, b.const("split", [hidden] * 3)], {"axis": 1}, loc=f"{loc}.attn", outputs=3)
        outputs += [k, v]
        ctx = attention_decode(b, q, batch, heads, 1, head_dim, context, f"{loc}.attn")
        proj = b.op("Gemm", [ctx, b.weight("c_proj.w", (hidden, hidden)), b.weight("c_proj.b", (hidden,))],
                    loc=f"{loc}.attn.c_proj")
        x = b.op("Add", [x, proj], loc=f"{loc}.residual")
        ln2 = b.op("LayerNormalization", [x, b.weight("ln_2.w", (hidden,), value=1), b.weight("ln_2.b", (hidden,))],
                   {"axis": -1}, loc=f"{loc}.ln_2")
        fc = b.op("Gemm", [ln2, b.weight("c_fc.w", (hidden, 4 * hidden)), b.weight("c_fc.b", (4 * hidden,))],
                  loc=f"{loc}.mlp.c_fc")
        scaled = b.op("Mul", [fc, b.weight("gelu", (), value=1.702)], loc=f"{loc}.mlp.act")
        act = b.op("Mul", [fc, b.op("Sigmoid", [scaled], loc=f"{loc}.mlp.act")], loc=f"{loc}.mlp.act")  # GELU ~ x*sigmoid(1.702x)
        down = b.op("Gemm", [act, b.weight("c_proj2.w", (4 * hidden, hidden)), b.weight("c_proj2.b", (hidden,))],
                    loc=f"{loc}.mlp.c_proj")
        x = b.op("Add", [x, down], loc=f"{loc}.residual2")
    lnf = b.op("LayerNormalization", [x, b.weight("ln_f.w", (hidden,), value=1), b.weight("ln_f.b", (hidden,))],
               {"axis": -1}, loc="ln_f")
    logits = b.op("MatMul", [lnf, b.weight("lm_head", (hidden, vocab))], loc="lm_head")
    b.graph.outputs = [logits] + outputs
    return b.graph
