"""The sections of ``onnx_metadata.json`` and the context of ``reports/validation.md`` for one build."""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxconverter_common
import onnxoptimizer
import onnxruntime
import torch

from fxbundle import __version__
from fxbundle.logs import jst_stamp

if TYPE_CHECKING:
    from fxbundle.pipeline import Build


def library_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxconverter_common": onnxconverter_common.__version__,
        "onnxoptimizer": getattr(onnxoptimizer, "__version__", "unknown"),
        "numpy": np.__version__,
        "fxbundle": __version__,
    }


def metadata_sections(build: "Build") -> dict[str, Any]:
    """Build conversion, model, performance, accuracy, validation and scaling sections."""
    checkpoint, config, pair = build.checkpoint, build.config, build.pair
    shipped = build.variants[build.precision]
    exported, optimized = build.exported, build.optimized
    return {
        "conversion": {
            "tool": "fxbundle",
            "tool_version": __version__,
            "converted_at": jst_stamp(),
            "exporter": exported.exporter,
            "opset": exported.opset,
            "ir_version": exported.ir_version,
            "ir_version_exported": exported.ir_version_original,
            "external_data_inlined": exported.external_data_inlined,
            "optimizer_passes_applied": optimized.applied,
            "optimizer_passes_rejected": optimized.rejected,
            "nodes_before_optimization": optimized.nodes_before,
            "nodes_after_optimization": optimized.nodes_after,
            "optimization_parity": optimized.parity.to_dict(),
            "precision": build.precision,
            "precision_requested": build.requested_precision,
            "precision_reason": build.choice_reason,
            "model_files": build.model_files,
            "candidates": {
                name: {
                    "size_bytes": variant.path.stat().st_size,
                    "made_by": variant.made_by,
                    "p50_ms": variant.latency.p50_ms if variant.latency else None,
                    "p95_ms": variant.latency.p95_ms if variant.latency else None,
                    "degradation_pct": variant.accuracy.degradation_pct if variant.accuracy else None,
                    "excluded": variant.excluded,
                    "shipped": name in build.model_files,
                }
                for name, variant in build.variants.items()
            },
            "ab_test": build.ab_result.to_dict() if build.ab_result else None,
            "calibration": build.calibration.to_dict() if build.calibration else None,
            "versions": library_versions(),
            "source_checkpoint": {"file": checkpoint.path.name, "sha256": checkpoint.sha256},
            "bundle_version": build.version,
        },
        "model": {
            "architecture": checkpoint.architecture,
            "hyperparameters": checkpoint.hyperparameters,
            "parameters": checkpoint.parameter_count,
            "pair": checkpoint.pair,
            "timeframes": checkpoint.timeframes,
            "base_timeframe": checkpoint.extra.get("base_timeframe", "H1"),
            "seq_len": checkpoint.seq_len,
            "n_features": checkpoint.n_features,
            "horizon": checkpoint.horizon,
            "feature_set": checkpoint.feature_set,
            "feature_names": checkpoint.feature_names,
            "input": {
                "name": "input",
                "shape": ["batch", *checkpoint.input_shape[1:]],
                "dtype": "float32",
                "window": f"t-{checkpoint.seq_len - 1} … t (closed bars, oldest first)",
            },
            "output": {
                "name": "output",
                "shape": ["batch", checkpoint.horizon],
                "dtype": "float32",
                "horizons": f"t+1 … t+{checkpoint.horizon}",
                "units": checkpoint.output_units,
            },
            "normalization": {"clip": checkpoint.normalization.get("clip"), "fitted_on": "training period only"},
            "training": checkpoint.extra.get("training", {}),
        },
        "performance": {
            "shipped": shipped.latency.to_dict(),
            "by_precision": {name: variant.latency.to_dict() for name, variant in build.variants.items()},
            "pytorch": build.torch_latency.to_dict() if build.torch_latency else None,
            "target_p95_ms": config.latency.target_p95_ms,
            "warn_p95_ms": config.latency.warn_p95_ms,
            "fail_threshold_ms": config.latency.fail_threshold_ms,
            "meets_target": shipped.latency.p95_ms <= config.latency.target_p95_ms,
        },
        "accuracy": {
            "shipped": shipped.accuracy.to_dict(),
            "by_precision": {name: variant.accuracy.to_dict() for name, variant in build.variants.items()},
            "target_degradation_pct": config.accuracy.target_degradation_pct,
            "fail_degradation_pct": config.accuracy.fail_degradation_pct,
        },
        "validation": {
            **build.validation.to_dict(),
            "target_profile": build.profile.model_dump(),
            "forward_check": f"{list(checkpoint.input_shape)} -> {list(checkpoint.output_shape)}",
            "warnings": build.warnings,
        },
        "scaling": {
            "scaling_applied": build.scaling_applied,
            "pattern": build.scaling.pattern,
            "verdict": build.scaling.to_dict(),
            "output_units": checkpoint.output_units,
            "pips_multiplier": pair.pips_multiplier,
            "scale_basis": pair.scale_basis,
            "pip_size": pair.pip_size,
            "digits": pair.digits,
            "point": pair.point,
            "applied_by": "model" if build.scaling_applied else "EA at run time, once",
        },
    }


def report_context(build: "Build") -> dict[str, Any]:
    """Collect the values the validation report templates render."""
    shipped = build.variants[build.precision]
    latency = {name: variant.latency for name, variant in build.variants.items()}
    if build.torch_latency is not None:
        latency["pytorch"] = build.torch_latency
    accuracy = shipped.accuracy
    per_horizon = []
    if accuracy.rmse_per_horizon_onnx is not None:
        per_horizon = [
            {"horizon": index + 1, "pytorch": torch_value, "onnx": onnx_value}
            for index, (torch_value, onnx_value) in enumerate(zip(accuracy.rmse_per_horizon_pytorch, accuracy.rmse_per_horizon_onnx))
        ]
    return {
        "pair": build.pair.symbol,
        "bundle_version": build.version,
        "tool_version": __version__,
        "built_at": jst_stamp(),
        "checkpoint_file": build.checkpoint.path.name,
        "checkpoint_sha256": build.checkpoint.sha256,
        "precision": build.precision,
        "choice_reason": build.choice_reason,
        "checks": build.validation.outcomes,
        "provider": shipped.latency.provider,
        "latency": latency,
        "target_p95_ms": build.config.latency.target_p95_ms,
        "warn_p95_ms": build.config.latency.warn_p95_ms,
        "plots": build.plots,
        "accuracy_source": accuracy.description,
        "accuracy": {name: variant.accuracy for name, variant in build.variants.items()},
        "degradation_basis": accuracy.degradation_basis,
        "target_degradation_pct": build.config.accuracy.target_degradation_pct,
        "fail_degradation_pct": build.config.accuracy.fail_degradation_pct,
        "parity": accuracy.parity.describe(),
        "per_horizon": per_horizon,
        "pips_multiplier": build.pair.pips_multiplier,
        "scaling_summary": build.scaling.message("en"),
        "scaling_summary_ja": build.scaling.message("ja"),
    }
