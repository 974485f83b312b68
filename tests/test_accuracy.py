"""Accuracy metrics on known arrays, and the three sources of evaluation windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import EXAMPLE_CHECKPOINT, tiny_payload
from fxbundle.accuracy import WindowSet, direction_agreement, evaluate, synthetic_windows, windows_from_csv, windows_from_npz
from fxbundle.checkpoint import load_checkpoint
from fxbundle.errors import DataError

WINDOWS = WindowSet(kind="npz", description="known arrays", count=2, first_window_end=None, last_window_end=None, batches=lambda: iter(()))


def test_evaluate_known_errors():
    expected = np.array([[1.0, -1.0], [2.0, 0.5]])
    actual = np.array([[1.0, -1.0], [2.0, -0.5]])
    targets = np.zeros((2, 2))
    result = evaluate(WINDOWS, expected, actual, targets, atol=1e-5, rtol=1e-4, pips_multiplier=100.0)
    assert result.rmse_pytorch == pytest.approx(np.sqrt((1 + 1 + 4 + 0.25) / 4))
    assert result.rmse_onnx == pytest.approx(np.sqrt((1 + 1 + 4 + 0.25) / 4))
    assert result.degradation_pct == pytest.approx(0.0)
    assert result.max_abs_diff == pytest.approx(1.0)
    assert result.max_abs_diff_pips == pytest.approx(100.0)
    assert result.direction_agreement == pytest.approx(0.75)
    assert result.rmse_per_horizon_onnx == pytest.approx([np.sqrt(2.5), np.sqrt(1.25 / 2)])
    assert result.parity.violations == 1


def test_evaluate_degradation_sign():
    targets = np.zeros((1, 4))
    expected = np.full((1, 4), 1.0)
    actual = np.full((1, 4), 1.01)
    result = evaluate(WINDOWS, expected, actual, targets, atol=0, rtol=0, pips_multiplier=1.0)
    assert result.degradation_pct == pytest.approx(1.0)
    assert result.mae_degradation_pct == pytest.approx(1.0)
    assert result.rmse_onnx_pips == pytest.approx(1.01)


def test_evaluate_without_targets_uses_relative_rmse():
    expected = np.full((2, 3), 2.0)
    actual = expected + 0.02
    result = evaluate(WINDOWS, expected, actual, None, atol=1e-5, rtol=1e-4, pips_multiplier=100.0)
    assert result.rmse_pytorch is None
    assert result.degradation_pct == pytest.approx(1.0)
    assert "synthetic" in result.degradation_basis


def test_direction_agreement_counts_flat():
    assert direction_agreement(np.array([0.0, 1.0, -1.0]), np.array([0.0, 2.0, 3.0])) == pytest.approx(2 / 3)


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_payload(), path)
    return load_checkpoint(path)


def test_npz_missing_y(tmp_path, tiny):
    path = tmp_path / "x.npz"
    np.savez(path, X=np.zeros((2, 5, 360, 52), dtype=np.float32))
    with pytest.raises(DataError) as raised:
        windows_from_npz(path, tiny, 10, 4)
    assert raised.value.key == "accuracy.npz_missing_array"


def test_npz_bad_y_shape(tmp_path, tiny):
    path = tmp_path / "x.npz"
    np.savez(path, X=np.zeros((2, 5, 360, 52), dtype=np.float32), y=np.zeros((2, 30), dtype=np.float32))
    with pytest.raises(DataError) as raised:
        windows_from_npz(path, tiny, 10, 4)
    assert "array y has shape [2, 30], expected [2, 36]" in str(raised.value)


def test_npz_unreadable(tmp_path, tiny):
    path = tmp_path / "x.npz"
    path.write_bytes(b"not an archive")
    with pytest.raises(DataError) as raised:
        windows_from_npz(path, tiny, 10, 4)
    assert raised.value.key == "accuracy.npz_unreadable"


def test_synthetic_windows_are_seeded(tiny):
    first = next(synthetic_windows(tiny, 4, 4).iterate())[0]
    second = next(synthetic_windows(tiny, 4, 4).iterate())[0]
    np.testing.assert_array_equal(first, second)
    assert first.shape == (4, 5, 360, 52)


def test_csv_windows_from_heldout_period(usdjpy_csv):
    checkpoint = load_checkpoint(EXAMPLE_CHECKPOINT)
    window_set = windows_from_csv(usdjpy_csv, checkpoint, digits=3, count=10, batch_size=4)
    assert window_set.count == 10
    assert window_set.first_window_end >= "2021-01-01"
    batches = list(window_set.iterate())
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    assert batches[0][1].shape == (4, 36)


def test_csv_needs_example_feature_set(tmp_path, usdjpy_csv):
    path = tmp_path / "custom.pt"
    torch.save(tiny_payload(feature_set="team-v2"), path)
    with pytest.raises(DataError) as raised:
        windows_from_csv(usdjpy_csv, load_checkpoint(path), digits=3, count=10, batch_size=4)
    assert raised.value.key == "accuracy.csv_needs_example_features"


def test_csv_without_heldout_windows(tmp_path, usdjpy_csv):
    """A file that ends before the checkpoint's test period has no held-out window."""
    lines = usdjpy_csv.read_text().splitlines()[:20000]
    short = tmp_path / "early.csv"
    short.write_text("\n".join(lines) + "\n")
    checkpoint = load_checkpoint(EXAMPLE_CHECKPOINT)
    with pytest.raises(DataError) as raised:
        windows_from_csv(short, checkpoint, digits=3, count=10, batch_size=4)
    assert raised.value.key == "accuracy.no_windows"
