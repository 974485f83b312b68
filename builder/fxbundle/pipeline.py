"""The ``fxbundle build`` pipeline: every step, in order, in :meth:`Build.run`."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from fxbundle import __version__, resources
from fxbundle.abtest import ABResult, run_ab
from fxbundle.accuracy import AccuracyResult, WindowSet, measure_accuracy, synthetic_windows, windows_from_csv, windows_from_npz
from fxbundle.bundle import BundlePaths, StagedBundle, bundle_paths, check_destination
from fxbundle.calibration import CalibrationSelection, select_calibration_windows
from fxbundle.checkpoint import Checkpoint, load_checkpoint
from fxbundle.config import BuildConfig, PairSpec, TargetProfile, load_build_config, load_pair, load_target_profile
from fxbundle.data import NormalizationStats, WindowSource, load_bars_csv
from fxbundle.ea import EAContext, resolve_features_include, write_ea_files
from fxbundle.errors import CheckpointError, ConfigError, DataError, GateFailed, UsageError
from fxbundle.export import ExportResult, check_target_profile, export_onnx
from fxbundle.features import FEATURE_SET_NAME
from fxbundle.graph_checks import check_batch_parity, check_deterministic, check_no_training_nodes, check_optimization_levels, check_rnn_layout
from fxbundle.hashing import sha256_file
from fxbundle.i18n import translate
from fxbundle.latency import LatencyResult, measure_latency, measure_torch_latency
from fxbundle.logs import StepReporter, buffer_log, detach, flush_to_file, jst_stamp
from fxbundle.metadata import model_properties, write_metadata, write_model_properties
from fxbundle.optimize import OptimizeResult, optimize_onnx
from fxbundle.pipeline_metadata import library_versions, metadata_sections, report_context
from fxbundle.plots import plot_warmup
from fxbundle.precision import make_fp16
from fxbundle.quantize import allowed_in_target, quantize_dynamic_int8, quantize_static_qdq
from fxbundle.reports import render_validation_report
from fxbundle.scaling import ScalingVerdict, classify_scaling, detect_tail_scale, scaling_applied
from fxbundle.validation import ValidationLog, check_io_shapes, check_model_size

logger = logging.getLogger(__name__)

STEPS = ("prepare", "load", "export", "optimize", "variants", "latency", "accuracy", "choose", "metadata", "render", "package")
PRECISIONS = ("auto", "fp32", "fp16", "int8")


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
class Variant:
    """One candidate model: its file, how it was made, and what was measured on it."""

    name: str  # "fp32" | "fp16" | "int8-static" | "int8-dynamic"
    path: Path
    made_by: dict
    latency: LatencyResult | None = None
    accuracy: AccuracyResult | None = None
    excluded: str | None = None  # why the variant cannot ship, if it cannot


@dataclass
class BuildResult:
    bundle_dir: Path
    zip_path: Path
    zip_sha256: str
    precision: str
    variants: dict[str, Variant]
    warnings: list[str]
    durations: dict[str, float]
    wall_seconds: float

    def summary(self) -> dict:
        shipped = self.variants[self.precision]
        latency, accuracy = shipped.latency, shipped.accuracy
        return {
            "bundle": str(self.bundle_dir),
            "zip": str(self.zip_path),
            "zip_sha256": self.zip_sha256,
            "precision": self.precision,
            "latency_ms": {key: getattr(latency, f"{key}_ms") for key in ("mean", "p50", "p95", "p99")},
            "execution_provider": latency.provider,
            "accuracy": {
                "data_source": accuracy.data_source,
                "windows": accuracy.windows,
                "rmse_pytorch": accuracy.rmse_pytorch,
                "rmse_onnx": accuracy.rmse_onnx,
                "degradation_pct": accuracy.degradation_pct,
                "max_abs_diff": accuracy.max_abs_diff,
            },
            "candidates": {
                name: {
                    "p95_ms": variant.latency.p95_ms if variant.latency else None,
                    "degradation_pct": variant.accuracy.degradation_pct if variant.accuracy else None,
                    "excluded": variant.excluded,
                }
                for name, variant in self.variants.items()
            },
            "warnings": self.warnings,
            "wall_seconds": round(self.wall_seconds, 1),
        }


def build(options: BuildOptions, on_progress: Callable[[str, int, int], None] | None = None) -> BuildResult:
    """Run every build step; on any failure nothing is left under the bundle's final name."""
    return Build(options, on_progress).run()


class Build:
    """State shared by the steps of one build; each ``_step`` method is one line of :meth:`run`."""

    def __init__(self, options: BuildOptions, on_progress: Callable[[str, int, int], None] | None) -> None:
        self.options = options
        self.steps = StepReporter(total=len(STEPS), on_progress=on_progress)
        self.validation = ValidationLog()
        self.warnings: list[str] = []
        self.variants: dict[str, Variant] = {}
        self.started = time.perf_counter()
        self.torch_latency: LatencyResult | None = None
        self.ab_result: ABResult | None = None
        self.calibration: CalibrationSelection | None = None
        self.choice_reason = ""

    def warn(self, key: str, **params: object) -> None:
        """Log a warning once: the INT8 variants, for example, raise the same CPU notice each."""
        text = translate(key, "en", **params)
        if text in self.warnings:
            return
        self.steps.warning(key, **params)
        self.warnings.append(text)

    def run(self) -> BuildResult:
        buffer = buffer_log()
        try:
            with self.steps.step("prepare"):
                self._prepare()
            self.staged = StagedBundle(self.paths)
        except BaseException:
            detach(buffer)
            raise
        log_handler = flush_to_file(buffer, self.staged.path("logs/build.log"))
        try:
            with tempfile.TemporaryDirectory(prefix="fxbundle-work-") as scratch:
                self.work = Path(scratch)
                with self.steps.step("load"):
                    self._load()
                with self.steps.step("export"):
                    self._export_and_check()
                with self.steps.step("optimize"):
                    self._optimize_and_check()
                with self.steps.step("variants"):
                    self._make_variants()
                with self.steps.step("latency"):
                    self._measure_latency()
                with self.steps.step("accuracy"):
                    self._measure_accuracy()
                with self.steps.step("choose"):
                    self._choose_precision()
                with self.steps.step("metadata"):
                    self._write_models_and_metadata()
                with self.steps.step("render"):
                    self._render_ea_and_report()
                with self.steps.step("package"):
                    self._package(log_handler)
        except BaseException:
            detach(log_handler)
            self.staged.discard()
            raise
        detach(log_handler)
        return BuildResult(
            bundle_dir=self.paths.directory,
            zip_path=self.paths.zip_path,
            zip_sha256=self.zip_sha256,
            precision=self.precision,
            variants=self.variants,
            warnings=self.warnings,
            durations=self.steps.durations,
            wall_seconds=time.perf_counter() - self.started,
        )

    # --- steps --------------------------------------------------------------------------------

    def _prepare(self) -> None:
        options = self.options
        self.config: BuildConfig = load_build_config(options.config, options.project_dir)
        self.pair: PairSpec = load_pair(options.pair, options.project_dir)
        self.profile: TargetProfile = load_target_profile(self.config.bundle.target, options.project_dir)
        self.requested_precision = options.precision or self.config.precision.default
        if self.requested_precision not in PRECISIONS:
            raise UsageError("build.bad_precision", precision=self.requested_precision, allowed=", ".join(PRECISIONS))
        self.provider = self.config.latency.execution_provider or self.profile.execution_provider
        if self.requested_precision == "int8" and not self._int8_possible():
            raise ConfigError(
                "gate.int8_unavailable",
                reasons="static INT8 needs a bars CSV given with --test-data, and dynamic INT8 needs a target profile that allows contrib ops",
            )
        self.version = options.version or self.config.bundle.version
        out_dir = options.out or (options.project_dir / self.config.bundle.output_dir)
        self.paths: BundlePaths = bundle_paths(out_dir, self.pair.symbol, self.version)
        check_destination(self.paths)

    def _load(self) -> None:
        checkpoint = load_checkpoint(self.options.model, trust=self.options.trust_checkpoint)
        if checkpoint.pair != self.pair.symbol:
            if not self.options.allow_pair_mismatch:
                raise ConfigError("build.pair_mismatch", requested=self.pair.symbol, checkpoint_pair=checkpoint.pair, path=str(self.options.model))
            self.warn("warn.pair_mismatch_allowed", requested=self.pair.symbol, checkpoint_pair=checkpoint.pair)
        _check_declared_units(checkpoint, self.pair)
        self.features_include, self.features_file = resolve_features_include(checkpoint.feature_set, self.options.features_mqh)
        self.checkpoint: Checkpoint = checkpoint
        self.steps.info(
            "log.checkpoint_loaded",
            architecture=checkpoint.architecture,
            parameters=f"{checkpoint.parameter_count:,}",
            pair=checkpoint.pair,
            shape=list(checkpoint.input_shape),
        )
        self.window_set = self._select_windows()
        if self.window_set.kind == "synthetic":
            self.warn("warn.synthetic_windows", count=self.window_set.count)
        elif self.window_set.causality_windows:
            self.validation.record("causality", "passed", f"{self.window_set.causality_windows} test windows unchanged when later bars change")

    def _export_and_check(self) -> None:
        checkpoint, tolerance = self.checkpoint, self.config.optimization.parity
        self.exported: ExportResult = export_onnx(checkpoint.model, checkpoint.input_shape, self.work / "raw.onnx", self.config.export)
        self.steps.info("log.exported", exporter=self.exported.exporter, opset=self.exported.opset, ir=self.exported.ir_version, size=f"{self.exported.size_bytes / 1e6:.2f}")
        self.sample = np.random.default_rng(0).standard_normal((2, *checkpoint.input_shape[1:])).astype(np.float32)

        proto = onnx.load(str(self.exported.path))
        gate = self.validation.gate
        gate("io_shapes", lambda: _Dict(check_io_shapes(proto, checkpoint.input_shape, checkpoint.output_shape)))
        gate("rnn_layout", lambda: check_rnn_layout(proto), lambda result: f"{len(result.rnn_nodes)} recurrent nodes, layout 0")
        gate("no_training_nodes", lambda: check_no_training_nodes(proto), lambda _: "no Dropout in training mode, no random ops")
        gate("deterministic", lambda: check_deterministic(self.exported.path, self.sample), lambda _: "two runs bit-identical")
        gate(
            "batch_parity",
            lambda: check_batch_parity(self.exported.path, checkpoint.model, checkpoint.input_shape, tolerance.atol, tolerance.rtol, tuple(self.config.validation.batch_sizes)),
            lambda result: f"batch sizes {', '.join(str(run.batch_size) for run in result.runs)} match single runs and PyTorch (atol {tolerance.atol:g}, rtol {tolerance.rtol:g})",
        )

    def _optimize_and_check(self) -> None:
        tolerance = self.config.optimization.parity
        optimized: OptimizeResult = optimize_onnx(self.exported.path, self.work / "fp32.onnx", self.config.optimization, self.sample)
        self.optimized = optimized
        self.steps.info("log.optimized", before=optimized.nodes_before, after=optimized.nodes_after, parity=optimized.parity.describe())
        for name, reason in optimized.rejected.items():
            self.warn("warn.pass_dropped", name=name, reason=reason)
            self.validation.record(f"optimizer_pass:{name}", "warning", f"dropped: {reason}")
        if not optimized.parity.passed:
            self.validation.record("optimization_parity", "failed", optimized.parity.describe())
            raise GateFailed("gate.optimize_parity", detail=optimized.parity.describe())
        self.validation.record("optimization_parity", "passed", f"{len(optimized.applied)} passes, outputs unchanged: {optimized.parity.describe()}")
        self.validation.gate(
            "ort_optimization_levels",
            lambda: check_optimization_levels(optimized.path, self.sample, tolerance.atol, tolerance.rtol),
            lambda result: f"ORT_ENABLE_ALL vs ORT_DISABLE_ALL: {result.parity.describe()}",
        )

        status, summary = check_model_size(optimized.path.stat().st_size, self.config.validation.max_model_mb)
        self.validation.record("model_size", status, summary)
        if status == "warning":
            self.warn("warn.model_large", size=summary)

        self.scaling: ScalingVerdict = classify_scaling(detect_tail_scale(onnx.load(str(optimized.path))), self.checkpoint.output_units, self.pair.pips_multiplier)
        status = {"ok": "passed", "warning": "warning", "error": "failed"}[self.scaling.outcome]
        self.validation.record("scaling", status, self.scaling.message("en"), **self.scaling.to_dict())
        if self.scaling.outcome == "warning":
            self.warn(self.scaling.message_key, **self.scaling.details)
        self.scaling_applied = scaling_applied(self.scaling)  # raises GateFailed for pattern D
        self.variants["fp32"] = Variant("fp32", optimized.path, {"passes": optimized.applied})

    def _make_variants(self) -> None:
        wanted = {"auto": ("fp16", "int8"), "fp32": (), "fp16": ("fp16",), "int8": ("int8",)}[self.requested_precision]
        settings = self.config.precision
        if "fp16" in wanted:
            fp16 = make_fp16(self.variants["fp32"].path, self.work / "fp16.onnx", settings.fp16, on_out_of_range=settings.fp16.on_out_of_range)
            self.variants["fp16"] = Variant("fp16", fp16.path, fp16.to_dict())
            self.steps.info("log.fp16_made", size=f"{fp16.size_bytes / 1e6:.2f}", casts=fp16.cast_nodes)
            for notice in fp16.warnings:
                self.warn(notice.key, **notice.params)
        if "int8" in wanted:
            self._make_int8_variants()

        for variant in self.variants.values():
            problems = check_target_profile(variant.path, self.profile)
            if problems and variant.excluded is None:
                variant.excluded = f"does not fit target profile {self.profile.name}: {'; '.join(problems)}"
        if self.requested_precision != "auto":
            shipped = self._explicit_variant()
            if self.variants[shipped].excluded:
                raise GateFailed("gate.target_profile", target=self.profile.name, problems=self.variants[shipped].excluded)

    def _make_int8_variants(self) -> None:
        settings = self.config.precision.int8
        if settings.static:
            batches = self._calibration_batches()
            if batches is None:
                self.validation.record("int8_static", "skipped", "static INT8 needs a bars CSV (--test-data) to draw calibration windows from")
            else:
                static = quantize_static_qdq(self.variants["fp32"].path, self.work / "int8-static.onnx", batches, method=settings.calibration_method)
                self.variants["int8-static"] = Variant("int8-static", static.path, static.to_dict())
                for notice in static.warnings:
                    self.warn(notice.key, **notice.params)
        if settings.dynamic:
            dynamic = quantize_dynamic_int8(self.variants["fp32"].path, self.work / "int8-dynamic.onnx")
            variant = Variant("int8-dynamic", dynamic.path, dynamic.to_dict())
            if not allowed_in_target(dynamic, self.profile.allow_contrib_ops):
                variant.excluded = f"{dynamic.status}: {', '.join(dynamic.contrib_ops)} not allowed by target profile {self.profile.name}"
            self.variants["int8-dynamic"] = variant
            for notice in dynamic.warnings:
                self.warn(notice.key, **notice.params)

    def _measure_latency(self) -> None:
        settings = self.config.latency
        for variant in self.variants.values():
            variant.latency = measure_latency(
                variant.path,
                self.checkpoint.input_shape,
                warmup=settings.warmup,
                samples=settings.samples,
                provider=self.provider,
                intra_op_threads=settings.intra_op_threads,
                warmup_mode=settings.warmup_mode,
                precision="int8" if variant.name.startswith("int8") else variant.name,
                target_p95_ms=settings.target_p95_ms,
                warn_p95_ms=settings.warn_p95_ms,
                gpu_mem_limit_mb=settings.gpu_mem_limit_mb,
            )
            measured = variant.latency
            self.steps.info("log.latency", precision=variant.name, p50=measured.p50_ms, p95=measured.p95_ms, p99=measured.p99_ms, provider=measured.provider)
        if settings.measure_pytorch and self.provider == "CPUExecutionProvider":
            self.torch_latency = measure_torch_latency(
                self.checkpoint.path,
                self.checkpoint.input_shape,
                warmup=settings.warmup,
                samples=settings.samples,
                threads=settings.intra_op_threads,
                warmup_mode=settings.warmup_mode,
                trust_checkpoint=self.options.trust_checkpoint,
                target_p95_ms=settings.target_p95_ms,
                warn_p95_ms=settings.warn_p95_ms,
            )
            self.steps.info("log.latency", precision="pytorch", p50=self.torch_latency.p50_ms, p95=self.torch_latency.p95_ms, p99=self.torch_latency.p99_ms, provider="PyTorch CPU")

    def _measure_accuracy(self) -> None:
        tolerance = self.config.optimization.parity
        paths = {name: variant.path for name, variant in self.variants.items()}
        results = measure_accuracy(
            self.checkpoint, paths, self.window_set, tolerance.atol, tolerance.rtol, self.pair.pips_multiplier,
            provider=self.provider, gpu_mem_limit_mb=self.config.latency.gpu_mem_limit_mb,
        )
        limits = self.config.accuracy
        for name, measured in results.items():
            variant = self.variants[name]
            variant.accuracy = measured
            self.steps.info(
                "log.accuracy",
                precision=name,
                windows=measured.windows,
                source=measured.data_source,
                degradation=f"{measured.degradation_pct:.4f}",
                max_abs=f"{measured.max_abs_diff:.3g}",
            )
            if measured.degradation_pct > limits.fail_degradation_pct and variant.excluded is None:
                variant.excluded = f"accuracy degradation {measured.degradation_pct:.3f} % > {limits.fail_degradation_pct} %"

    def _choose_precision(self) -> None:
        limits, latency_limits = self.config.accuracy, self.config.latency
        if self.requested_precision == "auto":
            self.precision = self._choose_automatically()
        else:
            self.precision = self._explicit_variant()
            fp32_p95, shipped_p95 = self.variants["fp32"].latency.p95_ms, self.variants[self.precision].latency.p95_ms
            if self.precision != "fp32" and shipped_p95 > fp32_p95:
                self.warn("warn.precision_slower", precision=self.precision, p95=shipped_p95, fp32_p95=fp32_p95)
            self.choice_reason = f"requested with --precision {self.requested_precision}"
        self.steps.info("log.precision_chosen", precision=self.precision, reason=self.choice_reason)

        shipped = self.variants[self.precision]
        accuracy = shipped.accuracy
        summary = f"{self.precision}: degradation {accuracy.degradation_pct:.4f} % (target {limits.target_degradation_pct} %, limit {limits.fail_degradation_pct} %); {accuracy.parity.describe()}"
        if accuracy.degradation_pct > limits.fail_degradation_pct:
            self.validation.record("accuracy", "failed", summary)
            raise GateFailed("gate.degradation", precision=self.precision, degradation=f"{accuracy.degradation_pct:.3f}", limit=limits.fail_degradation_pct)
        if accuracy.degradation_pct > limits.target_degradation_pct:
            self.validation.record("accuracy", "warning", summary)
            self.warn("warn.degradation_over_target", precision=self.precision, degradation=f"{accuracy.degradation_pct:.3f}", target=limits.target_degradation_pct)
        else:
            self.validation.record("accuracy", "passed", summary)

        latency = shipped.latency
        summary = f"{self.precision}: p95 {latency.p95_ms} ms on {latency.provider} (target {latency_limits.target_p95_ms} ms, warning above {latency_limits.warn_p95_ms} ms)"
        if latency_limits.fail_threshold_ms is not None and latency.p95_ms > latency_limits.fail_threshold_ms:
            self.validation.record("latency", "failed", summary)
            raise GateFailed("gate.latency", precision=self.precision, p95=latency.p95_ms, limit=latency_limits.fail_threshold_ms)
        if latency.p95_ms > latency_limits.warn_p95_ms:
            self.validation.record("latency", "warning", summary)
            self.warn("warn.latency_high", precision=self.precision, p95=latency.p95_ms, limit=latency_limits.warn_p95_ms)
        else:
            self.validation.record("latency", "passed" if latency.p95_ms <= latency_limits.target_p95_ms else "warning", summary)

    def _choose_automatically(self) -> str:
        eligible = {name: variant for name, variant in self.variants.items() if variant.excluded is None}
        if not eligible:
            reasons = "; ".join(f"{name}: {variant.excluded}" for name, variant in self.variants.items())
            raise GateFailed("gate.no_candidate", reasons=reasons)

        int8 = eligible.get("int8-static") or eligible.get("int8-dynamic")
        if int8 is not None and "fp16" in eligible and int8.accuracy.mae_onnx is not None:
            self.ab_result = self._run_ab(int8, eligible["fp16"])
            if not self.ab_result.adopted:
                int8.excluded = f"A/B test against fp16: {self.ab_result.verdict}"
                eligible.pop(int8.name)
        elif int8 is not None:
            int8.excluded = "A/B test against fp16 needs test data with targets and an fp16 candidate"
            eligible.pop(int8.name)

        fastest = min(eligible.values(), key=lambda variant: variant.latency.p95_ms)
        measured = ", ".join(f"{name} {variant.latency.p95_ms} ms" for name, variant in eligible.items())
        excluded = "; ".join(f"{name} excluded: {variant.excluded}" for name, variant in self.variants.items() if variant.excluded)
        suffix = f" ({excluded})" if excluded else ""
        # A reduced precision must beat FP32 by a margin: run-to-run noise of a few percent
        # would otherwise decide, and FP32 is the variant every other one is checked against.
        fp32 = eligible.get("fp32")
        margin = self.config.precision.min_gain_pct
        if fp32 is not None and fastest is not fp32:
            gain = 100.0 * (fp32.latency.p95_ms - fastest.latency.p95_ms) / fp32.latency.p95_ms
            if gain < margin:
                self.choice_reason = f"fp32: {fastest.name} is only {gain:.1f} % faster at p95, below the {margin:g} % margin; measured {measured}{suffix}"
                return "fp32"
        self.choice_reason = f"fastest p95 among {measured}{suffix}"
        return fastest.name

    def _run_ab(self, int8: Variant, fp16: Variant) -> ABResult:
        settings, latency = self.config.precision.ab, self.config.latency

        def p95_of(path: Path) -> float:
            measured = measure_latency(
                path, self.checkpoint.input_shape, warmup=latency.warmup, samples=settings.samples, provider=self.provider,
                intra_op_threads=latency.intra_op_threads, warmup_mode=latency.warmup_mode,
                precision="int8" if path == int8.path else "fp16",
            )
            return measured.p95_ms

        result = run_ab((int8.name, int8.path), ("fp16", fp16.path), int8.accuracy.mae_onnx, fp16.accuracy.mae_onnx, p95_of, repeats=settings.repeats)
        self.steps.info("log.ab_result", candidate=int8.name, verdicts=", ".join(round_.verdict for round_ in result.rounds), verdict=result.verdict)
        return result

    def _int8_possible(self) -> bool:
        settings = self.config.precision.int8
        has_csv = self.options.test_data is not None and self.options.test_data.suffix.lower() == ".csv"
        return (settings.static and has_csv) or (settings.dynamic and self.profile.allow_contrib_ops)

    def _explicit_variant(self) -> str:
        if self.requested_precision != "int8":
            return self.requested_precision
        for name in ("int8-static", "int8-dynamic"):
            if name in self.variants and self.variants[name].excluded is None:
                return name
        reasons = "; ".join(f"{name}: {v.excluded}" for name, v in self.variants.items() if name.startswith("int8")) or "no INT8 variant could be made"
        raise GateFailed("gate.int8_unavailable", reasons=reasons)

    def _write_models_and_metadata(self) -> None:
        shipped_names = [self.precision] if self.precision == "fp32" else [self.precision, "fp32"]
        stem = self.pair.symbol.lower()
        self.model_files = {name: f"{stem}_{name.replace('-', '_')}.onnx" for name in shipped_names}
        properties = model_properties(
            pair=self.pair.symbol,
            pips_multiplier=self.pair.pips_multiplier,
            scaling_applied=self.scaling_applied,
            input_shape=self.checkpoint.input_shape,
            output_shape=self.checkpoint.output_shape,
            extra={"output_units": self.checkpoint.output_units, "feature_set": self.checkpoint.feature_set, "fxbundle_version": __version__},
        )
        for name in shipped_names:
            target = self.staged.path(f"{self.paths.expert_dir}/{self.model_files[name]}")
            shutil.copyfile(self.variants[name].path, target)
            write_model_properties(target, {**properties, "precision": name})
        self.model_sha256 = sha256_file(self.staged.path(f"{self.paths.expert_dir}/{self.model_files[self.precision]}"))

        self.plots = []
        for name, variant in self.variants.items():
            file_name = f"reports/warmup_{name}.png"
            plot_warmup(variant.latency, self.staged.path(file_name))
            self.plots.append({"precision": name, "file": file_name.removeprefix("reports/")})
        write_metadata(self.staged.path("onnx_metadata.json"), self._metadata_sections())

    def _render_ea_and_report(self) -> None:
        checkpoint, normalization = self.checkpoint, self.checkpoint.normalization
        context = EAContext(
            tool_version=__version__,
            bundle_version=self.version,
            pair=self.pair.symbol,
            model_file=self.model_files[self.precision],
            model_sha256=self.model_sha256,
            checkpoint_sha256=checkpoint.sha256,
            input_shape=checkpoint.input_shape,
            output_shape=checkpoint.output_shape,
            timeframes=tuple(checkpoint.timeframes),
            base_timeframe=str(checkpoint.extra.get("base_timeframe", "H1")),
            seq_len=checkpoint.seq_len,
            n_features=checkpoint.n_features,
            horizon=checkpoint.horizon,
            digits=self.pair.digits,
            point=self.pair.point,
            pip_size=self.pair.pip_size,
            pips_multiplier=self.pair.pips_multiplier,
            scale_basis=self.pair.scale_basis,
            scaling_applied=self.scaling_applied,
            output_units=checkpoint.output_units,
            feature_set=checkpoint.feature_set,
            features_include=self.features_include,
            norm_mean=[list(map(float, row)) for row in normalization["mean"]],
            norm_std=[list(map(float, row)) for row in normalization["std"]],
            norm_clip=float(normalization.get("clip", 10.0)),
        )
        templates = resources.templates_dir(self.options.project_dir)
        write_ea_files(context, templates, self.staged.path(self.paths.expert_dir), f"FxBundle_{self.pair.symbol}")
        _copy_includes(self.staged, self.paths.include_dir, self.features_file)
        report = render_validation_report(self._report_context(), templates)
        self.staged.path("reports/validation.md").write_text(report, encoding="utf-8")

    def _package(self, log_handler: logging.Handler) -> None:
        header = {
            "bundle": self.paths.name,
            "bundle_version": self.version,
            "pair": self.pair.symbol,
            "precision": self.precision,
            "built_at": jst_stamp(),
            "source_checkpoint": {"file": self.checkpoint.path.name, "sha256": self.checkpoint.sha256},
            "config_sha256": self.config.digest(),
            "target_profile": self.profile.name,
            "versions": library_versions(),
        }
        self.steps.info("log.sealing_log")
        self.staged.commit(header, before_seal=lambda: detach(log_handler))
        self.zip_sha256 = sha256_file(self.paths.zip_path)
        self.steps.info("log.bundle_written", path=str(self.paths.directory), zip=str(self.paths.zip_path), sha256=self.zip_sha256)

    # --- helpers ------------------------------------------------------------------------------

    def _select_windows(self) -> WindowSet:
        count, batch = self.config.accuracy.windows, self.config.accuracy.batch_size
        path = self.options.test_data
        if path is None:
            return synthetic_windows(self.checkpoint, min(count, self.config.accuracy.synthetic_windows), batch)
        if not path.is_file():
            raise DataError("data.test_data_not_found", path=str(path))
        if path.suffix.lower() == ".npz":
            return windows_from_npz(path, self.checkpoint, count, batch)
        if path.suffix.lower() == ".csv":
            return windows_from_csv(path, self.checkpoint, self.pair.digits, count, batch)
        raise DataError("data.test_data_format", path=str(path))

    def _calibration_batches(self):
        """Return calibration batches drawn from the training period of the test CSV, or None."""
        path, checkpoint = self.options.test_data, self.checkpoint
        if path is None or path.suffix.lower() != ".csv" or checkpoint.feature_set != FEATURE_SET_NAME:
            return None
        bars = load_bars_csv(path, self.pair.digits)
        source = WindowSource(bars, checkpoint.timeframes, checkpoint.seq_len, checkpoint.horizon)
        training = checkpoint.extra.get("training", {})
        # Calibration and evaluation come from different periods: calibration ends where the
        # checkpoint's validation period starts (or, without that record, where the test windows start).
        end = training.get("validation_start") or training.get("test_start")
        candidates = source.end_indices(end=np.datetime64(end) if end else None)
        settings = self.config.precision.int8
        count = min(settings.calibration_windows, len(candidates))
        selection = select_calibration_windows(source, candidates, count, seed=settings.seed)
        self.calibration = selection
        status = "passed" if selection.regimes_ok and selection.extremes_ok else "warning"
        self.validation.record("calibration_sample", status, f"{len(selection.indices)} windows; regime shares {[round(s, 3) for s in selection.regime_shares]}; {selection.extreme_samples} at or beyond p99.5", **selection.to_dict())
        if status == "warning":
            self.warn("warn.calibration_kpi", regimes=selection.regimes_ok, extremes=selection.extreme_samples)
        stats = NormalizationStats.from_dict(checkpoint.normalization)
        return (windows for windows, _ in source.windows(selection.indices, stats, batch_size=16))

    def _metadata_sections(self) -> dict:
        return metadata_sections(self)

    def _report_context(self) -> dict:
        return report_context(self)


class _Dict(dict):
    """A plain dict that the validation log can record like a result object."""

    def to_dict(self) -> dict:
        return dict(self)


def _check_declared_units(checkpoint: Checkpoint, pair: PairSpec) -> None:
    """A model declared to output pips must not be used for a pair reported in points, and vice versa."""
    if checkpoint.output_units == "price":
        return
    expected_units = "pips" if pair.scale_basis == "pip" else "points"
    if checkpoint.output_units != expected_units:
        raise CheckpointError("checkpoint.units_mismatch", path=str(checkpoint.path), units=checkpoint.output_units, pair=pair.symbol, expected=expected_units)


def _copy_includes(staged: StagedBundle, include_dir: str, features_file: Path | None) -> None:
    """Copy the hand-written MQL5 includes, and a user-supplied features include, into the bundle."""
    source = resources.builtin_dir("mql5") / "FxBundle"
    for path in sorted(source.rglob("*.mqh")):
        shutil.copyfile(path, staged.path(f"{include_dir}/{path.relative_to(source).as_posix()}"))
    if features_file is not None:
        shutil.copyfile(features_file, staged.path(f"{include_dir}/Features/{features_file.name}"))

