"""Command-line interface: parse options, call one library function, render its result.

Exit codes: 0 success; 1 error (bad input, failed step); 2 usage error; 3 a validation gate
failed and nothing was written. Warnings never change the exit code.
"""

from __future__ import annotations

import json
import logging
import sys
import signal
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from fxbundle import __version__
from fxbundle.config import LatencySettings
from fxbundle.errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, FxBundleError, UsageError
from fxbundle.i18n import LANGUAGES, current_language, detect_language, set_language, t
from fxbundle.logs import LOGGER_NAME, JSTFormatter

if TYPE_CHECKING:
    from fxbundle.latency import LatencyResult

app = typer.Typer(
    name="fxbundle",
    help="Turn a trained FX forecasting checkpoint into a validated MetaTrader 5 bundle.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

LangOption = typer.Option(None, "--lang", help="Message language: ja or en (default: FXBUNDLE_LANG, else the locale).")
JsonOption = typer.Option(False, "--json", help="Print a machine-readable summary on stdout.")


class ConsoleLogHandler(logging.Handler):
    """Print JST-stamped log lines through the rich console so they do not tear the progress bar."""

    def __init__(self, console: Console, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.console = console
        self.setFormatter(JSTFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        style = None
        if record.levelno >= logging.ERROR:
            style = "red"
        elif record.levelno == logging.WARNING:
            style = "yellow"
        self.console.print(self.format(record), markup=False, highlight=False, style=style, soft_wrap=True)


def _terminate(signum: int, frame: object) -> None:
    """Turn SIGTERM into SystemExit so the build's clean-up removes its staging directory."""
    raise SystemExit(128 + signum)


def _setup(lang: Optional[str], verbose: bool) -> Console:
    console = Console(stderr=True)
    if lang is not None and lang.strip().lower() not in LANGUAGES:
        console.print(f"error: --lang {lang} is not supported; use one of: {', '.join(LANGUAGES)}", markup=False, style="red")
        raise typer.Exit(EXIT_USAGE)
    set_language(detect_language(lang))
    signal.signal(signal.SIGTERM, _terminate)
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        if isinstance(handler, ConsoleLogHandler):
            logger.removeHandler(handler)
    logger.addHandler(ConsoleLogHandler(console, logging.DEBUG if verbose else logging.INFO))
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return console


def _fail(console: Console, error: BaseException, json_output: bool = False) -> typer.Exit:
    """Print the error in the user's language; the traceback goes to the debug log only.

    With ``--json`` the same error is also printed on stdout as ``{"error", "key", "exit_code"}``.
    """
    if json_output:
        is_known = isinstance(error, FxBundleError)
        payload = {
            "error": error.render(current_language()) if is_known else f"{type(error).__name__}: {error}",
            "key": error.key if is_known else None,
            "exit_code": error.exit_code if is_known else EXIT_ERROR,
        }
        typer.echo(json.dumps(payload, ensure_ascii=False))
    if isinstance(error, FxBundleError):
        console.print(t("cli.error", message=error.render(current_language())), markup=False, highlight=False, style="red", soft_wrap=True)
        logging.getLogger(LOGGER_NAME).debug("traceback:\n%s", "".join(traceback.format_exception(error)))
        return typer.Exit(error.exit_code)
    console.print(t("cli.unexpected", detail=f"{type(error).__name__}: {error}"), markup=False, highlight=False, style="red", soft_wrap=True)
    console.print("".join(traceback.format_exception(error)), markup=False, highlight=False)
    return typer.Exit(EXIT_ERROR)


@app.command()
def build(
    pair: str = typer.Option(..., "--pair", help="Symbol to build for, e.g. USDJPY (must be in config/pairs.yaml)."),
    model: Path = typer.Option(Path("models/usdjpy_example_training.pt"), "--model", help="Checkpoint (.pt) to convert."),
    config: Optional[Path] = typer.Option(None, "--config", help="Build settings YAML (default: ./config/onnx_conversion.yaml, else built-in)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="Model precision to ship: auto, fp32, fp16 or int8 (default: from config, auto: the fastest variant that passes the gates)."),
    test_data: Optional[Path] = typer.Option(None, "--test-data", help="Held-out data: a bars CSV (example feature set) or an .npz with X and y."),
    version: Optional[str] = typer.Option(None, "--version", help="Bundle version X.Y.Z (default: from config). An existing version is never overwritten."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: ./dist)."),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help="Allow a checkpoint that needs code execution to load (pickled module). Only for files you trust."),
    allow_pair_mismatch: bool = typer.Option(False, "--allow-pair-mismatch", help="Build for --pair even if the checkpoint was trained on another pair."),
    features_mqh: Optional[Path] = typer.Option(None, "--features-mqh", help="MQL5 include implementing the checkpoint's feature set, when fxbundle has none built in."),
    lang: Optional[str] = LangOption,
    json_output: bool = JsonOption,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print DEBUG log lines."),
) -> None:
    """Convert a checkpoint to ONNX, validate it and package it with an MT5 Expert Advisor."""
    from fxbundle.pipeline import BuildOptions, build as run_build

    console = _setup(lang, verbose)
    options = BuildOptions(
        pair=pair,
        model=model,
        config=config,
        precision=precision,
        test_data=test_data,
        version=version,
        out=out,
        trust_checkpoint=trust_checkpoint,
        allow_pair_mismatch=allow_pair_mismatch,
        features_mqh=features_mqh,
    )
    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
        console=console, transient=True, disable=not console.is_terminal,
    )
    task = progress.add_task(t("cli.building", pair=pair.upper()), total=10)

    def on_progress(label: str, done: int, total: int) -> None:
        progress.update(task, description=label, completed=done, total=total)

    try:
        with progress:
            result = run_build(options, on_progress=on_progress)
    except Exception as error:  # every failure is reported with its exit code
        raise _fail(console, error, json_output) from error

    summary = result.summary()
    if json_output:
        typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        _print_summary(summary)
    raise typer.Exit(EXIT_OK)


def _print_summary(summary: dict) -> None:
    console = Console()
    table = Table(title=t("summary.title"), show_header=False)
    table.add_column(style="bold")
    table.add_column()
    latency = summary["latency_ms"]
    accuracy = summary["accuracy"]
    table.add_row(t("summary.bundle"), summary["bundle"])
    table.add_row(t("summary.zip"), f"{summary['zip']}\nsha256 {summary['zip_sha256']}")
    table.add_row(t("summary.precision"), summary["precision"])
    table.add_row(t("summary.latency"), t("summary.latency_value", p50=latency["p50"], p95=latency["p95"], p99=latency["p99"], provider=summary["execution_provider"]))
    table.add_row(t("summary.accuracy"), t("summary.accuracy_value", degradation=f"{accuracy['degradation_pct']:.4f}", windows=accuracy["windows"], source=t(f"source.{accuracy['data_source']}")))
    table.add_row(t("summary.warnings"), str(len(summary["warnings"])))
    table.add_row(t("summary.wall_time"), t("summary.wall_time_value", seconds=summary["wall_seconds"]))
    console.print(table)


@app.command()
def verify(
    bundle_dir: Path = typer.Argument(..., help="Bundle directory (contains manifest.json)."),
    lang: Optional[str] = LangOption,
    json_output: bool = JsonOption,
) -> None:
    """Check every file of a bundle against its manifest (size and SHA-256)."""
    from fxbundle.bundle import verify_bundle
    from fxbundle.errors import BundleError

    console = _setup(lang, verbose=False)
    try:
        if not (bundle_dir / "manifest.json").is_file():
            raise BundleError("bundle.no_manifest", path=str(bundle_dir))
        problems = verify_bundle(bundle_dir)
    except Exception as error:  # every failure is reported with its exit code
        raise _fail(console, error) from error
    if json_output:
        typer.echo(json.dumps({"bundle": str(bundle_dir), "ok": not problems, "problems": problems}, indent=2, ensure_ascii=False))
    for problem in problems:
        console.print(t("verify.problem", problem=problem), markup=False, style="red")
    if problems:
        console.print(t("verify.failed", path=str(bundle_dir), count=len(problems)), markup=False, style="red")
        raise typer.Exit(EXIT_ERROR)
    console.print(t("verify.ok", path=str(bundle_dir)), markup=False)
    raise typer.Exit(EXIT_OK)


@app.command()
def bench(
    model: Path = typer.Argument(..., help="ONNX model to time. Only its batch axis may be dynamic, and it is set to 1."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Calls excluded before timing in fixed mode, or the fallback count in adaptive mode (default: by provider and precision)."),
    warmup_mode: Optional[str] = typer.Option(None, "--warmup-mode", help="fixed or adaptive (default: fixed when --warmup is given, else by provider and precision)."),
    samples: int = typer.Option(1000, "--samples", help="Number of timed calls after the warm-up."),
    threads: int = typer.Option(0, "--threads", help="Number of ONNX Runtime intra-op threads. 0 lets ONNX Runtime choose (one per physical core)."),
    provider: str = typer.Option("CPUExecutionProvider", "--provider", help="ONNX Runtime execution provider, e.g. CUDAExecutionProvider. Falling back to another provider is an error."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write a PNG of the per-call latencies and their histogram to this path."),
    target_p95_ms: float = typer.Option(LatencySettings().target_p95_ms, "--target-p95-ms", help="p95 target in ms."),
    warn_p95_ms: float = typer.Option(LatencySettings().warn_p95_ms, "--warn-p95-ms", help="p95 in ms above which a warning suggests INT8."),
    fail_p95_ms: Optional[float] = typer.Option(None, "--fail-p95-ms", help="p95 in ms above which the command fails with exit code 3 (default: no limit)."),
    lang: Optional[str] = LangOption,
    json_output: bool = JsonOption,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print DEBUG log lines."),
) -> None:
    """Measure the inference latency of an ONNX model with ONNX Runtime, in a separate process."""
    from fxbundle.errors import GateFailed
    from fxbundle.latency import inspect_model, measure_latency
    from fxbundle.plots import plot_warmup

    console = _setup(lang, verbose)
    gate_error: GateFailed | None = None
    try:
        # Options are checked before the model is read, so a usage error is reported first.
        _check_bench_options(provider, warmup, warmup_mode, samples, threads, target_p95_ms, warn_p95_ms, fail_p95_ms)
        model_input = inspect_model(model)
        progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal)
        with progress:
            progress.add_task(t("bench.running", model=model.name, samples=samples), total=None)
            try:
                result = measure_latency(
                    model,
                    model_input.shape,
                    warmup=warmup,
                    samples=samples,
                    provider=provider,
                    intra_op_threads=threads,
                    warmup_mode=warmup_mode,
                    precision=model_input.precision,
                    target_p95_ms=target_p95_ms,
                    warn_p95_ms=warn_p95_ms,
                    fail_threshold_ms=fail_p95_ms,
                )
            except GateFailed as error:
                # The measurement is still shown (verdict "fail") before the exit code 3.
                gate_error = error
                result = error.result
        if plot is not None:
            plot_warmup(result, plot)
    except Exception as error:  # every failure is reported with its exit code
        raise _fail(console, error) from error

    if json_output:
        summary = result.to_dict()
        summary["input_shape"] = list(model_input.shape)
        summary["plot"] = str(plot) if plot is not None else None
        typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        _print_bench(result, model_input.shape, plot)
    if gate_error is not None:
        raise _fail(console, gate_error)
    raise typer.Exit(EXIT_OK)


def _check_bench_options(
    provider: str,
    warmup: Optional[int],
    warmup_mode: Optional[str],
    samples: int,
    threads: int,
    target_p95_ms: float,
    warn_p95_ms: float,
    fail_p95_ms: Optional[float],
) -> None:
    """Raise UsageError (exit code 2) for an invalid bench option."""
    from fxbundle.latency import LatencyThresholds, resolve_warmup_policy

    resolve_warmup_policy(provider, "fp32", warmup, warmup_mode)
    LatencyThresholds(target_p95_ms, warn_p95_ms, fail_p95_ms)
    if samples < 1:
        raise UsageError("bench.bad_samples", samples=samples)
    if threads < 0:
        raise UsageError("bench.bad_threads", threads=threads)


def _cpu_flag(present: Optional[bool]) -> str:
    if present is None:
        return t("bench.flag_unknown")
    return t("bench.flag_present") if present else t("bench.flag_absent")


def _check_label(passed: bool) -> str:
    return t("bench.check_passed") if passed else t("bench.check_failed")


def _print_bench(result: LatencyResult, input_shape: tuple[int, ...], plot: Optional[Path]) -> None:
    environment = result.environment
    policy = result.warmup_policy
    table = Table(title=t("bench.title", model=result.model), show_header=False)
    table.add_column(style="bold")
    table.add_column()

    table.add_row(t("bench.model"), t("bench.model_value", precision=result.precision, shape=list(input_shape)))
    table.add_row(t("bench.provider"), t("bench.provider_value", provider=result.provider, requested=environment.requested_provider))
    table.add_row(
        t("bench.threads"),
        t(
            "bench.threads_value",
            intra=environment.intra_op_threads,
            effective=environment.intra_op_threads_effective,
            inter=environment.inter_op_threads,
            spinning=environment.allow_spinning,
        ),
    )
    if result.warmup_mode == "fixed":
        warmup_text = t("bench.warmup_fixed", excluded=result.warmup_calls)
    elif result.warmup_stabilized:
        warmup_text = t("bench.warmup_stable", excluded=result.warmup_calls, window=policy.window, threshold=policy.cv_threshold)
    else:
        warmup_text = t("bench.warmup_fallback", calls=policy.cap, excluded=result.warmup_calls)
    table.add_row(t("bench.warmup"), warmup_text)
    table.add_row(t("bench.first_call"), f"{result.first_call_ms} ms")
    table.add_row(
        t("bench.latency"),
        t("bench.latency_value", samples=result.samples, mean=result.mean_ms, p50=result.p50_ms, p95=result.p95_ms, p99=result.p99_ms),
    )
    table.add_row(t("bench.spread"), t("bench.spread_value", min=result.min_ms, max=result.max_ms, std=result.std_ms, cv=result.cv))
    table.add_row(
        t("bench.indicators"),
        t(
            "bench.indicators_value",
            share=f"{result.warmup_share * 100:.2f}",
            share_ok=_check_label(result.warmup_share_ok),
            cv=result.cv,
            cv_ok=_check_label(result.cv_ok),
        ),
    )
    thresholds = result.thresholds
    fail_limit = t("bench.no_limit") if thresholds.fail_threshold_ms is None else f"{thresholds.fail_threshold_ms} ms"
    table.add_row(
        t("bench.verdict"),
        t(
            "bench.verdict_value",
            verdict=t(f"bench.verdict_{result.verdict}"),
            target=thresholds.target_p95_ms,
            warn=thresholds.warn_p95_ms,
            fail=fail_limit,
        ),
    )
    cpu = environment.cpu
    table.add_row(t("bench.cpu"), t("bench.cpu_value", model=cpu.model, avx2=_cpu_flag(cpu.avx2), avx512f=_cpu_flag(cpu.avx512f), vnni=_cpu_flag(cpu.vnni)))
    table.add_row(t("bench.versions"), t("bench.versions_value", onnxruntime=environment.onnxruntime_version, python=environment.python_version))
    table.add_row(t("bench.warnings"), str(len(result.warnings)))
    if plot is not None:
        table.add_row(t("bench.plot"), str(plot))
    Console().print(table)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"fxbundle {__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _root(
    show_version: bool = typer.Option(False, "--tool-version", callback=_version_callback, is_eager=True, help="Print fxbundle's version and exit."),
) -> None:
    """fxbundle: MetaTrader 5 bundles from PyTorch FX forecasters."""


def main() -> None:
    app(prog_name="fxbundle")


if __name__ == "__main__":
    sys.exit(main())
