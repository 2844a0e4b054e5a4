"""IR mutation (issue #12): graph outputs count as uses, nodes register their uses when inserted, and
Graph.replace swaps nodes for one node, rewiring every use; fuse and split build on it and produce the IR
the hand-patching versions did."""
from __future__ import annotations

import numpy as np
import pytest

from hetflow.ir import DType, Graph, IRError, Node, TensorType, Value, VerifyError, print_graph, verify
from hetflow.passes import get_pass
from hetflow.passes.canonicalize import eliminate_dead_code

from ..golden_files import cases, load_before

F32 = DType.f32


def t(*shape, dtype=F32):
    return TensorType(dtype, shape)


def chain() -> tuple[Graph, list[Node]]:
    """x -> Neg -> Relu -> Exp -> y, the Relu also feeding an Add with x."""
    g = Graph("chain")
    x = g.add_input("x", t(2, 3))
    neg = g.add_node("Neg", [x], [t(2, 3)], output_names=["a"])
    relu = g.add_node("Relu", [neg.outputs[0]], [t(2, 3)], output_names=["b"])
    exp = g.add_node("Exp", [relu.outputs[0]], [t(2, 3)], output_names=["y"])
    add = g.add_node("Add", [relu.outputs[0], x], [t(2, 3)], output_names=["z"])
    g.outputs = [exp.outputs[0], add.outputs[0]]
    return g, [neg, relu, exp, add]


# --- graph outputs are uses ---------------------------------------------------------------------------

def test_a_value_used_only_as_a_graph_output_is_used():
    g, (neg, relu, exp, add) = chain()
    y = exp.outputs[0]
    assert not y.uses and y.is_output and y.is_used and y.num_uses == 1
    b = relu.outputs[0]
    assert not b.is_output and b.num_uses == 2 and b.used_only_by([exp, add]) and not b.used_only_by([exp])
    assert not y.used_only_by([])  # nobody but the graph reads it: a use by none of the nodes
    with pytest.raises(IRError, match=r"%y is still used by a graph output"):
        g.remove(exp)


def test_dce_keeps_graph_outputs_and_removes_the_rest():
    g, (neg, relu, exp, add) = chain()
    dead = g.add_node("Sqrt", [exp.outputs[0]], [t(2, 3)], output_names=["dead"])
    w = g.add_weight("w", np.ones((2, 3), np.float32))
    g.outputs = list(g.outputs) + [w]  # a weight returned as it is: used, though no node reads it
    assert eliminate_dead_code(g)
    assert dead not in g.nodes and [n.op for n in g.nodes] == ["Neg", "Relu", "Exp", "Add"]
    assert "w" in g.weights
    g.outputs = g.outputs[:2]
    assert not w.is_used and eliminate_dead_code(g) and "w" not in g.weights
    verify(g)


def test_output_accounting_follows_every_list_mutation():
    g, (neg, relu, exp, add) = chain()
    a, b, y, z = (n.outputs[0] for n in (neg, relu, exp, add))
    g.outputs.append(a)
    g.outputs.append(a)  # twice: two output uses
    assert a.num_uses == 3
    g.outputs.remove(a)
    assert a.num_uses == 2 and a.is_output
    g.outputs[0] = b
    assert not y.is_output and b.num_uses == 3
    del g.outputs[-1]
    g.outputs.pop()
    g.outputs += [y]
    g.outputs.insert(0, z)
    g.outputs.extend([])
    assert [v.name for v in g.outputs] == ["z", "b", "y"]
    assert [v.num_uses - len(v.uses) for v in (a, b, y, z)] == [0, 1, 1, 1]
    g.outputs[1:] = [a]
    assert [v.is_output for v in (a, b, y, z)] == [True, False, False, True]
    verify(g)
    with pytest.raises(IRError, match="must be a Value"):
        g.outputs.append("y")
    assert [v.name for v in g.outputs] == ["z", "a"]  # refused: nothing changed
    verify(g)
    g.outputs.clear()
    assert not any(v.is_output for v in (a, b, y, z))


def test_verify_checks_the_output_accounting_and_stray_uses():
    g, (neg, relu, exp, add) = chain()
    exp.outputs[0]._output_of.clear()
    with pytest.raises(VerifyError, match=r"%y counts 0 graph output use\(s\), graph.outputs holds it 1"):
        verify(g)
    g, (neg, relu, exp, add) = chain()
    stray = Node("Neg", [g.inputs[0]], [Value("s", t(2, 3))])
    g.inputs[0].uses.append((stray, 0))  # as if a node were built, registered and never inserted
    with pytest.raises(VerifyError, match=r"not a node of the graph"):
        verify(g)


def test_replace_all_uses_with_moves_graph_outputs_without_being_told_the_graph():
    g, (neg, relu, exp, add) = chain()
    y = exp.outputs[0]
    y.replace_all_uses_with(relu.outputs[0])
    assert g.outputs[0] is relu.outputs[0] and not y.is_used
    g.remove(exp)
    verify(g)


# --- uses are registered on insertion ---------------------------------------------------------------------

def test_a_built_node_reads_nothing_until_inserted():
    g, (neg, relu, exp, add) = chain()
    x = g.inputs[0]
    before = list(x.uses)
    node = Node("Sqrt", [x], [Value("s", t(2, 3))])
    assert not node.attached and x.uses == before
    node.set_input(0, relu.outputs[0])  # rewiring a free node touches no uses either
    assert relu.outputs[0].uses == [(exp, 0), (add, 0)]
    g.insert(node, after=relu)
    assert node.attached and (node, 0) in relu.outputs[0].uses and g.nodes.index(node) == 2
    with pytest.raises(IRError, match="already in a graph"):
        g.insert(node)
    g.remove(node)
    assert not node.attached and (node, 0) not in relu.outputs[0].uses
    verify(g)


def test_insert_refuses_a_name_clash_and_registers_nothing():
    g, (neg, relu, exp, add) = chain()
    node = Node("Sqrt", [g.inputs[0]], [Value("q", t(2, 3)), Value("a", t(2, 3))])
    uses = list(g.inputs[0].uses)
    with pytest.raises(IRError, match=r"%a is already used"):
        g.insert(node)
    assert g.inputs[0].uses == uses and node not in g.nodes and "q" == g.fresh_name("q")
    verify(g)


# --- Graph.replace ----------------------------------------------------------------------------------------

def test_replace_one_node_rewires_users_and_outputs_and_keeps_names():
    g, (neg, relu, exp, add) = chain()
    new = Node("Sigmoid", [relu.outputs[0]], [Value("tmp", t(2, 3))], loc="new")
    g.replace([exp], new)  # one node: outputs map by position
    assert g.outputs[0] is new.outputs[0] and new.outputs[0].name == "y"
    assert [n.op for n in g.nodes] == ["Neg", "Relu", "Sigmoid", "Add"]
    assert exp.outputs[0].producer is None and not exp.outputs[0].is_used
    verify(g)
    assert "%y: f32[2,3] = Sigmoid(%b)" in print_graph(g)


def test_replace_several_nodes_by_one():
    g, (neg, relu, exp, add) = chain()
    y, z = exp.outputs[0], add.outputs[0]
    b = relu.outputs[0]
    fused = Node("hetflow.test", [neg.inputs[0]], [Value("fy", t(2, 3)), Value("fb", t(2, 3))])
    # Neg, Relu, Exp go; b (read by Add) and y (a graph output) escape them and need a value in their place
    g.replace([neg, relu, exp], fused, {y: fused.outputs[0], b: fused.outputs[1]})
    assert [v.name for v in fused.outputs] == ["y", "b"]
    assert add.inputs[0] is fused.outputs[1] and g.outputs == [fused.outputs[0], z]
    assert g.nodes == [fused, add]  # where the last of them (Exp) stood
    assert "a" == g.fresh_name("a")  # the names of the removed values are free again
    assert (fused, 0) in g.inputs[0].uses and not any(u is neg for u, _ in g.inputs[0].uses)
    for n in (neg, relu, exp):
        assert not n.attached and all(o.producer is None for o in n.outputs)


def test_replace_without_keeping_names_and_at_the_first_position():
    g, (neg, relu, exp, add) = chain()
    new = Node("Abs", [neg.outputs[0]], [Value("b", t(2, 3))])
    g.replace([relu], new, keep_names=False, at="first")
    assert new.outputs[0].name not in ("a", "y", "z") and exp.inputs[0] is new.outputs[0]
    g2, (neg2, relu2, exp2, add2) = chain()
    fused = Node("hetflow.test", [g2.inputs[0]], [Value("fb", t(2, 3))])
    g2.replace([neg2, relu2], fused, {relu2.outputs[0]: fused.outputs[0]}, at="first")
    assert g2.nodes[0] is fused and fused.outputs[0].name == "b"


def test_replace_may_map_onto_an_existing_value():
    g, (neg, relu, exp, add) = chain()
    x = g.inputs[0]
    new = Node("Exp", [x], [Value("e", t(2, 3))])
    g.replace([neg, relu, exp], new, {relu.outputs[0]: x, exp.outputs[0]: new.outputs[0]})
    assert add.inputs == [x, x] and g.outputs[0] is new.outputs[0] and new.outputs[0].name == "y"
    verify(g)


def _unchanged(g: Graph, before: str, new: Node) -> None:
    assert print_graph(g) == before
    assert not new.attached and all(u is not new for v in g.values() for u, _ in v.uses)
    verify(g)


def test_replace_refuses_a_dangling_read_and_leaves_the_graph_as_it_was():
    g, (neg, relu, exp, add) = chain()
    before = print_graph(g)
    fused = Node("hetflow.test", [g.inputs[0]], [Value("fy", t(2, 3))])
    with pytest.raises(IRError, match=r"%b would be left dangling, still read by Add node \(%z\)"):
        g.replace([neg, relu, exp], fused, {exp.outputs[0]: fused.outputs[0]})
    _unchanged(g, before, fused)
    with pytest.raises(IRError, match=r"%y would be left dangling, still read by a graph output"):
        g.replace([neg, relu, exp], fused, {relu.outputs[0]: fused.outputs[0]})
    _unchanged(g, before, fused)


def test_replace_refuses_a_new_node_reading_what_it_replaces():
    g, (neg, relu, exp, add) = chain()
    before = print_graph(g)
    new = Node("Sigmoid", [relu.outputs[0]], [Value("s", t(2, 3))])
    with pytest.raises(IRError, match=r"the new node reads %b \(input 0\), which the replaced nodes produce"):
        g.replace([relu], new)
    _unchanged(g, before, new)
    other = Node("Sigmoid", [g.inputs[0]], [Value("s", t(2, 3))])
    with pytest.raises(IRError, match=r"%b would be replaced by %a, which is removed too"):
        g.replace([neg, relu], other, {relu.outputs[0]: neg.outputs[0]})
    with pytest.raises(IRError, match=r"the mapping names %y, which they do not produce"):
        g.replace([relu], other, {exp.outputs[0]: other.outputs[0]})
    with pytest.raises(IRError, match="not a node of graph"):
        g.replace([Node("Neg", [], [])], other)
    stray = Node("Neg", [g.inputs[0]], [Value("stray", t(2, 3))])  # built, never inserted
    with pytest.raises(IRError, match=r"%y would be replaced by %stray, which is not in the graph"):
        g.replace([exp], other, {exp.outputs[0]: stray.outputs[0]})
    reads_stray = Node("Sigmoid", [stray.outputs[0]], [Value("s", t(2, 3))])
    with pytest.raises(IRError, match=r"the new node reads %stray \(input 0\), which is not in the graph"):
        g.replace([exp], reads_stray)
    _unchanged(g, before, other)


def test_replace_restores_the_topological_order_when_a_reader_stood_between():
    g = Graph("between")
    x = g.add_input("x", t(4))
    a = g.add_node("Neg", [x], [t(4)], output_names=["a"])
    r = g.add_node("Relu", [a.outputs[0]], [t(4)], output_names=["r"])  # reads a, is not replaced
    c = g.add_node("Exp", [x], [t(4)], output_names=["c"])
    g.outputs = [r.outputs[0], c.outputs[0]]
    fused = Node("hetflow.test", [x], [Value("fa", t(4)), Value("fc", t(4))])
    unsorted = g.clone()
    g.replace([a, c], fused, {a.outputs[0]: fused.outputs[0], c.outputs[0]: fused.outputs[1]})
    assert [n.op for n in g.nodes] == ["hetflow.test", "Relu"]
    a2, r2, c2 = unsorted.nodes
    fused2 = Node("hetflow.test", [unsorted.inputs[0]], [Value("fa", t(4)), Value("fc", t(4))])
    unsorted.replace([a2, c2], fused2, {a2.outputs[0]: fused2.outputs[0], c2.outputs[0]: fused2.outputs[1]},
                     reorder=False)  # the caller sorts later
    assert [n.op for n in unsorted.nodes] == ["Relu", "hetflow.test"]
    unsorted.topological_sort()
    assert print_graph(unsorted) == print_graph(g)


# --- fuse and split: the same IR as the hand-patching versions ----------------------------------------------

def _legacy_build_group(graph, kind, members, name):
    """fuse.build_group before Graph.replace: producers, names and the node list patched by hand."""
    from hetflow.ir.graph import extract_subgraph
    from hetflow.passes.fuse import GROUP_OP
    body, external, escaping = extract_subgraph(graph, members, name, weights_as_inputs=True)
    for node in body.nodes:
        node.meta.clear()
    position = graph.nodes.index(members[-1])
    for node in members:
        node.detach_inputs()
        for out in node.outputs:
            out.producer = None
            if out not in escaping:
                graph.forget_name(out.name)
    group = Node(GROUP_OP, external, escaping, {"kind": kind, "body": body}, members[0].loc)
    group._attach()  # (a built node registers its uses when inserted now)
    graph.nodes.insert(position + 1, group)
    for node in members:
        graph.nodes.remove(node)
    return group


def _fuse_cases() -> list:
    return cases("fuse") + cases("canonicalize")


def _graph_of(case) -> Graph:
    if isinstance(case, str):  # an example model: a GPT-2 decode step (with its KV cache), a Mixtral layer
        from hetflow.examples.decode_graphs import build_gpt2_decode_step, build_mixtral_decode_layer
        if case == "gpt2-decode":
            return build_gpt2_decode_step(layers=2, hidden=64, heads=4, context=16)
        return build_mixtral_decode_layer(4, hidden=64, heads=4, kv_heads=2, head_dim=16, context=16, ffn=128)
    return load_before(case)


@pytest.mark.parametrize("case", _fuse_cases() + ["gpt2-decode", "mixtral-layer"],
                         ids=lambda p: p if isinstance(p, str) else f"{p.parent.name}/{p.stem}")
def test_fuse_builds_the_same_ir_as_the_hand_patching_version(case, monkeypatch):
    import hetflow.passes.fuse as fuse_module
    fuse = get_pass("fuse")
    graph = get_pass("canonicalize")(_graph_of(case)).graph
    reference = graph.clone()
    fuse(graph)
    verify(graph)
    monkeypatch.setattr(fuse_module, "build_group", _legacy_build_group)
    fuse(reference)
    assert print_graph(graph) == print_graph(reference)


def test_fuse_cases_cover_every_group_kind():
    import hetflow.passes.fuse as fuse_module
    kinds = set()
    for case in _fuse_cases() + ["gpt2-decode", "mixtral-layer"]:
        g = get_pass("fuse")(get_pass("canonicalize")(_graph_of(case)).graph).graph
        kinds |= {n.attrs["kind"] for n in g.nodes if n.op == fuse_module.GROUP_OP}
    assert kinds >= {"attention", "expert", "contraction", "reduction"}


def _legacy_apply_split(graph, node, decision):
    """place.apply_split before Graph.replace: the Concat added, uses moved, the node removed, renamed."""
    from hetflow.passes.place import SPLIT_STEPS
    a, b = decision["devices"]
    k = decision["eighths_on_first"]
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    out = node.outputs[0]
    dtype = out.type.dtype
    name = out.name
    if decision["dim"] == "cols":
        n = out.type.shape[-1]
        cut = max(1, min(n - 1, round(n * k / SPLIT_STEPS)))
        parts = []
        for device, (lo, hi) in ((a, (0, cut)), (b, (cut, n))):
            wp = graph.add_weight(graph.fresh_name(f"{w.name}_cols{lo}_{hi}"), w.data[:, lo:hi])
            ins = [x, wp]
            if bias is not None and bias.data is not None:
                ins.append(graph.add_weight(graph.fresh_name(f"{bias.name}_{lo}_{hi}"),
                                            bias.data[..., lo:hi] if bias.data.ndim else bias.data))
            shape = tuple(out.type.shape[:-1]) + (hi - lo,)
            part = graph.add_node(node.op, ins, [TensorType(dtype, shape)], dict(node.attrs), node.loc,
                                  output_names=[f"{name}_part"], before=node,
                                  meta={"device": device, "split": f"{hi - lo}/{n} columns"})
            parts.append(part.outputs[0])
        axis = -1
    else:
        m = out.type.shape[-2]
        cut = max(1, min(m - 1, round(m * k / SPLIT_STEPS)))
        parts = []
        for device, (lo, hi) in ((a, (0, cut)), (b, (cut, m))):
            starts = graph.add_weight(graph.fresh_name("slice_start"), np.array([lo], np.int64))
            ends = graph.add_weight(graph.fresh_name("slice_end"), np.array([hi], np.int64))
            axes = graph.add_weight(graph.fresh_name("slice_axis"), np.array([-2], np.int64))
            xshape = tuple(x.type.shape[:-2]) + (hi - lo, x.type.shape[-1])
            xs = graph.add_node("Slice", [x, starts, ends, axes], [TensorType(x.type.dtype, xshape)], loc=node.loc,
                                output_names=[f"{name}_rows{lo}"], before=node, meta={"device": device})
            shape = tuple(out.type.shape[:-2]) + (hi - lo, out.type.shape[-1])
            part = graph.add_node(node.op, [xs.outputs[0]] + list(node.inputs[1:]), [TensorType(dtype, shape)],
                                  dict(node.attrs), node.loc, output_names=[f"{name}_part"], before=node,
                                  meta={"device": device, "split": f"{hi - lo}/{m} rows"})
            parts.append(part.outputs[0])
        axis = -2
    concat = graph.add_node("Concat", parts, [out.type], {"axis": axis}, node.loc, output_names=[f"{name}_joined"],
                            before=node,
                            meta={"device": a, "reason": "joins the split parts (in place in unified memory)"})
    out.replace_all_uses_with(concat.outputs[0], graph)
    graph.remove(node)
    graph.rename(concat.outputs[0], name)


def _split_graph(rows: int, k: int, n: int, as_output: bool) -> Graph:
    rng = np.random.default_rng(0)
    g = Graph("mm")
    x = g.add_input("x", TensorType(DType.f16, (rows, k)))
    ws = [g.add_weight(name, (rng.standard_normal((k, n)) / 20).astype(np.float16)) for name in ("w", "w2")]
    y, y2 = (g.add_node("MatMul", [x, w], [TensorType(DType.f16, (rows, n))], loc=f"fc{i}", output_names=[name])
             for i, (w, name) in enumerate(zip(ws, ("y", "y2"))))
    s = g.add_node("Add", [y.outputs[0], y2.outputs[0]], [TensorType(DType.f16, (rows, n))], output_names=["s"])
    g.outputs = [s.outputs[0]] + ([y.outputs[0]] if as_output else [])
    return g


@pytest.mark.parametrize("shape, dim", [((1, 512, 4096), "cols"), ((512, 2048, 512), "rows")])
@pytest.mark.parametrize("as_output", [True, False])
def test_split_builds_the_same_ir_as_the_hand_patching_version(shape, dim, as_output, monkeypatch):
    import hetflow.passes.place as place_module
    from hetflow.platform import load_platform
    platform = load_platform("mobile-soc")
    g, reference = _split_graph(*shape, as_output), _split_graph(*shape, as_output)
    report = place_module.place_graph(g, platform, "split", devices=["gpu", "npu"])
    assert len(report.splits) == 2 and {s["dim"] for s in report.splits} == {dim}
    verify(g)
    monkeypatch.setattr(place_module, "apply_split", _legacy_apply_split)
    place_module.place_graph(reference, platform, "split", devices=["gpu", "npu"])
    assert print_graph(g) == print_graph(reference)
    assert [v.name for v in g.outputs] == (["s", "y"] if as_output else ["s"])
