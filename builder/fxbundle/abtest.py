"""A/B protocol: adopt INT8 over FP16 only when it is clearly faster and barely less accurate.

Rule: adopt when the MAE degradation of INT8 against FP16 is below 1.5 % AND its p95 latency
is at least 30 % lower. Otherwise reject. The comparison is repeated (5 times by default)
with fresh latency measurements; the verdict counts only if every repetition agrees, and an
inconsistent series is reported as such and treated as a rejection.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

MAX_MAE_DEGRADATION_PCT = 1.5
MIN_P95_IMPROVEMENT_PCT = 30.0
DEFAULT_REPEATS = 5


@dataclass(frozen=True)
class ABRound:
    mae_degradation_pct: float
    p95_candidate_ms: float
    p95_baseline_ms: float
    p95_improvement_pct: float
    verdict: str  # "adopt" | "reject"


@dataclass
class ABResult:
    candidate: str
    baseline: str
    rounds: list[ABRound] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return len({round_.verdict for round_ in self.rounds}) == 1

    @property
    def verdict(self) -> str:
        """"adopt" or "reject" when all rounds agree, else "inconsistent" (which never adopts)."""
        if not self.rounds:
            return "reject"
        return self.rounds[0].verdict if self.consistent else "inconsistent"

    @property
    def adopted(self) -> bool:
        return self.verdict == "adopt"

    def to_dict(self) -> dict:
        return {
            "candidate": self.candidate,
            "baseline": self.baseline,
            "rule": f"adopt when MAE degradation < {MAX_MAE_DEGRADATION_PCT} % and p95 improvement >= {MIN_P95_IMPROVEMENT_PCT} %",
            "rounds": [asdict(round_) for round_ in self.rounds],
            "verdicts": [round_.verdict for round_ in self.rounds],
            "consistent": self.consistent,
            "verdict": self.verdict,
        }


def judge(mae_candidate: float, mae_baseline: float, p95_candidate_ms: float, p95_baseline_ms: float) -> ABRound:
    """Apply the adoption rule to one set of measurements."""
    mae_degradation = 100.0 * (mae_candidate - mae_baseline) / mae_baseline if mae_baseline > 0 else 0.0
    improvement = 100.0 * (p95_baseline_ms - p95_candidate_ms) / p95_baseline_ms if p95_baseline_ms > 0 else 0.0
    adopt = mae_degradation < MAX_MAE_DEGRADATION_PCT and improvement >= MIN_P95_IMPROVEMENT_PCT
    return ABRound(
        mae_degradation_pct=round(mae_degradation, 4),
        p95_candidate_ms=round(p95_candidate_ms, 4),
        p95_baseline_ms=round(p95_baseline_ms, 4),
        p95_improvement_pct=round(improvement, 2),
        verdict="adopt" if adopt else "reject",
    )


def run_ab(
    candidate: tuple[str, Path],
    baseline: tuple[str, Path],
    mae_candidate: float,
    mae_baseline: float,
    measure_p95_ms: Callable[[Path], float],
    repeats: int = DEFAULT_REPEATS,
) -> ABResult:
    """Repeat the comparison ``repeats`` times, measuring both models' p95 afresh each time.

    The MAEs are measured once by the caller: ONNX Runtime on one CPU gives the same outputs
    on every run, so only the latency varies between repetitions.
    """
    result = ABResult(candidate=candidate[0], baseline=baseline[0])
    for _ in range(repeats):
        # Both models are measured in the same round, side by side, so machine load hits both.
        p95_baseline = measure_p95_ms(baseline[1])
        p95_candidate = measure_p95_ms(candidate[1])
        result.rounds.append(judge(mae_candidate, mae_baseline, p95_candidate, p95_baseline))
    return result
