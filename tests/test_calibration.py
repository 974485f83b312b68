"""Calibration window selection on real USDJPY bars: quotas, de-duplication, KPIs, seeding."""

from __future__ import annotations

import numpy as np
import pytest

from fxbundle.calibration import MIN_EXTREME_SAMPLES, average_true_range, select_calibration_windows
from fxbundle.data import EXAMPLE_TIMEFRAMES, WindowSource, load_bars_csv


@pytest.fixture(scope="module")
def source():
    from conftest import USDJPY_CSV

    return WindowSource(load_bars_csv(USDJPY_CSV, digits=3), EXAMPLE_TIMEFRAMES, 360, 36)


@pytest.fixture(scope="module")
def candidates(source):
    return source.end_indices(end=np.datetime64("2020-01-01T00:00:00"))


def test_selection_size_and_uniqueness(source, candidates):
    selection = select_calibration_windows(source, candidates, 200, seed=1)
    assert len(selection.indices) == 200
    assert len(np.unique(selection.indices)) == 200
    assert np.isin(selection.indices, candidates).all()


def test_selection_quotas(source, candidates):
    selection = select_calibration_windows(source, candidates, 200, seed=1)
    assert selection.from_volatility == 100
    assert selection.from_price + selection.from_extremes + selection.topped_up == 100
    assert selection.from_extremes == 40


def test_selection_kpis_hold(source, candidates):
    selection = select_calibration_windows(source, candidates, 200, seed=1)
    assert selection.regimes_ok, selection.regime_shares
    assert selection.extreme_samples >= MIN_EXTREME_SAMPLES
    assert selection.extremes_ok


def test_selection_kpi_fails_when_too_small(source, candidates):
    selection = select_calibration_windows(source, candidates, 50, seed=1)
    assert selection.extreme_samples < MIN_EXTREME_SAMPLES
    assert not selection.extremes_ok


def test_selection_is_seeded(source, candidates):
    first = select_calibration_windows(source, candidates, 120, seed=3).indices
    again = select_calibration_windows(source, candidates, 120, seed=3).indices
    other = select_calibration_windows(source, candidates, 120, seed=4).indices
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_selection_rejects_oversized_request(source, candidates):
    with pytest.raises(ValueError):
        select_calibration_windows(source, candidates[:10], 11)


def test_average_true_range_known_values():
    close = np.array([10.0, 11.0, 10.5, 10.0])
    high = np.array([10.5, 11.5, 11.0, 10.5])
    low = np.array([9.5, 10.0, 10.0, 9.0])
    atr = average_true_range(close, high, low, bars=2)
    assert np.isnan(atr[0])
    assert atr[2] == pytest.approx((1.5 + 1.0) / 2)
    assert atr[3] == pytest.approx((1.0 + 1.5) / 2)
