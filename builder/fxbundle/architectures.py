"""Model architectures, looked up by name when a checkpoint is loaded.

A checkpoint names its architecture; the registry maps that name to a class. A team registers
its own class either in code with :func:`register` or, for a checkpoint, by naming an import
path ``package.module:Class`` as its architecture.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

from fxbundle.errors import CheckpointError

_REGISTRY: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator that makes ``name`` resolve to the decorated nn.Module subclass."""

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        _REGISTRY[name] = cls
        return cls

    return decorator


def registered_names() -> list[str]:
    return sorted(_REGISTRY)


def resolve(name: str) -> type[nn.Module]:
    """Return the class for a registered name or a ``package.module:Class`` import path."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" not in name:
        raise CheckpointError("checkpoint.unknown_architecture", name=name, known=", ".join(registered_names()))

    module_name, _, class_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise CheckpointError("checkpoint.architecture_import_failed", name=name, detail=str(error)) from error
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError("checkpoint.architecture_not_module", name=name)
    return cls


@register("MultiTFLSTMModel")
class MultiTFLSTMModel(nn.Module):
    """One LSTM encoder per timeframe; the last hidden states are fused by an MLP head.

    Input (batch, timeframes, seq_len, n_features); output (batch, horizon). With the default
    sizes (5 timeframes, 52 features, hidden 128, 2 layers, head 128, horizon 36) the model has
    1,213,092 parameters, 4.85 MB in float32.
    """

    def __init__(
        self,
        n_timeframes: int = 5,
        n_features: int = 52,
        hidden_size: int = 128,
        num_layers: int = 2,
        head_hidden: int = 128,
        horizon: int = 36,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.n_timeframes = n_timeframes
        self.encoders = nn.ModuleList(
            nn.LSTM(
                input_size=n_features,
                hidden_size=hidden_size,
                num_layers=num_layers,
                batch_first=True,
                dropout=dropout if num_layers > 1 else 0.0,
            )
            for _ in range(n_timeframes)
        )
        self.head = nn.Sequential(
            nn.Linear(n_timeframes * hidden_size, head_hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(head_hidden, horizon),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last_hidden = []
        for index, encoder in enumerate(self.encoders):
            _, (h_n, _) = encoder(x[:, index])
            last_hidden.append(h_n[-1])
        return self.head(torch.cat(last_hidden, dim=1))
