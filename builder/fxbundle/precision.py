"""Reduced-precision variants of the optimized FP32 model."""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnxconverter_common import float16

from fxbundle.config import FP16Settings
from fxbundle.errors import ExportError
from fxbundle.export import check_model, save_single_file
from fxbundle.sessions import create_session

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VariantResult:
    precision: str
    path: Path
    size_bytes: int
    cast_nodes: int


def make_fp16(source: Path, out_path: Path, settings: FP16Settings) -> VariantResult:
    """Convert weights and activations to float16, keeping float32 graph inputs and outputs.

    MQL5 has no float16 type, so a model for MetaTrader must keep float32 I/O.
    """
    model = onnx.load(str(source))
    try:
        with warnings.catch_warnings():
            # The converter warns for every value it clamps; the count is logged below instead.
            warnings.simplefilter("ignore", category=UserWarning)
            converted = float16.convert_float_to_float16(model, keep_io_types=settings.keep_io_types)
    except Exception as error:  # the converter raises bare exceptions on unsupported graphs
        raise ExportError("precision.fp16_failed", detail=str(error).strip().splitlines()[0]) from error

    save_single_file(converted, out_path)
    try:
        check_model(out_path)
        create_session(out_path)
    except Exception:
        out_path.unlink(missing_ok=True)
        raise
    casts = Counter(node.op_type for node in converted.graph.node)["Cast"]
    return VariantResult(precision="fp16", path=out_path, size_bytes=out_path.stat().st_size, cast_nodes=casts)
