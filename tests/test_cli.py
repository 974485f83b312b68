"""The CLI in-process: a tiny model built end to end, exit codes and bad inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import tiny_payload
from fxbundle.bundle import verify_bundle
from fxbundle.cli import app
from fxbundle.errors import EXIT_ERROR, EXIT_GATE_FAILED, EXIT_OK, EXIT_USAGE

JST_LINE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} JST ")
BUNDLE = "fxbundle-USDJPY-1.0.0"
EXPERT_DIR = f"{BUNDLE}/MQL5/Experts/FxBundle/USDJPY_1.0.0"


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, [str(arg) for arg in args], env=env)


def build_args(checkpoint: Path, config: Path, out: Path, *extra: str) -> list:
    return ["build", "--pair", "USDJPY", "--model", checkpoint, "--config", config, "--out", out, *extra]


def assert_nothing_written(out: Path) -> None:
    leftovers = sorted(path.name for path in out.iterdir()) if out.exists() else []
    assert leftovers == []


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One successful tiny build shared by the read-only checks below."""
    root = tmp_path_factory.mktemp("built")
    checkpoint = root / "tiny.pt"
    torch.save(tiny_payload(), checkpoint)
    config = root / "fast.yaml"
    config.write_text(yaml.safe_dump({"latency": {"warmup": 3, "samples": 20}, "accuracy": {"windows": 16, "batch_size": 8}}))
    out = root / "dist"
    result = invoke(*build_args(checkpoint, config, out, "--json"))
    return result, out


def test_build_exit_code_and_json(built):
    result, out = built
    assert result.exit_code == EXIT_OK, result.stderr
    summary = json.loads(result.stdout)
    assert summary["bundle"] == str(out / BUNDLE)
    assert summary["zip"] == str(out / f"{BUNDLE}.zip")
    assert len(summary["zip_sha256"]) == 64
    assert summary["execution_provider"] == "CPUExecutionProvider"
    assert summary["accuracy"]["data_source"] == "synthetic"
    assert summary["latency_ms"]["p95"] > 0


def test_build_logs_are_jst_stamped(built):
    result, _ = built
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines
    assert all(JST_LINE.match(line) for line in lines), lines
    assert any("START export FP32 ONNX" in line for line in lines)
    assert any("END   package bundle" in line for line in lines)
    assert any("synthetic windows" in line for line in lines)


def test_bundle_layout_and_manifest(built):
    _, out = built
    bundle = out / BUNDLE
    assert (bundle / "MQL5/Experts/FxBundle/USDJPY_1.0.0/FxBundle_USDJPY.mq5").is_file()
    assert (bundle / "MQL5/Include/FxBundle/ExampleFeatures.mqh").is_file()
    assert (bundle / "onnx_metadata.json").is_file()
    assert (bundle / "SHA256SUMS").is_file()
    assert (bundle / "logs/build.log").is_file()
    assert verify_bundle(bundle) == []


def test_ea_embeds_multiplier_shapes_and_resource(built):
    _, out = built
    ea = (out / EXPERT_DIR / "FxBundle_USDJPY.mq5").read_text(encoding="ascii")
    spec = (out / EXPERT_DIR / "model_spec.mqh").read_text(encoding="ascii")
    resource = re.search(r'#resource "([^"]+)" as uchar ExtModel\[\]', ea)
    assert resource is not None
    assert (out / EXPERT_DIR / resource.group(1)).is_file()
    assert re.search(r"const double FXB_PIPS_MULTIPLIER = 100(\.0)?;", spec)
    assert re.search(r"\{\s*1\s*,\s*5\s*,\s*360\s*,\s*52\s*\}", spec)
    assert re.search(r"\{\s*1\s*,\s*36\s*\}", spec)


def test_metadata_sections_and_model_properties(built):
    _, out = built
    metadata = json.loads((out / BUNDLE / "onnx_metadata.json").read_text())
    assert set(metadata) == {"conversion", "model", "performance", "accuracy", "validation", "scaling"}
    assert metadata["scaling"]["scaling_applied"] is False
    assert metadata["scaling"]["pips_multiplier"] == 100
    assert metadata["accuracy"]["shipped"]["data_source"] == "synthetic"
    assert metadata["performance"]["shipped"]["provider"] == "CPUExecutionProvider"
    proto = onnx.load(str(out / EXPERT_DIR / "usdjpy_fp32.onnx"))
    properties = {entry.key: entry.value for entry in proto.metadata_props}
    assert properties["scaling_applied"] == "false"
    assert properties["pips_multiplier"] == "100"
    assert properties["pair"] == "USDJPY"
    assert json.loads(properties["input_shape"]) == [1, 5, 360, 52]
    assert json.loads(properties["output_shape"]) == [1, 36]


def test_existing_version_not_overwritten(built, tmp_path):
    _, out = built
    before = (out / f"{BUNDLE}.zip").read_bytes()
    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny_payload(), checkpoint)
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump({"latency": {"warmup": 1, "samples": 10}, "accuracy": {"windows": 4}}))
    result = invoke(*build_args(checkpoint, config, out))
    assert result.exit_code == EXIT_ERROR
    assert "already exists" in result.stderr
    assert (out / f"{BUNDLE}.zip").read_bytes() == before


@pytest.fixture
def setup(tmp_path, tiny_checkpoint, fast_config):
    return tiny_checkpoint, fast_config, tmp_path / "dist"


def test_missing_pair_is_usage_error(setup):
    checkpoint, config, out = setup
    result = invoke("build", "--model", checkpoint, "--config", config, "--out", out)
    assert result.exit_code == EXIT_USAGE


def test_missing_checkpoint(setup, tmp_path):
    _, config, out = setup
    result = invoke(*build_args(tmp_path / "absent.pt", config, out))
    assert result.exit_code == EXIT_ERROR
    assert "checkpoint" in result.stderr
    assert "absent.pt not found" in result.stderr
    assert_nothing_written(out)


def test_corrupt_checkpoint(setup, tmp_path):
    _, config, out = setup
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02garbage")
    result = invoke(*build_args(corrupt, config, out))
    assert result.exit_code == EXIT_ERROR
    assert "cannot be read" in result.stderr
    assert_nothing_written(out)


def test_pickled_module_needs_trust_flag(setup, tmp_path):
    _, config, out = setup
    from fxbundle.architectures import MultiTFLSTMModel

    path = tmp_path / "module.pt"
    torch.save(MultiTFLSTMModel(hidden_size=4, head_hidden=4), path)
    result = invoke(*build_args(path, config, out))
    assert result.exit_code == EXIT_ERROR
    assert "--trust-checkpoint" in result.stderr
    assert_nothing_written(out)


def test_unknown_pair(setup):
    checkpoint, config, out = setup
    result = invoke("build", "--pair", "ABCXYZ", "--model", checkpoint, "--config", config, "--out", out)
    assert result.exit_code == EXIT_ERROR
    assert "pair 'ABCXYZ' is not in" in result.stderr
    assert "USDJPY" in result.stderr


def test_pair_mismatch_rejected(setup):
    checkpoint, config, out = setup
    result = invoke("build", "--pair", "EURJPY", "--model", checkpoint, "--config", config, "--out", out)
    assert result.exit_code == EXIT_ERROR
    assert "--pair EURJPY does not match the checkpoint's pair USDJPY" in result.stderr
    assert "--allow-pair-mismatch" in result.stderr
    assert_nothing_written(out)


def test_pair_mismatch_allowed_with_flag(setup):
    checkpoint, config, out = setup
    result = invoke("build", "--pair", "EURJPY", "--model", checkpoint, "--config", config, "--out", out, "--allow-pair-mismatch", "--json")
    assert result.exit_code == EXIT_OK, result.stderr
    assert (out / "fxbundle-EURJPY-1.0.0").is_dir()
    assert any("--allow-pair-mismatch" in warning for warning in json.loads(result.stdout)["warnings"])


def test_gate_failure_exits_3_and_writes_nothing(setup, tmp_path):
    checkpoint, _, out = setup
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump({"latency": {"warmup": 1, "samples": 10}, "accuracy": {"windows": 8, "fail_degradation_pct": 0.0}}))
    result = invoke(*build_args(checkpoint, strict, out, "--precision", "fp16"))
    assert result.exit_code == EXIT_GATE_FAILED
    assert "accuracy gate failed" in result.stderr
    assert_nothing_written(out)


def test_unwritable_output_dir(setup, tmp_path):
    checkpoint, config, _ = setup
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = invoke(*build_args(checkpoint, config, blocker / "dist"))
    assert result.exit_code == EXIT_ERROR
    assert "is not writable" in result.stderr


def test_bad_precision_is_usage_error(setup):
    checkpoint, config, out = setup
    result = invoke(*build_args(checkpoint, config, out, "--precision", "fp8"))
    assert result.exit_code == EXIT_USAGE
    assert "--precision fp8 is not supported" in result.stderr


def test_bad_version_is_usage_error(setup):
    checkpoint, config, out = setup
    result = invoke(*build_args(checkpoint, config, out, "--version", "v1"))
    assert result.exit_code == EXIT_USAGE


def test_unknown_feature_set_needs_mqh(setup, tmp_path):
    _, config, out = setup
    path = tmp_path / "custom.pt"
    torch.save(tiny_payload(feature_set="team-features-v3"), path)
    result = invoke(*build_args(path, config, out))
    assert result.exit_code == EXIT_ERROR
    assert "--features-mqh" in result.stderr
    assert_nothing_written(out)


def test_npz_with_wrong_shape(setup, tmp_path):
    checkpoint, config, out = setup
    npz = tmp_path / "windows.npz"
    np.savez(npz, X=np.zeros((4, 5, 360, 50), dtype=np.float32), y=np.zeros((4, 36), dtype=np.float32))
    result = invoke(*build_args(checkpoint, config, out, "--test-data", npz))
    assert result.exit_code == EXIT_ERROR
    assert "array X has shape [4, 5, 360, 50]" in result.stderr
    assert_nothing_written(out)


def test_npz_test_data_used(setup, tmp_path):
    checkpoint, config, out = setup
    npz = tmp_path / "windows.npz"
    rng = np.random.default_rng(3)
    np.savez(npz, X=rng.standard_normal((6, 5, 360, 52)).astype(np.float32), y=rng.standard_normal((6, 36)).astype(np.float32))
    result = invoke(*build_args(checkpoint, config, out, "--test-data", npz, "--json"))
    assert result.exit_code == EXIT_OK, result.stderr
    accuracy = json.loads(result.stdout)["accuracy"]
    assert accuracy["data_source"] == "npz"
    assert accuracy["windows"] == 6
    assert abs(accuracy["degradation_pct"]) < 0.01


def test_japanese_messages_with_lang_flag(setup, tmp_path):
    _, config, out = setup
    result = invoke(*build_args(tmp_path / "absent.pt", config, out, "--lang", "ja"))
    assert result.exit_code == EXIT_ERROR
    assert "エラー: チェックポイント" in result.stderr
    assert "が見つかりません" in result.stderr
    assert "開始" in result.stderr


def test_japanese_messages_from_environment(setup, tmp_path):
    _, config, out = setup
    result = invoke(*build_args(tmp_path / "absent.pt", config, out), env={"FXBUNDLE_LANG": "ja"})
    assert "が見つかりません" in result.stderr


def test_verify_command(built, tmp_path):
    _, out = built
    assert invoke("verify", out / BUNDLE).exit_code == EXIT_OK
    assert invoke("verify", tmp_path).exit_code == EXIT_ERROR


def test_build_log_starts_with_prepare_step(built):
    _, out = built
    log = (out / BUNDLE / "logs/build.log").read_text(encoding="utf-8").splitlines()
    assert "START prepare" in log[0]
    assert all(JST_LINE.match(line) for line in log if line and not line.startswith((" ", "\t", "Traceback")))


def test_bundle_directory_is_world_readable(built):
    _, out = built
    assert (out / BUNDLE).stat().st_mode & 0o777 == 0o755


def test_validation_report_in_bundle(built):
    _, out = built
    report = (out / BUNDLE / "reports/validation.md").read_text(encoding="utf-8")
    assert "| batch_parity | passed |" in report
    assert "| scaling | passed |" in report
    assert "# 検証レポート" in report
    assert (out / BUNDLE / "reports/warmup_fp32.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_language_is_usage_error(setup):
    checkpoint, config, out = setup
    result = invoke(*build_args(checkpoint, config, out, "--lang", "fr"))
    assert result.exit_code == EXIT_USAGE
    assert "--lang fr is not supported" in result.stderr
    assert not out.exists()


def test_json_error_on_failure(setup, tmp_path):
    _, config, out = setup
    result = invoke(*build_args(tmp_path / "absent.pt", config, out, "--json"))
    assert result.exit_code == EXIT_ERROR
    payload = json.loads(result.stdout)
    assert payload["key"] == "checkpoint.not_found"
    assert payload["exit_code"] == EXIT_ERROR
    assert "absent.pt" in payload["error"]
