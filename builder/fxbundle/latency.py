"""Inference latency of an ONNX model under ONNX Runtime, and of its PyTorch source.

Each measurement runs in its own ``python -m fxbundle.latency`` process. ONNX Runtime's
intra-op threads spin on the CPU after a call, and they slow PyTorch (or another session) in
the same process, so neither runtime shares a process with the caller or with the other.

A measurement runs warm-up calls, which are excluded, and then ``samples`` timed calls of
batch 1. The result keeps every per-call latency, so :mod:`fxbundle.plots` can draw them.
The first call is also reported on its own because it includes lazy initialisation.

Warm-up modes:

- ``fixed``: exclude the first ``count`` calls.
- ``adaptive``: keep the latencies of the last 10 calls. Timing starts after the first call
  at which their coefficient of variation (population std / mean) is below 0.1, and that
  call is still excluded. If that never happens within ``max(200, 10 × count)`` calls, the
  first ``count`` calls are excluded as in fixed mode and the result carries a warning.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from fxbundle.config import LatencySettings
from fxbundle.errors import FxBundleError, GateFailed, UsageError
from fxbundle.i18n import t, translate
from fxbundle.sessions import create_session

logger = logging.getLogger(__name__)

WARMUP_MODES = ("fixed", "adaptive")
DEFAULT_SAMPLES = 1000
CPU_PROVIDER = "CPUExecutionProvider"

# Adaptive warm-up: the rolling window and the coefficient of variation that ends it.
ADAPTIVE_WINDOW = 10
ADAPTIVE_CV_THRESHOLD = 0.1
ADAPTIVE_MIN_CAP = 200
ADAPTIVE_CAP_FACTOR = 10

# Goals of a trustworthy measurement. The result reports whether each one was met.
WARMUP_SHARE_LIMIT = 0.05
CV_LIMIT = 0.15

DEFAULT_TARGET_P95_MS: float = LatencySettings.model_fields["target_p95_ms"].default
DEFAULT_WARN_P95_MS: float = LatencySettings.model_fields["warn_p95_ms"].default


# Operators that appear only in quantized graphs. Any of them marks the model as INT8.
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearMatMul",
        "QLinearConv",
        "QLinearAdd",
        "QLinearMul",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeLSTM",
        "DynamicQuantizeMatMul",
        "QGemm",
        "QAttention",
    }
)


class LatencyError(FxBundleError):
    """A model that cannot be timed, or a measurement process that failed: exit code 1."""


# --- Warm-up ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WarmupPolicy:
    """Rule for the calls excluded before timing starts.

    ``count`` is the number of excluded calls in fixed mode, and the fallback number in
    adaptive mode when the latencies never stabilize. ``max_calls`` caps the adaptive
    warm-up and defaults to ``max(200, 10 × count)``.
    """

    mode: str
    count: int
    window: int = ADAPTIVE_WINDOW
    cv_threshold: float = ADAPTIVE_CV_THRESHOLD
    max_calls: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in WARMUP_MODES:
            raise UsageError("latency.bad_warmup_mode", mode=self.mode, allowed=", ".join(WARMUP_MODES))
        if self.count < 0:
            raise UsageError("latency.bad_warmup_count", count=self.count)
        if self.window < 2:
            raise ValueError(f"the adaptive window needs at least 2 calls, got {self.window}")
        if self.cv_threshold <= 0:
            raise ValueError(f"the adaptive CV threshold must be positive, got {self.cv_threshold}")
        if self.max_calls is not None and self.max_calls < 1:
            raise ValueError(f"max_calls must be at least 1, got {self.max_calls}")

    @property
    def cap(self) -> int:
        """Maximum number of adaptive warm-up calls before the fallback count applies."""
        if self.max_calls is not None:
            return self.max_calls
        return max(ADAPTIVE_MIN_CAP, ADAPTIVE_CAP_FACTOR * self.count)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_calls": self.cap}


def default_warmup(provider: str, precision: str) -> tuple[str, int]:
    """Return the warm-up ``(mode, count)`` for an execution provider and model precision.

    ========================================  ========  ==========================
    situation                                 mode      count
    ========================================  ========  ==========================
    CPUExecutionProvider, FP32 or FP16        fixed     12 excluded calls
    INT8 model on the CPU                     adaptive  fallback 25 (range 20-30)
    any other provider, e.g. CUDA             adaptive  fallback 40 (range 30-50)
    ========================================  ========  ==========================

    On the CPU, most of the warm-up cost is the memory allocation of the first calls, which
    a fixed count covers. A GPU session's first calls also load kernels and may autotune
    them, and INT8 models warm up less predictably, so both wait for stable latencies and
    keep a larger fallback count. An INT8 model on a GPU gets the GPU row, whose count is
    larger. NOTE: the counts are estimates, not tuned on measurements. ``fxbundle bench
    --plot`` shows where a model's latencies settle.
    """
    if provider != CPU_PROVIDER:
        return "adaptive", 40
    if precision.lower() == "int8":
        return "adaptive", 25
    return "fixed", 12


def resolve_warmup_policy(provider: str, precision: str, warmup: int | None = None, mode: str | None = None) -> WarmupPolicy:
    """Build the warm-up policy from explicit settings, filling the gaps from :func:`default_warmup`.

    A count without a mode means fixed mode, which is what the ``warmup`` setting of older
    fxbundle versions did. A mode without a count takes the count of :func:`default_warmup`.
    """
    default_mode, default_count = default_warmup(provider, precision)
    if mode is None:
        mode = "fixed" if warmup is not None else default_mode
    return WarmupPolicy(mode=mode, count=default_count if warmup is None else warmup)


def coefficient_of_variation(values: Sequence[float]) -> float:
    """Return the population standard deviation divided by the mean, or 0.0 when the mean is 0."""
    array = np.asarray(values, dtype=np.float64)
    mean = float(array.mean())
    if mean == 0.0:
        return 0.0
    return float(array.std()) / mean


@dataclass(frozen=True)
class WarmupDecision:
    """Outcome of a warm-up: how many calls were excluded and why."""

    mode: str
    excluded: int
    calls_run: int
    stabilized: bool | None
    lowest_cv: float | None

    @property
    def fell_back(self) -> bool:
        """True when adaptive mode reached its cap and excluded the fallback count."""
        return self.stabilized is False


class WarmupDetector:
    """Decide call by call when the warm-up is over.

    Feed every latency to :meth:`add` until :attr:`done` is true. In the adaptive fallback
    case, more calls have run than are excluded, and the calls after the fallback count
    become the first timed calls.
    """

    def __init__(self, policy: WarmupPolicy) -> None:
        self.policy = policy
        self.calls = 0
        self._window: deque[float] = deque(maxlen=policy.window)
        self._lowest_cv: float | None = None
        self._excluded: int | None = None
        self._stabilized: bool | None = None
        if policy.mode == "fixed" and policy.count == 0:
            self._excluded = 0

    @property
    def done(self) -> bool:
        return self._excluded is not None

    def add(self, latency_ms: float) -> None:
        if self.done:
            raise RuntimeError("the warm-up is already over; time the call instead")
        self.calls += 1

        if self.policy.mode == "fixed":
            if self.calls >= self.policy.count:
                self._excluded = self.policy.count
            return

        self._window.append(latency_ms)
        if len(self._window) == self.policy.window:
            cv = coefficient_of_variation(self._window)
            self._lowest_cv = cv if self._lowest_cv is None else min(self._lowest_cv, cv)
            if cv < self.policy.cv_threshold:
                self._excluded = self.calls
                self._stabilized = True
                return
        if self.calls >= self.policy.cap:
            self._excluded = min(self.policy.count, self.calls)
            self._stabilized = False

    def decision(self) -> WarmupDecision:
        if self._excluded is None:
            raise RuntimeError("the warm-up is not over yet")
        return WarmupDecision(
            mode=self.policy.mode,
            excluded=self._excluded,
            calls_run=self.calls,
            stabilized=self._stabilized,
            lowest_cv=self._lowest_cv,
        )


def find_warmup_end(latencies_ms: Iterable[float], policy: WarmupPolicy) -> WarmupDecision | None:
    """Apply ``policy`` to a recorded latency series, or return None if it ends before a decision."""
    detector = WarmupDetector(policy)
    if detector.done:
        return detector.decision()
    for latency in latencies_ms:
        detector.add(float(latency))
        if detector.done:
            return detector.decision()
    return None


def time_calls(
    call: Callable[[], object],
    policy: WarmupPolicy,
    samples: int,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> tuple[list[float], WarmupDecision]:
    """Run ``call`` through the warm-up and ``samples`` timed calls, and return the latencies in ms.

    The returned list contains the excluded calls first, then exactly ``samples`` timed calls.
    ``clock`` returns nanoseconds and exists so that tests can script the latencies.
    """
    def timed_ms() -> float:
        started = clock()
        call()
        return (clock() - started) / 1e6

    detector = WarmupDetector(policy)
    latencies: list[float] = []
    while not detector.done:
        latencies.append(timed_ms())
        detector.add(latencies[-1])
    decision = detector.decision()

    needed = decision.excluded + samples
    while len(latencies) < needed:
        latencies.append(timed_ms())
    # In the adaptive fallback with few samples, the warm-up may have run more calls than needed.
    return latencies[:needed], decision


# --- Statistics and verdict -----------------------------------------------------------------


@dataclass(frozen=True)
class LatencyStats:
    """Summary of the timed calls in ms. ``std_ms`` is the population standard deviation."""

    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    std_ms: float
    cv: float


def summarize_latencies(measured_ms: Sequence[float]) -> LatencyStats:
    """Compute mean, percentiles (linear interpolation), min, max, std and CV of the timed calls."""
    array = np.asarray(measured_ms, dtype=np.float64)
    if array.size == 0:
        raise ValueError("no timed calls to summarize")
    p50, p95, p99 = np.percentile(array, [50, 95, 99])
    return LatencyStats(
        mean_ms=float(array.mean()),
        p50_ms=float(p50),
        p95_ms=float(p95),
        p99_ms=float(p99),
        min_ms=float(array.min()),
        max_ms=float(array.max()),
        std_ms=float(array.std()),
        cv=coefficient_of_variation(array),
    )


def latency_verdict(p95_ms: float, target_p95_ms: float, warn_p95_ms: float, fail_threshold_ms: float | None = None) -> str:
    """Classify p95 as "meets_target", "over_target", "warn" or "fail".

    A p95 equal to a threshold still passes it. "fail" is only possible when
    ``fail_threshold_ms`` is set, and it takes precedence over the other verdicts.
    """
    if fail_threshold_ms is not None and p95_ms > fail_threshold_ms:
        return "fail"
    if p95_ms > warn_p95_ms:
        return "warn"
    if p95_ms > target_p95_ms:
        return "over_target"
    return "meets_target"


@dataclass(frozen=True)
class LatencyThresholds:
    """p95 limits in ms: the target, the warning level ("consider INT8") and the optional gate."""

    target_p95_ms: float = DEFAULT_TARGET_P95_MS
    warn_p95_ms: float = DEFAULT_WARN_P95_MS
    fail_threshold_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("target_p95_ms", "warn_p95_ms", "fail_threshold_ms"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UsageError("latency.bad_threshold", name=name, value=value)


# --- Environment ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuInfo:
    """CPU model and instruction-set flags. A flag is None when the platform does not report flags."""

    model: str
    avx2: bool | None
    avx512f: bool | None
    vnni: bool | None


def parse_cpuinfo(text: str) -> CpuInfo:
    """Read the first processor's model name and flags from the text of Linux /proc/cpuinfo.

    VNNI counts as present with either ``avx512_vnni`` or ``avx_vnni`` (the AVX2-width variant).
    """
    model = "unknown"
    flags: set[str] | None = None
    for line in text.splitlines():
        name, separator, value = line.partition(":")
        if not separator:
            continue
        name = name.strip()
        if name == "model name" and model == "unknown":
            model = value.strip() or "unknown"
        elif name == "flags" and flags is None:
            flags = set(value.split())
    if flags is None:
        return CpuInfo(model=model, avx2=None, avx512f=None, vnni=None)
    return CpuInfo(
        model=model,
        avx2="avx2" in flags,
        avx512f="avx512f" in flags,
        vnni=bool({"avx512_vnni", "avx_vnni"} & flags),
    )


def read_cpu_info(path: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """Read the CPU description from ``path``.

    Without the file (outside Linux), the flags are None and the model name comes from the
    platform module.
    """
    try:
        info = parse_cpuinfo(path.read_text(errors="replace"))
    except OSError:
        info = CpuInfo(model="unknown", avx2=None, avx512f=None, vnni=None)
    if info.model == "unknown":
        info = CpuInfo(model=platform.processor() or "unknown", avx2=info.avx2, avx512f=info.avx512f, vnni=info.vnni)
    return info


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or from the platform module elsewhere."""
    return read_cpu_info().model


@dataclass(frozen=True)
class RuntimeEnvironment:
    """Runtime, execution provider, threads, CPU and versions behind a measurement.

    ``intra_op_threads`` is the configured count. When it is 0, ONNX Runtime chooses one
    thread per physical core (ONNX Runtime threading documentation), which the Python API
    does not report. ``intra_op_threads_effective`` is then ``os.cpu_count()``, the number
    of logical CPUs and so an upper bound, and ``intra_op_threads_note`` explains this.
    """

    runtime: str
    requested_provider: str
    provider: str
    providers: tuple[str, ...]
    intra_op_threads: int
    intra_op_threads_effective: int | None
    intra_op_threads_note: str
    inter_op_threads: int
    allow_spinning: str | None
    cpu: CpuInfo
    logical_cpus: int | None
    python_version: str
    onnxruntime_version: str | None
    torch_version: str | None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["providers"] = list(self.providers)
        return data


# --- Result ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyWarning:
    """Catalog key and parameters of a warning, rendered in the reader's language."""

    key: str
    params: dict[str, Any]

    def render(self, lang: str | None = None) -> str:
        return translate(self.key, lang, **self.params)


@dataclass(frozen=True)
class LatencyResult:
    """Statistics, verdict, warm-up and environment of one measurement, plus the raw latencies.

    ``warmup_calls`` is the number of excluded calls. ``warmup_share`` is
    ``warmup_calls / (warmup_calls + samples)``. ``warmup_share_ok`` and ``cv_ok`` tell
    whether the share stayed below 5 % and the CV of the timed calls below 0.15.
    """

    model: str
    runtime: str
    provider: str
    precision: str
    warmup_mode: str
    warmup_calls: int
    warmup_stabilized: bool | None
    warmup_policy: WarmupPolicy
    samples: int
    first_call_ms: float
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    std_ms: float
    cv: float
    warmup_share: float
    warmup_share_ok: bool
    cv_ok: bool
    thresholds: LatencyThresholds
    verdict: str
    warnings: tuple[LatencyWarning, ...]
    environment: RuntimeEnvironment
    warmup_latencies_ms: tuple[float, ...] = field(repr=False)
    measured_latencies_ms: tuple[float, ...] = field(repr=False)

    @property
    def all_latencies_ms(self) -> tuple[float, ...]:
        """Every call in order: the excluded warm-up calls, then the timed calls."""
        return self.warmup_latencies_ms + self.measured_latencies_ms

    def to_dict(self, include_raw: bool = False) -> dict[str, Any]:
        """Return a JSON-ready dict.

        The per-call latencies are included only with ``include_raw``, which keeps metadata files small.
        """
        data: dict[str, Any] = {
            "model": self.model,
            "runtime": self.runtime,
            "provider": self.provider,
            "precision": self.precision,
            "warmup_mode": self.warmup_mode,
            "warmup_calls": self.warmup_calls,
            "warmup_stabilized": self.warmup_stabilized,
            "warmup_policy": self.warmup_policy.to_dict(),
            "samples": self.samples,
            "first_call_ms": self.first_call_ms,
            "mean_ms": self.mean_ms,
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "p99_ms": self.p99_ms,
            "min_ms": self.min_ms,
            "max_ms": self.max_ms,
            "std_ms": self.std_ms,
            "cv": self.cv,
            "warmup_share": self.warmup_share,
            "warmup_share_ok": self.warmup_share_ok,
            "cv_ok": self.cv_ok,
            **asdict(self.thresholds),
            "verdict": self.verdict,
            "warnings": [warning.render("en") for warning in self.warnings],
            "environment": self.environment.to_dict(),
        }
        if include_raw:
            data["warmup_latencies_ms"] = list(self.warmup_latencies_ms)
            data["measured_latencies_ms"] = list(self.measured_latencies_ms)
        return data


def build_result(
    model: str,
    precision: str,
    policy: WarmupPolicy,
    decision: WarmupDecision,
    latencies_ms: Sequence[float],
    environment: RuntimeEnvironment,
    thresholds: LatencyThresholds,
) -> LatencyResult:
    """Turn the per-call latencies of a run into statistics, success indicators, verdict and warnings.

    ``latencies_ms`` contains every call in order. The first ``decision.excluded`` calls are the warm-up.
    """
    warmup = tuple(float(value) for value in latencies_ms[: decision.excluded])
    measured = tuple(float(value) for value in latencies_ms[decision.excluded :])
    stats = summarize_latencies(measured)
    share = len(warmup) / (len(warmup) + len(measured))
    verdict = latency_verdict(stats.p95_ms, thresholds.target_p95_ms, thresholds.warn_p95_ms, thresholds.fail_threshold_ms)

    warnings: list[LatencyWarning] = []
    if decision.fell_back:
        warnings.append(
            _warning(
                "latency.warmup_not_stable",
                model=model,
                calls=decision.calls_run,
                window=policy.window,
                lowest_cv="-" if decision.lowest_cv is None else f"{decision.lowest_cv:.3f}",
                threshold=policy.cv_threshold,
                excluded=decision.excluded,
            )
        )
    if verdict == "warn":
        warnings.append(_warning("latency.p95_high", model=model, p95=_round_ms(stats.p95_ms), limit=thresholds.warn_p95_ms))
    elif verdict == "over_target":
        warnings.append(_warning("latency.p95_over_target", model=model, p95=_round_ms(stats.p95_ms), target=thresholds.target_p95_ms))
    if share >= WARMUP_SHARE_LIMIT:
        warnings.append(
            _warning("latency.warmup_share_high", model=model, excluded=len(warmup), share=f"{share * 100:.1f}", limit=f"{WARMUP_SHARE_LIMIT * 100:g}")
        )
    if stats.cv >= CV_LIMIT:
        warnings.append(_warning("latency.cv_high", model=model, cv=f"{stats.cv:.3f}", limit=CV_LIMIT))

    return LatencyResult(
        model=model,
        runtime=environment.runtime,
        provider=environment.provider,
        precision=precision,
        warmup_mode=decision.mode,
        warmup_calls=decision.excluded,
        warmup_stabilized=decision.stabilized,
        warmup_policy=policy,
        samples=len(measured),
        first_call_ms=_round_ms(latencies_ms[0]),
        mean_ms=_round_ms(stats.mean_ms),
        p50_ms=_round_ms(stats.p50_ms),
        p95_ms=_round_ms(stats.p95_ms),
        p99_ms=_round_ms(stats.p99_ms),
        min_ms=_round_ms(stats.min_ms),
        max_ms=_round_ms(stats.max_ms),
        std_ms=_round_ms(stats.std_ms),
        cv=round(stats.cv, 4),
        warmup_share=round(share, 4),
        warmup_share_ok=share < WARMUP_SHARE_LIMIT,
        cv_ok=stats.cv < CV_LIMIT,
        thresholds=thresholds,
        verdict=verdict,
        warnings=tuple(warnings),
        environment=environment,
        warmup_latencies_ms=warmup,
        measured_latencies_ms=measured,
    )


def check_latency_gate(result: LatencyResult) -> None:
    """Raise GateFailed (exit code 3) when p95 is above the fail threshold.

    The exception's ``result`` attribute carries the measurement, so a caller can still report it.
    """
    if result.verdict != "fail":
        return
    error = GateFailed(
        "latency.gate_failed",
        model=result.model,
        p95=result.p95_ms,
        limit=result.thresholds.fail_threshold_ms,
        provider=result.provider,
    )
    error.result = result  # type: ignore[attr-defined]
    raise error


def _warning(key: str, /, **params: Any) -> LatencyWarning:
    return LatencyWarning(key, params)


def _round_ms(value: float) -> float:
    return round(float(value), 4)


# --- Model inspection --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInput:
    """The single float32 input of an ONNX model, with the batch axis fixed to 1."""

    name: str
    shape: tuple[int, ...]
    precision: str


def inspect_model(model_path: Path) -> ModelInput:
    """Read the input name, static shape and precision ("fp32", "fp16" or "int8") of an ONNX model.

    A dynamic batch axis (axis 0) becomes 1. Any other dynamic axis, more than one input or a
    non-float32 input raises LatencyError, because the EA feeds exactly one float32 tensor.
    """
    import onnx

    model_path = Path(model_path)
    if not model_path.is_file():
        raise LatencyError("latency.model_not_found", path=str(model_path))
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError, OSError and others for a bad file
        raise LatencyError("latency.model_unreadable", path=str(model_path), detail=_first_line(error)) from error

    initializer_names = {initializer.name for initializer in proto.graph.initializer}
    inputs = [value for value in proto.graph.input if value.name not in initializer_names]
    if len(inputs) != 1:
        raise LatencyError("latency.input_count", path=str(model_path), count=len(inputs))
    graph_input = inputs[0]
    tensor_type = graph_input.type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.FLOAT:
        dtype = onnx.TensorProto.DataType.Name(tensor_type.elem_type) if tensor_type.elem_type else "not a tensor"
        raise LatencyError("latency.input_dtype", path=str(model_path), name=graph_input.name, dtype=dtype)
    if not tensor_type.HasField("shape"):
        raise LatencyError("latency.input_no_shape", path=str(model_path), name=graph_input.name)

    dims = list(tensor_type.shape.dim)
    shape_text = "(" + ", ".join(dim.dim_param or (str(dim.dim_value) if dim.dim_value > 0 else "?") for dim in dims) + ")"
    shape: list[int] = []
    for axis, dim in enumerate(dims):
        if dim.dim_value > 0:
            shape.append(dim.dim_value)
        elif axis == 0:
            shape.append(1)
        else:
            raise LatencyError("latency.dynamic_dim", path=str(model_path), name=graph_input.name, shape=shape_text, axis=axis)
    return ModelInput(name=graph_input.name, shape=tuple(shape), precision=_graph_precision(proto))


def _graph_precision(proto: Any) -> str:
    import onnx

    if any(node.op_type in QUANTIZED_OPS for node in proto.graph.node):
        return "int8"
    element_types = {initializer.data_type for initializer in proto.graph.initializer}
    if element_types & {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}:
        return "int8"
    if onnx.TensorProto.FLOAT16 in element_types:
        return "fp16"
    return "fp32"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --- Measurement processes ---------------------------------------------------------------------


@dataclass(frozen=True)
class _ChildError:
    """An FxBundleError raised in the measurement process, sent back by class, key and parameters.

    FxBundleError takes keyword parameters, which the default exception pickling drops.
    """

    error_class: type
    key: str
    params: dict[str, Any]

    def rebuild(self) -> FxBundleError:
        return self.error_class(self.key, **self.params)


@dataclass(frozen=True)
class _RawMeasurement:
    latencies_ms: list[float]
    decision: WarmupDecision
    environment: RuntimeEnvironment
    precision: str


@dataclass(frozen=True)
class _OnnxJob:
    model_path: Path
    input_shape: tuple[int, ...]
    policy: WarmupPolicy
    samples: int
    provider: str
    intra_op_threads: int
    inter_op_threads: int
    allow_spinning: bool
    precision: str
    seed: int
    gpu_mem_limit_mb: int | None = None


@dataclass(frozen=True)
class _TorchJob:
    model: Path | Callable[[], Any]
    input_shape: tuple[int, ...] | None
    policy: WarmupPolicy
    samples: int
    device: str
    threads: int
    inter_op_threads: int
    trust_checkpoint: bool
    seed: int


def _run_isolated(job: _OnnxJob | _TorchJob, label: str) -> _RawMeasurement:
    """Run ``job`` in a new ``python -m fxbundle.latency`` process and return its measurement.

    The job and the result travel as pickle files in a private temporary directory. The
    child gets the caller's ``sys.path``, so it imports the same fxbundle and can unpickle a
    model factory from the caller's modules.
    """
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))

    with tempfile.TemporaryDirectory(prefix="fxbundle-latency-") as scratch:
        job_path = Path(scratch) / "job.pickle"
        result_path = Path(scratch) / "result.pickle"
        job_path.write_bytes(pickle.dumps({"sys_path": list(sys.path), "job": pickle.dumps(job)}))
        command = [sys.executable, "-m", "fxbundle.latency", str(job_path), str(result_path)]
        completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if completed.returncode != 0 or not result_path.is_file():
            logger.debug("measurement process for %s exited with code %s:\n%s", label, completed.returncode, completed.stderr)
            lines = [line.strip() for line in completed.stderr.splitlines() if line.strip()]
            detail = lines[-1] if lines else f"exit code {completed.returncode}"
            raise LatencyError("latency.process_failed", model=label, detail=detail)
        outcome = pickle.loads(result_path.read_bytes())

    if isinstance(outcome, _ChildError):
        raise outcome.rebuild()
    return outcome


def _child_main(arguments: Sequence[str]) -> int:
    """Entry point of the measurement process: read the job, measure, write the outcome."""
    job_path, result_path = (Path(argument) for argument in arguments)
    envelope = pickle.loads(job_path.read_bytes())
    sys.path[:0] = [entry for entry in envelope["sys_path"] if entry not in sys.path]
    job = pickle.loads(envelope["job"])
    if isinstance(job, _OnnxJob):
        outcome = _measure_onnx_in_child(job)
    else:
        outcome = _measure_torch_in_child(job)
    result_path.write_bytes(pickle.dumps(outcome))
    return 0


def _environment(
    runtime: str,
    requested: str,
    providers: Sequence[str],
    intra_op_threads: int,
    intra_effective: int | None,
    inter_op_threads: int,
    allow_spinning: str | None,
    onnxruntime_version: str | None = None,
    torch_version: str | None = None,
) -> RuntimeEnvironment:
    logical_cpus = os.cpu_count()
    note = ""
    if intra_effective is None:
        intra_effective = logical_cpus
        note = (
            f"intra_op_threads=0: ONNX Runtime chose the count (by default one per physical core); "
            f"os.cpu_count() = {logical_cpus} logical CPUs is an upper bound"
        )
    return RuntimeEnvironment(
        runtime=runtime,
        requested_provider=requested,
        provider=providers[0],
        providers=tuple(providers),
        intra_op_threads=intra_op_threads,
        intra_op_threads_effective=intra_effective,
        intra_op_threads_note=note,
        inter_op_threads=inter_op_threads,
        allow_spinning=allow_spinning,
        cpu=read_cpu_info(),
        logical_cpus=logical_cpus,
        python_version=platform.python_version(),
        onnxruntime_version=onnxruntime_version,
        torch_version=torch_version,
    )


def _open_session(job: _OnnxJob) -> Any:
    """Open a session with the job's threads and spinning setting on the requested provider."""
    session, _ = create_session(
        job.model_path,
        provider=job.provider,
        intra_op_threads=job.intra_op_threads,
        inter_op_threads=job.inter_op_threads,
        allow_spinning=job.allow_spinning,
        gpu_mem_limit_mb=job.gpu_mem_limit_mb,
    )
    return session


def _measure_onnx_in_child(job: _OnnxJob) -> _RawMeasurement | _ChildError:
    import onnxruntime as ort

    try:
        session = _open_session(job)
        input_name = session.get_inputs()[0].name
        batch = np.random.default_rng(job.seed).standard_normal(job.input_shape).astype(np.float32)
        feed = {input_name: batch}
        latencies, decision = time_calls(lambda: session.run(None, feed), job.policy, job.samples)
    except FxBundleError as error:
        return _ChildError(type(error), error.key, error.params)

    environment = _environment(
        runtime="onnxruntime",
        requested=job.provider,
        providers=session.get_providers(),
        intra_op_threads=job.intra_op_threads,
        intra_effective=job.intra_op_threads or None,
        inter_op_threads=job.inter_op_threads,
        allow_spinning="1" if job.allow_spinning else "0",
        onnxruntime_version=ort.__version__,
    )
    return _RawMeasurement(latencies, decision, environment, job.precision)


def _measure_torch_in_child(job: _TorchJob) -> _RawMeasurement | _ChildError:
    import torch

    try:
        if job.threads > 0:
            torch.set_num_threads(job.threads)
        if job.inter_op_threads > 0:
            torch.set_num_interop_threads(job.inter_op_threads)
        if job.device.startswith("cuda") and not torch.cuda.is_available():
            raise LatencyError("latency.torch_device_unavailable", device=job.device, version=torch.__version__)

        if isinstance(job.model, Path):
            from fxbundle.checkpoint import load_checkpoint

            checkpoint = load_checkpoint(job.model, trust=job.trust_checkpoint)
            model = checkpoint.model
            input_shape = job.input_shape or checkpoint.input_shape
        else:
            model = job.model()
            input_shape = job.input_shape
        model = model.eval().to(job.device)

        generator = np.random.default_rng(job.seed)
        sample = torch.from_numpy(generator.standard_normal(input_shape).astype(np.float32)).to(job.device)

        def call() -> None:
            model(sample)
            if job.device.startswith("cuda"):
                # CUDA calls are asynchronous, so the timing waits for the kernels to finish.
                # NOTE: this path has never run on a GPU.
                torch.cuda.synchronize()

        with torch.no_grad():
            latencies, decision = time_calls(call, job.policy, job.samples)
    except FxBundleError as error:
        return _ChildError(type(error), error.key, error.params)

    environment = _environment(
        runtime="pytorch",
        requested=job.device,
        providers=[job.device],
        intra_op_threads=job.threads,
        intra_effective=torch.get_num_threads(),
        inter_op_threads=torch.get_num_interop_threads(),
        allow_spinning=None,
        torch_version=torch.__version__,
    )
    return _RawMeasurement(latencies, decision, environment, "fp32")


def _check_counts(samples: int, threads: int) -> None:
    if samples < 1:
        raise UsageError("latency.bad_samples", samples=samples)
    if threads < 0:
        raise UsageError("latency.bad_threads", threads=threads)


def _finish(raw: _RawMeasurement, model: str, policy: WarmupPolicy, thresholds: LatencyThresholds) -> LatencyResult:
    result = build_result(model, raw.precision, policy, raw.decision, raw.latencies_ms, raw.environment, thresholds)
    logger.debug(
        t(
            "latency.measured",
            model=model,
            runtime=result.runtime,
            provider=result.provider,
            p50=result.p50_ms,
            p95=result.p95_ms,
            p99=result.p99_ms,
            samples=result.samples,
            excluded=result.warmup_calls,
        )
    )
    for warning in result.warnings:
        logger.warning(warning.render())
    check_latency_gate(result)
    return result


# --- Public measurement functions ------------------------------------------------------------


def measure_latency(
    model_path: Path,
    input_shape: tuple[int, ...],
    warmup: int | None = None,
    samples: int = DEFAULT_SAMPLES,
    provider: str = CPU_PROVIDER,
    intra_op_threads: int = 0,
    seed: int = 0,
    *,
    warmup_mode: str | None = None,
    precision: str | None = None,
    inter_op_threads: int = 1,
    allow_spinning: bool = True,
    target_p95_ms: float = DEFAULT_TARGET_P95_MS,
    warn_p95_ms: float = DEFAULT_WARN_P95_MS,
    fail_threshold_ms: float | None = None,
    gpu_mem_limit_mb: int | None = None,
) -> LatencyResult:
    """Time calls of an ONNX model on an ``input_shape`` input under ONNX Runtime, in a separate process.

    ``warmup`` and ``warmup_mode`` default by provider and precision (:func:`default_warmup`).
    ``precision`` ("fp32", "fp16" or "int8") is read from the graph when not given.
    ``allow_spinning`` sets the session config entry ``session.intra_op.allow_spinning``.
    Warnings are logged and returned in ``result.warnings``. Raises GateFailed when
    ``fail_threshold_ms`` is set and p95 is above it, and FxBundleError when the provider
    did not load, for example CUDA on a machine without a GPU.
    """
    model_path = Path(model_path)
    _check_counts(samples, intra_op_threads)
    thresholds = LatencyThresholds(target_p95_ms, warn_p95_ms, fail_threshold_ms)
    if precision is None:
        precision = inspect_model(model_path).precision
    policy = resolve_warmup_policy(provider, precision, warmup, warmup_mode)

    job = _OnnxJob(
        model_path=model_path.resolve(),
        input_shape=tuple(input_shape),
        policy=policy,
        samples=samples,
        provider=provider,
        intra_op_threads=intra_op_threads,
        inter_op_threads=inter_op_threads,
        allow_spinning=allow_spinning,
        precision=precision,
        seed=seed,
        gpu_mem_limit_mb=gpu_mem_limit_mb,
    )
    raw = _run_isolated(job, model_path.name)
    return _finish(raw, model_path.name, policy, thresholds)


def measure_torch_latency(
    model: Path | Callable[[], Any],
    input_shape: tuple[int, ...] | None = None,
    warmup: int | None = None,
    samples: int = DEFAULT_SAMPLES,
    threads: int = 0,
    seed: int = 0,
    *,
    warmup_mode: str | None = None,
    device: str = "cpu",
    inter_op_threads: int = 0,
    trust_checkpoint: bool = False,
    target_p95_ms: float = DEFAULT_TARGET_P95_MS,
    warn_p95_ms: float = DEFAULT_WARN_P95_MS,
    fail_threshold_ms: float | None = None,
) -> LatencyResult:
    """Time calls of a PyTorch model (eval mode, torch.no_grad) in a separate process.

    ``model`` is a checkpoint path, loaded with :func:`fxbundle.checkpoint.load_checkpoint`,
    or a function that builds the module. The function is pickled by reference for the
    measurement process, so it must be defined at module level in an importable module, not
    in a script run as ``__main__``. ``input_shape`` defaults to the checkpoint's batch-1
    shape and is required with a function. ``threads`` and ``inter_op_threads`` set torch's
    thread counts when above 0. The warm-up defaults are those of an FP32 model on the
    matching provider, and the thresholds work as in :func:`measure_latency`.
    """
    if not isinstance(model, (str, Path)) and input_shape is None:
        raise ValueError("input_shape is required when the model is given as a function")
    model = Path(model) if isinstance(model, str) else model
    label = model.name if isinstance(model, Path) else getattr(model, "__qualname__", repr(model))
    _check_counts(samples, threads)
    thresholds = LatencyThresholds(target_p95_ms, warn_p95_ms, fail_threshold_ms)
    provider = "CUDAExecutionProvider" if device.startswith("cuda") else CPU_PROVIDER
    policy = resolve_warmup_policy(provider, "fp32", warmup, warmup_mode)

    job = _TorchJob(
        model=model.resolve() if isinstance(model, Path) else model,
        input_shape=None if input_shape is None else tuple(input_shape),
        policy=policy,
        samples=samples,
        device=device,
        threads=threads,
        inter_op_threads=inter_op_threads,
        trust_checkpoint=trust_checkpoint,
        seed=seed,
    )
    raw = _run_isolated(job, label)
    return _finish(raw, label, policy, thresholds)


if __name__ == "__main__":
    # Import the package module rather than use this __main__ copy, so that the pickled
    # job classes and the functions that handle them are the same objects.
    from fxbundle.latency import _child_main as child_main

    sys.exit(child_main(sys.argv[1:]))
