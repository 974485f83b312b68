"""FP16 stability monitor: fallback on NaN/Inf, re-run in FP32, recovery after 10 clean calls and 60 s."""

from __future__ import annotations

import numpy as np

from fxbundle.monitor import FP16StabilityMonitor

GOOD = np.array([[1.0, 2.0]])
FP32_ANSWER = np.array([[1.5, 2.5]])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedFP16:
    """Returns NaN on the calls whose numbers are listed, a clean output otherwise."""

    def __init__(self, bad_calls: set[int]) -> None:
        self.bad_calls = bad_calls
        self.calls = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.array([[np.nan, 1.0]]) if self.calls in self.bad_calls else GOOD


def make(bad_calls: set[int]):
    clock = Clock()
    monitor = FP16StabilityMonitor(ScriptedFP16(bad_calls), lambda batch: FP32_ANSWER, clock=clock)
    return monitor, clock


def test_clean_fp16_is_used():
    monitor, _ = make(set())
    np.testing.assert_array_equal(monitor.predict(GOOD), GOOD)
    assert monitor.active_precision == "fp16"
    assert monitor.statistics.fp16_results == 1


def test_nan_switches_and_reruns_in_fp32():
    monitor, _ = make({1})
    output = monitor.predict(GOOD)
    np.testing.assert_array_equal(output, FP32_ANSWER)
    assert monitor.active_precision == "fp32"
    assert monitor.statistics.fallbacks == 1
    assert monitor.statistics.fp32_results == 1


def test_inf_also_switches():
    monitor = FP16StabilityMonitor(lambda b: np.array([[np.inf]]), lambda b: np.array([[0.0]]), clock=Clock())
    monitor.predict(GOOD)
    assert monitor.active_precision == "fp32"


def test_recovery_needs_ten_clean_calls():
    monitor, clock = make({1})
    monitor.predict(GOOD)
    clock.now += 120
    for _ in range(9):
        monitor.predict(GOOD)
    assert monitor.active_precision == "fp32"
    monitor.predict(GOOD)
    assert monitor.active_precision == "fp16"
    assert monitor.statistics.recoveries == 1


def test_recovery_needs_sixty_seconds():
    monitor, clock = make({1})
    monitor.predict(GOOD)
    for _ in range(20):
        monitor.predict(GOOD)
    clock.now += 59.9
    monitor.predict(GOOD)
    assert monitor.active_precision == "fp32"
    clock.now += 0.1
    monitor.predict(GOOD)
    assert monitor.active_precision == "fp16"


def test_bad_shadow_resets_the_streak():
    monitor, clock = make({1, 6})  # call 6 is the fifth shadow run
    monitor.predict(GOOD)
    clock.now += 120
    for _ in range(10):
        monitor.predict(GOOD)
    assert monitor.active_precision == "fp32"
    assert monitor.statistics.bad_fp16_outputs == 2
    for _ in range(5):
        monitor.predict(GOOD)
    assert monitor.active_precision == "fp16"


def test_fallback_results_come_from_fp32():
    monitor, _ = make({1})
    outputs = [monitor.predict(GOOD) for _ in range(5)]
    assert all(np.array_equal(output, FP32_ANSWER) for output in outputs)
    assert monitor.statistics.shadow_runs == 4
    assert monitor.statistics.calls == 5
