"""PNG charts of latency measurements, drawn with matplotlib's Agg backend.

The figures are built with ``matplotlib.figure.Figure`` and an Agg canvas, not with pyplot,
so they need no display and leave matplotlib's global backend alone.

NOTE: chart text is English only. matplotlib's bundled DejaVu fonts have no Japanese
glyphs, so Japanese labels would render as empty boxes on most machines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from fxbundle.latency import LatencyError, LatencyResult

WARMUP_COLOR = "tab:orange"
MEASURED_COLOR = "tab:blue"
P95_COLOR = "tab:red"
HISTOGRAM_BINS = 50

# Plain numbers (20, 30, 40) on log axes in place of matplotlib's default 2×10^1 labels.
PLAIN_NUMBER = FuncFormatter(lambda value, _position: f"{value:g}")


def plot_warmup(result: LatencyResult, path: Path) -> Path:
    """Write a PNG with the latency of every call and a histogram of warm-up vs timed calls.

    The top panel marks the warm-up boundary with a vertical line and p95 of the timed calls
    with a horizontal line. Both panels use a log latency axis when every latency is
    positive, because warm-up calls and stalls can be many times slower than the rest.
    Raises LatencyError when the file cannot be written.
    """
    path = Path(path)
    warmup = np.asarray(result.warmup_latencies_ms, dtype=np.float64)
    measured = np.asarray(result.measured_latencies_ms, dtype=np.float64)
    every_call = np.concatenate([warmup, measured])
    log_scale = bool(every_call.size) and bool(np.all(every_call > 0))

    figure = Figure(figsize=(10, 8), layout="constrained")
    FigureCanvasAgg(figure)
    calls_axes, histogram_axes = figure.subplots(2, 1)

    _draw_calls(calls_axes, result, warmup, measured, log_scale)
    _draw_histogram(histogram_axes, result, warmup, measured, every_call, log_scale)
    figure.suptitle(
        f"{result.model}: {result.runtime} on {result.provider}, p95 {result.p95_ms} ms, verdict {result.verdict}"
    )

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png", dpi=100)
    except OSError as error:
        raise LatencyError("latency.plot_not_written", path=str(path), detail=error.strerror or str(error)) from error
    return path


def _draw_calls(axes, result: LatencyResult, warmup: np.ndarray, measured: np.ndarray, log_scale: bool) -> None:
    """Draw the latency of each call in order, numbered from 1."""
    warmup_calls = np.arange(1, warmup.size + 1)
    measured_calls = np.arange(warmup.size + 1, warmup.size + measured.size + 1)
    if warmup.size:
        axes.plot(warmup_calls, warmup, ".", markersize=3, color=WARMUP_COLOR, label=f"warm-up ({warmup.size} calls, excluded)")
    axes.plot(measured_calls, measured, ".", markersize=3, color=MEASURED_COLOR, label=f"timed ({measured.size} calls)")
    # The boundary sits between the last excluded call and the first timed call.
    axes.axvline(warmup.size + 0.5, color="black", linestyle="--", linewidth=1, label=f"warm-up boundary ({result.warmup_mode})")
    axes.axhline(result.p95_ms, color=P95_COLOR, linewidth=1, label=f"p95 {result.p95_ms} ms")
    if log_scale:
        axes.set_yscale("log")
        _label_log_axis(axes.yaxis, np.concatenate([warmup, measured]))
    axes.set_xlabel("call")
    axes.set_ylabel("latency (ms)")
    axes.set_title("Latency per call")
    axes.legend(loc="upper right", fontsize="small")


def _draw_histogram(axes, result: LatencyResult, warmup: np.ndarray, measured: np.ndarray, every_call: np.ndarray, log_scale: bool) -> None:
    """Draw warm-up and timed latencies on shared bins, so their ranges compare directly."""
    low, high = float(every_call.min()), float(every_call.max())
    if high <= low:
        high = low + 1e-3
    if log_scale:
        bins = np.geomspace(low, high, HISTOGRAM_BINS + 1)
        axes.set_xscale("log")
        _label_log_axis(axes.xaxis, every_call)
    else:
        bins = np.linspace(low, high, HISTOGRAM_BINS + 1)
    if warmup.size:
        axes.hist(warmup, bins=bins, color=WARMUP_COLOR, alpha=0.7, label=f"warm-up ({warmup.size})")
    axes.hist(measured, bins=bins, color=MEASURED_COLOR, alpha=0.7, label=f"timed ({measured.size})")
    axes.axvline(result.p95_ms, color=P95_COLOR, linewidth=1, label=f"p95 {result.p95_ms} ms")
    # A log count axis keeps the few warm-up calls visible next to 1000 timed calls.
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(PLAIN_NUMBER)
    axes.set_xlabel("latency (ms)")
    axes.set_ylabel("calls")
    axes.set_title("Warm-up vs timed latencies")
    axes.legend(loc="upper right", fontsize="small")


def _label_log_axis(axis, values: np.ndarray) -> None:
    """Label a log axis with plain numbers, and its minor ticks too when the data spans less than a decade."""
    axis.set_major_formatter(PLAIN_NUMBER)
    if float(values.max()) < 10 * float(values.min()):
        axis.set_minor_formatter(PLAIN_NUMBER)
