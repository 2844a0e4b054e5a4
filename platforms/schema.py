"""The platform file's schema (JSON Schema, checked with jsonschema before any field is read).

The shape of the data only: which tables and fields exist, their types, and that
names are safe to become file names. What a quantity string means ('68 GB/s') and
whether its unit fits the field is checked by ``quantity`` as the fields are read.
"""
from __future__ import annotations

from hetflow.support.schema import SAFE_NAME

QUANTITY = {"anyOf": [{"type": "string", "maxLength": 64}, {"type": "number"}]}
TEXT = {"type": "string", "maxLength": 4096}
NAME_TABLE = {"type": "object", "propertyNames": {"pattern": SAFE_NAME}, "maxProperties": 64}
NAMES = {"type": "array", "items": {"type": "string", "maxLength": 64}, "maxItems": 1024}

MEMORY = {
    "type": "object",
    "required": ["capacity", "bandwidth"],
    "properties": {
        "capacity": QUANTITY,
        "bandwidth": QUANTITY,
        "shared_bandwidth": {"type": "array", "items": QUANTITY, "maxItems": 64},
        "unified": {"type": "boolean"},
        "source": TEXT,
    },
    "additionalProperties": False,
}

ANALYTIC = {  # the analytic cost model's own figures for a device (fitted to its simulator)
    "type": "object",
    "properties": {
        "peak": {**NAME_TABLE, "minProperties": 1, "additionalProperties": QUANTITY},
        "bandwidth": QUANTITY,
        "launch": QUANTITY,
        "op_launch": QUANTITY,
        "overlap_loss": {"type": "number", "minimum": 0, "maximum": 1},
        "stationary_penalty": {"type": "number", "minimum": 1, "maximum": 1e6},
        "source": TEXT,
    },
    "additionalProperties": False,
}

DEVICE = {
    "type": "object",
    "required": ["kind", "memory", "peak"],
    "properties": {
        "kind": {"enum": ["cpu", "gpu", "npu", "pim"]},
        "memory": {"type": "string", "pattern": SAFE_NAME},
        "peak": {**NAME_TABLE, "minProperties": 1, "additionalProperties": QUANTITY},
        "bandwidth": QUANTITY,
        "launch": QUANTITY,
        "op_launch": QUANTITY,
        "overlap_loss": {"type": "number", "minimum": 0, "maximum": 1},
        "analytic": ANALYTIC,
        "tile": {"type": "integer", "minimum": 1, "maximum": 65536},
        "stationary_penalty": {"type": "number", "minimum": 1, "maximum": 1e6},
        "channels": {"type": "integer", "minimum": 1, "maximum": 1 << 20},
        "ops": NAMES,
        "dtypes": NAMES,
        "measured": {"type": "boolean"},
        "source": TEXT,
    },
    "additionalProperties": False,
}

LINK = {
    "type": "object",
    "required": ["from", "to", "bandwidth"],
    "properties": {
        "from": {"type": "string", "pattern": SAFE_NAME},
        "to": {"type": "string", "pattern": SAFE_NAME},
        "bandwidth": QUANTITY,
        "latency": QUANTITY,
        "source": TEXT,
    },
    "additionalProperties": False,
}

FLASH = {
    "type": "object",
    "required": ["page_size", "read_latency", "throughput"],
    "properties": {
        "page_size": QUANTITY,
        "read_latency": QUANTITY,
        "channels": {"type": "integer", "minimum": 1, "maximum": 4096},
        "throughput": {"type": "object", "minProperties": 1, "maxProperties": 64, "additionalProperties": QUANTITY},
        "bus_rate": QUANTITY,
        "cores_per_channel": {"type": "integer", "minimum": 1, "maximum": 4096},
        "core_rate": QUANTITY,
        "source": TEXT,
    },
    "additionalProperties": False,
}

PLATFORM = {
    "type": "object",
    "required": ["name", "memory", "device"],
    "properties": {
        "name": {"type": "string", "pattern": SAFE_NAME},
        "source": TEXT,
        "description": TEXT,
        "calibrate": {"enum": ["host"]},
        "cuda": {"type": "boolean"},
        "memory": {**NAME_TABLE, "minProperties": 1, "additionalProperties": MEMORY},
        "device": {**NAME_TABLE, "minProperties": 1, "additionalProperties": DEVICE},
        "link": {**NAME_TABLE, "additionalProperties": LINK},
        "flash": FLASH,
        "sync": {"type": "object", "properties": {"flag": QUANTITY, "driver": QUANTITY},
                 "additionalProperties": False},
        "call_overhead": QUANTITY,
    },
    "additionalProperties": False,
}
