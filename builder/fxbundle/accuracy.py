"""Accuracy of the ONNX model against PyTorch on held-out windows.

Three sources of windows:
- a bars CSV (checkpoints with the example feature set): windows from the checkpoint's
  held-out test period, built with the checkpoint's own normalization statistics;
- an ``.npz`` with ``X`` (N, timeframes, seq_len, features) and ``y`` (N, horizon);
- synthetic standard-normal windows when no test data is given. They have no targets, so the
  degradation is then the RMSE of ONNX against PyTorch relative to the RMS of PyTorch's output.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from fxbundle.checkpoint import Checkpoint
from fxbundle.data import NormalizationStats, WindowSource, load_bars_csv, verify_causality
from fxbundle.errors import DataError
from fxbundle.features import FEATURE_SET_NAME
from fxbundle.parity import ParityReport, compare
from fxbundle.sessions import create_session, run

logger = logging.getLogger(__name__)

Batches = Iterator[tuple[np.ndarray, np.ndarray | None]]


@dataclass(frozen=True)
class WindowSet:
    """A source of evaluation windows and a way to iterate over them in batches."""

    kind: str  # "csv" | "npz" | "synthetic"
    description: str
    count: int
    first_window_end: str | None
    last_window_end: str | None
    batches: object  # a zero-argument callable returning Batches
    causality_windows: int = 0  # windows proven unchanged by later bars (CSV sources only)

    def iterate(self) -> Batches:
        return self.batches()  # type: ignore[operator]


def _evenly_spaced(indices: np.ndarray, count: int) -> np.ndarray:
    if len(indices) <= count:
        return indices
    return indices[np.linspace(0, len(indices) - 1, count).round().astype(int)]


def windows_from_csv(path: Path, checkpoint: Checkpoint, digits: int, count: int, batch_size: int) -> WindowSet:
    if checkpoint.feature_set != FEATURE_SET_NAME:
        raise DataError("accuracy.csv_needs_example_features", path=str(path), feature_set=checkpoint.feature_set, example=FEATURE_SET_NAME)
    bars = load_bars_csv(path, digits)
    base = checkpoint.extra.get("base_timeframe", "H1")
    if base != "H1":
        raise DataError("accuracy.csv_base_timeframe", path=str(path), base=base)
    source = WindowSource(bars, checkpoint.timeframes, checkpoint.seq_len, checkpoint.horizon)
    stats = NormalizationStats.from_dict(checkpoint.normalization)

    test_start = checkpoint.extra.get("training", {}).get("test_start")
    start = np.datetime64(test_start) if test_start else None
    indices = source.end_indices(start=start)
    if len(indices) == 0:
        raise DataError("accuracy.no_windows", path=str(path), start=str(test_start or "-"), needed=checkpoint.seq_len)
    if start is None:
        logger.warning("the checkpoint records no held-out period; windows from the whole file %s may overlap training data", path)
    chosen = _evenly_spaced(indices, count)
    probes = sorted({int(chosen[0]), int(chosen[len(chosen) // 2]), int(chosen[-1])})
    checked = verify_causality(bars, checkpoint.timeframes, checkpoint.seq_len, checkpoint.horizon, stats, probes)

    def batches() -> Batches:
        for windows, batch in source.windows(chosen, stats, batch_size):
            yield windows, source.targets(batch)

    return WindowSet(
        kind="csv",
        description=f"{path.name}: held-out windows from {test_start or 'the whole file'}",
        count=int(len(chosen)),
        first_window_end=str(bars.time[chosen[0]]),
        last_window_end=str(bars.time[chosen[-1]]),
        batches=batches,
        causality_windows=checked,
    )


def windows_from_npz(path: Path, checkpoint: Checkpoint, count: int, batch_size: int) -> WindowSet:
    try:
        archive = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise DataError("accuracy.npz_unreadable", path=str(path), detail=str(error).splitlines()[0]) from error
    for key in ("X", "y"):
        if key not in archive:
            raise DataError("accuracy.npz_missing_array", path=str(path), key=key)
    features, targets = archive["X"], archive["y"]
    expected_x = checkpoint.input_shape[1:]
    if features.ndim != 4 or tuple(features.shape[1:]) != expected_x:
        raise DataError("accuracy.npz_bad_shape", path=str(path), key="X", found=list(features.shape), expected=["N", *expected_x])
    if targets.shape != (features.shape[0], checkpoint.horizon):
        raise DataError("accuracy.npz_bad_shape", path=str(path), key="y", found=list(targets.shape), expected=[features.shape[0], checkpoint.horizon])
    total = min(count, features.shape[0])

    def batches() -> Batches:
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            yield np.asarray(features[start:stop], dtype=np.float32), np.asarray(targets[start:stop], dtype=np.float32)

    return WindowSet(kind="npz", description=path.name, count=int(total), first_window_end=None, last_window_end=None, batches=batches)


def synthetic_windows(checkpoint: Checkpoint, count: int, batch_size: int, seed: int = 0) -> WindowSet:
    shape = checkpoint.input_shape[1:]

    def batches() -> Batches:
        rng = np.random.default_rng(seed)
        for start in range(0, count, batch_size):
            size = min(batch_size, count - start)
            yield rng.standard_normal((size, *shape)).astype(np.float32), None

    return WindowSet(kind="synthetic", description="synthetic standard-normal windows (no test data given)", count=count, first_window_end=None, last_window_end=None, batches=batches)


@dataclass(frozen=True)
class AccuracyResult:
    """Errors of PyTorch and of one ONNX model; ``*_pips`` fields are the same errors times the pips multiplier."""

    data_source: str
    description: str
    windows: int
    first_window_end: str | None
    last_window_end: str | None
    rmse_pytorch: float | None
    rmse_onnx: float | None
    mae_pytorch: float | None
    mae_onnx: float | None
    rmse_per_horizon_pytorch: list[float] | None
    rmse_per_horizon_onnx: list[float] | None
    rmse_onnx_vs_pytorch: float
    max_abs_diff: float
    degradation_pct: float
    degradation_basis: str
    mae_degradation_pct: float | None
    direction_agreement: float
    pips_multiplier: float
    rmse_pytorch_pips: float | None
    rmse_onnx_pips: float | None
    mae_onnx_pips: float | None
    max_abs_diff_pips: float
    parity: ParityReport

    def to_dict(self) -> dict:
        payload = asdict(self)
        payload["parity"] = self.parity.to_dict()
        return payload


def _rmse(error: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    value = np.sqrt(np.mean(np.square(error), axis=axis))
    return value if axis is not None else float(value)


def _mae(error: np.ndarray) -> float:
    return float(np.mean(np.abs(error)))


def _degradation(onnx_error: float, torch_error: float) -> float:
    return 100.0 * (onnx_error - torch_error) / torch_error if torch_error > 0 else 0.0


def direction_agreement(actual: np.ndarray, expected: np.ndarray) -> float:
    """Share of forecasts whose sign (up, down, flat) is the same in both outputs."""
    return float(np.mean(np.sign(actual) == np.sign(expected)))


def evaluate(
    window_set: WindowSet,
    expected: np.ndarray,
    actual: np.ndarray,
    targets: np.ndarray | None,
    atol: float,
    rtol: float,
    pips_multiplier: float,
) -> AccuracyResult:
    """Compare one ONNX output with PyTorch's, and both with the targets when there are any."""
    difference = actual - expected
    rmse_diff = _rmse(difference)
    max_abs = float(np.max(np.abs(difference), initial=0.0))
    if targets is not None:
        rmse_torch, rmse_onnx = _rmse(expected - targets), _rmse(actual - targets)
        mae_torch, mae_onnx = _mae(expected - targets), _mae(actual - targets)
        per_horizon_torch = [float(v) for v in _rmse(expected - targets, axis=0)]
        per_horizon_onnx = [float(v) for v in _rmse(actual - targets, axis=0)]
        degradation = _degradation(rmse_onnx, rmse_torch)
        mae_degradation = _degradation(mae_onnx, mae_torch)
        basis = "(RMSE_onnx - RMSE_pytorch) / RMSE_pytorch against targets"
    else:
        rmse_torch = rmse_onnx = mae_torch = mae_onnx = mae_degradation = None
        per_horizon_torch = per_horizon_onnx = None
        reference = _rmse(expected)
        degradation = 100.0 * rmse_diff / reference if reference > 0 else 0.0
        basis = "RMSE(onnx - pytorch) / RMS(pytorch); synthetic windows have no targets"

    def pips(value: float | None) -> float | None:
        return None if value is None else value * pips_multiplier

    return AccuracyResult(
        data_source=window_set.kind,
        description=window_set.description,
        windows=window_set.count,
        first_window_end=window_set.first_window_end,
        last_window_end=window_set.last_window_end,
        rmse_pytorch=rmse_torch,
        rmse_onnx=rmse_onnx,
        mae_pytorch=mae_torch,
        mae_onnx=mae_onnx,
        rmse_per_horizon_pytorch=per_horizon_torch,
        rmse_per_horizon_onnx=per_horizon_onnx,
        rmse_onnx_vs_pytorch=rmse_diff,
        max_abs_diff=max_abs,
        degradation_pct=float(degradation),
        degradation_basis=basis,
        mae_degradation_pct=mae_degradation,
        direction_agreement=direction_agreement(actual, expected),
        pips_multiplier=pips_multiplier,
        rmse_pytorch_pips=pips(rmse_torch),
        rmse_onnx_pips=pips(rmse_onnx),
        mae_onnx_pips=pips(mae_onnx),
        max_abs_diff_pips=max_abs * pips_multiplier,
        parity=compare(actual, expected, atol, rtol),
    )


def measure_accuracy(
    checkpoint: Checkpoint,
    onnx_paths: dict[str, Path],
    window_set: WindowSet,
    atol: float,
    rtol: float,
    pips_multiplier: float = 1.0,
    provider: str = "CPUExecutionProvider",
    gpu_mem_limit_mb: int | None = None,
) -> dict[str, AccuracyResult]:
    """Run PyTorch once and every ONNX model on the same windows; evaluate each ONNX model."""
    sessions = {name: create_session(path, provider=provider, gpu_mem_limit_mb=gpu_mem_limit_mb)[0] for name, path in onnx_paths.items()}
    model = checkpoint.model.eval()

    expected_parts: list[np.ndarray] = []
    target_parts: list[np.ndarray] = []
    actual_parts: dict[str, list[np.ndarray]] = {name: [] for name in sessions}
    has_targets = True
    for windows, targets in window_set.iterate():
        with torch.no_grad():
            expected_parts.append(model(torch.from_numpy(windows)).numpy().astype(np.float64))
        if targets is None:
            has_targets = False
        else:
            target_parts.append(np.asarray(targets, dtype=np.float64))
        for name, session in sessions.items():
            actual_parts[name].append(run(session, windows).astype(np.float64))

    if not expected_parts:
        raise DataError("accuracy.no_windows", path=window_set.description, start="-", needed=checkpoint.seq_len)
    expected = np.concatenate(expected_parts)
    targets_all = np.concatenate(target_parts) if has_targets else None
    return {
        name: evaluate(window_set, expected, np.concatenate(parts), targets_all, atol, rtol, pips_multiplier)
        for name, parts in actual_parts.items()
    }
