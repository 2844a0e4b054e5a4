"""A cheap model for the sweep tests: a two-layer MLP built in the IR, which records each start.

``marker_dir``: each call writes a file named ``<batch>_<width>.<pid>.<random>`` holding its process id there,
so a test can see which points were started, how often, and in which process (to kill it).
``sleep``: seconds to wait before building, so a test can interrupt a point in the middle.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from hetflow.examples.decode_graphs import Builder


def tiny(batch: int = 1, width: int = 64, sleep: float = 0.0, marker_dir: str | None = None):
    if marker_dir is not None:
        Path(marker_dir, f"{batch}_{width}.{os.getpid()}.{os.urandom(6).hex()}").write_text(str(os.getpid()))
    time.sleep(sleep)
    b = Builder(f"tiny_b{batch}_w{width}")
    x = b.input("x", (batch, width))
    h = b.op("MatMul", [x, b.weight("w1", (width, 4 * width))], loc="fc1")
    h = b.op("Relu", [h], loc="act")
    b.graph.outputs = [b.op("MatMul", [h, b.weight("w2", (4 * width, width))], loc="fc2")]
    return b.graph


def gpt_decode(context: int = 16, hidden: int = 64, tag: int = 0):
    """A one-layer GPT decode step (``tag`` only tells points apart: same tag or not, the same graph)."""
    from hetflow.examples.decode_graphs import build_gpt2_decode_step
    return build_gpt2_decode_step(layers=1, hidden=hidden, heads=2, context=context, vocab=50)


def started(marker_dir) -> dict[str, int]:
    """How many times each point (``<batch>_<width>``) was started."""
    counts: dict[str, int] = {}
    for path in Path(marker_dir).iterdir():
        point = path.name.split(".")[0]
        counts[point] = counts.get(point, 0) + 1
    return counts


def broken(batch: int = 1):
    """A builder that fails: its points are failed rows."""
    raise ValueError(f"no model for batch {batch}")
