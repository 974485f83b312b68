"""The example feature set: shape, warm-up, causality and the zero-denominator rules."""

from __future__ import annotations

import numpy as np
import pytest

from fxbundle.data import EXAMPLE_TIMEFRAMES, WindowSource, load_bars_csv, resample
from fxbundle.features import FEATURE_NAMES, N_FEATURES, WARMUP_BARS, Bars, compute_features


def _flat_bars(count: int) -> Bars:
    time = np.datetime64("2024-01-01T00:00:00") + np.arange(count) * np.timedelta64(3600, "s")
    price = np.full(count, 150.0)
    return Bars(time=time, open=price, high=price, low=price, close=price, volume=np.zeros(count))


@pytest.fixture(scope="module")
def usdjpy_bars():
    from conftest import USDJPY_CSV

    return load_bars_csv(USDJPY_CSV, digits=3)


def test_feature_names_unique_and_52():
    assert N_FEATURES == 52
    assert len(set(FEATURE_NAMES)) == 52


def test_features_shape_and_warmup(usdjpy_bars):
    features = compute_features(usdjpy_bars.slice(0, 500))
    assert features.shape == (500, 52)
    assert np.isnan(features[:WARMUP_BARS]).all()
    assert np.isfinite(features[WARMUP_BARS:]).all()


def test_flat_market_gives_finite_features():
    features = compute_features(_flat_bars(300))
    assert np.isfinite(features[WARMUP_BARS:]).all()
    column = {name: features[WARMUP_BARS:, index] for index, name in enumerate(FEATURE_NAMES)}
    assert np.all(column["rsi_14"] == -0.5)  # no gains, no losses: ratio 0, centred
    assert np.all(column["stochastic_14"] == 0.0)
    assert np.all(column["zscore_20"] == 0.0)
    assert np.all(column["volatility_ratio_5_50"] == 0.0)


def test_feature_row_uses_only_past_bars(usdjpy_bars):
    bars = usdjpy_bars.slice(0, 400)
    reference = compute_features(bars)
    changed_close = bars.close.copy()
    changed_close[300:] *= 1.05
    changed_high = np.maximum(bars.high, changed_close)
    changed_low = np.minimum(bars.low, changed_close)
    changed_volume = bars.volume.copy()
    changed_volume[300:] *= 3
    changed = Bars(bars.time, bars.open, changed_high, changed_low, changed_close, changed_volume)
    features = compute_features(changed)
    np.testing.assert_array_equal(features[:300], reference[:300])
    assert not np.allclose(features[300], reference[300])


def test_known_values_on_real_bars(usdjpy_bars):
    """Recompute three features by hand at one bar and compare."""
    bars = usdjpy_bars.slice(0, 300)
    features = compute_features(bars)
    i = 250
    c = bars.close
    names = list(FEATURE_NAMES)
    assert features[i, names.index("log_return_5")] == pytest.approx(np.log(c[i] / c[i - 5]), rel=1e-12)
    assert features[i, names.index("sma_ratio_20")] == pytest.approx(c[i] / c[i - 19 : i + 1].mean() - 1, rel=1e-9)
    returns = np.log(c[i - 9 : i + 1] / c[i - 10 : i])
    assert features[i, names.index("volatility_10")] == pytest.approx(returns.std(), rel=1e-9)


def test_resample_h4_aggregates_ohlcv():
    time = np.datetime64("2024-01-01T00:00:00") + np.arange(8) * np.timedelta64(3600, "s")
    bars = Bars(
        time=time,
        open=np.arange(8, dtype=float) + 100,
        high=np.arange(8, dtype=float) + 101,
        low=np.arange(8, dtype=float) + 99,
        close=np.arange(8, dtype=float) + 100.5,
        volume=np.ones(8),
    )
    h4 = resample(bars, "H4")
    assert list(h4.time) == [np.datetime64("2024-01-01T00:00:00"), np.datetime64("2024-01-01T04:00:00")]
    assert list(h4.open) == [100.0, 104.0]
    assert list(h4.high) == [104.0, 108.0]
    assert list(h4.low) == [99.0, 103.0]
    assert list(h4.close) == [103.5, 107.5]
    assert list(h4.volume) == [4.0, 4.0]


def test_window_unchanged_by_later_bars(usdjpy_bars):
    """Changing every bar after t leaves the window that ends at t bit-identical."""
    bars = usdjpy_bars.slice(0, 16000)
    source = WindowSource(bars, EXAMPLE_TIMEFRAMES, 360, 36)
    end = int(source.end_indices(with_target=False)[200])
    stats = source.fit_normalization(source.end_indices()[:100])
    reference = source.window(end, stats)

    scale = np.ones(len(bars))
    scale[end + 1 :] = 1.1
    later_changed = Bars(bars.time, bars.open * scale, bars.high * scale, bars.low * scale, bars.close * scale, bars.volume)
    changed_source = WindowSource(later_changed, EXAMPLE_TIMEFRAMES, 360, 36)
    np.testing.assert_array_equal(changed_source.window(end, stats), reference)

    # The control: changing bar t itself must change the window.
    scale[end] = 1.1
    at_t_changed = Bars(bars.time, bars.open * scale, bars.high * scale, bars.low * scale, bars.close * scale, bars.volume)
    assert not np.array_equal(WindowSource(at_t_changed, EXAMPLE_TIMEFRAMES, 360, 36).window(end, stats), reference)


def test_higher_timeframe_windows_hold_closed_bars_only(usdjpy_bars):
    bars = usdjpy_bars.slice(0, 16000)
    source = WindowSource(bars, EXAMPLE_TIMEFRAMES, 360, 36)
    end = int(source.end_indices()[0])
    cutoff = bars.time[end] + np.timedelta64(3600, "s")
    for position, timeframe in enumerate(EXAMPLE_TIMEFRAMES):
        tf_bars = resample(bars, timeframe)
        last = source.last_closed[end, position]
        period = np.timedelta64({"H1": 3600, "H2": 7200, "H4": 14400, "H8": 28800, "D1": 86400}[timeframe], "s")
        assert tf_bars.time[last] + period <= cutoff, timeframe
        if last + 1 < len(tf_bars):
            assert tf_bars.time[last + 1] + period > cutoff, timeframe
