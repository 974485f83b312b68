"""Tests of the EA renderer, its templates and the hand-written MQL5 includes.

The rendered EA and model_spec.mqh are compared with golden files. After an intended template
change, regenerate them with ``FXBUNDLE_UPDATE_GOLDEN=1`` and review the diff.
"""

from __future__ import annotations

import os
import re
import string
from pathlib import Path
from typing import Any

import pytest
import yaml

from fxbundle.ea import (
    FEATURE_INCLUDES,
    MAX_RESOURCE_PATH_CHARS,
    MULTIPLIER_RTOL,
    EAContext,
    format_mql5_double,
    render_expert,
    render_model_spec,
    resolve_features_include,
    write_ea_files,
)
from fxbundle.errors import BundleError, FxBundleError
from fxbundle.features import FEATURE_NAMES, FEATURE_SET_NAME, WARMUP_BARS

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATES_DIR = REPO_ROOT / "templates"
MQL5_DIR = REPO_ROOT / "mql5"
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
LOCALES_DIR = REPO_ROOT / "builder" / "fxbundle" / "locales"
UPDATE_GOLDEN = os.environ.get("FXBUNDLE_UPDATE_GOLDEN") == "1"

TIMEFRAMES = ("H1", "H2", "H4", "H8", "D1")


def norm_mean_rows() -> list[list[float]]:
    # Deterministic values of mixed sign and magnitude, including ones that need an exponent.
    return [[((k * 52 + f) % 17 - 8) * 0.00123 * (k + 1) + (1e-20 if f == 0 else 0.0) for f in range(52)] for k in range(5)]


def norm_std_rows() -> list[list[float]]:
    return [[0.0007 * (f + 1) * (k + 1) + 1e-5 for f in range(52)] for k in range(5)]


def usdjpy_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = dict(
        tool_version="0.1.0",
        bundle_version="1.0.0",
        pair="USDJPY",
        model_file="USDJPY_1.0.0.onnx",
        model_sha256="3f" * 32,
        checkpoint_sha256="a7" * 32,
        input_shape=(1, 5, 360, 52),
        output_shape=(1, 36),
        timeframes=TIMEFRAMES,
        base_timeframe="H1",
        seq_len=360,
        n_features=52,
        horizon=36,
        digits=3,
        point=0.001,
        pip_size=0.01,
        pips_multiplier=100.0,
        scale_basis="pip",
        scaling_applied=False,
        output_units="price_change",
        feature_set="fxbundle-example-v1",
        features_include="FxBundle/ExampleFeatures.mqh",
        norm_mean=norm_mean_rows(),
        norm_std=norm_std_rows(),
        norm_clip=10.0,
    )
    fields.update(overrides)
    return fields


def usdjpy_context(**overrides: Any) -> EAContext:
    return EAContext(**usdjpy_fields(**overrides))


def xauusd_context(**overrides: Any) -> EAContext:
    fields = dict(pair="XAUUSD", model_file="XAUUSD_1.0.0.onnx", digits=2, point=0.01, pip_size=0.01, pips_multiplier=100.0, scale_basis="point")
    fields.update(overrides)
    return usdjpy_context(**fields)


def raised_key(**overrides: Any) -> str:
    with pytest.raises(BundleError) as caught:
        usdjpy_context(**overrides)
    return caught.value.key


def write_templates(directory: Path, expert: str, model_spec: str = "// spec\n") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "expert.mq5.j2").write_text(expert, encoding="utf-8")
    (directory / "model_spec.mqh.j2").write_text(model_spec, encoding="utf-8")
    return directory


def function_body(source: str, signature: str) -> str:
    """Return the text from ``signature`` to the closing brace of that MQL5 function."""
    start = source.index(signature)
    opening = source.index("{", start)
    depth = 0
    for position in range(opening, len(source)):
        if source[position] == "{":
            depth += 1
        elif source[position] == "}":
            depth -= 1
            if depth == 0:
                return source[opening : position + 1]
    raise AssertionError(f"unbalanced braces after {signature!r}")


def check_golden(name: str, text: str) -> None:
    path = GOLDEN_DIR / name
    if UPDATE_GOLDEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("ascii"))
    assert path.is_file(), f"golden file {path} is missing; create it with FXBUNDLE_UPDATE_GOLDEN=1"
    assert text == path.read_text(encoding="ascii"), f"{name} differs from its golden file; if intended, rerun with FXBUNDLE_UPDATE_GOLDEN=1 and review the diff"


@pytest.fixture(scope="module")
def expert() -> str:
    return render_expert(usdjpy_context(), TEMPLATES_DIR)


@pytest.fixture(scope="module")
def model_spec() -> str:
    return render_model_spec(usdjpy_context(), TEMPLATES_DIR)


# --- golden files -------------------------------------------------------------------------


def test_expert_matches_golden(expert: str) -> None:
    check_golden("USDJPY_expert.mq5", expert)


def test_model_spec_matches_golden(model_spec: str) -> None:
    check_golden("USDJPY_model_spec.mqh", model_spec)


def test_point_basis_expert_matches_golden() -> None:
    check_golden("XAUUSD_scaled_expert.mq5", render_expert(xauusd_context(scaling_applied=True), TEMPLATES_DIR))


# --- what the rendered EA uses ------------------------------------------------------------


def test_expert_embeds_model_as_resource(expert: str) -> None:
    assert '#resource "USDJPY_1.0.0.onnx" as uchar ExtModel[]' in expert


def test_expert_creates_session_from_resource(expert: str) -> None:
    assert "OnnxCreateFromBuffer(ExtModel, ONNX_DEFAULT)" in expert


def test_expert_includes_model_spec(expert: str) -> None:
    assert '#include "model_spec.mqh"' in expert


def test_expert_includes_onnx_errors(expert: str) -> None:
    assert "#include <FxBundle/OnnxErrors.mqh>" in expert


def test_expert_includes_features(expert: str) -> None:
    assert "#include <FxBundle/ExampleFeatures.mqh>" in expert


def test_model_spec_input_shape(model_spec: str) -> None:
    assert "const ulong FXB_INPUT_SHAPE[4] = {1, 5, 360, 52};" in model_spec


def test_model_spec_output_shape(model_spec: str) -> None:
    assert "const ulong FXB_OUTPUT_SHAPE[2] = {1, 36};" in model_spec


def test_expert_sets_input_shape_from_spec(expert: str) -> None:
    assert "OnnxSetInputShape(ExtHandle, 0, FXB_INPUT_SHAPE)" in expert


def test_expert_sets_output_shape_from_spec(expert: str) -> None:
    assert "OnnxSetOutputShape(ExtHandle, 0, FXB_OUTPUT_SHAPE)" in expert


def test_model_spec_input_size(model_spec: str) -> None:
    assert "#define FXB_INPUT_SIZE      93600" in model_spec


def test_model_spec_multiplier(model_spec: str) -> None:
    assert "const double FXB_PIPS_MULTIPLIER = 100.0;" in model_spec


def test_model_spec_timeframes_in_model_order(model_spec: str) -> None:
    declaration = model_spec[model_spec.index("FXB_TIMEFRAMES[") :]
    declaration = declaration[: declaration.index("};")]
    assert re.findall(r"PERIOD_\w+", declaration) == ["PERIOD_H1", "PERIOD_H2", "PERIOD_H4", "PERIOD_H8", "PERIOD_D1"]


def test_model_spec_base_timeframe(model_spec: str) -> None:
    assert "#define FXB_BASE_TIMEFRAME PERIOD_H1" in model_spec


@pytest.mark.parametrize("name, rows", [("FXB_NORM_MEAN", norm_mean_rows()), ("FXB_NORM_STD", norm_std_rows())])
def test_model_spec_normalization_round_trips(model_spec: str, name: str, rows: list[list[float]]) -> None:
    declaration = model_spec[model_spec.index(f"const double {name}[") :]
    body = declaration[declaration.index("=") : declaration.index("};")]
    body = re.sub(r"//[^\n]*", "", body)
    values = [float(token) for token in re.findall(r"-?\d+\.\d+(?:e[+-]\d+)?", body)]
    assert values == [value for row in rows for value in row]


def test_expert_multiplies_by_multiplier_once(expert: str) -> None:
    assert expert.count("* FXB_PIPS_MULTIPLIER") == 1


def test_expert_skips_multiplier_when_scaling_applied() -> None:
    scaled = render_expert(usdjpy_context(scaling_applied=True), TEMPLATES_DIR)
    assert "* FXB_PIPS_MULTIPLIER" not in scaled


def test_expert_checks_pip_with_digits_convention(expert: str) -> None:
    assert "double basis = (_Digits == 3 || _Digits == 5) ? 10.0 * point : point;" in expert


def test_expert_checks_point_basis_against_point() -> None:
    gold = render_expert(xauusd_context(), TEMPLATES_DIR)
    assert "double basis = point;" in gold


def test_expert_rejects_multiplier_mismatch_at_init(expert: str) -> None:
    on_init = function_body(expert, "int OnInit()")
    assert "return INIT_PARAMETERS_INCORRECT;" in on_init


def test_expert_multiplier_tolerance_matches_renderer(expert: str) -> None:
    tolerance = re.search(r"double tolerance = ([0-9.e+-]+) \* ", expert).group(1)
    assert float(tolerance) == MULTIPLIER_RTOL


def test_expert_warns_on_other_symbol(expert: str) -> None:
    assert "StringFind(_Symbol, FXB_PAIR) != 0" in expert


def test_expert_checks_model_input_count(expert: str) -> None:
    assert "OnnxGetInputCount(ExtHandle)" in expert


def test_expert_checks_model_output_count(expert: str) -> None:
    assert "OnnxGetOutputCount(ExtHandle)" in expert


def test_expert_copies_closed_bars_oldest_first(expert: str) -> None:
    build_input = function_body(expert, "int FxbBuildInput(")
    assert build_input.index("ArraySetAsSeries(rates, false)") < build_input.index("CopyRates(_Symbol, timeframe, newest_open, needed, rates)")


def test_expert_copies_bars_closed_by_cutoff(expert: str) -> None:
    assert "datetime newest_open = (datetime)(cutoff - period);" in expert


def test_expert_cutoff_is_close_of_last_closed_bar(expert: str) -> None:
    assert "datetime cutoff = last_closed_open + PeriodSeconds(FXB_BASE_TIMEFRAME);" in expert


def test_expert_writes_flat_row_major_input(expert: str) -> None:
    assert "ExtInput[(k * FXB_SEQ_LEN + t) * FXB_N_FEATURES + f] = (float)z;" in expert


def test_expert_runs_model_on_float_arrays(expert: str) -> None:
    assert "OnnxRun(ExtHandle, ONNX_DEFAULT, ExtInput, ExtOutput)" in expert


def test_expert_releases_session_in_deinit(expert: str) -> None:
    assert "OnnxRelease(ExtHandle);" in function_body(expert, "void OnDeinit(")


def test_expert_prints_onnx_error_names(expert: str) -> None:
    assert expert.count("FxbOnnxErrorName(error)") >= 4


def test_expert_reports_selected_horizons(expert: str) -> None:
    assert "ExtForecast[0], ExtForecast[5], ExtForecast[11], ExtForecast[35]);" in expert


def test_expert_reports_last_horizon_of_short_model() -> None:
    short = render_expert(usdjpy_context(horizon=8, output_shape=(1, 8)), TEMPLATES_DIR)
    assert "ExtForecast[0], ExtForecast[5], ExtForecast[7]);" in short


@pytest.mark.parametrize("version, expected", [("1.0.0", '"1.00"'), ("1.2.3", '"1.02"'), ("12.34.5", '"12.34"')])
def test_expert_property_version(version: str, expected: str) -> None:
    rendered = render_expert(usdjpy_context(bundle_version=version), TEMPLATES_DIR)
    assert f"#property version   {expected}" in rendered


def test_model_spec_keeps_full_bundle_version() -> None:
    rendered = render_model_spec(usdjpy_context(bundle_version="1.2.3"), TEMPLATES_DIR)
    assert '#define FXB_BUNDLE_VERSION    "1.2.3"' in rendered


@pytest.mark.parametrize("render", [render_expert, render_model_spec])
def test_rendered_banner(render: Any) -> None:
    banner = "\n".join(render(usdjpy_context(), TEMPLATES_DIR).splitlines()[:8])
    assert "Generated by fxbundle 0.1.0 - do not edit" in banner
    assert "3f" * 32 in banner
    assert "a7" * 32 in banner


@pytest.mark.parametrize("render", [render_expert, render_model_spec])
def test_rendered_text_is_ascii(render: Any) -> None:
    assert render(usdjpy_context(), TEMPLATES_DIR).isascii()


# --- number formatting --------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, literal",
    [(100.0, "100.0"), (0.001, "0.001"), (-0.0, "-0.0"), (1e-20, "9.9999999999999995e-21"), (1e17, "1.0e+17"), (0.1, "0.10000000000000001")],
)
def test_mql5_double_literal(value: float, literal: str) -> None:
    assert format_mql5_double(value) == literal


@pytest.mark.parametrize("value", [0.1, 1 / 3, -2.5e-300, 5e-324, 1.7976931348623157e308, 81.121])
def test_mql5_double_round_trips(value: float) -> None:
    assert float(format_mql5_double(value)) == value


# --- invalid contexts ---------------------------------------------------------------------


@pytest.mark.parametrize("model_file", ["../USDJPY.onnx", "models/USDJPY.onnx", "models\\USDJPY.onnx", "USDJPY..onnx"])
def test_model_file_with_path_rejected(model_file: str) -> None:
    assert raised_key(model_file=model_file) == "ea.model_file_has_path"


def test_model_file_without_onnx_suffix_rejected() -> None:
    assert raised_key(model_file="USDJPY.bin") == "ea.model_file_invalid"


def test_model_file_with_quote_rejected() -> None:
    assert raised_key(model_file='USDJPY".onnx') == "ea.model_file_invalid"


def test_resource_path_too_long_rejected() -> None:
    name = "U" * (MAX_RESOURCE_PATH_CHARS - len(".onnx") + 1) + ".onnx"
    assert raised_key(model_file=name) == "ea.resource_path_too_long"


def test_resource_path_at_limit_accepted() -> None:
    name = "U" * (MAX_RESOURCE_PATH_CHARS - len(".onnx")) + ".onnx"
    assert usdjpy_context(model_file=name).model_file == name


def test_input_shape_mismatch_rejected() -> None:
    assert raised_key(input_shape=(1, 5, 360, 51)) == "ea.input_shape_mismatch"


def test_input_shape_batch_not_one_rejected() -> None:
    assert raised_key(input_shape=(8, 5, 360, 52)) == "ea.input_shape_mismatch"


def test_output_shape_mismatch_rejected() -> None:
    assert raised_key(output_shape=(1, 35)) == "ea.output_shape_mismatch"


def test_input_shape_error_names_both_shapes() -> None:
    with pytest.raises(BundleError) as caught:
        usdjpy_context(input_shape=(1, 5, 360, 51))
    assert "(1, 5, 360, 51)" in str(caught.value)
    assert "(1, 5, 360, 52)" in str(caught.value)


def test_norm_mean_missing_timeframe_rejected() -> None:
    assert raised_key(norm_mean=norm_mean_rows()[:4]) == "ea.norm_shape_mismatch"


def test_norm_std_ragged_rejected() -> None:
    rows = norm_std_rows()
    rows[2] = rows[2][:51]
    assert raised_key(norm_std=rows) == "ea.norm_shape_mismatch"


def test_norm_std_zero_rejected() -> None:
    rows = norm_std_rows()
    rows[1][7] = 0.0
    assert raised_key(norm_std=rows) == "ea.norm_std_invalid"


def test_norm_mean_nan_rejected() -> None:
    rows = norm_mean_rows()
    rows[0][0] = float("nan")
    assert raised_key(norm_mean=rows) == "ea.norm_value_invalid"


def test_multiplier_zero_rejected() -> None:
    assert raised_key(pips_multiplier=0.0) == "ea.pips_multiplier_invalid"


def test_multiplier_disagreeing_with_pip_rejected() -> None:
    assert raised_key(pips_multiplier=1000.0) == "ea.pips_multiplier_mismatch"


def test_scale_basis_unknown_rejected() -> None:
    assert raised_key(scale_basis="lot") == "ea.scale_basis_invalid"


def test_timeframe_unknown_rejected() -> None:
    assert raised_key(timeframes=("H1", "H2", "H4", "H8", "MN1")) == "ea.timeframe_unknown"


def test_timeframe_duplicate_rejected() -> None:
    assert raised_key(timeframes=("H1", "H1", "H4", "H8", "D1")) == "ea.timeframe_duplicate"


def test_bundle_version_two_parts_rejected() -> None:
    assert raised_key(bundle_version="1.0") == "ea.bundle_version_invalid"


def test_sha256_short_rejected() -> None:
    assert raised_key(model_sha256="abc") == "ea.sha256_invalid"


def test_non_ascii_output_units_rejected() -> None:
    assert raised_key(output_units="pips\u00b2") == "ea.text_invalid"


@pytest.mark.parametrize("tool_version", ['0.1.0"', "0.1.0\\", "0.1.0\n"])
def test_tool_version_breaking_literal_rejected(tool_version: str) -> None:
    assert raised_key(tool_version=tool_version) == "ea.text_invalid"


def test_features_include_with_parent_rejected() -> None:
    assert raised_key(features_include="../Features.mqh") == "ea.features_include_invalid"


# --- template errors ----------------------------------------------------------------------


def test_undefined_template_variable_names_key(tmp_path: Path) -> None:
    templates = write_templates(tmp_path, expert="// {{ ctx.pair }} {{ missing_value }}\n")
    with pytest.raises(BundleError) as caught:
        render_expert(usdjpy_context(), templates)
    assert caught.value.params["name"] == "missing_value"


def test_undefined_template_variable_names_template(tmp_path: Path) -> None:
    templates = write_templates(tmp_path, expert="// {{ missing_value }}\n")
    with pytest.raises(BundleError) as caught:
        render_expert(usdjpy_context(), templates)
    assert caught.value.params["template"] == "expert.mq5.j2"


def test_undefined_context_field_names_key(tmp_path: Path) -> None:
    templates = write_templates(tmp_path, expert="// {{ ctx.no_such_field }}\n")
    with pytest.raises(BundleError) as caught:
        render_expert(usdjpy_context(), templates)
    assert caught.value.params["name"] == "no_such_field"


def test_undefined_variable_error_key(tmp_path: Path) -> None:
    templates = write_templates(tmp_path, expert="// {{ missing_value }}\n")
    with pytest.raises(BundleError) as caught:
        render_expert(usdjpy_context(), templates)
    assert caught.value.key == "ea.template_variable_undefined"


def test_missing_template_rejected(tmp_path: Path) -> None:
    with pytest.raises(BundleError) as caught:
        render_model_spec(usdjpy_context(), tmp_path)
    assert caught.value.key == "ea.template_not_found"


def test_template_syntax_error_rejected(tmp_path: Path) -> None:
    templates = write_templates(tmp_path, expert="// {% if %}\n")
    with pytest.raises(BundleError) as caught:
        render_expert(usdjpy_context(), templates)
    assert caught.value.key == "ea.template_syntax_error"


# --- writing files ------------------------------------------------------------------------


def test_write_ea_files_paths(tmp_path: Path) -> None:
    written = write_ea_files(usdjpy_context(), TEMPLATES_DIR, tmp_path / "out", "FxBundle_USDJPY")
    assert written == [tmp_path / "out" / "FxBundle_USDJPY.mq5", tmp_path / "out" / "model_spec.mqh"]


def test_write_ea_files_content_is_rendered_expert(tmp_path: Path, expert: str) -> None:
    ea_path, _ = write_ea_files(usdjpy_context(), TEMPLATES_DIR, tmp_path, "FxBundle_USDJPY")
    assert ea_path.read_bytes() == expert.encode("ascii")


def test_write_ea_files_content_is_rendered_spec(tmp_path: Path, model_spec: str) -> None:
    _, spec_path = write_ea_files(usdjpy_context(), TEMPLATES_DIR, tmp_path, "FxBundle_USDJPY")
    assert spec_path.read_bytes() == model_spec.encode("ascii")


def test_write_ea_files_rejects_non_ascii_template(tmp_path: Path) -> None:
    templates = write_templates(tmp_path / "templates", expert="// caf\u00e9 {{ ctx.pair }}\n")
    with pytest.raises(BundleError) as caught:
        write_ea_files(usdjpy_context(), templates, tmp_path / "out", "FxBundle_USDJPY")
    assert caught.value.key == "ea.rendered_not_ascii"


def test_write_ea_files_writes_nothing_when_not_ascii(tmp_path: Path) -> None:
    templates = write_templates(tmp_path / "templates", expert="// ok\n", model_spec="// \u00b5\n")
    with pytest.raises(BundleError):
        write_ea_files(usdjpy_context(), templates, tmp_path / "out", "FxBundle_USDJPY")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../FxBundle", "sub/FxBundle", "FxBundle.mq5", ""])
def test_write_ea_files_rejects_bad_ea_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(BundleError) as caught:
        write_ea_files(usdjpy_context(), TEMPLATES_DIR, tmp_path, name)
    assert caught.value.key == "ea.ea_name_invalid"


# --- features include resolution ----------------------------------------------------------


def test_known_feature_set_uses_builtin_include() -> None:
    assert resolve_features_include(FEATURE_SET_NAME, None) == ("FxBundle/ExampleFeatures.mqh", None)


def test_builtin_includes_exist() -> None:
    missing = [path for path in FEATURE_INCLUDES.values() if not (MQL5_DIR / path).is_file()]
    assert missing == []


def test_unknown_feature_set_rejected() -> None:
    with pytest.raises(BundleError) as caught:
        resolve_features_include("team-features-v7", None)
    assert caught.value.key == "ea.feature_set_unsupported"


def test_unknown_feature_set_message_names_option_and_symbols() -> None:
    with pytest.raises(BundleError) as caught:
        resolve_features_include("team-features-v7", None)
    message = str(caught.value)
    assert "--features-mqh PATH" in message
    assert all(name in message for name in ("FxbComputeFeatures", "FXB_FEATURES_COUNT", "FXB_FEATURES_WARMUP_BARS"))


def test_features_mqh_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(BundleError) as caught:
        resolve_features_include("team-features-v7", tmp_path / "absent.mqh")
    assert caught.value.key == "ea.features_mqh_not_found"


def test_features_mqh_without_names_rejected(tmp_path: Path) -> None:
    path = tmp_path / "team_features.mqh"
    path.write_text("#define FXB_FEATURES_COUNT 52\nbool FxbComputeFeatures(const MqlRates &rates[], const int count, double &features[]) { return true; }\n")
    with pytest.raises(BundleError) as caught:
        resolve_features_include("team-features-v7", path)
    assert caught.value.params["missing"] == "FXB_FEATURES_WARMUP_BARS"


def test_features_mqh_names_in_comments_only_rejected(tmp_path: Path) -> None:
    path = tmp_path / "team_features.mqh"
    path.write_text("// FxbComputeFeatures FXB_FEATURES_COUNT\n/* FXB_FEATURES_WARMUP_BARS */\n")
    with pytest.raises(BundleError) as caught:
        resolve_features_include("team-features-v7", path)
    assert caught.value.key == "ea.features_mqh_incomplete"


def test_features_mqh_wrong_suffix_rejected(tmp_path: Path) -> None:
    path = tmp_path / "team_features.txt"
    path.write_text("")
    with pytest.raises(BundleError) as caught:
        resolve_features_include("team-features-v7", path)
    assert caught.value.key == "ea.features_mqh_bad_name"


def test_features_mqh_is_copied_under_features_folder() -> None:
    path = MQL5_DIR / "FxBundle" / "ExampleFeatures.mqh"
    assert resolve_features_include("team-features-v7", path) == ("FxBundle/Features/ExampleFeatures.mqh", path)


def test_features_mqh_in_utf16_accepted(tmp_path: Path) -> None:
    path = tmp_path / "team_features.mqh"
    path.write_bytes((MQL5_DIR / "FxBundle" / "ExampleFeatures.mqh").read_text(encoding="ascii").encode("utf-16"))
    assert resolve_features_include("team-features-v7", path)[0] == "FxBundle/Features/team_features.mqh"


# --- hand-written MQL5 includes -----------------------------------------------------------


@pytest.fixture(scope="module")
def example_features() -> str:
    return (MQL5_DIR / "FxBundle" / "ExampleFeatures.mqh").read_text(encoding="ascii")


def test_example_feature_names_match_python(example_features: str) -> None:
    declaration = example_features[example_features.index("string FXB_FEATURE_NAMES[52]") :]
    initializer = declaration[declaration.index("{") : declaration.index("};")]
    assert tuple(re.findall(r'"([^"]*)"', initializer)) == FEATURE_NAMES


def test_example_features_count(example_features: str) -> None:
    assert re.search(r"^#define FXB_FEATURES_COUNT (\d+)$", example_features, re.MULTILINE).group(1) == str(len(FEATURE_NAMES))


def test_example_features_warmup(example_features: str) -> None:
    assert re.search(r"^#define FXB_FEATURES_WARMUP_BARS (\d+)$", example_features, re.MULTILINE).group(1) == str(WARMUP_BARS)


def test_example_features_set_name(example_features: str) -> None:
    assert f'#define FXB_FEATURES_SET "{FEATURE_SET_NAME}"' in example_features


def test_example_features_signature(example_features: str) -> None:
    assert "bool FxbComputeFeatures(const MqlRates &rates[], const int count, double &features[])" in example_features


@pytest.mark.parametrize("path", ["FxBundle/ExampleFeatures.mqh", "FxBundle/OnnxErrors.mqh"])
def test_mql5_includes_are_ascii(path: str) -> None:
    assert (MQL5_DIR / path).read_bytes().isascii()


def test_onnx_error_names() -> None:
    source = (MQL5_DIR / "FxBundle" / "OnnxErrors.mqh").read_text(encoding="ascii")
    names = dict((int(code), name) for code, name in re.findall(r'case (\d+):\s*return "(\w+)";', source))
    assert names == {
        5800: "ERR_ONNX_INTERNAL",
        5801: "ERR_ONNX_NOT_INITIALIZED",
        5802: "ERR_ONNX_NOT_SUPPORTED",
        5803: "ERR_ONNX_RUN_FAILED",
        5804: "ERR_ONNX_INVALID_PARAMETERS_COUNT",
        5805: "ERR_ONNX_INVALID_PARAMETER",
        5806: "ERR_ONNX_INVALID_PARAMETER_TYPE",
        5807: "ERR_ONNX_INVALID_PARAMETER_SIZE",
        5808: "ERR_ONNX_WRONG_DIMENSION",
    }


def test_onnx_error_name_fallback() -> None:
    source = (MQL5_DIR / "FxBundle" / "OnnxErrors.mqh").read_text(encoding="ascii")
    assert 'return "error " + IntegerToString(code);' in source


# --- message catalog ----------------------------------------------------------------------


def catalog_placeholders(lang: str) -> dict[str, set[str]]:
    entries = yaml.safe_load((LOCALES_DIR / lang / "ea.yaml").read_text(encoding="utf-8"))
    return {key: {field for _, field, _, _ in string.Formatter().parse(text) if field} for key, text in entries.items()}


def test_catalog_languages_have_same_keys() -> None:
    assert catalog_placeholders("ja").keys() == catalog_placeholders("en").keys()


def test_catalog_languages_have_same_placeholders() -> None:
    english = catalog_placeholders("en")
    japanese = catalog_placeholders("ja")
    assert {key: japanese[key] for key in english} == english


def test_catalog_covers_every_raised_key() -> None:
    source = (REPO_ROOT / "builder" / "fxbundle" / "ea.py").read_text(encoding="utf-8")
    raised = set(re.findall(r'BundleError\(\s*"(ea\.[a-z0-9_]+)"', source))
    assert raised - catalog_placeholders("en").keys() == set()


def test_error_renders_in_japanese() -> None:
    with pytest.raises(FxBundleError) as caught:
        usdjpy_context(model_file="../x.onnx")
    assert "パス区切り" in caught.value.render("ja")


def test_catalog_placeholders_avoid_error_arguments() -> None:
    # FxBundleError and translate() take `key` and `lang` themselves, so a message parameter
    # with either name raises TypeError instead of the intended error.
    used = set().union(*catalog_placeholders("en").values())
    assert used & {"key", "lang"} == set()
