"""Run a built bundle's model from Python, with the pips multiplier applied exactly once.

Example::

    model = ScaledModel.from_bundle("dist/fxbundle-USDJPY-1.0.0")
    forecast = model.predict_pips(windows)  # windows (batch, 5, 360, 52) -> (batch, 36) pips

A bundle states in two places whether its model already outputs pips or points: the
``scaling`` section of ``onnx_metadata.json`` and the model's ``metadata_props``. Both must
agree, or loading fails. :meth:`ScaledModel.predict_pips` multiplies the raw output by the
pips multiplier only when ``scaling_applied`` is false, then rejects implausibly large values,
which is how a multiplier applied twice shows at run time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fxbundle.errors import FxBundleError
from fxbundle.metadata import PROP_INPUT_SHAPE, PROP_PIPS_MULTIPLIER, PROP_SCALING_APPLIED, read_model_properties
from fxbundle.sessions import create_session

METADATA_FILE = "onnx_metadata.json"
EXPERTS_DIR = "MQL5/Experts"

# Plausibility bounds on |forecast| over the 36-bar horizon. This is a heuristic, not a
# market limit. The largest |close(t+36) - close(t)| in H1 closes from 2012 to 2022 was
# 1,736 pips for GBPUSD (June 2016), 544 pips for USDJPY and 21,849 points for XAUUSD, so
# the bounds leave a margin of about 5×.
# NOTE: a multiplier applied twice on a JPY pair multiplies by 100 again, so a forecast below
# 100 pips (1 yen) stays under 10,000 and passes this check. The agreement check between the
# two metadata sources is the guard that does not depend on the forecast's size.
DEFAULT_MAX_ABS = {"pip": 10_000.0, "point": 100_000.0}


@dataclass(frozen=True)
class BundleScaling:
    """A bundle's declared output units and scaling, checked against both metadata sources."""

    scaling_applied: bool
    pips_multiplier: float
    output_units: str
    scale_basis: str  # "pip" or "point": the unit predict_pips returns


@dataclass(frozen=True)
class BundleModel:
    """The model file a bundle ships for one precision, and the metadata read with it."""

    bundle_dir: Path
    model_path: Path
    precision: str
    scaling: BundleScaling
    properties: dict[str, str]
    metadata: dict[str, Any]


class ScaledModel:
    """An ONNX Runtime session on a bundle's model that applies the pips multiplier once.

    Every inference goes through :meth:`_run`, so a subclass can wrap it, for example to
    compare FP16 against FP32 outputs, without touching the scaling rules.
    """

    def __init__(self, bundle: BundleModel, max_abs_pips: float | None = None, provider: str = "CPUExecutionProvider") -> None:
        self.bundle = bundle
        self.scaling = bundle.scaling
        self.max_abs_pips = max_abs_pips if max_abs_pips is not None else DEFAULT_MAX_ABS.get(bundle.scaling.scale_basis, DEFAULT_MAX_ABS["pip"])
        if not self.max_abs_pips > 0:
            raise ValueError(f"max_abs_pips must be positive, got {max_abs_pips!r}")
        self.session, self.session_info = create_session(bundle.model_path, provider=provider)
        self.input_name = self.session.get_inputs()[0].name
        self.sample_shape = _sample_shape(bundle.properties, bundle.model_path)

    @classmethod
    def from_bundle(
        cls,
        bundle_dir: Path | str,
        precision: str | None = None,
        max_abs_pips: float | None = None,
        provider: str = "CPUExecutionProvider",
    ) -> ScaledModel:
        """Open the model of ``precision`` (default: the shipped precision) in a bundle directory."""
        return cls(load_bundle_model(Path(bundle_dir), precision), max_abs_pips=max_abs_pips, provider=provider)

    @property
    def output_units(self) -> str:
        return self.scaling.output_units

    def predict_price(self, x: np.ndarray) -> np.ndarray:
        """Return the raw model output, in the bundle's declared ``output_units``.

        For a model that outputs price changes (the usual case), this is the price change. For
        a model built with ``output_units`` pips or points, the output is already in that unit.
        """
        return self._run(self._prepare(x))

    def predict_pips(self, x: np.ndarray) -> np.ndarray:
        """Return the forecast in pips (points for point-based pairs), multiplied at most once.

        Raises FxBundleError when a value is not finite or exceeds ``max_abs_pips``.
        """
        raw = self._run(self._prepare(x))
        if self.scaling.scaling_applied:
            # The model already outputs pips or points; multiplying again is the double-pips bug.
            pips = raw
        else:
            pips = raw * np.float32(self.scaling.pips_multiplier)
        self._check_plausible(pips)
        return pips

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        """Return ``x`` as a contiguous float32 batch; a single window gets a batch axis."""
        batch = np.asarray(x, dtype=np.float32)
        if batch.shape == self.sample_shape:
            batch = batch[np.newaxis]
        if batch.ndim != len(self.sample_shape) + 1 or batch.shape[1:] != self.sample_shape:
            raise FxBundleError(
                "runtime.bad_input_shape", found=list(batch.shape), expected=["batch", *self.sample_shape], model=self.bundle.model_path.name
            )
        return np.ascontiguousarray(batch)

    def _check_plausible(self, pips: np.ndarray) -> None:
        if not np.all(np.isfinite(pips)):
            raise FxBundleError("runtime.output_not_finite", model=self.bundle.model_path.name)
        largest = float(np.max(np.abs(pips), initial=0.0))
        if largest > self.max_abs_pips:
            raise FxBundleError(
                "runtime.implausible_pips",
                model=self.bundle.model_path.name,
                value=f"{largest:,.1f}",
                bound=f"{self.max_abs_pips:,.0f}",
                applied="true" if self.scaling.scaling_applied else "false",
                multiplier=format(self.scaling.pips_multiplier, "g"),
            )


def load_bundle_model(bundle_dir: Path, precision: str | None = None) -> BundleModel:
    """Find the model of ``precision`` in a bundle and check that both metadata sources agree."""
    metadata = _read_metadata(bundle_dir)
    conversion = _section(metadata, "conversion", bundle_dir)
    model_files = conversion.get("model_files")
    if not isinstance(model_files, dict) or not model_files:
        raise FxBundleError("runtime.metadata_field_missing", path=str(bundle_dir / METADATA_FILE), field="conversion.model_files")
    chosen = precision or conversion.get("precision")
    if chosen not in model_files:
        raise FxBundleError("runtime.precision_not_shipped", precision=chosen, bundle=str(bundle_dir), available=", ".join(sorted(model_files)))

    model_path = _find_model_file(bundle_dir, str(model_files[chosen]))
    properties = read_model_properties(model_path)
    scaling = _agreed_scaling(metadata, properties, bundle_dir, model_path)
    return BundleModel(bundle_dir=bundle_dir, model_path=model_path, precision=chosen, scaling=scaling, properties=properties, metadata=metadata)


def _read_metadata(bundle_dir: Path) -> dict[str, Any]:
    path = bundle_dir / METADATA_FILE
    if not path.is_file():
        raise FxBundleError("runtime.metadata_missing", path=str(path))
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FxBundleError("runtime.metadata_invalid", path=str(path), detail=str(error)) from error
    if not isinstance(metadata, dict):
        raise FxBundleError("runtime.metadata_invalid", path=str(path), detail="the top level is not a JSON object")
    return metadata


def _section(metadata: dict[str, Any], name: str, bundle_dir: Path) -> dict[str, Any]:
    section = metadata.get(name)
    if not isinstance(section, dict):
        raise FxBundleError("runtime.metadata_field_missing", path=str(bundle_dir / METADATA_FILE), field=name)
    return section


def _find_model_file(bundle_dir: Path, file_name: str) -> Path:
    """Return the one file named ``file_name`` under the bundle's MQL5/Experts folder."""
    matches = sorted((bundle_dir / EXPERTS_DIR).rglob(file_name))
    if not matches:
        raise FxBundleError("runtime.model_not_found", file=file_name, folder=str(bundle_dir / EXPERTS_DIR))
    if len(matches) > 1:
        raise FxBundleError("runtime.model_ambiguous", file=file_name, paths=", ".join(str(path) for path in matches))
    return matches[0]


def _agreed_scaling(metadata: dict[str, Any], properties: dict[str, str], bundle_dir: Path, model_path: Path) -> BundleScaling:
    """Read scaling_applied and pips_multiplier from both sources; any disagreement is an error."""
    metadata_path = str(bundle_dir / METADATA_FILE)
    scaling = _section(metadata, "scaling", bundle_dir)
    for name in ("scaling_applied", "pips_multiplier", "output_units"):
        if name not in scaling:
            raise FxBundleError("runtime.metadata_field_missing", path=metadata_path, field=f"scaling.{name}")
    for name in (PROP_SCALING_APPLIED, PROP_PIPS_MULTIPLIER):
        if name not in properties:
            raise FxBundleError("runtime.property_missing", model=model_path.name, property=name)

    json_applied = scaling["scaling_applied"]
    prop_applied = properties[PROP_SCALING_APPLIED].strip().lower()
    if not isinstance(json_applied, bool) or prop_applied not in ("true", "false"):
        raise FxBundleError(
            "runtime.scaling_disagrees", field="scaling_applied", json_value=json_applied, prop_value=prop_applied, model=model_path.name, path=metadata_path
        )
    if json_applied != (prop_applied == "true"):
        raise FxBundleError(
            "runtime.scaling_disagrees", field="scaling_applied", json_value=json_applied, prop_value=prop_applied, model=model_path.name, path=metadata_path
        )

    json_multiplier = _as_float(scaling["pips_multiplier"])
    prop_multiplier = _as_float(properties[PROP_PIPS_MULTIPLIER])
    if json_multiplier is None or prop_multiplier is None or not math.isclose(json_multiplier, prop_multiplier, rel_tol=1e-9):
        raise FxBundleError(
            "runtime.scaling_disagrees",
            field="pips_multiplier",
            json_value=scaling["pips_multiplier"],
            prop_value=properties[PROP_PIPS_MULTIPLIER],
            model=model_path.name,
            path=metadata_path,
        )
    if not json_multiplier > 0:
        raise FxBundleError("runtime.bad_multiplier", value=scaling["pips_multiplier"], path=metadata_path)

    output_units = str(scaling["output_units"])
    if "output_units" in properties and properties["output_units"] != output_units:
        raise FxBundleError(
            "runtime.scaling_disagrees", field="output_units", json_value=output_units, prop_value=properties["output_units"], model=model_path.name, path=metadata_path
        )
    if json_applied != (output_units != "price"):
        raise FxBundleError("runtime.units_contradict_scaling", units=output_units, applied=json_applied, path=metadata_path)

    return BundleScaling(
        scaling_applied=json_applied,
        pips_multiplier=json_multiplier,
        output_units=output_units,
        scale_basis=str(scaling.get("scale_basis", "pip")),
    )


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _sample_shape(properties: dict[str, str], model_path: Path) -> tuple[int, ...]:
    """Return the shape of one window, without the batch axis, from the ``input_shape`` property."""
    raw = properties.get(PROP_INPUT_SHAPE)
    if raw is None:
        raise FxBundleError("runtime.property_missing", model=model_path.name, property=PROP_INPUT_SHAPE)
    try:
        shape = tuple(int(size) for size in json.loads(raw))
    except (TypeError, ValueError) as error:
        raise FxBundleError("runtime.property_invalid", model=model_path.name, property=PROP_INPUT_SHAPE, value=raw) from error
    return shape[1:]
