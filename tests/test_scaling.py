"""The double-pips guard: tail scale detection, the scaling patterns and fxbundle.runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from fxbundle.config import ExportSettings
from fxbundle.errors import FxBundleError, GateFailed
from fxbundle.export import export_onnx
from fxbundle.metadata import model_properties, write_model_properties
from fxbundle.runtime import ScaledModel
from fxbundle.scaling import TailScale, classify_scaling, detect_tail_scale, scaling_applied

EXPORTERS = ("torchscript", "dynamo")
INPUT_SHAPE = (1, 5, 360, 52)


# --- models with and without a tail scale -------------------------------------------------


class LinearHead(nn.Module):
    """The last bar of the first timeframe through a Linear layer; the export ends in Gemm."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(52, 36)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x[:, 0, -1])


class Times100(LinearHead):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 100.0


class DivByHundredth(LinearHead):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) / 0.01


class MinusHalf(LinearHead):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) - 0.5


class SequenceLinear(nn.Module):
    """A Linear on a 3-D tensor (exported as MatMul + Add), then the last step is selected."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(52, 36)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x[:, 0])[:, -1]


MODELS = {"linear": LinearHead, "times100": Times100, "div_hundredth": DivByHundredth, "minus_half": MinusHalf, "sequence_linear": SequenceLinear}


@pytest.fixture(scope="module")
def exported_models(tmp_path_factory):
    """Export each model with each exporter once per module; keys are (model name, exporter)."""
    cache: dict[tuple[str, str], onnx.ModelProto] = {}

    def export(name: str, exporter: str) -> onnx.ModelProto:
        if (name, exporter) not in cache:
            torch.manual_seed(0)
            path = tmp_path_factory.mktemp(f"{name}-{exporter}") / "model.onnx"
            export_onnx(MODELS[name]().eval(), INPUT_SHAPE, path, ExportSettings(exporter=exporter))
            cache[(name, exporter)] = onnx.load(str(path))
        return cache[(name, exporter)]

    return export


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_times100_model_detected(exported_models, exporter):
    tail = detect_tail_scale(exported_models("times100", exporter))
    assert tail is not None
    assert tail.op_type == "Mul"
    assert tail.factor == pytest.approx(100.0)
    assert tail.offset == 0.0


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_times100_model_declared_price_fails(exported_models, exporter):
    verdict = classify_scaling(detect_tail_scale(exported_models("times100", exporter)), "price", 100.0)
    assert verdict.pattern == "D"
    assert verdict.outcome == "error"
    with pytest.raises(GateFailed) as raised:
        verdict.raise_if_error()
    assert raised.value.exit_code == 3
    assert raised.value.key == "scaling.pattern_d"
    assert "100 times too large" in str(raised.value)
    with pytest.raises(GateFailed):
        scaling_applied(verdict)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_times100_model_declared_pips_ok(exported_models, exporter):
    verdict = classify_scaling(detect_tail_scale(exported_models("times100", exporter)), "pips", 100.0)
    assert verdict.pattern == "B"
    assert verdict.outcome == "ok"
    assert scaling_applied(verdict) is True


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["linear", "sequence_linear"])
def test_linear_bias_not_a_scale(exported_models, exporter, name):
    proto = exported_models(name, exporter)
    assert {"Gemm", "MatMul"} & {node.op_type for node in proto.graph.node}
    assert detect_tail_scale(proto) is None


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_div_by_hundredth_is_factor_100(exported_models, exporter):
    tail = detect_tail_scale(exported_models("div_hundredth", exporter))
    assert tail.op_type == "Div"
    assert tail.factor == pytest.approx(100.0, rel=1e-6)
    assert classify_scaling(tail, "pips", 100.0).pattern == "B"


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_sub_scalar_detected(exported_models, exporter):
    tail = detect_tail_scale(exported_models("minus_half", exporter))
    assert tail.op_types == ("Sub",)
    assert tail.factor == 1.0
    assert tail.offset == pytest.approx(-0.5)
    verdict = classify_scaling(tail, "price", 100.0)
    assert (verdict.pattern, verdict.outcome, verdict.message_key) == ("E", "warning", "scaling.tail_offset")
    assert "-0.5" in verdict.message("en")


# --- hand-built graphs --------------------------------------------------------------------


WIDTH = 36


def _tail_model(nodes, initializers, output: str = "output", output_shape=("batch", WIDTH)) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, WIDTH)).astype(np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "weight"], ["linear"], name="matmul"), *nodes],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, list(output_shape))],
        [weight, *initializers],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _constant(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def test_add_uniform_vector_after_matmul_is_bias():
    model = _tail_model([helper.make_node("Add", ["linear", "bias"], ["output"])], [_constant("bias", np.full(WIDTH, 0.25))])
    assert detect_tail_scale(model) is None


def test_add_uniform_vector_after_relu_is_offset():
    model = _tail_model(
        [helper.make_node("Relu", ["linear"], ["relu"]), helper.make_node("Add", ["relu", "shift"], ["output"], name="shift_add")],
        [_constant("shift", np.full(WIDTH, 0.25))],
    )
    tail = detect_tail_scale(model)
    assert tail.op_types == ("Add",)
    assert tail.offset == pytest.approx(0.25)


def test_add_scalar_after_matmul_is_offset():
    model = _tail_model([helper.make_node("Add", ["linear", "shift"], ["output"])], [_constant("shift", [0.25])])
    assert detect_tail_scale(model).offset == pytest.approx(0.25)


def test_add_varying_vector_not_a_scale():
    model = _tail_model(
        [helper.make_node("Relu", ["linear"], ["relu"]), helper.make_node("Add", ["relu", "bias"], ["output"])],
        [_constant("bias", np.linspace(-1, 1, WIDTH))],
    )
    assert detect_tail_scale(model) is None


def test_mul_varying_vector_not_a_scale():
    model = _tail_model([helper.make_node("Mul", ["linear", "std"], ["output"])], [_constant("std", np.linspace(0.5, 2.0, WIDTH))])
    assert detect_tail_scale(model) is None


@pytest.mark.parametrize("shape", [(), (1,), (1, 1), (1, WIDTH)])
def test_mul_broadcast_constant_detected(shape):
    model = _tail_model([helper.make_node("Mul", ["linear", "factor"], ["output"])], [_constant("factor", np.full(shape, 10000.0))])
    assert detect_tail_scale(model).factor == pytest.approx(10000.0)


def test_mul_constant_first_through_passthrough_nodes():
    nodes = [
        helper.make_node("Constant", [], ["factor"], value=_constant("factor_value", [100.0])),
        helper.make_node("Mul", ["factor", "linear"], ["scaled"], name="scale"),
        helper.make_node("Identity", ["scaled"], ["same"]),
        helper.make_node("Unsqueeze", ["same", "axes"], ["expanded"]),
        helper.make_node("Squeeze", ["expanded", "axes"], ["squeezed"]),
        helper.make_node("Cast", ["squeezed"], ["output"], to=TensorProto.FLOAT),
    ]
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    tail = detect_tail_scale(_tail_model(nodes, [axes]))
    assert tail.factor == pytest.approx(100.0)
    assert tail.nodes[0].name == "scale"
    assert tail.to_dict()["op_type"] == "Mul"


def test_reciprocal_div_not_a_scale():
    model = _tail_model([helper.make_node("Div", ["numerator", "linear"], ["output"])], [_constant("numerator", [1.0])])
    assert detect_tail_scale(model) is None


def test_chain_composed_into_factor_and_offset():
    nodes = [
        helper.make_node("Mul", ["linear", "hundred"], ["scaled"]),
        helper.make_node("Add", ["scaled", "half"], ["shifted"]),
        helper.make_node("Sub", ["one", "shifted"], ["output"]),
    ]
    tail = detect_tail_scale(_tail_model(nodes, [_constant("hundred", 100.0), _constant("half", 0.5), _constant("one", 1.0)]))
    assert tail.op_types == ("Mul", "Add", "Sub")
    # y = 1 - (100 x + 0.5) = -100 x + 0.5
    assert tail.factor == pytest.approx(-100.0)
    assert tail.offset == pytest.approx(0.5)
    assert tail.op_type == "Mul"


# --- the pattern table --------------------------------------------------------------------


def _tail(factor: float, offset: float = 0.0) -> TailScale:
    from fxbundle.scaling import ScaleNode

    return TailScale(output="output", nodes=(ScaleNode("Mul", "scale", factor, False),), factor=factor, offset=offset)


@pytest.mark.parametrize(
    ("tail", "units", "multiplier", "pattern", "outcome", "applied"),
    [
        (None, "price", 100.0, "A", "ok", False),
        (_tail(100.0), "pips", 100.0, "B", "ok", True),
        (_tail(100.0), "points", 100.0, "B", "ok", True),
        (None, "pips", 10000.0, "C", "warning", True),
        (_tail(10000.0), "price", 10000.0, "D", "error", None),
        (_tail(0.0123), "price", 100.0, "E", "warning", False),
        (_tail(0.0123), "pips", 100.0, "E", "warning", True),
    ],
)
def test_scaling_pattern_table(tail, units, multiplier, pattern, outcome, applied):
    verdict = classify_scaling(tail, units, multiplier)
    assert verdict.pattern == pattern
    assert verdict.outcome == outcome
    assert verdict.to_dict()["output_units"] == units
    if applied is None:
        with pytest.raises(GateFailed):
            scaling_applied(verdict)
    else:
        assert scaling_applied(verdict) is applied


def test_unexpected_factor_message_names_factor():
    verdict = classify_scaling(_tail(0.0123), "price", 100.0)
    assert verdict.message_key == "scaling.unexpected_factor"
    assert "0.0123" in verdict.message("en")
    assert "0.0123" in verdict.message("ja")


def test_pattern_c_warns_unverifiable():
    verdict = classify_scaling(None, "pips", 100.0)
    assert "cannot be verified" in verdict.message("en")
    assert "検証できません" in verdict.message("ja")


def test_classify_rejects_unknown_units():
    with pytest.raises(ValueError):
        classify_scaling(None, "dollars", 100.0)


# --- fxbundle.runtime ---------------------------------------------------------------------

SAMPLE_SHAPE = (1, 2, 3)
HORIZON = 4


def _write_bundle(
    root: Path,
    weight: float,
    multiplier: float = 10000.0,
    units: str = "price",
    json_overrides: dict | None = None,
    property_overrides: dict | None = None,
    graph_factor: float | None = None,
) -> Path:
    """Write a bundle directory with a tiny model y = weight * sum(x) (times graph_factor) per output."""
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"]),
        helper.make_node("MatMul", ["flat", "weight"], ["linear" if graph_factor else "output"]),
    ]
    initializers = [numpy_helper.from_array(np.full((6, HORIZON), weight, dtype=np.float32), "weight")]
    if graph_factor:
        nodes.append(helper.make_node("Mul", ["linear", "factor"], ["output"]))
        initializers.append(numpy_helper.from_array(np.array(graph_factor, dtype=np.float32), "factor"))
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *SAMPLE_SHAPE[1:]])],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", HORIZON])],
            initializers,
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    expert_dir = root / "MQL5" / "Experts" / "FxBundle" / "EURUSD_1.0.0"
    expert_dir.mkdir(parents=True)
    model_path = expert_dir / "eurusd_fp32.onnx"
    onnx.save(model, str(model_path))

    applied = units != "price"
    properties = model_properties(
        pair="EURUSD",
        pips_multiplier=multiplier,
        scaling_applied=applied,
        input_shape=SAMPLE_SHAPE,
        output_shape=(1, HORIZON),
        extra={"output_units": units},
    )
    properties.update(property_overrides or {})
    write_model_properties(model_path, properties)

    scaling = {"scaling_applied": applied, "output_units": units, "pips_multiplier": multiplier, "scale_basis": "pip"}
    scaling.update(json_overrides or {})
    metadata = {"conversion": {"precision": "fp32", "model_files": {"fp32": model_path.name}}, "scaling": scaling}
    (root / "onnx_metadata.json").write_text(json.dumps(metadata), encoding="utf-8")
    return root


def _windows(batch: int = 2) -> np.ndarray:
    return np.ones((batch, *SAMPLE_SHAPE[1:]), dtype=np.float32)


def test_runtime_price_model_multiplied_once(tmp_path):
    model = ScaledModel.from_bundle(_write_bundle(tmp_path, weight=0.0001))
    price = model.predict_price(_windows())
    np.testing.assert_allclose(price, np.full((2, HORIZON), 0.0006), rtol=1e-5)
    np.testing.assert_allclose(model.predict_pips(_windows()), np.full((2, HORIZON), 6.0), rtol=1e-5)
    assert model.output_units == "price"


def test_runtime_scaled_model_not_multiplied(tmp_path):
    model = ScaledModel.from_bundle(_write_bundle(tmp_path, weight=1.0, units="pips"))
    np.testing.assert_allclose(model.predict_pips(_windows()), np.full((2, HORIZON), 6.0))
    np.testing.assert_allclose(model.predict_price(_windows()), np.full((2, HORIZON), 6.0))


def test_runtime_single_window_gets_batch_axis(tmp_path):
    model = ScaledModel.from_bundle(_write_bundle(tmp_path, weight=0.0001))
    assert model.predict_pips(_windows(1)[0]).shape == (1, HORIZON)


def test_runtime_bad_input_shape(tmp_path):
    model = ScaledModel.from_bundle(_write_bundle(tmp_path, weight=0.0001))
    with pytest.raises(FxBundleError) as raised:
        model.predict_pips(np.ones((2, 3, 3), dtype=np.float32))
    assert raised.value.key == "runtime.bad_input_shape"


def test_runtime_double_application_implausible(tmp_path):
    # The graph already multiplies by 10000 but the bundle declares price, so the multiplier
    # is applied twice: 0.0006 price change -> 6 pips -> 60000 "pips".
    bundle = _write_bundle(tmp_path, weight=0.0001, graph_factor=10000.0)
    model = ScaledModel.from_bundle(bundle)
    with pytest.raises(FxBundleError) as raised:
        model.predict_pips(_windows())
    assert raised.value.key == "runtime.implausible_pips"
    assert raised.value.params["value"] == "60,000.0"
    assert raised.value.params["bound"] == "10,000"
    assert "applied twice" in str(raised.value)
    assert "二重" in raised.value.render("ja")


def test_runtime_sanity_bound_configurable(tmp_path):
    bundle = _write_bundle(tmp_path, weight=0.0001, graph_factor=10000.0)
    model = ScaledModel.from_bundle(bundle, max_abs_pips=100_000.0)
    np.testing.assert_allclose(model.predict_pips(_windows()), np.full((2, HORIZON), 60000.0), rtol=1e-5)


def test_runtime_points_bound_is_larger(tmp_path):
    bundle = _write_bundle(tmp_path, weight=0.01, units="points", multiplier=100.0, json_overrides={"scale_basis": "point"})
    model = ScaledModel.from_bundle(bundle)
    assert model.max_abs_pips == 100_000.0


def test_runtime_nan_output_rejected(tmp_path):
    model = ScaledModel.from_bundle(_write_bundle(tmp_path, weight=0.0001))
    with pytest.raises(FxBundleError) as raised:
        model.predict_pips(np.full((1, *SAMPLE_SHAPE[1:]), np.nan, dtype=np.float32))
    assert raised.value.key == "runtime.output_not_finite"


@pytest.mark.parametrize(
    ("json_overrides", "property_overrides", "field"),
    [
        ({"scaling_applied": True, "output_units": "pips"}, {"output_units": "pips"}, "scaling_applied"),
        ({}, {"scaling_applied": "true"}, "scaling_applied"),
        ({}, {"pips_multiplier": "100"}, "pips_multiplier"),
        ({"pips_multiplier": 100.0}, {}, "pips_multiplier"),
        ({}, {"output_units": "pips"}, "output_units"),
    ],
)
def test_runtime_metadata_disagreement(tmp_path, json_overrides, property_overrides, field):
    bundle = _write_bundle(tmp_path, weight=0.0001, json_overrides=json_overrides, property_overrides=property_overrides)
    with pytest.raises(FxBundleError) as raised:
        ScaledModel.from_bundle(bundle)
    assert raised.value.key == "runtime.scaling_disagrees"
    assert raised.value.params["field"] == field
    assert "Rebuild the bundle" in str(raised.value)


def test_runtime_units_contradict_scaling(tmp_path):
    bundle = _write_bundle(
        tmp_path, weight=0.0001, json_overrides={"scaling_applied": True}, property_overrides={"scaling_applied": "true"}
    )
    with pytest.raises(FxBundleError) as raised:
        ScaledModel.from_bundle(bundle)
    assert raised.value.key == "runtime.units_contradict_scaling"


def test_runtime_missing_metadata(tmp_path):
    with pytest.raises(FxBundleError) as raised:
        ScaledModel.from_bundle(tmp_path)
    assert raised.value.key == "runtime.metadata_missing"


def test_runtime_missing_model_file(tmp_path):
    bundle = _write_bundle(tmp_path, weight=0.0001)
    next(bundle.rglob("*.onnx")).unlink()
    with pytest.raises(FxBundleError) as raised:
        ScaledModel.from_bundle(bundle)
    assert raised.value.key == "runtime.model_not_found"


def test_runtime_precision_not_shipped(tmp_path):
    with pytest.raises(FxBundleError) as raised:
        ScaledModel.from_bundle(_write_bundle(tmp_path, weight=0.0001), precision="fp16")
    assert raised.value.key == "runtime.precision_not_shipped"
    assert raised.value.params["available"] == "fp32"


def test_runtime_missing_property(tmp_path):
    bundle = _write_bundle(tmp_path, weight=0.0001)
    model_path = next(bundle.rglob("*.onnx"))
    properties = {entry.key: entry.value for entry in onnx.load(str(model_path)).metadata_props}
    del properties["scaling_applied"]
    write_model_properties(model_path, properties)
    with pytest.raises(FxBundleError) as raised:
        ScaledModel.from_bundle(bundle)
    assert raised.value.key == "runtime.property_missing"
    assert raised.value.params["property"] == "scaling_applied"


def test_runtime_reads_built_bundle(tmp_path, tiny_checkpoint, fast_config):
    from fxbundle.checkpoint import load_checkpoint
    from fxbundle.pipeline import BuildOptions, build

    result = build(BuildOptions(pair="USDJPY", model=tiny_checkpoint, config=fast_config, out=tmp_path / "dist", project_dir=tmp_path, precision="fp32"))
    model = ScaledModel.from_bundle(result.bundle_dir)
    assert model.scaling.scaling_applied is False
    assert model.scaling.pips_multiplier == 100.0
    assert model.bundle.model_path.name == "usdjpy_fp32.onnx"

    windows = np.random.default_rng(0).standard_normal((3, 5, 360, 52)).astype(np.float32)
    with torch.no_grad():
        expected = load_checkpoint(tiny_checkpoint).model(torch.from_numpy(windows)).numpy()
    np.testing.assert_allclose(model.predict_price(windows), expected, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(model.predict_pips(windows), expected * 100.0, atol=1e-3, rtol=1e-4)
