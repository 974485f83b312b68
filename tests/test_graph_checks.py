"""Graph checks: batch parity, training-mode nodes, determinism, ORT optimization levels, RNN layout.

The failures are reproduced with small models built here and with hand-built ONNX graphs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxoptimizer
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from fxbundle import graph_checks
from fxbundle.checkpoint import load_checkpoint
from fxbundle.config import ExportSettings, OptimizationSettings
from fxbundle.errors import ExportError, GateFailed
from fxbundle.graph_checks import (
    check_batch_parity,
    check_deterministic,
    check_no_training_nodes,
    check_optimization_levels,
    check_rnn_layout,
)
from fxbundle.export import export_onnx
from fxbundle.optimize import optimize_onnx

ATOL, RTOL = 1e-5, 1e-4
SMALL_SHAPE = (1, 5, 6)  # (batch, steps, features) for the small LSTMs below


def _sample(shape: tuple[int, ...], seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _torchscript_export(model: nn.Module, path: Path, example_batch: int = 1, dynamic: bool = True, **options) -> Path:
    """Export with the TorchScript exporter directly, bypassing export_onnx's own checks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(example_batch, *SMALL_SHAPE[1:]),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if dynamic else None,
            **options,
        )
    return path


class PlainLSTM(nn.Module):
    """A correct model: nn.LSTM builds h0/c0 from the input's batch size itself."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.lstm(x)
        return self.head(h_n[-1])


class ParameterH0LSTM(nn.Module):
    """An LSTM whose h0/c0 are parameters of batch size 1: the export bakes them in as constants."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 4, num_layers=2, batch_first=True)
        self.h0 = nn.Parameter(torch.zeros(2, 1, 4))
        self.c0 = nn.Parameter(torch.zeros(2, 1, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.lstm(x, (self.h0, self.c0))
        return self.head(h_n[-1])


class ReshapeBatchLSTM(nn.Module):
    """Reshapes with the example batch size as a Python int, which the tracer records as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.lstm(x)
        return self.head(h_n.reshape(int(x.shape[0]), -1))


class BatchCenteredLSTM(nn.Module):
    """Subtracts the batch mean, so each row depends on the other rows of the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.lstm(x - x.mean(dim=0, keepdim=True))
        return h_n[-1]


class DropoutHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 3)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.linear(x[:, -1]))


def _graph_model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, list(initializers)), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    return model


# --- batch parity -------------------------------------------------------------------------


@pytest.fixture
def tiny_export(tmp_path, tiny_checkpoint):
    checkpoint = load_checkpoint(tiny_checkpoint)
    result = export_onnx(checkpoint.model, checkpoint.input_shape, tmp_path / "tiny.onnx", ExportSettings())
    return checkpoint, result.path


def test_batch_parity_passes_for_tiny_model(tiny_export):
    checkpoint, path = tiny_export
    result = check_batch_parity(path, checkpoint.model, checkpoint.input_shape, ATOL, RTOL)
    report = result.to_dict()
    assert report["passed"] is True
    assert report["batch_dim"] == "batch"
    assert [entry["batch_size"] for entry in report["batch_sizes"]] == [1, 2, 3, 7]
    for entry in report["batch_sizes"]:
        for comparison in ("rows_vs_single", "vs_pytorch"):
            assert set(entry[comparison]) >= {"max_abs", "max_rel", "atol", "rtol", "passed"}
            assert entry[comparison]["passed"] is True


def test_batch_parity_h0_parameter_baked(tmp_path):
    torch.manual_seed(0)
    model = ParameterH0LSTM().eval()
    path = _torchscript_export(model, tmp_path / "h0.onnx")
    with pytest.raises(ExportError) as raised:
        check_batch_parity(path, model, SMALL_SHAPE, ATOL, RTOL)
    assert raised.value.key == "checks.batch_run_failed"
    assert raised.value.params["batch"] == 2
    message = str(raised.value)
    assert "h0/c0" in message
    assert "x.new_zeros(num_layers, x.size(0), hidden_size)" in message


def test_batch_parity_reshape_constant(tmp_path):
    torch.manual_seed(0)
    model = ReshapeBatchLSTM().eval()
    path = _torchscript_export(model, tmp_path / "reshape.onnx")
    with pytest.raises(ExportError) as raised:
        check_batch_parity(path, model, SMALL_SHAPE, ATOL, RTOL)
    assert raised.value.key in {"checks.batch_run_failed", "checks.batch_rows_wrong"}
    assert "dynamic axis 0" in str(raised.value)


def test_batch_parity_without_dynamic_axes(tmp_path):
    torch.manual_seed(0)
    model = BatchCenteredLSTM().eval()
    path = _torchscript_export(model, tmp_path / "static.onnx", dynamic=False)
    with pytest.raises(ExportError) as raised:
        check_batch_parity(path, model, SMALL_SHAPE, ATOL, RTOL)
    assert raised.value.key == "checks.batch_axis_fixed"
    assert raised.value.params == {"input": "input", "size": 1}
    assert "dynamic_axes" in str(raised.value)


def test_batch_parity_dynamo_example_batch_one(tmp_path):
    # torch.export specializes an example dimension of size 1 and the exporter accepts that
    # silently: the graph gets a fixed batch even though dynamic_shapes asked for a dynamic one.
    torch.manual_seed(0)
    model = PlainLSTM().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (torch.zeros(SMALL_SHAPE),),
            dynamo=True,
            opset_version=18,
            input_names=["input"],
            output_names=["output"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
            verbose=False,
        )
    path = tmp_path / "dynamo_b1.onnx"
    program.save(str(path))
    with pytest.raises(ExportError) as raised:
        check_batch_parity(path, model, SMALL_SHAPE, ATOL, RTOL)
    assert raised.value.key == "checks.batch_axis_fixed"
    assert "example batch of 2" in str(raised.value)


def test_batch_parity_rows_depend_on_batch(tmp_path):
    torch.manual_seed(0)
    model = BatchCenteredLSTM().eval()
    path = _torchscript_export(model, tmp_path / "centered.onnx", example_batch=2)
    with pytest.raises(ExportError) as raised:
        check_batch_parity(path, model, SMALL_SHAPE, ATOL, RTOL)
    assert raised.value.key == "checks.batch_rows_differ"
    assert raised.value.params["sizes"] == "2, 3, 7"
    assert float(raised.value.params["single_max_abs"]) > ATOL


def test_batch_parity_message_in_japanese(tmp_path):
    torch.manual_seed(0)
    model = ParameterH0LSTM().eval()
    path = _torchscript_export(model, tmp_path / "h0.onnx")
    with pytest.raises(ExportError) as raised:
        check_batch_parity(path, model, SMALL_SHAPE, ATOL, RTOL)
    japanese = raised.value.render("ja")
    assert "h0/c0" in japanese
    assert "バッチ 2" in japanese


# --- training-mode nodes and determinism --------------------------------------------------


def test_dropout_in_training_mode_rejected(tmp_path):
    torch.manual_seed(0)
    path = _torchscript_export(
        DropoutHead().train(), tmp_path / "train.onnx", training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False
    )
    proto = onnx.load(str(path))
    assert "Dropout" in [node.op_type for node in proto.graph.node]
    with pytest.raises(ExportError) as raised:
        check_no_training_nodes(proto)
    assert raised.value.key == "checks.dropout_training"
    assert "Dropout node" in raised.value.params["nodes"]
    assert "TrainingMode.EVAL" in str(raised.value)


def test_dropout_in_training_mode_not_deterministic(tmp_path):
    torch.manual_seed(0)
    path = _torchscript_export(
        DropoutHead().train(), tmp_path / "train.onnx", training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False
    )
    with pytest.raises(ExportError) as raised:
        check_deterministic(path, _sample((4, 5, 6)))
    assert raised.value.key == "checks.not_deterministic"


def test_eval_export_has_no_training_nodes(tmp_path):
    torch.manual_seed(0)
    path = _torchscript_export(DropoutHead().eval(), tmp_path / "eval.onnx")
    result = check_no_training_nodes(onnx.load(str(path)))
    assert result.to_dict()["nodes_checked"] > 0
    determinism = check_deterministic(path, _sample((4, 5, 6)))
    assert determinism.to_dict() == {"runs": 2, "identical": True, "max_abs": 0.0}


def test_dropout_with_false_training_mode_accepted():
    ratio = numpy_helper.from_array(np.array(0.5, dtype=np.float32), "ratio")
    training = numpy_helper.from_array(np.array(False), "training_mode")
    model = _graph_model(
        [helper.make_node("Dropout", ["x", "ratio", "training_mode"], ["y"], name="drop")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [ratio, training],
    )
    assert check_no_training_nodes(model).dropout_nodes == 1


def test_random_normal_like_rejected(tmp_path):
    model = _graph_model(
        [
            helper.make_node("RandomNormalLike", ["x"], ["noise"], name="noise_source"),
            helper.make_node("Add", ["x", "noise"], ["y"], name="add_noise"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    with pytest.raises(ExportError) as raised:
        check_no_training_nodes(model)
    assert raised.value.key == "checks.random_ops"
    assert "RandomNormalLike node 'noise_source'" in str(raised.value)

    path = tmp_path / "random.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ExportError) as raised:
        check_deterministic(path, _sample((2, 3)))
    assert raised.value.key == "checks.not_deterministic"


def test_random_op_inside_subgraph_rejected():
    branch = helper.make_graph(
        [helper.make_node("RandomUniform", [], ["r"], shape=[3], name="inner_random")],
        "branch",
        [],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, [3])],
    )
    model = _graph_model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch, name="choose")],
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    with pytest.raises(ExportError) as raised:
        check_no_training_nodes(model)
    assert "inner_random" in raised.value.params["nodes"]


# --- ONNX Runtime optimization levels -----------------------------------------------------


def test_optimization_levels_agree(tiny_export):
    _, path = tiny_export
    result = check_optimization_levels(path, _sample((2, 5, 360, 52)), ATOL, RTOL)
    report = result.to_dict()
    assert report["passed"] is True
    assert report["compared_level"] == "ORT_ENABLE_ALL"
    assert report["reference_level"] == "ORT_DISABLE_ALL"
    assert report["max_abs"] <= ATOL
    assert "max_rel" in report


def test_optimization_levels_disagree_is_gate(monkeypatch, tiny_export):
    _, path = tiny_export
    real_run = graph_checks.run

    def run_with_drift(session, batch):
        output = real_run(session, batch)
        level = session.get_session_options().graph_optimization_level
        return output + 1e-3 if level.name == "ORT_ENABLE_ALL" else output

    monkeypatch.setattr(graph_checks, "run", run_with_drift)
    with pytest.raises(GateFailed) as raised:
        check_optimization_levels(path, _sample((2, 5, 360, 52)), ATOL, RTOL)
    assert raised.value.key == "checks.optimization_levels_differ"
    assert raised.value.exit_code == 3


# --- recurrent layer layout ---------------------------------------------------------------


def _lstm_model(layout: int) -> onnx.ModelProto:
    hidden, features = 4, 3
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, features)).astype(np.float32), "W")
    recurrence = numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32), "R")
    x_shape = ["batch", 5, features] if layout else [5, "batch", features]
    y_shape = ["batch", 5, 1, hidden] if layout else [5, 1, "batch", hidden]
    return _graph_model(
        [helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=hidden, layout=layout, name="encoder_lstm")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [weights, recurrence],
    )


def test_rnn_layout_batch_first_rejected():
    with pytest.raises(ExportError) as raised:
        check_rnn_layout(_lstm_model(layout=1))
    assert raised.value.key == "checks.rnn_layout"
    assert "LSTM node 'encoder_lstm'" in str(raised.value)
    assert "layout=0" in str(raised.value)


def test_rnn_layout_zero_accepted(tiny_export):
    assert check_rnn_layout(_lstm_model(layout=0)).rnn_nodes == ("encoder_lstm",)
    _, path = tiny_export
    assert len(check_rnn_layout(path).to_dict()["rnn_nodes"]) == 10


# --- per-pass differential checking in optimize.py ----------------------------------------


def test_optimizer_pass_changing_outputs_rejected(monkeypatch, tmp_path, tiny_export):
    _, path = tiny_export
    harmful = "eliminate_nop_transpose"
    passes = ["eliminate_identity", harmful, "eliminate_unused_initializer", "fuse_matmul_add_bias_into_gemm"]
    real_optimize = onnxoptimizer.optimize

    def optimize_with_harmful_pass(model, names, fixed_point=False):
        optimized = real_optimize(model, names, fixed_point=fixed_point)
        if names != [harmful]:
            return optimized
        # Shift the bias of the node that produces the graph output, as a broken pass might.
        producer = next(node for node in optimized.graph.node if optimized.graph.output[0].name in node.output)
        initializer = next(tensor for tensor in optimized.graph.initializer if tensor.name == producer.input[-1])
        initializer.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(initializer) + 0.5, initializer.name))
        return optimized

    monkeypatch.setattr(onnxoptimizer, "optimize", optimize_with_harmful_pass)
    settings = OptimizationSettings(passes=passes)
    result = optimize_onnx(path, tmp_path / "optimized.onnx", settings, _sample((2, 5, 360, 52)))
    assert list(result.rejected) == [harmful]
    assert result.rejected[harmful].startswith("changed outputs")
    assert result.applied == [name for name in passes if name != harmful]
    assert result.parity.passed
