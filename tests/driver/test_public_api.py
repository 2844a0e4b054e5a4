"""The public API is small and declared: a change to it is a change to this list."""
import hetflow
import hetflow.ir
import hetflow.runtime


def test_public_api():
    assert sorted(hetflow.__all__) == ["CompiledModel", "__version__", "backend", "compile", "sweep"]
    assert sorted(hetflow.runtime.__all__) == ["ArtifactError", "ExecutionError", "InputError", "Interpreter",
                                               "LoadedModel", "load", "write_artifact"]
    assert {"Graph", "Node", "Value", "TensorType", "DType", "verify", "parse_graph", "print_graph", "save",
            "load", "get_op", "register_op"} <= set(hetflow.ir.__all__)
    for name in hetflow.__all__ + hetflow.ir.__all__ + hetflow.runtime.__all__:
        assert hasattr(hetflow, name) or hasattr(hetflow.ir, name) or hasattr(hetflow.runtime, name)


def test_import_hetflow_stays_light():
    import subprocess
    import sys
    code = "import sys, hetflow, hetflow.runtime; print(sorted(m for m in ('torch', 'matplotlib', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
