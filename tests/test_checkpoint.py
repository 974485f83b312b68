"""Checkpoint loading: the happy path and every way a checkpoint can be bad."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from conftest import EXAMPLE_CHECKPOINT, TINY_HYPERPARAMETERS, tiny_payload
from fxbundle import architectures
from fxbundle.architectures import MultiTFLSTMModel
from fxbundle.checkpoint import load_checkpoint
from fxbundle.errors import CheckpointError


def _save(tmp_path, payload, name="model.pt"):
    path = tmp_path / name
    torch.save(payload, path)
    return path


def _load_error(path, **kwargs) -> CheckpointError:
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path, **kwargs)
    return raised.value


def test_reference_model_size():
    model = MultiTFLSTMModel()
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters == 1_213_092
    assert parameters * 4 / 1e6 == pytest.approx(4.85, abs=0.01)


def test_tiny_checkpoint_loads(tiny_checkpoint):
    checkpoint = load_checkpoint(tiny_checkpoint)
    assert checkpoint.pair == "USDJPY"
    assert checkpoint.input_shape == (1, 5, 360, 52)
    assert checkpoint.output_shape == (1, 36)
    assert not checkpoint.model.training
    assert len(checkpoint.sha256) == 64


def test_example_checkpoint_loads_weights_only():
    payload = torch.load(EXAMPLE_CHECKPOINT, weights_only=True)
    assert payload["architecture"] == "MultiTFLSTMModel"
    assert payload["timeframes"] == ["H1", "H2", "H4", "H8", "D1"]
    checkpoint = load_checkpoint(EXAMPLE_CHECKPOINT)
    assert checkpoint.parameter_count == 1_213_092
    assert checkpoint.extra["training"]["test_start"].startswith("2021-01-01")


def test_missing_file(tmp_path):
    error = _load_error(tmp_path / "absent.pt")
    assert error.key == "checkpoint.not_found"
    assert "absent.pt" in str(error)


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"this is not a torch file")
    assert _load_error(path).key == "checkpoint.unreadable"


def test_truncated_file(tmp_path, tiny_checkpoint):
    data = tiny_checkpoint.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    assert _load_error(path).key == "checkpoint.unreadable"


def test_pickled_module_rejected(tmp_path):
    path = _save(tmp_path, MultiTFLSTMModel(**TINY_HYPERPARAMETERS))
    error = _load_error(path)
    assert error.key == "checkpoint.unsafe_pickle"
    assert "--trust-checkpoint" in str(error)


def test_trusted_module_needs_metadata(tmp_path):
    path = _save(tmp_path, MultiTFLSTMModel(**TINY_HYPERPARAMETERS))
    assert _load_error(path, trust=True).key == "checkpoint.module_without_metadata"


def test_trusted_module_with_metadata_loads(tmp_path):
    module = MultiTFLSTMModel(**TINY_HYPERPARAMETERS)
    payload = tiny_payload()
    module.fxbundle_metadata = {key: payload[key] for key in ("pair", "timeframes", "seq_len", "n_features", "horizon", "feature_set", "feature_names", "output_units", "normalization")}
    path = _save(tmp_path, module)
    checkpoint = load_checkpoint(path, trust=True)
    assert checkpoint.architecture == "fxbundle.architectures:MultiTFLSTMModel"


class _Exploit:
    """A pickle whose loading would create a directory: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_code_execution_pickle_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "exploit.pt"
    with path.open("wb") as handle:
        pickle.dump({"state_dict": _Exploit(str(marker))}, handle)
    error = _load_error(path)
    assert error.key in {"checkpoint.unsafe_pickle", "checkpoint.unreadable"}
    assert not marker.exists()


def test_missing_required_fields(tmp_path):
    payload = tiny_payload()
    del payload["normalization"], payload["horizon"]
    error = _load_error(_save(tmp_path, payload))
    assert error.key == "checkpoint.missing_fields"
    assert "horizon" in str(error)
    assert "normalization" in str(error)


def test_not_a_dict(tmp_path):
    assert _load_error(_save(tmp_path, [1, 2, 3])).key == "checkpoint.not_a_dict"


def test_missing_state_dict_keys_named(tmp_path):
    payload = tiny_payload()
    del payload["state_dict"]["head.3.bias"]
    error = _load_error(_save(tmp_path, payload))
    assert error.key == "checkpoint.state_dict_keys"
    assert "Missing keys: head.3.bias" in str(error)


def test_unexpected_state_dict_keys_named(tmp_path):
    payload = tiny_payload()
    payload["state_dict"]["extra_layer.weight"] = torch.zeros(3)
    error = _load_error(_save(tmp_path, payload))
    assert error.key == "checkpoint.state_dict_keys"
    assert "Unexpected keys: extra_layer.weight" in str(error)


def test_wrong_tensor_shape(tmp_path):
    payload = tiny_payload()
    payload["state_dict"]["head.3.bias"] = torch.zeros(35)
    error = _load_error(_save(tmp_path, payload))
    assert error.key == "checkpoint.state_dict_shapes"
    assert "head.3.bias" in str(error)


def test_wrong_input_shape(tmp_path):
    payload = tiny_payload(n_features=40, feature_names=[f"f{i}" for i in range(40)])
    error = _load_error(_save(tmp_path, payload))
    assert error.key == "checkpoint.forward_failed"
    assert "[1, 5, 360, 40]" in str(error)


def test_wrong_output_shape(tmp_path):
    payload = tiny_payload(horizon=30)
    error = _load_error(_save(tmp_path, payload))
    assert error.key == "checkpoint.output_shape"
    assert "[1, 30]" in str(error)
    assert "[1, 36]" in str(error)


def test_unknown_architecture(tmp_path):
    payload = tiny_payload()
    payload["architecture"] = "NoSuchModel"
    error = _load_error(_save(tmp_path, payload))
    assert error.key == "checkpoint.unknown_architecture"
    assert "MultiTFLSTMModel" in str(error)


def test_bad_output_units(tmp_path):
    assert _load_error(_save(tmp_path, tiny_payload(output_units="yen"))).key == "checkpoint.bad_output_units"


class _OwnModel(nn.Module):
    def __init__(self, horizon: int = 36):
        super().__init__()
        self.linear = nn.Linear(52, horizon)

    def forward(self, x):
        return self.linear(x[:, 0, -1])


def test_architecture_by_import_path(tmp_path):
    model = _OwnModel()
    payload = tiny_payload()
    payload["architecture"] = "test_checkpoint:_OwnModel"
    payload["hyperparameters"] = {"horizon": 36}
    payload["state_dict"] = model.state_dict()
    checkpoint = load_checkpoint(_save(tmp_path, payload))
    assert isinstance(checkpoint.model, _OwnModel)


def test_architecture_registered_in_code(tmp_path):
    architectures.register("OwnModelForTest")(_OwnModel)
    payload = tiny_payload()
    payload["architecture"] = "OwnModelForTest"
    payload["hyperparameters"] = {}
    payload["state_dict"] = _OwnModel().state_dict()
    assert isinstance(load_checkpoint(_save(tmp_path, payload)).model, _OwnModel)
