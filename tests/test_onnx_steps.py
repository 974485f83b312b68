"""Export, optimization, FP16 variant, latency and the target profile, on a tiny real model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from fxbundle.checkpoint import load_checkpoint
from fxbundle.config import ExportSettings, FP16Settings, load_build_config, load_target_profile
from fxbundle.errors import ConfigError, ExportError, FxBundleError
from fxbundle.export import check_target_profile, downgrade_ir_version, export_onnx
from fxbundle.latency import measure_latency
from fxbundle.optimize import optimize_onnx
from fxbundle.precision import make_fp16
from fxbundle.sessions import create_session, run


@pytest.fixture
def exported(tmp_path, tiny_checkpoint):
    checkpoint = load_checkpoint(tiny_checkpoint)
    result = export_onnx(checkpoint.model, checkpoint.input_shape, tmp_path / "raw.onnx", ExportSettings())
    return checkpoint, result


def _batch(size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((size, 5, 360, 52)).astype(np.float32)


def test_export_contract(exported):
    _, result = exported
    proto = onnx.load(str(result.path))
    assert result.opset == 17
    assert proto.ir_version <= 8
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["output"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]] == [5, 360, 52]
    written = sorted(path.name for path in result.path.parent.iterdir() if path.suffix != ".pt")
    assert written == ["raw.onnx"]  # one file, no external data


def test_export_matches_pytorch_for_several_batch_sizes(exported):
    checkpoint, result = exported
    session, _ = create_session(result.path)
    for size in (1, 3):
        batch = _batch(size)
        with torch.no_grad():
            expected = checkpoint.model(torch.from_numpy(batch)).numpy()
        np.testing.assert_allclose(run(session, batch), expected, atol=1e-5, rtol=1e-4)


def test_ir_version_lowered_when_graph_allows():
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    proto.ir_version = 10
    assert downgrade_ir_version(proto, 8).ir_version == 8


def test_ir_version_with_functions_not_lowered():
    proto = onnx.helper.make_model(
        onnx.helper.make_graph([], "g", [], []),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
        functions=[onnx.helper.make_function("custom", "f", [], [], [], [onnx.helper.make_opsetid("", 17)])],
    )
    proto.ir_version = 10
    with pytest.raises(ExportError) as raised:
        downgrade_ir_version(proto, 8)
    assert raised.value.key == "export.ir_version_too_new"


def test_optimize_keeps_outputs(tmp_path, exported):
    _, result = exported
    settings = load_build_config().optimization
    optimized = optimize_onnx(result.path, tmp_path / "opt.onnx", settings, _batch(2))
    assert optimized.parity.passed
    assert optimized.nodes_after < optimized.nodes_before
    assert optimized.applied == settings.passes
    assert optimized.rejected == {}


def test_unknown_optimizer_pass_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optimization:\n  passes: [no_such_pass]\n", encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_build_config(path)
    assert "no_such_pass" in str(raised.value)


def test_fp16_keeps_float32_io(tmp_path, exported):
    _, result = exported
    variant = make_fp16(result.path, tmp_path / "fp16.onnx", FP16Settings())
    proto = onnx.load(str(variant.path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in proto.graph.initializer)
    session32, _ = create_session(result.path)
    session16, _ = create_session(variant.path)
    batch = _batch(2)
    np.testing.assert_allclose(run(session16, batch), run(session32, batch), atol=1e-2, rtol=1e-2)


def test_latency_statistics(exported):
    _, result = exported
    measured = measure_latency(result.path, (1, 5, 360, 52), warmup=3, samples=30)
    assert measured.samples == 30
    assert measured.provider == "CPUExecutionProvider"
    assert 0 < measured.min_ms <= measured.p50_ms <= measured.p95_ms <= measured.p99_ms <= measured.max_ms
    assert measured.first_call_ms > 0


def test_cuda_request_without_gpu_is_error(exported):
    _, result = exported
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        try:
            session, info = create_session(result.path, provider="CUDAExecutionProvider")
        except FxBundleError as error:
            assert error.key in {"session.provider_unavailable", "session.load_failed"}
            return
        assert info.providers[0] == "CUDAExecutionProvider"  # a real GPU is present
    else:
        with pytest.raises(FxBundleError) as raised:
            create_session(result.path, provider="CUDAExecutionProvider")
        assert raised.value.key in {"session.provider_unavailable", "session.load_failed"}


def test_target_profile_accepts_export(exported):
    _, result = exported
    assert check_target_profile(result.path, load_target_profile("mt5")) == []


def test_target_profile_lists_violations(tmp_path, exported):
    _, result = exported
    proto = onnx.load(str(result.path))
    proto.ir_version = 9
    proto.opset_import[0].version = 18
    node = proto.graph.node.add()
    node.op_type, node.domain = "DynamicQuantizeLSTM", "com.microsoft"
    path = tmp_path / "bad.onnx"
    onnx.save(proto, str(path))
    problems = check_target_profile(path, load_target_profile("mt5"))
    assert "opset 18 > 17" in problems
    assert "IR version 9 > 8" in problems
    assert any("com.microsoft:DynamicQuantizeLSTM" in problem for problem in problems)
