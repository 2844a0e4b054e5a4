"""Runner ``pim``: runs a PIM command stream (``hetflow.backends.pim`` documents the format) on a simulator.

``PimSimulator(program_text, weights, graph)`` checks the program (JSON Schema: a
stream cut short or malformed is one ``RunnerError`` line naming the field),
executes it functionally with NumPy (the matrix-vector products per unit, their
K-split partial sums gathered in f32; the ``asic`` commands with the IR's own
kernels, so the results equal the reference interpreter's), and times it with an
event-driven DRAM model, per channel, in cycles of tCK = 1 ns:

* bank-level (GDDR6): broadcast of the vector to every channel's bank buffers
  (write bursts tCCD_S apart); then every bank works through its rows: ACT
  (after PRE: tRAS since its ACT, tRP; tRC between ACTs; one command a cycle on
  the channel's bus, at most four ACTs per tFAW), MACs from ACT + tRCD at one
  32-B column (16 f16 MACs) a cycle; then the gather of the results (tCL, then
  one 32-B read every tCCD_L). Channels run in parallel.
* logic-die (HBM3): each channel's rows interleaved over its banks, opened as
  early as the timing allows; a row's data leaves ACT + tRCD + tCL later through
  the channel's TSV share (``tsv_bytes_per_cycle``) and the GEMM units consume
  it at ``macs_per_cycle`` (streaming: compute overlaps the transfer).
* refresh (all-bank, every channel at once): a window [i * tREFI, +tRP + tRFC)
  in which no row is opened; a bank's MAC burst run that reaches a window stops
  there, its row closes, and it reopens the row after the window (a second
  miss). Broadcast, gather and TSV transfers are not stalled by refresh.
* the matrix operand is taken as resident in the banks, as PIM-GPT keeps weights and the KV cache there:
  writing an activation operand (the KV cache) is not timed; the logic-die's vector and results stay on the
  logic die (no broadcast or gather time).
* ``asic`` commands take ceil(elements out / asic_lanes) cycles (shape-only ops
  none); commands run one after another.

Row-buffer accounting: every row activation is a miss, every other column access
(MAC burst) a hit. ``last_seconds``, ``last_cycles``, ``row_hits``,
``row_misses``, ``bytes_read`` and ``internal_bandwidth`` (bytes read from the
banks / modelled seconds) describe the last run; the timing does not depend on the
values, so it is simulated once, at load.

Timing parameters: REFERENCE.md's (Ramulator2's GDDR6 and HBM3 2 Gbps presets).
Not in REFERENCE.md, JEDEC-typical and unconfirmed: GDDR6 tREFI 1900, tRFC 210;
HBM3 tREFI 3900, tRFC 350, tFAW 16 (cycles of 1 ns).
"""
from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass

import numpy as np

from hetflow.ir import make_kernel
from hetflow.runtime.errors import RunnerError

from . import register_runner
from .interpreter import SimulatorRunner

__all__ = ["DramTiming", "PimRunner", "PimSimulator", "TIMINGS", "load_pim", "parse_program", "partition_weights"]


@dataclass(frozen=True)
class DramTiming:
    """DRAM timing in cycles (tCK 1 ns)."""
    name: str
    tCL: int
    tRCD: int
    tRP: int
    tRAS: int
    tRC: int
    tCCD_S: int
    tCCD_L: int
    tFAW: int
    tREFI: int     # JEDEC-typical, unconfirmed (not in REFERENCE.md)
    tRFC: int      # JEDEC-typical, unconfirmed (not in REFERENCE.md)


TIMINGS = {
    "gddr6": DramTiming("gddr6", tCL=24, tRCD=26, tRP=26, tRAS=53, tRC=79, tCCD_S=4, tCCD_L=6, tFAW=28,
                        tREFI=1900, tRFC=210),
    "hbm3": DramTiming("hbm3", tCL=7, tRCD=7, tRP=7, tRAS=17, tRC=19, tCCD_S=1, tCCD_L=2, tFAW=16,
                       tREFI=3900, tRFC=350),
}
NS_PER_CYCLE = 1e-9
SHAPE_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}

_NAME = {"type": "string"}
_MAYBE_NAME = {"type": ["string", "null"]}
_COUNT = {"type": "integer", "minimum": 1}
_LAYOUT = {"type": "object", "additionalProperties": False,
           "required": ["k_pad", "k_splits", "k_per_split", "column_blocks", "columns_per_block"],
           "properties": {key: _COUNT for key in ("k_pad", "k_splits", "k_per_split", "column_blocks",
                                                   "columns_per_block")}}
_COMMANDS = {
    "gemv": {"required": ["cmd", "node", "op", "vector", "matrix", "out", "trans_matrix", "alpha", "beta", "bias",
                          "batch", "m", "k", "n", "dtype", "layout"],
             "properties": {"cmd": {"const": "gemv"}, "node": _NAME, "op": _NAME, "vector": _NAME,
                            "matrix": _NAME, "out": _NAME, "trans_matrix": {"type": "boolean"},
                            "alpha": {"type": "number"}, "beta": {"type": "number"}, "bias": _MAYBE_NAME,
                            "batch": _COUNT, "m": _COUNT, "k": _COUNT, "n": _COUNT,
                            "dtype": {"enum": ["f16", "bf16", "f32", "f64"]}, "layout": _LAYOUT}},
    "asic": {"required": ["cmd", "node", "op", "path", "inputs", "outputs"],
             "properties": {"cmd": {"const": "asic"}, "node": _NAME, "op": _NAME,
                            "path": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
                            "inputs": {"type": "array", "items": _MAYBE_NAME},
                            "outputs": {"type": "array", "items": _MAYBE_NAME}}},
    "bind": {"required": ["cmd", "src", "dst"],
             "properties": {"cmd": {"const": "bind"}, "src": _NAME, "dst": _NAME}},
}
SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["format", "version", "kind", "memory", "device", "channels", "banks_per_channel", "row_bytes",
                 "burst_bytes", "asic_lanes", "macs_per_cycle", "tsv_bytes_per_cycle", "inputs", "outputs",
                 "commands"],
    "properties": {
        "format": {"const": "hetflow.pim"}, "version": {"const": 1},
        "kind": {"enum": ["bank-level", "logic-die"]}, "memory": {"enum": sorted(TIMINGS)},
        "device": _NAME, "channels": _COUNT, "banks_per_channel": _COUNT, "row_bytes": _COUNT,
        "burst_bytes": _COUNT, "asic_lanes": _COUNT, "launch_ns": {"type": "number", "minimum": 0, "maximum": 1e12},
        "macs_per_cycle": {"type": "number", "minimum": 0}, "tsv_bytes_per_cycle": {"type": "number", "minimum": 0},
        "inputs": {"type": "array", "items": _NAME}, "outputs": {"type": "array", "items": _NAME},
        "commands": {"type": "array", "items": {
            "type": "object", "required": ["cmd"],
            "properties": {"cmd": {"enum": sorted(_COMMANDS)}},
            "allOf": [{"if": {"properties": {"cmd": {"const": cmd}}, "required": ["cmd"]},
                       "then": {**body, "additionalProperties": False}} for cmd, body in _COMMANDS.items()]}},
    },
}
SIZES = {"f16": 2, "bf16": 2, "f32": 4, "f64": 8}


def parse_program(text: str, where: str = "PIM program") -> dict:
    """The program as a dict, checked: malformed JSON or a schema violation is one ``RunnerError`` line."""
    from hetflow.support.schema import check
    try:
        program = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise RunnerError(f"{where}: the command stream is cut short or not JSON: {str(exc)[:120]}") from None
    check(program, SCHEMA, where, RunnerError)
    for index, command in enumerate(program["commands"]):
        if command["cmd"] == "gemv":
            _check_layout(command, program, f"{where}: commands[{index}]")
    return program


def _check_layout(command: dict, program: dict, where: str) -> None:
    layout = command["layout"]
    per_burst = program["burst_bytes"] // SIZES[command["dtype"]]
    units = program["channels"] * (program["banks_per_channel"] if program["kind"] == "bank-level" else 1)
    problems = [
        (layout["k_pad"] < command["k"] or layout["k_pad"] % max(per_burst, 1), "layout.k_pad",
         f"{layout['k_pad']} does not hold k={command['k']} in whole bursts"),
        (layout["k_splits"] * layout["k_per_split"] < layout["k_pad"], "layout.k_splits",
         "the K pieces do not cover k_pad"),
        (layout["column_blocks"] * layout["columns_per_block"] < command["batch"] * command["n"],
         "layout.column_blocks", "the column blocks do not cover batch x n"),
        (layout["column_blocks"] * layout["k_splits"] > units, "layout.column_blocks",
         f"the layout needs {layout['column_blocks'] * layout['k_splits']} units, the device has {units}"),
    ]
    for bad, field, message in problems:
        if bad:
            raise RunnerError(f"{where}.{field}: {message}")


class PimSimulator:
    """A PIM command stream, executed with NumPy and timed with an event-driven DRAM model."""

    def __init__(self, program: str | dict, weights: dict | None = None, graph=None, where: str = "PIM program"):
        self.program = parse_program(program, where) if isinstance(program, str) else program
        self.where = where
        self.weights = dict(weights or {})
        self.graph = graph
        self.timing = TIMINGS[self.program["memory"]]
        self._kernels: dict[int, object] = {}
        self.command_cycles: list[float] = []
        self.row_hits = self.row_misses = 0
        self.bytes_read = 0
        self.last_cycles = self._simulate()
        # the DRAM time, and the dispatch cost of the partition's top-level nodes (as the cost model charges it)
        self.launch_seconds = self.program.get("launch_ns", 0.0) * 1e-9
        self.last_seconds = self.last_cycles * NS_PER_CYCLE + self.launch_seconds

    @property
    def internal_bandwidth(self) -> float:
        """Bytes read from the banks per modelled second."""
        dram = self.last_seconds - self.launch_seconds
        return self.bytes_read / dram if dram > 0 else 0.0

    @property
    def row_hit_rate(self) -> float:
        total = self.row_hits + self.row_misses
        return self.row_hits / total if total else 0.0

    # ---- functional execution ----

    def run(self, inputs: dict) -> dict:
        """{output name: array} for ``inputs`` (the partition's input names)."""
        env = dict(self.weights)
        env.update(inputs)
        for index, command in enumerate(self.program["commands"]):
            try:
                getattr(self, "_do_" + command["cmd"])(command, env)
            except KeyError as exc:
                raise RunnerError(f"{self.where}: commands[{index}] ({command['cmd']}) reads {exc.args[0]!r}, "
                                  "which no input, weight or earlier command gives") from None
        missing = [name for name in self.program["outputs"] if name not in env]
        if missing:
            raise RunnerError(f"{self.where}: output {missing[0]!r} is never written by the command stream")
        return {name: env[name] for name in self.program["outputs"]}

    def _do_bind(self, command: dict, env: dict) -> None:
        env[command["dst"]] = env[command["src"]]

    def _do_asic(self, command: dict, env: dict) -> None:
        node = self._node(command["path"])
        kernel = self._kernels.get(id(node))
        if kernel is None:
            kernel = self._kernels[id(node)] = make_kernel(node, self.graph.opset)
        args = [None if name is None else env[name] for name in command["inputs"]]
        for name, value, result in zip(command["outputs"], node.outputs, kernel(args)):
            array = np.asarray(result)
            if value.type is not None and array.dtype.kind != "O" and array.dtype != value.type.dtype.numpy:
                array = array.astype(value.type.dtype.numpy)
            if name is not None:
                env[name] = array

    def _node(self, path: list[int]):
        if self.graph is None:
            raise RunnerError(f"{self.where}: an asic command needs the partition graph")
        graph, node = self.graph, None
        for depth, index in enumerate(path):
            if index >= len(graph.nodes):
                raise RunnerError(f"{self.where}: asic path {path} leaves the partition graph")
            node = graph.nodes[index]
            if depth < len(path) - 1:
                graph = node.attrs["body"]
        return node

    def _do_gemv(self, command: dict, env: dict) -> None:
        vector = np.asarray(env[command["vector"]])
        matrix = np.asarray(env[command["matrix"]])
        out_dtype = np.result_type(vector.dtype, matrix.dtype)
        if command["trans_matrix"]:
            matrix = np.swapaxes(matrix, -1, -2)
        layout, k = command["layout"], command["k"]
        total = None
        for s in range(layout["k_splits"]):  # each K piece's partial sums, gathered and added in f32
            lo, hi = s * layout["k_per_split"], min(k, (s + 1) * layout["k_per_split"])
            if lo >= hi:
                continue
            part = np.matmul(vector[..., lo:hi].astype(np.float32), matrix[..., lo:hi, :].astype(np.float32))
            total = part if total is None else total + part
        result = total * np.float32(command["alpha"]) if command["alpha"] != 1.0 else total
        if command["bias"] is not None:
            result = result + np.float32(command["beta"]) * np.asarray(env[command["bias"]]).astype(np.float32)
        env[command["out"]] = result.astype(out_dtype)

    # ---- timing ----

    def _simulate(self) -> float:
        clock = 0.0
        for command in self.program["commands"]:
            if command["cmd"] == "gemv":
                cycles = self._time_gemv(command, clock)
            elif command["cmd"] == "asic" and command["op"] not in SHAPE_OPS:
                cycles = self._asic_cycles(command)
            else:
                cycles = 0.0
            self.command_cycles.append(cycles)
            clock += cycles
        return clock

    def _asic_cycles(self, command: dict) -> float:
        if self.graph is None:
            return 0.0
        node = self._node(command["path"])
        elements = sum(math.prod(v.type.shape) for v in node.outputs
                       if v.type is not None and v.type.shape is not None
                       and all(isinstance(d, int) for d in v.type.shape))
        return float(math.ceil(elements / self.program["asic_lanes"]))

    def _unit_work(self, command: dict):
        """Per unit (bank or channel): (unit, columns, K elements) of its block."""
        layout = command["layout"]
        columns = command["batch"] * command["n"]
        for c in range(layout["column_blocks"]):
            cols = min(columns, (c + 1) * layout["columns_per_block"]) - c * layout["columns_per_block"]
            for s in range(layout["k_splits"]):
                klen = min(layout["k_pad"], (s + 1) * layout["k_per_split"]) - s * layout["k_per_split"]
                if cols > 0 and klen > 0:
                    yield c * layout["k_splits"] + s, cols, klen

    def _time_gemv(self, command: dict, start: float) -> float:
        p, t = self.program, self.timing
        element = SIZES[command["dtype"]]
        row_elements = p["row_bytes"] // element
        per_burst = p["burst_bytes"] // element
        channels: dict[int, list] = {}
        for unit, cols, klen in self._unit_work(command):
            elements = cols * klen
            rows = [min(row_elements, elements - r * row_elements) for r in range(-(-elements // row_elements))]
            channel = unit % p["channels"] if p["kind"] == "bank-level" else unit
            bank = unit // p["channels"] if p["kind"] == "bank-level" else 0
            channels.setdefault(channel, []).append((bank, cols, rows))
        if p["kind"] == "bank-level":
            vector_bytes = command["batch"] * command["m"] * command["k"] * element
            broadcast = math.ceil(vector_bytes / p["burst_bytes"]) * t.tCCD_S
            end = 0.0
            for banks in channels.values():
                mac_end = self._bank_level_channel(banks, start + broadcast, per_burst, command["m"])
                results = sum(cols for _, cols, _ in banks) * command["m"] * 4   # f32 accumulators
                gather = t.tCL + math.ceil(results / p["burst_bytes"]) * t.tCCD_L
                end = max(end, mac_end + gather)
            return end - start
        end = start
        for banks in channels.values():
            end = max(end, self._logic_die_channel(banks[0][2], start, per_burst, command["m"], element))
        return end - start

    def _refresh_window(self, time: float) -> tuple[float, float] | None:
        """The refresh window containing ``time`` or the next one after it."""
        t = self.timing
        index = max(1, math.floor(time / t.tREFI))
        for i in (index, index + 1):
            lo, hi = i * t.tREFI, i * t.tREFI + t.tRP + t.tRFC
            if hi > time:
                return lo, hi
        return None

    def _activate(self, ready: float, bus: dict) -> float:
        """The earliest cycle at or after ``ready`` an ACT may issue on the channel: bus, tFAW, refresh."""
        t = self.timing
        when = max(ready, bus["next"])
        while True:
            acts = bus["acts"]
            if len(acts) >= 4:
                when = max(when, acts[-4] + t.tFAW)
            lo, hi = self._refresh_window(when)
            if lo <= when < hi:
                when = hi
                continue
            break
        bus["next"] = when + 1
        bus["acts"].append(when)
        del bus["acts"][:-4]
        self.row_misses += 1
        return when

    def _bank_level_channel(self, banks: list, start: float, per_burst: int, m: int) -> float:
        """Event-driven: the bank whose next ACT is ready earliest goes first. Returns the last MAC's end."""
        t = self.timing
        bus = {"next": start, "acts": []}
        queue = []  # (ready, bank, row index, bursts left in that row, open row's ACT time or None)
        work = {}
        for bank, cols, rows in banks:
            work[bank] = [-(-r // per_burst) * m for r in rows]   # MAC commands per row
            self.bytes_read += sum(-(-r // per_burst) for r in rows) * self.program["burst_bytes"]
            heapq.heappush(queue, (start, bank, 0, work[bank][0], None))
        end = start
        while queue:
            ready, bank, row, left, opened = heapq.heappop(queue)
            if opened is not None:  # precharge the open row first
                ready = max(ready, opened + t.tRAS) + t.tRP
                ready = max(ready, opened + t.tRC)
            act = self._activate(ready, bus)
            first = act + t.tRCD
            lo, _ = self._refresh_window(first)
            done = left if first + left <= lo else max(0, int(lo - first))
            self.row_hits += max(0, done - 1)
            if done < left:  # a refresh closes the row: reopen it after the window
                heapq.heappush(queue, (self._refresh_window(lo)[1], bank, row, left - done, None))
                end = max(end, first + done)
                continue
            finish = first + left
            end = max(end, finish)
            if row + 1 < len(work[bank]):
                heapq.heappush(queue, (finish, bank, row + 1, work[bank][row + 1], act))
        return end

    def _logic_die_channel(self, rows: list, start: float, per_burst: int, m: int, element: int) -> float:
        """One pseudo-channel streaming its rows (interleaved over its banks) to the logic die's GEMM units."""
        p, t = self.program, self.timing
        banks = p["banks_per_channel"]
        bus = {"next": start, "acts": []}
        bank_ready = [start] * banks
        link = compute = start
        for index, elements in enumerate(rows):
            bank = index % banks
            act = self._activate(bank_ready[bank], bus)
            bursts = -(-elements // per_burst)
            self.row_hits += bursts - 1
            self.bytes_read += bursts * p["burst_bytes"]
            begin = max(act + t.tRCD + t.tCL, link)
            link = begin + bursts * p["burst_bytes"] / p["tsv_bytes_per_cycle"]
            compute = max(link, max(compute, begin) + m * elements / p["macs_per_cycle"])
            bank_ready[bank] = max(act + t.tRC, max(link, act + t.tRAS) + t.tRP)
        return compute


def partition_weights(graph, prefix: str = "") -> dict:
    """Every weight of a partition graph and of its group bodies, by the names the PIM program uses."""
    weights = {prefix + name: value.data for name, value in graph.weights.items()}
    for node in graph.nodes:
        if node.op == "hetflow.group":
            weights.update(partition_weights(node.attrs["body"], f"{prefix}{node.outputs[0].name}/"))
    return weights


class PimRunner(SimulatorRunner):
    def run_dynamic(self, inputs: dict) -> dict:
        return self.simulator.run(inputs)


@register_runner("pim")
def load_pim(part, executor):
    where = f"partition {part.index} ({part.file})"
    if part.source is None:
        raise RunnerError(f"{where}: the PIM partition has no command stream")
    simulator = PimSimulator(part.source, partition_weights(part.graph), part.graph, where)
    return PimRunner(simulator, part.output_names, getattr(executor, "copy_into", None))
