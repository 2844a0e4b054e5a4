"""JSON Schema validation (jsonschema) that reports the first violation as one line naming the field.

Used for the data hetflow reads from files other people write: the artifact manifest
and platform TOML files. The schemas live beside the code that reads the data; this
module only turns jsonschema's errors into one readable line.
"""
from __future__ import annotations

import math
import re
from typing import Any

SAFE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}$"   # device, memory and link names: they become file names


def _field(path) -> str:
    parts = []
    for p in path:
        parts.append(f"[{p}]" if isinstance(p, int) else (f".{p}" if parts else str(p)))
    return "".join(parts) or "(top level)"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _message(error) -> str:
    """jsonschema's message, with the offending value shortened (it repeats whole tables otherwise)."""
    validator, expected = error.validator, error.validator_value
    value = _short(error.instance)
    if validator == "type":
        wanted = expected if isinstance(expected, str) else " or ".join(expected)
        return f"expected {wanted}, got {value}"
    if validator == "required":
        missing = [k for k in expected if isinstance(error.instance, dict) and k not in error.instance]
        return f"missing field {missing[0]!r}" if missing else error.message
    if validator == "additionalProperties":
        extra = [k for k in error.instance if k not in error.schema.get("properties", {})
                 and not any(re.search(p, k) for p in error.schema.get("patternProperties", {}))]
        return f"unknown field {extra[0]!r}" if extra else error.message
    if validator == "enum":
        return f"{value} is not one of {', '.join(map(str, expected))}"
    if validator == "pattern" and expected == SAFE_NAME:
        return (f"name {value} is not allowed: names are 1-64 letters, digits and _ . + - "
                "(they become file names)")
    if validator == "pattern":
        return f"{value} does not match {expected}"
    if validator == "propertyNames":
        return f"name {value} is not allowed: {error.message[:120]}"
    if validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return f"{value} is out of range ({validator} {expected})"
    if validator in ("minItems", "maxItems", "minProperties", "maxProperties"):
        return f"{value}: {validator} {expected}"
    return error.message[:200]


def first_violation(instance: Any, schema: dict) -> tuple[str, str] | None:
    """(field path, message) of the most relevant violation of ``schema``, or None."""
    import jsonschema
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    if error is None:
        return None
    # descend to the deepest cause of an anyOf/oneOf, which names the field that is wrong
    while error.context:
        types = [e.validator_value for e in error.context if e.validator == "type" and not e.relative_path]
        if len(types) == len(error.context):  # every alternative is a type: say them all
            wanted = " or ".join(t if isinstance(t, str) else " or ".join(t) for t in types)
            return _field(error.absolute_path), f"expected {wanted}, got {_short(error.instance)}"
        error = jsonschema.exceptions.best_match(error.context)
    return _field(error.absolute_path), _message(error)


def check(instance: Any, schema: dict, where: str, error: type[Exception]) -> None:
    """Raise ``error("<where> <field>: <message>")`` for the first violation of ``schema``."""
    found = first_violation(instance, schema)
    if found is not None:
        field, message = found
        raise error(f"{where}: {field}: {message}")


def finite(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
