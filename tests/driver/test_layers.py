"""The layers are enforced: import-linter's contracts hold, and break on a deliberate back-edge."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import hetflow

ROOT = Path(__file__).resolve().parents[2]
LINT = ROOT / ".ci" / "lint_imports.py"


def _lint(*extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LINT), *extra], capture_output=True, text=True, timeout=300)


def test_the_layer_contracts_hold():
    result = _lint()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


def test_a_back_edge_inside_a_function_breaks_the_layers():
    # the IR calling the driver, hidden inside a function as the old group kernel hid its runtime import
    probe = "def probe():\n    from hetflow.api import compile\n    return compile\n"
    result = _lint("--extra-module", f"hetflow.ir._back_edge_probe={probe}")
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "hetflow.ir._back_edge_probe -> hetflow.api" in result.stdout


def test_importing_the_ir_loads_no_driver_module():
    code = ("import sys, hetflow.ir, hetflow.passes, hetflow.runtime\n"
            "driver = [m for m in sys.modules if m.split('.')[:2] in (['hetflow', 'api'], ['hetflow', 'cli'], "
            "['hetflow', 'calibrate'], ['hetflow', 'frontends'], ['hetflow', 'report'], ['hetflow', 'pipeline'])]\n"
            "assert not driver, driver\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_running_a_cpu_artifact_never_imports_torch(tmp_path):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], [w]),
        opset_imports=[helper.make_opsetid("", 18)])
    for platform in ("host", "mobile-soc"):  # one device, and three (simulated devices on the interpreter)
        hetflow.compile(model, platform=platform).save(tmp_path / platform)
        code = ("import sys, numpy as np\nfrom hetflow.runtime import load\n"
                f"out = load({str(tmp_path / platform)!r}).run({{'x': np.ones((4, 16), np.float32)}})\n"
                "assert out['y'].shape == (4, 16)\n"
                "assert 'torch' not in sys.modules, 'the runtime imported torch'\n")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
