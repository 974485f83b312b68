"""The build's validation checks: each passes, warns, or stops the build with exit code 3.

Every outcome is kept in order and written to ``onnx_metadata.json`` (section ``validation``)
and to ``reports/validation.md`` in the bundle, so a reader sees which checks ran, on what,
and with which tolerances.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, TypeVar

import onnx

from fxbundle.errors import EXIT_GATE_FAILED, FxBundleError, GateFailed

logger = logging.getLogger(__name__)

Status = Literal["passed", "warning", "failed", "skipped"]
T = TypeVar("T")

# Models above this size still load in MetaTrader (the #resource limit is 128 MB) but slow
# down compilation and the Strategy Tester's agent start-up.
DEFAULT_MAX_MODEL_MB = 10.0


@dataclass
class CheckOutcome:
    name: str
    status: Status
    summary: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class ValidationLog:
    """Outcomes in the order the checks ran."""

    outcomes: list[CheckOutcome] = field(default_factory=list)

    def record(self, name: str, status: Status, summary: str, **details: Any) -> CheckOutcome:
        outcome = CheckOutcome(name=name, status=status, summary=summary, details=details)
        self.outcomes.append(outcome)
        level = {"warning": logging.WARNING, "failed": logging.ERROR}.get(status, logging.DEBUG)
        logger.log(level, "check %s: %s (%s)", name, status, summary)
        return outcome

    def gate(self, name: str, check: Callable[[], T], summary: Callable[[T], str] | None = None) -> T:
        """Run ``check``; record it as passed, or as failed and stop the build with exit code 3."""
        try:
            result = check()
        except FxBundleError as error:
            self.record(name, "failed", str(error))
            error.exit_code = EXIT_GATE_FAILED
            raise
        details = result.to_dict() if hasattr(result, "to_dict") else {}
        self.record(name, "passed", summary(result) if summary else "ok", **details)
        return result

    def to_dict(self) -> dict[str, Any]:
        counts = {status: sum(1 for o in self.outcomes if o.status == status) for status in ("passed", "warning", "failed", "skipped")}
        return {"summary": counts, "checks": [asdict(outcome) for outcome in self.outcomes]}


def check_io_shapes(proto: onnx.ModelProto, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> dict[str, Any]:
    """Compare the graph's input and output shapes (batch axis aside) with the checkpoint's."""

    def dims(value: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]

    found_input = dims(proto.graph.input[0])
    found_output = dims(proto.graph.output[0])
    problems = []
    if len(found_input) != len(input_shape) or list(found_input[1:]) != list(input_shape[1:]):
        problems.append(f"input {found_input} != {['batch', *input_shape[1:]]}")
    if len(found_output) != len(output_shape) or list(found_output[1:]) != list(output_shape[1:]):
        problems.append(f"output {found_output} != {['batch', *output_shape[1:]]}")
    if problems:
        raise GateFailed("validation.shape_mismatch", problems="; ".join(problems))
    return {"input": found_input, "output": found_output}


def check_model_size(size_bytes: int, max_mb: float = DEFAULT_MAX_MODEL_MB) -> tuple[Status, str]:
    size_mb = size_bytes / 1e6
    if size_mb > max_mb:
        return "warning", f"{size_mb:.2f} MB > {max_mb:g} MB"
    return "passed", f"{size_mb:.2f} MB <= {max_mb:g} MB"

