"""Graph optimization with onnxoptimizer, checked pass by pass against the graph before it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxoptimizer

from fxbundle.config import OptimizationSettings
from fxbundle.errors import ExportError
from fxbundle.export import check_model, save_single_file
from fxbundle.parity import ParityReport, compare
from fxbundle.sessions import create_session, run

logger = logging.getLogger(__name__)


@dataclass
class OptimizeResult:
    path: Path
    applied: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    nodes_before: int = 0
    nodes_after: int = 0
    parity: ParityReport | None = None


def _outputs(proto: onnx.ModelProto, sample: np.ndarray) -> np.ndarray:
    # ORT's own graph optimizations are off so that the comparison measures this graph only.
    session, _ = create_session(proto.SerializeToString(), graph_optimization="ORT_DISABLE_ALL")
    return run(session, sample)


def optimize_onnx(source: Path, out_path: Path, settings: OptimizationSettings, sample: np.ndarray) -> OptimizeResult:
    """Apply each configured pass in order; a pass that fails or changes the outputs is dropped."""
    original = onnx.load(str(source))
    reference = _outputs(original, sample)
    result = OptimizeResult(path=out_path, nodes_before=len(original.graph.node))
    tolerance = settings.parity

    current = original
    for name in settings.passes:
        try:
            candidate = onnxoptimizer.optimize(current, [name], fixed_point=False)
            candidate_outputs = _outputs(candidate, sample)
        except Exception as error:  # a pass may emit an invalid graph; that only disqualifies the pass
            result.rejected[name] = f"failed: {str(error).strip().splitlines()[0]}"
            logger.warning("optimizer pass %s dropped: %s", name, result.rejected[name])
            continue
        report = compare(candidate_outputs, reference, tolerance.atol, tolerance.rtol)
        if not report.passed:
            result.rejected[name] = f"changed outputs: {report.describe()}"
            logger.warning("optimizer pass %s dropped: %s", name, result.rejected[name])
            continue
        current = candidate
        result.applied.append(name)

    save_single_file(current, out_path)
    try:
        check_model(out_path)
    except ExportError:
        out_path.unlink(missing_ok=True)
        raise
    result.nodes_after = len(current.graph.node)
    result.parity = compare(_outputs(current, sample), reference, tolerance.atol, tolerance.rtol)
    return result
