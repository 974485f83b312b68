"""The INT8-vs-FP16 A/B rule and its repetition."""

from __future__ import annotations

from itertools import cycle
from pathlib import Path

import pytest

from fxbundle.abtest import judge, run_ab

INT8, FP16 = ("int8", Path("int8.onnx")), ("fp16", Path("fp16.onnx"))


def test_adopt_when_faster_and_accurate():
    verdict = judge(mae_candidate=1.01, mae_baseline=1.0, p95_candidate_ms=6.0, p95_baseline_ms=10.0)
    assert verdict.verdict == "adopt"
    assert verdict.p95_improvement_pct == pytest.approx(40.0)
    assert verdict.mae_degradation_pct == pytest.approx(1.0)


def test_reject_when_too_inaccurate():
    assert judge(1.02, 1.0, 5.0, 10.0).verdict == "reject"


def test_reject_when_not_fast_enough():
    assert judge(1.0, 1.0, 7.5, 10.0).verdict == "reject"


def test_boundaries():
    assert judge(1.0149, 1.0, 7.0, 10.0).verdict == "adopt"  # 1.49 % and exactly 30 %
    assert judge(1.0, 0.98, 7.0, 10.0).verdict == "reject"  # 2.04 % degradation
    assert judge(1.0, 1.0, 7.01, 10.0).verdict == "reject"  # 29.9 % improvement


def test_five_consistent_rounds():
    timings = {INT8[1]: 5.0, FP16[1]: 10.0}
    result = run_ab(INT8, FP16, 1.0, 1.0, lambda path: timings[path])
    assert len(result.rounds) == 5
    assert result.consistent
    assert result.verdict == "adopt"
    assert result.adopted


def test_inconsistent_rounds_never_adopt():
    int8_timings = cycle([5.0, 9.0])
    result = run_ab(INT8, FP16, 1.0, 1.0, lambda path: next(int8_timings) if path == INT8[1] else 10.0)
    assert not result.consistent
    assert result.verdict == "inconsistent"
    assert not result.adopted
    assert result.to_dict()["verdicts"] == ["adopt", "reject", "adopt", "reject", "adopt"]
