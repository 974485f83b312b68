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
from fxbundle.data import NormalizationStats, WindowSource, load_bars_csv
from fxbundle.errors import DataError
from fxbundle.features import FEATURE_SET_NAME
from fxbundle.parity import ParityReport, compare
from fxbundle.sessions import create_session, run

logger = logging.getLogger(__name__)

Batches = Iterator[tuple[np.ndarray, np.ndarray | None]]


@dataclass(frozen=True)
class WindowSet:
    """Where evaluation windows come from, and a way to iterate over them in batches."""

    kind: str  # "csv" | "npz" | "synthetic"
    description: str
    count: int
    first_window_end: str | None
    last_window_end: str | None
    batches: object  # a zero-argument callable returning Batches

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
    data_source: str
    description: str
    windows: int
    first_window_end: str | None
    last_window_end: str | None
    rmse_pytorch: float | None
    rmse_onnx: float | None
    rmse_onnx_vs_pytorch: float
    degradation_pct: float
    degradation_basis: str
    parity: ParityReport

    def to_dict(self) -> dict:
        payload = asdict(self)
        payload["parity"] = self.parity.to_dict()
        return payload


def _rmse(sum_squares: float, count: int) -> float:
    return float(np.sqrt(sum_squares / max(count, 1)))


def measure_accuracy(
    checkpoint: Checkpoint, onnx_paths: dict[str, Path], window_set: WindowSet, atol: float, rtol: float
) -> dict[str, AccuracyResult]:
    """Run PyTorch once and every ONNX model on the same windows; compare each against the targets."""
    sessions = {name: create_session(path)[0] for name, path in onnx_paths.items()}
    model = checkpoint.model.eval()

    squares_torch = squares_reference = 0.0
    squares_onnx = dict.fromkeys(sessions, 0.0)
    squares_diff = dict.fromkeys(sessions, 0.0)
    elements = 0
    torch_parts: list[np.ndarray] = []
    onnx_parts: dict[str, list[np.ndarray]] = {name: [] for name in sessions}
    has_targets = True
    for windows, targets in window_set.iterate():
        with torch.no_grad():
            expected = model(torch.from_numpy(windows)).numpy().astype(np.float64)
        squares_reference += float(np.sum(expected**2))
        elements += expected.size
        torch_parts.append(expected)
        if targets is None:
            has_targets = False
        else:
            squares_torch += float(np.sum((expected - targets) ** 2))
        for name, session in sessions.items():
            actual = run(session, windows).astype(np.float64)
            squares_diff[name] += float(np.sum((actual - expected) ** 2))
            if targets is not None:
                squares_onnx[name] += float(np.sum((actual - targets) ** 2))
            onnx_parts[name].append(actual)

    if elements == 0:
        raise DataError("accuracy.no_windows", path=window_set.description, start="-", needed=checkpoint.seq_len)
    expected_all = np.concatenate(torch_parts)
    rmse_torch = _rmse(squares_torch, elements) if has_targets else None
    reference = _rmse(squares_reference, elements)

    results = {}
    for name in sessions:
        rmse_diff = _rmse(squares_diff[name], elements)
        if rmse_torch is not None:
            rmse_onnx = _rmse(squares_onnx[name], elements)
            degradation = 100.0 * (rmse_onnx - rmse_torch) / rmse_torch if rmse_torch > 0 else 0.0
            basis = "(RMSE_onnx - RMSE_pytorch) / RMSE_pytorch against targets"
        else:
            rmse_onnx = None
            degradation = 100.0 * rmse_diff / reference if reference > 0 else 0.0
            basis = "RMSE(onnx - pytorch) / RMS(pytorch); synthetic windows have no targets"
        results[name] = AccuracyResult(
            data_source=window_set.kind,
            description=window_set.description,
            windows=window_set.count,
            first_window_end=window_set.first_window_end,
            last_window_end=window_set.last_window_end,
            rmse_pytorch=rmse_torch,
            rmse_onnx=rmse_onnx,
            rmse_onnx_vs_pytorch=rmse_diff,
            degradation_pct=float(degradation),
            degradation_basis=basis,
            parity=compare(np.concatenate(onnx_parts[name]), expected_all, atol, rtol),
        )
    return results
