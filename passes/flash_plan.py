"""What stays in DRAM and what streams from flash, under a DRAM budget (LLM in a flash's placement).

Given the model's feed-forward layers (``FfnLayer``: the weights a token reads only in part when its
activations are sparse) and the bytes that must stay resident whatever happens (embeddings, attention,
norms, biases: ``resident_bytes``), ``plan_flash`` decides:

* which FFN layers stay resident: as many as fit after the resident minimum and what each streamed
  layer needs in DRAM (its predictor and its window cache): FFN weights stream first, as the paper has it;
* the predictor's rank (a low-rank approximation of the up projection: ``rank x (hidden + neurons)``
  floats per layer), from ``PREDICTOR_RANKS`` the largest that fits;
* the window cache's capacity (the neurons active over ``window`` tokens, measured on the calibration
  inputs, with room to spare: ``WINDOW_SPARE``);
* the chunk (neurons per read) minimising the expected read time of a token from the flash's
  throughput-by-chunk curve: more neurons per chunk read faster per byte but carry neurons not needed.

A budget below the resident minimum is an error naming both. Every number the plan uses is in the plan
(``describe``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from hetflow.ir.errors import HetflowError

ALIGN = 4096
PREDICTOR_RANKS = (256, 128, 64, 32, 16)
WINDOW_SPARE = 1.0      # the window cache holds this many times the neurons active over a window (beyond: LRU)
WORKSPACE = 32 << 20    # kept free for activations, the KV cache of a short context and the runtime's own buffers


class FlashPlanError(HetflowError):
    """A budget the model cannot run under, or an FFN layer the plan cannot lay out."""


@dataclass
class FfnLayer:
    name: str
    hidden: int
    neurons: int
    itemsize: int
    gated: bool = False
    activation: str = "relu"

    @property
    def parts(self) -> int:
        return 3 if self.gated else 2

    @property
    def weight_bytes(self) -> int:
        return self.parts * self.hidden * self.neurons * self.itemsize

    @property
    def bundle_bytes(self) -> int:
        return self.parts * self.hidden * self.itemsize


@dataclass
class LayerPlan:
    layer: FfnLayer
    streamed: bool
    rank: int = 0              # the predictor's rank (0: no predictor: the layer streams whole)
    capacity: int = 0          # neurons the window cache holds
    chunk_neurons: int = 1     # neurons per read chunk

    @property
    def dram_bytes(self) -> int:
        """What the layer keeps in DRAM: all its weights, or its predictor and window cache."""
        if not self.streamed:
            return self.layer.weight_bytes
        predictor = 4 * self.rank * (self.layer.hidden + self.layer.neurons) + 4 * self.layer.neurons
        return predictor + 4 * self.capacity * self.layer.parts * self.layer.hidden


@dataclass
class FlashPlan:
    budget: int
    resident_bytes: int
    window: int
    active_fraction: float
    layers: list[LayerPlan] = field(default_factory=list)
    workspace: int = WORKSPACE   # kept free for activations and the runtime's buffers

    @property
    def buffer_bytes(self) -> int:
        """The read buffers streaming needs at once: a whole layer being computed and the next being read
        (streamed whole), or a window's worth of bundles in flight (predicted)."""
        return _buffers(self.streamed)

    @property
    def dram_bytes(self) -> int:
        return self.resident_bytes + sum(l.dram_bytes for l in self.layers) + self.buffer_bytes + self.workspace

    @property
    def streamed(self) -> list[LayerPlan]:
        return [l for l in self.layers if l.streamed]

    def describe(self) -> str:
        mib = 1 << 20
        streamed = self.streamed
        text = (f"flash plan: DRAM budget {self.budget / mib:.1f} MiB; planned {self.dram_bytes / mib:.1f} MiB "
                f"(read buffers {self.buffer_bytes / mib:.1f} MiB) "
                f"(embeddings, attention, norms {self.resident_bytes / mib:.1f} MiB, "
                f"{len(self.layers) - len(streamed)} of {len(self.layers)} FFN layers resident); "
                f"{len(streamed)} FFN layers stream from flash")
        if streamed and streamed[0].rank == 0:
            l = streamed[0]
            text += (f" ({sum(s.layer.weight_bytes for s in streamed) / mib:.1f} MiB, each layer read whole while the "
                     f"one before computes, in chunks of {l.chunk_neurons} neuron bundles)")
        elif streamed:
            l = streamed[0]
            caches = sorted(s.capacity for s in streamed)
            text += (f" ({sum(s.layer.weight_bytes for s in streamed) / mib:.1f} MiB; predictor rank {l.rank}, "
                     f"window {self.window} tokens in caches of {caches[0]} to {caches[-1]} neurons, chunks of "
                     f"{l.chunk_neurons} "
                     f"neuron bundles = {l.chunk_neurons * l.layer.bundle_bytes / 1024:.0f} KiB, "
                     f"for {self.active_fraction:.1%} active neurons)")
        return text


def throughput_at(curve: list[tuple[float, float]], size: float) -> float:
    """The flash's read throughput for chunks of ``size`` bytes: the curve interpolated in log size (its ends
    held beyond it)."""
    points = sorted(curve)
    if size <= points[0][0]:
        return points[0][1] * size / points[0][0]   # below the smallest measured chunk: the per-read cost stays
    for (s0, t0), (s1, t1) in zip(points, points[1:]):
        if size <= s1:
            w = math.log(size / s0) / math.log(s1 / s0)
            return t0 + w * (t1 - t0)
    return points[-1][1]


def best_chunk(layer: FfnLayer, curve: list[tuple[float, float]], loaded_fraction: float,
               max_neurons: int = 256) -> int:
    """Neurons per chunk minimising the expected read time of one token's neurons, each loaded with
    probability ``loaded_fraction`` (independently): a chunk is read when any of its neurons is."""
    best, best_time = 1, math.inf
    n = 1
    while n <= min(max_neurons, layer.neurons):
        size = -(-n * layer.bundle_bytes // ALIGN) * ALIGN
        chunks = math.ceil(layer.neurons / n)
        read = chunks * (1 - (1 - loaded_fraction) ** n) * size
        seconds = read / throughput_at(curve, size)
        if seconds < best_time:
            best, best_time = n, seconds
        n *= 2
    return best


def plan_flash(layers: list[FfnLayer], resident_bytes: int, budget: int, curve: list[tuple[float, float]],
               active_fraction: float = 0.05, window: int = 5, predict: bool = True, rank: int | None = None,
               window_fraction: float | None = None, new_fraction: float | None = None,
               workspace: int = WORKSPACE) -> FlashPlan:
    """The plan for ``layers`` under ``budget`` bytes of DRAM (see the module doc). ``active_fraction``: the
    neurons active for a token; ``window_fraction``: those active over ``window`` consecutive tokens;
    ``new_fraction``: those active for a token and not in the ``window - 1`` before it (measured on the
    calibration inputs; without them, tokens are taken as independent)."""
    if not layers:
        raise FlashPlanError("no feed-forward layer to stream: the model has no MatMul -> activation -> MatMul")
    WORKSPACE = workspace   # noqa: N806  (the caller's workspace for this plan)
    if budget < resident_bytes + WORKSPACE:
        raise FlashPlanError(f"the DRAM budget of {budget / (1 << 20):.1f} MiB is below the resident minimum of "
                             f"{(resident_bytes + WORKSPACE) / (1 << 20):.1f} MiB (embeddings, attention and norms stay in DRAM, "
                             f"and {WORKSPACE / (1 << 20):.1f} MiB of workspace): "
                             "raise the budget")
    per = lambda v, i: v[i] if isinstance(v, (list, tuple)) else v   # noqa: E731  (a figure per layer, or one for all)
    mean = lambda v: float(sum(v) / len(v)) if isinstance(v, (list, tuple)) else v   # noqa: E731
    plan = FlashPlan(budget, resident_bytes, window, mean(active_fraction), workspace=workspace)
    ranks = [rank] if rank is not None else list(PREDICTOR_RANKS) if predict else [0]
    for r in ranks:   # the largest predictor rank with which every FFN layer could stream
        plans = [_streamed(layer, r if predict else 0, window, per(active_fraction, i), per(window_fraction, i),
                           per(new_fraction, i), curve) for i, layer in enumerate(layers)]
        if resident_bytes + sum(p.dram_bytes for p in plans) + _buffers(plans) + WORKSPACE <= budget:
            break
    else:
        need = resident_bytes + sum(p.dram_bytes for p in plans) + _buffers(plans) + WORKSPACE
        raise FlashPlanError(f"the DRAM budget of {budget / (1 << 20):.1f} MiB cannot hold the resident minimum and "
                             f"the streamed layers' predictors and window caches ({need / (1 << 20):.1f} MiB at "
                             f"predictor rank {ranks[-1]}): raise the budget or lower the window")
    # then FFN layers back in DRAM while they fit: those that would read the most per token first
    def reads(i: int) -> float:   # the share of the layer a token reads from flash
        if not predict:
            return 1.0
        return per(new_fraction, i) if new_fraction is not None else per(active_fraction, i)
    order = sorted(range(len(layers)), key=lambda i: (-reads(i), i))
    for i in order:
        trial = plans[:i] + [LayerPlan(layers[i], streamed=False)] + plans[i + 1:]
        if resident_bytes + sum(p.dram_bytes for p in trial) + _buffers(trial) + WORKSPACE <= budget:
            plans = trial
    plan.layers = _grow_caches(plans, budget - resident_bytes - WORKSPACE)
    return plan


def _grow_caches(plans: list[LayerPlan], room: int) -> list[LayerPlan]:
    """What the budget leaves goes to the window caches, the same number of neurons more in each (a token
    that fires more neurons than its layer's cache holds reads the rest every time)."""
    cached = [p for p in plans if p.streamed and p.rank > 0]
    if not cached:
        return plans
    need = lambda: sum(p.dram_bytes for p in plans) + _buffers(plans)   # noqa: E731
    base = [p.capacity for p in cached]
    low, high = 0, max(p.layer.neurons for p in cached)
    while low < high:   # the most neurons to add to every cache within the room
        mid = (low + high + 1) // 2
        for p, c in zip(cached, base):
            p.capacity = min(p.layer.neurons, c + mid)
        if need() <= room:
            low = mid
        else:
            high = mid - 1
    for p, c in zip(cached, base):
        p.capacity = min(p.layer.neurons, c + low)
    return plans


def _buffers(plans: list[LayerPlan]) -> int:
    streamed = [p for p in plans if p.streamed]
    if not streamed:
        return 0
    if any(p.rank == 0 for p in streamed):
        return 2 * max(p.layer.weight_bytes for p in streamed if p.rank == 0)
    return 2 * max(4 * p.capacity * p.layer.parts * p.layer.hidden for p in streamed)


def _streamed(layer: FfnLayer, rank: int, window: int, active_fraction: float, window_fraction: float | None,
              new_fraction: float | None, curve: list[tuple[float, float]]) -> LayerPlan:
    if rank == 0:   # no prediction: the layer streams whole, in the largest chunks the curve likes
        return LayerPlan(layer, True, 0, 0, best_chunk(layer, curve, 1.0))
    # the window's neurons: measured on the calibration inputs when given, else as if tokens were independent
    union = window_fraction if window_fraction is not None else 1 - (1 - active_fraction) ** window
    new = new_fraction if new_fraction is not None else active_fraction * (1 - active_fraction) ** (window - 1)
    capacity = min(layer.neurons, math.ceil(WINDOW_SPARE * union * layer.neurons))
    return LayerPlan(layer, True, min(rank, layer.hidden, layer.neurons), capacity,
                     best_chunk(layer, curve, min(1.0, max(new, 1 / layer.neurons))))
