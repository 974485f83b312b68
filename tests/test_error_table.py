"""Each row of the error table maps to its exit code and message, plus the precision choice.

| condition              | outcome                  |
| conversion failure     | error, exit 1            |
| p95 > 15 ms            | warning, exit 0          |
| degradation > 2 %      | error, exit 3 (test_cli) |
| model > 10 MB          | warning, exit 0          |
| shape mismatch         | error, exit 1 or 3       |
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from conftest import tiny_payload
from fxbundle.cli import app
from fxbundle.errors import EXIT_ERROR, EXIT_GATE_FAILED, EXIT_OK, GateFailed
from fxbundle.validation import check_io_shapes


class FFTModel(nn.Module):
    """A model the TorchScript exporter cannot convert at opset 17 (no ONNX FFT until opset 17 DFT export support)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(52, 36)

    def forward(self, x):
        spectrum = torch.fft.rfft(x[:, 0, :, 0], dim=-1).abs()
        return self.linear(x[:, 0, -1]) + spectrum[:, :1]


def _invoke(tmp_path, checkpoint, settings: dict, *extra: str):
    config = tmp_path / "config.yaml"
    base = {"latency": {"warmup": 1, "samples": 10, "measure_pytorch": False}, "accuracy": {"windows": 4, "synthetic_windows": 4}}
    for key, value in settings.items():
        base.setdefault(key, {}).update(value)
    config.write_text(yaml.safe_dump(base))
    args = ["build", "--pair", "USDJPY", "--model", str(checkpoint), "--config", str(config), "--out", str(tmp_path / "dist"), "--json", *extra]
    return CliRunner().invoke(app, args)


def _leftovers(tmp_path) -> list[str]:
    dist = tmp_path / "dist"
    return sorted(path.name for path in dist.iterdir()) if dist.exists() else []


def test_conversion_failure_exit_1(tmp_path):
    payload = tiny_payload()
    payload["architecture"] = "test_error_table:FFTModel"
    payload["hyperparameters"] = {}
    payload["state_dict"] = FFTModel().state_dict()
    checkpoint = tmp_path / "fft.pt"
    torch.save(payload, checkpoint)
    result = _invoke(tmp_path, checkpoint, {}, "--precision", "fp32")
    if result.exit_code == EXIT_OK:
        pytest.skip("this torch version exports rfft; no conversion failure to observe")
    assert result.exit_code == EXIT_ERROR, result.stderr
    assert "ONNX export with the torchscript exporter failed" in result.stderr
    assert _leftovers(tmp_path) == []


def test_slow_p95_is_a_warning(tmp_path, tiny_checkpoint):
    result = _invoke(tmp_path, tiny_checkpoint, {"latency": {"target_p95_ms": 0.0001, "warn_p95_ms": 0.0002}}, "--precision", "fp32")
    assert result.exit_code == EXIT_OK, result.stderr
    warnings = json.loads(result.stdout)["warnings"]
    assert any("consider INT8" in warning for warning in warnings)


def test_slow_p95_fails_with_threshold(tmp_path, tiny_checkpoint):
    result = _invoke(tmp_path, tiny_checkpoint, {"latency": {"fail_threshold_ms": 0.0001}}, "--precision", "fp32")
    assert result.exit_code == EXIT_GATE_FAILED
    assert "latency gate failed" in result.stderr
    assert _leftovers(tmp_path) == []


def test_large_model_is_a_warning(tmp_path, tiny_checkpoint):
    result = _invoke(tmp_path, tiny_checkpoint, {"validation": {"max_model_mb": 0.001}}, "--precision", "fp32")
    assert result.exit_code == EXIT_OK, result.stderr
    assert any("the model is large" in warning for warning in json.loads(result.stdout)["warnings"])


def test_declared_shape_mismatch_exit_1(tmp_path):
    checkpoint = tmp_path / "horizon.pt"
    torch.save(tiny_payload(horizon=30), checkpoint)
    result = _invoke(tmp_path, checkpoint, {})
    assert result.exit_code == EXIT_ERROR
    assert "expected [1, 30]" in result.stderr


def test_onnx_shape_mismatch_is_gate():
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["input"], ["output"])],
        "g",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 5, 360, 52])],
        [onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["batch", 35])],
    )
    with pytest.raises(GateFailed) as raised:
        check_io_shapes(onnx.helper.make_model(graph), (1, 5, 360, 52), (1, 36))
    assert raised.value.exit_code == EXIT_GATE_FAILED
    assert "output ['batch', 35]" in str(raised.value)


def test_auto_precision_records_candidates(tmp_path, tiny_checkpoint):
    result = _invoke(tmp_path, tiny_checkpoint, {})
    assert result.exit_code == EXIT_OK, result.stderr
    summary = json.loads(result.stdout)
    candidates = summary["candidates"]
    assert set(candidates) >= {"fp32", "fp16", "int8-dynamic"}
    assert "com.microsoft:DynamicQuantizeLSTM" in candidates["int8-dynamic"]["excluded"]
    eligible = {name: row for name, row in candidates.items() if row["excluded"] is None}
    fastest = min(eligible, key=lambda name: eligible[name]["p95_ms"])
    gain = 100.0 * (eligible["fp32"]["p95_ms"] - eligible[fastest]["p95_ms"]) / eligible["fp32"]["p95_ms"]
    assert summary["precision"] == (fastest if gain >= 5.0 else "fp32")


def test_explicit_fp16_slower_warns_with_both_numbers(tmp_path, tiny_checkpoint):
    result = _invoke(tmp_path, tiny_checkpoint, {}, "--precision", "fp16")
    assert result.exit_code == EXIT_OK, result.stderr
    summary = json.loads(result.stdout)
    fp16, fp32 = summary["candidates"]["fp16"]["p95_ms"], summary["candidates"]["fp32"]["p95_ms"]
    slower = [warning for warning in summary["warnings"] if "slower than fp32" in warning]
    if fp16 > fp32:
        assert slower
        assert str(fp16) in slower[0]
        assert str(fp32) in slower[0]
    else:
        assert slower == []


def test_int8_without_calibration_data_fails_early(tmp_path, tiny_checkpoint):
    result = _invoke(tmp_path, tiny_checkpoint, {}, "--precision", "int8")
    assert result.exit_code == EXIT_ERROR
    assert "START load" not in result.stderr
    assert "--precision int8 cannot be met" in result.stderr
    assert _leftovers(tmp_path) == []
