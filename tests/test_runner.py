"""BundleRunner on a real tiny FP16 bundle: checksums, scaling once, FP16-to-FP32 fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import tiny_payload
from fxbundle.cli import app
from fxbundle.errors import FxBundleError
from fxbundle.runner import BundleRunner


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    checkpoint = root / "tiny.pt"
    torch.save(tiny_payload(), checkpoint)
    config = root / "fast.yaml"
    config.write_text(yaml.safe_dump({"latency": {"warmup": 1, "samples": 10, "measure_pytorch": False}, "accuracy": {"windows": 4}}))
    result = CliRunner().invoke(app, ["build", "--pair", "USDJPY", "--model", str(checkpoint), "--config", str(config), "--out", str(root / "dist"), "--precision", "fp16"])
    assert result.exit_code == 0, result.stderr
    return root / "dist" / "fxbundle-USDJPY-1.0.0"


def _windows(count: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((count, 5, 360, 52)).astype(np.float32)


def test_runner_predicts_pips_once(fp16_bundle):
    runner = BundleRunner.open(fp16_bundle)
    assert runner.bundle.precision == "fp16"
    raw = runner.predict_price(_windows())
    pips = runner.predict_pips(_windows())
    np.testing.assert_allclose(pips, raw * 100.0, rtol=1e-6)


def test_runner_falls_back_on_nan(fp16_bundle):
    clock = Clock()
    runner = BundleRunner.open(fp16_bundle, clock=clock)
    windows = _windows(1)
    expected_fp32 = runner.monitor.predict_fp32(windows)
    runner.monitor.predict_fp16 = lambda batch: np.full((1, 36), np.nan, dtype=np.float32)
    np.testing.assert_array_equal(runner.predict_price(windows), expected_fp32)
    assert runner.active_precision == "fp32"
    assert runner.statistics.fallbacks == 1


def test_runner_rejects_tampered_bundle(fp16_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(fp16_bundle, copy)
    model = next((copy / "MQL5").rglob("usdjpy_fp32.onnx"))
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(FxBundleError) as raised:
        BundleRunner.open(copy)
    assert raised.value.key == "runtime.checksum_mismatch"
    assert "usdjpy_fp32.onnx" in str(raised.value)
