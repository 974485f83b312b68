"""Checks on an exported ONNX graph that the exporter and onnx.checker do not make.

Each check returns a result with ``to_dict()`` for onnx_metadata.json, or raises:
``ExportError`` when the graph itself is wrong (the fix is a change to the model or the export)
and ``GateFailed`` when ONNX Runtime's optimized and unoptimized runs disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from fxbundle.errors import ExportError, GateFailed
from fxbundle.parity import ParityReport, compare
from fxbundle.sessions import create_session, run

RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial"})
RNN_OPS = frozenset({"LSTM", "GRU", "RNN"})
DEFAULT_BATCH_SIZES = (1, 2, 3, 7)

def _load(model: Path | str | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(str(model), load_external_data=False)


def _walk_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Yield every node of ``graph`` and of the subgraphs inside If, Loop and Scan nodes."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _walk_nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _walk_nodes(subgraph)


def _node_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node producing {node.output[0]!r}"


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Map each initializer and each Constant node output of ``graph`` to its value."""
    values = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type != "Constant" or not node.output:
            continue
        attribute = next(iter(node.attribute), None)
        if attribute is None:
            continue
        if attribute.name == "value":
            values[node.output[0]] = numpy_helper.to_array(attribute.t)
        elif attribute.name in ("value_float", "value_int"):
            values[node.output[0]] = np.array(onnx.helper.get_attribute_value(attribute))
        elif attribute.name in ("value_floats", "value_ints"):
            values[node.output[0]] = np.array(list(onnx.helper.get_attribute_value(attribute)))
    return values


# --- batch parity -------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchRunReport:
    """One batch size: each row against the single-sample run of that row, and against PyTorch."""

    batch_size: int
    rows_vs_single: ParityReport
    vs_pytorch: ParityReport

    @property
    def passed(self) -> bool:
        return self.rows_vs_single.passed and self.vs_pytorch.passed

    def to_dict(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "passed": self.passed,
            "rows_vs_single": self.rows_vs_single.to_dict(),
            "vs_pytorch": self.vs_pytorch.to_dict(),
        }


@dataclass(frozen=True)
class BatchParityResult:
    input_name: str
    batch_dim: str  # the symbolic name of input axis 0, e.g. "batch"
    atol: float
    rtol: float
    runs: tuple[BatchRunReport, ...]

    @property
    def passed(self) -> bool:
        return all(report.passed for report in self.runs)

    def to_dict(self) -> dict:
        return {
            "input": self.input_name,
            "batch_dim": self.batch_dim,
            "atol": self.atol,
            "rtol": self.rtol,
            "passed": self.passed,
            "batch_sizes": [report.to_dict() for report in self.runs],
        }


def check_dynamic_batch(model: Path | onnx.ModelProto) -> str:
    """Return the symbolic name of input axis 0; raise ExportError when the graph fixes it."""
    proto = _load(model)
    first_input = proto.graph.input[0]
    dims = first_input.type.tensor_type.shape.dim
    if len(dims) == 0:
        raise ExportError("checks.batch_axis_missing", input=first_input.name)
    axis = dims[0]
    if axis.HasField("dim_value"):
        raise ExportError("checks.batch_axis_fixed", input=first_input.name, size=axis.dim_value)
    return axis.dim_param or "?"


def check_batch_parity(
    onnx_path: Path,
    torch_model: torch.nn.Module,
    input_shape: tuple[int, ...],
    atol: float,
    rtol: float,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    seed: int = 0,
) -> BatchParityResult:
    """Run the model at several batch sizes and require every row to match its single-sample run and PyTorch.

    The known failure is an LSTM export that bakes the example batch into h0/c0 through a
    constant: the graph then rejects other batch sizes, returns the wrong number of rows, or
    mixes rows. Any of these raises ExportError with the fix. ``input_shape`` is the shape of
    one sample with its batch axis, e.g. (1, 5, 360, 52); the batch axis is replaced.
    """
    onnx_path = Path(onnx_path)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    input_name = proto.graph.input[0].name
    batch_dim = check_dynamic_batch(proto)

    session, _ = create_session(onnx_path)
    rng = np.random.default_rng(seed)
    torch_model.eval()
    reports = []
    for batch_size in batch_sizes:
        batch = rng.standard_normal((batch_size, *input_shape[1:])).astype(np.float32)
        outputs = _run_batch(session, batch, onnx_path)
        if outputs.shape[0] != batch_size:
            raise ExportError("checks.batch_rows_wrong", model=onnx_path.name, batch=batch_size, rows=outputs.shape[0])
        singles = np.concatenate([_run_batch(session, batch[row : row + 1], onnx_path) for row in range(batch_size)])
        # PyTorch runs one row at a time: a model that builds h0/c0 with batch 1 fails on a
        # whole batch in PyTorch too, yet its single-sample forecasts are the reference.
        with torch.no_grad():
            expected = np.concatenate([torch_model(torch.from_numpy(batch[row : row + 1])).numpy() for row in range(batch_size)])
        reports.append(
            BatchRunReport(
                batch_size=batch_size,
                rows_vs_single=compare(outputs, singles, atol, rtol),
                vs_pytorch=compare(outputs, expected, atol, rtol),
            )
        )

    result = BatchParityResult(input_name=input_name, batch_dim=batch_dim, atol=atol, rtol=rtol, runs=tuple(reports))
    failed = [report for report in reports if not report.passed]
    if failed:
        first = failed[0]
        raise ExportError(
            "checks.batch_rows_differ",
            model=onnx_path.name,
            sizes=", ".join(str(report.batch_size) for report in failed),
            batch=first.batch_size,
            single_max_abs=f"{first.rows_vs_single.max_abs:.3g}",
            pytorch_max_abs=f"{first.vs_pytorch.max_abs:.3g}",
            atol=f"{atol:g}",
            rtol=f"{rtol:g}",
        )
    return result


def _run_batch(session: ort.InferenceSession, batch: np.ndarray, onnx_path: Path) -> np.ndarray:
    try:
        return run(session, batch)
    except Exception as error:  # onnxruntime raises its own Fail/InvalidArgument/RuntimeException types
        raise ExportError(
            "checks.batch_run_failed",
            model=onnx_path.name,
            batch=batch.shape[0],
            detail=str(error).strip().splitlines()[0],
        ) from error


# --- training-mode nodes and determinism --------------------------------------------------


@dataclass(frozen=True)
class TrainingNodesResult:
    nodes_checked: int
    dropout_nodes: int  # Dropout nodes in inference mode, which onnxoptimizer or ORT remove

    def to_dict(self) -> dict:
        return asdict(self)


def check_no_training_nodes(model: Path | onnx.ModelProto) -> TrainingNodesResult:
    """Reject random-number operators and Dropout nodes that run in training mode.

    A Dropout node runs in training mode when its third input (``training_mode``, opset 12
    and later) is a constant or initializer that is true. Such nodes make every call return
    different values, so the EA's forecasts would not be reproducible.
    """
    proto = _load(model)
    constants = constant_values(proto.graph)
    random_nodes: list[str] = []
    training_dropouts: list[str] = []
    dropouts = 0
    nodes = list(_walk_nodes(proto.graph))
    for node in nodes:
        if node.op_type in RANDOM_OPS and node.domain in ("", "ai.onnx"):
            random_nodes.append(_node_label(node))
        elif node.op_type == "Dropout" and node.domain in ("", "ai.onnx"):
            if _dropout_in_training(node, constants):
                training_dropouts.append(_node_label(node))
            else:
                dropouts += 1
    if random_nodes:
        raise ExportError("checks.random_ops", nodes=", ".join(random_nodes))
    if training_dropouts:
        raise ExportError("checks.dropout_training", nodes=", ".join(training_dropouts))
    return TrainingNodesResult(nodes_checked=len(nodes), dropout_nodes=dropouts)


def _dropout_in_training(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> bool:
    if len(node.input) < 3 or not node.input[2]:
        return False
    value = constants.get(node.input[2])
    return value is not None and bool(np.any(value))


@dataclass(frozen=True)
class DeterminismResult:
    runs: int
    identical: bool
    max_abs: float

    def to_dict(self) -> dict:
        return asdict(self)


def check_deterministic(onnx_path: Path, sample: np.ndarray) -> DeterminismResult:
    """Run ``sample`` twice in one session and require bit-identical outputs."""
    session, _ = create_session(Path(onnx_path))
    first = run(session, sample)
    second = run(session, sample)
    identical = bool(np.array_equal(first, second))
    max_abs = float(np.max(np.abs(first.astype(np.float64) - second.astype(np.float64)), initial=0.0))
    if not identical:
        raise ExportError("checks.not_deterministic", model=Path(onnx_path).name, max_abs=f"{max_abs:.3g}")
    return DeterminismResult(runs=2, identical=True, max_abs=max_abs)


# --- ONNX Runtime optimization levels -----------------------------------------------------


@dataclass(frozen=True)
class OptimizationLevelsResult:
    reference_level: str
    compared_level: str
    parity: ParityReport

    def to_dict(self) -> dict:
        return {"reference_level": self.reference_level, "compared_level": self.compared_level, **self.parity.to_dict()}


def check_optimization_levels(onnx_path: Path, sample: np.ndarray, atol: float, rtol: float) -> OptimizationLevelsResult:
    """Compare outputs with ORT's graph optimizations on (``ORT_ENABLE_ALL``) and off.

    The terminal chooses its own optimization level, so the forecast must not depend on it.
    A difference is a failed validation gate (GateFailed), because the accuracy measured at
    one level would not hold at the other.
    """
    onnx_path = Path(onnx_path)
    optimized_session, _ = create_session(onnx_path, graph_optimization="ORT_ENABLE_ALL")
    plain_session, _ = create_session(onnx_path, graph_optimization="ORT_DISABLE_ALL")
    parity = compare(run(optimized_session, sample), run(plain_session, sample), atol, rtol)
    if not parity.passed:
        raise GateFailed("checks.optimization_levels_differ", model=onnx_path.name, detail=parity.describe())
    return OptimizationLevelsResult(reference_level="ORT_DISABLE_ALL", compared_level="ORT_ENABLE_ALL", parity=parity)


# --- recurrent layer layout ---------------------------------------------------------------


@dataclass(frozen=True)
class RnnLayoutResult:
    rnn_nodes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {"rnn_nodes": list(self.rnn_nodes)}


def check_rnn_layout(model: Path | onnx.ModelProto) -> RnnLayoutResult:
    """Reject LSTM, GRU and RNN nodes with ``layout=1`` (batch-first tensors).

    ONNX Runtime's CPU kernels implement only ``layout=0`` and fail to load such a node
    (checked with onnxruntime 1.15.0 and 1.31.1).
    """
    proto = _load(model)
    rnn_nodes = []
    batch_first = []
    for node in _walk_nodes(proto.graph):
        if node.op_type not in RNN_OPS or node.domain not in ("", "ai.onnx"):
            continue
        rnn_nodes.append(node.name or node.output[0])
        layout = next((attribute.i for attribute in node.attribute if attribute.name == "layout"), 0)
        if layout != 0:
            batch_first.append(_node_label(node))
    if batch_first:
        raise ExportError("checks.rnn_layout", nodes=", ".join(batch_first))
    return RnnLayoutResult(rnn_nodes=tuple(rnn_nodes))


__all__ = [
    "BatchParityResult",
    "BatchRunReport",
    "DeterminismResult",
    "OptimizationLevelsResult",
    "RnnLayoutResult",
    "TrainingNodesResult",
    "check_batch_parity",
    "check_deterministic",
    "check_dynamic_batch",
    "check_no_training_nodes",
    "check_optimization_levels",
    "check_rnn_layout",
    "constant_values",
]
