"""Decode with a KV cache: the compiled GPT-2 decode step, token by token, equals transformers' greedy decoding."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import hetflow
from hetflow.examples.models import build_gpt2_decode
from hetflow.ir.errors import HetflowError
from hetflow.runtime.generate import GenerateError, Generation, KVCache, KVCacheFull, generate

PROMPT = [5, 17, 42, 8]
STEPS = 8


@pytest.fixture(scope="module")
def decode(tmp_path_factory):
    """(loaded artifact, the original GPT2LMHeadModel) for the default small decode step."""
    module, inputs = build_gpt2_decode()
    compiled = hetflow.compile(module, inputs, platform="host")
    path = tmp_path_factory.mktemp("gpt2_decode")
    compiled.save(path)
    return hetflow.runtime.load(path), module.model


def reference_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding with the transformers model on the full prefix every step (no cache)."""
    ids, tokens, logits = list(prompt), [], []
    with torch.no_grad():
        for _ in range(steps):
            last = model(torch.tensor([ids]), use_cache=False).logits[0, -1].numpy()
            logits.append(last)
            tokens.append(int(np.argmax(last)))
            ids.append(tokens[-1])
    return tokens, logits


def test_decode_artifact_signature(decode):
    loaded, _ = decode
    assert loaded.input_names == ["input_ids", "position", "k_cache", "v_cache"]
    assert len(loaded.output_names) == 3


def test_generate_equals_transformers_greedy(decode):
    loaded, model = decode
    got = generate(loaded, PROMPT, STEPS)
    expected, expected_logits = reference_greedy(model, PROMPT, STEPS)
    assert isinstance(got, Generation) and list(got) == expected
    assert len(got.step_seconds) == len(PROMPT) + STEPS - 1 and got.prefill_steps == len(PROMPT)
    assert all(s > 0 for s in got.step_seconds) and len(got.decode_seconds) == STEPS - 1
    for step, (a, b) in enumerate(zip(got.logits, expected_logits)):
        scale = max(1.0, float(np.abs(b).max()))
        assert float(np.abs(a - b).max()) / scale < 1e-4, f"logits differ at step {step}"


def test_generate_max_seq(decode):
    loaded, _ = decode
    with pytest.raises(KVCacheFull, match="max_seq=6"):
        generate(loaded, PROMPT, STEPS, max_seq=6)       # needs 4 + 8 - 1 = 11 cached tokens
    assert generate(loaded, PROMPT, 3, max_seq=6) == generate(loaded, PROMPT, 3)   # 6 tokens fit exactly
    with pytest.raises(GenerateError, match="exceeds the artifact's KV cache context 128"):
        generate(loaded, PROMPT, STEPS, max_seq=129)
    assert generate(loaded, PROMPT, 0) == []


def test_generate_rejects_a_non_decode_artifact():
    graph = SimpleNamespace(inputs=[SimpleNamespace(name="input_ids", type=None), SimpleNamespace(name="x", type=None)],
                            outputs=[])
    with pytest.raises(HetflowError, match="missing input\\(s\\) position, k_cache, v_cache"):
        generate(SimpleNamespace(graph=graph), PROMPT, 2)


def test_kv_cache_paged():
    rng = np.random.default_rng(0)
    cache = KVCache(n_layer=2, n_head=3, head_dim=4, max_seq=10, block=4, context=12)
    ks = rng.standard_normal((2, 1, 3, 10, 4)).astype(np.float32)
    vs = rng.standard_normal((2, 1, 3, 10, 4)).astype(np.float32)
    cache.append(ks[:, :, :, :3], vs[:, :, :, :3])          # several tokens at once
    assert cache.length == 3 and cache.blocks == 1
    k, v = cache.view()
    np.testing.assert_array_equal(k[:, :, :, :3], ks[:, :, :, :3])
    assert not k[:, :, :, 3:].any() and not v[:, :, :, 3:].any()
    for t in range(3, 10):                                   # one at a time, crossing block boundaries
        cache.append(ks[:, :, :, t:t + 1], vs[:, :, :, t:t + 1])
        if t == 4:
            assert cache.blocks == 2
    assert cache.length == 10 and cache.blocks == 3
    k, v = cache.view()
    assert k.shape == (2, 1, 3, 12, 4)
    np.testing.assert_array_equal(k[:, :, :, :10], ks)
    np.testing.assert_array_equal(v[:, :, :, :10], vs)
    assert not k[:, :, :, 10:].any() and not v[:, :, :, 10:].any()
    with pytest.raises(KVCacheFull, match="exceed max_seq=10"):
        cache.append(ks[:, :, :, :1], vs[:, :, :, :1])
    with pytest.raises(GenerateError, match="new_k has shape"):
        KVCache(2, 3, 4, 10).append(np.zeros((2, 1, 3, 1, 5)), np.zeros((2, 1, 3, 1, 5)))
    cache.reset()
    assert cache.length == 0 and cache.blocks == 0 and not cache.view()[0].any()


def test_generate_module_does_not_import_torch():
    code = "import sys, hetflow.runtime.generate; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
