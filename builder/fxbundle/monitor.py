"""FP16 stability monitor: fall back to FP32 on NaN/Inf and return to FP16 once it is clean again.

Rules:
- an FP16 output with NaN or Inf switches to FP32 at once, and the same call is re-run in
  FP32, so the caller never receives the bad output;
- during the fallback FP32 returns every result, and FP16 runs alongside as a shadow;
- the monitor returns to FP16 after 10 consecutive clean shadow outputs AND at least 60 s
  since the fallback began. A bad shadow output resets the count.

The clock is injectable so tests can move time without sleeping.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]

CLEAN_CALLS_TO_RECOVER = 10
SECONDS_TO_RECOVER = 60.0


@dataclass
class MonitorStatistics:
    calls: int = 0
    fp16_results: int = 0
    fp32_results: int = 0
    fallbacks: int = 0
    recoveries: int = 0
    bad_fp16_outputs: int = 0
    shadow_runs: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def is_clean(output: np.ndarray) -> bool:
    return bool(np.isfinite(output).all())


class FP16StabilityMonitor:
    """Return predictions from FP16 while it is healthy, else from FP32 (see the module docstring)."""

    def __init__(
        self,
        predict_fp16: Predict,
        predict_fp32: Predict,
        clock: Callable[[], float] = time.monotonic,
        clean_calls_to_recover: int = CLEAN_CALLS_TO_RECOVER,
        seconds_to_recover: float = SECONDS_TO_RECOVER,
    ) -> None:
        self.predict_fp16 = predict_fp16
        self.predict_fp32 = predict_fp32
        self.clock = clock
        self.clean_calls_to_recover = clean_calls_to_recover
        self.seconds_to_recover = seconds_to_recover
        self.statistics = MonitorStatistics()
        self.fallback_since: float | None = None
        self.clean_streak = 0

    @property
    def active_precision(self) -> str:
        return "fp16" if self.fallback_since is None else "fp32"

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.statistics.calls += 1
        if self.fallback_since is None:
            output = self.predict_fp16(batch)
            if is_clean(output):
                self.statistics.fp16_results += 1
                return output
            self.statistics.bad_fp16_outputs += 1
            self.statistics.fallbacks += 1
            self.fallback_since = self.clock()
            self.clean_streak = 0
            return self._predict_fp32(batch)

        shadow = self.predict_fp16(batch)
        self.statistics.shadow_runs += 1
        if is_clean(shadow):
            self.clean_streak += 1
        else:
            self.statistics.bad_fp16_outputs += 1
            self.clean_streak = 0
        result = self._predict_fp32(batch)
        if self.clean_streak >= self.clean_calls_to_recover and self.clock() - self.fallback_since >= self.seconds_to_recover:
            self.fallback_since = None
            self.clean_streak = 0
            self.statistics.recoveries += 1
        return result

    def _predict_fp32(self, batch: np.ndarray) -> np.ndarray:
        self.statistics.fp32_results += 1
        return self.predict_fp32(batch)
