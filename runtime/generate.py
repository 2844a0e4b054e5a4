"""Token-by-token decoding with a KV cache kept outside the static memory plan. Needs NumPy only, never torch.

A decode-step artifact (``hetflow.examples.models.build_gpt2_decode`` compiled and saved)
takes ``input_ids`` int64[1,1], ``position`` int64[1], ``k_cache`` and ``v_cache``
float32[n_layer,1,n_head,context,head_dim], and returns, in output order, the logits
[1,1,vocab] and the new token's key and value [n_layer,1,n_head,1,head_dim].

The cache is the runtime's dynamic arena: its size grows with the sequence, so the
memory planner does not place it. ``KVCache`` stores it paged (a list of fixed-size
blocks per layer, a new block when the sequence crosses a block boundary) and
assembles the fixed-size ``[n_layer,1,n_head,context,head_dim]`` tensors the step
reads, zeros beyond the current length.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from hetflow.ir.errors import HetflowError

__all__ = ["DECODE_INPUTS", "GenerateError", "Generation", "KVCache", "KVCacheFull", "generate"]

DECODE_INPUTS = ("input_ids", "position", "k_cache", "v_cache")


class GenerateError(HetflowError):
    """The artifact is not a decode step, or the request cannot be served by it."""


class KVCacheFull(GenerateError):
    """Appending would make the sequence longer than the cache's ``max_seq``."""


class KVCache:
    """Per-layer K and V storage in blocks of ``block`` tokens, up to ``max_seq`` tokens.

    ``append(new_k, new_v)`` takes ``[n_layer, 1, n_head, T, head_dim]`` (T new tokens);
    ``view()`` returns the ``(k, v)`` arrays ``[n_layer, 1, n_head, context, head_dim]`` a
    decode step reads: slot j holds token j for j < ``length``, zeros after. The views are
    kept between calls and only the tokens appended since the last call are copied into
    them; treat them as read-only.
    """

    def __init__(self, n_layer: int, n_head: int, head_dim: int, max_seq: int, block: int = 16,
                 context: int | None = None, dtype=np.float32):
        context = max_seq if context is None else context
        for name, value in (("n_layer", n_layer), ("n_head", n_head), ("head_dim", head_dim),
                            ("max_seq", max_seq), ("block", block), ("context", context)):
            if int(value) < 1:
                raise GenerateError(f"KVCache: {name} must be positive, got {value}")
        if max_seq > context:
            raise GenerateError(f"KVCache: max_seq {max_seq} exceeds the model's cache context {context}")
        self.n_layer, self.n_head, self.head_dim = int(n_layer), int(n_head), int(head_dim)
        self.max_seq, self.block, self.context = int(max_seq), int(block), int(context)
        self.dtype = np.dtype(dtype)
        self.k_blocks: list[list[np.ndarray]] = [[] for _ in range(self.n_layer)]   # each [n_head, block, head_dim]
        self.v_blocks: list[list[np.ndarray]] = [[] for _ in range(self.n_layer)]
        self.length = 0
        shape = (self.n_layer, 1, self.n_head, self.context, self.head_dim)
        self._k_view = np.zeros(shape, self.dtype)
        self._v_view = np.zeros(shape, self.dtype)
        self._synced = 0   # tokens already copied into the views

    @property
    def blocks(self) -> int:
        """Blocks allocated per layer (for K, and as many for V)."""
        return len(self.k_blocks[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the paged storage (K and V, all layers)."""
        return 2 * self.n_layer * self.blocks * self.n_head * self.block * self.head_dim * self.dtype.itemsize

    def append(self, new_k: np.ndarray, new_v: np.ndarray) -> None:
        new_k, new_v = np.asarray(new_k), np.asarray(new_v)
        expected = (self.n_layer, 1, self.n_head, None, self.head_dim)
        for name, a in (("new_k", new_k), ("new_v", new_v)):
            if a.ndim != 5 or any(e is not None and e != s for e, s in zip(expected, a.shape)):
                raise GenerateError(f"KVCache.append: {name} has shape {list(a.shape)}, expected "
                                    f"[{self.n_layer}, 1, {self.n_head}, T, {self.head_dim}]")
        if new_k.shape != new_v.shape:
            raise GenerateError(f"KVCache.append: new_k {list(new_k.shape)} and new_v {list(new_v.shape)} differ")
        count = new_k.shape[3]
        if self.length + count > self.max_seq:
            raise KVCacheFull(f"KV cache full: appending {count} token(s) to {self.length} would exceed "
                              f"max_seq={self.max_seq}")
        for t in range(count):
            index, offset = divmod(self.length, self.block)
            if index == self.blocks:   # crossing a block boundary: one new block per layer, K and V
                for layer in range(self.n_layer):
                    self.k_blocks[layer].append(np.zeros((self.n_head, self.block, self.head_dim), self.dtype))
                    self.v_blocks[layer].append(np.zeros((self.n_head, self.block, self.head_dim), self.dtype))
            for layer in range(self.n_layer):
                self.k_blocks[layer][index][:, offset] = new_k[layer, 0, :, t]
                self.v_blocks[layer][index][:, offset] = new_v[layer, 0, :, t]
            self.length += 1

    def view(self) -> tuple[np.ndarray, np.ndarray]:
        """The fixed-size ``(k_cache, v_cache)`` for the next step (tokens [0, length), zeros after)."""
        start, end = self._synced, self.length
        while start < end:
            index, offset = divmod(start, self.block)
            stop = min(end, (index + 1) * self.block)
            span = slice(offset, offset + stop - start)
            for layer in range(self.n_layer):
                self._k_view[layer, 0, :, start:stop] = self.k_blocks[layer][index][:, span]
                self._v_view[layer, 0, :, start:stop] = self.v_blocks[layer][index][:, span]
            start = stop
        self._synced = end
        return self._k_view, self._v_view

    def reset(self) -> None:
        """Forget every token (the blocks are freed, the views zeroed)."""
        self.k_blocks = [[] for _ in range(self.n_layer)]
        self.v_blocks = [[] for _ in range(self.n_layer)]
        self._k_view[...] = 0
        self._v_view[...] = 0
        self.length = self._synced = 0


class Generation(list):
    """The generated token ids (a list) with what was measured on the way.

    ``step_seconds``: wall time of every decode step (cache view, model run, append), the
    prefill steps first; ``prefill_steps``: how many of them fed the prompt; ``logits``:
    the ``[vocab]`` logits each generated token was chosen from.
    """

    def __init__(self, tokens=(), step_seconds=(), prefill_steps: int = 0, logits=()):
        super().__init__(tokens)
        self.step_seconds = list(step_seconds)
        self.prefill_steps = prefill_steps
        self.logits = list(logits)

    @property
    def decode_seconds(self) -> list[float]:
        """The steps after the prompt (each one produced a token from a generated one)."""
        return self.step_seconds[self.prefill_steps:]


def _decode_signature(model) -> dict:
    """Input types by name; raises GenerateError naming what a decode-step artifact lacks."""
    types = {v.name: v.type for v in model.graph.inputs}
    missing = [n for n in DECODE_INPUTS if n not in types]
    if missing:
        raise GenerateError(f"not a decode-step artifact: missing input(s) {', '.join(missing)}; "
                            f"its inputs are {list(types)} (expected {list(DECODE_INPUTS)})")
    outputs = [v.name for v in model.graph.outputs]
    if len(outputs) < 3:
        raise GenerateError(f"not a decode-step artifact: it has {len(outputs)} output(s) {outputs}, "
                            "expected 3 (logits, new_k, new_v)")
    k_type, v_type = types["k_cache"], types["v_cache"]
    if k_type is None or not k_type.is_static or len(k_type.shape) != 5 or k_type.shape[1] != 1:
        raise GenerateError(f"k_cache must be static [n_layer, 1, n_head, context, head_dim], got {k_type}")
    if v_type is None or tuple(v_type.shape or ()) != tuple(k_type.shape):
        raise GenerateError(f"v_cache {v_type} must have k_cache's shape {k_type}")
    return types


def generate(model, prompt_ids: Sequence[int], steps: int, max_seq: int | None = None,
             block: int = 16) -> Generation:
    """Greedy decoding with a loaded decode-step artifact (``hetflow.runtime.load``).

    The prompt is fed one token per step (prefill by decode steps), then ``steps``
    tokens are generated, each the argmax of the last step's logits. ``max_seq`` bounds
    the cached sequence (default: the context of the ``k_cache`` input); the request needs
    ``len(prompt_ids) + steps - 1`` cached tokens. Returns the generated ids as a
    ``Generation`` (a list carrying per-step latencies and the logits).
    """
    types = _decode_signature(model)
    n_layer, _, n_head, context, head_dim = (int(d) for d in types["k_cache"].shape)
    prompt = [int(t) for t in prompt_ids]
    steps = int(steps)
    if not prompt:
        raise GenerateError("generate needs a prompt of at least one token")
    if steps < 0:
        raise GenerateError(f"steps must be >= 0, got {steps}")
    max_seq = context if max_seq is None else int(max_seq)
    if max_seq > context:
        raise GenerateError(f"max_seq {max_seq} exceeds the artifact's KV cache context {context}")
    needed = len(prompt) + steps - 1
    if steps and needed > max_seq:
        raise KVCacheFull(f"KV cache full: a prompt of {len(prompt)} token(s) plus {steps} generated needs "
                          f"{needed} cached tokens, more than max_seq={max_seq}")
    ids_dtype = types["input_ids"].dtype.numpy if types["input_ids"] is not None else np.int64
    pos_dtype = types["position"].dtype.numpy if types["position"] is not None else np.int64
    cache = KVCache(n_layer, n_head, head_dim, max_seq, block=block, context=context,
                    dtype=types["k_cache"].dtype.numpy)
    out = Generation(prefill_steps=len(prompt))
    if steps == 0:
        return out

    def step(token: int) -> np.ndarray:
        start = time.perf_counter()
        k, v = cache.view()
        feeds = {"input_ids": np.array([[token]], ids_dtype), "position": np.array([cache.length], pos_dtype),
                 "k_cache": k, "v_cache": v}
        results = list(model.run(feeds).values())
        logits, new_k, new_v = results[0], results[1], results[2]
        cache.append(new_k, new_v)
        out.step_seconds.append(time.perf_counter() - start)
        return np.asarray(logits).reshape(-1)

    for token in prompt:
        logits = step(token)
    while True:
        out.logits.append(logits)
        out.append(int(np.argmax(logits)))
        if len(out) == steps:
            return out
        logits = step(out[-1])
