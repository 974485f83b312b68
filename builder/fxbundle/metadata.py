"""``onnx_metadata.json`` and the ONNX ``metadata_props`` that travel inside each model file."""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from fxbundle.export import save_single_file

# The keys below are read by fxbundle.runtime and by people inspecting a model with Netron:
# they must stay stable.
PROP_SCALING_APPLIED = "scaling_applied"
PROP_PIPS_MULTIPLIER = "pips_multiplier"
PROP_PAIR = "pair"
PROP_INPUT_SHAPE = "input_shape"
PROP_OUTPUT_SHAPE = "output_shape"


def model_properties(
    pair: str,
    pips_multiplier: float,
    scaling_applied: bool,
    input_shape: tuple[int, ...],
    output_shape: tuple[int, ...],
    extra: dict[str, str],
) -> dict[str, str]:
    return {
        PROP_SCALING_APPLIED: "true" if scaling_applied else "false",
        PROP_PIPS_MULTIPLIER: format(pips_multiplier, "g"),
        PROP_PAIR: pair,
        PROP_INPUT_SHAPE: json.dumps(list(input_shape)),
        PROP_OUTPUT_SHAPE: json.dumps(list(output_shape)),
        **extra,
    }


def write_model_properties(path: Path, properties: dict[str, str]) -> None:
    """Replace the model's ``metadata_props`` with ``properties`` (sorted, so files are reproducible)."""
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key in sorted(properties):
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = properties[key]
    save_single_file(proto, path)


def read_model_properties(path: Path) -> dict[str, str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {entry.key: entry.value for entry in proto.metadata_props}


def write_metadata(path: Path, sections: dict) -> None:
    """Write onnx_metadata.json; ``sections`` contains conversion, model, performance, accuracy, validation, scaling."""
    required = ("conversion", "model", "performance", "accuracy", "validation", "scaling")
    missing = [name for name in required if name not in sections]
    if missing:
        raise ValueError(f"metadata lacks sections {missing}")
    path.write_text(json.dumps(sections, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
