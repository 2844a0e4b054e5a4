"""Dynamic shapes: one compiled model (and one artifact) for every size in declared ranges.

The model is compiled once with ``dynamic_shapes`` (torch.export's Dim form, or ``(min, max)`` per ONNX
dim_param); placement and the memory plan are made for the declared maximum; each call binds its sizes,
is checked against the ranges, and runs in arena slots viewed at its shapes. Outputs are compared with
eager PyTorch at every size.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.export import Dim

import hetflow
from hetflow.examples import models
from hetflow.ir.errors import HetflowError
from hetflow.ir.symbolic import DimOutOfRange, max_nbytes

BATCHES, SEQS = (1, 2, 4), (16, 64, 128)


def _eager(module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(ids)).numpy()


def _ids(batch: int, seq: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + 31 * batch + seq).integers(0, vocab, (batch, seq)).astype(np.int64)


@pytest.fixture(scope="module")
def gpt2_artifact(tmp_path_factory):
    module, example = models.build_gpt2_dynamic()
    compiled = hetflow.compile(module, example, dynamic_shapes=({0: Dim("batch", min=1, max=4),
                                                                 1: Dim("seq", min=2, max=128)},))
    directory = compiled.save(tmp_path_factory.mktemp("dyn") / "gpt2")
    return module, compiled, directory


def test_one_gpt2_artifact_runs_every_batch_and_sequence_length_equal_to_eager(gpt2_artifact):
    module, compiled, directory = gpt2_artifact
    loaded = hetflow.runtime.load(directory)
    assert loaded.graph.dims == {"batch": (1, 4), "seq": (2, 128)}
    for batch in BATCHES:
        for seq in SEQS:
            ids = _ids(batch, seq, 100)
            (out,) = loaded.run({"x": ids}).values()
            expected = _eager(module, ids)
            assert out.shape == (batch, seq, 100)
            np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4, err_msg=f"batch {batch}, seq {seq}")


@pytest.mark.parametrize("shape, message", [((5, 16), "input %x dim 0 (batch) is 5, outside the range 1..4"),
                                            ((2, 129), "input %x dim 1 (seq) is 129, outside the range 2..128"),
                                            ((1, 1), "input %x dim 1 (seq) is 1, outside the range 2..128")])
def test_a_size_outside_the_declared_range_is_refused_in_one_line(gpt2_artifact, shape, message):
    _, compiled, directory = gpt2_artifact
    for model in (compiled.executor, hetflow.runtime.load(directory)):
        with pytest.raises(DimOutOfRange) as info:
            model.run({"x": np.zeros(shape, np.int64)})
        assert message in str(info.value) and "\n" not in str(info.value)


def test_the_memory_plan_and_report_are_for_the_declared_maximum(gpt2_artifact):
    _, compiled, _ = gpt2_artifact
    graph = compiled.graph
    logits = graph.outputs[0]
    assert str(logits.type) == "f32[batch,seq,100]"
    assert max_nbytes(logits.type, graph.dims) == 4 * 128 * 100 * 4
    report = compiled.report()
    assert "dynamic sizes: batch in 1..4, seq in 2..128" in report
    assert "%x: i64[batch,seq]" in report
    # every activation of this model has a size bounded by the ranges: all planned, none allocated per call
    assert "allocated per call" not in report
    planned = {n for space in compiled.memory_plan.spaces.values() for n in space.offsets}
    assert planned and all(max_nbytes(graph.value(n).type, graph.dims) is not None for n in planned)


def test_dynamic_sizes_run_across_simulated_devices_in_arena_slots():
    """mobile-soc: CPU, GPU and NPU partitions (simulated), values crossing them in the planned arena at
    each call's shapes."""
    module, example = models.build_tiny_lm()
    compiled = hetflow.compile(module, example, platform="mobile-soc",
                               dynamic_shapes=({0: Dim("batch", min=1, max=4), 1: Dim("seq", min=2, max=128)},))
    assert len({p.device for p in compiled._build_partitions()}) > 1
    assert compiled.executor.slots, "values crossing partitions should live in the arena"
    for batch, seq in ((1, 16), (4, 128), (3, 7), (4, 128)):
        ids = torch.from_numpy(_ids(batch, seq, 50))
        out = compiled(ids)
        np.testing.assert_allclose(out.numpy(), _eager(module, ids.numpy()), rtol=1e-4, atol=1e-4)


def test_onnx_symbolic_dims_declared_by_dim_param(tmp_path):
    module, (example,) = models.build_tiny_lm()
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=["ids"], opset_version=17,
                      dynamic_axes={"ids": {0: "batch", 1: "seq"}})
    compiled = hetflow.compile(str(path), dynamic_shapes={"batch": (1, 4), "seq": Dim("seq", min=2, max=128)})
    graph = compiled.graph
    assert graph.dims == {"batch": (1, 4), "seq": (2, 128)}
    assert str(graph.inputs[0].type) == "i64[batch,seq]"
    unbounded = [v.name for n in graph.nodes for v in n.outputs if max_nbytes(v.type, graph.dims) is None]
    assert not unbounded, f"onnxruntime's symbolic inference should bound every value: {unbounded[:5]}"
    for batch, seq in ((1, 16), (4, 128), (2, 5)):
        ids = _ids(batch, seq, 50)
        np.testing.assert_allclose(compiled(ids), _eager(module, ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(DimOutOfRange, match="ids dim 0 \\(batch\\) is 8"):
        compiled(_ids(8, 16, 50))


def test_onnx_dynamic_shapes_must_name_the_inputs_dim_params(tmp_path):
    module, (example,) = models.build_tiny_lm()
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=["ids"], opset_version=17,
                      dynamic_axes={"ids": {0: "batch", 1: "seq"}})
    with pytest.raises(HetflowError, match="dynamic size 'tokens' is not a dim_param of any input"):
        hetflow.compile(str(path), dynamic_shapes={"batch": (1, 4), "seq": (2, 128), "tokens": (1, 2)})
    with pytest.raises(HetflowError, match="dim_param 'seq', which dynamic_shapes does not declare"):
        hetflow.compile(str(path), dynamic_shapes={"batch": (1, 4)})
    with pytest.raises(HetflowError, match="give its range as \\(min, max\\)"):
        hetflow.compile(str(path), dynamic_shapes={"batch": (4, 1), "seq": (2, 128)})


def test_a_dim_without_a_max_is_refused_naming_it():
    module, example = models.build_tiny_lm()
    with pytest.raises(HetflowError, match="dynamic size 'seq' has no finite max"):
        hetflow.compile(module, example, dynamic_shapes=({1: Dim("seq", min=2)},))


def test_split_placement_and_tvm_refuse_dynamic_sizes():
    module, example = models.build_tiny_lm()
    spec = ({0: Dim("batch", min=1, max=4)},)
    with pytest.raises(HetflowError, match="placement 'split' fixes each part's rows"):
        hetflow.compile(module, example, platform="mobile-soc", placement="split", dynamic_shapes=spec)
    with pytest.raises(HetflowError, match="cpu_backend 'tvm' compiles each partition for fixed shapes"):
        hetflow.compile(module, example, cpu_backend="tvm", dynamic_shapes=spec)


def test_torch_compile_recompiles_for_dynamic_sizes_with_scalar_size_inputs():
    """dynamo's dynamic graphs take sizes as 0-d inputs (they used to be made 1-d on the way in)."""
    module, _ = models.build_tiny_lm()
    backend = hetflow.backend()
    compiled = torch.compile(module, backend=backend, dynamic=True)
    with torch.no_grad():
        for batch, seq in ((2, 16), (3, 40), (2, 9)):
            ids = torch.from_numpy(_ids(batch, seq, 50))
            np.testing.assert_allclose(compiled(ids).numpy(), _eager(module, ids.numpy()), rtol=1e-4, atol=1e-4)
    assert len(backend.compiled) == 1, "one dynamic graph serves every size"
    assert any(isinstance(d, str) for v in backend.compiled[0].graph.inputs if v.type.shape
               for d in v.type.shape)


def test_cli_compile_dynamic_then_run_at_chosen_sizes(tmp_path, capsys):
    from hetflow.cli import main
    out = tmp_path / "dyn"
    assert main(["compile", "hetflow.examples.models:build_tiny_lm", "--dynamic", "batch=1..4,seq=2..128",
                 "-o", str(out)]) == 0
    assert "dynamic sizes: batch in 1..4, seq in 2..128" in capsys.readouterr().out
    assert main(["run", str(out), "--random", "--sizes", "batch=3,seq=40"]) == 0
    assert "float32[3, 40, 50]" in capsys.readouterr().out
    assert main(["run", str(out), "--random"]) == 0  # each size at its maximum
    assert "float32[4, 128, 50]" in capsys.readouterr().out
    assert main(["run", str(out), "--random", "--sizes", "seq=300"]) != 0
    assert "input %ids dim 1 (seq) is 300, outside the range 2..128" in capsys.readouterr().err


def test_cli_dynamic_without_a_range_goes_up_to_the_example(tmp_path, capsys):
    from hetflow.cli import main
    out = tmp_path / "dyn"
    assert main(["compile", "hetflow.examples.models:build_tiny_lm", "--dynamic", "seq", "-o", str(out)]) == 0
    loaded = hetflow.runtime.load(out)
    assert loaded.graph.dims == {"seq": (1, 16)} and str(loaded.graph.inputs[0].type) == "i64[2,seq]"


@pytest.mark.parametrize("spec, message", [("seq=9..3", "MIN <= MAX"), ("frames", "frames@AXIS"),
                                           ("b-1", "NAME[@AXIS][=MIN..MAX]"), (",", "name at least one size")])
def test_cli_dynamic_spec_errors_say_how_to_write_it(tmp_path, capsys, spec, message):
    from hetflow.cli import main
    assert main(["compile", "hetflow.examples.models:build_tiny_lm", "--dynamic", spec,
                 "-o", str(tmp_path / "x")]) != 0
    assert message in capsys.readouterr().err
