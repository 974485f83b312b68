"""The message catalog: both languages complete, placeholders consistent, every key used exists."""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest

from fxbundle.errors import CheckpointError
from fxbundle.i18n import detect_language, load_catalog, translate

PACKAGE = Path(__file__).resolve().parent.parent / "builder" / "fxbundle"


def _placeholders(template: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(template) if field}


def test_languages_define_same_keys():
    english, japanese = load_catalog("en"), load_catalog("ja")
    assert sorted(set(english) - set(japanese)) == []
    assert sorted(set(japanese) - set(english)) == []


def test_placeholders_match_between_languages():
    english, japanese = load_catalog("en"), load_catalog("ja")
    mismatched = [key for key in english if _placeholders(english[key]) != _placeholders(japanese[key])]
    assert mismatched == []


def test_japanese_catalog_is_translated():
    english, japanese = load_catalog("en"), load_catalog("ja")
    # Entries that are a technical term or only a placeholder read the same in both languages.
    same_in_both = {"summary.zip", "verify.problem"}
    untranslated = sorted(key for key in japanese if japanese[key] == english[key] and key not in same_in_both)
    assert untranslated == []


def test_every_key_used_in_code_exists():
    english = load_catalog("en")
    used = set()
    pattern = re.compile(r"""(?:Error|Failed|GateFailed|t|info|warning|warn)\(\s*["']([a-z_0-9]+\.[a-z_0-9.]+)["']""")
    for path in PACKAGE.rglob("*.py"):
        used.update(pattern.findall(path.read_text(encoding="utf-8")))
    assert used, "the key pattern found nothing: the test itself is broken"
    assert sorted(key for key in used if key not in english) == []


def test_error_renders_in_both_languages(tmp_path):
    error = CheckpointError("checkpoint.not_found", path="model.pt")
    assert str(error) == "checkpoint model.pt not found; pass the trained model with --model PATH"
    assert error.render("ja") == "チェックポイント model.pt が見つかりません。学習済みモデルを --model PATH で指定してください"


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [
        ("ja", {}, "ja"),
        (None, {"FXBUNDLE_LANG": "ja"}, "ja"),
        ("en", {"FXBUNDLE_LANG": "ja"}, "en"),
        (None, {"LANG": "ja_JP.UTF-8"}, "ja"),
        (None, {"LANG": "C.UTF-8"}, "en"),
    ],
)
def test_language_detection_order(monkeypatch, flag, env, expected):
    for variable in ("FXBUNDLE_LANG", "LC_ALL", "LC_MESSAGES", "LANG"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    assert detect_language(flag) == expected


def test_translate_formats_parameters():
    assert translate("bundle.exists", "en", path="dist/x") == "dist/x already exists and is never overwritten; pass a new --version or move the old bundle away"
