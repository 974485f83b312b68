"""FP16 variant: out-of-range weights, Cast repair, float32 I/O and the CPU float32 report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxconverter_common import float16

from fxbundle.checkpoint import load_checkpoint
from fxbundle.config import ExportSettings, FP16Settings
from fxbundle.errors import ExportError, FxBundleError
from fxbundle.export import export_onnx
from fxbundle.precision import (
    Notice,
    ensure_unique_node_names,
    find_out_of_range,
    make_fp16,
    repair_cast_types,
)
from fxbundle.sessions import create_session, run


@pytest.fixture(scope="module")
def lstm_onnx(tmp_path_factory) -> Path:
    """The tiny MultiTFLSTMModel exported as the pipeline exports it."""
    import torch

    from conftest import tiny_payload

    folder = tmp_path_factory.mktemp("lstm")
    torch.save(tiny_payload(), folder / "tiny.pt")
    checkpoint = load_checkpoint(folder / "tiny.pt")
    return export_onnx(checkpoint.model, checkpoint.input_shape, folder / "tiny.onnx", ExportSettings()).path


@pytest.fixture(scope="module")
def lstm_fp16(lstm_onnx, tmp_path_factory):
    return make_fp16(lstm_onnx, tmp_path_factory.mktemp("fp16") / "tiny_fp16.onnx", FP16Settings())


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _out_of_range_graph(path: Path) -> Path:
    """x → MatMul(W with 5e4) → big; x → Mul(Constant 1e-9) → small; x → MatMul(W2) → plain."""
    rng = np.random.default_rng(0)
    weight = rng.uniform(-1, 1, (4, 3)).astype(np.float32)
    weight[0, 0] = 5e4
    plain_weight = rng.uniform(-1, 1, (4, 3)).astype(np.float32)
    tiny = numpy_helper.from_array(np.full((4,), 1e-9, dtype=np.float32))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["big"], name="big_matmul"),
            helper.make_node("Constant", [], ["tiny"], name="tiny_constant", value=tiny),
            helper.make_node("Mul", ["x", "tiny"], ["small"], name="small_mul"),
            helper.make_node("MatMul", ["x", "W2"], ["plain"], name="plain_matmul"),
        ],
        "out_of_range",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [
            helper.make_tensor_value_info("big", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("small", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("plain", TensorProto.FLOAT, ["n", 3]),
        ],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(plain_weight, "W2")],
    )
    return _save(graph, path)


def _outputs(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, {"x": x})))


def _inputs() -> np.ndarray:
    return np.random.default_rng(1).uniform(0.5, 1.0, (3, 4)).astype(np.float32)


def _initializer_types(path: Path) -> dict[str, int]:
    return {initializer.name: initializer.data_type for initializer in onnx.load(str(path)).graph.initializer}


def test_lstm_fp16_keeps_float32_io(lstm_fp16):
    proto = onnx.load(str(lstm_fp16.path))
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_lstm_fp16_passes_checker_and_loads(lstm_fp16):
    onnx.checker.check_model(str(lstm_fp16.path), full_check=True)
    session, _ = create_session(lstm_fp16.path)
    assert session.get_outputs()[0].name == "output"


def test_lstm_fp16_matches_fp32(lstm_onnx, lstm_fp16):
    batch = np.random.default_rng(2).standard_normal((2, 5, 360, 52)).astype(np.float32)
    expected = run(create_session(lstm_onnx)[0], batch)
    np.testing.assert_allclose(run(create_session(lstm_fp16.path)[0], batch), expected, atol=1e-2, rtol=1e-2)


def test_converter_block_list_lacks_lstm():
    # The reason LSTM weights end up float16 and ONNX Runtime wraps LSTM in Casts on CPU.
    assert "LSTM" not in float16.DEFAULT_OP_BLOCK_LIST


def test_lstm_weights_stored_as_float16(lstm_fp16):
    proto = onnx.load(str(lstm_fp16.path))
    types = {initializer.name: initializer.data_type for initializer in proto.graph.initializer}
    lstm_weights = [node.input[1] for node in proto.graph.node if node.op_type == "LSTM"]
    assert len(lstm_weights) == 10
    assert {types[name] for name in lstm_weights} == {TensorProto.FLOAT16}


def test_lstm_fp16_reports_cpu_float32_ops(lstm_fp16):
    assert "LSTM" in lstm_fp16.cpu_fp32_ops
    assert lstm_fp16.note.key == "fp16.cpu_size_only"
    assert "LSTM" in lstm_fp16.note.render("en")
    assert "LSTM" in lstm_fp16.note.render("ja")


def test_lstm_fp16_result_fields(lstm_fp16):
    assert lstm_fp16.precision == "fp16"
    assert lstm_fp16.size_bytes == lstm_fp16.path.stat().st_size
    assert lstm_fp16.cast_nodes > 0
    assert lstm_fp16.contrib_ops == []
    assert lstm_fp16.out_of_range == []
    assert lstm_fp16.blocked_nodes == []
    assert lstm_fp16.warnings == []


def test_out_of_range_kept_fp32_by_default(tmp_path):
    source = _out_of_range_graph(tmp_path / "source.onnx")
    result = make_fp16(source, tmp_path / "fp16.onnx", FP16Settings())
    assert sorted(tensor.name for tensor in result.out_of_range) == ["W", "tiny"]
    assert result.blocked_nodes == ["big_matmul", "small_mul"]
    types = _initializer_types(result.path)
    assert types["W"] == TensorProto.FLOAT
    assert types["tiny"] == TensorProto.FLOAT
    assert types["W2"] == TensorProto.FLOAT16


def test_out_of_range_outputs_match_fp32(tmp_path):
    source = _out_of_range_graph(tmp_path / "source.onnx")
    result = make_fp16(source, tmp_path / "fp16.onnx", FP16Settings())
    expected = _outputs(source, _inputs())
    actual = _outputs(result.path, _inputs())
    np.testing.assert_allclose(actual["big"], expected["big"], rtol=1e-3)
    np.testing.assert_allclose(actual["small"], expected["small"], rtol=1e-3)
    np.testing.assert_allclose(actual["plain"], expected["plain"], rtol=1e-2, atol=1e-2)


def test_out_of_range_outputs_stay_float32(tmp_path):
    source = _out_of_range_graph(tmp_path / "source.onnx")
    result = make_fp16(source, tmp_path / "fp16.onnx", FP16Settings())
    proto = onnx.load(str(result.path))
    assert {output.type.tensor_type.elem_type for output in proto.graph.output} == {TensorProto.FLOAT}
    assert result.restored_outputs == ["big", "small"]


def test_out_of_range_counts_and_extremes(tmp_path):
    source = _out_of_range_graph(tmp_path / "source.onnx")
    result = make_fp16(source, tmp_path / "fp16.onnx", FP16Settings())
    found = {tensor.name: tensor for tensor in result.out_of_range}
    assert found["W"].source == "initializer"
    assert found["W"].count == 1
    assert found["W"].min == 5e4
    assert found["W"].max == 5e4
    assert found["tiny"].source == "constant"
    assert found["tiny"].count == 4
    assert found["tiny"].max == pytest.approx(1e-9)
    assert found["tiny"].consumers == ("small_mul",)
    assert result.warnings[0].key == "fp16.out_of_range_kept"


def test_plain_converter_clamps_out_of_range(tmp_path):
    # Control for the tests above: without the blocked nodes the converter changes the outputs.
    source = _out_of_range_graph(tmp_path / "source.onnx")
    with pytest.warns(UserWarning, match="will be truncated"):
        converted = float16.convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(converted, str(tmp_path / "plain.onnx"))
    expected = _outputs(source, _inputs())
    actual = _outputs(tmp_path / "plain.onnx", _inputs())
    assert not np.allclose(actual["big"], expected["big"], rtol=1e-2)
    assert not np.allclose(actual["small"], expected["small"], rtol=1e-2, atol=0)


def test_out_of_range_fail_names_both(tmp_path):
    source = _out_of_range_graph(tmp_path / "source.onnx")
    with pytest.raises(ExportError) as raised:
        make_fp16(source, tmp_path / "fp16.onnx", FP16Settings(), on_out_of_range="fail")
    assert raised.value.key == "fp16.out_of_range"
    assert "W (count=1, min=5e+04, max=5e+04)" in str(raised.value)
    assert "tiny (count=4" in str(raised.value)
    assert "tiny (count=4" in raised.value.render("ja")
    assert not (tmp_path / "fp16.onnx").exists()


def test_unknown_policy_rejected(tmp_path):
    source = _out_of_range_graph(tmp_path / "source.onnx")
    with pytest.raises(ValueError, match="on_out_of_range"):
        make_fp16(source, tmp_path / "fp16.onnx", FP16Settings(), on_out_of_range="clamp")


def test_infinity_counts_as_out_of_range():
    values = np.array([1.0, np.inf, -np.inf, np.nan, 0.0], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"], name="add")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])],
        [numpy_helper.from_array(values, "c")],
    )
    found = find_out_of_range(graph, max_finite_val=1e4, min_positive_val=1e-7)
    assert [(tensor.name, tensor.count) for tensor in found] == [("c", 2)]
    assert found[0].consumers == ("add",)


def test_limit_values_not_out_of_range():
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"], name="add")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [numpy_helper.from_array(np.array([1e4, -1e4, 2e-7], dtype=np.float32), "c")],
    )
    assert find_out_of_range(graph, max_finite_val=1e4, min_positive_val=1e-7) == []


def _cast_graph(path: Path) -> Path:
    """x → MatMul → Cast(to=FLOAT) → Relu → y: the Cast the converter leaves inconsistent."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["a"], name="matmul"),
            helper.make_node("Cast", ["a"], ["b"], name="cast", to=TensorProto.FLOAT),
            helper.make_node("Relu", ["b"], ["y"], name="relu"),
        ],
        "cast",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")],
    )
    return _save(graph, path)


def test_plain_converter_breaks_float_cast(tmp_path):
    # Control: onnxconverter-common alone writes a model ONNX Runtime rejects.
    converted = float16.convert_float_to_float16(onnx.load(str(_cast_graph(tmp_path / "source.onnx"))), keep_io_types=True)
    with pytest.raises(Exception, match="does not match expected type"):
        onnxruntime.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"])


def test_fp16_repairs_float_cast(tmp_path):
    source = _cast_graph(tmp_path / "source.onnx")
    result = make_fp16(source, tmp_path / "fp16.onnx", FP16Settings())
    assert result.repaired_casts == 1
    assert result.warnings[0].key == "fp16.casts_repaired"
    x = np.array([[1.0, -2.0, 3.0, -4.0]], dtype=np.float32)
    np.testing.assert_allclose(_outputs(result.path, x)["y"], [[1.0, 0.0, 3.0, 0.0]])


def test_flipped_cast_repaired_and_loads(lstm_fp16):
    proto = onnx.load(str(lstm_fp16.path))
    declared = {info.name: info.type.tensor_type.elem_type for info in proto.graph.value_info}
    cast = next(node for node in proto.graph.node if node.op_type == "Cast" and declared.get(node.output[0]) == TensorProto.FLOAT16)
    cast.attribute[0].i = TensorProto.FLOAT
    with pytest.raises(FxBundleError) as raised:
        create_session(proto.SerializeToString())
    assert raised.value.key == "session.load_failed"
    assert repair_cast_types(proto.graph) == 1
    assert cast.attribute[0].i == TensorProto.FLOAT16
    session, _ = create_session(proto.SerializeToString())
    assert session.get_outputs()[0].name == "output"


def test_consistent_casts_not_repaired(lstm_fp16):
    proto = onnx.load(str(lstm_fp16.path))
    assert repair_cast_types(proto.graph) == 0


def test_unnamed_and_duplicate_nodes_renamed():
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Relu", ["a"], ["b"], name="same"),
            helper.make_node("Relu", ["b"], ["c"], name="same"),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    assert ensure_unique_node_names(graph) == 3
    names = [node.name for node in graph.node]
    assert names[1] == "same"
    assert len(set(names)) == 4
    assert "" not in names


@pytest.mark.parametrize("lang", ["en", "ja"])
def test_notices_render(lang):
    notices = [
        Notice("fp16.out_of_range_kept", {"count": 1, "tensors": "W", "nodes": 1}),
        Notice("fp16.casts_repaired", {"count": 1}),
        Notice("fp16.outputs_restored", {"outputs": "y"}),
        Notice("fp16.cpu_size_only", {"ops": "LSTM"}),
        Notice("fp16.cpu_all_float16", {}),
    ]
    rendered = [notice.render(lang) for notice in notices]
    assert all(text.strip() for text in rendered)
