"""Cross-check the MQL5 feature port against features.py by compiling it with g++.

No MQL5 compiler runs on Linux. The test therefore rewrites the dynamic arrays of
mql5/FxBundle/ExampleFeatures.mqh into std::vector and compiles the file with a small shim of
MQL5 types and functions (tests/mql5_shim/). It runs the program on real USDJPY bars and
compares every feature with compute_features. It cannot catch MQL5-only compile errors or
differences between MQL5's math library and glibc's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fxbundle.data import load_bars_csv, resample
from fxbundle.features import FEATURE_NAMES, WARMUP_BARS, Bars, compute_features

REPO_ROOT = Path(__file__).resolve().parents[1]
FEATURES_MQH = REPO_ROOT / "mql5" / "FxBundle" / "ExampleFeatures.mqh"
SHIM_DIR = Path(__file__).resolve().parent / "mql5_shim"
USDJPY_H1 = REPO_ROOT.parent / "shared" / "data" / "fx" / "USDJPY_H1.csv"

# The port sums in numpy's order, so only features that take a logarithm differ, because numpy
# has its own log. The max-abs error measured on these bars with g++ 12 and glibc 2.36 is 4e-16.
# The tolerance is far above that yet far below what a wrong formula, lag or window produces.
RTOL = 1e-9
ATOL = 1e-12
EXIT_FEATURES_FAILED = 3

# `const MqlRates &rates[]` -> `const FxbArray<MqlRates> &rates`
_ARRAY_PARAMETER = re.compile(r"(const\s+)?(\w+)\s*&\s*(\w+)\s*\[\s*\]")
# `double closes[];` -> `FxbArray<double> closes;`
_DYNAMIC_ARRAY_LOCAL = re.compile(r"^(\s*)(\w+)\s+(\w+)\s*\[\s*\]\s*;", re.MULTILINE)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed; the MQL5 feature port cannot be compiled")


@dataclass(frozen=True)
class DriverResult:
    returncode: int
    names: list[str]
    features: np.ndarray
    stderr: str


def rewrite_mql5_as_cpp(source: str) -> str:
    """Turn MQL5 dynamic arrays into FxbArray<T> (std::vector); the rest is valid C++ already."""
    source = _ARRAY_PARAMETER.sub(lambda m: f"{m.group(1) or ''}FxbArray<{m.group(2)}> &{m.group(3)}", source)
    return _DYNAMIC_ARRAY_LOCAL.sub(lambda m: f"{m.group(1)}FxbArray<{m.group(2)}> {m.group(3)};", source)


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    build_dir = tmp_path_factory.mktemp("mql5_features")
    (build_dir / "example_features_rewritten.h").write_text(rewrite_mql5_as_cpp(FEATURES_MQH.read_text(encoding="ascii")), encoding="ascii")
    executable = build_dir / "features_driver"
    # -ffp-contract=off keeps g++ from fusing multiply-adds, which MQL5 and numpy do not do.
    command = [
        "g++", "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Werror",
        "-I", str(SHIM_DIR), "-I", str(build_dir),
        str(SHIM_DIR / "features_driver.cpp"), "-o", str(executable),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    assert completed.returncode == 0, f"g++ failed to compile the rewritten ExampleFeatures.mqh:\n{completed.stderr}"
    return executable


def run_driver(executable: Path, bars: Bars) -> DriverResult:
    seconds = bars.time.astype("datetime64[s]").astype(np.int64)
    lines = [str(len(bars))]
    for i in range(len(bars)):
        # repr() round-trips every float64, so the C++ side reads the same prices.
        prices = (float(bars.open[i]), float(bars.high[i]), float(bars.low[i]), float(bars.close[i]))
        lines.append(f"{int(seconds[i])} " + " ".join(repr(price) for price in prices) + f" {int(bars.volume[i])}")
    completed = subprocess.run([str(executable)], input="\n".join(lines) + "\n", capture_output=True, text=True, check=False, timeout=120)

    output = completed.stdout.splitlines()
    names = output[0].split() if output else []
    rows = [[float(value) for value in line.split()] for line in output[1:]]
    features = np.array(rows, dtype=np.float64).reshape(len(rows), len(FEATURE_NAMES))
    return DriverResult(returncode=completed.returncode, names=names, features=features, stderr=completed.stderr)


def mismatch_report(expected: np.ndarray, actual: np.ndarray) -> list[str]:
    """List every feature outside |a - e| <= ATOL + RTOL * |e|, with its max-abs and max-rel error."""
    failures = []
    for column, name in enumerate(FEATURE_NAMES):
        e = expected[:, column]
        a = actual[:, column]
        abs_error = np.abs(a - e)
        bad = ~(abs_error <= ATOL + RTOL * np.abs(e))
        if bad.any():
            # Relative error is undefined where Python gives exactly 0; those rows count as 0 here.
            rel_error = np.divide(abs_error, np.abs(e), out=np.zeros_like(abs_error), where=e != 0)
            first = int(np.flatnonzero(bad)[0])
            failures.append(
                f"{name}: {int(bad.sum())} rows fail, max-abs {abs_error.max():.3e}, max-rel {rel_error.max():.3e}; "
                f"first at row {first + WARMUP_BARS}: MQL5 {float(a[first])!r} vs Python {float(e[first])!r}"
            )
    return failures


def assert_features_match(executable: Path, bars: Bars) -> None:
    result = run_driver(executable, bars)
    assert result.returncode == 0, result.stderr

    expected = compute_features(bars)[WARMUP_BARS:]
    assert result.features.shape == expected.shape

    failures = mismatch_report(expected, result.features)
    assert not failures, f"MQL5 port differs from features.py (atol {ATOL}, rtol {RTOL}):\n" + "\n".join(failures)


@pytest.fixture(scope="module")
def usdjpy_h1() -> Bars:
    return load_bars_csv(USDJPY_H1, digits=3)


def test_crosscheck_feature_names(driver: Path, usdjpy_h1: Bars) -> None:
    result = run_driver(driver, usdjpy_h1.slice(0, WARMUP_BARS + 1))
    assert tuple(result.names) == FEATURE_NAMES


def test_crosscheck_usdjpy_h1(driver: Path, usdjpy_h1: Bars) -> None:
    assert_features_match(driver, usdjpy_h1.slice(0, 600))


def test_crosscheck_usdjpy_h1_later_period(driver: Path, usdjpy_h1: Bars) -> None:
    assert_features_match(driver, usdjpy_h1.slice(40_000, 40_600))


def test_crosscheck_usdjpy_h4(driver: Path, usdjpy_h1: Bars) -> None:
    h4 = resample(usdjpy_h1.slice(0, 2_600), "H4")
    assert len(h4) > 500
    assert_features_match(driver, h4)


def test_crosscheck_usdjpy_d1_weekdays(driver: Path, usdjpy_h1: Bars) -> None:
    d1 = resample(usdjpy_h1.slice(0, 4_000), "D1")
    weekdays = set(((d1.time.astype(np.int64) // 86_400 + 4) % 7)[WARMUP_BARS:].tolist())
    assert len(weekdays) >= 5
    assert_features_match(driver, d1)


def flat_tail_bars(source: Bars, flat_from: int) -> Bars:
    """Copy ``source`` and make every bar from ``flat_from`` on flat at the last close, with zero volume."""
    price = float(source.close[flat_from - 1])
    flat = np.arange(len(source)) >= flat_from
    return Bars(
        time=source.time.copy(),
        open=np.where(flat, price, source.open),
        high=np.where(flat, price, source.high),
        low=np.where(flat, price, source.low),
        close=np.where(flat, price, source.close),
        volume=np.where(flat, 0.0, source.volume),
    )


def test_flat_bars_reach_zero_denominator_rules(usdjpy_h1: Bars) -> None:
    # Guards the next test, whose bars must really hit the zero-denominator branches. zscore_20
    # is left out because numpy's std of 20 equal closes is ~1e-14, not 0, so Python gives
    # +-1 there. The cross-check requires the MQL5 port to give the same.
    features = compute_features(flat_tail_bars(usdjpy_h1.slice(0, 400), flat_from=200))
    last = dict(zip(FEATURE_NAMES, features[-1]))
    assert last["rsi_28"] == -0.5
    assert last["stochastic_50"] == 0.0
    assert last["range_ratio_20"] == -1.0
    assert last["volatility_ratio_5_50"] == 0.0
    assert last["volatility_100"] == 0.0


def test_crosscheck_flat_bars(driver: Path, usdjpy_h1: Bars) -> None:
    assert_features_match(driver, flat_tail_bars(usdjpy_h1.slice(0, 400), flat_from=200))


def test_crosscheck_rejects_too_few_bars(driver: Path, usdjpy_h1: Bars) -> None:
    result = run_driver(driver, usdjpy_h1.slice(0, WARMUP_BARS))
    assert result.returncode == EXIT_FEATURES_FAILED
    assert "FxbComputeFeatures" in result.stderr


def test_rewrite_leaves_no_mql5_dynamic_arrays() -> None:
    rewritten = rewrite_mql5_as_cpp(FEATURES_MQH.read_text(encoding="ascii"))
    code = re.sub(r"//[^\n]*", "", rewritten)
    assert re.search(r"\[\s*\]", code) is None
