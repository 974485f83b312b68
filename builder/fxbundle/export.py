"""Export a checkpoint's model to ONE ONNX file that the target runtime can load."""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from fxbundle.config import ExportSettings, TargetProfile
from fxbundle.errors import ExportError

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "output"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    exporter: str
    opset: int
    ir_version: int
    ir_version_original: int
    external_data_inlined: bool
    size_bytes: int


def export_onnx(model: torch.nn.Module, input_shape: tuple[int, ...], out_path: Path, settings: ExportSettings) -> ExportResult:
    """Export ``model`` in eval mode with a dynamic batch axis and write a single checked file."""
    model.eval()
    sample = torch.zeros(input_shape, dtype=torch.float32)

    with tempfile.TemporaryDirectory(prefix="fxbundle-export-") as scratch:
        raw_path = Path(scratch) / "model.onnx"
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
                _run_exporter(model, sample, raw_path, settings)
        except ExportError:
            raise
        except Exception as error:  # exporters fail with many exception types
            raise ExportError("export.failed", exporter=settings.exporter, detail=str(error).strip().splitlines()[0]) from error

        # load() pulls in external data files, so the saved model below is one file.
        proto = onnx.load(str(raw_path), load_external_data=True)
        external = any(
            tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in proto.graph.initializer
        ) or any(p.name != "model.onnx" for p in Path(scratch).iterdir())

    original_ir = proto.ir_version
    if proto.ir_version > settings.max_ir_version:
        proto = downgrade_ir_version(proto, settings.max_ir_version)
    proto.producer_name = "fxbundle"

    save_single_file(proto, out_path)
    check_model(out_path)
    return ExportResult(
        path=out_path,
        exporter=settings.exporter,
        opset=opset_of(proto),
        ir_version=proto.ir_version,
        ir_version_original=original_ir,
        external_data_inlined=external,
        size_bytes=out_path.stat().st_size,
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

    batch = torch.export.Dim("batch", min=1, max=1024)
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


def downgrade_ir_version(proto: onnx.ModelProto, max_ir_version: int) -> onnx.ModelProto:
    """Lower the IR version field when the graph uses nothing newer than ``max_ir_version`` allows.

    Exporters stamp the newest IR version they know (the dynamo exporter writes 10) even for
    graphs that IR 8 can express. IR 9 and 10 added float8 types, local functions with
    attributes of their own and overloads; a graph that uses those cannot be lowered.
    """
    float8_types = {
        onnx.TensorProto.FLOAT8E4M3FN,
        onnx.TensorProto.FLOAT8E4M3FNUZ,
        onnx.TensorProto.FLOAT8E5M2,
        onnx.TensorProto.FLOAT8E5M2FNUZ,
    }
    uses_float8 = any(init.data_type in float8_types for init in proto.graph.initializer)
    if uses_float8 or len(proto.functions) > 0:
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
