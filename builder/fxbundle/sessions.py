"""ONNX Runtime sessions with an explicit execution provider and thread settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fxbundle.errors import FxBundleError


@dataclass(frozen=True)
class SessionInfo:
    requested_provider: str
    providers: tuple[str, ...]
    intra_op_threads: int
    inter_op_threads: int
    graph_optimization: str
    onnxruntime_version: str


SPINNING_CONFIG_KEY = "session.intra_op.allow_spinning"


def create_session(
    model: Path | bytes,
    provider: str = "CPUExecutionProvider",
    intra_op_threads: int = 0,
    graph_optimization: str = "ORT_ENABLE_ALL",
    inter_op_threads: int = 1,
    allow_spinning: bool | None = None,
    gpu_mem_limit_mb: int | None = None,
) -> tuple[ort.InferenceSession, SessionInfo]:
    """Open a session on ``provider`` and fail if ONNX Runtime silently chose another one.

    ``get_available_providers()`` lists CUDA whenever the GPU build is installed, even on a
    machine without a GPU. Only the session's own ``get_providers()`` shows what will run.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, graph_optimization)
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.log_severity_level = 3
    if allow_spinning is not None:
        # Spinning must be configured before the session exists; None keeps ORT's default.
        options.add_session_config_entry(SPINNING_CONFIG_KEY, "1" if allow_spinning else "0")
    providers: list = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    if provider == "CUDAExecutionProvider" and gpu_mem_limit_mb is not None:
        # NOTE: this path has never run on a GPU, because the development machine has none.
        # The option name and its unit (bytes) follow the CUDA execution provider's documentation.
        providers[0] = (provider, {"gpu_mem_limit": str(gpu_mem_limit_mb * 1024 * 1024)})
    source = str(model) if isinstance(model, Path) else model
    try:
        session = ort.InferenceSession(source, sess_options=options, providers=providers)
    except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph/RuntimeException types
        name = model.name if isinstance(model, Path) else "<in-memory model>"
        raise FxBundleError("session.load_failed", model=name, detail=str(error).strip().splitlines()[0]) from error

    actual = tuple(session.get_providers())
    if actual[0] != provider:
        raise FxBundleError("session.provider_unavailable", requested=provider, actual=", ".join(actual))
    info = SessionInfo(
        requested_provider=provider,
        providers=actual,
        intra_op_threads=intra_op_threads,
        inter_op_threads=inter_op_threads,
        graph_optimization=graph_optimization,
        onnxruntime_version=ort.__version__,
    )
    return session, info


def run(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    input_name = session.get_inputs()[0].name
    return session.run(None, {input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
