"""Build settings, pair conventions and target profiles, validated with pydantic.

Defaults come from the built-in ``config/`` directory; a project's ``config/`` (or
``--config PATH``) overrides them key by key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fxbundle import resources
from fxbundle.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExportSettings(_Strict):
    opset: int = Field(17, ge=7)
    exporter: Literal["torchscript", "dynamo"] = "torchscript"
    do_constant_folding: bool = True
    max_ir_version: int = Field(8, ge=3)


class ParitySettings(_Strict):
    atol: float = Field(1e-5, ge=0)
    rtol: float = Field(1e-4, ge=0)


class OptimizationSettings(_Strict):
    passes: list[str] = Field(default_factory=list)
    parity: ParitySettings = ParitySettings()

    @field_validator("passes")
    @classmethod
    def _known_passes(cls, passes: list[str]) -> list[str]:
        import onnxoptimizer

        available = set(onnxoptimizer.get_available_passes())
        unknown = [name for name in passes if name not in available]
        if unknown:
            raise ValueError(f"unknown onnxoptimizer pass(es) {unknown}; available: {sorted(available)}")
        return passes


class FP16Settings(_Strict):
    keep_io_types: bool = True
    on_out_of_range: Literal["keep_fp32", "fail"] = "keep_fp32"


class INT8Settings(_Strict):
    dynamic: bool = True
    static: bool = True
    calibration_windows: int = Field(200, ge=10)
    calibration_method: Literal["MinMax", "Entropy", "Percentile"] = "MinMax"
    seed: int = 0


class ABSettings(_Strict):
    repeats: int = Field(5, ge=1)
    samples: int = Field(300, ge=10)


class PrecisionSettings(_Strict):
    default: Literal["auto", "fp32", "fp16", "int8"] = "auto"
    min_gain_pct: float = Field(5.0, ge=0)
    fp16: FP16Settings = FP16Settings()
    int8: INT8Settings = INT8Settings()
    ab: ABSettings = ABSettings()


class LatencySettings(_Strict):
    warmup: int | None = Field(None, ge=0)
    warmup_mode: Literal["fixed", "adaptive"] | None = None
    samples: int = Field(1000, ge=10)
    execution_provider: str | None = None
    gpu_mem_limit_mb: int | None = Field(None, ge=1)
    intra_op_threads: int = Field(1, ge=0)
    target_p95_ms: float = Field(10.0, gt=0)
    warn_p95_ms: float = Field(15.0, gt=0)
    fail_threshold_ms: float | None = Field(None, gt=0)
    measure_pytorch: bool = True


class AccuracySettings(_Strict):
    windows: int = Field(5000, ge=1)
    synthetic_windows: int = Field(1000, ge=1)
    batch_size: int = Field(256, ge=1)
    target_degradation_pct: float = Field(1.0, ge=0)
    fail_degradation_pct: float = Field(2.0, ge=0)


class ValidationSettings(_Strict):
    max_model_mb: float = Field(10.0, gt=0)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 2, 3, 7])


class BundleSettings(_Strict):
    version: str = "1.0.0"
    target: str = "mt5"
    output_dir: str = "dist"


class BuildConfig(_Strict):
    export: ExportSettings = ExportSettings()
    optimization: OptimizationSettings = OptimizationSettings()
    precision: PrecisionSettings = PrecisionSettings()
    latency: LatencySettings = LatencySettings()
    accuracy: AccuracySettings = AccuracySettings()
    validation: ValidationSettings = ValidationSettings()
    bundle: BundleSettings = BundleSettings()

    def digest(self) -> str:
        """SHA-256 of the effective settings, recorded in the manifest."""
        canonical = json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class PairSpec(_Strict):
    symbol: str
    digits: int = Field(ge=0, le=8)
    point: float = Field(gt=0)
    pip_size: float = Field(gt=0)
    pips_multiplier: float = Field(gt=0)
    scale_basis: Literal["pip", "point"] = "pip"


class TargetProfile(_Strict):
    name: str
    max_opset: int
    max_ir_version: int
    allowed_domains: list[str] = Field(default_factory=lambda: [""])
    allow_contrib_ops: bool = False
    io_dtype: Literal["float32"] = "float32"
    single_file: bool = True
    max_resource_mb: float = Field(128, gt=0)
    execution_provider: str = "CPUExecutionProvider"


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError("config.not_found", path=str(path))
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError("config.bad_yaml", path=str(path), detail=str(error).replace("\n", " ")) from error


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _validation_detail(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors())


def load_build_config(path: Path | None = None, project_dir: Path | None = None) -> BuildConfig:
    """Load the built-in settings, overridden by the project's file or ``path`` when given."""
    builtin = resources.builtin_dir("config") / "onnx_conversion.yaml"
    data = _read_yaml(builtin)
    override_path = Path(path) if path is not None else None
    if override_path is None and project_dir is not None:
        candidate = Path(project_dir) / "config" / "onnx_conversion.yaml"
        if candidate.is_file():
            override_path = candidate
    source = builtin
    if override_path is not None and override_path.resolve() != builtin.resolve():
        override = _read_yaml(override_path)
        if not isinstance(override, dict):
            raise ConfigError("config.invalid", path=str(override_path), detail="the top level must be a mapping")
        data = _deep_merge(data, override)
        source = override_path
    try:
        return BuildConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError("config.invalid", path=str(source), detail=_validation_detail(error)) from error


def load_pair(symbol: str, project_dir: Path | None = None) -> PairSpec:
    """Return the quote conventions of ``symbol``; an unknown symbol is an error listing the known ones."""
    path = resources.find_file("pairs.yaml", "config", project_dir)
    table = _read_yaml(path)
    key = symbol.strip().upper()
    if key not in table:
        raise ConfigError("pair.unknown", pair=symbol, path=str(path), known=", ".join(sorted(table)))
    try:
        return PairSpec.model_validate({"symbol": key, **table[key]})
    except ValidationError as error:
        raise ConfigError("config.invalid", path=str(path), detail=f"{key}: {_validation_detail(error)}") from error


def load_target_profile(name: str, project_dir: Path | None = None) -> TargetProfile:
    path = resources.find_file(f"{name}.yaml", "config/targets", project_dir)
    if not path.is_file():
        raise ConfigError("target.unknown", target=name, path=str(path))
    try:
        return TargetProfile.model_validate(_read_yaml(path))
    except ValidationError as error:
        raise ConfigError("config.invalid", path=str(path), detail=_validation_detail(error)) from error
