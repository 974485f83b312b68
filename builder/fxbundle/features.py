"""The example feature set ``fxbundle-example-v1``: 52 causal features per bar.

Every feature of bar ``i`` is computed from bars ``i - 100 … i`` of the same timeframe only,
so a window that ends at a closed bar never reads a later bar. The MQL5 include
``mql5/FxBundle/ExampleFeatures.mqh`` implements the same formulas in the same order; a
change here must be made there too, and the feature-set name bumped.

Conventions shared with the MQL5 side:
- prices are in price units (81.121, not 81121), volumes are tick volumes;
- ``r[j] = ln(close[j] / close[j-1])`` is the one-bar log return;
- rolling windows of length ``n`` cover bars ``i-n+1 … i``; standard deviations are
  population (ddof = 0);
- a ratio whose denominator is zero is 0;
- the day of week counts from Sunday = 0, as MQL5's ``MqlDateTime.day_of_week``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

FEATURE_SET_NAME = "fxbundle-example-v1"

# Bars before ``i`` that the longest rolling window reads (SMA 100 and the return std over
# 100 returns, which needs close[i-100]). A feature row is valid from index WARMUP_BARS on.
WARMUP_BARS = 100

LOG_RETURN_LAGS = (1, 2, 3, 5, 8, 13, 21, 34, 55)
SMA_RATIO_WINDOWS = (5, 10, 20, 50, 100)
VOLATILITY_WINDOWS = (5, 10, 20, 50, 100)
ATR_WINDOWS = (5, 14, 50)
RSI_WINDOWS = (7, 14, 28)
STOCHASTIC_WINDOWS = (5, 14, 50)
CHANNEL_WINDOWS = (20, 100)
ZSCORE_MIN_RELATIVE_STD = 1e-9

FEATURE_NAMES: tuple[str, ...] = (
    *(f"log_return_{k}" for k in LOG_RETURN_LAGS),
    "body",
    "range",
    "upper_wick",
    "lower_wick",
    *(f"sma_ratio_{n}" for n in SMA_RATIO_WINDOWS),
    *(f"volatility_{n}" for n in VOLATILITY_WINDOWS),
    *(f"atr_{n}" for n in ATR_WINDOWS),
    *(f"rsi_{n}" for n in RSI_WINDOWS),
    *(f"stochastic_{n}" for n in STOCHASTIC_WINDOWS),
    "distance_high_20",
    "distance_low_20",
    "distance_high_100",
    "distance_low_100",
    "log_volume",
    "volume_ratio_20",
    "volume_ratio_100",
    "sma_cross_5_20",
    "sma_cross_20_100",
    "body_mean_10",
    "up_fraction_10",
    "up_fraction_50",
    "range_ratio_20",
    "volatility_ratio_5_50",
    "hour_sin",
    "hour_cos",
    "weekday_sin",
    "weekday_cos",
    "gap",
    "zscore_20",
)

N_FEATURES = len(FEATURE_NAMES)
assert N_FEATURES == 52, N_FEATURES  # a module invariant, not an input check


@dataclass(frozen=True)
class Bars:
    """OHLC bars of one timeframe, oldest first; ``time`` is the bar's open time."""

    time: np.ndarray  # datetime64[s]
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray

    def __len__(self) -> int:
        return len(self.time)

    def slice(self, start: int, stop: int) -> "Bars":
        return Bars(
            time=self.time[start:stop],
            open=self.open[start:stop],
            high=self.high[start:stop],
            low=self.low[start:stop],
            close=self.close[start:stop],
            volume=self.volume[start:stop],
        )


def _rolling(values: np.ndarray, window: int) -> np.ndarray:
    """Return an (n, window) view whose row i contains values[i-window+1 … i]; NaN-padded rows first."""
    padded = np.concatenate([np.full(window - 1, np.nan), values])
    return sliding_window_view(padded, window)


def _rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    return _rolling(values, window).mean(axis=1)


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Divide, giving 0 where the denominator is 0 (NaN stays NaN for warm-up rows)."""
    out = np.zeros_like(numerator, dtype=np.float64)
    nonzero = denominator != 0
    np.divide(numerator, denominator, out=out, where=nonzero)
    return np.where(np.isnan(numerator) | np.isnan(denominator), np.nan, out)


def _shift(values: np.ndarray, lag: int) -> np.ndarray:
    """Return values[i - lag] at index i, NaN where that bar does not exist."""
    out = np.full_like(values, np.nan, dtype=np.float64)
    out[lag:] = values[:-lag]
    return out


def compute_features(bars: Bars) -> np.ndarray:
    """Compute the (n_bars, 52) float64 feature matrix; rows before WARMUP_BARS contain NaN."""
    c = bars.close.astype(np.float64)
    o = bars.open.astype(np.float64)
    h = bars.high.astype(np.float64)
    low = bars.low.astype(np.float64)
    v = bars.volume.astype(np.float64)
    prev_close = _shift(c, 1)
    log_return = np.log(c / prev_close)

    columns: list[np.ndarray] = []

    for lag in LOG_RETURN_LAGS:
        columns.append(np.log(c / _shift(c, lag)))

    body = (c - o) / c
    columns.append(body)
    columns.append((h - low) / c)
    columns.append((h - np.maximum(o, c)) / c)
    columns.append((np.minimum(o, c) - low) / c)

    sma = {n: _rolling_mean(c, n) for n in (5, 10, 20, 50, 100)}
    for n in SMA_RATIO_WINDOWS:
        columns.append(c / sma[n] - 1.0)

    volatility = {n: _rolling(log_return, n).std(axis=1) for n in VOLATILITY_WINDOWS}
    for n in VOLATILITY_WINDOWS:
        columns.append(volatility[n])

    true_range = np.maximum(h, prev_close) - np.minimum(low, prev_close)
    for n in ATR_WINDOWS:
        columns.append(_rolling_mean(true_range, n) / c)

    change = c - prev_close
    gains = np.where(np.isnan(change), np.nan, np.maximum(change, 0.0))
    losses = np.where(np.isnan(change), np.nan, np.maximum(-change, 0.0))
    for n in RSI_WINDOWS:
        gain_sum = _rolling(gains, n).sum(axis=1)
        loss_sum = _rolling(losses, n).sum(axis=1)
        columns.append(_safe_ratio(gain_sum, gain_sum + loss_sum) - 0.5)

    highest = {n: _rolling(h, n).max(axis=1) for n in (5, 14, 20, 50, 100)}
    lowest = {n: _rolling(low, n).min(axis=1) for n in (5, 14, 20, 50, 100)}
    for n in STOCHASTIC_WINDOWS:
        position = _safe_ratio(c - lowest[n], highest[n] - lowest[n])
        # A flat channel has no position: 0 after the centring, like a zero denominator.
        flat = highest[n] == lowest[n]
        columns.append(np.where(flat, 0.0, position - 0.5))

    for n in CHANNEL_WINDOWS:
        columns.append((highest[n] - c) / c)
        columns.append((c - lowest[n]) / c)

    columns.append(np.log1p(v))
    columns.append(np.log((1.0 + v) / (1.0 + _rolling_mean(v, 20))))
    columns.append(np.log((1.0 + v) / (1.0 + _rolling_mean(v, 100))))

    columns.append(sma[5] / sma[20] - 1.0)
    columns.append(sma[20] / sma[100] - 1.0)

    columns.append(_rolling_mean(body, 10))
    up_bar = (c > o).astype(np.float64)
    columns.append(_rolling_mean(up_bar, 10) - 0.5)
    columns.append(_rolling_mean(up_bar, 50) - 0.5)

    bar_range = h - low
    columns.append(_safe_ratio(bar_range, _rolling_mean(bar_range, 20)) - 1.0)
    both_positive = (volatility[5] > 0) & (volatility[50] > 0)
    ratio = np.log(np.where(both_positive, volatility[5], 1.0) / np.where(both_positive, volatility[50], 1.0))
    columns.append(np.where(np.isnan(volatility[50]), np.nan, ratio))

    seconds = bars.time.astype("datetime64[s]").astype(np.int64)
    hour = (seconds // 3600) % 24
    # 1970-01-01 was a Thursday (4 when Sunday = 0).
    day_of_week = (seconds // 86400 + 4) % 7
    columns.append(np.sin(2.0 * np.pi * hour / 24.0))
    columns.append(np.cos(2.0 * np.pi * hour / 24.0))
    columns.append(np.sin(2.0 * np.pi * day_of_week / 7.0))
    columns.append(np.cos(2.0 * np.pi * day_of_week / 7.0))

    columns.append(np.log(o / prev_close))

    # Over equal closes the computed std is a rounding residue (~1e-14), not 0; a std below
    # 1e-9 of the price counts as a flat window, so both implementations return 0 there.
    close_std_20 = _rolling(c, 20).std(axis=1)
    flat_std = np.where(close_std_20 > ZSCORE_MIN_RELATIVE_STD * c, close_std_20, 0.0)
    columns.append(np.where(np.isnan(close_std_20), np.nan, _safe_ratio(c - sma[20], flat_std)))

    features = np.stack(columns, axis=1)
    features[:WARMUP_BARS] = np.nan
    return features
