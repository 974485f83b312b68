"""Shared fixtures: paths to real data, tiny checkpoints built in code, fast build settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fxbundle.architectures import MultiTFLSTMModel
from fxbundle.checkpoint import make_checkpoint_payload
from fxbundle.data import EXAMPLE_TIMEFRAMES
from fxbundle.features import FEATURE_NAMES, FEATURE_SET_NAME
from fxbundle.i18n import set_language

REPO_ROOT = Path(__file__).resolve().parent.parent
FX_DATA = (REPO_ROOT.parent / "shared" / "data" / "fx").resolve()
USDJPY_CSV = FX_DATA / "USDJPY_H1.csv"
EXAMPLE_CHECKPOINT = REPO_ROOT / "models" / "usdjpy_example_training.pt"

TINY_HYPERPARAMETERS = {"n_timeframes": 5, "n_features": 52, "hidden_size": 8, "num_layers": 2, "head_hidden": 8, "horizon": 36, "dropout": 0.0}


@pytest.fixture(autouse=True)
def english_messages(monkeypatch):
    """Tests read English messages unless they choose another language themselves."""
    monkeypatch.delenv("FXBUNDLE_LANG", raising=False)
    set_language("en")


def tiny_payload(seed: int = 0, **overrides) -> dict:
    """A valid checkpoint dict for a small MultiTFLSTMModel with the example shapes."""
    torch.manual_seed(seed)
    model = MultiTFLSTMModel(**TINY_HYPERPARAMETERS).eval()
    fields = {
        "pair": "USDJPY",
        "timeframes": list(EXAMPLE_TIMEFRAMES),
        "base_timeframe": "H1",
        "seq_len": 360,
        "n_features": 52,
        "horizon": 36,
        "feature_set": FEATURE_SET_NAME,
        "feature_names": list(FEATURE_NAMES),
        "output_units": "price",
        "normalization": {"mean": np.zeros((5, 52)).tolist(), "std": np.ones((5, 52)).tolist(), "clip": 10.0},
    }
    fields.update(overrides)
    return make_checkpoint_payload(model, "MultiTFLSTMModel", TINY_HYPERPARAMETERS, **fields)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.pt"
    torch.save(tiny_payload(), path)
    return path


@pytest.fixture
def fast_config(tmp_path: Path) -> Path:
    """Build settings that keep a tiny build to a few seconds: few timed calls, few windows."""
    path = tmp_path / "fast.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "latency": {"warmup": 3, "samples": 20},
                "accuracy": {"windows": 16, "batch_size": 8},
            }
        ),
        encoding="utf-8",
    )
    return path


@pytest.fixture
def usdjpy_csv() -> Path:
    if not USDJPY_CSV.is_file():
        pytest.fail(f"real FX history missing at {USDJPY_CSV}; the tests read ../shared/data/fx beside the repository")
    return USDJPY_CSV
