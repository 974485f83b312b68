"""Render the MetaTrader 5 Expert Advisor and the model_spec.mqh include it reads.

The templates receive one validated :class:`EAContext` as ``ctx`` and format numbers, strings
and timeframes only through the filters defined here, so the generated MQL5 reproduces the
Python float64 values exactly. Undefined template variables are errors, never empty text.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from fxbundle.errors import BundleError

EXPERT_TEMPLATE = "expert.mq5.j2"
MODEL_SPEC_TEMPLATE = "model_spec.mqh.j2"
MODEL_SPEC_FILE = "model_spec.mqh"

# Feature sets with a hand-written MQL5 port shipped under MQL5/Include.
FEATURE_INCLUDES = {"fxbundle-example-v1": "FxBundle/ExampleFeatures.mqh"}
# Folder under MQL5/Include that receives a user's --features-mqh file.
USER_FEATURES_INCLUDE_DIR = "FxBundle/Features"
REQUIRED_FEATURE_SYMBOLS = ("FxbComputeFeatures", "FXB_FEATURES_COUNT", "FXB_FEATURES_WARMUP_BARS")

# The MQL5 reference limits the path string of a #resource directive to 63 characters.
MAX_RESOURCE_PATH_CHARS = 63

# MQL5 ENUM_TIMEFRAMES names. MN1 is left out on purpose: the EA finds the bars closed by a
# cutoff with PeriodSeconds(), which is only right for timeframes of fixed length.
MQL5_TIMEFRAMES = {
    name: f"PERIOD_{name}"
    for name in (
        "M1", "M2", "M3", "M4", "M5", "M6", "M10", "M12", "M15", "M20", "M30",
        "H1", "H2", "H3", "H4", "H6", "H8", "H12", "D1", "W1",
    )
}  # fmt: skip

SCALE_BASES = ("pip", "point")

# Horizons (in base bars) that the EA prints. Those beyond the model's horizon are dropped, and
# the model's last horizon is always printed.
REPORT_HORIZONS = (1, 6, 12, 36)

# Relative tolerance of the check of 1 / pip against the multiplier, here and in the EA template
# (a test keeps the two equal).
MULTIPLIER_RTOL = 1e-6

_SAFE_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_SAFE_INCLUDE_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")
_PAIR = re.compile(r"[A-Za-z0-9][A-Za-z0-9._#-]*")
_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class EAContext:
    """Everything the EA and model_spec.mqh templates render; validated on construction."""

    tool_version: str
    bundle_version: str
    pair: str
    model_file: str
    model_sha256: str
    checkpoint_sha256: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    timeframes: tuple[str, ...]
    base_timeframe: str
    seq_len: int
    n_features: int
    horizon: int
    digits: int
    point: float
    pip_size: float
    pips_multiplier: float
    scale_basis: str
    scaling_applied: bool
    output_units: str
    feature_set: str
    features_include: str
    norm_mean: list[list[float]]
    norm_std: list[list[float]]
    norm_clip: float

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise BundleError on the first field that the EA could not use as given."""
        _validate_text_fields(self)
        _validate_identity(self)
        _validate_model_file(self.model_file)
        _validate_layout(self)
        _validate_quote_convention(self)
        _validate_normalization(self)
        _validate_features_include(self.features_include)

    @property
    def mql5_version(self) -> str:
        """``major.minor`` as ``#property version`` expects it, for example "1.02" for 1.2.3."""
        major, minor, _ = _VERSION.fullmatch(self.bundle_version).groups()
        return f"{int(major)}.{int(minor):02d}"

    @property
    def input_size(self) -> int:
        return math.prod(self.input_shape)

    @property
    def report_horizons(self) -> tuple[int, ...]:
        horizons = [h for h in REPORT_HORIZONS if h <= self.horizon]
        if self.horizon not in horizons:
            horizons.append(self.horizon)
        return tuple(horizons)

    @property
    def forecast_unit(self) -> str:
        return "points" if self.scale_basis == "point" else "pips"


def _validate_text_fields(context: EAContext) -> None:
    # The templates paste these strings into MQL5 string literals and comments, so each must be
    # one line of printable ASCII without the quote and backslash that would end or escape a literal.
    # model_file and features_include have stricter checks of their own.
    for field in ("tool_version", "bundle_version", "pair", "output_units", "feature_set"):
        value = getattr(context, field)
        if not isinstance(value, str) or not value or not all(" " <= character <= "~" and character not in '"\\' for character in value):
            raise BundleError("ea.text_invalid", field=field, value=repr(value))


def _validate_identity(context: EAContext) -> None:
    if not _VERSION.fullmatch(context.bundle_version):
        raise BundleError("ea.bundle_version_invalid", version=context.bundle_version)
    if not _PAIR.fullmatch(context.pair):
        raise BundleError("ea.pair_invalid", pair=context.pair)
    for field in ("model_sha256", "checkpoint_sha256"):
        value = getattr(context, field)
        if not isinstance(value, str) or not _SHA256.fullmatch(value):
            raise BundleError("ea.sha256_invalid", field=field, value=repr(value))


def _validate_model_file(model_file: str) -> None:
    if not isinstance(model_file, str):
        raise BundleError("ea.text_invalid", field="model_file", value=repr(model_file))
    # The model sits next to the EA, so the #resource path is the bare file name.
    if "/" in model_file or "\\" in model_file or ".." in model_file:
        raise BundleError("ea.model_file_has_path", model_file=model_file)
    if not _SAFE_FILE_NAME.fullmatch(model_file) or not model_file.lower().endswith(".onnx"):
        raise BundleError("ea.model_file_invalid", model_file=model_file)
    if len(model_file) > MAX_RESOURCE_PATH_CHARS:
        raise BundleError("ea.resource_path_too_long", path=model_file, length=len(model_file), limit=MAX_RESOURCE_PATH_CHARS)


def _validate_layout(context: EAContext) -> None:
    if not context.timeframes:
        raise BundleError("ea.timeframes_empty")
    for timeframe in (*context.timeframes, context.base_timeframe):
        if timeframe not in MQL5_TIMEFRAMES:
            raise BundleError("ea.timeframe_unknown", timeframe=timeframe, supported=", ".join(MQL5_TIMEFRAMES))
    duplicates = sorted({tf for tf in context.timeframes if context.timeframes.count(tf) > 1})
    if duplicates:
        raise BundleError("ea.timeframe_duplicate", timeframes=", ".join(duplicates))

    for field in ("seq_len", "n_features", "horizon"):
        value = getattr(context, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BundleError("ea.dimension_invalid", field=field, value=repr(value))

    expected_input = (1, len(context.timeframes), context.seq_len, context.n_features)
    if tuple(context.input_shape) != expected_input:
        raise BundleError("ea.input_shape_mismatch", actual=_shape_text(context.input_shape), expected=_shape_text(expected_input))
    expected_output = (1, context.horizon)
    if tuple(context.output_shape) != expected_output:
        raise BundleError("ea.output_shape_mismatch", actual=_shape_text(context.output_shape), expected=_shape_text(expected_output))


def _validate_quote_convention(context: EAContext) -> None:
    if isinstance(context.digits, bool) or not isinstance(context.digits, int) or not 0 <= context.digits <= 8:
        raise BundleError("ea.digits_invalid", digits=repr(context.digits))
    for field in ("point", "pip_size"):
        value = getattr(context, field)
        if not _is_positive_number(value):
            raise BundleError("ea.price_step_invalid", field=field, value=repr(value))
    if not _is_positive_number(context.pips_multiplier):
        raise BundleError("ea.pips_multiplier_invalid", value=repr(context.pips_multiplier))
    if context.scale_basis not in SCALE_BASES:
        raise BundleError("ea.scale_basis_invalid", value=repr(context.scale_basis), allowed=", ".join(SCALE_BASES))
    if not isinstance(context.scaling_applied, bool):
        raise BundleError("ea.scaling_applied_invalid", value=repr(context.scaling_applied))

    # The EA checks 1 / basis against the multiplier at start-up; catch a bad pair entry here first.
    basis = context.point if context.scale_basis == "point" else context.pip_size
    expected = 1.0 / basis
    if not math.isclose(expected, context.pips_multiplier, rel_tol=MULTIPLIER_RTOL, abs_tol=0.0):
        raise BundleError(
            "ea.pips_multiplier_mismatch",
            multiplier=format(context.pips_multiplier, ".10g"),
            basis=context.scale_basis,
            basis_value=format(basis, ".10g"),
            expected=format(expected, ".10g"),
        )


def _validate_normalization(context: EAContext) -> None:
    expected = (len(context.timeframes), context.n_features)
    for field in ("norm_mean", "norm_std"):
        rows = getattr(context, field)
        # A ragged array is reported with the length of its first wrong row.
        lengths = [len(row) for row in rows]
        wrong = [length for length in lengths if length != context.n_features]
        actual = (len(rows), wrong[0] if wrong else context.n_features)
        if len(rows) != expected[0] or wrong:
            raise BundleError("ea.norm_shape_mismatch", field=field, actual=_shape_text(actual), expected=_shape_text(expected))
        for tf_index, row in enumerate(rows):
            for feature, value in enumerate(row):
                if not _is_finite_number(value):
                    raise BundleError("ea.norm_value_invalid", field=field, timeframe=context.timeframes[tf_index], feature=feature, value=repr(value))
                if field == "norm_std" and value <= 0:
                    raise BundleError("ea.norm_std_invalid", timeframe=context.timeframes[tf_index], feature=feature, value=repr(value))
    if not _is_positive_number(context.norm_clip):
        raise BundleError("ea.norm_clip_invalid", value=repr(context.norm_clip))


def _validate_features_include(path: str) -> None:
    if not isinstance(path, str):
        raise BundleError("ea.text_invalid", field="features_include", value=repr(path))
    if not _SAFE_INCLUDE_PATH.fullmatch(path) or ".." in path or not path.lower().endswith(".mqh"):
        raise BundleError("ea.features_include_invalid", path=path)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_number(value: Any) -> bool:
    return _is_finite_number(value) and value > 0


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(dim) for dim in shape) + ")"


# --- Jinja2 filters -------------------------------------------------------------------------


def format_mql5_double(value: float) -> str:
    """Format a float as an MQL5 double literal with 17 significant digits.

    17 digits identify every float64, so the compiled EA contains the same value as Python. The
    literal always has a decimal point, which keeps MQL5 from reading it as an integer.
    """
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"MQL5 has no literal for {number!r}")
    mantissa, separator, exponent = format(number, ".17g").partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return mantissa + separator + exponent


def format_mql5_double_lines(values: list[float], per_line: int) -> list[str]:
    """Format doubles as initializer lines of ``per_line`` values, commas between all values."""
    literals = [format_mql5_double(value) for value in values]
    lines = [", ".join(literals[start : start + per_line]) for start in range(0, len(literals), per_line)]
    return [line + "," for line in lines[:-1]] + lines[-1:]


def format_mql5_string(value: str) -> str:
    """Quote text as an MQL5 string literal."""
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def format_mql5_timeframe(name: str) -> str:
    return MQL5_TIMEFRAMES[name]


def format_mql5_bool(value: bool) -> str:
    return "true" if value else "false"


def format_mql5_initializer(values: tuple[int, ...]) -> str:
    """Format integers as an MQL5 array initializer, for example ``{1, 5, 360, 52}``."""
    return "{" + ", ".join(str(int(value)) for value in values) + "}"


def _environment(templates_dir: Path) -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["mql5_double"] = format_mql5_double
    environment.filters["mql5_double_lines"] = format_mql5_double_lines
    environment.filters["mql5_string"] = format_mql5_string
    environment.filters["mql5_timeframe"] = format_mql5_timeframe
    environment.filters["mql5_bool"] = format_mql5_bool
    environment.filters["mql5_initializer"] = format_mql5_initializer
    return environment


# --- rendering ------------------------------------------------------------------------------


def render_expert(context: EAContext, templates_dir: Path) -> str:
    """Render the Expert Advisor source (.mq5) from ``expert.mq5.j2``."""
    return _render(context, Path(templates_dir), EXPERT_TEMPLATE)


def render_model_spec(context: EAContext, templates_dir: Path) -> str:
    """Render ``model_spec.mqh``: the model's constants and normalization arrays."""
    return _render(context, Path(templates_dir), MODEL_SPEC_TEMPLATE)


def _render(context: EAContext, templates_dir: Path, template_name: str) -> str:
    environment = _environment(templates_dir)
    try:
        template = environment.get_template(template_name)
    except jinja2.TemplateNotFound as error:
        raise BundleError("ea.template_not_found", template=template_name, directory=str(templates_dir)) from error
    except jinja2.TemplateSyntaxError as error:
        raise BundleError("ea.template_syntax_error", template=template_name, line=error.lineno, detail=error.message) from error

    try:
        return template.render(ctx=context)
    except jinja2.UndefinedError as error:
        raise BundleError("ea.template_variable_undefined", template=template_name, name=_undefined_key(error)) from error


def _undefined_key(error: jinja2.UndefinedError) -> str:
    """Extract the missing name from StrictUndefined's message ("'x' is undefined", "... has no attribute 'x'")."""
    message = error.message or str(error)
    match = re.search(r"has no attribute '([^']+)'", message) or re.search(r"'([^']+)' is undefined", message)
    return match.group(1) if match else message


def write_ea_files(context: EAContext, templates_dir: Path, out_dir: Path, ea_name: str) -> list[Path]:
    """Render and write ``<ea_name>.mq5`` and ``model_spec.mqh`` as ASCII into ``out_dir``.

    Returns the written paths, EA first. MetaEditor misreads UTF-8 without a byte-order mark,
    so any non-ASCII character in the rendered text raises instead of being written.
    """
    if not _SAFE_FILE_NAME.fullmatch(ea_name) or ".." in ea_name or ea_name.lower().endswith(".mq5"):
        raise BundleError("ea.ea_name_invalid", name=ea_name)

    expert_file = f"{ea_name}.mq5"
    rendered = {
        expert_file: render_expert(context, templates_dir),
        MODEL_SPEC_FILE: render_model_spec(context, templates_dir),
    }
    for file_name, text in rendered.items():
        _require_ascii(file_name, text)

    out_dir = Path(out_dir)
    written: list[Path] = []
    for file_name, text in rendered.items():
        path = out_dir / file_name
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            path.write_bytes(text.encode("ascii"))
        except OSError as error:
            raise BundleError("ea.write_failed", path=str(path), detail=str(error)) from error
        written.append(path)
    return written


def _require_ascii(file_name: str, text: str) -> None:
    for line_number, line in enumerate(text.splitlines(), start=1):
        for column, character in enumerate(line, start=1):
            if ord(character) > 127:
                raise BundleError("ea.rendered_not_ascii", file=file_name, line=line_number, column=column, character=repr(character))


# --- features include -----------------------------------------------------------------------


def resolve_features_include(feature_set: str, features_mqh: Path | None) -> tuple[str, Path | None]:
    """Return the EA's features include path (under MQL5/Include) and the user file to copy, if any.

    A ``features_mqh`` given by the user wins over the built-in port and is copied into the
    bundle as ``MQL5/Include/FxBundle/Features/<file name>``.
    """
    if features_mqh is None:
        include = FEATURE_INCLUDES.get(feature_set)
        if include is None:
            raise BundleError(
                "ea.feature_set_unsupported",
                feature_set=feature_set,
                known=", ".join(sorted(FEATURE_INCLUDES)),
                symbols=", ".join(REQUIRED_FEATURE_SYMBOLS),
            )
        return include, None

    path = Path(features_mqh)
    if not path.is_file():
        raise BundleError("ea.features_mqh_not_found", path=str(path))
    if path.suffix.lower() != ".mqh" or not _SAFE_FILE_NAME.fullmatch(path.name):
        raise BundleError("ea.features_mqh_bad_name", path=str(path))

    code = _strip_mql5_comments(_read_mql5_source(path))
    missing = [name for name in REQUIRED_FEATURE_SYMBOLS if not re.search(rf"\b{name}\b", code)]
    if missing:
        raise BundleError("ea.features_mqh_incomplete", path=str(path), missing=", ".join(missing))
    return f"{USER_FEATURES_INCLUDE_DIR}/{path.name}", path


def _read_mql5_source(path: Path) -> str:
    """Decode an MQL5 source file the way MetaEditor saves them: UTF-16LE or UTF-8, with or without BOM."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    return data.decode("utf-8-sig", errors="replace")


def _strip_mql5_comments(code: str) -> str:
    # A name that appears only in a comment does not define anything.
    # NOTE: comment markers inside string literals are not recognized, so a string containing
    # "//" hides the rest of its line from the check.
    without_blocks = re.sub(r"/\*.*?\*/", " ", code, flags=re.DOTALL)
    return re.sub(r"//[^\n]*", " ", without_blocks)
