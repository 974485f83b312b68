"""Element-wise comparison of two model outputs with stated absolute and relative tolerances."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ParityReport:
    """Outcome of ``|actual - expected| <= atol + rtol * |expected|`` over every element."""

    atol: float
    rtol: float
    max_abs: float
    max_rel: float
    violations: int
    elements: int

    @property
    def passed(self) -> bool:
        return self.violations == 0

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def describe(self) -> str:
        return f"max_abs={self.max_abs:.3g}, max_rel={self.max_rel:.3g}, atol={self.atol:g}, rtol={self.rtol:g}, violations={self.violations}/{self.elements}"


def compare(actual: np.ndarray, expected: np.ndarray, atol: float, rtol: float) -> ParityReport:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"cannot compare outputs of shape {actual.shape} and {expected.shape}")
    difference = np.abs(actual - expected)
    relative = difference / np.maximum(np.abs(expected), np.finfo(np.float32).tiny)
    finite = np.isfinite(actual) & np.isfinite(expected)
    violations = (~finite) | (difference > atol + rtol * np.abs(expected))
    return ParityReport(
        atol=atol,
        rtol=rtol,
        max_abs=float(np.max(difference, initial=0.0)),
        max_rel=float(np.max(relative, initial=0.0)),
        violations=int(np.count_nonzero(violations)),
        elements=int(actual.size),
    )
