"""Differential testing: every compiled model computes what the model computes, on every platform preset,
placement and pipeline.

For each model of the zoo (``hetflow.examples.zoo``: tiny transformers/diffusers models with random weights,
the project's examples and the IR decode-step graphs) x platform preset x placement policy x pipeline (the
default one, and one without ``fuse``), the model is compiled with ``hetflow.compile``, run, and its outputs
compared with

  (a) the reference interpreter on the graph as imported (before any pass), and
  (b) torch eager, for torch models.

Random graphs (a hypothesis strategy: DAGs of elementwise ops, MatMul, reductions, Concat/Split,
Transpose/Reshape and Gather, with fan-out, built as ONNX models) go through the whole pipeline on a
randomly drawn preset, placement and pipeline, and are compared with ONNX Runtime running the same ONNX
model and with the interpreter.

Each seed group runs in fresh worker processes with ``PYTHONHASHSEED`` set to the seed; a worker captures
each model once (torch.export is the slow part) and reuses the capture for every configuration. On a
mismatch the harness names the first diverging value: it runs the interpreter over the compiled, placed
graph value by value and compares with what the runtime computed for each partition output (a traced
rerun snapshots each partition's outputs when written and its inputs when read, so a value another device
overwrote before its reader ran shows as "clobbered"), in node order.

    python benchmarks/differential.py                 # the full run: 41 models x 7 presets x 3 x 2, 3 seeds, 500 random graphs
    python benchmarks/differential.py --quick         # a small subset
    python benchmarks/differential.py --models bert,llama --platforms host,mobile-soc --placements split --seeds 0
    python benchmarks/differential.py --quantize int8 --models ex_mlp,bert --seeds 0 --random 0
    python benchmarks/differential.py --cost-model sim --platforms mobile-soc,duplex,pim-gpt,flash-edge --seeds 0
    python benchmarks/differential.py --quantize int8 --devices npu --models ex_mlp,ex_gpt2 --seeds 0 --random 0

``--devices npu`` places the model cases on the NPU alone (with ``--quantize int8``: every contraction it can
take in int8). ``--quantize int8`` compiles every model case with ``quantize="int8"`` (on ``QUANTIZE_PLATFORMS`` unless
--platforms says otherwise; random graphs stay float) and holds it to the stated int8 tolerance,
``hetflow.passes.quantize.INT8_RTOL`` (relative to the output's largest magnitude, as EAGER_RTOL), against
both the interpreter and eager; each case records how many contractions ran in int8, and the last lines say
in how many cases any did.

Prints a table (model x placement rows, a column per platform: pass/mismatch/error), writes the results
as JSON under benchmarks/results/, and ends with ``N cases, M mismatches, E errors``; exits 1 if M + E > 0.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"

PLATFORMS = ["host", "host+cuda", "mobile-soc", "duplex", "pim-gpt", "flash-edge", "laptop-ssd"]
PLACEMENTS = ["roofline", "optimal", "split"]
PIPELINES = {"full": None, "nofuse": "canonicalize,place,quantize,schedule,plan_memory"}  # quantize: a no-op
QUANTIZE_PLATFORMS = ["mobile-soc", "flash-edge"]   # the presets with an NPU that runs i8 (--quantize int8)
FLASH_PLATFORMS = ["laptop-ssd", "flash-edge"]       # the presets with [flash] (--flash)
FLASH = False
FLASH_DIR = None   # where --flash writes its artifacts (a temporary directory on the default disk)
SEEDS = [0, 1, 2]
RANDOM_GRAPHS = 500
TIME_LIMIT = 1.0            # the placement solver's limit per compile, seconds
EAGER_RTOL = 1e-4           # f32, relative to the output's largest magnitude
RANDOM_RTOL = 1e-4
COST_MODEL = "analytic"     # --cost-model sim: placement by the simulators' times (other groups go to the NPU/PIM)
SCALE_FLOOR = 1e-6          # an output whose largest magnitude is below this is compared absolutely

QUICK_MODELS = ["ex_mlp", "bert", "llama", "resnet", "ir_gpt2_decode"]
QUICK_PLATFORMS = ["host", "mobile-soc", "flash-edge"]
QUICK_RANDOM = 20
MODELS_PER_WORKER = 4
GRAPHS_PER_WORKER = 50


# --- results --------------------------------------------------------------------------------------------

@dataclass
class Case:
    model: str
    platform: str
    placement: str
    pipeline: str
    seed: int
    status: str = "pass"              # pass, mismatch, error
    errors: dict = field(default_factory=dict)   # reference name -> relative error (worst output)
    message: str = ""                 # the error, or the mismatch's one-line summary
    divergence: dict | None = None    # where a mismatch first shows (see ``locate_divergence``)
    seconds: float = 0.0
    quantize: str | None = None       # "int8": compiled with quantize="int8" (tolerance INT8_RTOL)
    detail: dict = field(default_factory=dict)    # random graphs: the graph's description; models: devices used

    @property
    def key(self) -> tuple:
        return (self.model, self.platform, self.placement, self.pipeline, self.seed)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| relative to want's largest magnitude; inf on a shape/dtype difference, a NaN in one but
    not the other, or any difference in an integer/bool output."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return float("inf")
    if want.size == 0:
        return 0.0
    if want.dtype.kind in "biu" or got.dtype.kind in "biu":
        return 0.0 if np.array_equal(got, want) else float("inf")
    g, w = got.astype(np.float64), want.astype(np.float64)
    nan_g, nan_w = np.isnan(g), np.isnan(w)
    if not np.array_equal(nan_g, nan_w):
        return float("inf")
    finite = ~nan_w
    if not finite.any():
        return 0.0
    g, w = g[finite], w[finite]
    if not np.array_equal(np.isinf(g), np.isinf(w)) or not np.array_equal(g[np.isinf(w)], w[np.isinf(w)]):
        return float("inf")
    ok = ~np.isinf(w)
    if not ok.any():
        return 0.0
    scale = max(float(np.max(np.abs(w[ok]))), SCALE_FLOOR)
    return float(np.max(np.abs(g[ok] - w[ok]))) / scale


def worst_error(outputs: list, reference: list) -> float:
    if len(outputs) != len(reference):
        return float("inf")
    return max((relative_error(g, w) for g, w in zip(outputs, reference)), default=0.0)


class CaseTimeout(BaseException):
    """A case ran past ``--case-timeout`` (raised by SIGALRM in the worker's main thread; a BaseException so
    that the compiler's own ``except Exception`` wrappers let it through)."""


CASE_TIMEOUT = 60.0


@contextlib.contextmanager
def deadline(seconds: float | None):
    """Raise ``CaseTimeout`` in this (main) thread after ``seconds``: a compile or run that hangs is one error,
    not a stalled worker. A no-op off the main thread or without SIGALRM."""
    usable = seconds and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise CaseTimeout(f"the case ran past {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _where_stuck(exc: BaseException) -> str:
    """The innermost hetflow frame of a timeout's traceback: where the case was when time ran out."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/hetflow/" in f.filename or "/work/" in f.filename and "differential" not in f.filename]
    frame = (ours or frames or [None])[-1]
    return f" in {Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.lineno} ({frame.name})" if frame else ""


def _failure(exc: BaseException) -> str:
    if isinstance(exc, CaseTimeout):
        return f"{_first_line(exc)}{_where_stuck(exc)}"
    cause = exc
    while cause.__cause__ is not None and isinstance(cause.__cause__, CaseTimeout):
        cause = cause.__cause__
    if isinstance(cause, CaseTimeout):
        return f"{_first_line(cause)}{_where_stuck(cause)}"
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:400]


# --- capturing once: hetflow.compile with a cached capture ----------------------------------------------------

def _capture_cache():
    """``hetflow.compile`` captures the model on every call; the harness compiles each model 42 times, so
    ``hetflow.api.capture`` is wrapped once per process by one that returns a clone of a cached capture for the
    models registered here (keyed by the model object; every compile gets its own clone of the imported graph)
    and calls the original for any other. Returns (cache, original capture)."""
    import hetflow.api as api
    if not hasattr(api.capture, "_differential_cache"):
        original, cache = api.capture, {}

        def capture(model, example_inputs=None, dynamic_shapes=None, timings=None):
            cached = cache.get(id(model)) if dynamic_shapes is None else None
            if cached is None:
                return original(model, example_inputs, dynamic_shapes, timings)
            return cached[1].clone(), cached[2]

        capture._differential_cache, capture._original = cache, original
        api.capture = capture
    return api.capture._differential_cache, api.capture._original


class IRModel:
    """A model given directly as an IR graph (the decode-step graphs): compiled through the cached capture."""

    def __init__(self, graph):
        self.graph = graph


def capture_once(model, inputs):
    """The imported graph (before any pass) and the torch capture (None for IR graphs), cached for compile."""
    cache, original = _capture_cache()
    if isinstance(model, IRModel):
        graph, torch_capture = model.graph, None
    else:
        graph, torch_capture = original(model, inputs)
    cache[id(model)] = (model, graph, torch_capture)  # the model is held so that its id stays its own
    return graph.clone(), torch_capture


def release(model) -> None:
    _capture_cache()[0].pop(id(model), None)


# --- the first diverging value ----------------------------------------------------------------------------------

def trace_values(graph, feeds: dict) -> dict[str, np.ndarray]:
    """Every top-level value of ``graph`` as the reference interpreter computes it (groups run their bodies)."""
    from hetflow.ir import make_kernel
    from hetflow.ir.interpreter import _as_declared, check_inputs
    env = dict(check_inputs(graph, feeds))
    for w in graph.weights.values():
        env[w.name] = w.data
    for node in graph.nodes:
        results = make_kernel(node, graph.opset)([None if v is None else env[v.name] for v in node.inputs])
        for out, result in zip(node.outputs, results):
            env[out.name] = _as_declared(result, out.type)
    return env


def _host(value):
    if isinstance(value, np.ndarray):
        return np.array(value, copy=True)
    try:
        return np.array(value.detach().cpu().numpy(), copy=True)  # a torch tensor (GPU arenas)
    except AttributeError:
        return np.array(value, copy=True)


def _traced_run(executor, feeds: dict):
    """Run once with ``_execute`` wrapped: each partition's inputs as it reads them and outputs as it wrote them."""
    read: dict[int, dict] = {}
    wrote: dict[int, dict] = {}
    original = executor._execute

    def traced(index, env, *args, **kwargs):
        part = executor.partitions[index]
        buffers = executor.buffers
        read[index] = {n: _host(buffers[n] if n in buffers else env[n]) for n in part.input_names
                       if n in buffers or n in env}
        result = original(index, env, *args, **kwargs)
        wrote[index] = {n: _host(buffers[n] if n in buffers else env[n]) for n in part.output_names
                        if n in buffers or n in env}
        return result

    own = executor.__dict__.get("_execute")  # an instance's own wrapper (a test's injected fault) stays
    executor._execute = traced
    try:
        executor.run(feeds)
    finally:
        if own is not None:
            executor._execute = own
        else:
            del executor._execute  # the class's method again
    return read, wrote


def _overwritten_after_run(executor) -> set[str]:
    """Values whose arena bytes a value of a later partition shares: after the run they hold that one's bytes."""
    spans = {}
    for name, buffer in executor.buffers.items():
        if isinstance(buffer, np.ndarray) and name in executor.producer:
            low = buffer.__array_interface__["data"][0]
            spans[name] = (low, low + max(1, buffer.nbytes), executor.producer[name])
    gone = set()
    for a, (lo_a, hi_a, pa) in spans.items():
        for b, (lo_b, hi_b, pb) in spans.items():
            if a != b and pb > pa and lo_a < hi_b and lo_b < hi_a:
                gone.add(a)
                break
    return gone


def locate_divergence(compiled, feeds: dict, rtol: float, reference_outputs: list | None = None) -> dict:
    """Where a wrong answer first shows, in node order of the compiled graph.

    ``where`` is ``pipeline`` when the interpreter on the compiled graph already gives a wrong output (a pass
    changed the semantics), else ``runtime``; for the runtime, ``kind`` is ``computed`` (a partition wrote a
    wrong value), ``clobbered`` (written right, but another write changed it before a reader read it) or
    ``post-run`` (only the arena after the run shows it). The value, its node, partition and device are named."""
    graph = compiled.graph
    info: dict = {}
    try:
        expected = trace_values(graph, feeds)
    except Exception as exc:  # noqa: BLE001
        return {"where": "trace", "message": f"the interpreter failed on the compiled graph: {_first_line(exc)}"}
    producer_node = {out.name: node for node in graph.nodes for out in node.outputs}
    order = [out.name for node in graph.nodes for out in node.outputs]
    if reference_outputs is not None:
        for v, want in zip(graph.outputs, reference_outputs):
            err = relative_error(expected[v.name], want)
            if err > rtol:
                info = {"where": "pipeline", "value": v.name, "error": err,
                        "node": producer_node[v.name].describe() if v.name in producer_node else "",
                        "message": f"the interpreter on the compiled graph already gives a wrong {v.name!r}: "
                                   "a pass changed the semantics"}
                return info
    executor = compiled.executor
    parts = executor.partitions
    producer = {n: i for i, p in enumerate(parts) for n in p.output_names}

    def describe(name, kind, err, partition=None, reader=None):
        i = producer.get(name) if partition is None else partition
        node = producer_node.get(name)
        found = {"where": "runtime", "kind": kind, "value": name, "error": err,
                 "node": node.describe() if node is not None else "",
                 "partition": i, "device": parts[i].device if i is not None else None}
        if reader is not None:
            found.update(reader=reader, reader_device=parts[reader].device)
        what = {"computed": "written wrong by", "clobbered": "written right by",
                "post-run": "wrong in the arena after the run; made by"}[kind]
        found["message"] = (f"first diverging value {name!r} ({found['node']}): {what} partition {i} on "
                            f"{found['device']}" + (f", changed before partition {reader} on "
                                                     f"{parts[reader].device} read it" if reader is not None else "")
                            + f" (relative error {err:.3g})")
        return found

    # (1) the arena after the failing run (the values no later partition overwrote)
    post = None
    gone = _overwritten_after_run(executor)
    for name in order:
        if name in executor.buffers and name not in gone and name in expected:
            err = relative_error(_host(executor.buffers[name]), expected[name])
            if err > rtol:
                post = describe(name, "post-run", err)
                break
    # (2) a traced rerun: values as written and as read
    try:
        read, wrote = _traced_run(executor, feeds)
    except Exception as exc:  # noqa: BLE001
        return post or {"where": "runtime", "message": f"the traced rerun failed: {_first_line(exc)}"}
    rank = {name: i for i, name in enumerate(order)}
    candidates = []
    for i, outputs in wrote.items():
        for name, value in outputs.items():
            if name in expected:
                err = relative_error(value, expected[name])
                if err > rtol:
                    candidates.append((rank.get(name, len(rank)), 0, describe(name, "computed", err, i)))
    for j, inputs in read.items():
        for name, value in inputs.items():
            if name in expected and name in producer:
                err = relative_error(value, expected[name])
                if err > rtol:
                    candidates.append((rank.get(name, len(rank)), 1, describe(name, "clobbered", err, reader=j)))
    if candidates:
        found = min(candidates, key=lambda c: (c[0], c[1]))[2]
        if post is not None:
            found["post_run"] = post["message"]
        return found
    if post is not None:
        post["message"] += " (the traced rerun computed every partition right: timing-dependent)"
        return post
    return {"where": "runtime", "kind": "not reproduced",
            "message": "every partition output matched the interpreter in the traced rerun and in the arena "
                       "(timing-dependent, or in the outputs' copy-out)"}


# --- models -------------------------------------------------------------------------------------------------

def _flatten_torch(outputs) -> list[np.ndarray]:
    import torch
    from torch.utils import _pytree as pytree
    return [t.detach().cpu().numpy() for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]


def run_model(name: str, configs: list[tuple[str, str, str]], seed: int, time_limit: float = TIME_LIMIT,
              log=None, case_timeout: float | None = CASE_TIMEOUT, quantize: str | None = None,
              devices: list[str] | None = None) -> list[Case]:
    """One zoo model under every (platform, placement, pipeline) in ``configs``, captured once; ``quantize``:
    compiled with it, to the int8 tolerance; ``devices``: placed only on these."""
    import hetflow
    from hetflow.examples.zoo import ZOO
    from hetflow.runtime.interpreter import Interpreter
    entry = ZOO[name]
    cases = [Case(name, p, pl, pipe, seed, quantize=quantize) for p, pl, pipe in configs]
    start = time.perf_counter()
    try:
        built, inputs = entry.build()
        if entry.kind == "ir":
            model, feeds, eager = IRModel(built), dict(inputs), None
            call_args = ()
        else:
            import torch
            model = built
            with torch.no_grad():
                eager = _flatten_torch(model(*inputs))
        graph, torch_capture = capture_once(model, inputs)
        if torch_capture is not None:
            feeds = {n: t.detach().numpy() for n, t in zip(torch_capture.input_names, inputs)}
            call_args = tuple(inputs)
        imported = Interpreter(graph).run(feeds)
    except Exception as exc:  # noqa: BLE001
        message = f"capture/reference failed: {_first_line(exc)}"
        for case in cases:
            case.status, case.message = "error", message
        return cases
    rtol = entry.rtol
    if quantize:
        from hetflow.passes.quantize import INT8_RTOL
        rtol = max(rtol, INT8_RTOL)
    # the imported graph against eager, once: a difference here is the frontend's or an interpreter kernel's
    capture_error = worst_error(imported, eager) if eager is not None else 0.0
    setup = time.perf_counter() - start
    budget = _streaming_budget(graph) if FLASH else None
    for case in cases:
        began = time.perf_counter()
        try:
            with deadline(case_timeout):
                flash = budget is not None and case.platform in FLASH_PLATFORMS and case.pipeline == "full"
                compiled = hetflow.compile(model, call_args if torch_capture is not None else None,
                                           platform=case.platform, placement=case.placement,
                                           passes=PIPELINES[case.pipeline], time_limit=time_limit,
                                           quantize=quantize, devices=devices, cost_model=COST_MODEL,
                                           dram_budget=budget if flash else None,
                                           cache=False)  # (every case runs the passes it tests)
                if compiled.quantization is not None:
                    case.detail["int8_contractions"] = len(compiled.quantization.contractions)
                if flash:   # run the saved artifact: its FFN layers stream from its flash image
                    case.detail["flash_layers"] = len(compiled.flash_plan.streamed)
                    got = _run_saved(compiled, feeds)
                elif torch_capture is not None:
                    import torch
                    with torch.no_grad():
                        got = _flatten_torch(compiled(*call_args))
                else:
                    got = list(compiled.executor.run(feeds).values())
                case.errors["interpreter"] = worst_error(got, imported)
                if eager is not None:
                    case.errors["eager"] = worst_error(got, eager)
                case.detail["devices"] = sorted({n.meta.get("device", "?") for n in compiled.graph.nodes})
                bad = {k: v for k, v in case.errors.items() if not v <= rtol}
                if bad:
                    case.status = "mismatch"
                    which = ", ".join(f"{k} {v:.3g}" for k, v in bad.items())
                    if set(bad) == {"eager"} and not capture_error <= rtol:
                        case.divergence = {"where": "frontend", "error": capture_error,
                                           "message": "the compiled model equals the interpreter on the imported "
                                                      "graph, which already differs from eager (relative error "
                                                      f"{capture_error:.3g}): the torch frontend or an "
                                                      "interpreter kernel"}
                    else:
                        try:
                            case.divergence = locate_divergence(compiled, feeds, rtol, imported)
                        except (Exception, CaseTimeout) as exc:  # noqa: BLE001
                            case.divergence = {"message": f"locating the divergence failed: {_failure(exc)}"}
                    case.message = f"relative error vs {which} (tolerance {rtol:g}); {case.divergence.get('message', '')}"
        except (Exception, CaseTimeout) as exc:  # noqa: BLE001
            case.status, case.message = "error", _failure(exc)
            case.detail["traceback"] = traceback.format_exc(limit=-4)
        case.seconds = time.perf_counter() - began
        if log:
            log(case)
    release(model)
    if cases:
        cases[0].detail["setup_seconds"] = setup
    return cases


def _streaming_budget(graph) -> int | None:
    """With --flash: the budget that streams every ReLU FFN layer of the model (None: it has too few)."""
    from hetflow.passes.tile_flash import streaming_budget
    from hetflow.pipeline import run_pipeline
    canonical, _ = run_pipeline(graph.clone(), "canonicalize")
    return streaming_budget(canonical)


def _run_saved(compiled, feeds: dict) -> list:
    """The compiled model saved, loaded by the runtime (its streamed layers read from the flash image) and run."""
    from hetflow.runtime import load
    with tempfile.TemporaryDirectory(dir=FLASH_DIR) as directory:
        compiled.save(Path(directory) / "artifact")
        loaded = load(Path(directory) / "artifact")
        streamed = [r for r in loaded.executor.runners if getattr(r, "streamed", False)]
        if len(streamed) != len(compiled.flash_plan.streamed):
            raise RuntimeError(f"{len(compiled.flash_plan.streamed)} FFN layers planned to stream, "
                               f"{len(streamed)} streamed from the loaded artifact")
        names = [v.name for v in loaded.graph.inputs]
        return list(loaded.run({n: feeds[n] for n in names}).values())


# --- random graphs ---------------------------------------------------------------------------------------------

UNARY = ["Relu", "Tanh", "Sigmoid", "Neg", "Abs", "Softsign"]
BINARY = ["Add", "Mul", "Sub", "Max", "Min", "Div"]
REDUCE = ["ReduceSum", "ReduceMean", "ReduceMax"]
OPS = ["unary", "binary", "matmul", "reduce", "concat", "split", "transpose", "reshape", "gather", "softmax"]
MAX_NUMEL = 16384


def random_graph_strategy():
    """A hypothesis strategy: ``(onnx.ModelProto, feeds, description)`` of a random DAG with static shapes.

    Each step applies a random op to values drawn from all those made so far (so values fan out to several
    readers); weights are initializers. The outputs are the last value and a few others."""
    from hypothesis import strategies as st
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dims = st.one_of(st.integers(1, 6), st.sampled_from([8, 12, 16, 32, 64]))  # some wide enough to offload

    @st.composite
    def graphs(draw):
        rng_seed = draw(st.integers(0, 2 ** 31 - 1))
        rng = np.random.default_rng(rng_seed)
        values: list[tuple[str, tuple]] = []      # (name, shape), all float32
        nodes, inits, inputs = [], [], []
        counter = [0]

        def fresh(hint):
            counter[0] += 1
            return f"{hint}{counter[0]}"

        def init(shape, low=-1.0, high=1.0, dtype=np.float32, data=None):
            name = fresh("w")
            array = data if data is not None else rng.uniform(low, high, size=shape).astype(dtype)
            inits.append(numpy_helper.from_array(np.asarray(array), name))
            return name

        def add(op, ins, shapes, **attrs):
            outs = [fresh(op.lower()) for _ in shapes]
            nodes.append(helper.make_node(op, ins, outs, name=fresh("n"), **attrs))
            for o, s in zip(outs, shapes):
                if int(np.prod(s)) <= MAX_NUMEL:
                    values.append((o, tuple(s)))
            return outs

        for _ in range(draw(st.integers(1, 2))):
            shape = tuple(draw(st.lists(dims, min_size=1, max_size=4)))
            name = fresh("x")
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
            values.append((name, shape))
        n_steps = draw(st.integers(3, 20))
        used_ops = []
        for _ in range(n_steps):
            op = draw(st.sampled_from(OPS))
            x, shape = values[draw(st.integers(0, len(values) - 1))]
            rank = len(shape)
            if op == "unary":
                kind = draw(st.sampled_from(UNARY))
                add(kind, [x], [shape])
            elif op == "binary":
                kind = draw(st.sampled_from(BINARY))
                same = [v for v in values if v[1] == shape]
                if kind != "Div" and draw(st.booleans()) and same:
                    y = same[draw(st.integers(0, len(same) - 1))][0]   # fan-out: possibly x itself
                    out = shape
                else:  # a broadcast weight: a suffix of the shape with some dims 1
                    k = draw(st.integers(0, rank))
                    wshape = tuple(d if draw(st.booleans()) else 1 for d in shape[rank - k:])
                    y = init(wshape, 0.5, 2.0) if kind == "Div" else init(wshape)
                    out = shape
                ins = [x, y] if draw(st.booleans()) or kind == "Div" else [y, x]
                add(kind, ins, [out])
            elif op == "matmul":
                n = draw(dims)
                other = [v for v in values if len(v[1]) >= 2 and rank >= 2 and v[1][-2] == shape[-1]
                         and v[1][:-2] == shape[:-2]]
                if other and draw(st.booleans()):
                    y, yshape = other[draw(st.integers(0, len(other) - 1))]
                    add("MatMul", [x, y], [shape[:-1] + yshape[-1:]])
                else:
                    w = init((shape[-1], n), -0.5, 0.5)
                    add("MatMul", [x, w], [shape[:-1] + (n,)])
            elif op == "reduce":
                kind = draw(st.sampled_from(REDUCE))
                axes = sorted(set(draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank))))
                keep = draw(st.booleans())
                if not keep and len(axes) == rank:
                    keep = True
                out = tuple((1 if i in axes else d) for i, d in enumerate(shape)) if keep else \
                    tuple(d for i, d in enumerate(shape) if i not in axes)
                a = init(None, data=np.array(axes, np.int64))
                add(kind, [x, a], [out], keepdims=int(keep))
            elif op == "concat":
                axis = draw(st.integers(0, rank - 1))
                same = [v[0] for v in values if v[1] == shape]
                parts = [x] + [same[draw(st.integers(0, len(same) - 1))] for _ in range(draw(st.integers(0, 2)))]
                extra = draw(st.integers(0, 3))
                sizes = [shape[axis]] * len(parts)
                if extra:
                    parts.append(init(shape[:axis] + (extra,) + shape[axis + 1:]))
                    sizes.append(extra)
                add("Concat", parts, [shape[:axis] + (sum(sizes),) + shape[axis + 1:]], axis=axis)
            elif op == "split":
                axes = [i for i, d in enumerate(shape) if d >= 2]
                if not axes:
                    add("Relu", [x], [shape])
                    continue
                axis = axes[draw(st.integers(0, len(axes) - 1))]
                size = shape[axis]
                cut = sorted(set(draw(st.lists(st.integers(1, size - 1), min_size=1, max_size=2))))
                pieces = [b - a for a, b in zip([0] + cut, cut + [size])]
                split = init(None, data=np.array(pieces, np.int64))
                add("Split", [x, split], [shape[:axis] + (p,) + shape[axis + 1:] for p in pieces], axis=axis)
            elif op == "transpose":
                perm = list(draw(st.permutations(list(range(rank)))))
                add("Transpose", [x], [tuple(shape[p] for p in perm)], perm=perm)
            elif op == "reshape":
                numel = int(np.prod(shape))
                choice = draw(st.sampled_from(["flatten", "merge", "split", "unsqueeze"]))
                if choice == "flatten" or rank == 1 and choice == "merge":
                    new = (numel,)
                elif choice == "merge":
                    i = draw(st.integers(0, rank - 2))
                    new = shape[:i] + (shape[i] * shape[i + 1],) + shape[i + 2:]
                elif choice == "split":
                    i = draw(st.integers(0, rank - 1))
                    d = shape[i]
                    factors = [f for f in range(2, d) if d % f == 0] or [1]
                    f = factors[draw(st.integers(0, len(factors) - 1))]
                    new = shape[:i] + (f, d // f) + shape[i + 1:]
                else:
                    i = draw(st.integers(0, rank))
                    new = shape[:i] + (1,) + shape[i:]
                if len(new) > 5:
                    new = (numel,)
                spec = list(new)
                if draw(st.booleans()):
                    spec[draw(st.integers(0, len(spec) - 1))] = -1
                add("Reshape", [x, init(None, data=np.array(spec, np.int64))], [new])
            elif op == "gather":
                axis = draw(st.integers(0, rank - 1))
                size = shape[axis]
                ishape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)))
                idx = rng.integers(-size, size, size=ishape).astype(np.int64)
                out = shape[:axis] + ishape + shape[axis + 1:]
                if len(out) == 0 or len(out) > 5:
                    add("Neg", [x], [shape])
                    continue
                add("Gather", [x, init(None, data=idx)], [out], axis=axis)
            elif op == "softmax":
                add("Softmax", [x], [shape], axis=draw(st.integers(-rank, rank - 1)))
            used_ops.append(nodes[-1].op_type if nodes else op)
        produced = [v for v in values if v[0] not in {i.name for i in inputs}]
        if not produced:
            x, shape = values[0]
            add("Tanh", [x], [shape])
            produced = [values[-1]]
        outs = [produced[-1]]
        for v in draw(st.lists(st.sampled_from(produced), max_size=2)):
            if v not in outs:
                outs.append(v)
        graph = helper.make_graph(nodes, "random", inputs,
                                  [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outs],
                                  initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 9
        onnx.checker.check_model(model)
        feeds = {i.name: rng.standard_normal(
            [d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32) for i in inputs}
        structure = repr([(i.name, [d.dim_value for d in i.type.tensor_type.shape.dim]) for i in inputs]
                         + [(n.op_type, list(n.input), list(n.output), str(n.attribute)) for n in nodes]
                         + [(n, s) for n, s in outs])
        outline = repr([(i.name, [d.dim_value for d in i.type.tensor_type.shape.dim]) for i in inputs]
                       + [n.op_type for n in nodes])
        description = {"nodes": len(nodes), "ops": sorted({n.op_type for n in nodes}), "rng_seed": rng_seed,
                       "outputs": [n for n, _ in outs], "structure": hash_text(structure),
                       "outline": hash_text(outline)}
        return model, feeds, description

    return graphs()


def hash_text(text: str) -> str:
    import hashlib
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_random_graph(model, feeds: dict, platform: str, placement: str, pipeline: str, seed: int,
                       index: int, time_limit: float = TIME_LIMIT, case_timeout: float | None = CASE_TIMEOUT) -> Case:
    """One random ONNX graph: hetflow (compiled, run) against ONNX Runtime and the interpreter."""
    import onnxruntime as ort
    import hetflow
    from hetflow.frontends.onnx import import_onnx
    from hetflow.runtime.interpreter import Interpreter
    case = Case(f"random#{index}", platform, placement, pipeline, seed)
    began = time.perf_counter()
    try:
        with deadline(case_timeout):
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.intra_op_num_threads = 1
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            expected = session.run(None, feeds)
            imported = import_onnx(model)
            reference = Interpreter(imported).run(feeds)
            case.errors["interpreter_vs_ort"] = worst_error(reference, expected)
            compiled = hetflow.compile(model, platform=platform, placement=placement, passes=PIPELINES[pipeline],
                                       time_limit=time_limit, cost_model=COST_MODEL, cache=False)
            got = list(compiled.executor.run(feeds).values())
            case.errors["ort"] = worst_error(got, expected)
            case.errors["interpreter"] = worst_error(got, reference)
            case.detail["devices"] = sorted({n.meta.get("device", "?") for n in compiled.graph.nodes})
            bad = {k: v for k, v in case.errors.items() if not v <= RANDOM_RTOL}
            if bad:
                case.status = "mismatch"
                which = ", ".join(f"{k} {v:.3g}" for k, v in bad.items())
                if set(bad) == {"interpreter_vs_ort"}:
                    case.message = f"the interpreter disagrees with ONNX Runtime on the imported graph ({which})"
                else:
                    try:
                        case.divergence = locate_divergence(compiled, feeds, RANDOM_RTOL, reference)
                    except (Exception, CaseTimeout) as exc:  # noqa: BLE001
                        case.divergence = {"message": f"locating the divergence failed: {_failure(exc)}"}
                    case.message = f"relative error vs {which}; {case.divergence.get('message', '')}"
    except (Exception, CaseTimeout) as exc:  # noqa: BLE001
        case.status, case.message = "error", _failure(exc)
        case.detail["traceback"] = traceback.format_exc(limit=-4)
    case.seconds = time.perf_counter() - began
    return case


def run_random(start: int, count: int, seed: int, platforms: list[str], placements: list[str],
               pipelines: list[str], time_limit: float = TIME_LIMIT, log=None, save_failing: Path | None = None,
               case_timeout: float | None = CASE_TIMEOUT) -> list[Case]:
    """Random graphs ``start .. start+count-1`` of this seed group, each on a drawn preset, placement and pipeline.

    Drawn with hypothesis (generation only, no database, derandomised per seed and start so a run repeats)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st
    cases: list[Case] = []
    seen: set[tuple] = set()
    configs = [(p, pl, pipe) for p in platforms for pl in placements for pipe in pipelines]
    # graph k gets configuration order[k]: a seeded shuffle, cycled, so the presets, placements and pipelines
    # are drawn evenly (hypothesis's own draws favour small values: the first of a list, host and roofline)
    rng = np.random.default_rng([seed, start])
    order = [configs[i] for i in rng.permutation(len(configs))]
    strategy = random_graph_strategy()

    @hypothesis_seed(seed * 1_000_003 + start)
    @settings(max_examples=20 * count, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def draw(drawn):
        model, feeds, description = drawn
        platform, placement, pipeline = order[len(cases) % len(order)]
        # hypothesis explores near a graph it drew (the same op sequence, another shape or wiring): one graph
        # of each outline (inputs and op sequence)
        if len(cases) >= count or description["outline"] in seen:
            return
        seen.add(description["outline"])
        case = check_random_graph(model, feeds, platform, placement, pipeline, seed, start + len(cases), time_limit,
                                  case_timeout)
        case.detail.update(description)
        if case.status != "pass" and save_failing is not None:
            save_failing.mkdir(parents=True, exist_ok=True)
            path = save_failing / f"random_s{seed}_{case.model.split('#')[1]}.onnx"
            path.write_bytes(model.SerializeToString())
            np.savez(path.with_suffix(".npz"), **feeds)
            case.detail["saved"] = str(path)
        cases.append(case)
        if log:
            log(case)

    draw()
    return cases


# --- workers and the driver ------------------------------------------------------------------------------------

def worker_main(args) -> int:
    """One process: the given models (and/or random graphs) of one seed group; results as JSON lines."""
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass
    configs = [(p, pl, pipe) for p in args.platforms for pl in args.placements for pipe in args.pipelines]
    out = open(args.out, "a", buffering=1)

    def log(case: Case) -> None:
        out.write(json.dumps(asdict(case)) + "\n")

    for name in args.models:
        run_model(name, configs, args.seed, args.time_limit, log=log, case_timeout=args.case_timeout,
                  quantize=args.quantize, devices=args.devices)
    if args.random_count:
        save = Path(args.save_failing) if args.save_failing else None
        run_random(args.random_start, args.random_count, args.seed, args.platforms, args.placements,
                   args.pipelines, args.time_limit, log=log, save_failing=save, case_timeout=args.case_timeout)
    out.close()
    return 0


@dataclass
class Task:
    seed: int
    models: list[str]
    random_start: int = 0
    random_count: int = 0

    def expected(self, configs) -> list[tuple]:
        keys = [(m, p, pl, pipe, self.seed) for m in self.models for p, pl, pipe in configs]
        return keys


def plan_tasks(models, seeds, random_total, models_per_worker, graphs_per_worker) -> list[Task]:
    tasks = []
    for seed in seeds:
        for i in range(0, len(models), models_per_worker):
            tasks.append(Task(seed, models[i:i + models_per_worker]))
    per_seed = [random_total // len(seeds) + (1 if k < random_total % len(seeds) else 0) for k in range(len(seeds))]
    for seed, count in zip(seeds, per_seed):
        for start in range(0, count, graphs_per_worker):
            tasks.append(Task(seed, [], start, min(graphs_per_worker, count - start)))
    # the random-graph chunks first, then models, longest first: the two cores stay busy to the end
    return tasks


def run_driver(args) -> list[dict]:
    configs = [(p, pl, pipe) for p in args.platforms for pl in args.placements for pipe in args.pipelines]
    tasks = plan_tasks(args.models, args.seeds, args.random, args.models_per_worker, args.graphs_per_worker)
    tmp = Path(tempfile.mkdtemp(prefix="hetflow-differential-"))
    pending = list(enumerate(tasks))
    running: dict[int, tuple] = {}
    results: list[dict] = []
    total = sum(len(t.models) for t in tasks) * len(configs) + args.random * 1
    done = [0]
    began = time.perf_counter()

    def launch(index: int, task: Task):
        out = tmp / f"task{index}.jsonl"
        command = [sys.executable, str(HERE), "--worker", "--seed", str(task.seed),
                   "--models", ",".join(task.models) or "-", "--platforms", ",".join(args.platforms),
                   "--placements", ",".join(args.placements), "--pipelines", ",".join(args.pipelines),
                   "--time-limit", str(args.time_limit), *(["--quantize", args.quantize] if args.quantize else []),
                   *(["--devices", ",".join(args.devices)] if args.devices else []),
                   "--cost-model", args.cost_model, *(["--flash"] if args.flash else []),
                   "--case-timeout", str(args.case_timeout), "--out", str(out),
                   "--random-start", str(task.random_start), "--random-count", str(task.random_count)]
        if args.save_failing:
            command += ["--save-failing", args.save_failing]
        env = dict(os.environ, PYTHONHASHSEED=str(task.seed), OMP_NUM_THREADS="1",
                   TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
        log = open(tmp / f"task{index}.log", "w")
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        running[index] = (proc, task, out, time.perf_counter(), log)

    def collect(index: int, rc: int | None, reason: str = "") -> None:
        proc, task, out, started, log = running.pop(index)
        log.close()
        rows = []
        if out.exists():
            for line in out.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        seen = {(r["model"], r["platform"], r["placement"], r["pipeline"], r["seed"]) for r in rows}
        missing = [k for k in task.expected(configs) if k not in seen]
        random_missing = task.random_count - sum(r["model"].startswith("random#") for r in rows)
        if missing or random_missing > 0:
            tail = (tmp / f"task{index}.log").read_text().strip().splitlines()[-3:]
            why = reason or f"the worker exited with status {rc}"
            message = f"{why} before this case ran: {' | '.join(tail)[-300:]}"
            for k in missing:
                rows.append(asdict(Case(*k, status="error", message=message)))
            for j in range(max(0, random_missing)):
                rows.append(asdict(Case(f"random#{task.random_start + task.random_count - 1 - j}?", "-", "-", "-",
                                        task.seed, status="error", message=message)))
        results.extend(rows)
        done[0] += len(rows)
        bad = sum(r["status"] != "pass" for r in rows)
        what = ",".join(task.models) if task.models else f"random {task.random_start}+{task.random_count}"
        print(f"[{time.perf_counter() - began:7.0f}s] seed {task.seed} {what}: {len(rows)} cases, {bad} failing "
              f"({done[0]}/{total})", flush=True)

    try:
        while pending or running:
            while pending and len(running) < args.jobs:
                launch(*pending.pop(0))
            time.sleep(0.5)
            for index in list(running):
                proc, task, _, started, _ = running[index]
                rc = proc.poll()
                if rc is not None:
                    collect(index, rc)
                elif args.worker_timeout and time.perf_counter() - started > args.worker_timeout:
                    proc.kill()
                    proc.wait()
                    collect(index, None, f"the worker ran past {args.worker_timeout:.0f} s and was stopped")
    finally:
        for proc, *_ in running.values():
            proc.kill()
    return results


def summarise(rows: list[dict], platforms: list[str], placements: list[str]) -> str:
    """The table: a row per (model, placement), a column per platform: pass/mismatch/error (all pipelines, seeds)."""
    counts: dict[tuple, list[int]] = {}
    models = []
    for r in rows:
        model = "random graphs" if r["model"].startswith("random#") else r["model"]
        if model not in models:
            models.append(model)
        slot = {"pass": 0, "mismatch": 1, "error": 2}.get(r["status"], 2)
        counts.setdefault((model, r["placement"], r["platform"]), [0, 0, 0])[slot] += 1
    platforms = platforms + sorted({k[2] for k in counts} - set(platforms))
    placements = placements + sorted({k[1] for k in counts} - set(placements))
    width = max([len(m) for m in models] + [12])
    header = f"{'model':<{width}}  {'placement':<9}  " + "  ".join(f"{p:>11}" for p in platforms)
    lines = [header, "-" * len(header)]
    for model in models:
        for placement in placements:
            cells = []
            present = False
            for platform in platforms:
                c = counts.get((model, placement, platform))
                if c is None:
                    cells.append(f"{'':>11}")
                    continue
                present = True
                cells.append(f"{c[0]}/{c[1]}/{c[2]}".rjust(11))
            if present:
                lines.append(f"{model:<{width}}  {placement:<9}  " + "  ".join(cells))
    lines.append("(cells: pass/mismatch/error over pipelines and seeds)")
    return "\n".join(lines)


def failures_report(rows: list[dict], limit: int = 40) -> str:
    """The mismatches and errors, grouped by message (the first diverging value, or the error's first line)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["status"] == "pass":
            continue
        div = r.get("divergence") or {}
        if r["status"] == "mismatch" and div:
            key = f"mismatch [{div.get('where', '?')}/{div.get('kind', '')}] {div.get('message', r['message'])}"
        else:
            key = f"{r['status']}: {r['message']}"
        key = re.sub(r"\.py:(\d+|None) \(", ".py (", key)  # a timeout's line within a function: one group
        key = re.sub(r"relative error [0-9.e+-]+", "relative error ...", key)
        groups.setdefault(key, []).append(r)
    lines = []
    for key, members in sorted(groups.items(), key=lambda kv: -len(kv[1]))[:limit]:
        where = sorted({f"{m['model']}@{m['platform']}/{m['placement']}/{m['pipeline']}" for m in members})
        lines.append(f"{len(members):4d} x {key[:400]}")
        lines.append(f"       e.g. {', '.join(where[:4])}{' ...' if len(where) > 4 else ''}")
    if len(groups) > limit:
        lines.append(f"... and {len(groups) - limit} more kinds")
    return "\n".join(lines)


def totals(rows: list[dict]) -> tuple[int, int, int]:
    return (len(rows), sum(r["status"] == "mismatch" for r in rows), sum(r["status"] == "error" for r in rows))


def summary_line(rows: list[dict]) -> str:
    n, m, e = totals(rows)
    line = f"{n} cases, {m} mismatches, {e} errors"
    streamed = [r for r in rows if r.get("detail", {}).get("flash_layers")]
    if FLASH:
        line += (f" (flash: {len(streamed)} cases ran saved artifacts streaming "
                 f"{sum(r['detail']['flash_layers'] for r in streamed)} FFN layers from their flash images)")
    quantized = [r for r in rows if r.get("quantize")]
    if quantized:
        from hetflow.passes.quantize import INT8_RTOL
        ran = sum(1 for r in quantized if r.get("detail", {}).get("int8_contractions"))
        worst = max((v for r in quantized if r["status"] == "pass" for v in r["errors"].values()), default=0.0)
        line += (f" (int8: {ran} of {len(quantized)} cases ran contractions in int8; worst relative error "
                 f"{worst:.3g} of the tolerance {INT8_RTOL:g})")
    if COST_MODEL != "analytic":
        line += f" (placed with cost model {COST_MODEL})"
    return line


def _csv(text: str) -> list[str]:
    return [] if text in ("", "-") else [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"a small subset: {', '.join(QUICK_MODELS)} on "
                        f"{', '.join(QUICK_PLATFORMS)}, seed 0, {QUICK_RANDOM} random graphs")
    parser.add_argument("--models", help="comma-separated zoo names (default: the whole zoo)")
    parser.add_argument("--platforms", help=f"comma-separated presets (default: {','.join(PLATFORMS)})")
    parser.add_argument("--placements", help=f"comma-separated policies (default: {','.join(PLACEMENTS)})")
    parser.add_argument("--pipelines", help="full, nofuse (default: both)")
    parser.add_argument("--seeds", help="comma-separated PYTHONHASHSEED values, one process group each (default 0,1,2)")
    parser.add_argument("--random", type=int, help=f"random graphs in all (default {RANDOM_GRAPHS})")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes at once (default 2)")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT, help="solver time limit per compile, s")
    parser.add_argument("--case-timeout", type=float, default=CASE_TIMEOUT,
                        help="an error for a case (compile + run) that takes longer, s (a hang in the compiler)")
    parser.add_argument("--models-per-worker", type=int, default=MODELS_PER_WORKER)
    parser.add_argument("--graphs-per-worker", type=int, default=GRAPHS_PER_WORKER)
    parser.add_argument("--worker-timeout", type=float, default=3600.0, help="stop a worker after this long, s")
    parser.add_argument("--json", help="where to write the results (default benchmarks/results/differential_<time>.json)")
    parser.add_argument("--save-failing", help="directory for the ONNX models of failing random graphs")
    parser.add_argument("--quantize", choices=["int8"], help="compile the model cases with quantize=int8 (default "
                        f"platforms {','.join(QUANTIZE_PLATFORMS)}), to the tolerance hetflow.passes.quantize.INT8_RTOL")
    parser.add_argument("--devices", help="model cases placed only on these devices (e.g. npu with --quantize int8, "
                        "so that every contraction the NPU can take runs in int8)")
    parser.add_argument("--cost-model", choices=["analytic", "sim"], default="analytic",
                        help="how placement times NPU/PIM groups: analytic (default) or sim (their simulators)")
    parser.add_argument("--flash", action="store_true",
                        help="on laptop-ssd and flash-edge (the default platforms then), compile each model with "
                             "a ReLU FFN under the DRAM budget that streams all its FFN layers (tile_flash), and run "
                             "the saved artifact, whose layers read the flash image")
    parser.add_argument("--list", action="store_true", help="list the zoo and exit")
    parser.add_argument("--summarise", metavar="JSON", help="print the table and failures of a results file and exit")
    # worker-only
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--random-start", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--random-count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global COST_MODEL, FLASH
    COST_MODEL = args.cost_model
    FLASH = args.flash
    from hetflow.examples.zoo import ZOO
    default_models = QUICK_MODELS if args.quick else list(ZOO)
    args.models = _csv(args.models) if args.models is not None else default_models
    unknown = [m for m in args.models if m not in ZOO]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; the zoo: {', '.join(ZOO)}")
    args.devices = _csv(args.devices) if args.devices else None
    args.platforms = _csv(args.platforms) if args.platforms else (
        QUANTIZE_PLATFORMS if args.quantize else FLASH_PLATFORMS if args.flash else
        QUICK_PLATFORMS if args.quick else PLATFORMS)
    args.placements = _csv(args.placements) if args.placements else PLACEMENTS
    args.pipelines = _csv(args.pipelines) if args.pipelines else list(PIPELINES)
    bad = [p for p in args.pipelines if p not in PIPELINES]
    if bad:
        parser.error(f"unknown pipeline {bad[0]!r}; choose from {', '.join(PIPELINES)}")
    args.seeds = [int(s) for s in _csv(args.seeds)] if args.seeds else ([0] if args.quick else SEEDS)
    if args.random is None:
        args.random = QUICK_RANDOM if args.quick else RANDOM_GRAPHS
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.summarise:
        data = json.loads(Path(args.summarise).read_text())
        rows = data["cases"]
        print(summarise(rows, data["args"]["platforms"], data["args"]["placements"]))
        report = failures_report(rows)
        if report:
            print("\nfailures (grouped):")
            print(report)
        print(summary_line(rows))
        return 0 if totals(rows)[1] + totals(rows)[2] == 0 else 1
    if args.list:
        from hetflow.examples.zoo import MODELS
        for m in MODELS:
            print(f"{m.name:18} {m.family:8} {m.kind:5} rtol {m.rtol:g}")
        return 0
    # a SIGTERM to the driver stops its workers too (run_driver's finally)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    started = time.perf_counter()
    n_configs = len(args.platforms) * len(args.placements) * len(args.pipelines)
    print(f"differential: {len(args.models)} models x {len(args.platforms)} platforms x {len(args.placements)} "
          f"placements x {len(args.pipelines)} pipelines x {len(args.seeds)} seeds = "
          f"{len(args.models) * n_configs * len(args.seeds)} model cases, {args.random} random graphs, "
          f"{args.jobs} jobs", flush=True)
    rows = run_driver(args)
    elapsed = time.perf_counter() - started
    print()
    print(summarise(rows, args.platforms, args.placements))
    report = failures_report(rows)
    if report:
        print("\nfailures (grouped):")
        print(report)
    path = Path(args.json) if args.json else RESULTS / f"differential_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    n, m, e = totals(rows)
    seconds = [r["seconds"] for r in rows if r.get("seconds")]
    path.write_text(json.dumps({
        "summary": {"cases": n, "mismatches": m, "errors": e, "wall_seconds": elapsed,
                    "case_seconds_mean": float(np.mean(seconds)) if seconds else None},
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "out", "seed", "random_start",
                                                                  "random_count")},
        "cases": rows}, indent=1, default=str))
    print(f"\nresults: {path}  (wall {elapsed:.0f} s, {len(rows)} cases, mean {np.mean(seconds) if seconds else 0:.2f} "
          f"s of compile+run+check per case)")
    print(summary_line(rows))
    return 0 if m + e == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
