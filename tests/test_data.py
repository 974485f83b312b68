"""Bars CSV loading, targets, normalization and lazy windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fxbundle.data import EXAMPLE_TIMEFRAMES, WindowSource, load_bars_csv, verify_causality
from fxbundle.errors import DataError

HEADER = "Date,open,high,low,close,tick_volume\n"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bars.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_real_usdjpy(usdjpy_csv):
    bars = load_bars_csv(usdjpy_csv, digits=3)
    assert len(bars) == 57600
    assert bars.time[0] == np.datetime64("2012-11-16T12:00:00")
    assert bars.close[0] == 81.201  # 81201.0 scaled by 10**3
    assert bars.volume[0] == 3114


def test_float_noise_rounded_to_digits(tmp_path):
    path = _write(tmp_path, HEADER + "2020-01-01 00:00:00,129587.00000000001,129590.0,129580.0,129585.0,10\n")
    bars = load_bars_csv(path, digits=3)
    assert bars.open[0] == 129.587


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("Time,o,h,l,c,v\n", "data.csv_bad_header"),
        (HEADER + "2020-01-01 00:00:00,1,2,x,1,1\n", "data.csv_bad_row"),
        (HEADER + "2020-01-01 00:00:00,1,2,1\n", "data.csv_bad_row"),
        (HEADER, "data.csv_empty"),
        (HEADER + "01/01/2020,1000,1001,999,1000,1\n", "data.csv_bad_time"),
        (HEADER + "2020-01-01 01:00:00,1000,1001,999,1000,1\n2020-01-01 00:00:00,1000,1001,999,1000,1\n", "data.bars_not_increasing"),
        (HEADER + "2020-01-01 00:00:00,1000,999,998,1000,1\n", "data.bar_invalid"),
        (HEADER + "2020-01-01 00:00:00,-1000,1001,-1001,1000,1\n", "data.bar_invalid"),
    ],
)
def test_bad_csv_rejected(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(DataError) as raised:
        load_bars_csv(path, digits=3)
    assert raised.value.key == key
    assert str(path) in str(raised.value)


def test_missing_csv_rejected(tmp_path):
    with pytest.raises(DataError) as raised:
        load_bars_csv(tmp_path / "absent.csv", digits=3)
    assert raised.value.key == "data.csv_not_found"


@pytest.fixture(scope="module")
def source():
    from conftest import USDJPY_CSV

    bars = load_bars_csv(USDJPY_CSV, digits=3).slice(0, 20000)
    return WindowSource(bars, EXAMPLE_TIMEFRAMES, 360, 36)


def test_targets_are_future_close_changes(source):
    index = int(source.end_indices()[10])
    targets = source.targets(np.array([index]))[0]
    close = source.base.close
    assert targets.shape == (36,)
    assert targets[0] == pytest.approx(close[index + 1] - close[index], abs=1e-6)
    assert targets[35] == pytest.approx(close[index + 36] - close[index], abs=1e-6)


def test_windows_are_batched_lazily(source):
    indices = source.end_indices()[:20]
    stats = source.fit_normalization(indices)
    batches = list(source.windows(indices, stats, batch_size=8))
    assert [len(batch) for _, batch in batches] == [8, 8, 4]
    assert batches[0][0].shape == (8, 5, 360, 52)
    assert batches[0][0].dtype == np.float32


def test_window_oldest_bar_first(source):
    indices = source.end_indices()[:2]
    stats = source.fit_normalization(indices)
    first = source.window(int(indices[0]), stats)
    second = source.window(int(indices[1]), stats)
    # Consecutive H1 windows overlap: the newer window is the older one shifted by one bar.
    np.testing.assert_array_equal(second[0, :-1], first[0, 1:])


def test_normalization_ignores_later_bars(source):
    train = source.end_indices()[:500]
    stats = source.fit_normalization(train)
    for position in range(len(EXAMPLE_TIMEFRAMES)):
        source.features[position][source.last_closed[train[-1], position] + 1 :] += 100.0
    try:
        again = source.fit_normalization(train)
    finally:
        for position in range(len(EXAMPLE_TIMEFRAMES)):
            source.features[position][source.last_closed[train[-1], position] + 1 :] -= 100.0
    np.testing.assert_array_equal(again.mean, stats.mean)
    np.testing.assert_array_equal(again.std, stats.std)


def test_normalized_windows_are_clipped(source):
    indices = source.end_indices()[:50]
    stats = source.fit_normalization(indices)
    window = source.window(int(indices[-1]), stats)
    assert np.abs(window).max() <= stats.clip


def test_verify_causality_passes_on_real_bars(source):
    indices = source.end_indices()
    stats = source.fit_normalization(indices[:100])
    probes = [int(indices[5]), int(indices[-5])]
    assert verify_causality(source.base, EXAMPLE_TIMEFRAMES, 360, 36, stats, probes) == 2


def test_verify_causality_catches_a_leak(source, monkeypatch):
    """A feature that peeks one bar ahead must be caught."""
    import fxbundle.data as data_module

    honest = data_module.compute_features

    def leaky(bars):
        features = honest(bars)
        features[:-1, 0] = features[1:, 0]  # column 0 now contains the next bar's value
        return features

    monkeypatch.setattr(data_module, "compute_features", leaky)
    indices = source.end_indices()
    stats = source.fit_normalization(indices[:100])
    with pytest.raises(DataError) as raised:
        verify_causality(source.base, EXAMPLE_TIMEFRAMES, 360, 36, stats, [int(indices[5])])
    assert raised.value.key == "data.future_leak"
