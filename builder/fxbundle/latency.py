"""Inference latency of an ONNX model under ONNX Runtime: warm-up, then timed single calls."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fxbundle.sessions import create_session


@dataclass(frozen=True)
class LatencyResult:
    model: str
    provider: str
    providers: list[str]
    intra_op_threads: int
    warmup_calls: int
    samples: int
    first_call_ms: float
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    onnxruntime_version: str
    cpu: str

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or what the platform module knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def measure_latency(
    model_path: Path,
    input_shape: tuple[int, ...],
    warmup: int,
    samples: int,
    provider: str = "CPUExecutionProvider",
    intra_op_threads: int = 0,
    seed: int = 0,
) -> LatencyResult:
    """Time ``samples`` batch-1 calls after ``warmup`` excluded calls; the first call is reported apart."""
    session, info = create_session(model_path, provider=provider, intra_op_threads=intra_op_threads)
    input_name = session.get_inputs()[0].name
    feed = {input_name: np.random.default_rng(seed).standard_normal(input_shape).astype(np.float32)}

    started = time.perf_counter()
    session.run(None, feed)
    first_call_ms = (time.perf_counter() - started) * 1e3

    for _ in range(max(warmup - 1, 0)):
        session.run(None, feed)

    timings = np.empty(samples, dtype=np.float64)
    for index in range(samples):
        started = time.perf_counter()
        session.run(None, feed)
        timings[index] = (time.perf_counter() - started) * 1e3

    return LatencyResult(
        model=model_path.name,
        provider=info.providers[0],
        providers=list(info.providers),
        intra_op_threads=intra_op_threads,
        warmup_calls=warmup,
        samples=samples,
        first_call_ms=round(first_call_ms, 4),
        mean_ms=round(float(timings.mean()), 4),
        p50_ms=round(float(np.percentile(timings, 50)), 4),
        p95_ms=round(float(np.percentile(timings, 95)), 4),
        p99_ms=round(float(np.percentile(timings, 99)), 4),
        min_ms=round(float(timings.min()), 4),
        max_ms=round(float(timings.max()), 4),
        onnxruntime_version=info.onnxruntime_version,
        cpu=cpu_model(),
    )
