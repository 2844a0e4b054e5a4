"""Golden IR files: the input IR, then '# expect:' and the IR a pass must produce.

Each file in tests/golden/<pass>/ starts with '#' comment lines, then the input
graph; after a line '# expect:' comes the expected graph. A file without an
expected section expects the input unchanged (the pass must say modified=False).
Weights printed as 'resource' get seeded random data of their declared type.
``HETFLOW_UPDATE_GOLDEN=1 pytest tests/test_passes.py`` rewrites the expected
sections from what the passes produce now: review the diff before committing.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from hetflow.ir import DType, parse_graph

GOLDEN = Path(__file__).parent / "golden"
_RESOURCE = re.compile(r"weight %([A-Za-z0-9_.]+): (\w+)\[([^\]]*)\] = resource")


def resources_for(text: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    found = {}
    for name, dtype, dims in _RESOURCE.findall(text):
        shape = tuple(int(d) for d in dims.split(",") if d)
        found[name] = rng.standard_normal(shape).astype(DType(dtype).numpy)
    return found


def split(path: Path) -> tuple[str, str | None]:
    text = path.read_text()
    before, _, expected = text.partition("# expect:\n")
    before = "\n".join(line for line in before.splitlines() if not line.startswith("#"))
    return before, (expected if expected.strip() else None)


def load_before(path: Path):
    before, _ = split(path)
    return parse_graph(before, resources_for(before))


def write_expected(path: Path, expected_text: str | None) -> None:
    text = path.read_text().partition("# expect:\n")[0].rstrip("\n") + "\n"
    if expected_text is not None:
        text += "# expect:\n" + expected_text.rstrip("\n") + "\n"
    path.write_text(text)


def cases(pass_name: str) -> list[Path]:
    return sorted((GOLDEN / pass_name).glob("*.ir"))
