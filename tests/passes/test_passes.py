"""Passes: golden before/after IR, honest `modified` flags, idempotence, semantics preserved."""
from __future__ import annotations

import os

import numpy as np
import pytest

from hetflow.ir import TensorType, graph_difference, print_graph, verify
from hetflow.passes import PassError, PassResult, PassRunner, get_pass, parse_pipeline
from hetflow.passes.rewrite import Rule, RewriteLimitError, rewrite
from hetflow.runtime.interpreter import Interpreter

from ..golden_files import cases, load_before, resources_for, split, write_expected

UPDATE = os.environ.get("HETFLOW_UPDATE_GOLDEN") == "1"


def random_feeds(graph, seed=0):
    rng = np.random.default_rng(seed)
    return {v.name: rng.standard_normal(v.type.shape).astype(v.type.dtype.numpy) for v in graph.inputs}


@pytest.mark.parametrize("path", cases("canonicalize") + cases("fuse"), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_golden(path):
    pass_fn = get_pass(path.parent.name)
    graph = load_before(path)
    verify(graph)
    reference = graph.clone()
    result = pass_fn(graph)
    verify(result.graph)
    text = print_graph(result.graph)
    _, expected = split(path)
    if UPDATE:
        write_expected(path, text if result.modified else None)
        expected = text if result.modified else None
    if expected is None:
        assert not result.modified, f"{path.name}: expected no change, the pass changed:\n{text}"
        assert graph_difference(result.graph, reference) is None
    else:
        assert result.modified
        assert text.strip() == expected.strip(), f"{path.name}: got\n{text}"
    # idempotent: a second run changes nothing
    again = pass_fn(result.graph)
    assert not again.modified and print_graph(again.graph) == text
    # semantics preserved
    feeds = random_feeds(reference)
    for a, b in zip(Interpreter(reference).run(feeds), Interpreter(result.graph).run(feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_expected_goldens_parse_back():
    from hetflow.ir import parse_graph
    checked = 0
    for path in cases("canonicalize") + cases("fuse"):
        before, expected = split(path)
        if expected is None:
            continue
        graph = parse_graph(expected, resources_for(before) | resources_for(expected))
        verify(graph)
        # the round trip: the parsed graph prints back as the golden text
        assert print_graph(graph).strip() == expected.strip(), f"{path.name} does not print back as written"
        checked += 1
    assert checked >= 10  # the goldens with an expected section (12 today) were all read


def test_pipeline_string_and_unknown_pass():
    assert parse_pipeline("canonicalize, fuse") == ["canonicalize", "fuse"]
    with pytest.raises(PassError, match="unknown pass 'fusee'; known passes: .*fuse"):
        parse_pipeline("canonicalize,fusee")


def test_runner_names_the_pass_and_the_passes_before(tmp_path):
    def breaks_graph(graph, options=None):
        out = graph.nodes[0].outputs[0]
        out.type = TensorType(out.type.dtype, (99,))  # a type the op does not produce
        return PassResult(graph, True)
    breaks_graph.pass_name = "breaker"
    graph = load_before(cases("canonicalize")[0])
    runner = PassRunner(["canonicalize", breaks_graph], dump_dir=tmp_path)
    with pytest.raises(PassError, match=r"in pass 'breaker' \(after: canonicalize\): the graph fails verification"):
        runner.run(graph)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-input.ir", "01-canonicalize.ir"]


def test_rewrite_guard_stops_endless_rewriting():
    graph = load_before(next(p for p in cases("canonicalize") if "Relu(" in split(p)[0]))

    def flip(graph, node):
        node.attrs["flip"] = 1 - node.attrs.get("flip", 0)
        return True
    with pytest.raises(RewriteLimitError, match=r"rules still firing: flip"):
        rewrite(graph, [Rule("flip", flip, ("Relu",))], max_sweeps=5)


def test_matmul_of_transposed_weight_keeps_one_table(monkeypatch):
    """A weight too large to fold its transpose is not copied: a tied LM head keeps the table once,
    transposed (a plain MatMul; the lookups gather its columns), an untied one is read as Gemm's transB."""
    from hetflow.ir import parse_graph
    from hetflow.passes import canonicalize as canon
    monkeypatch.setattr(canon, "FOLD_LIMIT", 16)  # stands for a 50257 x 768 table
    text = """graph m(%x: f32[2,4], %ids: i64[3]) -> (%y: f32[2,6], %r: f32[3,4]) opset 18 {
  weight %w: f32[6,4] = resource
  %e: f32[3,4] = Gather(%w, %ids) {axis = 0}
  %r: f32[3,4] = Neg(%e)
  %wt: f32[4,6] = Transpose(%w) {perm = [1, 0]}
  %y: f32[2,6] = MatMul(%x, %wt)
  return %y, %r
}"""
    rng = np.random.default_rng(1)

    def check(text, feeds, ops):
        graph = parse_graph(text, resources_for(text))
        reference = graph.clone()
        result = canon.canonicalize(graph).graph
        verify(result)
        assert result.op_counts() == ops
        assert sum(w.data.size for w in result.weights.values()) == 24          # one table, no copy
        for want, got in zip(Interpreter(reference).run(feeds), Interpreter(result).run(feeds)):
            np.testing.assert_array_equal(want, got)
        return result
    feeds = {"x": rng.standard_normal((2, 4)).astype(np.float32), "ids": np.array([5, 0, 2], dtype=np.int64)}
    tied = check(text, feeds, {"Gather": 1, "Transpose": 1, "MatMul": 1, "Neg": 1})
    matmul = next(n for n in tied.nodes if n.op == "MatMul")
    assert matmul.inputs[1].data.shape == (4, 6)
    assert next(n for n in tied.nodes if n.op == "Gather").attrs == {"axis": 1}
    # a batched MatMul and 2-D ids: the same, the lookup's columns transposed back to rows
    text3 = (text.replace("%x: f32[2,4]", "%x: f32[5,2,4]").replace("%y: f32[2,6]", "%y: f32[5,2,6]")
             .replace("%ids: i64[3]", "%ids: i64[1,3]").replace("f32[3,4]", "f32[1,3,4]"))
    check(text3, {"x": rng.standard_normal((5, 2, 4)).astype(np.float32), "ids": np.array([[5, 0, 2]])},
          {"Gather": 1, "Transpose": 1, "MatMul": 1, "Neg": 1})
    # a lookup that is itself a graph output keeps its name: then the weight is read as Gemm's transB
    exposed = text.replace("%r: f32[3,4] = Neg(%e)", "%r: f32[3,4] = Neg(%x2)").replace(
        "-> (%y: f32[2,6], %r: f32[3,4])", "-> (%y: f32[2,6], %e: f32[3,4])").replace("return %y, %r", "return %y, %e")
    exposed = exposed.replace("  %r: f32[3,4] = Neg(%x2)\n", "")
    check(exposed, feeds, {"Gather": 1, "Gemm": 1})
    # untied (no lookup): Gemm reads the weight as it is
    untied = (text.replace("  %e: f32[3,4] = Gather(%w, %ids) {axis = 0}\n", "")
              .replace("  %r: f32[3,4] = Neg(%e)\n", "").replace(", %r: f32[3,4])", ")")
              .replace("return %y, %r", "return %y").replace(", %ids: i64[3]", ""))
    gemm = check(untied, {"x": feeds["x"]}, {"Gemm": 1})
    assert next(iter(gemm.nodes)).attrs == {"transB": 1}
    # a tied table small enough to fold is still kept once (folded, the transpose was a second copy beside it)
    monkeypatch.setattr(canon, "FOLD_LIMIT", 1 << 24)
    small = check(text, feeds, {"Gather": 1, "Transpose": 1, "MatMul": 1, "Neg": 1})
    assert next(n for n in small.nodes if n.op == "MatMul").inputs[1].data.shape == (4, 6)
    # two heads reading the one transposed table: both read the one kept table
    two = (text.replace("  %y: f32[2,6] = MatMul(%x, %wt)\n",
                        "  %y0: f32[2,6] = MatMul(%x, %wt)\n  %x1: f32[2,4] = Neg(%x)\n"
                        "  %y1: f32[2,6] = MatMul(%x1, %wt)\n  %y: f32[2,6] = Add(%y0, %y1)\n"))
    check(two, feeds, {"Gather": 1, "Transpose": 1, "MatMul": 2, "Neg": 2, "Add": 1})
    # untied and small: folded as before (one transposed copy, the original unused)
    folded = canon.canonicalize(parse_graph(untied, resources_for(untied))).graph
    assert folded.op_counts() == {"MatMul": 1} and sum(w.data.size for w in folded.weights.values()) == 24


def test_gather_reads_rows_not_the_table():
    """The bytes of an embedding lookup are the rows it reads (cost model), alone and inside a group."""
    from hetflow.ir import node_bytes, parse_graph
    from hetflow.passes.fuse import build_group
    text = """graph m(%ids: i64[1,1]) -> (%y: f32[1,1,768], %z: f32[50257,768]) opset 18 {
  weight %table: f32[50257,768] = resource
  %e: f32[1,1,768] = Gather(%table, %ids) {axis = 0}
  %y: f32[1,1,768] = Mul(%e, %e)
  %z: f32[50257,768] = Neg(%table)
  return %y, %z
}"""
    graph = parse_graph(text, resources_for(text))
    gather, mul, neg = graph.nodes
    row = 768 * 4
    assert node_bytes(gather) == 8 + 2 * row      # ids, the row read, the row written
    assert node_bytes(neg) == 2 * 50257 * row     # read whole
    group = build_group(graph, "injective", [gather, mul], "g")
    assert node_bytes(group) == 8 + 2 * row


def test_masked_row_test_keeps_fully_masked_rows():
    """Rows whose scores are all -inf still get zeros (torch's safe softmax), not NaN, after the rewrite."""
    from hetflow.ir import parse_graph
    from hetflow.passes.canonicalize import canonicalize
    path = next(p for p in cases("canonicalize") if p.stem == "attention_scale_and_mask")
    graph = load_before(path)
    reference = graph.clone()
    rewritten = canonicalize(graph).graph
    assert "Not" not in rewritten.op_counts()
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    q[0, 1, 2, :] = -np.inf                       # this row's scores: -inf * positive keys = all -inf
    k = np.abs(rng.standard_normal((1, 2, 4, 3))).astype(np.float32) + 0.1
    want = Interpreter(reference).run({"q": q, "k": k})[0]
    got = Interpreter(rewritten).run({"q": q, "k": k})[0]
    assert np.all(want[1, 2] == 0) and not np.isnan(want).any()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
