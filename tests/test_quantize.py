"""INT8 variants (dynamic with DynamicQuantizeLSTM, static QDQ), CPU detection and loading in ONNX Runtime 1.15."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from fxbundle.checkpoint import load_checkpoint
from fxbundle.config import ExportSettings, FP16Settings, load_target_profile
from fxbundle.errors import ExportError
from fxbundle.export import check_target_profile, export_onnx
from fxbundle.precision import Notice, make_fp16
from fxbundle.quantize import (
    STATUS_CONTRIB,
    STATUS_STANDARD,
    allowed_in_target,
    cpu_has_vnni,
    default_reduce_range,
    output_path_nodes,
    quantize_dynamic_int8,
    quantize_static_qdq,
    quantized_graph_outputs,
)
from fxbundle.sessions import create_session, run

CPUINFO_VNNI = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu vme sse2 avx avx2 avx512f avx512bw avx512_vnni
"""
CPUINFO_AVX_VNNI = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx_vnni\n"
CPUINFO_AMX_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx2 amx_bf16 amx_tile amx_int8\n"
CPUINFO_AVX2 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz (vnni not in flags)
flags\t\t: fpu vme sse2 avx avx2 fma
"""
CPUINFO_ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes asimddp\nCPU implementer\t: 0x41\n"


@pytest.fixture(scope="module")
def lstm_onnx(tmp_path_factory) -> Path:
    """The tiny MultiTFLSTMModel exported as the pipeline exports it."""
    import torch

    from conftest import tiny_payload

    folder = tmp_path_factory.mktemp("lstm")
    torch.save(tiny_payload(), folder / "tiny.pt")
    checkpoint = load_checkpoint(folder / "tiny.pt")
    return export_onnx(checkpoint.model, checkpoint.input_shape, folder / "tiny.onnx", ExportSettings()).path


def _windows(count: int, seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((count, 5, 360, 52)) * scale).astype(np.float32)


@pytest.fixture(scope="module")
def dynamic_variant(lstm_onnx, tmp_path_factory):
    return quantize_dynamic_int8(lstm_onnx, tmp_path_factory.mktemp("dynamic") / "tiny_int8_dynamic.onnx")


@pytest.fixture(scope="module")
def static_variant(lstm_onnx, tmp_path_factory):
    batches = [_windows(4, seed=10), _windows(4, seed=11)]
    return quantize_static_qdq(lstm_onnx, tmp_path_factory.mktemp("static") / "tiny_int8_static.onnx", batches, "MinMax")


@pytest.fixture(scope="module")
def fp16_variant(lstm_onnx, tmp_path_factory):
    return make_fp16(lstm_onnx, tmp_path_factory.mktemp("fp16") / "tiny_fp16.onnx", FP16Settings())


def _opset_domains(path: Path) -> set[str]:
    return {entry.domain for entry in onnx.load(str(path)).opset_import}


# --- CPU detection ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (CPUINFO_VNNI, True),
        (CPUINFO_AVX_VNNI, True),
        (CPUINFO_AMX_ONLY, True),
        (CPUINFO_AVX2, False),
        (CPUINFO_ARM, False),
        ("", False),
    ],
    ids=["avx512_vnni", "avx_vnni", "amx", "avx2", "arm", "empty"],
)
def test_cpu_has_vnni_parses_flags(text, expected):
    assert cpu_has_vnni(text) is expected


@pytest.mark.parametrize(
    ("text", "machine", "expected"),
    [
        (CPUINFO_VNNI, "x86_64", False),
        (CPUINFO_AVX2, "x86_64", True),
        (CPUINFO_ARM, "aarch64", False),
        ("", "AMD64", True),
        ("", "arm64", False),
    ],
    ids=["x86-vnni", "x86-no-vnni", "arm", "no-cpuinfo-x86", "no-cpuinfo-arm"],
)
def test_reduce_range_follows_vnni(text, machine, expected):
    assert default_reduce_range(text, machine=machine) is expected


def test_cpu_has_vnni_reads_this_machine():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    assert cpu_has_vnni() is cpu_has_vnni(cpuinfo.read_text())


# --- dynamic -------------------------------------------------------------------------------------


def test_dynamic_makes_dynamic_quantize_lstm(dynamic_variant):
    assert dynamic_variant.contrib_ops == ["com.microsoft:DynamicQuantizeLSTM"]
    assert dynamic_variant.op_types["com.microsoft:DynamicQuantizeLSTM"] == 10
    assert "LSTM" not in dynamic_variant.op_types


def test_dynamic_marked_unverified(dynamic_variant):
    assert dynamic_variant.precision == "int8-dynamic"
    assert dynamic_variant.status == STATUS_CONTRIB
    assert STATUS_CONTRIB == "contrib op, unverified in terminal"
    assert [notice.key for notice in dynamic_variant.warnings] == ["int8.contrib_unverified", "int8.cpu_dependent"]


def test_dynamic_excluded_without_contrib_ops(dynamic_variant):
    assert allowed_in_target(dynamic_variant, allow_contrib_ops=False) is False
    assert allowed_in_target(dynamic_variant, allow_contrib_ops=True) is True


def test_dynamic_fails_mt5_profile(dynamic_variant):
    problems = check_target_profile(dynamic_variant.path, load_target_profile("mt5"))
    assert any("com.microsoft:DynamicQuantizeLSTM" in problem for problem in problems)


def test_dynamic_passes_checker_and_loads(dynamic_variant):
    onnx.checker.check_model(str(dynamic_variant.path), full_check=True)
    session, _ = create_session(dynamic_variant.path)
    assert session.get_outputs()[0].name == "output"


def test_dynamic_ir_and_opsets(dynamic_variant):
    proto = onnx.load(str(dynamic_variant.path))
    assert proto.ir_version <= 8
    assert _opset_domains(dynamic_variant.path) == {"", "com.microsoft"}
    assert next(entry.version for entry in proto.opset_import if entry.domain == "") == 17


def test_dynamic_close_to_fp32(lstm_onnx, dynamic_variant):
    batch = _windows(2, seed=3)
    expected = run(create_session(lstm_onnx)[0], batch)
    actual = run(create_session(dynamic_variant.path)[0], batch)
    assert np.max(np.abs(actual - expected)) < 0.05 * np.max(np.abs(expected))


def test_dynamic_result_fields(dynamic_variant):
    assert dynamic_variant.weight_type == "QInt8"
    assert dynamic_variant.activation_type == "QUInt8"
    assert dynamic_variant.method is None
    assert dynamic_variant.reduce_range is default_reduce_range()
    assert dynamic_variant.size_bytes == dynamic_variant.path.stat().st_size


def _lstm_weight_extreme(path: Path) -> int:
    proto = onnx.load(str(path))
    initializers = {initializer.name: numpy_helper.to_array(initializer) for initializer in proto.graph.initializer}
    node = next(node for node in proto.graph.node if node.op_type == "DynamicQuantizeLSTM")
    weights = initializers[node.input[1]]
    assert weights.dtype == np.int8
    return int(np.max(np.abs(weights.astype(np.int32))))


@pytest.mark.parametrize(("reduce_range", "limit"), [(True, 64), (False, 127)])
def test_dynamic_reduce_range_applied(lstm_onnx, tmp_path, reduce_range, limit):
    variant = quantize_dynamic_int8(lstm_onnx, tmp_path / "dynamic.onnx", reduce_range=reduce_range)
    assert variant.reduce_range is reduce_range
    # 7-bit weights lie in [-64, 63]; 8-bit symmetric weights reach ±127.
    assert _lstm_weight_extreme(variant.path) == limit


# --- static QDQ ----------------------------------------------------------------------------------


def test_static_uses_standard_ops(static_variant):
    assert static_variant.contrib_ops == []
    assert static_variant.status == STATUS_STANDARD
    assert allowed_in_target(static_variant, allow_contrib_ops=False) is True


def test_static_fits_mt5_profile(static_variant):
    assert check_target_profile(static_variant.path, load_target_profile("mt5")) == []


def test_static_passes_checker_and_loads(static_variant):
    onnx.checker.check_model(str(static_variant.path), full_check=True)
    session, _ = create_session(static_variant.path)
    assert session.get_outputs()[0].name == "output"


def test_static_keeps_lstm_float(static_variant):
    assert static_variant.op_types["LSTM"] == 10
    assert "int8.static_lstm_float" in [notice.key for notice in static_variant.warnings]


def test_static_quantizes_head(static_variant):
    assert static_variant.op_types["QuantizeLinear"] > 0
    assert static_variant.op_types["DequantizeLinear"] > 0


def test_static_output_has_no_qdq(static_variant):
    proto = onnx.load(str(static_variant.path))
    producer = next(node for node in proto.graph.node if "output" in node.output)
    assert producer.op_type == "Gemm"
    assert static_variant.excluded_nodes == [producer.name]
    assert quantized_graph_outputs(proto.graph) == []


def test_static_result_fields(static_variant):
    assert static_variant.precision == "int8-static"
    assert static_variant.method == "MinMax"
    assert static_variant.weight_type == "QInt8"
    assert static_variant.activation_type == "QUInt8"
    assert static_variant.calibration_windows == 8


def test_static_output_beyond_calibration_not_clipped(lstm_onnx, static_variant):
    fp32 = create_session(lstm_onnx)[0]
    calibration = np.concatenate([_windows(4, seed=10), _windows(4, seed=11)])
    calibrated = run(fp32, calibration)
    step = (calibrated.max() - calibrated.min()) / 255  # a uint8 quantization step of the output range
    test = _windows(16, seed=12, scale=3.0)
    expected = run(fp32, test)
    actual = run(create_session(static_variant.path)[0], test)
    beyond = expected > calibrated.max() + 2 * step
    assert beyond.any(), "the test windows no longer reach beyond the calibration range"
    assert np.all(actual[beyond] > calibrated.max() + step)


@pytest.mark.parametrize("method", ["MinMax", "Entropy", "Percentile"])
def test_static_methods_run(lstm_onnx, tmp_path, method):
    variant = quantize_static_qdq(lstm_onnx, tmp_path / f"{method}.onnx", [_windows(3, seed=20)], method)
    onnx.checker.check_model(str(variant.path), full_check=True)
    assert variant.method == method
    assert quantized_graph_outputs(onnx.load(str(variant.path)).graph) == []
    batch = _windows(2, seed=21)
    expected = run(create_session(lstm_onnx)[0], batch)
    actual = run(create_session(variant.path)[0], batch)
    assert np.max(np.abs(actual - expected)) < 0.05 * np.max(np.abs(expected))


def test_static_per_channel_runs(lstm_onnx, tmp_path):
    variant = quantize_static_qdq(lstm_onnx, tmp_path / "per_channel.onnx", [_windows(2, seed=22)], per_channel=True)
    assert variant.per_channel is True
    assert create_session(variant.path)[0].get_outputs()[0].name == "output"


def test_static_accepts_generator_of_batches(lstm_onnx, tmp_path):
    batches = (_windows(1, seed=seed) for seed in range(3))
    variant = quantize_static_qdq(lstm_onnx, tmp_path / "generator.onnx", batches)
    assert variant.calibration_windows == 3


def test_static_rejects_unknown_method(lstm_onnx, tmp_path):
    with pytest.raises(ExportError) as raised:
        quantize_static_qdq(lstm_onnx, tmp_path / "x.onnx", [_windows(1, seed=0)], "KLDivergence")
    assert raised.value.key == "int8.bad_method"


def test_static_rejects_empty_calibration(lstm_onnx, tmp_path):
    with pytest.raises(ExportError) as raised:
        quantize_static_qdq(lstm_onnx, tmp_path / "x.onnx", [])
    assert raised.value.key == "int8.no_calibration_data"


@pytest.mark.parametrize(
    "batch",
    [
        np.zeros((1, 5, 360, 51), dtype=np.float32),
        np.zeros((1, 5, 360, 52), dtype=np.float64),
        np.zeros((5, 360, 52), dtype=np.float32),
    ],
    ids=["features", "float64", "rank3"],
)
def test_static_rejects_bad_batch(lstm_onnx, tmp_path, batch):
    with pytest.raises(ExportError) as raised:
        quantize_static_qdq(lstm_onnx, tmp_path / "x.onnx", [_windows(1, seed=0), batch])
    assert raised.value.key == "int8.bad_calibration_batch"
    assert "batch 1" in str(raised.value)
    assert not (tmp_path / "x.onnx").exists()


# --- static QDQ on a hand-built head: outputs beyond the calibration range ----------------------


def _head_graph(path: Path) -> Path:
    """x → Gemm(identity) → Relu → Gemm(ones) → y, so y = sum(relu(x))."""
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="hidden_gemm"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], name="output_gemm"),
        ],
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])],
        [
            numpy_helper.from_array(np.eye(4, dtype=np.float32), "W1"),
            numpy_helper.from_array(np.zeros(4, dtype=np.float32), "b1"),
            numpy_helper.from_array(np.ones((4, 1), dtype=np.float32), "W2"),
            numpy_helper.from_array(np.zeros(1, dtype=np.float32), "b2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _one_hot_rows() -> np.ndarray:
    """Each input element spans [0, 1], but every y = sum(relu(x)) stays in [0, 1]."""
    return np.concatenate([np.eye(4, dtype=np.float32), np.zeros((1, 4), dtype=np.float32)])


def _run_head(path: Path, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_head_output_beyond_calibration_not_clipped(tmp_path):
    source = _head_graph(tmp_path / "head.onnx")
    variant = quantize_static_qdq(source, tmp_path / "head_int8.onnx", [_one_hot_rows()], "MinMax")
    y = _run_head(variant.path, np.ones((1, 4), dtype=np.float32))
    assert variant.excluded_nodes == ["output_gemm"]
    np.testing.assert_allclose(y, [[4.0]], rtol=0.02)


class _RowsReader(CalibrationDataReader):
    def __init__(self, rows: np.ndarray) -> None:
        self._rows = iter(rows[i : i + 1] for i in range(len(rows)))

    def get_next(self):
        row = next(self._rows, None)
        return None if row is None else {"x": row}


def test_head_plain_quantizer_clips_output(tmp_path):
    # Control: without excluding the output node ONNX Runtime clips y to the calibration range.
    source = _head_graph(tmp_path / "head.onnx")
    quantize_static(
        str(source),
        str(tmp_path / "plain.onnx"),
        _RowsReader(_one_hot_rows()),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    y = _run_head(tmp_path / "plain.onnx", np.ones((1, 4), dtype=np.float32))
    assert y[0, 0] <= 1.01
    assert quantized_graph_outputs(onnx.load(str(tmp_path / "plain.onnx")).graph) == ["y"]


def test_output_path_walks_back_to_weight_node():
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"], name="matmul"),
            helper.make_node("Add", ["m", "b"], ["a"], name="bias"),
            helper.make_node("Reshape", ["a", "shape"], ["y"], name="reshape"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        [
            numpy_helper.from_array(np.ones((4, 2), dtype=np.float32), "W"),
            numpy_helper.from_array(np.ones(2, dtype=np.float32), "b"),
            numpy_helper.from_array(np.array([-1, 2], dtype=np.int64), "shape"),
        ],
    )
    assert output_path_nodes(graph, ["Gemm", "MatMul"]) == ["reshape", "bias", "matmul"]


# --- messages and the oldest runtime -------------------------------------------------------------


@pytest.mark.parametrize("lang", ["en", "ja"])
def test_notices_render(lang, dynamic_variant, static_variant):
    notices: list[Notice] = dynamic_variant.warnings + static_variant.warnings
    assert all(notice.render(lang).strip() for notice in notices)


def test_fp16_allowed_in_target(fp16_variant):
    assert allowed_in_target(fp16_variant, allow_contrib_ops=False) is True


ORT115_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import onnxruntime as ort
    session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    batch = np.random.default_rng(0).standard_normal((1, 5, 360, 52)).astype(np.float32)
    print(ort.__version__, session.run(None, {"input": batch})[0].shape)
    """
)


@pytest.mark.parametrize("name", ["fp16_variant", "dynamic_variant", "static_variant"])
def test_variant_loads_in_onnxruntime_1_15(request, tmp_path, name):
    python = os.environ.get("FXBUNDLE_ORT115_PYTHON")
    if not python:
        if os.environ.get("CI"):
            pytest.fail("FXBUNDLE_ORT115_PYTHON is not set in CI; scripts/test.sh creates .venv-ort115 and sets it")
        pytest.skip("FXBUNDLE_ORT115_PYTHON not set: run the suite through scripts/test.sh")
    variant = request.getfixturevalue(name)
    script = tmp_path / "run.py"
    script.write_text(ORT115_SCRIPT)
    completed = subprocess.run([python, str(script), str(variant.path)], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "1.15.0 (1, 36)"
