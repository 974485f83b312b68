"""Choose calibration windows for static INT8 quantization.

A random sample of FX windows is dominated by quiet hours, so the calibrated activation
ranges miss the volatile ones that matter most. The selector splits its budget:

- 50 % by volatility regime: the candidates' ATR(14) is cut into five equally populated
  regimes (centred on the 0.1, 0.3, 0.5, 0.7 and 0.9 quantiles) and each regime gets an
  equal share;
- 30 % by price level: an equal share from each quartile of the close price;
- 20 % extremes: the windows whose last bar has the largest absolute log return.

Indices picked twice are dropped and the remainder is topped up at random. Every random draw
comes from one seeded generator, so the selection is reproducible. Two KPIs decide whether
the sample is usable: every volatility regime contains at least 10 % of it, and at least 20
windows lie at or beyond the 99.5th percentile of the absolute return.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fxbundle.data import WindowSource

REGIME_QUANTILES = (0.1, 0.3, 0.5, 0.7, 0.9)
SHARE_VOLATILITY, SHARE_PRICE, SHARE_EXTREMES = 0.5, 0.3, 0.2
ATR_BARS = 14
MIN_REGIME_SHARE = 0.10
EXTREME_QUANTILE = 0.995
MIN_EXTREME_SAMPLES = 20


@dataclass(frozen=True)
class CalibrationSelection:
    indices: np.ndarray
    seed: int
    from_volatility: int
    from_price: int
    from_extremes: int
    topped_up: int
    regime_shares: list[float]
    extreme_threshold: float
    extreme_samples: int

    @property
    def regimes_ok(self) -> bool:
        return min(self.regime_shares) >= MIN_REGIME_SHARE

    @property
    def extremes_ok(self) -> bool:
        return self.extreme_samples >= MIN_EXTREME_SAMPLES

    def to_dict(self) -> dict:
        payload = asdict(self)
        payload["indices"] = len(self.indices)
        payload["regimes_ok"] = self.regimes_ok
        payload["extremes_ok"] = self.extremes_ok
        return payload


def average_true_range(close: np.ndarray, high: np.ndarray, low: np.ndarray, bars: int = ATR_BARS) -> np.ndarray:
    """Simple-average true range over ``bars`` bars ending at each index (NaN before that)."""
    previous = np.r_[np.nan, close[:-1]]
    true_range = np.maximum(high, previous) - np.minimum(low, previous)
    out = np.full(len(close), np.nan)
    windows = np.lib.stride_tricks.sliding_window_view(true_range, bars)
    out[bars - 1 :] = windows.mean(axis=1)
    return out


def _regime_of(values: np.ndarray) -> np.ndarray:
    """Assign each value to one of five equally populated regimes (0 … 4)."""
    edges = np.quantile(values, [0.2, 0.4, 0.6, 0.8])
    return np.searchsorted(edges, values, side="right")


def _take(rng: np.random.Generator, pool: np.ndarray, count: int, taken: set[int]) -> list[int]:
    available = np.array([index for index in pool if index not in taken], dtype=np.int64)
    if available.size == 0 or count <= 0:
        return []
    chosen = rng.choice(available, size=min(count, available.size), replace=False)
    taken.update(int(index) for index in chosen)
    return [int(index) for index in chosen]


def select_calibration_windows(source: WindowSource, candidates: np.ndarray, count: int, seed: int = 0) -> CalibrationSelection:
    """Pick ``count`` window end indices from ``candidates`` (base-bar indices) as described above."""
    candidates = np.unique(np.asarray(candidates, dtype=np.int64))  # sorted, so positions can be found by bisection
    if count > len(candidates):
        raise ValueError(f"cannot select {count} calibration windows from {len(candidates)} candidates")
    rng = np.random.default_rng(seed)
    base = source.base
    atr = average_true_range(base.close, base.high, base.low)[candidates]
    price = base.close[candidates]
    absolute_return = np.abs(np.log(base.close[candidates] / base.close[candidates - 1]))

    taken: set[int] = set()
    regimes = _regime_of(atr)
    per_regime = int(round(count * SHARE_VOLATILITY / len(REGIME_QUANTILES)))
    from_volatility = sum(len(_take(rng, candidates[regimes == regime], per_regime, taken)) for regime in range(len(REGIME_QUANTILES)))

    quartile_edges = np.quantile(price, [0.25, 0.5, 0.75])
    quartiles = np.searchsorted(quartile_edges, price, side="right")
    per_quartile = int(round(count * SHARE_PRICE / 4))
    from_price = sum(len(_take(rng, candidates[quartiles == quartile], per_quartile, taken)) for quartile in range(4))

    # Extremes are taken from the top of the ranking, not at random.
    extreme_quota = int(round(count * SHARE_EXTREMES))
    from_extremes = 0
    for index in candidates[np.argsort(-absolute_return, kind="stable")]:
        if from_extremes >= extreme_quota:
            break
        if int(index) not in taken:
            taken.add(int(index))
            from_extremes += 1

    topped_up = len(_take(rng, candidates, count - len(taken), taken))

    selected = np.array(sorted(taken), dtype=np.int64)
    selected_positions = np.searchsorted(candidates, selected)
    selected_regimes = regimes[selected_positions]
    shares = [float(np.mean(selected_regimes == regime)) for regime in range(len(REGIME_QUANTILES))]
    threshold = float(np.quantile(absolute_return, EXTREME_QUANTILE))
    extreme_samples = int(np.sum(absolute_return[selected_positions] >= threshold))
    return CalibrationSelection(
        indices=selected,
        seed=seed,
        from_volatility=from_volatility,
        from_price=from_price,
        from_extremes=from_extremes,
        topped_up=topped_up,
        regime_shares=shares,
        extreme_threshold=threshold,
        extreme_samples=extreme_samples,
    )
