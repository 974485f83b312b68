"""The ``fxbundle build`` pipeline: every step, in order, in :func:`build`."""

from __future__ import annotations

import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxconverter_common
import onnxoptimizer
import onnxruntime
import torch

from fxbundle import __version__, resources
from fxbundle.accuracy import AccuracyResult, WindowSet, measure_accuracy, synthetic_windows, windows_from_csv, windows_from_npz
from fxbundle.bundle import StagedBundle, bundle_paths, check_destination
from fxbundle.hashing import sha256_file
from fxbundle.checkpoint import Checkpoint, load_checkpoint
from fxbundle.errors import ConfigError
from fxbundle.config import BuildConfig, PairSpec, TargetProfile, load_build_config, load_pair, load_target_profile
from fxbundle.ea import EAContext, resolve_features_include, write_ea_files
from fxbundle.errors import CheckpointError, DataError, ExportError, GateFailed, UsageError
from fxbundle.i18n import translate
from fxbundle.export import ExportResult, check_target_profile, export_onnx
from fxbundle.latency import LatencyResult, measure_latency
from fxbundle.logs import StepReporter, attach_file_log, detach, jst_stamp
from fxbundle.metadata import model_properties, write_metadata, write_model_properties
from fxbundle.optimize import OptimizeResult, optimize_onnx
from fxbundle.precision import VariantResult, make_fp16

logger = logging.getLogger(__name__)

STEPS = ("prepare", "load", "export", "optimize", "fp16", "latency", "accuracy", "metadata", "render", "package")
PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class BuildOptions:
    pair: str
    model: Path = Path("models/usdjpy_example_training.pt")
    config: Path | None = None
    precision: str | None = None
    test_data: Path | None = None
    version: str | None = None
    out: Path | None = None
    project_dir: Path = field(default_factory=Path.cwd)
    trust_checkpoint: bool = False
    allow_pair_mismatch: bool = False
    features_mqh: Path | None = None


@dataclass
class BuildResult:
    bundle_dir: Path
    zip_path: Path
    zip_sha256: str
    precision: str
    latency: dict[str, LatencyResult]
    accuracy: dict[str, AccuracyResult]
    warnings: list[str]
    durations: dict[str, float]
    wall_seconds: float

    def summary(self) -> dict:
        shipped_latency = self.latency[self.precision]
        shipped_accuracy = self.accuracy[self.precision]
        return {
            "bundle": str(self.bundle_dir),
            "zip": str(self.zip_path),
            "zip_sha256": self.zip_sha256,
            "precision": self.precision,
            "latency_ms": {key: getattr(shipped_latency, f"{key}_ms") for key in ("mean", "p50", "p95", "p99")},
            "execution_provider": shipped_latency.provider,
            "accuracy": {
                "data_source": shipped_accuracy.data_source,
                "windows": shipped_accuracy.windows,
                "rmse_pytorch": shipped_accuracy.rmse_pytorch,
                "rmse_onnx": shipped_accuracy.rmse_onnx,
                "degradation_pct": shipped_accuracy.degradation_pct,
                "max_abs_diff": shipped_accuracy.parity.max_abs,
            },
            "warnings": self.warnings,
            "wall_seconds": round(self.wall_seconds, 1),
        }


def _scaling_applied(checkpoint: Checkpoint, pair: PairSpec) -> bool:
    """Return True when the model already outputs pips or points, so the EA must not scale again."""
    if checkpoint.output_units == "price":
        return False
    expected_units = "pips" if pair.scale_basis == "pip" else "points"
    if checkpoint.output_units != expected_units:
        raise CheckpointError("checkpoint.units_mismatch", path=str(checkpoint.path), units=checkpoint.output_units, pair=pair.symbol, expected=expected_units)
    return True


def _select_windows(options: BuildOptions, config: BuildConfig, checkpoint: Checkpoint, pair: PairSpec) -> WindowSet:
    count, batch = config.accuracy.windows, config.accuracy.batch_size
    if options.test_data is None:
        return synthetic_windows(checkpoint, count, batch)
    path = options.test_data
    if not path.is_file():
        raise DataError("data.test_data_not_found", path=str(path))
    if path.suffix.lower() == ".npz":
        return windows_from_npz(path, checkpoint, count, batch)
    if path.suffix.lower() == ".csv":
        return windows_from_csv(path, checkpoint, pair.digits, count, batch)
    raise DataError("data.test_data_format", path=str(path))


def _library_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxconverter_common": onnxconverter_common.__version__,
        "onnxoptimizer": getattr(onnxoptimizer, "__version__", "unknown"),
        "numpy": np.__version__,
        "fxbundle": __version__,
    }


def build(options: BuildOptions, on_progress: Callable[[str, int, int], None] | None = None) -> BuildResult:
    """Run every build step; on any failure nothing is left under the bundle's final name."""
    started = time.perf_counter()
    steps = StepReporter(total=len(STEPS), on_progress=on_progress)
    warnings: list[str] = []

    with steps.step("prepare"):
        config = load_build_config(options.config, options.project_dir)
        pair = load_pair(options.pair, options.project_dir)
        profile = load_target_profile(config.bundle.target, options.project_dir)
        precision = options.precision or config.precision.default
        if precision not in PRECISIONS:
            raise UsageError("build.bad_precision", precision=precision, allowed=", ".join(PRECISIONS))
        version = options.version or config.bundle.version
        out_dir = options.out or (options.project_dir / config.bundle.output_dir)
        paths = bundle_paths(out_dir, pair.symbol, version)
        check_destination(paths)

    staged = StagedBundle(paths)
    log_handler = attach_file_log(staged.path("logs/build.log"))
    try:
        with tempfile.TemporaryDirectory(prefix="fxbundle-work-") as scratch:
            result = _build_into(
                options, config, pair, profile, precision, version, paths, staged, Path(scratch), steps, warnings, started, log_handler
            )
    except BaseException:
        detach(log_handler)
        staged.discard()
        raise
    detach(log_handler)
    return result


def _build_into(
    options: BuildOptions,
    config: BuildConfig,
    pair: PairSpec,
    profile: TargetProfile,
    precision: str,
    version: str,
    paths,
    staged: StagedBundle,
    work: Path,
    steps: StepReporter,
    warnings: list[str],
    started: float,
    log_handler: logging.Handler,
) -> BuildResult:
    def warn(key: str, **params: object) -> None:
        steps.warning(key, **params)
        warnings.append(translate(key, "en", **params))

    with steps.step("load"):
        checkpoint = load_checkpoint(options.model, trust=options.trust_checkpoint)
        if checkpoint.pair != pair.symbol:
            if not options.allow_pair_mismatch:
                raise ConfigError("build.pair_mismatch", requested=pair.symbol, checkpoint_pair=checkpoint.pair, path=str(options.model))
            warn("warn.pair_mismatch_allowed", requested=pair.symbol, checkpoint_pair=checkpoint.pair)
        scaling_applied = _scaling_applied(checkpoint, pair)
        features_include, features_file = resolve_features_include(checkpoint.feature_set, options.features_mqh)
        steps.info(
            "log.checkpoint_loaded",
            architecture=checkpoint.architecture,
            parameters=f"{checkpoint.parameter_count:,}",
            pair=checkpoint.pair,
            shape=list(checkpoint.input_shape),
        )

    stem = f"{pair.symbol.lower()}"
    rng = np.random.default_rng(0)
    parity_sample = rng.standard_normal((2, *checkpoint.input_shape[1:])).astype(np.float32)

    with steps.step("export"):
        exported: ExportResult = export_onnx(checkpoint.model, checkpoint.input_shape, work / f"{stem}_raw.onnx", config.export)
        steps.info("log.exported", exporter=exported.exporter, opset=exported.opset, ir=exported.ir_version, size=f"{exported.size_bytes / 1e6:.2f}")

    with steps.step("optimize"):
        optimized: OptimizeResult = optimize_onnx(exported.path, work / f"{stem}_fp32.onnx", config.optimization, parity_sample)
        steps.info("log.optimized", before=optimized.nodes_before, after=optimized.nodes_after, parity=optimized.parity.describe())
        for name, reason in optimized.rejected.items():
            warn("warn.pass_dropped", name=name, reason=reason)
        if not optimized.parity.passed:
            raise GateFailed("gate.optimize_parity", detail=optimized.parity.describe())

    with steps.step("fp16"):
        fp16: VariantResult = make_fp16(optimized.path, work / f"{stem}_fp16.onnx", config.precision.fp16)
        steps.info("log.fp16_made", size=f"{fp16.size_bytes / 1e6:.2f}", casts=fp16.cast_nodes)
    variant_paths = {"fp32": optimized.path, "fp16": fp16.path}

    problems = check_target_profile(variant_paths[precision], profile)
    if problems:
        raise GateFailed("gate.target_profile", target=profile.name, problems="; ".join(problems))

    with steps.step("latency"):
        latency = {
            name: measure_latency(
                path,
                checkpoint.input_shape,
                warmup=config.latency.warmup,
                samples=config.latency.samples,
                provider=config.latency.execution_provider,
                intra_op_threads=config.latency.intra_op_threads,
            )
            for name, path in variant_paths.items()
        }
        for name, measured in latency.items():
            steps.info("log.latency", precision=name, p50=measured.p50_ms, p95=measured.p95_ms, p99=measured.p99_ms, provider=measured.provider)
        shipped_p95 = latency[precision].p95_ms
        if shipped_p95 > config.latency.warn_p95_ms:
            warn("warn.latency_high", precision=precision, p95=shipped_p95, limit=config.latency.warn_p95_ms)
        elif shipped_p95 > config.latency.target_p95_ms:
            warn("warn.latency_over_target", precision=precision, p95=shipped_p95, target=config.latency.target_p95_ms)

    with steps.step("accuracy"):
        window_set = _select_windows(options, config, checkpoint, pair)
        if window_set.kind == "synthetic":
            warn("warn.synthetic_windows", count=window_set.count)
        accuracy = measure_accuracy(
            checkpoint, variant_paths, window_set, config.optimization.parity.atol, config.optimization.parity.rtol, pair.pips_multiplier
        )
        for name, measured in accuracy.items():
            steps.info(
                "log.accuracy",
                precision=name,
                windows=measured.windows,
                source=measured.data_source,
                degradation=f"{measured.degradation_pct:.4f}",
                max_abs=f"{measured.parity.max_abs:.3g}",
            )
        shipped = accuracy[precision]
        if shipped.degradation_pct > config.accuracy.fail_degradation_pct:
            raise GateFailed("gate.degradation", precision=precision, degradation=f"{shipped.degradation_pct:.3f}", limit=config.accuracy.fail_degradation_pct)
        if shipped.degradation_pct > config.accuracy.target_degradation_pct:
            warn("warn.degradation_over_target", precision=precision, degradation=f"{shipped.degradation_pct:.3f}", target=config.accuracy.target_degradation_pct)

    shipped_names = [precision] if precision == "fp32" else [precision, "fp32"]
    model_files = {name: f"{stem}_{name}.onnx" for name in shipped_names}

    with steps.step("metadata"):
        properties = model_properties(
            pair=pair.symbol,
            pips_multiplier=pair.pips_multiplier,
            scaling_applied=scaling_applied,
            input_shape=checkpoint.input_shape,
            output_shape=checkpoint.output_shape,
            extra={"output_units": checkpoint.output_units, "feature_set": checkpoint.feature_set, "fxbundle_version": __version__},
        )
        for name in shipped_names:
            target = staged.path(f"{paths.expert_dir}/{model_files[name]}")
            shutil.copyfile(variant_paths[name], target)
            write_model_properties(target, {**properties, "precision": name})
        model_sha256 = sha256_file(staged.path(f"{paths.expert_dir}/{model_files[precision]}"))
        sections = _metadata_sections(
            checkpoint, pair, profile, config, precision, version, exported, optimized, fp16, latency, accuracy, scaling_applied, model_files, warnings
        )
        write_metadata(staged.path("onnx_metadata.json"), sections)

    with steps.step("render"):
        ea_name = f"FxBundle_{pair.symbol}"
        normalization = checkpoint.normalization
        context = EAContext(
            tool_version=__version__,
            bundle_version=version,
            pair=pair.symbol,
            model_file=model_files[precision],
            model_sha256=model_sha256,
            checkpoint_sha256=checkpoint.sha256,
            input_shape=checkpoint.input_shape,
            output_shape=checkpoint.output_shape,
            timeframes=tuple(checkpoint.timeframes),
            base_timeframe=str(checkpoint.extra.get("base_timeframe", "H1")),
            seq_len=checkpoint.seq_len,
            n_features=checkpoint.n_features,
            horizon=checkpoint.horizon,
            digits=pair.digits,
            point=pair.point,
            pip_size=pair.pip_size,
            pips_multiplier=pair.pips_multiplier,
            scale_basis=pair.scale_basis,
            scaling_applied=scaling_applied,
            output_units=checkpoint.output_units,
            feature_set=checkpoint.feature_set,
            features_include=features_include,
            norm_mean=[list(map(float, row)) for row in normalization["mean"]],
            norm_std=[list(map(float, row)) for row in normalization["std"]],
            norm_clip=float(normalization.get("clip", 10.0)),
        )
        write_ea_files(context, resources.templates_dir(options.project_dir), staged.path(paths.expert_dir), ea_name)
        _copy_includes(staged, paths.include_dir, features_file)

    with steps.step("package"):
        header = {
            "bundle": paths.name,
            "bundle_version": version,
            "pair": pair.symbol,
            "precision": precision,
            "built_at": jst_stamp(),
            "source_checkpoint": {"file": checkpoint.path.name, "sha256": checkpoint.sha256},
            "config_sha256": config.digest(),
            "target_profile": profile.name,
            "versions": _library_versions(),
        }
        steps.info("log.sealing_log")
        staged.commit(header, before_seal=lambda: detach(log_handler))
        zip_sha256 = sha256_file(paths.zip_path)
        steps.info("log.bundle_written", path=str(paths.directory), zip=str(paths.zip_path), sha256=zip_sha256)

    return BuildResult(
        bundle_dir=paths.directory,
        zip_path=paths.zip_path,
        zip_sha256=zip_sha256,
        precision=precision,
        latency=latency,
        accuracy=accuracy,
        warnings=warnings,
        durations=steps.durations,
        wall_seconds=time.perf_counter() - started,
    )


def _copy_includes(staged: StagedBundle, include_dir: str, features_file: Path | None) -> None:
    """Copy the hand-written MQL5 includes, and a user-supplied features include, into the bundle."""
    source = resources.builtin_dir("mql5") / "FxBundle"
    for path in sorted(source.rglob("*.mqh")):
        shutil.copyfile(path, staged.path(f"{include_dir}/{path.relative_to(source).as_posix()}"))
    if features_file is not None:
        shutil.copyfile(features_file, staged.path(f"{include_dir}/Features/{features_file.name}"))


def _metadata_sections(
    checkpoint: Checkpoint,
    pair: PairSpec,
    profile: TargetProfile,
    config: BuildConfig,
    precision: str,
    version: str,
    exported: ExportResult,
    optimized: OptimizeResult,
    fp16: VariantResult,
    latency: dict[str, LatencyResult],
    accuracy: dict[str, AccuracyResult],
    scaling_applied: bool,
    model_files: dict[str, str],
    warnings: list[str],
) -> dict:
    shipped_accuracy = accuracy[precision]
    shipped_latency = latency[precision]
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
            "precision": precision,
            "model_files": model_files,
            "variants": {
                "fp32": {"size_bytes": optimized.path.stat().st_size},
                "fp16": {"size_bytes": fp16.size_bytes, "cast_nodes": fp16.cast_nodes, "keep_io_types": config.precision.fp16.keep_io_types},
            },
            "versions": _library_versions(),
            "source_checkpoint": {"file": checkpoint.path.name, "sha256": checkpoint.sha256},
            "bundle_version": version,
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
            "input": {"name": "input", "shape": ["batch", *checkpoint.input_shape[1:]], "dtype": "float32", "window": f"t-{checkpoint.seq_len - 1} … t, oldest first"},
            "output": {"name": "output", "shape": ["batch", checkpoint.horizon], "dtype": "float32", "horizons": f"t+1 … t+{checkpoint.horizon}", "units": checkpoint.output_units},
            "normalization": {"clip": checkpoint.normalization.get("clip"), "fitted_on": "training period only"},
            "training": checkpoint.extra.get("training", {}),
        },
        "performance": {
            "shipped": shipped_latency.to_dict(),
            "by_precision": {name: value.to_dict() for name, value in latency.items()},
            "target_p95_ms": config.latency.target_p95_ms,
            "warn_p95_ms": config.latency.warn_p95_ms,
            "meets_target": shipped_latency.p95_ms <= config.latency.target_p95_ms,
        },
        "accuracy": {
            "shipped": shipped_accuracy.to_dict(),
            "by_precision": {name: value.to_dict() for name, value in accuracy.items()},
            "target_degradation_pct": config.accuracy.target_degradation_pct,
            "fail_degradation_pct": config.accuracy.fail_degradation_pct,
        },
        "validation": {
            "onnx_checker": "passed (full_check)",
            "target_profile": {"name": profile.name, "max_opset": profile.max_opset, "max_ir_version": profile.max_ir_version, "conforms": True},
            "forward_check": f"{list(checkpoint.input_shape)} -> {list(checkpoint.output_shape)}",
            "warnings": warnings,
        },
        "scaling": {
            "scaling_applied": scaling_applied,
            "output_units": checkpoint.output_units,
            "pips_multiplier": pair.pips_multiplier,
            "scale_basis": pair.scale_basis,
            "pip_size": pair.pip_size,
            "digits": pair.digits,
            "point": pair.point,
            "applied_by": "model" if scaling_applied else "EA at run time, once",
        },
    }
