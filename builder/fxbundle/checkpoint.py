"""Checkpoint format, safe loading and verification.

A checkpoint is a ``torch.save``d dict of plain data (tensors, numbers, strings, lists, dicts)
that ``torch.load(weights_only=True)`` can read without running any code from the file. A
pickled ``nn.Module``, or any pickle that needs to import code, is rejected unless the user
trusts the file explicitly.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxbundle import architectures
from fxbundle.hashing import sha256_file
from fxbundle.errors import CheckpointError

FORMAT_VERSION = 1

REQUIRED_KEYS = (
    "format_version",
    "architecture",
    "hyperparameters",
    "state_dict",
    "pair",
    "timeframes",
    "seq_len",
    "n_features",
    "horizon",
    "feature_set",
    "feature_names",
    "output_units",
    "normalization",
)

OUTPUT_UNITS = ("price", "pips", "points")


@dataclass
class Checkpoint:
    """A verified checkpoint: the model in eval mode plus what the build needs to know about it."""

    path: Path
    sha256: str
    model: nn.Module
    architecture: str
    hyperparameters: dict[str, Any]
    pair: str
    timeframes: list[str]
    seq_len: int
    n_features: int
    horizon: int
    feature_set: str
    feature_names: list[str]
    output_units: str
    normalization: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, len(self.timeframes), self.seq_len, self.n_features)

    @property
    def output_shape(self) -> tuple[int, int]:
        return (1, self.horizon)

    @property
    def parameter_count(self) -> int:
        return sum(parameter.numel() for parameter in self.model.parameters())



def make_checkpoint_payload(model: nn.Module, architecture: str, hyperparameters: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """Build the dict that :func:`load_checkpoint` reads; ``fields`` are the remaining required keys."""
    payload = {
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "hyperparameters": dict(hyperparameters),
        "state_dict": {name: tensor.detach().clone() for name, tensor in model.state_dict().items()},
        **fields,
    }
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {missing}")
    return payload


def _read(path: Path, trust: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses globals it does not know (a pickled module or custom class) and
        # raises the same exception type for a corrupt pickle stream.
        message = str(error)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if unsafe is None:
            # PyTorch's own text suggests weights_only=False, which is wrong for a corrupt file.
            raise CheckpointError("checkpoint.unreadable", path=str(path), detail="the pickle stream is corrupt") from error
        if not trust:
            raise CheckpointError("checkpoint.unsafe_pickle", path=str(path), detail=unsafe.group(0)) from error
    except Exception as error:  # corrupt files make the unpickler fail in many ways (IndexError, EOFError, ...)
        raise CheckpointError("checkpoint.unreadable", path=str(path), detail=str(error).splitlines()[0]) from error

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # an untrusted-format file can fail in any way while unpickling
        raise CheckpointError("checkpoint.unreadable", path=str(path), detail=str(error).splitlines()[0]) from error


def _payload_from_module(module: nn.Module, path: Path) -> dict[str, Any]:
    """Describe a trusted pickled module; its metadata must sit on the module as attributes."""
    metadata = getattr(module, "fxbundle_metadata", None)
    if not isinstance(metadata, dict):
        raise CheckpointError("checkpoint.module_without_metadata", path=str(path))
    cls = type(module)
    return {
        "format_version": FORMAT_VERSION,
        "architecture": f"{cls.__module__}:{cls.__qualname__}",
        "hyperparameters": {},
        "state_dict": module.state_dict(),
        "_module": module,
        **metadata,
    }


def load_checkpoint(path: Path, trust: bool = False) -> Checkpoint:
    """Load, validate and verify a checkpoint; raise CheckpointError naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint.not_found", path=str(path))

    payload = _read(path, trust)
    if isinstance(payload, nn.Module):
        payload = _payload_from_module(payload, path)
    if not isinstance(payload, dict):
        raise CheckpointError("checkpoint.not_a_dict", path=str(path), type=type(payload).__name__)

    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise CheckpointError("checkpoint.missing_fields", path=str(path), fields=", ".join(missing))
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError("checkpoint.bad_format_version", path=str(path), found=payload["format_version"], expected=FORMAT_VERSION)
    if payload["output_units"] not in OUTPUT_UNITS:
        raise CheckpointError("checkpoint.bad_output_units", path=str(path), found=payload["output_units"], allowed=", ".join(OUTPUT_UNITS))
    if len(payload["feature_names"]) != payload["n_features"]:
        raise CheckpointError("checkpoint.feature_names_mismatch", path=str(path), names=len(payload["feature_names"]), n_features=payload["n_features"])

    model = payload.get("_module")
    if model is None:
        model = _build_model(payload, path)
    model.eval()

    checkpoint = Checkpoint(
        path=path,
        sha256=sha256_file(path),
        model=model,
        architecture=str(payload["architecture"]),
        hyperparameters=dict(payload["hyperparameters"]),
        pair=str(payload["pair"]).upper(),
        timeframes=[str(tf) for tf in payload["timeframes"]],
        seq_len=int(payload["seq_len"]),
        n_features=int(payload["n_features"]),
        horizon=int(payload["horizon"]),
        feature_set=str(payload["feature_set"]),
        feature_names=[str(name) for name in payload["feature_names"]],
        output_units=str(payload["output_units"]),
        normalization=dict(payload["normalization"]),
        extra={key: value for key, value in payload.items() if key not in REQUIRED_KEYS and not key.startswith("_")},
    )
    verify_forward(checkpoint)
    return checkpoint


def _build_model(payload: dict[str, Any], path: Path) -> nn.Module:
    cls = architectures.resolve(str(payload["architecture"]))
    try:
        model = cls(**payload["hyperparameters"])
    except TypeError as error:
        raise CheckpointError("checkpoint.bad_hyperparameters", path=str(path), architecture=payload["architecture"], detail=str(error)) from error

    state_dict = payload["state_dict"]
    expected = set(model.state_dict())
    found = set(state_dict)
    missing = sorted(expected - found)
    unexpected = sorted(found - expected)
    if missing or unexpected:
        raise CheckpointError(
            "checkpoint.state_dict_keys",
            path=str(path),
            missing=", ".join(missing) or "none",
            unexpected=", ".join(unexpected) or "none",
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        # Same keys but a tensor of another shape: torch names the key in its message.
        raise CheckpointError("checkpoint.state_dict_shapes", path=str(path), detail=str(error).strip().splitlines()[-1].strip()) from error
    return model


def verify_forward(checkpoint: Checkpoint) -> None:
    """Run one forward pass on zeros of the declared input shape and check the output shape."""
    sample = torch.zeros(checkpoint.input_shape, dtype=torch.float32)
    try:
        with torch.no_grad():
            output = checkpoint.model(sample)
    except Exception as error:  # any failure of user model code is reported the same way
        raise CheckpointError(
            "checkpoint.forward_failed", path=str(checkpoint.path), shape=list(checkpoint.input_shape), detail=str(error).splitlines()[0]
        ) from error
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != checkpoint.output_shape:
        found = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise CheckpointError(
            "checkpoint.output_shape", path=str(checkpoint.path), shape=list(checkpoint.input_shape), found=found, expected=list(checkpoint.output_shape)
        )
    if not torch.isfinite(output).all():
        raise CheckpointError("checkpoint.output_not_finite", path=str(checkpoint.path))
