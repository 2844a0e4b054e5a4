"""Platforms: devices, memory spaces, links and flash, loaded from TOML data files.

A preset lives in ``hetflow/platform/presets/NAME.toml``; every number cites its source.
Quantities are strings with units ("68 GB/s", "16 GiB", "10 TFLOP/s", "20 us") or
plain numbers in base units (bytes, bytes/s, FLOP/s, seconds). ``load_platform``
validates everything and names the offending field on error.
"""
from __future__ import annotations

import functools
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hetflow.ir.errors import HetflowError

PRESET_DIR = Path(__file__).parent / "presets"
DEVICE_KINDS = ("cpu", "gpu", "npu", "pim")
NPU_SRAM_BYTES = 8 * 1024**2  # an NPU's on-chip SRAM: an UNCONFIRMED estimate (Hexagon-class TCM, a few MiB)


class PlatformError(HetflowError):
    pass


_UNITS = {
    "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4,
    "FLOP/s": 1, "GFLOP/s": 1e9, "TFLOP/s": 1e12, "PFLOP/s": 1e15, "OP/s": 1, "GOP/s": 1e9, "TOP/s": 1e12,
    "B/s": 1, "KB/s": 1e3, "MB/s": 1e6, "GB/s": 1e9, "TB/s": 1e12, "GiB/s": 1024**3,
    "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9, "Hz": 1, "MHz": 1e6, "GHz": 1e9,
}
_QUANTITY = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*([A-Za-z/]*)\s*$")
_KINDS_OF_UNIT = {
    "bytes": {"B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"},
    "rate": {"FLOP/s", "GFLOP/s", "TFLOP/s", "PFLOP/s", "OP/s", "GOP/s", "TOP/s"},
    "bandwidth": {"B/s", "KB/s", "MB/s", "GB/s", "TB/s", "GiB/s"},
    "time": {"s", "ms", "us", "ns"},
}


def quantity(value: Any, kind: str, where: str, positive: bool = True) -> float:
    """'68 GB/s' -> 68e9 (checking the unit is a ``kind``: bytes, rate, bandwidth or time)."""
    if isinstance(value, bool):
        raise PlatformError(f"{where}: expected a {kind} quantity, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        m = _QUANTITY.match(str(value))
        if m is None:
            raise PlatformError(f"{where}: cannot read {value!r} as a {kind} quantity (e.g. {_example(kind)})")
        number, unit = float(m.group(1)), m.group(2)
        if unit and unit not in _KINDS_OF_UNIT[kind]:
            raise PlatformError(f"{where}: unit {unit!r} is not a {kind} unit (e.g. {_example(kind)})")
        number *= _UNITS.get(unit, 1)
    if not math.isfinite(number):
        raise PlatformError(f"{where}: must be finite, got {value!r}")
    if positive and number <= 0:
        raise PlatformError(f"{where}: must be positive, got {value!r}")
    if number < 0:
        raise PlatformError(f"{where}: must not be negative, got {value!r}")
    return number


def _example(kind: str) -> str:
    return {"bytes": "'16 GiB'", "rate": "'10 TFLOP/s'", "bandwidth": "'68 GB/s'", "time": "'20 us'"}[kind]


@dataclass(frozen=True)
class Memory:
    name: str
    capacity: float           # bytes
    bandwidth: float          # bytes/s, theoretical
    shared: tuple[float, ...]  # achievable total bytes/s when 1, 2, ... devices stream at once
    unified: bool             # every device that sees it shares one address space (no copies)
    source: str = ""

    def achievable_total(self, streams: int) -> float:
        if streams <= 0:
            return self.bandwidth
        return self.shared[min(streams, len(self.shared)) - 1]


@dataclass(frozen=True)
class Device:
    name: str
    kind: str
    memory: str
    peak: dict[str, float]    # dtype -> FLOP/s (what the device achieves on dense work)
    bandwidth: float          # bytes/s this device alone reaches in its memory
    launch: float             # seconds per top-level node (a fused group or a lone op): one dispatch
    tile: int = 1             # contraction dims are padded to a multiple of this
    stationary_penalty: float = 1.0  # NPU: slowdown when the weight's reduction dim exceeds its output dim
    channels: int = 1         # PIM: channels x banks computing in parallel (informational)
    ops: tuple[str, ...] = ("*",)   # ops or fusion kinds supported; "*" = all
    dtypes: tuple[str, ...] = ("*",)
    measured: bool = False    # True when its numbers come from this machine (calibration), not a paper
    source: str = ""
    op_launch: float = 0.0    # seconds per op inside a node: backends that run each inner op as a kernel
    overlap_loss: float = 0.0  # share of the shorter of compute and memory time not hidden behind the longer
    # the analytic cost model's own figures where they differ from the device's (``[device.X.analytic]``,
    # what 'hetflow calibrate --platform P' fits to the simulator): (field, value) pairs. The device's
    # figures stay those of the hardware the simulator and emitters model.
    analytic_figures: tuple = ()

    def analytic(self) -> "Device":
        """The device as the analytic cost model sees it: its figures with ``analytic_figures`` laid over."""
        if not self.analytic_figures:
            return self
        import dataclasses
        return dataclasses.replace(self, analytic_figures=(), **dict(self.analytic_figures))

    def launch_for(self, ops: int) -> float:
        """Fixed cost of a node made of ``ops`` ops (1 for a lone op)."""
        return self.launch + self.op_launch * ops

    def supports(self, op: str, kind: str, dtype: str | None) -> bool:
        op_ok = "*" in self.ops or op in self.ops or kind in self.ops
        dtype_ok = dtype is None or "*" in self.dtypes or dtype in self.dtypes
        return op_ok and dtype_ok

    def peak_for(self, dtype: str | None) -> float:
        """FLOP/s for ``dtype``; a float type the device lacks runs in its nearest float precision."""
        if dtype in self.peak:
            return self.peak[dtype]
        for fallback in ("f32", "f16", "bf16", "f64"):
            if fallback in self.peak:
                return self.peak[fallback]
        return min(self.peak.values())


@dataclass(frozen=True)
class Link:
    name: str
    src: str
    dst: str
    bandwidth: float
    latency: float


@dataclass(frozen=True)
class Flash:
    page_size: float
    read_latency: float
    channels: int
    throughput: tuple[tuple[float, float], ...]  # (chunk bytes, bytes/s), sorted by chunk
    source: str = ""
    # NAND figures for hetflow.platform.nand (Cambricon-LLM's in-flash compute). Defaults from REFERENCE.md:
    bus_rate: float = 1e9        # bytes/s per channel: an 8-bit bus at 1000 MT/s (Cambricon-LLM)
    cores_per_channel: int = 4   # in-flash compute cores per channel, each with its own page buffer: 4 makes
    #                              Cambricon-LLM's 256 x 2048 tile (256^2 = 4 x 16 KiB); UNCONFIRMED as a count
    core_rate: float = 1e9       # bytes/s of weights one in-flash core multiplies out of its page buffer:
    #                              UNCONFIRMED, taken as the bus rate (the core reads the page as the bus would)

    def throughput_at(self, chunk: float) -> float:
        """Throughput for reads of ``chunk`` bytes, interpolated in log space between measured points."""
        import math
        points = self.throughput
        if chunk <= points[0][0]:
            return points[0][1]
        for (c0, t0), (c1, t1) in zip(points, points[1:]):
            if chunk <= c1:
                f = (math.log(chunk) - math.log(c0)) / (math.log(c1) - math.log(c0))
                return math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0)))
        return points[-1][1]


@dataclass(frozen=True)
class Platform:
    name: str
    source: str
    description: str
    devices: dict[str, Device]
    memories: dict[str, Memory]
    links: tuple[Link, ...] = ()
    flash: Flash | None = None
    sync: float = 5e-6          # seconds: flag-based cross-device synchronisation
    driver_sync: float = 400e-6  # seconds: driver-level synchronisation, for comparison
    call_overhead: float = 0.0   # seconds: the runtime's fixed cost per call (inputs bound, workers woken)
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    def device(self, name: str) -> Device:
        if name not in self.devices:
            raise PlatformError(f"platform {self.name!r} has no device {name!r} (devices: {', '.join(self.devices)})")
        return self.devices[name]

    def memory_of(self, device: str) -> Memory:
        return self.memories[self.devices[device].memory]

    def memory_space(self, device: str) -> str:
        """The memory space a device, or a transfer's link (``link:src_memory->dst_memory``), writes its results
        into.

        The one device-to-memory function: the memory planner, the plan checker and the executor all place
        a value in the ``memory_space`` of its producer. A transfer's result lives in its destination memory."""
        if device.startswith("link:") and "->" in device:
            memory = device.split("->", 1)[1]
            if memory not in self.memories:
                raise PlatformError(f"platform {self.name!r} has no memory {memory!r} (memories: "
                                    f"{', '.join(self.memories)}), named by the transfer link {device!r}")
            return memory
        if device not in self.devices:
            raise PlatformError(f"platform {self.name!r} has no device {device!r} (devices: {', '.join(self.devices)})")
        return self.devices[device].memory

    def backends(self, device: str) -> tuple[str, ...]:
        """The backends that may run a partition on ``device``, the default first: ``transfer`` for a link,
        ONNX Runtime (``cpu``) or TVM (``tvm-llvm``) for a CPU, ``cuda`` for this machine's measured GPU,
        the NPU program and its simulator (``npu``) for an NPU, the PIM command stream on the DRAM PIM simulator
        (``pim``) for a PIM device (each then ``simulated``), ``simulated`` for every other device this machine
        lacks. The emitters choose by it and the runtime checks an
        artifact's partitions against it."""
        if device.startswith("link:"):
            self.memory_space(device)
            return ("transfer",)
        kind = self.device(device)
        streams = ("flash",) if self.flash is not None else ()   # a feed-forward layer read from the flash image
        if kind.kind == "cpu":
            return ("cpu", "tvm-llvm") + streams
        if kind.kind == "gpu" and kind.measured:
            return ("cuda",)
        if kind.kind == "pim":
            return ("pim", "simulated")
        if kind.kind == "npu":
            return ("npu", "simulated") + streams
        return ("simulated",)

    def host_device(self) -> str:
        for name, d in self.devices.items():
            if d.kind == "cpu":
                return name
        return next(iter(self.devices))

    def transfer_time(self, src_device: str, dst_device: str, nbytes: float) -> float:
        """Seconds to move ``nbytes`` from one device's memory to another's (0 within a unified memory)."""
        a, b = self.devices[src_device].memory, self.devices[dst_device].memory
        if a == b and self.memories[a].unified:
            return 0.0
        if a == b:
            return nbytes / self.memories[a].bandwidth
        for link in self.links:
            if {link.src, link.dst} == {a, b}:
                return link.latency + nbytes / link.bandwidth
        raise PlatformError(f"platform {self.name!r}: no link between memories {a!r} and {b!r}")

    def needs_transfer(self, src_device: str, dst_device: str) -> bool:
        a, b = self.devices[src_device].memory, self.devices[dst_device].memory
        return a != b or not self.memories[a].unified


# --- loading ----------------------------------------------------------------------------------------

def _require(table: dict, key: str, where: str) -> Any:
    if key not in table:
        raise PlatformError(f"{where}: missing field {key!r}")
    return table[key]


def _memory(name: str, t: dict, where: str) -> Memory:
    bandwidth = quantity(_require(t, "bandwidth", where), "bandwidth", f"{where}.bandwidth")
    shared_raw = t.get("shared_bandwidth", [])
    if not isinstance(shared_raw, list):
        raise PlatformError(f"{where}.shared_bandwidth: expected a list (total for 1, 2, ... streaming devices)")
    shared = tuple(quantity(v, "bandwidth", f"{where}.shared_bandwidth[{i}]") for i, v in enumerate(shared_raw))
    return Memory(name, quantity(_require(t, "capacity", where), "bytes", f"{where}.capacity"), bandwidth,
                  shared or (bandwidth,), bool(t.get("unified", True)), t.get("source", ""))


def _device(name: str, t: dict, memories: dict[str, Memory], where: str) -> Device:
    kind = _require(t, "kind", where)
    if kind not in DEVICE_KINDS:
        raise PlatformError(f"{where}.kind: {kind!r} is not one of {', '.join(DEVICE_KINDS)}")
    memory = _require(t, "memory", where)
    if memory not in memories:
        raise PlatformError(f"{where}.memory: no memory space {memory!r} (spaces: {', '.join(memories)})")
    peak_raw = _require(t, "peak", where)
    if not isinstance(peak_raw, dict) or not peak_raw:
        raise PlatformError(f"{where}.peak: expected a table of dtype = 'N TFLOP/s'")
    peak = {dt: quantity(v, "rate", f"{where}.peak.{dt}") for dt, v in peak_raw.items()}
    bandwidth = quantity(t.get("bandwidth", memories[memory].bandwidth), "bandwidth", f"{where}.bandwidth")
    ops = t.get("ops", ["*"])
    dtypes = t.get("dtypes", ["*"])
    return Device(name, kind, memory, peak, bandwidth,
                  quantity(t.get("launch", 0), "time", f"{where}.launch", positive=False),
                  int(t.get("tile", 1)), float(t.get("stationary_penalty", 1.0)), int(t.get("channels", 1)),
                  tuple(ops), tuple(dtypes), bool(t.get("measured", False)), t.get("source", ""),
                  quantity(t.get("op_launch", 0), "time", f"{where}.op_launch", positive=False),
                  float(t.get("overlap_loss", 0.0)), _analytic_figures(t.get("analytic", {}), f"{where}.analytic"))


def _analytic_figures(t: dict, where: str) -> tuple:
    figures = []
    if "peak" in t:
        figures.append(("peak", {dt: quantity(v, "rate", f"{where}.peak.{dt}") for dt, v in t["peak"].items()}))
    for key, kind in (("bandwidth", "bandwidth"), ("launch", "time"), ("op_launch", "time")):
        if key in t:
            figures.append((key, quantity(t[key], kind, f"{where}.{key}", positive=key == "bandwidth")))
    for key in ("overlap_loss", "stationary_penalty"):
        if key in t:
            figures.append((key, float(t[key])))
    return tuple(figures)


def _flash(t: dict, where: str) -> Flash:
    raw = _require(t, "throughput", where)
    if not isinstance(raw, dict) or not raw:
        raise PlatformError(f"{where}.throughput: expected a table of chunk size = bandwidth")
    points = sorted((quantity(k, "bytes", f"{where}.throughput key {k!r}"),
                     quantity(v, "bandwidth", f"{where}.throughput.{k}")) for k, v in raw.items())
    return Flash(quantity(_require(t, "page_size", where), "bytes", f"{where}.page_size"),
                 quantity(_require(t, "read_latency", where), "time", f"{where}.read_latency"),
                 int(t.get("channels", 1)), tuple(points), t.get("source", ""),
                 quantity(t.get("bus_rate", 1e9), "bandwidth", f"{where}.bus_rate"),
                 int(t.get("cores_per_channel", 4)),
                 quantity(t.get("core_rate", 1e9), "bandwidth", f"{where}.core_rate"))


def check_platform_data(data: Any, origin: str) -> None:
    """The data's shape against the platform schema (``schema.PLATFORM``): one line naming the first bad field."""
    from hetflow.support.schema import check
    from .schema import PLATFORM
    check(data, PLATFORM, origin, PlatformError)


def platform_from_dict(data: dict, origin: str = "platform") -> Platform:
    check_platform_data(data, origin)
    name = _require(data, "name", origin)
    where = f"{origin} ({name})"
    memories_raw = _require(data, "memory", where)
    memories = {n: _memory(n, t, f"{where} memory.{n}") for n, t in memories_raw.items()}
    devices_raw = _require(data, "device", where)
    if not devices_raw:
        raise PlatformError(f"{where}: no devices")
    devices = {n: _device(n, t, memories, f"{where} device.{n}") for n, t in devices_raw.items()}
    links = []
    for n, t in data.get("link", {}).items():
        lw = f"{where} link.{n}"
        for end in ("from", "to"):
            if _require(t, end, lw) not in memories:
                raise PlatformError(f"{lw}.{end}: no memory space {t[end]!r}")
        links.append(Link(n, t["from"], t["to"], quantity(_require(t, "bandwidth", lw), "bandwidth", f"{lw}.bandwidth"),
                          quantity(t.get("latency", 0), "time", f"{lw}.latency", positive=False)))
    flash = _flash(data["flash"], f"{where} flash") if "flash" in data else None
    sync = data.get("sync", {})
    return Platform(name, data.get("source", ""), data.get("description", ""), devices, memories, tuple(links), flash,
                    quantity(sync.get("flag", "5 us"), "time", f"{where} sync.flag"),
                    quantity(sync.get("driver", "400 us"), "time", f"{where} sync.driver"),
                    quantity(data.get("call_overhead", 0), "time", f"{where} call_overhead", positive=False), raw=data)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


# Presets measured on this machine (``calibrate = "host"``, ``cuda = true``) are filled in by the driver,
# which measures (hetflow.calibrate): kind -> function(raw preset data) -> data with the measured figures.
MEASUREMENTS: dict[str, Callable[[dict], dict]] = {}

# What a backend can emit, by backend name: (node, opset) -> why not, or None. Filled by the driver from the
# backends, so that placement asks a real device's backend as data, never by importing it.
EMIT_CHECKS: dict[str, Callable[[Any, int], str | None]] = {}


# What a backend emits for a partition, by backend name: (partition graph, name, Device or None) -> program text. Filled by the
# driver from the backends, so that the runtime regenerates a program at load instead of running an artifact's.
PROGRAM_EMITTERS: dict[str, Callable[[Any, str, Any], str]] = {}


DEVICE_EMITTERS: set[str] = set()  # backends whose program depends on the Device's figures (device never None)


def register_program_emitter(backend: str, emit: Callable[[Any, str, Any], str], takes_device: bool = False) -> None:
    PROGRAM_EMITTERS[backend] = emit
    if takes_device:
        DEVICE_EMITTERS.add(backend)


# How long a group takes on a simulated device, by device kind: (graph, node, Device) -> modelled seconds, or
# None when the device's backend would not emit the group (placement then uses the analytic model for it).
# Filled by the driver (``hetflow.simulated_cost``: emit the group, time the program on the simulator), so
# that placement's ``cost_model="sim"`` asks the simulators as data, never by importing them.
DEVICE_TIMERS: dict[str, Callable[[Any, Any, Any], float | None]] = {}


def register_device_timer(kind: str, timer: Callable[[Any, Any, Any], float | None]) -> None:
    DEVICE_TIMERS[kind] = timer


def register_measurement(kind: str, fill: Callable[[dict], dict]) -> None:
    MEASUREMENTS[kind] = fill


def register_emit_check(backend: str, check: Callable[[Any, int], str | None]) -> None:
    EMIT_CHECKS[backend] = check


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def _read_toml(path: Path, origin: str) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise PlatformError(f"{origin}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise PlatformError(f"{origin}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise PlatformError(f"{origin}: cannot read it: {exc.strerror or exc}") from None


MAX_BASE_DEPTH = 8


def _with_base(data: dict, path: Path, origin: str, seen: list[str]) -> dict:
    """``base = "mobile-soc"`` (a preset, or a .toml path relative to this file): this file's tables laid
    over the base's, key by key (a table merges, any other value replaces), e.g. one device's figures
    changed. What ``hetflow calibrate --platform P`` writes. ``[flash] throughput``, a curve measured as a
    whole, replaces the base's rather than merging point by point."""
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise PlatformError(f"{origin}: base must be a preset name or a .toml path, got {base!r}")
    base_path = (path.parent / base) if base.endswith(".toml") else PRESET_DIR / f"{base}.toml"
    if not base_path.exists():
        raise PlatformError(f"{origin}: base {base!r}: no such preset or file (presets: {', '.join(preset_names())})")
    key = str(base_path.resolve())
    if key in seen or len(seen) >= MAX_BASE_DEPTH:
        raise PlatformError(f"{origin}: base {base!r} leads back to itself or nests deeper than {MAX_BASE_DEPTH}")
    under = _with_base(_read_toml(base_path, f"{origin}: base {base}"), base_path, origin, seen + [key])
    merged = _merged(under, data)
    if isinstance(data.get("flash"), dict) and "throughput" in data["flash"]:
        merged["flash"]["throughput"] = data["flash"]["throughput"]   # a curve is one measurement: never mixed
    return merged


def _merged(under: dict, over: dict) -> dict:
    out = dict(under)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@functools.lru_cache(maxsize=None)
def load_platform(name_or_path: str) -> Platform:
    """A preset by name (``host``, ``mobile-soc``...) or a path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.exists():
            raise PlatformError(f"{path}: no such platform file")
        origin = str(path)
    else:
        path = PRESET_DIR / f"{name_or_path}.toml"
        if not path.exists():
            raise PlatformError(f"unknown platform {name_or_path!r}; presets: {', '.join(preset_names())} "
                                "(or give a path to a .toml file)")
        origin = f"preset {name_or_path}"
    data = _with_base(_read_toml(path, origin), path, origin, [])
    check_platform_data(data, origin)
    for kind in ("host",) * (data.get("calibrate") == "host") + ("cuda",) * bool(data.get("cuda")):
        if kind not in MEASUREMENTS:
            raise PlatformError(f"{origin} is filled in by measuring this machine ({kind}), and no measurement is "
                                "registered: import hetflow (the driver registers them)")
        data = MEASUREMENTS[kind](data)
    return platform_from_dict(data, origin)
