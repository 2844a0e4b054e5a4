"""plan_memory: arenas from the timeline's lifetimes, in-place reuse, two levels, and the runtime using them."""
from __future__ import annotations

import numpy as np
import pytest

import hetflow
from hetflow.examples.decode_graphs import build_gpt2_decode_step
from hetflow.ir import DType, Graph, TensorType, infer_types
from hetflow.passes import CompileOptions, memplan
from hetflow.passes.plan_memory import in_place_pairs, lifetimes, plan_graph, repeated_block, runtime_order
from hetflow.pipeline import run_pipeline


def add(graph, op, inputs, attrs=None):
    node = graph.add_node(op, inputs, [None], attrs or {})
    node.outputs[0].type = infer_types(node, graph.opset)[0]
    return node.outputs[0]


def chain_graph():
    g = Graph("chain")
    x = g.add_input("x", TensorType(DType.f32, (64, 64)))
    w = g.add_weight("w", np.ones((64, 64), np.float32))
    a = add(g, "MatMul", [x, w])
    b = add(g, "Relu", [a])       # may overwrite a (its last use)
    c = add(g, "MatMul", [b, w])
    d = add(g, "Sigmoid", [c])    # may overwrite c
    g.outputs = [add(g, "Add", [d, b])]
    return g


def check(graph, report):
    spans = lifetimes(graph, runtime_order(graph, None if any("device" in n.meta for n in graph.nodes) else "cpu"))
    for memory, space in report.spaces.items():
        buffers = [memplan.Buffer(n, spans[n][0], spans[n][1], graph.value(n).type.nbytes())
                   for n in space.offsets]
        # values sharing a buffer (in place) are one value living on: check them as their union
        merged: dict[int, memplan.Buffer] = {}
        for b in buffers:
            key = space.offsets[b.id]
            prev = merged.get((key, b.size))
            if prev is not None and (prev.upper == b.lower or b.upper == prev.lower or
                                     (prev.lower <= b.lower < prev.upper)):
                merged[(key, b.size)] = memplan.Buffer(prev.id, min(prev.lower, b.lower), max(prev.upper, b.upper),
                                                        b.size)
            else:
                merged[(key, b.size, b.id) if prev is not None else (key, b.size)] = b
        memplan.check_plan(list(merged.values()), {b.id: space.offsets[b.id] for b in merged.values()},
                           alignment=report.alignment)
        assert space.lower_bound <= space.size <= space.greedy <= space.no_reuse


def test_in_place_pairs_and_valid_plan():
    g = chain_graph()
    pairs = in_place_pairs(g, runtime_order(g, default_device="cpu"))
    names = [n.outputs[0].name for n in g.nodes]
    assert pairs == {names[1]: names[0], names[3]: names[2], names[4]: names[3]}  # Add over its Sigmoid input
    report = plan_graph(g)
    check(g, report)
    offsets = report.spaces["dram"].offsets
    assert offsets[names[1]] == offsets[names[0]]  # Relu writes over the MatMul it follows


@pytest.mark.parametrize("name", ["gpt2", "resnet18"])
def test_real_models_within_one_percent_of_the_lower_bound(name):
    from hetflow.examples import models
    from hetflow.frontends.torch import capture_module
    build = {"gpt2": lambda: models.build_gpt2(n_layer=4, n_embd=256, n_head=4, seq=64),
             "resnet18": lambda: models.build_resnet18(image=112)}[name]
    module, inputs = build()
    options = CompileOptions(platform="host")
    graph, _ = run_pipeline(capture_module(module, inputs).graph, options=options)
    report = options.results["memory_plan"]
    check(graph, report)
    for space in report.spaces.values():
        assert space.gap <= 0.01


def test_repeated_layers_are_found_and_planned():
    graph = build_gpt2_decode_step(layers=4, hidden=128, heads=4, vocab=500)
    options = CompileOptions(platform="host")
    graph, _ = run_pipeline(graph, options=options)
    first, length, repeats = repeated_block(graph)
    assert repeats >= 3 and length >= 5
    check(graph, options.results["memory_plan"])


def test_the_runtime_uses_the_plan_and_computes_the_same():
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(6):
        inits.append(numpy_helper.from_array((rng.standard_normal((128, 128)) / 10).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"]), helper.make_node("Tanh", [f"h{i}"], [f"a{i}"])]
        x = f"a{i}"
    model = helper.make_model(helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 128])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [64, 128])], inits),
        opset_imports=[helper.make_opsetid("", 18)])
    compiled = hetflow.compile(model, platform="mobile-soc", placement="optimal")
    plan = compiled.memory_plan.as_manifest()
    executor = compiled.executor
    for memory, arena in executor.arenas.items():
        assert arena.nbytes <= plan[memory]["size"] + 64
    feeds = rng.standard_normal((64, 128)).astype(np.float32)
    expected = feeds
    for i in range(6):
        expected = np.tanh(expected @ numpy_helper.to_array(inits[i]))
    np.testing.assert_allclose(compiled(feeds), expected, rtol=1e-4, atol=1e-5)
    del onnx
