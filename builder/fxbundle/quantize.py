"""INT8 variants of the optimized FP32 model, made with onnxruntime.quantization.

Dynamic quantization turns each LSTM into the contrib operator ``com.microsoft:
DynamicQuantizeLSTM``. Whether MetaTrader 5's ONNX Runtime loads it is unverified, so such a
variant is marked and :func:`allowed_in_target` keeps it out of bundles unless the target
profile allows contrib ops. Static QDQ quantization uses standard ONNX ops only, but ONNX
Runtime's QDQ quantizer does not support LSTM, so the LSTMs stay float32 and only the dense
head (Gemm/MatMul) becomes INT8.

Both start with ``quant_pre_process`` (shape inference and ONNX Runtime's basic graph
optimizations), as ONNX Runtime recommends before quantizing.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import platform
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from fxbundle.errors import ExportError, FxBundleError
from fxbundle.export import check_model, downgrade_ir_version, save_single_file
from fxbundle.precision import Notice, VariantResult, contrib_ops, ensure_unique_node_names
from fxbundle.sessions import create_session

logger = logging.getLogger(__name__)

CalibrationMethodName = Literal["MinMax", "Entropy", "Percentile"]
CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile")

STATUS_CONTRIB = "contrib op, unverified in terminal"
STATUS_STANDARD = "standard ONNX ops"

# Flags in /proc/cpuinfo of x86 CPUs with 8-bit dot-product instructions. On SSE4.1, AVX2 and
# AVX-512 CPUs without them, ONNX Runtime's U8S8 matrix multiplication can overflow when weights
# fall outside [-64, 63] (onnxruntime change "x86/64 U8S8 Gemm Precision Fix"). reduce_range
# quantizes weights to 7 bits, which keeps them inside that range.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})
VNNI_FLAG_PREFIXES = ("amx",)
X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})

# Ops that carry the dense head's weights. Quantizing more op types only adds Q/DQ pairs
# around data movement (Gather, Concat, Transpose) in front of float32 LSTMs, which clips
# their inputs to the calibration range and saves no size.
DEFAULT_STATIC_OP_TYPES = ("Gemm", "MatMul")

# Nodes between a weight-carrying node and a graph output that may be passed through when
# looking for the nodes that must stay float so the output is not quantized.
MAX_OUTPUT_PATH_NODES = 8


@dataclass(frozen=True)
class QuantizedVariant:
    """An INT8 model file and how it was made.

    ``activation_type`` and ``weight_type`` name onnxruntime.quantization QuantType values.
    ``method`` is the calibration method (None for dynamic quantization); ``excluded_nodes``
    are the nodes left in float32 so that no graph output passes through QuantizeLinear.
    """

    precision: Literal["int8-dynamic", "int8-static"]
    path: Path
    size_bytes: int
    contrib_ops: list[str]
    status: str
    warnings: list[Notice]
    reduce_range: bool
    method: str | None
    weight_type: str
    activation_type: str
    per_channel: bool
    op_types: dict[str, int] = field(default_factory=dict)
    excluded_nodes: list[str] = field(default_factory=list)
    calibration_windows: int = 0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        data["warnings"] = [notice.render("en") for notice in self.warnings]
        return data


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def _cpu_flags(cpuinfo_text: str) -> set[str] | None:
    """Return the flags of the first x86 ``flags`` line, or None when there is none."""
    for line in cpuinfo_text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return set(value.split())
    return None


def cpu_has_vnni(cpuinfo_text: str | None = None) -> bool:
    """Return whether the CPU described by ``cpuinfo_text`` (default: /proc/cpuinfo) has VNNI or AMX."""
    flags = _cpu_flags(_read_cpuinfo() if cpuinfo_text is None else cpuinfo_text) or set()
    return bool(flags & VNNI_FLAGS) or any(flag.startswith(VNNI_FLAG_PREFIXES) for flag in flags)


def default_reduce_range(cpuinfo_text: str | None = None, machine: str | None = None) -> bool:
    """Return True on an x86 CPU without VNNI, where 8-bit weights can saturate.

    A ``flags`` line in cpuinfo marks an x86 CPU on Linux. Without cpuinfo, for example on
    Windows, ``machine`` (default ``platform.machine()``) decides, and VNNI counts as absent.
    NOTE: this describes the build machine. The model runs on the trader's CPU, which may differ.
    """
    text = _read_cpuinfo() if cpuinfo_text is None else cpuinfo_text
    flags = _cpu_flags(text)
    if flags is not None:
        return not cpu_has_vnni(text)
    if text.strip():
        return False  # cpuinfo without x86 flags: an ARM or other non-x86 CPU
    return (machine or platform.machine()).lower() in X86_MACHINES


def allowed_in_target(variant: QuantizedVariant | VariantResult, allow_contrib_ops: bool) -> bool:
    """Return whether ``variant`` may go into a bundle for a target with this contrib-op setting."""
    return allow_contrib_ops or not variant.contrib_ops


def quantize_dynamic_int8(
    source: Path,
    out_path: Path,
    *,
    reduce_range: bool | None = None,
    per_channel: bool = False,
    max_ir_version: int = 8,
) -> QuantizedVariant:
    """Quantize weights to INT8 ahead of time and activations at run time.

    Weights are QInt8. ONNX Runtime's LSTM quantizer stores LSTM weights as int8 whatever
    ``weight_type`` is set to, so QInt8 keeps MatMul weights consistent with them.
    Activations are always uint8 in dynamic quantization (DynamicQuantizeLinear), which makes
    U8S8, the combination ONNX Runtime's x86 kernels are built for. ``reduce_range=None``
    chooses :func:`default_reduce_range`.
    """
    reduce_range = default_reduce_range() if reduce_range is None else reduce_range
    precision = "int8-dynamic"
    with tempfile.TemporaryDirectory(prefix="fxbundle-int8-") as scratch:
        prepared = _pre_process(source, Path(scratch), precision)
        raw_path = Path(scratch) / "quantized.onnx"
        try:
            quantize_dynamic(
                prepared,
                raw_path,
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                reduce_range=reduce_range,
            )
        except Exception as error:  # the quantizer raises many exception types
            raise ExportError("int8.failed", precision=precision, stage="quantize_dynamic", detail=_first_line(error)) from error
        model = _finalize(raw_path, out_path, max_ir_version)

    contrib = contrib_ops(model)
    notices = []
    if contrib:
        notices.append(Notice("int8.contrib_unverified", {"precision": precision, "ops": ", ".join(contrib)}))
    notices.append(Notice("int8.cpu_dependent", {"reduce_range": reduce_range, "vnni": cpu_has_vnni()}))
    return QuantizedVariant(
        precision=precision,
        path=out_path,
        size_bytes=out_path.stat().st_size,
        contrib_ops=contrib,
        status=STATUS_CONTRIB if contrib else STATUS_STANDARD,
        warnings=notices,
        reduce_range=reduce_range,
        method=None,
        weight_type="QInt8",
        activation_type="QUInt8",
        per_channel=per_channel,
        op_types=op_type_counts(model),
    )


def quantize_static_qdq(
    source: Path,
    out_path: Path,
    calibration_batches: Iterable[np.ndarray],
    method: CalibrationMethodName = "MinMax",
    *,
    per_channel: bool = False,
    reduce_range: bool | None = None,
    op_types_to_quantize: Iterable[str] = DEFAULT_STATIC_OP_TYPES,
    max_ir_version: int = 8,
) -> QuantizedVariant:
    """Quantize to INT8 in QDQ format with ranges calibrated on ``calibration_batches``.

    Each batch is a float32 array (n, *input dims); windows are fed to the calibrator one at a
    time. Activations are QUInt8 and weights QInt8 (U8S8, the combination ONNX Runtime's x86
    kernels are built for). The nodes that produce graph outputs stay float32, so forecasts
    beyond the calibration range are not clipped; the written model is checked for that.
    """
    precision = "int8-static"
    if method not in CALIBRATION_METHODS:
        raise ExportError("int8.bad_method", method=method, allowed=", ".join(CALIBRATION_METHODS))
    reduce_range = default_reduce_range() if reduce_range is None else reduce_range
    op_types = list(op_types_to_quantize)

    with tempfile.TemporaryDirectory(prefix="fxbundle-int8-") as scratch:
        prepared = _pre_process(source, Path(scratch), precision)
        prepared_model = onnx.load(str(prepared))
        ensure_unique_node_names(prepared_model.graph)
        onnx.save_model(prepared_model, str(prepared))
        excluded = output_path_nodes(prepared_model.graph, op_types)

        reader = WindowReader(calibration_batches, prepared_model.graph)
        raw_path = Path(scratch) / "quantized.onnx"
        # The calibrators print progress to stdout; it goes to the debug log instead.
        progress = io.StringIO()
        try:
            with contextlib.redirect_stdout(progress):
                quantize_static(
                    prepared,
                    raw_path,
                    reader,
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=op_types,
                    per_channel=per_channel,
                    reduce_range=reduce_range,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded,
                    calibrate_method=getattr(CalibrationMethod, method),
                )
        except FxBundleError:
            raise  # a bad calibration batch, raised from inside the calibrator
        except Exception as error:  # the quantizer and calibrators raise many exception types
            raise ExportError("int8.failed", precision=precision, stage=f"quantize_static ({method})", detail=_first_line(error)) from error
        finally:
            if progress.getvalue():
                logger.debug("calibration output:\n%s", progress.getvalue().rstrip())
        model = _finalize(raw_path, out_path, max_ir_version)

    quantized_outputs = quantized_graph_outputs(model.graph)
    if quantized_outputs:
        out_path.unlink(missing_ok=True)
        raise ExportError("int8.output_quantized", outputs=", ".join(quantized_outputs))

    counts = op_type_counts(model)
    contrib = contrib_ops(model)
    notices = [Notice("int8.cpu_dependent", {"reduce_range": reduce_range, "vnni": cpu_has_vnni()})]
    if counts.get("LSTM", 0):
        notices.append(Notice("int8.static_lstm_float", {"count": counts["LSTM"], "ops": ", ".join(op_types)}))
    if contrib:
        notices.append(Notice("int8.contrib_unverified", {"precision": precision, "ops": ", ".join(contrib)}))
    return QuantizedVariant(
        precision=precision,
        path=out_path,
        size_bytes=out_path.stat().st_size,
        contrib_ops=contrib,
        status=STATUS_CONTRIB if contrib else STATUS_STANDARD,
        warnings=notices,
        reduce_range=reduce_range,
        method=method,
        weight_type="QInt8",
        activation_type="QUInt8",
        per_channel=per_channel,
        op_types=counts,
        excluded_nodes=excluded,
        calibration_windows=reader.windows,
    )


class WindowReader(CalibrationDataReader):
    """Feed calibration windows one at a time (batch 1) from an iterable of float32 batches.

    The iterable is read lazily, once. Each batch is checked against the model input's static
    dimensions, and an empty iterable raises ExportError before calibration starts.
    """

    def __init__(self, batches: Iterable[np.ndarray], graph: onnx.GraphProto) -> None:
        initializers = {initializer.name for initializer in graph.initializer}
        model_input = next(info for info in graph.input if info.name not in initializers)
        self.input_name = model_input.name
        self.trailing_dims = tuple(dim.dim_value for dim in model_input.type.tensor_type.shape.dim[1:])
        self.windows = 0

        iterator = iter(batches)
        first = next(iterator, None)
        if first is None:
            raise ExportError("int8.no_calibration_data")
        self._windows = self._split(itertools.chain([first], iterator))

    def _split(self, batches: Iterator[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for index, batch in enumerate(batches):
            self._check(index, batch)
            for row in range(batch.shape[0]):
                self.windows += 1
                yield {self.input_name: np.ascontiguousarray(batch[row : row + 1])}

    def _check(self, index: int, batch: np.ndarray) -> None:
        shape = getattr(batch, "shape", None)
        dtype = getattr(batch, "dtype", type(batch).__name__)
        valid = (
            isinstance(batch, np.ndarray)
            and batch.dtype == np.float32
            and batch.ndim == len(self.trailing_dims) + 1
            and all(expected in (0, found) for expected, found in zip(self.trailing_dims, batch.shape[1:]))
        )
        if not valid:
            expected = ", ".join(str(dim) if dim else "?" for dim in self.trailing_dims)
            raise ExportError("int8.bad_calibration_batch", index=index, shape=shape, dtype=dtype, expected=expected)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._windows, None)


def output_path_nodes(graph: onnx.GraphProto, op_types_to_quantize: Iterable[str]) -> list[str]:
    """Return the nodes from each graph output back to the nearest node of a quantized op type.

    Leaving them out of quantization keeps every graph output float32 without a Q/DQ pair, so
    values beyond the calibration range pass through. The walk follows each node's first
    input that is not an initializer, for at most ``MAX_OUTPUT_PATH_NODES`` nodes.
    """
    quantized_types = set(op_types_to_quantize)
    initializers = {initializer.name for initializer in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    excluded: list[str] = []
    for output in graph.output:
        node = producers.get(output.name)
        for _ in range(MAX_OUTPUT_PATH_NODES):
            if node is None:
                break
            if node.name not in excluded:
                excluded.append(node.name)
            if node.op_type in quantized_types:
                break
            activation = next((name for name in node.input if name and name not in initializers), None)
            node = producers.get(activation) if activation else None
    return excluded


def quantized_graph_outputs(graph: onnx.GraphProto) -> list[str]:
    """Return the graph outputs that a DequantizeLinear produces, directly or through the output path.

    The path is the one :func:`output_path_nodes` excludes; a DequantizeLinear on it means the
    output went through a QuantizeLinear with the calibration range.
    """
    initializers = {initializer.name for initializer in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    weight_ops = set(DEFAULT_STATIC_OP_TYPES) | {"MatMulInteger", "QLinearMatMul", "QGemm", "Conv"}
    quantized: list[str] = []
    for output in graph.output:
        node = producers.get(output.name)
        for _ in range(MAX_OUTPUT_PATH_NODES):
            if node is None or node.op_type in weight_ops:
                break
            if node.op_type == "DequantizeLinear":
                quantized.append(output.name)
                break
            activation = next((name for name in node.input if name and name not in initializers), None)
            node = producers.get(activation) if activation else None
    return quantized


def op_type_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Count nodes by op type; ops outside the default domain are keyed ``domain:op_type``."""
    counts = Counter(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}" for node in model.graph.node)
    return dict(sorted(counts.items()))


def _pre_process(source: Path, scratch: Path, precision: str) -> Path:
    prepared = scratch / "prepared.onnx"
    try:
        quant_pre_process(str(source), str(prepared))
    except Exception as error:  # symbolic shape inference and the optimizer raise many types
        raise ExportError("int8.failed", precision=precision, stage="quant_pre_process", detail=_first_line(error)) from error
    return prepared


def _finalize(raw_path: Path, out_path: Path, max_ir_version: int) -> onnx.ModelProto:
    """Drop unused opset imports, cap the IR version, write one file, check it and load it.

    ``quant_pre_process`` saves the model through ONNX Runtime, which imports every domain it
    implements (ai.onnx.ml 5, com.microsoft.nchwc and others). An older runtime may reject an
    opset version newer than its own, even when no node uses that domain.
    """
    model = onnx.load(str(raw_path))
    used_domains = {node.domain for node in model.graph.node} | {""}
    kept = [entry for entry in model.opset_import if entry.domain in used_domains or entry.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    if model.ir_version > max_ir_version:
        model = downgrade_ir_version(model, max_ir_version)
    model.producer_name = "fxbundle"

    save_single_file(model, out_path)
    try:
        check_model(out_path)
        create_session(out_path)
    except Exception:
        out_path.unlink(missing_ok=True)
        raise
    return model


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
