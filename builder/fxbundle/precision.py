"""FP16 variant of the optimized FP32 model, made with onnxconverter-common.

The converter (checked against onnxconverter-common 1.16.0) has three defects this module
works around:

* It silently clamps weights outside float16's safe range: |v| > max_finite_val becomes
  ±max_finite_val and 0 < |v| < min_positive_val becomes ±min_positive_val. The values are
  found before conversion, and their consumers stay in float32 or the conversion fails.
* Since 1.15 it marks the output of an existing ``Cast(to=FLOAT)`` as float16 without changing
  ``to``, and ONNX Runtime then rejects the model with a type error. Such Casts are repaired.
* With ``keep_io_types=True``, a node in ``node_block_list`` that writes a graph output turns
  that output into float16. Such outputs are set back to float32.

Its ``DEFAULT_OP_BLOCK_LIST`` does not contain LSTM, so LSTM weights are stored in float16.
ONNX Runtime's CPU execution provider has no float16 LSTM kernel: at load time it inserts
Casts and runs LSTM in float32, so on CPU the FP16 variant only reduces the file size.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxconverter_common import float16

from fxbundle.config import FP16Settings
from fxbundle.errors import ExportError
from fxbundle.export import check_model, save_single_file
from fxbundle.i18n import translate
from fxbundle.sessions import create_session

logger = logging.getLogger(__name__)

OutOfRangePolicy = Literal["keep_fp32", "fail"]
OUT_OF_RANGE_POLICIES = ("keep_fp32", "fail")

# The converter's own defaults: float16 represents up to 65504, and its smallest subnormal is
# about 6e-8, so the converter keeps a margin on both sides.
DEFAULT_MAX_FINITE_VAL = 1e4
DEFAULT_MIN_POSITIVE_VAL = 1e-7

# Number of tensors named in a message before the rest are only counted.
MAX_TENSORS_IN_MESSAGE = 10


@dataclass(frozen=True)
class Notice:
    """A catalog message (key and parameters) that any caller can render in its own language."""

    key: str
    params: dict[str, object] = field(default_factory=dict)

    def render(self, lang: str | None = None) -> str:
        return translate(self.key, lang, **self.params)

    def __str__(self) -> str:
        return self.render()


@dataclass(frozen=True)
class OutOfRangeTensor:
    """An initializer or Constant whose float32 values the FP16 converter would clamp.

    ``min`` and ``max`` are taken over the out-of-range elements only.
    """

    name: str
    source: Literal["initializer", "constant"]
    count: int
    min: float
    max: float
    consumers: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.name} (count={self.count}, min={self.min:.3g}, max={self.max:.3g})"


@dataclass(frozen=True)
class VariantResult:
    """A reduced-precision model file and what the conversion did to reach it.

    ``cpu_fp32_ops`` lists the op types that run in float32 on the CPU execution provider:
    those ONNX Runtime wraps in Casts because it has no float16 kernel, and those kept in
    float32 on purpose (``blocked_nodes``).
    """

    precision: str
    path: Path
    size_bytes: int
    cast_nodes: int
    contrib_ops: list[str] = field(default_factory=list)
    out_of_range: list[OutOfRangeTensor] = field(default_factory=list)
    blocked_nodes: list[str] = field(default_factory=list)
    repaired_casts: int = 0
    restored_outputs: list[str] = field(default_factory=list)
    cpu_fp32_ops: list[str] = field(default_factory=list)
    note: Notice | None = None
    warnings: list[Notice] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        data["note"] = self.note.render("en") if self.note else None
        data["warnings"] = [notice.render("en") for notice in self.warnings]
        return data


def make_fp16(
    source: Path,
    out_path: Path,
    settings: FP16Settings,
    *,
    on_out_of_range: OutOfRangePolicy = "keep_fp32",
    max_finite_val: float = DEFAULT_MAX_FINITE_VAL,
    min_positive_val: float = DEFAULT_MIN_POSITIVE_VAL,
) -> VariantResult:
    """Convert weights and activations to float16 and write a checked model that ONNX Runtime loads.

    MQL5 has no float16 type, so a model for MetaTrader must keep float32 graph inputs and
    outputs (``settings.keep_io_types``). Values beyond the converter's limits either keep
    their consuming nodes in float32 (``on_out_of_range="keep_fp32"``) or raise ExportError
    (``"fail"``).
    """
    if on_out_of_range not in OUT_OF_RANGE_POLICIES:
        raise ValueError(f"on_out_of_range must be one of {OUT_OF_RANGE_POLICIES}, not {on_out_of_range!r}")

    model = onnx.load(str(source))
    original_float_io = _float32_io_names(model.graph)
    ensure_unique_node_names(model.graph)
    out_of_range = find_out_of_range(model.graph, max_finite_val, min_positive_val)

    if out_of_range and on_out_of_range == "fail":
        raise ExportError(
            "fp16.out_of_range",
            count=len(out_of_range),
            tensors=describe_tensors(out_of_range),
            max_finite=f"{max_finite_val:g}",
            min_positive=f"{min_positive_val:g}",
        )
    hoist_out_of_range_constants(model.graph, max_finite_val, min_positive_val)
    blocked = sorted({name for tensor in out_of_range for name in tensor.consumers})

    converted = _convert(model, settings.keep_io_types, blocked, max_finite_val, min_positive_val)
    repaired = repair_cast_types(converted.graph)
    restored = restore_float32_outputs(converted.graph, original_float_io) if settings.keep_io_types else []
    if settings.keep_io_types:
        _check_float32_io(converted.graph, original_float_io)

    save_single_file(converted, out_path)
    try:
        check_model(out_path)
        create_session(out_path)
        cpu_ops = cpu_fp32_op_types(out_path)
    except Exception:
        out_path.unlink(missing_ok=True)
        raise

    blocked_names = set(blocked)
    blocked_types = {node.op_type for node in converted.graph.node if node.name in blocked_names}
    cpu_fp32_ops = sorted(set(cpu_ops) | blocked_types)
    notices = _conversion_notices(out_of_range, len(blocked), repaired, restored)
    for notice in notices:
        logger.debug(notice.render("en"))
    if cpu_fp32_ops:
        note = Notice("fp16.cpu_size_only", {"ops": ", ".join(cpu_fp32_ops)})
    else:
        note = Notice("fp16.cpu_all_float16", {})

    return VariantResult(
        precision="fp16",
        path=out_path,
        size_bytes=out_path.stat().st_size,
        cast_nodes=Counter(node.op_type for node in converted.graph.node)["Cast"],
        contrib_ops=contrib_ops(converted),
        out_of_range=out_of_range,
        blocked_nodes=blocked,
        repaired_casts=repaired,
        restored_outputs=restored,
        cpu_fp32_ops=cpu_fp32_ops,
        note=note,
        warnings=notices,
    )


def _conversion_notices(out_of_range: list[OutOfRangeTensor], blocked_count: int, repaired: int, restored: list[str]) -> list[Notice]:
    notices: list[Notice] = []
    if out_of_range:
        params = {"count": len(out_of_range), "tensors": describe_tensors(out_of_range), "nodes": blocked_count}
        notices.append(Notice("fp16.out_of_range_kept", params))
    if repaired:
        notices.append(Notice("fp16.casts_repaired", {"count": repaired}))
    if restored:
        notices.append(Notice("fp16.outputs_restored", {"outputs": ", ".join(restored)}))
    return notices


def _convert(
    model: onnx.ModelProto, keep_io_types: bool, blocked: list[str], max_finite_val: float, min_positive_val: float
) -> onnx.ModelProto:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", category=UserWarning)
            converted = float16.convert_float_to_float16(
                model,
                min_positive_val=min_positive_val,
                max_finite_val=max_finite_val,
                keep_io_types=keep_io_types,
                node_block_list=blocked,
            )
    except Exception as error:  # the converter raises bare exceptions on unsupported graphs
        raise ExportError("precision.fp16_failed", detail=str(error).strip().splitlines()[0]) from error
    # The converter also warns for values exactly at a limit, which it does not change.
    for warning in caught:
        logger.debug("float16 converter: %s", warning.message)
    return converted


def ensure_unique_node_names(graph: onnx.GraphProto) -> int:
    """Give every unnamed or duplicate-named node of the top-level graph a unique name.

    ``node_block_list`` and ``nodes_to_exclude`` select nodes by name, and the converter
    derives the names of the Casts it inserts from node names. Returns the number renamed.
    """
    used = {node.name for node in graph.node if node.name}
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        candidate = f"{node.op_type}_fxbundle_{index}"
        while candidate in used or candidate in seen:
            candidate += "_"
        node.name = candidate
        seen.add(candidate)
        renamed += 1
    return renamed


def _out_of_range_mask(values: np.ndarray, max_finite_val: float, min_positive_val: float) -> np.ndarray:
    magnitude = np.abs(values.astype(np.float64))
    # NaN compares false everywhere, and the converter keeps NaN unchanged.
    return (magnitude > max_finite_val) | ((magnitude > 0) & (magnitude < min_positive_val))


def _constant_values(node: onnx.NodeProto) -> np.ndarray | None:
    """Return the float32 value of a Constant node, or None when its value has another type."""
    for attribute in node.attribute:
        if attribute.name == "value" and attribute.t.data_type == onnx.TensorProto.FLOAT:
            return numpy_helper.to_array(attribute.t)
        if attribute.name == "value_float":
            return np.array(attribute.f, dtype=np.float32)
        if attribute.name == "value_floats":
            return np.array(attribute.floats, dtype=np.float32)
    return None


def hoist_out_of_range_constants(graph: onnx.GraphProto, max_finite_val: float, min_positive_val: float) -> list[str]:
    """Turn Constant nodes that contain out-of-range float values into initializers of the same name.

    The converter keeps the initializers of blocked nodes in float32, but a blocked Constant
    node still gets a float16 Cast after it. Returns the names of the hoisted tensors.
    """
    hoisted: list[str] = []
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        values = _constant_values(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if values is None or not _out_of_range_mask(values, max_finite_val, min_positive_val).any():
            kept.append(node)
            continue
        graph.initializer.append(numpy_helper.from_array(values.astype(np.float32), node.output[0]))
        hoisted.append(node.output[0])

    if hoisted:
        del graph.node[:]
        graph.node.extend(kept)
        stale = [info for info in graph.value_info if info.name in set(hoisted)]
        for info in stale:
            graph.value_info.remove(info)
    return hoisted


def find_out_of_range(graph: onnx.GraphProto, max_finite_val: float, min_positive_val: float) -> list[OutOfRangeTensor]:
    """List the float32 initializers and Constant nodes with values the converter would clamp.

    NOTE: only the top-level graph is scanned; weights inside If or Loop subgraphs are not.
    """
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)

    candidates: list[tuple[str, Literal["initializer", "constant"], np.ndarray]] = []
    for initializer in graph.initializer:
        if initializer.data_type == onnx.TensorProto.FLOAT:
            candidates.append((initializer.name, "initializer", numpy_helper.to_array(initializer)))
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            values = _constant_values(node)
            if values is not None:
                candidates.append((node.output[0], "constant", values))

    found: list[OutOfRangeTensor] = []
    for name, source, values in candidates:
        mask = _out_of_range_mask(values, max_finite_val, min_positive_val)
        if not mask.any():
            continue
        offending = values[mask]
        found.append(
            OutOfRangeTensor(
                name=name,
                source=source,
                count=int(mask.sum()),
                min=float(offending.min()),
                max=float(offending.max()),
                consumers=tuple(consumers.get(name, ())),
            )
        )
    return found


def describe_tensors(tensors: list[OutOfRangeTensor]) -> str:
    shown = ", ".join(tensor.describe() for tensor in tensors[:MAX_TENSORS_IN_MESSAGE])
    hidden = len(tensors) - MAX_TENSORS_IN_MESSAGE
    return f"{shown}, +{hidden}" if hidden > 0 else shown


def _declared_types(graph: onnx.GraphProto) -> dict[str, int]:
    declared = {}
    for info in list(graph.value_info) + list(graph.output):
        elem_type = info.type.tensor_type.elem_type
        if elem_type != onnx.TensorProto.UNDEFINED:
            declared[info.name] = elem_type
    return declared


def repair_cast_types(graph: onnx.GraphProto) -> int:
    """Set ``to`` of each float/float16 Cast to the type declared for its output; return the count.

    The converter changes the declared type of a Cast's output without changing ``to``, which
    ONNX Runtime rejects when it loads the model. The declared type is the one the Cast's
    consumers were converted for, so it is the one to keep.
    """
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    declared = _declared_types(graph)
    repaired = 0
    for node in graph.node:
        if node.op_type != "Cast":
            continue
        target = declared.get(node.output[0])
        attribute = next((a for a in node.attribute if a.name == "to"), None)
        if attribute is None or target is None:
            continue
        if attribute.i in float_types and target in float_types and attribute.i != target:
            logger.debug("Cast %s: to=%d but output %s is declared %d; repaired", node.name, attribute.i, node.output[0], target)
            attribute.i = target
            repaired += 1
    return repaired


def _float32_io_names(graph: onnx.GraphProto) -> set[str]:
    return {
        info.name
        for info in list(graph.input) + list(graph.output)
        if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    }


def restore_float32_outputs(graph: onnx.GraphProto, float32_names: set[str]) -> list[str]:
    """Make graph outputs that were float32 before conversion float32 again; return their names.

    When the producer is a converter Cast to float16 of a float32 tensor (a blocked node's
    output), that Cast is turned into a float32 Cast so no precision is lost. Otherwise a Cast
    to float32 is appended.
    """
    declared = _declared_types(graph)
    producers = {output: node for node in graph.node for output in node.output}
    restored: list[str] = []
    for output in graph.output:
        tensor_type = output.type.tensor_type
        if output.name not in float32_names or tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            continue
        producer = producers.get(output.name)
        to_attribute = next((a for a in producer.attribute if a.name == "to"), None) if producer is not None else None
        if producer is not None and producer.op_type == "Cast" and to_attribute is not None and declared.get(producer.input[0]) == onnx.TensorProto.FLOAT:
            to_attribute.i = onnx.TensorProto.FLOAT
        else:
            float16_name = f"{output.name}_float16"
            for node in graph.node:
                for index, name in enumerate(node.output):
                    if name == output.name:
                        node.output[index] = float16_name
            for node in graph.node:
                for index, name in enumerate(node.input):
                    if name == output.name:
                        node.input[index] = float16_name
            info = graph.value_info.add()
            info.CopyFrom(output)
            info.name = float16_name
            graph.node.append(onnx.helper.make_node("Cast", [float16_name], [output.name], name=f"{output.name}_cast_to_float32", to=onnx.TensorProto.FLOAT))
        tensor_type.elem_type = onnx.TensorProto.FLOAT
        restored.append(output.name)
    return restored


def _check_float32_io(graph: onnx.GraphProto, float32_names: set[str]) -> None:
    changed = sorted(
        info.name
        for info in list(graph.input) + list(graph.output)
        if info.name in float32_names and info.type.tensor_type.elem_type != onnx.TensorProto.FLOAT
    )
    if changed:
        raise ExportError("fp16.io_not_float32", names=", ".join(changed))


def contrib_ops(model: onnx.ModelProto) -> list[str]:
    """Return the sorted ``domain:op_type`` names of nodes outside the default ONNX domain."""
    return sorted({f"{node.domain}:{node.op_type}" for node in model.graph.node if node.domain not in ("", "ai.onnx")})


def cpu_fp32_op_types(path: Path) -> list[str]:
    """Return the op types that ONNX Runtime's CPU execution provider runs in float32 behind Casts.

    ONNX Runtime inserts a Cast to float32 in front of each node that has no float16 kernel.
    The graph it prepares is saved with optimizations off, so its node names match ``path``.
    A node that reads the output of a new Cast to float32 runs in float32.
    """
    original_names = {node.name for node in onnx.load(str(path), load_external_data=False).graph.node}
    with tempfile.TemporaryDirectory(prefix="fxbundle-fp16-") as scratch:
        prepared_path = Path(scratch) / "prepared.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.optimized_model_filepath = str(prepared_path)
        options.log_severity_level = 3
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        prepared = onnx.load(str(prepared_path), load_external_data=False)

    inserted_float32 = {
        node.output[0]
        for node in prepared.graph.node
        if node.op_type == "Cast"
        and node.name not in original_names
        and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in node.attribute)
    }
    return sorted(
        {
            node.op_type
            for node in prepared.graph.node
            if node.op_type != "Cast" and any(name in inserted_float32 for name in node.input)
        }
    )
