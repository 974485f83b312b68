"""Latency measurement: warm-up detection, statistics, verdicts, environment, plot and `fxbundle bench`.

Warm-up, statistics and verdict tests run on scripted latency series, so they are exact.
Tests that time real calls check structure and ordering only, never absolute speeds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from fxbundle.cli import app
from fxbundle.errors import EXIT_ERROR, EXIT_GATE_FAILED, EXIT_OK, EXIT_USAGE, GateFailed, UsageError
from fxbundle.latency import (
    CpuInfo,
    LatencyError,
    LatencyThresholds,
    RuntimeEnvironment,
    WarmupPolicy,
    build_result,
    check_latency_gate,
    coefficient_of_variation,
    default_warmup,
    find_warmup_end,
    inspect_model,
    latency_verdict,
    measure_latency,
    measure_torch_latency,
    parse_cpuinfo,
    resolve_warmup_policy,
    summarize_latencies,
    time_calls,
)
from fxbundle.plots import plot_warmup

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_SHAPE = (1, 4, 8)


def _matmul_model(path: Path, input_dims: list, weight_dtype=np.float32, extra_nodes=()) -> Path:
    """Save a one-MatMul ONNX model: input (dims) x weight (8, 3)."""
    weight = numpy_helper.from_array(np.ones((8, 3), dtype=weight_dtype), "weight")
    nodes = [helper.make_node("MatMul", ["input", "weight"], ["output"]), *extra_nodes]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_dims)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [*input_dims[:-1], 3])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture
def tiny_onnx(tmp_path: Path) -> Path:
    return _matmul_model(tmp_path / "tiny.onnx", ["batch", 4, 8])


@pytest.fixture
def dynamic_onnx(tmp_path: Path) -> Path:
    return _matmul_model(tmp_path / "dynamic.onnx", ["batch", "steps", 8])


def _environment() -> RuntimeEnvironment:
    return RuntimeEnvironment(
        runtime="onnxruntime",
        requested_provider="CPUExecutionProvider",
        provider="CPUExecutionProvider",
        providers=("CPUExecutionProvider",),
        intra_op_threads=1,
        intra_op_threads_effective=1,
        intra_op_threads_note="",
        inter_op_threads=1,
        allow_spinning="1",
        cpu=CpuInfo(model="test CPU", avx2=True, avx512f=False, vnni=None),
        logical_cpus=2,
        python_version="3.11.0",
        onnxruntime_version="1.0.0",
        torch_version=None,
    )


def _result(warmup: list[float], measured: list[float], thresholds: LatencyThresholds = LatencyThresholds()):
    """A result built from a scripted series with a fixed warm-up of len(warmup) calls."""
    policy = WarmupPolicy("fixed", len(warmup))
    decision = find_warmup_end(warmup + measured, policy)
    return build_result("scripted.onnx", "fp32", policy, decision, warmup + measured, _environment(), thresholds)


class ScriptedClock:
    """A nanosecond clock that makes the n-th timed call last durations_ms[n]."""

    def __init__(self, durations_ms: list[float]) -> None:
        self.durations_ns = [int(round(value * 1e6)) for value in durations_ms]
        self.now = 0
        self.reads = 0

    def __call__(self) -> int:
        # Reads alternate: the start of a call, then its end.
        if self.reads % 2 == 1:
            self.now += self.durations_ns[self.reads // 2]
        self.reads += 1
        return self.now


def invoke(*args: object):
    return CliRunner().invoke(app, [str(arg) for arg in args])


# --- default warm-up ---------------------------------------------------------------------------


def test_default_warmup_cpu_is_fixed():
    mode, count = default_warmup("CPUExecutionProvider", "fp32")
    assert mode == "fixed"
    assert 10 <= count <= 15


def test_default_warmup_cuda_is_adaptive():
    mode, count = default_warmup("CUDAExecutionProvider", "fp32")
    assert mode == "adaptive"
    assert 30 <= count <= 50


def test_default_warmup_int8_is_adaptive():
    mode, count = default_warmup("CPUExecutionProvider", "int8")
    assert mode == "adaptive"
    assert 20 <= count <= 30


def test_count_without_mode_means_fixed():
    policy = resolve_warmup_policy("CUDAExecutionProvider", "fp32", warmup=5)
    assert policy.mode == "fixed"
    assert policy.count == 5


def test_adaptive_cap_default():
    assert WarmupPolicy("adaptive", 12).cap == 200
    assert WarmupPolicy("adaptive", 40).cap == 400


def test_bad_warmup_mode_is_usage_error():
    with pytest.raises(UsageError) as caught:
        WarmupPolicy("sometimes", 3)
    assert caught.value.key == "latency.bad_warmup_mode"


# --- warm-up detection on scripted series ------------------------------------------------------


def test_fixed_mode_excludes_exactly_n():
    decision = find_warmup_end([50.0, 40.0, 30.0, 1.0, 1.0, 1.0, 1.0], WarmupPolicy("fixed", 5))
    assert decision.excluded == 5
    assert decision.stabilized is None


def test_fixed_zero_excludes_nothing():
    decision = find_warmup_end([], WarmupPolicy("fixed", 0))
    assert decision.excluded == 0


def test_adaptive_ends_when_cv_below_threshold():
    slow_start = [100.0, 80.0, 60.0, 40.0, 30.0, 20.0]
    stable = [10.0, 11.0] * 20  # CV 0.5 / 10.5 = 0.048
    decision = find_warmup_end(slow_start + stable, WarmupPolicy("adaptive", 25))
    # The first window without any slow-start call ends at call 6 + 10 = 16.
    assert decision.excluded == 16
    assert decision.stabilized is True


def test_adaptive_window_with_slow_call():
    series = [20.0] + [10.0, 11.0] * 5
    assert coefficient_of_variation(series[:10]) >= 0.1
    decision = find_warmup_end(series, WarmupPolicy("adaptive", 25))
    assert decision.excluded == 11


def test_adaptive_cv_at_threshold_not_stable():
    series = [9.0, 11.0] * 5  # mean 10, population std 1: CV exactly 0.1
    assert coefficient_of_variation(series) == pytest.approx(0.1)
    assert find_warmup_end(series, WarmupPolicy("adaptive", 3)) is None


def test_adaptive_falls_back_when_never_stable():
    noisy = [5.0, 15.0] * 200  # CV 0.5 throughout
    decision = find_warmup_end(noisy, WarmupPolicy("adaptive", 25))
    assert decision.calls_run == 250  # max(200, 10 x 25)
    assert decision.excluded == 25
    assert decision.fell_back is True
    assert decision.lowest_cv == pytest.approx(0.5)


def test_adaptive_fallback_warning_in_result():
    policy = WarmupPolicy("adaptive", 3, max_calls=20)
    series = [5.0, 15.0] * 20
    decision = find_warmup_end(series, policy)
    result = build_result("noisy.onnx", "fp32", policy, decision, series, _environment(), LatencyThresholds())
    keys = [warning.key for warning in result.warnings]
    assert "latency.warmup_not_stable" in keys
    assert result.warmup_stabilized is False
    assert result.warmup_calls == 3


def test_time_calls_fixed_runs_warmup_plus_samples():
    calls = []
    latencies, decision = time_calls(lambda: calls.append(1), WarmupPolicy("fixed", 7), samples=20)
    assert len(calls) == 27
    assert len(latencies) == 27
    assert decision.excluded == 7


def test_time_calls_adaptive_uses_scripted_latencies():
    series = [100.0, 80.0, 60.0, 40.0, 30.0, 20.0] + [10.0, 11.0] * 20
    latencies, decision = time_calls(lambda: None, WarmupPolicy("adaptive", 25), samples=8, clock=ScriptedClock(series))
    assert decision.excluded == 16
    assert latencies == pytest.approx(series[:24])


def test_time_calls_fallback_keeps_later_calls():
    series = [5.0, 15.0] * 20
    policy = WarmupPolicy("adaptive", 3, max_calls=12)
    latencies, decision = time_calls(lambda: None, policy, samples=4, clock=ScriptedClock(series))
    assert decision.excluded == 3
    assert decision.calls_run == 12
    # The 9 calls run after the fallback count are timed calls, cut to the 4 requested.
    assert latencies == pytest.approx(series[:7])


# --- statistics, success indicators, verdicts ------------------------------------------------------


def test_percentiles_on_known_series():
    stats = summarize_latencies([float(value) for value in range(1, 101)])
    assert stats.p50_ms == pytest.approx(50.5)
    assert stats.p95_ms == pytest.approx(95.05)
    assert stats.p99_ms == pytest.approx(99.01)
    assert stats.min_ms == 1.0
    assert stats.max_ms == 100.0


def test_cv_on_known_series():
    stats = summarize_latencies([10.0, 11.0] * 50)
    assert stats.mean_ms == pytest.approx(10.5)
    assert stats.std_ms == pytest.approx(0.5)
    assert stats.cv == pytest.approx(0.5 / 10.5)


def test_success_indicators_hold():
    result = _result([100.0, 90.0], [10.0, 11.0] * 50)
    assert result.warmup_share == pytest.approx(2 / 102, abs=1e-4)
    assert result.warmup_share_ok is True
    assert result.cv_ok is True


def test_success_indicators_fail():
    result = _result([100.0] * 10, [float(value) for value in range(1, 101)])
    assert result.warmup_share == pytest.approx(10 / 110, abs=1e-4)
    assert result.warmup_share_ok is False
    assert result.cv_ok is False
    keys = {warning.key for warning in result.warnings}
    assert keys == {"latency.warmup_share_high", "latency.cv_high", "latency.p95_high"}


def test_first_call_reported_apart():
    result = _result([42.0, 3.0], [1.0] * 50)
    assert result.first_call_ms == 42.0
    assert result.max_ms == 1.0


@pytest.mark.parametrize(
    ("p95", "fail", "expected"),
    [
        (5.0, None, "meets_target"),
        (10.0, None, "meets_target"),
        (12.0, None, "over_target"),
        (15.0, None, "over_target"),
        (16.0, None, "warn"),
        (16.0, 20.0, "warn"),
        (25.0, 20.0, "fail"),
        (25.0, None, "warn"),
    ],
)
def test_verdict_thresholds(p95, fail, expected):
    assert latency_verdict(p95, target_p95_ms=10.0, warn_p95_ms=15.0, fail_threshold_ms=fail) == expected


def test_warn_verdict_suggests_int8():
    result = _result([], [16.0] * 100)
    assert result.verdict == "warn"
    messages = [warning.render("en") for warning in result.warnings]
    assert any("consider INT8" in message for message in messages)


def test_over_target_warning():
    result = _result([], [12.0] * 100)
    assert result.verdict == "over_target"
    assert [warning.key for warning in result.warnings] == ["latency.p95_over_target"]


def test_fail_threshold_raises_gate_failed():
    result = _result([], [30.0] * 100, LatencyThresholds(fail_threshold_ms=20.0))
    assert result.verdict == "fail"
    with pytest.raises(GateFailed) as caught:
        check_latency_gate(result)
    assert caught.value.exit_code == 3
    assert caught.value.result is result


def test_gate_passes_below_fail_threshold():
    result = _result([], [18.0] * 100, LatencyThresholds(fail_threshold_ms=20.0))
    check_latency_gate(result)
    assert result.verdict == "warn"


def test_bad_threshold_is_usage_error():
    with pytest.raises(UsageError):
        LatencyThresholds(target_p95_ms=0.0)


def test_to_dict_omits_raw_latencies():
    result = _result([5.0], [1.0] * 20)
    summary = result.to_dict()
    assert "measured_latencies_ms" not in summary
    assert "warmup_latencies_ms" not in summary
    assert json.loads(json.dumps(summary))["p95_ms"] == 1.0


def test_to_dict_with_raw_latencies():
    result = _result([5.0], [1.0] * 20)
    summary = result.to_dict(include_raw=True)
    assert summary["warmup_latencies_ms"] == [5.0]
    assert len(summary["measured_latencies_ms"]) == 20


# --- CPU flags ------------------------------------------------------------------------------------

INTEL_CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512dq avx512_vnni
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512dq avx512_vnni
"""

ALDER_LAKE_CPUINFO = """\
processor\t: 0
model name\t: 12th Gen Intel(R) Core(TM) i7-12700H
flags\t\t: fpu sse2 avx avx2 fma avx_vnni
"""

OLD_CPUINFO = """\
processor\t: 0
model name\t: Intel(R) Core(TM) i5-2500 CPU @ 3.30GHz
flags\t\t: fpu sse2 avx
"""

ARM_CPUINFO = """\
processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32
CPU implementer\t: 0x41
"""


def test_cpuinfo_avx512_vnni():
    info = parse_cpuinfo(INTEL_CPUINFO)
    assert info.model == "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"
    assert info.avx2 is True
    assert info.avx512f is True
    assert info.vnni is True


def test_cpuinfo_avx_vnni_without_avx512():
    info = parse_cpuinfo(ALDER_LAKE_CPUINFO)
    assert info.avx512f is False
    assert info.vnni is True


def test_cpuinfo_without_avx2():
    info = parse_cpuinfo(OLD_CPUINFO)
    assert info.avx2 is False
    assert info.avx512f is False
    assert info.vnni is False


def test_cpuinfo_without_flags_is_unknown():
    info = parse_cpuinfo(ARM_CPUINFO)
    assert info.model == "unknown"
    assert info.avx2 is None
    assert info.vnni is None


# --- model inspection ---------------------------------------------------------------------------


def test_inspect_fixes_batch_to_one(tiny_onnx):
    model_input = inspect_model(tiny_onnx)
    assert model_input.shape == TINY_SHAPE
    assert model_input.precision == "fp32"


def test_inspect_rejects_dynamic_non_batch_dim(dynamic_onnx):
    with pytest.raises(LatencyError) as caught:
        inspect_model(dynamic_onnx)
    assert caught.value.key == "latency.dynamic_dim"
    assert caught.value.params["axis"] == 1


def test_inspect_detects_fp16(tmp_path):
    cast = helper.make_node("Cast", ["weight"], ["weight_fp16"], to=TensorProto.FLOAT16)
    path = _matmul_model(tmp_path / "half.onnx", ["batch", 4, 8], extra_nodes=[cast])
    proto = onnx.load(str(path))
    proto.graph.initializer.append(numpy_helper.from_array(np.ones(2, dtype=np.float16), "half_constant"))
    onnx.save(proto, str(path))
    assert inspect_model(path).precision == "fp16"


def test_inspect_detects_int8(tmp_path):
    quantize = helper.make_node("QuantizeLinear", ["input", "scale"], ["quantized"])
    path = _matmul_model(tmp_path / "int8.onnx", ["batch", 4, 8], extra_nodes=[quantize])
    assert inspect_model(path).precision == "int8"


# --- real measurements in a separate process ------------------------------------------------------


def test_measure_fixed_warmup(tiny_onnx):
    result = measure_latency(tiny_onnx, TINY_SHAPE, warmup=4, samples=30)
    assert result.warmup_mode == "fixed"
    assert result.warmup_calls == 4
    assert len(result.warmup_latencies_ms) == 4
    assert len(result.measured_latencies_ms) == 30
    assert result.samples == 30


def test_measure_percentiles_ordered(tiny_onnx):
    result = measure_latency(tiny_onnx, TINY_SHAPE, warmup=2, samples=50)
    assert 0 < result.min_ms
    assert result.min_ms <= result.p50_ms
    assert result.p50_ms <= result.p95_ms
    assert result.p95_ms <= result.p99_ms
    assert result.p99_ms <= result.max_ms
    assert result.first_call_ms > 0


def test_measure_adaptive_records_decision(tiny_onnx):
    result = measure_latency(tiny_onnx, TINY_SHAPE, samples=20, warmup_mode="adaptive")
    assert result.warmup_mode == "adaptive"
    assert result.warmup_stabilized in (True, False)
    assert result.warmup_calls >= 1
    assert len(result.warmup_latencies_ms) == result.warmup_calls


def test_measure_records_environment(tiny_onnx):
    result = measure_latency(tiny_onnx, TINY_SHAPE, warmup=1, samples=10, intra_op_threads=1, allow_spinning=False)
    environment = result.environment
    assert environment.provider == "CPUExecutionProvider"
    assert environment.requested_provider == "CPUExecutionProvider"
    assert environment.intra_op_threads == 1
    assert environment.intra_op_threads_effective == 1
    assert environment.inter_op_threads == 1
    assert environment.allow_spinning == "0"
    assert environment.onnxruntime_version
    assert environment.python_version


def test_measure_default_threads_note(tiny_onnx):
    result = measure_latency(tiny_onnx, TINY_SHAPE, warmup=1, samples=10)
    assert result.environment.intra_op_threads == 0
    assert result.environment.allow_spinning == "1"
    assert "os.cpu_count()" in result.environment.intra_op_threads_note


def test_measure_logs_warnings(tiny_onnx):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    latency_logger = logging.getLogger("fxbundle.latency")
    latency_logger.addHandler(handler)
    try:
        # A warning level of 1 ns makes every real measurement exceed it.
        result = measure_latency(tiny_onnx, TINY_SHAPE, warmup=1, samples=10, target_p95_ms=1e-6, warn_p95_ms=1e-6)
    finally:
        latency_logger.removeHandler(handler)
    assert result.verdict == "warn"
    assert any("consider INT8" in record.getMessage() for record in records)


def test_measure_missing_model_is_error(tmp_path):
    with pytest.raises(LatencyError) as caught:
        measure_latency(tmp_path / "absent.onnx", TINY_SHAPE, warmup=1, samples=5)
    assert caught.value.key == "latency.model_not_found"


def _small_linear_model():
    """Module-level factory, so that the measurement process can unpickle it by reference."""
    import torch

    return torch.nn.Linear(8, 3)


def test_torch_latency_from_factory():
    result = measure_torch_latency(_small_linear_model, input_shape=(1, 8), warmup=1, samples=5)
    assert result.runtime == "pytorch"
    assert result.model == "_small_linear_model"
    assert result.samples == 5


def test_torch_latency_from_checkpoint(tiny_checkpoint):
    result = measure_torch_latency(tiny_checkpoint, warmup=2, samples=5, threads=1)
    assert result.runtime == "pytorch"
    assert result.warmup_calls == 2
    assert result.samples == 5
    assert result.environment.intra_op_threads_effective == 1
    assert result.environment.torch_version


# --- plot --------------------------------------------------------------------------------------------


def test_plot_writes_png(tmp_path):
    result = _result([40.0, 20.0, 12.0], [10.0, 11.0, 10.5] * 40)
    path = plot_warmup(result, tmp_path / "plots" / "warmup.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_without_warmup_calls(tmp_path):
    result = _result([], [10.0, 11.0] * 20)
    path = plot_warmup(result, tmp_path / "no_warmup.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_unwritable_path_is_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    result = _result([5.0], [1.0] * 20)
    with pytest.raises(LatencyError) as caught:
        plot_warmup(result, blocker / "warmup.png")
    assert caught.value.key == "latency.plot_not_written"


# --- fxbundle bench -------------------------------------------------------------------------------------


def test_bench_json_fields(tiny_onnx, tmp_path):
    plot = tmp_path / "bench.png"
    result = invoke("bench", tiny_onnx, "--samples", 25, "--warmup", 3, "--threads", 1, "--plot", plot, "--json")
    assert result.exit_code == EXIT_OK, result.stderr
    summary = json.loads(result.stdout)
    assert summary["samples"] == 25
    assert summary["warmup_calls"] == 3
    assert summary["warmup_mode"] == "fixed"
    assert summary["input_shape"] == [1, 4, 8]
    assert summary["provider"] == "CPUExecutionProvider"
    assert summary["verdict"] in {"meets_target", "over_target", "warn"}
    assert summary["environment"]["intra_op_threads"] == 1
    assert "measured_latencies_ms" not in summary
    assert plot.read_bytes()[:8] == PNG_SIGNATURE


def test_bench_table_output(tiny_onnx):
    result = invoke("bench", tiny_onnx, "--samples", 10, "--warmup-mode", "adaptive", "--lang", "ja")
    assert result.exit_code == EXIT_OK, result.stderr
    assert "ウォームアップ" in result.stdout


def test_bench_missing_file_exit_1(tmp_path):
    result = invoke("bench", tmp_path / "absent.onnx")
    assert result.exit_code == EXIT_ERROR
    assert "not found" in result.stderr


def test_bench_unreadable_file_exit_1(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    result = invoke("bench", broken)
    assert result.exit_code == EXIT_ERROR
    assert "cannot be read as an ONNX model" in result.stderr


def test_bench_bad_warmup_mode_exit_2(tiny_onnx):
    result = invoke("bench", tiny_onnx, "--warmup-mode", "sometimes")
    assert result.exit_code == EXIT_USAGE
    assert "fixed, adaptive" in result.stderr


def test_bench_bad_samples_exit_2(tiny_onnx):
    result = invoke("bench", tiny_onnx, "--samples", 0)
    assert result.exit_code == EXIT_USAGE
    assert "--samples 0" in result.stderr


def test_bench_dynamic_dim_exit_1(dynamic_onnx):
    result = invoke("bench", dynamic_onnx, "--samples", 5)
    assert result.exit_code == EXIT_ERROR
    assert "static dimensions except batch" in result.stderr


def test_bench_fail_threshold_exit_3(tiny_onnx):
    # A fail threshold of 1 ns makes every real measurement fail the gate.
    result = invoke("bench", tiny_onnx, "--samples", 10, "--warmup", 1, "--fail-p95-ms", 1e-6, "--json")
    assert result.exit_code == EXIT_GATE_FAILED
    assert json.loads(result.stdout)["verdict"] == "fail"
    assert "latency gate failed" in result.stderr


def test_bench_cuda_without_gpu_exit_1(tiny_onnx):
    if Path("/dev/nvidia0").exists():
        pytest.skip("a GPU is present, so CUDAExecutionProvider may really run")
    result = invoke("bench", tiny_onnx, "--samples", 5, "--provider", "CUDAExecutionProvider")
    assert result.exit_code == EXIT_ERROR
    assert "CUDAExecutionProvider is not available" in result.stderr
