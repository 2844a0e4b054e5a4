"""tile_flash: which weights stay in DRAM and which stream from flash, under a DRAM budget (LLM in a flash).

Runs after canonicalize, before fuse. It does nothing unless a DRAM budget applies: the one given
(``CompileOptions.dram_budget``, ``--dram-budget``), or, without one, the capacity of the memory the platform's
CPU uses when the model's weights do not fit in it.

1. Find the feed-forward layers: ``MatMul/Gemm(x, up) [+ b_up] -> Relu -> MatMul/Gemm(., down) [+ b_down]``,
   and gated ones (SwiGLU: ``silu(x @ gate) * (x @ up) -> @ down``), each product maybe behind a frontend's
   row view, with constant weights read by that layer only (``find_ffns``). Every other weight (embeddings, attention,
   norms, biases) stays resident.
2. Plan (``hetflow.passes.flash_plan.plan_flash``): the resident minimum first, then FFN layers back in DRAM
   while they fit, those a token would read most of first; the rest stream. The read chunk comes from the
   platform's throughput-by-chunk curve (``[flash] throughput``), rounded so chunks fill whole 4 KiB blocks.
3. Each streamed layer becomes one ``hetflow.flash_ffn`` node (the op table's row is its exact NumPy spec)
   whose up and down weights the artifact writes to the flash image, bundled: neuron i's column of up beside
   its row of down. The runtime's ``flash`` runner reads them from there.
4. With ``CompileOptions.flash_predict``: a low-rank predictor of the up projection per streamed layer (its
   rank from the plan), its margin tuned on the FFN inputs the example inputs produce so that
   ``PREDICTOR_RECALL`` of the truly active neurons are kept; the node then computes over the predicted
   neurons only (approximate, stated: the recall and the output error go in the report) and the runtime keeps
   a window cache. Without it, layers stream whole (exact).

The plan and what was measured go in ``CompileOptions.results["flash_plan"]`` (``FlashTiling``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hetflow.ir import Graph, Node, Value
from hetflow.ir.ops import FLASH_FFN_OP, make_kernel
from hetflow.ir.types import TensorType

from .base import CompileOptions, PassError, PassResult, register_pass
from .flash_plan import ALIGN, FfnLayer, FlashPlan, FlashPlanError, plan_flash

__all__ = ["FfnMatch", "FlashTiling", "PREDICTOR_RECALL", "find_ffns", "tile_flash"]

PREDICTOR_RECALL = 0.95     # the share of truly active neurons the predictor's margin keeps on the example inputs
DEFAULT_WINDOW = 5          # tokens a neuron stays in the window cache after it was last active


@dataclass
class FfnMatch:
    """One feed-forward layer found in the graph: its nodes (in order), input, output and weights."""
    nodes: list[Node]
    x: Value
    out: Value
    up: np.ndarray       # [hidden, neurons]
    b_up: np.ndarray     # [neurons]
    down: np.ndarray     # [neurons, hidden]
    b_down: np.ndarray   # [hidden]
    weights: list[Value]  # the graph weights the layer reads (removed when it streams)
    gate: np.ndarray | None = None   # [hidden, neurons]: a gated layer, silu(x @ gate) * (x @ up + b_up)

    @property
    def name(self) -> str:
        return self.nodes[0].outputs[0].name

    @property
    def parts(self) -> int:
        return 3 if self.gate is not None else 2


@dataclass
class FlashTiling:
    """What tile_flash decided: the plan, the budget and where it came from, each streamed layer."""
    budget: int
    budget_source: str
    weight_bytes: int
    plan: FlashPlan | None = None
    streamed: list[dict] = field(default_factory=list)   # {"layer", "node", "bytes", "rank", "recall", ...}
    predict: bool = False

    def describe(self) -> str:
        mib = 1 << 20
        if self.plan is None:
            return (f"flash: weights {self.weight_bytes / mib:.1f} MiB fit the DRAM budget of {self.budget / mib:.1f} MiB "
                    f"({self.budget_source}): nothing streams")
        text = self.plan.describe() + f" [budget: {self.budget_source}]"
        if self.predict and self.streamed:
            recalls = [s["recall"] for s in self.streamed if s.get("recall") is not None]
            if recalls:
                errors = [s.get("relative_error", 0.0) for s in self.streamed]
                text += (f"; predictors keep {min(recalls):.1%} to {max(recalls):.1%} of the active neurons on the "
                         f"example inputs (approximate: FFN outputs within {max(errors):.2%} of their largest "
                         "magnitude there)")
        elif self.streamed:
            text += "; streamed whole, exact"
        return text


def _const(v: Value | None) -> np.ndarray | None:
    return None if v is None or not v.is_weight else v.data


def _linear(node: Node) -> tuple[Value, np.ndarray, np.ndarray | None, list[Value]] | None:
    """``node`` as y = x @ W (+ b) with a constant W [in, out]: (x, W, b or None, the weights it reads)."""
    if node.op == "MatMul":
        w = _const(node.inputs[1])
        if w is None or w.ndim != 2:
            return None
        return node.inputs[0], w, None, [node.inputs[1]]
    if node.op == "Gemm":
        a = node.attrs
        if a.get("transA", 0) or float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0:
            return None
        w = _const(node.inputs[1])
        b = _const(node.inputs[2]) if len(node.inputs) > 2 else None
        if w is None or w.ndim != 2 or (len(node.inputs) > 2 and node.inputs[2] is not None and b is None):
            return None
        w = w.T if a.get("transB", 0) else w
        if b is not None and b.shape != (w.shape[1],):
            return None
        used = [node.inputs[1]] + ([node.inputs[2]] if b is not None else [])
        return node.inputs[0], w, b, used
    return None


def _bias_add(node: Node, value: Value, width: int) -> tuple[np.ndarray, Value] | None:
    """The Add reading ``value`` and a constant bias of ``width``: (bias, the bias weight)."""
    if node.op != "Add" or len(node.inputs) != 2:
        return None
    other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
    b = _const(other)
    if b is None or b.size != width or b.shape[-1:] != (width,):
        return None
    return b.reshape(width), other


def _only_use(value: Value) -> Node | None:
    if value.is_output or len(value.uses) != 1:
        return None
    return value.uses[0][0]


def _linear_with_bias(node: Node) -> tuple[Value, np.ndarray, np.ndarray | None, list[Value], list[Node], Value] | None:
    """A linear layer starting at ``node``, with a following bias Add if there is one: (x, W, b, weights,
    nodes, output)."""
    lin = _linear(node)
    if lin is None:
        return None
    x, w, b, used = lin
    nodes, out = [node], node.outputs[0]
    if b is None:
        nxt = _only_use(out)
        added = _bias_add(nxt, out, w.shape[1]) if nxt is not None else None
        if added is not None:
            b, bias_value = added
            used = used + [bias_value]
            nodes.append(nxt)
            out = nxt.outputs[0]
    return x, w, b, used, nodes, out


def _row_reshape(node: Node | None, read_once: bool = True) -> Node | None:
    """``node`` if it is a Reshape that keeps the last dimension (a view of the rows), read once unless
    ``read_once`` is False, else None."""
    if node is None or node.op != "Reshape" or len(node.outputs) != 1 or node.outputs[0].is_output:
        return None
    if read_once and _only_use(node.outputs[0]) is None:
        return None
    a, b = node.inputs[0].type, node.outputs[0].type
    if a is None or b is None or a.shape is None or b.shape is None or not a.shape or not b.shape:
        return None
    return node if a.shape[-1] == b.shape[-1] else None


def _through_view(value: Value) -> tuple[Value, Node | None]:
    """The value before a row view that made ``value`` (and the view), or ``value`` itself."""
    view = _row_reshape(value.producer, read_once=False)
    return (view.inputs[0], view) if view is not None else (value, None)


def _silu_input(value: Value) -> tuple[Value, list[Node]] | None:
    """``value`` as ``g * sigmoid(g)``: (g, [the Sigmoid, the Mul])."""
    mul = value.producer
    if mul is None or mul.op != "Mul" or len(mul.inputs) != 2 or _only_use(value) is None:
        return None
    for g, other in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
        sig = other.producer if other is not None else None
        if sig is not None and sig.op == "Sigmoid" and sig.inputs[0] is g and _only_use(other) is mul:
            if not g.is_output and len(g.uses) == 2:
                return g, [sig, mul]
    return None


def _gated(mul: Node, graph: Graph) -> FfnMatch | None:
    """A SwiGLU layer ending in ``mul``: ``silu(x @ gate) * (x @ up) -> @ down [+ b_down]``, each product maybe
    behind a row view (torch.export's linear on 3-D input)."""
    if len(mul.inputs) != 2 or _only_use(mul.outputs[0]) is None:
        return None
    for act_side, up_side in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
        silu = _silu_input(act_side)
        if silu is None or _only_use(up_side) is not mul:
            continue
        g, silu_nodes = silu
        g_pre, g_view = _through_view(g)
        u_pre, u_view = _through_view(up_side)
        g_node, u_node = g_pre.producer, u_pre.producer
        if g_node is None or u_node is None or (g_view is None) != (u_view is None):
            continue
        if g_view is not None and (_only_use(g_pre) is not g_view or _only_use(u_pre) is not u_view):
            continue
        g_lin, u_lin = _linear(g_node), _linear(u_node)
        if g_lin is None or u_lin is None or g_lin[0] is not u_lin[0] or g_lin[2] is not None:
            continue
        x, gate, _, used_gate = g_lin
        _, up, b_up, used_up = u_lin
        down_side = _down_projection(mul.outputs[0])
        if down_side is None or (down_side[0] is None) != (g_view is None):
            continue
        h_view, down, b_down, used_down, down_nodes, out = down_side
        index = {id(n): i for i, n in enumerate(graph.nodes)}
        members = [g_node, u_node, *silu_nodes, mul, *down_nodes] + [v for v in (g_view, u_view, h_view) if v is not None]
        members.sort(key=lambda n: index[id(n)])
        match = _layer(members, x, out, up, b_up, down, b_down, used_gate + used_up + used_down, gate)
        if match is not None:
            return match
    return None


def find_ffns(graph: Graph) -> list[FfnMatch]:
    """The ReLU and SwiGLU feed-forward layers of ``graph`` whose weights only they read, in graph order."""
    found = [m for m in (_gated(n, graph) for n in graph.nodes if n.op == "Mul") if m is not None]
    found += _relu_ffns(graph)
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    return sorted(found, key=lambda m: index[id(m.nodes[0])])


def _down_projection(activation: Value):
    """The down projection reading ``activation`` (maybe through a row view), alone: (the view or None, down
    [neurons, hidden], its bias or None, the weights it reads, its nodes, its output), or None."""
    consumer = _only_use(activation)
    view = _row_reshape(consumer)
    read = view.outputs[0] if view is not None else activation
    if view is not None:
        consumer = _only_use(read)
    if consumer is None or consumer.op not in ("MatMul", "Gemm") or consumer.inputs[0] is not read:
        return None
    side = _linear_with_bias(consumer)
    if side is None:
        return None
    _, down, b_down, used, nodes, out = side
    return view, down, b_down, used, nodes, out


def _layer(nodes: list[Node], x: Value, out: Value, up, b_up, down, b_down, weights: list[Value],
           gate=None) -> FfnMatch | None:
    """The checks every feed-forward layer passes: shapes that make a layer (its output like its input), weights
    only it reads (a tied weight stays resident with its other readers), one float dtype."""
    hidden, neurons = up.shape
    if down.shape != (neurons, hidden) or (gate is not None and gate.shape != up.shape):
        return None
    if x.type is None or x.type != out.type:
        return None
    if any(w.num_uses != 1 for w in weights) or len({id(w) for w in weights}) != len(weights):
        return None
    dtypes = {up.dtype, down.dtype} | ({gate.dtype} if gate is not None else set())
    if len(dtypes) != 1 or not np.issubdtype(up.dtype, np.floating):
        return None
    dtype = up.dtype
    return FfnMatch(nodes, x, out, up, np.zeros(neurons, dtype) if b_up is None else b_up.astype(dtype), down,
                    np.zeros(hidden, dtype) if b_down is None else b_down.astype(dtype), weights, gate=gate)


def _relu_ffns(graph: Graph) -> list[FfnMatch]:
    found = []
    for relu in graph.nodes:
        if relu.op != "Relu":
            continue
        before = _row_reshape(relu.inputs[0].producer)   # a frontend's view around the activation, if any
        first = before.inputs[0].producer if before is not None else relu.inputs[0].producer
        if first is None:
            continue
        start = first if first.op in ("MatMul", "Gemm") else (first.inputs[0].producer if first.op == "Add" else None)
        if start is None:
            start = first.inputs[1].producer if first.op == "Add" and first.inputs[1] is not None else None
        if start is None or start.op not in ("MatMul", "Gemm"):
            continue
        up_side = _linear_with_bias(start)
        activation_in = before.inputs[0] if before is not None else relu.inputs[0]
        if up_side is None or up_side[5] is not activation_in or _only_use(relu.inputs[0]) is not relu:
            continue
        if before is not None and _only_use(activation_in) is not before:
            continue
        x, up, b_up, used_up, up_nodes, _ = up_side
        down_side = _down_projection(relu.outputs[0])
        if down_side is None or (before is None) != (down_side[0] is None):
            continue   # the layer's input and output must be alike (a view undone on the other side)
        after, down, b_down, used_down, down_nodes, out = down_side
        middle = [n for n in (before, relu, after) if n is not None]
        match = _layer(up_nodes + middle + down_nodes, x, out, up, b_up, down, b_down, used_up + used_down)
        if match is not None:
            found.append(match)
    return found


def _budget(graph: Graph, options: CompileOptions, platform) -> tuple[int | None, str]:
    given = getattr(options, "dram_budget", None)
    if given is not None:
        return int(given), "--dram-budget"
    cpu = next((name for name, d in platform.devices.items() if d.kind == "cpu"), None)
    if cpu is None:
        return None, ""
    memory = platform.memories[platform.memory_space(cpu)]
    weights = sum(w.data.nbytes for w in graph.weights.values())
    if weights <= memory.capacity:
        return None, ""
    return int(memory.capacity), f"the capacity of {platform.name}'s {memory.name}"


@register_pass("tile_flash", needs=(), provides=(), provides_results=("flash_plan",))
def tile_flash(graph: Graph, options: CompileOptions | None = None) -> PassResult:
    options = options or CompileOptions()
    platform = options.resolved_platform()
    budget, source = _budget(graph, options, platform)
    if budget is None:
        options.results["flash_plan"] = None
        return PassResult(graph, False)
    weight_bytes = sum(w.data.nbytes for w in graph.weights.values())
    predict = bool(getattr(options, "flash_predict", False))
    tiling = FlashTiling(budget, source, weight_bytes, predict=predict)
    options.results["flash_plan"] = tiling
    workspace = _workspace(graph)
    if weight_bytes + workspace <= budget:
        return PassResult(graph, False)
    if platform.flash is None:
        raise PassError(f"tile_flash: the weights ({weight_bytes / (1 << 20):.1f} MiB) exceed the DRAM budget of "
                        f"{budget / (1 << 20):.1f} MiB ({source}), and platform {platform.name} has no flash to stream "
                        "them from ([flash] in its file): use laptop-ssd (calibrated: hetflow calibrate --platform "
                        "laptop-ssd) or flash-edge")
    ffns = find_ffns(graph)
    if not ffns:
        raise PassError(f"tile_flash: the weights ({weight_bytes / (1 << 20):.1f} MiB) exceed the DRAM budget of "
                        f"{budget / (1 << 20):.1f} MiB ({source}), and the graph has no feed-forward layer to stream "
                        "(MatMul/Gemm -> Relu -> MatMul/Gemm with constant weights read by that layer only)")
    gated = [m.name for m in ffns if m.gate is not None]
    if predict and gated:
        raise PassError(f"tile_flash: flash_predict predicts which ReLU neurons fire; layer {gated[0]} is gated "
                        "(SwiGLU), whose neurons are never exactly zero: compile it without --flash-predict")
    layers = [FfnLayer(m.name, m.up.shape[0], m.up.shape[1], m.up.dtype.itemsize, gated=m.gate is not None,
                       activation="silu" if m.gate is not None else "relu") for m in ffns]
    resident = _resident_bytes(graph, ffns)
    curve = [(float(s), float(t)) for s, t in platform.flash.throughput]
    samples = _ffn_inputs(graph, ffns, options) if predict else None
    fractions = _active_fractions(ffns, samples) if samples is not None else None
    try:
        plan = plan_flash(layers, resident, budget, curve, predict=predict, window=DEFAULT_WINDOW,
                          workspace=workspace, **(fractions or {}))
    except FlashPlanError as exc:
        raise PassError(f"tile_flash: {exc}") from None
    tiling.plan = plan
    for match, layer_plan in zip(ffns, plan.layers):
        if layer_plan.streamed:
            tiling.streamed.append(_stream(graph, match, layer_plan, samples, predict))
    return PassResult(graph, bool(tiling.streamed))


def _resident_bytes(graph: Graph, ffns: list[FfnMatch]) -> int:
    """What stays in DRAM when every layer of ``ffns`` streams: the other weights, and each layer's biases."""
    streamed = sum(sum(w.data.nbytes for w in m.weights) for m in ffns)
    return (sum(w.data.nbytes for w in graph.weights.values()) - streamed
            + sum(m.b_up.nbytes + m.b_down.nbytes for m in ffns))


def _workspace(graph: Graph) -> int:
    """DRAM kept for activations, the runtime's own buffers and a short KV cache (``flash_plan.WORKSPACE``), or
    every value the graph computes at once when that is more."""
    from .flash_plan import WORKSPACE
    from .cost import _value_bytes
    return max(WORKSPACE, sum(_value_bytes(o) for n in graph.nodes for o in n.outputs))


def _stream(graph: Graph, match: FfnMatch, layer_plan, samples: dict[int, np.ndarray] | None, predict: bool) -> dict:
    """Replace the layer's nodes by one flash_ffn node; its up and down become weights the artifact writes to
    the flash image."""
    from hetflow.ir.flash_image import aligned_chunk_neurons, build_predictor
    hidden, neurons = match.up.shape
    dtype = match.up.dtype
    chunk = aligned_chunk_neurons(layer_plan.chunk_neurons, hidden, dtype, match.parts, neurons)
    name = match.name
    nodes = match.nodes
    up = graph.add_weight(graph.fresh_name(f"{name}.flash_up"), np.ascontiguousarray(match.up))
    b_up = graph.add_weight(graph.fresh_name(f"{name}.flash_b_up"), match.b_up)
    down = graph.add_weight(graph.fresh_name(f"{name}.flash_down"), np.ascontiguousarray(match.down))
    b_down = graph.add_weight(graph.fresh_name(f"{name}.flash_b_down"), match.b_down)
    inputs = [match.x, up, b_up, down, b_down]
    gated = match.gate is not None
    if gated:
        inputs.append(graph.add_weight(graph.fresh_name(f"{name}.flash_gate"), np.ascontiguousarray(match.gate)))
    attrs = {"layer": name, "activation": "silu" if gated else "relu", "gated": int(gated), "mode": "dense",
             "chunk_neurons": int(chunk), "bundled": 1, "window": 0, "capacity": 0, "margin": 0.0}
    info = {"layer": name, "hidden": hidden, "neurons": neurons, "gated": gated,
            "bytes": int(match.parts * match.up.nbytes),
            "chunk_neurons": int(chunk),
            "chunk_bytes": -(-chunk * match.parts * hidden * dtype.itemsize // ALIGN) * ALIGN,
            "rank": 0, "recall": None}
    if predict and layer_plan.rank > 0 and samples is not None:
        x = samples[id(match)]
        predictor, stats = build_predictor(match.up, match.b_up, layer_plan.rank, x, target_recall=PREDICTOR_RECALL)
        left = graph.add_weight(graph.fresh_name(f"{name}.predictor_left"), predictor.left)
        right = graph.add_weight(graph.fresh_name(f"{name}.predictor_right"), predictor.right)
        inputs += [left, right]
        attrs.update(mode="window", window=DEFAULT_WINDOW, capacity=int(layer_plan.capacity),
                     margin=float(predictor.margin))
        info.update(rank=int(stats["rank"]), recall=stats.get("recall"),
                    predicted_fraction=stats.get("predicted_fraction"), active_fraction=stats.get("active_fraction"),
                    relative_error=_prediction_error(match, predictor, x))
    out_type = match.out.type
    node = Node(FLASH_FFN_OP, inputs, [Value(graph.fresh_name(f"{name}_ffn"), out_type)], attrs, nodes[0].loc)
    graph.replace(nodes, node, {match.out: node.outputs[0]})
    for w in match.weights:
        if w.num_uses == 0 and w.name in graph.weights:
            graph.remove_weight(w.name)
    info["node"] = node.outputs[0].name
    return info


def _prediction_error(match: FfnMatch, predictor, x: np.ndarray) -> float:
    """The layer's output over the neurons predicted for each token alone (what decoding reads) against the
    exact output, on the calibration rows: the largest difference relative to the exact output's largest
    magnitude."""
    if not len(x):
        return 0.0
    up, down = match.up.astype(np.float32), match.down.astype(np.float32)
    hidden = np.maximum(x @ up + match.b_up, 0)
    exact = hidden @ down
    worst = 0.0
    for t, row in enumerate(x):
        ids = predictor.active(row[None])
        worst = max(worst, float(np.abs(hidden[t, ids] @ down[ids] - exact[t]).max()))
    return worst / max(float(np.abs(exact).max()), 1e-30)


def _ffn_inputs(graph: Graph, ffns: list[FfnMatch], options: CompileOptions) -> dict[int, np.ndarray]:
    """Each FFN's input rows [tokens, hidden] over the calibration inputs (the example inputs, else seeded
    random ones), each node run by its NumPy kernel."""
    from .quantize import _calibration_samples
    samples, _ = _calibration_samples(graph, getattr(options, "calibration_inputs", None))
    wanted = {id(m.x): id(m) for m in ffns}
    seen: dict[int, list[np.ndarray]] = {id(m): [] for m in ffns}
    kernels: dict[int, object] = {}
    last_read = {id(v): i for i, node in enumerate(graph.nodes) for v in node.inputs if v is not None}
    for sample in samples:
        env = {id(v): np.asarray(sample[v.name]) for v in graph.inputs if v.name in sample}
        if len(env) != len(graph.inputs):
            raise PassError("tile_flash: the example inputs lack some graph inputs (the predictor calibrates on them)")
        for v in graph.inputs:
            if id(v) in wanted:
                seen[wanted[id(v)]].append(env[id(v)].reshape(-1, env[id(v)].shape[-1]))
        for index, node in enumerate(graph.nodes):
            ins = [None if v is None else env[id(v)] if id(v) in env else v.data for v in node.inputs]
            for v in node.inputs:
                if v is not None and last_read.get(id(v)) == index and v.producer is not None:
                    env.pop(id(v), None)
            if id(node) not in kernels:
                kernels[id(node)] = make_kernel(node, graph.opset)
            for out, result in zip(node.outputs, kernels[id(node)](ins)):
                env[id(out)] = np.asarray(result)
                if id(out) in wanted:
                    a = env[id(out)]
                    seen[wanted[id(out)]].append(a.reshape(-1, a.shape[-1]).astype(np.float32))
    return {k: np.concatenate(v) for k, v in seen.items()}


def _active_fractions(ffns: list[FfnMatch], samples: dict[int, np.ndarray]) -> dict:
    """Per layer, the share of neurons a token fires (ReLU input > 0) on the calibration rows."""
    fractions = []
    for m in ffns:
        x = samples[id(m)]
        fractions.append(float(((x @ m.up.astype(np.float32) + m.b_up) > 0).mean()) if len(x) else 0.05)
    return {"active_fraction": fractions}


def streaming_budget(graph: Graph) -> int | None:
    """The DRAM budget under which every feed-forward layer tile_flash finds in ``graph`` (canonicalized) streams
    whole: the other weights, the workspace and two layers' read buffers, plus a page. None when the graph has no
    such layer, or when streaming all of them would not save room (fewer than three). For tests and the
    differential harness, which want the streaming path taken."""
    ffns = find_ffns(graph)
    if not ffns:
        return None
    weights = sum(w.data.nbytes for w in graph.weights.values())
    budget = _resident_bytes(graph, ffns) + 2 * max(m.parts * m.up.nbytes for m in ffns) + _workspace(graph) + ALIGN
    return budget if budget < weights + _workspace(graph) else None
