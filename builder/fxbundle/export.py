"""Export a checkpoint's model to ONE ONNX file that the target runtime can load."""

from __future__ import annotations

import importlib.util
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import onnx
import torch
from onnx import external_data_helper

from fxbundle.config import ExportSettings, TargetProfile
from fxbundle.errors import ExportError
from fxbundle.graph_checks import check_dynamic_batch, check_rnn_layout

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "output"


# torch.export specializes an axis whose example size is 1, and torch.onnx (checked with torch
# 2.13) then applies the suggested fix without an error: the graph gets a fixed batch of 1.
# An example batch of 2 keeps the batch axis symbolic.
DYNAMO_EXAMPLE_BATCH = 2


@dataclass(frozen=True)
class ExportResult:
    path: Path
    exporter: str
    opset: int
    ir_version: int
    ir_version_original: int
    external_data_inlined: bool
    size_bytes: int
    seconds: float = 0.0  # wall time of the exporter call alone


def export_onnx(model: torch.nn.Module, input_shape: tuple[int, ...], out_path: Path, settings: ExportSettings) -> ExportResult:
    """Export ``model`` in eval mode with a dynamic batch axis and write a single checked file.

    The file has at most ``settings.opset`` and IR version ``settings.max_ir_version``. It has
    no external data, a symbolic batch axis on the input and no batch-first recurrent nodes.
    Otherwise ExportError names the problem.
    """
    model.eval()
    example_batch = DYNAMO_EXAMPLE_BATCH if settings.exporter == "dynamo" else input_shape[0]
    sample = torch.zeros((example_batch, *input_shape[1:]), dtype=torch.float32)

    with tempfile.TemporaryDirectory(prefix="fxbundle-export-") as scratch:
        raw_path = Path(scratch) / "model.onnx"
        started = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # The TorchScript exporter warns that it is deprecated on every call.
                warnings.simplefilter("ignore", category=DeprecationWarning)
                warnings.simplefilter("ignore", category=FutureWarning)
                # Tracing the LSTM's own shape checks is harmless: they compare static sizes.
                warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
                # The exporter warns about LSTM batch sizes whenever the batch axis is dynamic;
                # batch parity is verified on the exported model instead.
                warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
                # torch.export warns that nn.LSTM assigns _flat_weights while it is traced. The
                # weights still end up in the graph as initializers.
                warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
                _run_exporter(model, sample, raw_path, settings)
        except ExportError:
            raise
        except Exception as error:  # exporters fail with many exception types
            raise ExportError("export.failed", exporter=settings.exporter, detail=str(error).strip().splitlines()[0]) from error
        seconds = time.perf_counter() - started
        proto, external = load_inlined(raw_path)

    original_ir = proto.ir_version
    if proto.ir_version > settings.max_ir_version:
        proto = downgrade_ir_version(proto, settings.max_ir_version)
    opset = opset_of(proto)
    if opset > settings.opset:
        raise ExportError("checks.opset_too_new", exporter=settings.exporter, found=opset, requested=settings.opset)
    check_dynamic_batch(proto)
    check_rnn_layout(proto)
    proto.producer_name = "fxbundle"

    save_single_file(proto, out_path)
    check_model(out_path)
    return ExportResult(
        path=out_path,
        exporter=settings.exporter,
        opset=opset,
        ir_version=proto.ir_version,
        ir_version_original=original_ir,
        external_data_inlined=external,
        size_bytes=out_path.stat().st_size,
        seconds=seconds,
    )


def _run_exporter(model: torch.nn.Module, sample: torch.Tensor, path: Path, settings: ExportSettings) -> None:
    if settings.exporter == "torchscript":
        torch.onnx.export(
            model,
            (sample,),
            str(path),
            dynamo=False,
            opset_version=settings.opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=settings.do_constant_folding,
        )
        return

    # torch.onnx's dynamo exporter translates the graph with onnxscript, which torch does not
    # install itself.
    if importlib.util.find_spec("onnxscript") is None:
        raise ExportError("checks.dynamo_needs_onnxscript")
    batch = torch.export.Dim("batch", min=1, max=1024)
    # The exporter has no opset 17 implementations: it builds opset 18 and converts it down
    # with the ONNX version converter. export_onnx checks the opset that comes out.
    program = torch.onnx.export(
        model,
        (sample,),
        dynamo=True,
        opset_version=settings.opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        optimize=settings.do_constant_folding,
        verbose=False,
    )
    program.save(str(path), external_data=False)


def load_inlined(path: Path) -> tuple[onnx.ModelProto, bool]:
    """Load a model and pull any external data files into it.

    Returns the model and whether it used external data. Saving the returned model with
    :func:`save_single_file` gives one self-contained file.
    """
    proto = onnx.load(str(path), load_external_data=False)
    external = any(external_data_helper.uses_external_data(tensor) for tensor in _all_tensors(proto.graph))
    if external:
        external_data_helper.load_external_data_for_model(proto, str(path.parent))
    return proto, external


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Yield the initializers and the tensor attributes of ``graph`` and of its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_tensors(subgraph)


# IR version 8 stores element types up to BFLOAT16 (16). Later IR versions added float8 (IR 9),
# int4/uint4 (IR 10), float4 (IR 11) and more, all with larger enum values.
_LAST_IR8_TYPE = onnx.TensorProto.BFLOAT16


def downgrade_ir_version(proto: onnx.ModelProto, max_ir_version: int) -> onnx.ModelProto:
    """Lower the IR version field when the graph uses nothing newer than ``max_ir_version`` allows.

    Exporters stamp the newest IR version they know (the dynamo exporter writes 10) even for
    graphs that IR 8 can express. A graph that uses a newer element type or any local function
    (IR 10 added function overloads) is not lowered.
    """
    uses_new_types = any(tensor.data_type > _LAST_IR8_TYPE for tensor in _all_tensors(proto.graph)) or any(
        value.type.tensor_type.elem_type > _LAST_IR8_TYPE
        for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info)
    )
    if uses_new_types or len(proto.functions) > 0:
        raise ExportError("export.ir_version_too_new", found=proto.ir_version, maximum=max_ir_version)
    proto.ir_version = max_ir_version
    return proto


def save_single_file(proto: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path), save_as_external_data=False)


def check_model(path: Path) -> None:
    """Run the full ``onnx.checker`` (with shape inference) on the file."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError("export.checker_failed", path=path.name, detail=str(error).strip().splitlines()[0]) from error


def opset_of(proto: onnx.ModelProto) -> int:
    return next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), 0)


def check_target_profile(path: Path, profile: TargetProfile) -> list[str]:
    """Return every way the model breaks the target profile (empty when it conforms)."""
    proto = onnx.load(str(path), load_external_data=False)
    problems: list[str] = []
    opset = opset_of(proto)
    if opset > profile.max_opset:
        problems.append(f"opset {opset} > {profile.max_opset}")
    if proto.ir_version > profile.max_ir_version:
        problems.append(f"IR version {proto.ir_version} > {profile.max_ir_version}")
    allowed = set(profile.allowed_domains) | ({"com.microsoft"} if profile.allow_contrib_ops else set())
    foreign = sorted({f"{node.domain}:{node.op_type}" for node in proto.graph.node if node.domain not in allowed and node.domain != "ai.onnx"})
    if foreign:
        problems.append(f"operators outside the allowed domains: {', '.join(foreign)}")
    for value in list(proto.graph.input) + list(proto.graph.output):
        if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            problems.append(f"{value.name} is {onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)}, not float32")
    size_mb = path.stat().st_size / 1e6
    if size_mb > profile.max_resource_mb:
        problems.append(f"size {size_mb:.1f} MB > {profile.max_resource_mb} MB")
    if any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in proto.graph.initializer):
        problems.append("the model uses external data; it must be a single file")
    return problems
