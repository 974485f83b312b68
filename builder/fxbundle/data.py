"""Bars from CSV, higher timeframes derived from H1, and lazily built model windows.

A model window for base bar ``i`` (an H1 bar, closed at ``time[i] + 1 h``) holds, for each
timeframe, the last ``seq_len`` bars of that timeframe that had closed by then, oldest
first. Targets are ``close[i+h] - close[i]`` in price units for ``h = 1 … horizon`` base bars.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from fxbundle.errors import DataError
from fxbundle.features import WARMUP_BARS, Bars, compute_features

CSV_HEADER = ("Date", "open", "high", "low", "close", "tick_volume")

# Period of each supported timeframe in seconds. All divide a day, so their bars align with
# midnight server time, as MetaTrader 5 aligns intraday bars.
TIMEFRAME_SECONDS = {"H1": 3600, "H2": 7200, "H4": 14400, "H8": 28800, "D1": 86400}
EXAMPLE_TIMEFRAMES = ("H1", "H2", "H4", "H8", "D1")

# Normalized features are clipped so that one broken bar cannot dominate a window.
NORMALIZATION_CLIP = 10.0


def load_bars_csv(path: Path, digits: int) -> Bars:
    """Read bars in the ``Date,open,high,low,close,tick_volume`` format, prices scaled by 10**digits."""
    path = Path(path)
    if not path.is_file():
        raise DataError("data.csv_not_found", path=str(path))

    times: list[str] = []
    rows: list[list[float]] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != CSV_HEADER:
            raise DataError("data.csv_bad_header", path=str(path), header=",".join(header or []), expected=",".join(CSV_HEADER))
        for line_number, record in enumerate(reader, start=2):
            if len(record) != len(CSV_HEADER):
                raise DataError("data.csv_bad_row", path=str(path), line=line_number, row=",".join(record))
            try:
                rows.append([float(value) for value in record[1:]])
            except ValueError:
                raise DataError("data.csv_bad_row", path=str(path), line=line_number, row=",".join(record)) from None
            times.append(record[0])

    if not rows:
        raise DataError("data.csv_empty", path=str(path))
    try:
        time = np.array(times, dtype="datetime64[s]")
    except ValueError as error:
        raise DataError("data.csv_bad_time", path=str(path), detail=str(error)) from error

    values = np.array(rows, dtype=np.float64)
    scale = 10.0**digits
    prices = np.round(values[:, :4] / scale, digits)
    bars = Bars(time=time, open=prices[:, 0], high=prices[:, 1], low=prices[:, 2], close=prices[:, 3], volume=values[:, 4])
    validate_bars(bars, source=str(path))
    return bars


def validate_bars(bars: Bars, source: str) -> None:
    """Raise DataError naming the first bar that is out of order or has impossible prices."""
    if len(bars) > 1:
        steps = np.diff(bars.time.astype(np.int64))
        bad = np.flatnonzero(steps <= 0)
        if bad.size:
            raise DataError("data.bars_not_increasing", source=source, time=str(bars.time[bad[0] + 1]))
    prices = np.stack([bars.open, bars.high, bars.low, bars.close], axis=1)
    bad_rows = np.flatnonzero(
        ~np.isfinite(prices).all(axis=1)
        | (prices <= 0).any(axis=1)
        | (bars.high < np.maximum(bars.open, bars.close))
        | (bars.low > np.minimum(bars.open, bars.close))
        | (bars.volume < 0)
    )
    if bad_rows.size:
        row = bad_rows[0]
        raise DataError(
            "data.bar_invalid",
            source=source,
            time=str(bars.time[row]),
            ohlc=f"{bars.open[row]}/{bars.high[row]}/{bars.low[row]}/{bars.close[row]}",
        )


def resample(bars: Bars, timeframe: str) -> Bars:
    """Aggregate H1 bars into bars of ``timeframe`` (open first, high max, low min, close last)."""
    period = TIMEFRAME_SECONDS[timeframe]
    if period == 3600:
        return bars
    seconds = bars.time.astype(np.int64)
    bucket = seconds // period
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    ends = np.r_[starts[1:], len(seconds)] - 1
    return Bars(
        time=(bucket[starts] * period).astype("datetime64[s]"),
        open=bars.open[starts],
        high=np.maximum.reduceat(bars.high, starts),
        low=np.minimum.reduceat(bars.low, starts),
        close=bars.close[ends],
        volume=np.add.reduceat(bars.volume, starts),
    )


@dataclass(frozen=True)
class NormalizationStats:
    """Per timeframe and feature mean and standard deviation, from the training period only."""

    mean: np.ndarray  # (n_timeframes, n_features)
    std: np.ndarray
    clip: float = NORMALIZATION_CLIP

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "clip": self.clip}

    @classmethod
    def from_dict(cls, payload: dict) -> "NormalizationStats":
        return cls(
            mean=np.asarray(payload["mean"], dtype=np.float64),
            std=np.asarray(payload["std"], dtype=np.float64),
            clip=float(payload.get("clip", NORMALIZATION_CLIP)),
        )


class WindowSource:
    """Features of every timeframe and the index maps that cut model windows out of them.

    Nothing of size (n_windows, timeframes, seq_len, features) is ever materialized: windows
    are gathered batch by batch with :meth:`windows`.
    """

    def __init__(self, bars: Bars, timeframes: Sequence[str], seq_len: int, horizon: int) -> None:
        unknown = [tf for tf in timeframes if tf not in TIMEFRAME_SECONDS]
        if unknown:
            raise DataError("data.unknown_timeframe", timeframes=",".join(unknown), supported=",".join(TIMEFRAME_SECONDS))
        self.base = bars
        self.timeframes = tuple(timeframes)
        self.seq_len = seq_len
        self.horizon = horizon

        base_close_time = bars.time.astype(np.int64) + TIMEFRAME_SECONDS["H1"]
        self.features: list[np.ndarray] = []
        last_closed: list[np.ndarray] = []
        for timeframe in self.timeframes:
            tf_bars = resample(bars, timeframe)
            self.features.append(compute_features(tf_bars))
            tf_end = tf_bars.time.astype(np.int64) + TIMEFRAME_SECONDS[timeframe]
            last_closed.append(np.searchsorted(tf_end, base_close_time, side="right") - 1)
        self.last_closed = np.stack(last_closed, axis=1)  # (n_base_bars, n_timeframes)

        first_valid = WARMUP_BARS + seq_len - 1
        has_history = (self.last_closed >= first_valid).all(axis=1)
        has_future = np.arange(len(bars)) + horizon < len(bars)
        self.valid_with_target = np.flatnonzero(has_history & has_future)
        self.valid_without_target = np.flatnonzero(has_history)

    def end_indices(self, start: np.datetime64 | None = None, end: np.datetime64 | None = None, with_target: bool = True) -> np.ndarray:
        """Return base-bar indices whose window is complete, with bar time in [start, end)."""
        indices = self.valid_with_target if with_target else self.valid_without_target
        times = self.base.time[indices]
        keep = np.ones(len(indices), dtype=bool)
        if start is not None:
            keep &= times >= start
        if end is not None:
            keep &= times < end
        return indices[keep]

    def fit_normalization(self, end_indices: np.ndarray) -> NormalizationStats:
        """Fit mean/std on the feature rows that the given windows read, and nothing later."""
        means, stds = [], []
        for tf_position, features in enumerate(self.features):
            last = int(self.last_closed[end_indices, tf_position].max())
            rows = features[WARMUP_BARS : last + 1]
            means.append(np.nanmean(rows, axis=0))
            std = np.nanstd(rows, axis=0)
            stds.append(np.where(std > 1e-12, std, 1.0))
        return NormalizationStats(mean=np.stack(means), std=np.stack(stds))

    def window(self, end_index: int, stats: NormalizationStats) -> np.ndarray:
        """Build the (timeframes, seq_len, features) float32 window that ends at base bar end_index."""
        out = np.empty((len(self.timeframes), self.seq_len, self.features[0].shape[1]), dtype=np.float32)
        for tf_position, features in enumerate(self.features):
            last = int(self.last_closed[end_index, tf_position])
            rows = features[last - self.seq_len + 1 : last + 1]
            normalized = (rows - stats.mean[tf_position]) / stats.std[tf_position]
            out[tf_position] = np.clip(normalized, -stats.clip, stats.clip)
        return out

    def targets(self, end_indices: np.ndarray) -> np.ndarray:
        """Return (n, horizon) float32 price changes close[i+h] - close[i]."""
        close = self.base.close
        steps = np.arange(1, self.horizon + 1)
        return (close[end_indices[:, None] + steps] - close[end_indices, None]).astype(np.float32)

    def windows(self, end_indices: np.ndarray, stats: NormalizationStats, batch_size: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (X, end_indices) batches with X of shape (batch, timeframes, seq_len, features)."""
        for start in range(0, len(end_indices), batch_size):
            batch = end_indices[start : start + batch_size]
            yield np.stack([self.window(int(i), stats) for i in batch]), batch


def verify_causality(bars: Bars, timeframes: Sequence[str], seq_len: int, horizon: int, stats: NormalizationStats, end_indices: Sequence[int]) -> int:
    """Check that changing every bar after t leaves the window ending at t unchanged.

    Prices after each given end index are scaled by 1.1 and volumes doubled; the rebuilt
    window must be bit-identical. Raises DataError naming the first window that changed, and
    returns the number of windows checked.
    """
    reference = WindowSource(bars, timeframes, seq_len, horizon)
    for end in end_indices:
        end = int(end)
        scale = np.ones(len(bars))
        scale[end + 1 :] = 1.1
        volume = bars.volume.copy()
        volume[end + 1 :] *= 2.0
        changed = Bars(bars.time, bars.open * scale, bars.high * scale, bars.low * scale, bars.close * scale, volume)
        if not np.array_equal(WindowSource(changed, timeframes, seq_len, horizon).window(end, stats), reference.window(end, stats)):
            raise DataError("data.future_leak", time=str(bars.time[end]))
    return len(end_indices)
