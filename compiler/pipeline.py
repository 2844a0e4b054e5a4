"""The compile pipeline: one readable list of named passes.

    canonicalize  fold constants and static shapes, drop identities and dead code, merge reshapes, CSE
    tile_flash    under a DRAM budget (--dram-budget, or the platform's DRAM when the weights exceed it), the
                  feed-forward layers that do not fit become flash_ffn nodes whose weights stream from the
                  flash image (nothing without a budget)
    fuse          group ops: attention, gated-MLP experts, contraction + epilogue, reductions, elementwise chains
    place         a device per group from its Op/B against each device's roofline (policy: roofline,
                  optimal, split), transfers where values cross memories that are not unified
                  (sets meta device)
    quantize      opt-in (CompileOptions.quantize="int8"): the MatMul/Gemm an NPU runs with a constant weight
                  get an int8 activation scale calibrated on the example inputs (needs device; sets meta int8)
    schedule      a queue per device; the event-driven simulation gives the predicted timeline
                  (needs device; sets meta start_us, end_us)
    plan_memory   an offset for every activation in its memory space's arena, from lifetimes in node
                  order under what the runtime orders (exact search, never worse than greedy; repeated
                  blocks solved once) (needs device; sets meta memory, offsets)

A pipeline can also be given as a string: ``--passes canonicalize,fuse``. Each pass's
contract (``hetflow.passes.base.META_KEYS``, ``register_pass``) is checked before it
runs: a pass whose prerequisite did not run fails naming the pass to run first.
Between passes the graph's structure and the meta keys promised so far are verified
(``verify_each="structure"``); the tests verify in full (``verify_each=True``: with
type inference).
"""
from __future__ import annotations

from hetflow.ir import Graph
from hetflow.passes import CompileOptions, PassRunner, parse_pipeline

PIPELINE = [
    "canonicalize",
    "tile_flash",
    "fuse",
    "place",
    "quantize",
    "schedule",
    "plan_memory",
]


def run_pipeline(graph: Graph, passes: list[str] | str | None = None, verify_each: bool | str = "structure",
                 options: CompileOptions | None = None) -> tuple[Graph, PassRunner]:
    names = PIPELINE if passes is None else parse_pipeline(passes) if isinstance(passes, str) else list(passes)
    runner = PassRunner(names, options or CompileOptions(), verify_each=verify_each)
    return runner.run(graph), runner
