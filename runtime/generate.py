"""Generation with a KV cache: prefill, then decode steps, greedy or sampled. Needs NumPy only, never torch.

Two kinds of artifacts are served.

``Generator`` (``hetflow.examples.gpt2_generate``): a prefill artifact (``input_ids`` int64[1, P], ``last``
int64[1] -> logits [1, 1, vocab] of token ``last``, kv [n_layer, 2, 1, n_head, P, head_dim]) runs the whole
prompt in one call, and a decode-step artifact (``input_ids`` int64[1, 1], ``position`` int64[1], then layer
i's keys and values as ``cache_{2i}``, ``cache_{2i+1}``, each [1, n_head, max_seq, head_dim] -> logits
[1, 1, vocab], new_kv [n_layer, 2, 1, n_head, 1, head_dim]) makes each token. The cache is one buffer
``kv[n_layer, 2, 1, n_head, max_seq, head_dim]`` allocated once: the step's cache inputs are views of it
(ONNX Runtime binds them by pointer, so the step reads the cache where it lies), the step masks the slots at
and after ``position`` itself, and each step writes only the new token's keys and values into slot
``position``: no copy of the cache per step.

The older decode-step artifact (``hetflow.examples.models.build_gpt2_decode``: ``k_cache`` and ``v_cache``
float32[n_layer, 1, n_head, context, head_dim], outputs logits, new_k, new_v) is fed the prompt one token per
step, its cache kept paged by ``KVCache`` (a list of fixed-size blocks per layer) and assembled into the
fixed-size tensors the step reads.

Tokens are chosen greedily (the argmax) or sampled (``temperature``, ``top_k``) with a seeded
``numpy.random.Generator``: the same seed gives the same tokens.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from hetflow.ir.errors import HetflowError

__all__ = ["DECODE_INPUTS", "GenerateError", "Generation", "Generator", "KVCache", "KVCacheFull", "TokenChooser",
           "generate"]

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

    @property
    def prefill_seconds(self) -> float:
        """Wall time from the first prompt token in to the first generated token's logits."""
        return sum(self.step_seconds[:self.prefill_steps])

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second of the decode steps alone (the first token comes from the prefill); 0 when
        fewer than two tokens were generated."""
        seconds = sum(self.decode_seconds)
        return len(self.decode_seconds) / seconds if seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of the whole call, prefill included."""
        seconds = sum(self.step_seconds)
        return len(self) / seconds if seconds > 0 else 0.0


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


class TokenChooser:
    """Picks the next token from a step's logits: the argmax, or with ``sample`` a draw from
    softmax(logits / temperature) over the ``top_k`` largest logits (all when None), by a
    ``numpy.random.Generator`` seeded with ``seed`` (so a seed gives the same tokens every time)."""

    def __init__(self, sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 seed: int | None = None):
        if sample and not float(temperature) > 0:
            raise GenerateError(f"sampling needs a temperature > 0, got {temperature}")
        if top_k is not None and int(top_k) < 1:
            raise GenerateError(f"top_k must be >= 1, got {top_k}")
        if not sample and (top_k is not None or float(temperature) != 1.0):
            raise GenerateError("temperature and top_k choose how tokens are sampled: give sample=True too")
        self.sample, self.temperature = bool(sample), float(temperature)
        self.top_k = None if top_k is None else int(top_k)
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits).reshape(-1)
        if not self.sample:
            return int(np.argmax(logits))
        candidates = np.arange(logits.size)
        if self.top_k is not None and self.top_k < logits.size:
            candidates = np.argpartition(logits, -self.top_k)[-self.top_k:]
        scaled = logits[candidates].astype(np.float64) / self.temperature
        weights = np.exp(scaled - scaled.max())
        return int(candidates[self.rng.choice(candidates.size, p=weights / weights.sum())])


def _cache_inputs(names: list[str]) -> list[str]:
    """The decode step's cache inputs in layer order (``cache_0``, ``cache_1``, ...)."""
    cache = {n for n in names if n.startswith("cache_")}
    expected = [f"cache_{j}" for j in range(len(cache))]
    if not cache or cache != set(expected):
        raise GenerateError(f"not a decode-step artifact: its cache inputs must be cache_0 .. cache_<2n-1> "
                            f"(layer i's keys cache_<2i>, values cache_<2i+1>); its inputs are {names}")
    if len(cache) % 2:
        raise GenerateError(f"decode step: {len(cache)} cache inputs, expected two per layer (keys, values)")
    return expected


def _static_type(model, name: str, what: str):
    """The type of input ``name``; raises GenerateError when the artifact lacks it or it is not static."""
    types = {v.name: v.type for v in model.graph.inputs}
    if name not in types:
        raise GenerateError(f"not a {what} artifact: no input {name!r}; its inputs are {list(types)}")
    t = types[name]
    if t is None or not t.is_static:
        raise GenerateError(f"{what} input {name!r} must have a static type, got {t}")
    return t


class Generator:
    """Prefill, then decode steps, over one preallocated KV buffer that each step reads in place.

    ``decode``: a loaded decode-step artifact (see the module's docstring); ``prefill``: a loaded prefill
    artifact of the same model, or None to feed the prompt one decode step per token. ``kv`` is the cache
    buffer ``[n_layer, 2, 1, n_head, max_seq, head_dim]``, allocated here once and kept across calls; the
    step's cache inputs are views of it.
    """

    def __init__(self, decode, prefill=None):
        names = [v.name for v in decode.graph.inputs]
        cache = _cache_inputs(names)
        ids_type = _static_type(decode, "input_ids", "decode-step")
        pos_type = _static_type(decode, "position", "decode-step")
        layer = _static_type(decode, cache[0], "decode-step")
        if len(layer.shape) != 4 or layer.shape[0] != 1:
            raise GenerateError(f"decode step: {cache[0]} must be [1, n_head, max_seq, head_dim], got {layer}")
        for name in cache[1:]:
            if _static_type(decode, name, "decode-step") != layer:
                raise GenerateError(f"decode step: {name} must have {cache[0]}'s type {layer}")
        outputs = [v.name for v in decode.graph.outputs]
        if len(outputs) != 2:
            raise GenerateError(f"decode step: {len(outputs)} output(s) {outputs}, expected 2 (logits, new_kv)")
        _, n_head, max_seq, head_dim = (int(d) for d in layer.shape)
        self.n_layer, self.n_head, self.max_seq, self.head_dim = len(cache) // 2, n_head, max_seq, head_dim
        self.decode, self.prefill = decode, prefill
        self.logits_name, self.new_kv_name = outputs
        self.kv = np.zeros((self.n_layer, 2, 1, n_head, max_seq, head_dim), layer.dtype.numpy)
        self._ids = np.zeros((1, 1), ids_type.dtype.numpy)
        self._position = np.zeros((1,), pos_type.dtype.numpy)
        self._feeds = {"input_ids": self._ids, "position": self._position}
        for j, name in enumerate(cache):   # views of the one buffer: read where they lie, never copied
            self._feeds[name] = self.kv[j // 2, j % 2]
        self.prompt_len = self._check_prefill(prefill) if prefill is not None else 0

    @classmethod
    def load(cls, path, **load_options) -> "Generator":
        """``path/decode`` and, when present, ``path/prefill`` (``hetflow.runtime.load`` options pass on).

        The prefill's idle threads sleep when its call returns (``spin="call"``, unless ``spin`` is given):
        spinning on, they took a core from the first decode steps (54 ms against 28 for the first)."""
        from hetflow.runtime import load
        path = Path(path)
        if not (path / "decode").is_dir():
            raise GenerateError(f"{path}: no decode/ artifact (a generator directory holds decode/ and "
                                f"optionally prefill/)")
        prefill_options = {"spin": "call", **load_options}
        prefill = load(path / "prefill", **prefill_options) if (path / "prefill").is_dir() else None
        return cls(load(path / "decode", **load_options), prefill)

    def _check_prefill(self, prefill) -> int:
        """The prefill's prompt length P; raises GenerateError when it does not fill the decode step's cache."""
        ids = _static_type(prefill, "input_ids", "prefill")
        _static_type(prefill, "last", "prefill")
        outputs = list(prefill.graph.outputs)
        if len(ids.shape) != 2 or ids.shape[0] != 1 or len(outputs) != 2:
            raise GenerateError(f"prefill: expected input_ids [1, P] and 2 outputs (logits, kv), got input_ids "
                                f"{ids} and {len(outputs)} output(s)")
        prompt_len = int(ids.shape[1])
        kv = outputs[1].type
        expected = (self.n_layer, 2, 1, self.n_head, prompt_len, self.head_dim)
        if kv is None or tuple(kv.shape or ()) != expected:
            raise GenerateError(f"prefill output {outputs[1].name!r} is {kv}, expected {list(expected)} to fill "
                                f"the decode step's cache")
        if prompt_len > self.max_seq:
            raise GenerateError(f"prefill takes {prompt_len} tokens, more than the decode step's max_seq "
                                f"{self.max_seq}")
        return prompt_len

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, *, sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, seed: int | None = None) -> Generation:
        """``max_new_tokens`` tokens after ``prompt_ids``: the prompt through the prefill (its first
        ``prompt_len`` tokens in one call, padded on the right when shorter; any more by decode steps), then
        one decode step per token. Greedy unless ``sample``. Returns a ``Generation``; its ``step_seconds``
        are the prefill call and prompt steps (``prefill_steps`` of them), then each decode step."""
        prompt = [int(t) for t in prompt_ids]
        count = int(max_new_tokens)
        choose = TokenChooser(sample, temperature, top_k, seed)
        if not prompt:
            raise GenerateError("generate needs a prompt of at least one token")
        if count < 0:
            raise GenerateError(f"max_new_tokens must be >= 0, got {count}")
        if len(prompt) > self.max_seq:
            raise KVCacheFull(f"the prompt has {len(prompt)} tokens, more than the KV cache's "
                              f"max_seq={self.max_seq}")
        if count and len(prompt) + count - 1 > self.max_seq:
            raise KVCacheFull(f"KV cache full: a prompt of {len(prompt)} token(s) plus {count} generated needs "
                              f"{len(prompt) + count - 1} cached tokens, more than max_seq={self.max_seq}")
        out = Generation()
        if count == 0:
            return out
        logits = self._prefill(prompt, out)
        while True:
            out.logits.append(logits)
            out.append(choose(logits))
            if len(out) == count:
                return out
            start = time.perf_counter()
            logits = self.step(out[-1], len(prompt) + len(out) - 1)
            out.step_seconds.append(time.perf_counter() - start)

    def _prefill(self, prompt: list[int], out: Generation) -> np.ndarray:
        """Fills cache slots [0, len(prompt)) and returns the last prompt token's logits."""
        done = 0
        if self.prefill is not None:
            start = time.perf_counter()
            done = min(len(prompt), self.prompt_len)
            ids = np.zeros((1, self.prompt_len), self._ids.dtype)
            ids[0, :done] = prompt[:done]                 # padded on the right: causal attention never sees it
            logits, kv = self.prefill.run({"input_ids": ids, "last": np.array([done - 1], np.int64)}).values()
            self.kv[:, :, :, :, :done] = kv[:, :, :, :, :done]
            logits = np.array(logits).reshape(-1)
            out.step_seconds.append(time.perf_counter() - start)
        for position in range(done, len(prompt)):
            start = time.perf_counter()
            logits = self.step(prompt[position], position)
            out.step_seconds.append(time.perf_counter() - start)
        out.prefill_steps = len(out.step_seconds)
        return logits

    def step(self, token: int, position: int) -> np.ndarray:
        """One decode step at ``position``: reads the cache in place, writes the new token's slot only."""
        self._ids[0, 0] = token
        self._position[0] = position
        results = self.decode.run(self._feeds)
        self.kv[:, :, :, :, position] = results[self.new_kv_name][:, :, :, :, 0]
        return results[self.logits_name].reshape(-1)


def generate(model, prompt_ids: Sequence[int], steps: int, max_seq: int | None = None, block: int = 16, *,
             prefill=None, sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             seed: int | None = None) -> Generation:
    """``steps`` new tokens after ``prompt_ids`` with a loaded decode-step artifact (``hetflow.runtime.load``).

    A ``Generator`` decode step (cache inputs ``cache_<j>``) runs with ``prefill`` (its prefill artifact, or
    None for a prompt fed by decode steps) over one in-place cache buffer; ``max_seq``, when given, bounds
    the cached tokens below its cache's. An older one (``k_cache``, ``v_cache``) is fed the prompt one token
    per step, its cache paged in blocks of ``block`` tokens up to ``max_seq`` (default: the context of
    ``k_cache``). Greedy unless ``sample`` (``temperature``, ``top_k``, ``seed``). The request needs
    ``len(prompt_ids) + steps - 1`` cached tokens. Returns the generated ids as a ``Generation`` (a list
    carrying per-step latencies and the logits).
    """
    names = [v.name for v in model.graph.inputs]
    if "k_cache" in names or not any(n.startswith("cache_") for n in names):
        if prefill is not None:
            raise GenerateError("prefill= needs a Generator decode step (inputs cache_0, cache_1, ...); this "
                                "artifact is fed the prompt one token per step")
        return _generate_paged(model, prompt_ids, steps, max_seq, block,
                               TokenChooser(sample, temperature, top_k, seed))
    generator = Generator(model, prefill)
    if max_seq is not None and int(max_seq) > generator.max_seq:
        raise GenerateError(f"max_seq {max_seq} exceeds the artifact's KV cache context {generator.max_seq}")
    needed = len(prompt_ids) + int(steps) - 1
    if max_seq is not None and int(steps) and needed > int(max_seq):
        raise KVCacheFull(f"KV cache full: a prompt of {len(prompt_ids)} token(s) plus {steps} generated needs "
                          f"{needed} cached tokens, more than max_seq={max_seq}")
    return generator.generate(prompt_ids, steps, sample=sample, temperature=temperature, top_k=top_k, seed=seed)


def _generate_paged(model, prompt_ids: Sequence[int], steps: int, max_seq: int | None, block: int,
                    choose: TokenChooser) -> Generation:
    """The older decode step (``k_cache``, ``v_cache``): the prompt one token per step, then ``steps`` tokens,
    the cache paged by ``KVCache`` up to ``max_seq`` (default: the context of ``k_cache``)."""
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
        out.append(choose(logits))
        if len(out) == steps:
            return out
        logits = step(out[-1])
