"""decode_attention: canonicalize's attention-over-cache rule, the op's reference kernel, its lowering to ONNX
Runtime's GroupQueryAttention over the cache in place, and the runner that keeps the caller's cache unchanged."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import hetflow
from hetflow.backends.cpu import lower_partition
from hetflow.examples.gpt2_generate import build_decode
from hetflow.frontends.torch import capture_module
from hetflow.ir.interpreter import Interpreter
from hetflow.ir.ops import DECODE_ATTENTION_OP, DecodeAttentionError
from hetflow.ir.program import INPLACE_OUTPUTS
from hetflow.pipeline import run_pipeline
from hetflow.runtime import load
from hetflow.runtime.errors import RunnerError

HEADS, HEAD_DIM, SLOTS = 2, 32, 128   # a cache of 32 KiB: bound by pointer on the lean path (not staged)
CACHES = [f"cache_{j}" for j in range(4)]


@pytest.fixture(scope="module")
def decode():
    """(the 2-layer GPT2DecodeStep module, its example inputs)."""
    return build_decode(n_layer=2, n_embd=HEADS * HEAD_DIM, n_head=HEADS, vocab=100, max_seq=SLOTS)


@pytest.fixture(scope="module")
def artifact(decode, tmp_path_factory):
    module, inputs = decode
    path = tmp_path_factory.mktemp("decode_attention")
    hetflow.compile(module, inputs, platform="host").save(path)
    return path


def feeds_at(position: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": np.array([[7]]), "position": np.array([position])}
    for name in CACHES:
        feeds[name] = rng.standard_normal((1, HEADS, SLOTS, HEAD_DIM), dtype=np.float32)
    return feeds


def torch_step(module, feeds) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["position"]),
                     *[torch.from_numpy(feeds[n].copy()) for n in CACHES])
    return [t.numpy() for t in out]


def assert_close(got, expected, tol=1e-5):
    got = list(got)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert np.asarray(a).shape == b.shape
        assert float(np.abs(np.asarray(a) - b).max()) < tol * max(1.0, float(np.abs(b).max()))


def canonical(module, inputs):
    graph = capture_module(module, inputs).graph
    return run_pipeline(graph, ["canonicalize"], verify_each=True)[0]


def test_the_rule_makes_one_node_per_layer_and_keeps_the_results(decode):
    module, inputs = decode
    graph = canonical(module, inputs)
    counts = graph.op_counts()
    assert counts.get(DECODE_ATTENTION_OP) == 2
    assert "Softmax" not in counts and "Where" not in counts and "Less" not in counts
    node = next(n for n in graph.nodes if n.op == DECODE_ATTENTION_OP)
    assert node.attrs["scale"] == pytest.approx(HEAD_DIM ** -0.5)
    # the layout round trip the rule adds cancels against the model's own: q, k and v come from the Split
    assert {v.producer.op for v in node.inputs[:3]} == {"Split"}
    interpreter = Interpreter(graph)
    for position in (0, 5, SLOTS - 1):
        feeds = feeds_at(position)
        assert_close(interpreter.run(feeds), torch_step(module, feeds))


class _Attention(torch.nn.Module):
    """One head group's decode attention, written as GPT2DecodeStep writes it, with knobs that break the form."""

    def __init__(self, masked: float = -1e9, cache_read_elsewhere: bool = False):
        super().__init__()
        self.masked, self.elsewhere = masked, cache_read_elsewhere
        self.register_buffer("slots", torch.arange(SLOTS), persistent=False)

    def forward(self, q, k, v, keys, values, position):
        scale = HEAD_DIM ** -0.5
        written = (self.slots < position).reshape(1, 1, 1, -1)
        cached = torch.matmul(q, keys.transpose(-1, -2)) * scale
        cached = torch.where(written, cached, torch.full_like(cached, self.masked))
        own = (q * k).sum(-1, keepdim=True) * scale
        probs = torch.softmax(torch.cat([cached, own], dim=-1), dim=-1)
        out = torch.matmul(probs[..., :-1], values) + probs[..., -1:] * v
        out = out * 2.0   # the attention's result is not the graph's output (the rule keeps output names)
        return (out, keys.sum()) if self.elsewhere else out


def _attention_inputs(position: int = 5):
    torch.manual_seed(0)
    token = [torch.randn(1, HEADS, 1, HEAD_DIM) for _ in range(3)]
    cache = [torch.randn(1, HEADS, SLOTS, HEAD_DIM) for _ in range(2)]
    return tuple(token + cache + [torch.tensor([position])])


@pytest.mark.parametrize("module, fires", [
    (_Attention(), True),
    (_Attention(masked=-10.0), False),                     # a masked slot would keep a weight
    (_Attention(cache_read_elsewhere=True), False),        # another op reads the cache
], ids=["the-form", "mask-not-large", "cache-read-elsewhere"])
def test_the_rule_fires_only_on_the_exact_form(module, fires):
    inputs = _attention_inputs()
    graph = canonical(module, inputs)
    assert (DECODE_ATTENTION_OP in graph.op_counts()) == fires
    with torch.no_grad():
        expected = module(*inputs)
    expected = [t.numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
    assert_close(Interpreter(graph).run({v.name: t.numpy() for v, t in zip(graph.inputs, inputs)}), expected)


def test_the_kernel_refuses_a_position_outside_the_cache(decode):
    module, inputs = decode
    interpreter = Interpreter(canonical(module, inputs))
    for position in (SLOTS, -1):
        with pytest.raises(Exception, match=rf"decode_attention.*position {position} is outside the cache's "
                                            rf"{SLOTS} slots") as info:
            interpreter.run(feeds_at(position))
        assert isinstance(info.value, DecodeAttentionError) or isinstance(info.value.__cause__, DecodeAttentionError)


def test_the_artifact_runs_group_query_attention_in_place(artifact):
    model = onnx.load(str(next((artifact / "cpu").glob("*.onnx"))), load_external_data=False)
    assert [n.op_type for n in model.graph.node if n.domain == "com.microsoft"] == ["GroupQueryAttention"] * 2
    inplace = json.loads(next(p.value for p in model.metadata_props if p.key == INPLACE_OUTPUTS))
    assert sorted(e["input"] for e in inplace.values()) == CACHES
    assert {e["position"] for e in inplace.values()} == {"position"}
    assert [o.name for o in model.graph.output][2:] == list(inplace)


@pytest.mark.parametrize("path", ["lean", "checked"])
def test_the_artifact_equals_torch_and_leaves_the_callers_cache_as_it_was(decode, artifact, path):
    module, _ = decode
    loaded = load(artifact)
    if path == "checked":
        loaded.executor.lean = None
    else:   # the lean path binds each cache by pointer (a cache this size is not staged in a buffer of its own)
        assert [staged for _, name, staged in loaded.executor.lean.inputs if name in CACHES] == [None] * 4
    for step, position in enumerate((0, 5, SLOTS - 1, 3)):
        feeds = feeds_at(position, seed=step)
        before = {n: feeds[n].copy() for n in CACHES}
        assert_close(loaded.run(feeds).values(), torch_step(module, feeds))
        for name in CACHES:   # GroupQueryAttention wrote slot `position`; the runner put it back
            assert np.array_equal(feeds[name], before[name]), name


def test_read_only_and_aliased_caches_are_never_written(decode, artifact):
    module, _ = decode
    loaded = load(artifact)
    feeds = feeds_at(9)
    for name in CACHES:
        feeds[name].flags.writeable = False
    assert_close(loaded.run(feeds).values(), torch_step(module, feeds))
    aliased = feeds_at(9, seed=3)
    aliased["cache_1"] = aliased["cache_0"]            # one array as layer 0's keys and its values
    before = aliased["cache_0"].copy()
    assert_close(loaded.run(aliased).values(), torch_step(module, aliased))
    assert np.array_equal(aliased["cache_0"], before)


def test_a_position_outside_the_cache_is_refused_before_onnx_runtime_runs(artifact):
    loaded = load(artifact)
    for position in (SLOTS, -1, 10 ** 6):
        feeds = feeds_at(position)
        before = {n: feeds[n].copy() for n in CACHES}
        with pytest.raises(RunnerError, match=rf"decode_attention node .*position {position} is outside the "
                                              rf"{SLOTS} slots \[0, {SLOTS}\) of cache 'cache_0'"):
            loaded.run(feeds)
        assert all(np.array_equal(feeds[n], before[n]) for n in CACHES)


def test_without_inplace_the_op_is_written_in_standard_ops(decode):
    """TVM's lowering (and any partition whose caches are not its inputs): standard ONNX ops only, pure."""
    module, inputs = decode
    graph = canonical(module, inputs)
    model, external = lower_partition(graph)
    assert not [n for n in model.graph.node if n.domain]
    assert not [p for p in model.metadata_props if p.key == INPLACE_OUTPUTS]
    options = ort.SessionOptions()
    arrays = [np.ascontiguousarray(graph.weights[n].data) for n in external]
    options.add_external_initializers(external, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = feeds_at(6)
    before = {n: feeds[n].copy() for n in CACHES}
    assert_close(session.run(None, feeds), torch_step(module, feeds))
    assert all(np.array_equal(feeds[n], before[n]) for n in CACHES)


def test_a_real_gpu_is_not_given_the_op():
    """The GPU backend has no kernel for it, so placement keeps it off a real CUDA GPU (on the CPU)."""
    from hetflow.backends.gpu import emit_failure
    from hetflow.ir import parse_graph
    graph = parse_graph(ATTENDING)
    node = next(n for n in graph.nodes if n.op == DECODE_ATTENTION_OP)
    assert "has no GPU kernel" in emit_failure(node)


ATTENDING = """graph g(%q: f32[1,1,64], %k: f32[1,1,64], %v: f32[1,1,64], %kc: f32[1,2,8,32], %vc: f32[1,2,8,32], %pos: i64[1]) -> (%y: f32[1,1,64]) opset 18 {
  %y: f32[1,1,64] = hetflow.decode_attention(%q, %k, %v, %kc, %vc, %pos) {scale = 0.25}
  return %y
}"""


@pytest.mark.parametrize("edit, expected", [
    (("%q: f32[1,1,64]", "%q: f32[1,1,63]"), "q is f32[1,1,63], expected f32[1, 1, 64]"),
    (("%vc: f32[1,2,8,32]", "%vc: f32[1,2,9,32]"), "v_cache f32[1,2,9,32] must have k_cache's type"),
    (("%pos: i64[1]", "%pos: f32[1]"), "position must be i64[1] or i64[], got f32[1]"),
    (("%kc, %vc, %pos)", "%kc, %vc)"), "takes 6 inputs (q, k, v, k_cache, v_cache, position), got 5"),
])
def test_a_malformed_node_is_refused_naming_it(edit, expected):
    from hetflow.ir import parse_graph
    from hetflow.ir.verify import VerifyError, verify
    with pytest.raises(VerifyError, match="decode_attention") as info:
        verify(parse_graph(ATTENDING.replace(*edit)))
    assert expected in str(info.value)


SHARED_CACHE = """graph g(%q: f32[1,1,64], %k: f32[1,1,64], %v: f32[1,1,64], %kc: f32[1,2,8,32], %vc: f32[1,2,8,32], %pos: i64[1]) -> (%y: f32[1,1,64]) opset 18 {
  %a: f32[1,1,64] = hetflow.decode_attention(%q, %k, %v, %kc, %vc, %pos) {scale = 0.25}
  %s: f32[] = ReduceSum(%kc) {keepdims = 0}
  %y: f32[1,1,64] = Add(%a, %s)
  return %y
}"""


@pytest.mark.parametrize("edit", [None, ("%kc, %vc, %pos)", "%kc, %kc, %pos)")], ids=["read-elsewhere", "k-is-v"])
def test_a_cache_read_by_anything_else_is_refused(edit):
    """The CPU writes the cache's slot in place during the call: the IR lets nothing else read a cache."""
    from hetflow.ir import parse_graph
    from hetflow.ir.verify import VerifyError, verify
    text = SHARED_CACHE if edit is None else ATTENDING.replace(*edit)
    with pytest.raises(VerifyError, match=r"k_cache %kc is read 2 times; a decode_attention's caches are read by "
                                          r"it alone"):
        verify(parse_graph(text))


def test_the_lowering_writes_in_place_only_a_cache_read_by_its_node_alone():
    """Defence behind the verifier: a partition graph whose cache another op reads gets standard ops."""
    from hetflow.ir import parse_graph
    graph = parse_graph(SHARED_CACHE)
    model, _ = lower_partition(graph, inplace_cache=True)
    assert [n.op_type for n in model.graph.node if n.domain] == []
    model, _ = lower_partition(parse_graph(ATTENDING), inplace_cache=True)
    assert [n.op_type for n in model.graph.node if n.domain] == ["GroupQueryAttention"]
