"""onnx's shape inference on an untrusted model, in bounded time and memory.

onnx's data propagation (which follows shapes through Shape, Gather, Concat, Add...
chains) stands for a 1-D tensor of static length N by N dims at every op that
reads it: a 1-D tensor of 10**8 elements costs it 7 GB and 20 s, one of 2**40 more
memory than the machine has (the kernel then kills the process). A length the
plain pass leaves open can become any length under propagation, so it cannot be
bounded ahead. Hence:

1. the plain pass (no propagation) always runs, in process: its cost follows the
   model's size;
2. if it leaves no shape open, that is the answer;
3. if every node output has a known rank and every 1-D one a known length of at
   most ``DATA_PROP_MAX_LENGTH`` (and there are no subgraphs or functions, whose
   values this does not see), propagation runs in process: it stays cheap;
4. otherwise propagation runs in a child process (Linux: fork) limited to
   ``DATA_PROP_SECONDS`` and ``DATA_PROP_MEMORY`` more bytes; if it runs out, the
   plain pass's shapes are the answer (hetflow's own inference fills in later).
   Where there is no fork, step 4 keeps the plain pass's shapes.
"""
from __future__ import annotations

import os
import select
import signal
import struct
import sys
import time

import onnx

DATA_PROP_MAX_LENGTH = 2 ** 16     # the longest 1-D tensor propagation may see in process
DATA_PROP_SECONDS = 5.0            # the child's time...
DATA_PROP_MEMORY = 2 << 30         # ...and the memory it may add to the parent's


def infer_shapes(model: onnx.ModelProto, error: type[Exception]) -> onnx.ModelProto:
    """The model with onnx's inferred value types; a model onnx's inference rejects raises ``error``."""
    try:
        plain = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:
        raise error(f"ONNX shape inference rejected the model: {_first_line(exc)}") from None
    if not _open_shapes(plain):
        return plain
    if _propagation_is_cheap(plain):
        try:
            return onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception as exc:
            raise error(f"ONNX shape inference rejected the model: {_first_line(exc)}") from None
    outcome = _propagate_in_child(model)
    if outcome is None:
        return plain  # ran out of time or memory: propagation is skipped
    ok, payload = outcome
    if not ok:
        raise error(f"ONNX shape inference rejected the model: {payload.decode(errors='replace')}")
    inferred = onnx.ModelProto.FromString(payload)
    inferred.graph.initializer.extend(model.graph.initializer)  # (sent back without them)
    return inferred


def _shapes(model: onnx.ModelProto) -> dict:
    g = model.graph
    return {vi.name: vi.type.tensor_type.shape if vi.type.tensor_type.HasField("shape") else None
            for vi in list(g.input) + list(g.value_info) + list(g.output) if vi.type.HasField("tensor_type")}


def _open_shapes(model: onnx.ModelProto) -> bool:
    """A node output whose type or rank is unknown, or with a dim not known as a number."""
    shapes = _shapes(model)
    for name in (o for n in model.graph.node for o in n.output if o):
        shape = shapes.get(name)
        if shape is None or any(not d.HasField("dim_value") for d in shape.dim):
            return True
    return False


def _propagation_is_cheap(model: onnx.ModelProto) -> bool:
    g = model.graph
    if model.functions or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                              for n in g.node for a in n.attribute):
        return False
    shapes = _shapes(model)
    for name in [o for n in g.node for o in n.output if o] + [vi.name for vi in g.input]:
        shape = shapes.get(name)
        if shape is None:
            return False  # an unknown rank: propagation could make it 1-D of any length
        if len(shape.dim) == 1 and not (shape.dim[0].HasField("dim_value")
                                        and shape.dim[0].dim_value <= DATA_PROP_MAX_LENGTH):
            return False
    return True


def _propagate_in_child(model: onnx.ModelProto) -> tuple[bool, bytes] | None:
    """(True, the inferred model without its initializers) or (False, onnx's message); None when the child
    ran out of time or memory, or this platform cannot fork."""
    if not sys.platform.startswith("linux"):
        return None
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: infer, write the answer, exit without running the parent's cleanup
        os.close(read_end)
        _child(model, write_end)
    os.close(write_end)
    try:
        data = _read_until(read_end, time.monotonic() + DATA_PROP_SECONDS)
    finally:
        os.close(read_end)
        _reap(pid)
    if data is None or len(data) < 5:
        return None
    status, length = data[:1], struct.unpack("<I", data[1:5])[0]
    if status == b"m" or len(data) != 5 + length:
        return None
    return status == b"o", data[5:]


def _child(model: onnx.ModelProto, fd: int) -> None:
    code = 0
    try:
        import resource
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (used + DATA_PROP_MEMORY, resource.RLIM_INFINITY))
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
            inferred.graph.ClearField("initializer")
            status, payload = b"o", inferred.SerializeToString()
        except MemoryError:
            status, payload = b"m", b""
        except Exception as exc:
            message = _first_line(exc)
            status = b"m" if "bad_alloc" in message else b"e"
            payload = message.encode()
        answer = status + struct.pack("<I", len(payload)) + payload
        view = memoryview(answer)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:  # noqa: BLE001  (the parent reads a short answer as "ran out")
        code = 1
    finally:
        os._exit(code)


def _read_until(fd: int, deadline: float) -> bytes | None:
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return None
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
