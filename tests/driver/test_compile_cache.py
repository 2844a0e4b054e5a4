"""The compile cache: a second identical compile loads the stored artifact; a changed weight, option, platform or
source file is a different key; a corrupt entry is reported and recompiled; ``--timings`` lists every pass."""
from __future__ import annotations

import importlib
import sys
import warnings

import numpy as np
import pytest
import torch

import hetflow
from hetflow import compile_cache
from hetflow.cli import main
from hetflow.examples.mlp import build
from hetflow.pipeline import PIPELINE
from hetflow.platform import load_platform


def compile_cached(module, inputs, cache_dir, **options):
    return hetflow.compile(module, inputs, cache=True, cache_dir=cache_dir, **options)


def test_second_compile_hits_and_gives_identical_outputs(tmp_path):
    module, inputs = build()
    first = compile_cached(module, inputs, tmp_path)
    second = compile_cached(module, inputs, tmp_path)
    assert first.cache.status == "miss (stored)" and second.cache.status == "hit"
    assert second.cache.key == first.cache.key
    assert second.pass_records == [] and "cache: load" in second.timings   # no pass ran
    assert torch.equal(first(*inputs), second(*inputs))
    assert "loaded from the compile cache" in second.report()


@pytest.mark.parametrize("change", ["weight", "option", "platform"])
def test_a_change_misses(tmp_path, change):
    module, inputs = build()
    options = {}
    first = compile_cached(module, inputs, tmp_path)
    if change == "weight":
        with torch.no_grad():
            module.fc2.weight[3, 5] += 1.0
    elif change == "option":
        options["placement"] = "optimal"
    else:
        options["platform"] = "mobile-soc"
    second = compile_cached(module, inputs, tmp_path, **options)
    assert second.cache.status == "miss (stored)" and second.cache.key != first.cache.key
    if change == "weight":
        assert torch.allclose(second(*inputs), module(*inputs), atol=1e-5)


def test_a_changed_input_shape_and_a_tied_weight_are_keyed(tmp_path):
    module, inputs = build()
    platform = load_platform("host")
    key = compile_cache.compile_key(module, inputs, platform, {})
    assert compile_cache.compile_key(module, (torch.randn(4, 64),), platform, {}) != key
    assert compile_cache.compile_key(module, (torch.randn(8, 64),), platform, {}) == key   # values are not read
    module.fc3.weight = module.fc3.weight  # (no change)
    assert compile_cache.compile_key(module, inputs, platform, {}) == key
    module.fc3.bias = torch.nn.Parameter(module.fc3.bias.detach().clone())  # equal values, a new tensor: same key
    assert compile_cache.compile_key(module, inputs, platform, {}) == key
    module.act.approximate = "tanh"   # a plain attribute forward reads
    assert compile_cache.compile_key(module, inputs, platform, {}) != key


def test_a_changed_source_file_changes_the_key(tmp_path, monkeypatch):
    source = tmp_path / "cache_probe_model.py"
    source.write_text("import torch\n\nclass Probe(torch.nn.Module):\n"
                      "    def __init__(self):\n        super().__init__()\n        self.fc = torch.nn.Linear(4, 4)\n\n"
                      "    def forward(self, x):\n        return self.fc(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    probe = importlib.import_module("cache_probe_model")
    try:
        module, inputs, platform = probe.Probe(), (torch.randn(2, 4),), load_platform("host")
        key = compile_cache.compile_key(module, inputs, platform, {})
        source.write_text(source.read_text().replace("return self.fc(x)", "return self.fc(x) * 2"))
        assert compile_cache.compile_key(module, inputs, platform, {}) != key
    finally:
        sys.modules.pop("cache_probe_model", None)


def test_an_attribute_without_a_stable_description_turns_the_cache_off(tmp_path):
    module, inputs = build()
    module.lock = object()   # its repr is its address: the key cannot say whether it changed
    compiled = compile_cached(module, inputs, tmp_path)
    assert compiled.cache.status.startswith("off: ") and "object" in compiled.cache.status
    assert torch.allclose(compiled(*inputs), module(*inputs), atol=1e-5)
    assert compile_cache.cache_usage(tmp_path) == (0, 0)


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file", ["artifact/graph.json", "artifact/weights.safetensors", "entry.json"])
def test_a_corrupt_entry_is_reported_and_recompiled(tmp_path, file):
    module, inputs = build()
    first = compile_cached(module, inputs, tmp_path)
    flip_last_byte(first.cache.directory / file)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        second = compile_cached(module, inputs, tmp_path)
    assert second.cache.status == "miss (stored)" and second.pass_records   # compiled afresh, not loaded
    assert torch.allclose(second(*inputs), module(*inputs), atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = compile_cached(module, inputs, tmp_path)   # the fresh entry is whole again
    assert third.cache.status == "hit"


def test_a_hit_takes_the_module_weights_and_saves_a_whole_artifact(tmp_path):
    from hetflow.runtime import load
    module, inputs = build()
    first = compile_cached(module, inputs, tmp_path / "cache")
    hit = compile_cached(module, inputs, tmp_path / "cache")
    tensors = [t.detach().numpy() for t in module.state_dict().values()]
    large = [w.data for w in hit.graph.weights.values() if w.data.size >= 64]   # the weights and their transposes
    assert large and all(any(np.shares_memory(w, t) for t in tensors) for w in large)
    first.save(tmp_path / "cold")
    hit.save(tmp_path / "warm")
    for name in ("manifest.json", "graph.json", "weights.safetensors"):   # the same bytes as a cold compile's
        assert (tmp_path / "warm" / name).read_bytes() == (tmp_path / "cold" / name).read_bytes()
    x = inputs[0].numpy()
    np.testing.assert_array_equal(load(tmp_path / "warm").run([x])[hit.graph.outputs[0].name], first(*inputs).numpy())


def test_a_tied_head_keeps_the_table_as_a_view_and_the_cache_does_not_store_it(tmp_path):
    """A tied LM head reads the embedding table transposed: the compile keeps it as a view of the module's table
    (a copy was 154 MB for GPT-2, 0.35 to 1.9 s of the compile, and the cache stored and rehashed it on every hit),
    a hit takes it from the module too, and an artifact saved from either holds the same bytes, which run."""
    from hetflow.examples.models import build_gpt2
    from hetflow.runtime import load
    module, inputs = build_gpt2(n_layer=1, n_embd=32, n_head=2, seq=8, vocab=4096)
    table = module.state_dict()["model.transformer.wte.weight"].numpy()
    cold = compile_cached(module, inputs, tmp_path / "cache")
    hit = compile_cached(module, inputs, tmp_path / "cache")
    assert hit.cache.status == "hit"
    for compiled in (cold, hit):
        tied = [w.data for w in compiled.graph.weights.values() if w.data.shape == table.T.shape]
        assert len(tied) == 1 and np.shares_memory(tied[0], table)
        np.testing.assert_array_equal(tied[0], table.T)
    stored = sum(f.stat().st_size for f in (tmp_path / "cache").rglob("*") if f.is_file())
    assert stored < table.nbytes     # the entry holds no copy of the table
    cold.save(tmp_path / "cold")
    hit.save(tmp_path / "warm")
    assert (tmp_path / "warm" / "weights.safetensors").read_bytes() == \
        (tmp_path / "cold" / "weights.safetensors").read_bytes()
    out = hit.graph.outputs[0].name
    np.testing.assert_allclose(load(tmp_path / "warm").run([inputs[0].numpy()])[out], module(*inputs).detach().numpy(),
                               rtol=1e-4, atol=1e-5)


def test_an_onnx_model_hits_and_a_cached_model_saves_a_loadable_artifact(tmp_path):
    from hetflow.runtime import load
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_cli import mlp_onnx
    mlp_onnx(tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    first = compile_cached(str(tmp_path / "m.onnx"), None, tmp_path / "cache")
    second = compile_cached(str(tmp_path / "m.onnx"), None, tmp_path / "cache")
    assert second.cache.status == "hit"
    second.save(tmp_path / "out")
    np.testing.assert_array_equal(load(tmp_path / "out").run({"x": x})["y"], first(x))


def test_timings_list_every_pass_of_the_pipeline(tmp_path, capsys):
    code = main(["compile", "hetflow.examples.mlp:build", "-o", str(tmp_path / "out"), "--timings", "--no-cache"])
    out = capsys.readouterr().out
    assert code == 0
    table = out[out.index("stage "):]
    for name in PIPELINE:
        assert f"pass {name} " in table and f"verify after {name} " in table
    for stage in ("capture: torch.export", "capture: decompositions", "capture: import", "plan check", "save"):
        assert stage in table
    assert "compile cache: off: cache=False" in table


def test_cli_cache_info_and_clear(tmp_path, capsys):
    module, inputs = build()
    compile_cached(module, inputs, tmp_path)
    assert main(["cache", "info", "--dir", str(tmp_path)]) == 0
    assert "1 entries" in capsys.readouterr().out
    assert main(["cache", "clear", "--dir", str(tmp_path)]) == 0
    assert compile_cache.cache_usage(tmp_path) == (0, 0)


def test_the_key_is_the_same_in_another_process(tmp_path):
    """Nothing process-local (string hashing's seed, addresses, import order) reaches the key: another Python
    process finds the entry (here a transformers GPT-2, whose GenerationConfig keeps a per-process hash)."""
    import os
    import subprocess
    code = ("import sys, warnings; warnings.filterwarnings('ignore')\n"
            "from hetflow import compile_cache\nfrom hetflow.examples.models import build_gpt2\n"
            "from hetflow.platform import load_platform\nmodule, inputs = build_gpt2()\n"
            "print(compile_cache.compile_key(module, inputs, load_platform('host'), {'placement': 'roofline'}))\n")
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"   # a seed other than this process's
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout.split()[-1]
    from hetflow.examples.models import build_gpt2
    module, inputs = build_gpt2()
    assert there == compile_cache.compile_key(module, inputs, load_platform("host"), {"placement": "roofline"})


def test_a_weight_changed_in_place_after_compile_is_refused_not_half_seen():
    """The compiled model references the module's weights: a change in place would reach only the weights no pass
    transformed, so the next call is refused naming the weight."""
    import torch
    import hetflow
    from hetflow.api import CompileError
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(2, 8)
    compiled = hetflow.compile(module, (x,), cache=False)
    torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        module[2].bias.add_(1.0)
    with pytest.raises(CompileError, match=r"2\.bias was changed in place"):
        compiled(x)
