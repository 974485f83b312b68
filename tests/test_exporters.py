"""Both exporters, TorchScript and dynamo, must give one file that ONNX Runtime 1.15 can load.

Each exporter is run on a tiny MultiTFLSTMModel (and, in the slow tests, on the reference size):
the result must be a single file with IR version <= 8 and opset <= 17, match PyTorch, pass
batch parity and carry no tail scale node.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from conftest import REPO_ROOT, TINY_HYPERPARAMETERS
from fxbundle import export
from fxbundle.architectures import MultiTFLSTMModel
from fxbundle.config import ExportSettings, load_target_profile
from fxbundle.errors import ExportError
from fxbundle.export import check_target_profile, downgrade_ir_version, export_onnx, load_inlined
from fxbundle.graph_checks import check_batch_parity, check_no_training_nodes, check_optimization_levels, check_rnn_layout
from fxbundle.scaling import detect_tail_scale
from fxbundle.sessions import create_session, run

EXPORTERS = ("torchscript", "dynamo")
INPUT_SHAPE = (1, 5, 360, 52)
ATOL, RTOL = 1e-5, 1e-4


def _batch(size: int, seed: int = 11) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((size, *INPUT_SHAPE[1:])).astype(np.float32)


@pytest.fixture(scope="module", params=EXPORTERS)
def tiny_export(request, tmp_path_factory):
    torch.manual_seed(0)
    model = MultiTFLSTMModel(**TINY_HYPERPARAMETERS).eval()
    out_dir = tmp_path_factory.mktemp(f"tiny-{request.param}")
    result = export_onnx(model, INPUT_SHAPE, out_dir / "model.onnx", ExportSettings(exporter=request.param))
    return model, result


def _assert_export_contract(model: nn.Module, result: export.ExportResult) -> None:
    proto = onnx.load(str(result.path))
    assert sorted(path.name for path in result.path.parent.iterdir()) == ["model.onnx"]
    assert proto.ir_version <= 8
    assert result.ir_version == proto.ir_version
    assert result.opset <= 17
    assert [entry.domain for entry in proto.opset_import] == [""]
    assert not any(tensor.data_location == TensorProto.EXTERNAL for tensor in proto.graph.initializer)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param != ""
    assert check_target_profile(result.path, load_target_profile("mt5")) == []

    session, _ = create_session(result.path)
    batch = _batch(3)
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(run(session, batch), expected, atol=ATOL, rtol=RTOL)

    parity = check_batch_parity(result.path, model, INPUT_SHAPE, ATOL, RTOL)
    assert parity.passed


def test_tiny_export_contract(tiny_export):
    model, result = tiny_export
    _assert_export_contract(model, result)


def test_tiny_export_records_versions(tiny_export):
    _, result = tiny_export
    assert result.opset == 17
    assert result.ir_version == 8
    if result.exporter == "dynamo":
        # torch 2.13 writes IR version 10, and export_onnx lowers it.
        assert result.ir_version_original > 8
    assert result.external_data_inlined is False
    assert result.seconds > 0


def test_tiny_export_graph_checks(tiny_export):
    _, result = tiny_export
    proto = onnx.load(str(result.path))
    assert check_no_training_nodes(proto).nodes_checked > 0
    assert len(check_rnn_layout(proto).rnn_nodes) == 10
    assert check_optimization_levels(result.path, _batch(2), ATOL, RTOL).parity.passed
    assert detect_tail_scale(proto) is None


ORT115_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import onnxruntime as ort
    session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    output = session.run(None, {"input": np.load(sys.argv[2])})[0]
    np.save(sys.argv[3], output)
    print(ort.__version__)
    """
)


def _ort115_python() -> str | None:
    """Return the interpreter with onnxruntime 1.15.0: FXBUNDLE_ORT115_PYTHON, else a venv beside or in the repository."""
    configured = os.environ.get("FXBUNDLE_ORT115_PYTHON")
    if configured:
        return configured
    for candidate in (REPO_ROOT / ".venv-ort115" / "bin" / "python", REPO_ROOT.parent / "venv-ort115" / "bin" / "python"):
        if candidate.is_file():
            return str(candidate)
    return None


def _run_in_onnxruntime_1_15(model_path: Path, batch: np.ndarray, work_dir: Path) -> np.ndarray:
    """Run ``batch`` through the model in a subprocess with onnxruntime 1.15.0; skip (fail in CI) without one."""
    python = _ort115_python()
    if python is None:
        if os.environ.get("CI"):
            pytest.fail("no onnxruntime 1.15.0 interpreter: set FXBUNDLE_ORT115_PYTHON (scripts/test.sh creates .venv-ort115 and sets it)")
        pytest.skip("no onnxruntime 1.15.0 interpreter: set FXBUNDLE_ORT115_PYTHON or run scripts/test.sh")
    np.save(work_dir / "input.npy", batch)
    script = work_dir / "run.py"
    script.write_text(ORT115_SCRIPT, encoding="utf-8")
    completed = subprocess.run(
        [python, str(script), str(model_path), str(work_dir / "input.npy"), str(work_dir / "output.npy")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "1.15.0"
    return np.load(work_dir / "output.npy")


def test_tiny_export_runs_in_onnxruntime_1_15(tiny_export, tmp_path):
    model, result = tiny_export
    batch = _batch(3)
    outputs = _run_in_onnxruntime_1_15(result.path, batch, tmp_path)
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(outputs, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_reference_model_export(tmp_path, exporter):
    torch.manual_seed(0)
    model = MultiTFLSTMModel().eval()
    result = export_onnx(model, INPUT_SHAPE, tmp_path / "model.onnx", ExportSettings(exporter=exporter))
    _assert_export_contract(model, result)
    proto = onnx.load(str(result.path))
    assert result.opset == 17
    assert sum(node.op_type == "LSTM" for node in proto.graph.node) == 10
    assert detect_tail_scale(proto) is None

    batch = _batch(2)
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(_run_in_onnxruntime_1_15(result.path, batch, tmp_path), expected, atol=ATOL, rtol=RTOL)


# --- export_onnx's own checks -------------------------------------------------------------


class SmallLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(52, 36)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x[:, 0, -1])


def test_dynamo_external_data_inlined(tmp_path):
    torch.manual_seed(0)
    model = SmallLinear().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (torch.zeros(2, 5, 360, 52),),
            dynamo=True,
            opset_version=18,
            input_names=["input"],
            output_names=["output"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
            verbose=False,
        )
    raw = tmp_path / "raw" / "model.onnx"
    raw.parent.mkdir()
    program.save(str(raw), external_data=True)
    assert len(list(raw.parent.iterdir())) == 2  # model.onnx and its external data file

    proto, external = load_inlined(raw)
    assert external is True
    single = tmp_path / "single.onnx"
    export.save_single_file(proto, single)
    reloaded = onnx.load(str(single), load_external_data=False)
    assert not any(tensor.data_location == TensorProto.EXTERNAL for tensor in reloaded.graph.initializer)
    session, _ = create_session(single)
    batch = _batch(2)
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(run(session, batch), expected, atol=ATOL, rtol=RTOL)


def test_export_inlines_external_data(monkeypatch, tmp_path):
    real_run_exporter = export._run_exporter

    def run_with_external_data(model, sample, path, settings):
        real_run_exporter(model, sample, path, settings)
        proto = onnx.load(str(path))
        onnx.save_model(proto, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)

    monkeypatch.setattr(export, "_run_exporter", run_with_external_data)
    out_dir = tmp_path / "out"
    result = export_onnx(SmallLinear().eval(), INPUT_SHAPE, out_dir / "model.onnx", ExportSettings(exporter="dynamo"))
    assert result.external_data_inlined is True
    assert sorted(path.name for path in out_dir.iterdir()) == ["model.onnx"]
    assert result.ir_version <= 8


def test_dynamo_without_onnxscript(monkeypatch, tmp_path):
    real_find_spec = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec", lambda name, *args: None if name == "onnxscript" else real_find_spec(name, *args))
    with pytest.raises(ExportError) as raised:
        export_onnx(SmallLinear().eval(), INPUT_SHAPE, tmp_path / "model.onnx", ExportSettings(exporter="dynamo"))
    assert raised.value.key == "checks.dynamo_needs_onnxscript"
    assert "pip install onnxscript" in str(raised.value)


def _write_identity_model(path: Path, opset: int, batch_dim: str | int) -> None:
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["input"], ["output"])],
            "g",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch_dim, 36])],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch_dim, 36])],
        ),
        opset_imports=[helper.make_opsetid("", opset)],
    )
    model.ir_version = 8
    onnx.save(model, str(path))


def test_export_rejects_opset_above_request(monkeypatch, tmp_path):
    monkeypatch.setattr(export, "_run_exporter", lambda model, sample, path, settings: _write_identity_model(path, 18, "batch"))
    with pytest.raises(ExportError) as raised:
        export_onnx(SmallLinear().eval(), INPUT_SHAPE, tmp_path / "model.onnx", ExportSettings(exporter="dynamo"))
    assert raised.value.key == "checks.opset_too_new"
    assert raised.value.params == {"exporter": "dynamo", "found": 18, "requested": 17}
    assert not (tmp_path / "model.onnx").exists()


def test_export_rejects_fixed_batch(monkeypatch, tmp_path):
    monkeypatch.setattr(export, "_run_exporter", lambda model, sample, path, settings: _write_identity_model(path, 17, 1))
    with pytest.raises(ExportError) as raised:
        export_onnx(SmallLinear().eval(), INPUT_SHAPE, tmp_path / "model.onnx", ExportSettings())
    assert raised.value.key == "checks.batch_axis_fixed"
    assert not (tmp_path / "model.onnx").exists()


def test_ir_version_with_int4_not_lowered():
    if not hasattr(TensorProto, "INT4"):
        pytest.skip("this onnx release has no INT4 type")
    proto = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["w"], ["y"])],
            "g",
            [],
            [helper.make_tensor_value_info("y", TensorProto.INT4, [2])],
            [helper.make_tensor("w", TensorProto.INT4, [2], [1, 2])],
        ),
        opset_imports=[helper.make_opsetid("", 21)],
    )
    proto.ir_version = 10
    with pytest.raises(ExportError) as raised:
        downgrade_ir_version(proto, 8)
    assert raised.value.key == "export.ir_version_too_new"
