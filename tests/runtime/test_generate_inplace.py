"""Generation with a prefill graph and a decode step that reads the KV cache in place (``Generator``): the
tokens and logits equal transformers' own, sampling is reproducible, only slot ``position`` is written."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import hetflow.runtime
from hetflow.cli import main
from hetflow.examples.gpt2_generate import compile_generator
from hetflow.runtime.errors import RunnerError
from hetflow.runtime.generate import GenerateError, Generation, Generator, KVCacheFull, TokenChooser, generate

PROMPT_LEN, MAX_SEQ, VOCAB = 8, 32, 100


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(generator directory, the GPT2LMHeadModel both graphs were built from)."""
    path = tmp_path_factory.mktemp("gpt2_generate")
    model = compile_generator(path, n_layer=2, n_embd=64, n_head=2, vocab=VOCAB, prompt_len=PROMPT_LEN,
                              max_seq=MAX_SEQ)
    model.generation_config.eos_token_id = None    # transformers would stop at token 0
    return path, model


@pytest.fixture(scope="module")
def generator(compiled):
    return Generator.load(compiled[0])


def prompt_of(length: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, length).tolist()


def transformers_greedy(model, prompt: list[int], count: int) -> tuple[list[int], list[np.ndarray]]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, do_sample=False,
                             use_cache=True, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), [step[0].numpy() for step in out.logits]


def assert_logits_close(got, expected, what: str):
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected)):
        scale = max(1.0, float(np.abs(b).max()))
        assert float(np.abs(a - b).max()) / scale < 1e-4, f"{what}: logits differ at step {step}"


@pytest.mark.parametrize("length", [5, PROMPT_LEN, 11], ids=["shorter-than-prefill", "prefill", "longer"])
def test_greedy_equals_transformers_generate(compiled, generator, length):
    _, model = compiled
    prompt = prompt_of(length, seed=length)
    got = generator.generate(prompt, 12)
    tokens, logits = transformers_greedy(model, prompt, 12)
    assert isinstance(got, Generation) and list(got) == tokens
    assert_logits_close(got.logits, logits, f"prompt of {length}")
    # one prefill call, then the prompt tokens past the prefill's length one step each, then a step per token
    assert got.prefill_steps == 1 + max(0, length - PROMPT_LEN)
    assert len(got.decode_seconds) == 11 and got.prefill_seconds > 0 and got.decode_tokens_per_second > 0


def test_sampled_tokens_read_the_right_cache(compiled, generator):
    """Sampled tokens are varied (greedy ones of a random model repeat): each step's logits equal
    transformers' on the whole sequence so far, which holds only if every earlier slot was written right."""
    _, model = compiled
    prompt = prompt_of(6, seed=1)
    got = generator.generate(prompt, 20, sample=True, temperature=3.0, seed=0)
    assert len(set(got)) > 5
    with torch.no_grad():
        full = model(torch.tensor([prompt + list(got)]), use_cache=False).logits[0].numpy()
    assert_logits_close(got.logits, full[len(prompt) - 1:-1], "sampled sequence")


def test_sampling_reproducible_with_a_seed(generator):
    prompt = prompt_of(4)
    first = generator.generate(prompt, 12, sample=True, temperature=2.0, seed=7)
    assert list(first) == list(generator.generate(prompt, 12, sample=True, temperature=2.0, seed=7))
    assert list(first) != list(generator.generate(prompt, 12, sample=True, temperature=2.0, seed=8))
    assert list(generator.generate(prompt, 8, sample=True, top_k=1, seed=3)) == list(generator.generate(prompt, 8))
    top3 = generator.generate(prompt, 12, sample=True, temperature=5.0, top_k=3, seed=1)
    for token, logits in zip(top3, top3.logits):
        assert token in np.argsort(logits)[-3:]


def test_token_chooser_draws_from_the_softmax():
    logits = np.array([0.0, np.log(3.0), -np.inf], np.float32)       # probabilities 1/4, 3/4, 0
    choose = TokenChooser(sample=True, seed=0)
    draws = np.array([choose(logits) for _ in range(4000)])
    assert set(draws) <= {0, 1} and abs((draws == 1).mean() - 0.75) < 0.03
    cold = TokenChooser(sample=True, temperature=0.05, seed=0)           # nearly greedy
    assert all(cold(logits) == 1 for _ in range(50))
    assert TokenChooser()(np.array([0.1, 0.7, 0.2])) == 1


def test_cache_written_in_place(generator):
    kv = generator.kv
    assert kv.shape == (2, 2, 1, 2, MAX_SEQ, 32)
    assert all(np.shares_memory(generator._feeds[f"cache_{j}"], kv) for j in range(4))
    kv[...] = 0
    prompt = prompt_of(5)
    got = generator.generate(prompt, 6)
    assert generator.kv is kv
    filled = len(prompt) + len(got) - 1                      # the last token is chosen, never fed back
    assert all(kv[:, :, :, :, slot].any() for slot in range(filled))
    assert not kv[:, :, :, :, filled:].any()
    before = kv.copy()
    generator.step(got[-1], filled)                          # one more step: slot ``filled`` and nothing else
    changed = np.argwhere((kv != before).any(axis=(0, 1, 2, 3, 5))).ravel().tolist()
    assert changed == [filled] and generator.kv is kv


def test_decode_step_binds_the_cache_without_a_copy(generator, monkeypatch):
    """What the ONNX Runtime partition is handed for each cache input is memory of the one buffer: through the
    lean call path (a one-partition step), each cache input bound by pointer, or, when it is no larger than
    ``STAGE_BYTES``, copied into a buffer bound once (cheaper than binding a pointer at that size); through the
    executor, the runner handed the buffer's own memory."""
    from hetflow.runtime.prebound import STAGE_BYTES
    lean = generator.decode.executor.lean
    if lean is not None:
        generator.step(3, 4)
        slots = {name: (slot, staged) for slot, (_, name, staged) in enumerate(lean.inputs) if name.startswith("cache_")}
        assert sorted(slots) == [f"cache_{j}" for j in range(4)]
        for name, (slot, staged) in slots.items():
            j = int(name.split("_")[1])
            view = generator.kv[j // 2, j % 2]
            if staged is None:
                assert lean.bound[slot].ctypes.data == view.ctypes.data
            else:
                assert view.nbytes <= STAGE_BYTES
        return
    runners = generator.decode.executor.runners
    seen = []
    for runner in runners:
        def spy(inputs, outputs, run=runner.run):
            seen.append({n: a for n, a in inputs.items() if n.startswith("cache_")})
            return run(inputs, outputs)
        monkeypatch.setattr(runner, "run", spy)
    generator.step(3, 4)
    handed = {n: a for call in seen for n, a in call.items()}
    assert sorted(handed) == [f"cache_{j}" for j in range(4)]
    for j in range(4):
        assert handed[f"cache_{j}"].ctypes.data == generator.kv[j // 2, j % 2].ctypes.data


def test_load_with_a_thread_count(compiled):
    one = Generator.load(compiled[0], threads=1)
    sessions = [r.session for m in (one.decode, one.prefill) for r in m.executor.runners]
    assert sessions and all(s.get_session_options().intra_op_num_threads == 1 for s in sessions)


def spin_settings(model) -> list[dict[str, str]]:
    """Each CPU session's spinning settings (the ONNX Runtime config entries hetflow sets, when set)."""
    settings = []
    for runner in model.executor.runners:
        options = runner.session.get_session_options()
        found = {}
        for key in ("session.intra_op.allow_spinning", "session.force_spinning_stop"):
            try:
                found[key] = options.get_session_config_entry(key)
            except RuntimeError:   # not set: ONNX Runtime's default (spin, and on after a call)
                pass
        settings.append(found)
    return settings


def test_prefill_threads_sleep_when_its_call_returns(compiled, generator):
    """The prefill's idle threads stop spinning when its call returns: the decode steps come next, and a
    thread spinning on took a core from them. The decode step's spin between steps, which are back to back.
    An explicit ``spin`` reaches both; an unknown one is refused."""
    assert spin_settings(generator.prefill) == [{"session.force_spinning_stop": "1"}]
    assert spin_settings(generator.decode) == [{}]
    quiet = Generator.load(compiled[0], spin=False)
    for model in (quiet.prefill, quiet.decode):
        assert spin_settings(model) == [{"session.intra_op.allow_spinning": "0"}]
    assert quiet.generate(prompt_of(5), 4) == generator.generate(prompt_of(5), 4)
    with pytest.raises(RunnerError, match="spin must be one of None, True, False, 'call', got 'sometimes'"):
        hetflow.runtime.load(compiled[0] / "decode", spin="sometimes")


def test_prompt_by_decode_steps_equals_prefill(compiled, generator):
    decode_only = Generator(hetflow.runtime.load(compiled[0] / "decode"))
    assert decode_only.prefill is None and decode_only.prompt_len == 0
    prompt = prompt_of(7, seed=3)
    by_steps, by_prefill = decode_only.generate(prompt, 8), generator.generate(prompt, 8)
    assert list(by_steps) == list(by_prefill) and by_steps.prefill_steps == 7
    assert_logits_close(by_steps.logits, by_prefill.logits, "prompt by decode steps")
    through_function = generate(decode_only.decode, prompt, 8, prefill=generator.prefill, sample=True, seed=2)
    assert list(through_function) == list(generator.generate(prompt, 8, sample=True, seed=2))


def test_generate_errors(generator):
    with pytest.raises(KVCacheFull, match=f"the prompt has {MAX_SEQ + 1} tokens, more than the KV cache's "
                                          f"max_seq={MAX_SEQ}"):
        generator.generate(prompt_of(MAX_SEQ + 1), 1)
    with pytest.raises(KVCacheFull, match=f"needs {MAX_SEQ + 1} cached tokens, more than max_seq={MAX_SEQ}"):
        generator.generate(prompt_of(10), MAX_SEQ - 8)
    assert len(generator.generate(prompt_of(10), MAX_SEQ - 9)) == MAX_SEQ - 9      # exactly full
    assert generator.generate(prompt_of(3), 0) == []
    with pytest.raises(GenerateError, match="at least one token"):
        generator.generate([], 3)
    with pytest.raises(GenerateError, match="give sample=True too"):
        generator.generate(prompt_of(3), 2, temperature=0.5)
    with pytest.raises(GenerateError, match="top_k must be >= 1"):
        generator.generate(prompt_of(3), 2, sample=True, top_k=0)
    with pytest.raises(GenerateError, match="temperature > 0"):
        generator.generate(prompt_of(3), 2, sample=True, temperature=0)
    with pytest.raises(GenerateError, match="max_seq 40 exceeds the artifact's KV cache context 32"):
        generate(generator.decode, prompt_of(3), 2, max_seq=40)


def test_generator_rejects_other_artifacts(tmp_path, generator):
    def fake(*names):
        inputs = [SimpleNamespace(name=n, type=None) for n in names]
        return SimpleNamespace(graph=SimpleNamespace(inputs=inputs, outputs=[]))
    with pytest.raises(GenerateError, match="cache inputs must be cache_0 .. cache_<2n-1>"):
        Generator(fake("input_ids", "position", "cache_0", "cache_2"))
    with pytest.raises(GenerateError, match="expected two per layer"):
        Generator(fake("input_ids", "position", "cache_0"))
    with pytest.raises(GenerateError, match="decode-step input 'input_ids' must have a static type, got None"):
        Generator(fake("input_ids", "position", "cache_0", "cache_1"))
    with pytest.raises(GenerateError, match="not a prefill artifact: no input 'input_ids'"):
        Generator(generator.decode, prefill=fake("tokens", "last"))
    with pytest.raises(GenerateError, match="no decode/ artifact"):
        Generator.load(tmp_path)


def test_cli_generate(compiled, generator, capsys):
    path, _ = compiled
    prompt = prompt_of(5)
    assert main(["run", str(path), "--generate", "6", "--prompt", ",".join(map(str, prompt))]) == 0
    out = capsys.readouterr().out
    assert f"generated (greedy) {list(generator.generate(prompt, 6))}" in out
    assert "one prefill call of 8 tokens" in out and "tokens/s" in out and "written in place" in out
    assert main(["run", str(path), "--generate", "6", "--prompt", ",".join(map(str, prompt)), "--sample",
                 "--temperature", "2", "--top-k", "10", "--seed", "5"]) == 0
    sampled = generator.generate(prompt, 6, sample=True, temperature=2.0, top_k=10, seed=5)
    assert f"generated (sampled) {list(sampled)}" in capsys.readouterr().out
    assert main(["run", str(path), "--generate", "40", "--prompt", "1,2"]) == 1
    assert "KV cache full" in capsys.readouterr().err
    assert main(["run", str(path / "decode"), "--seed", "3"]) != 0
    assert "give --generate N too" in capsys.readouterr().err
