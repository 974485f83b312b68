"""Message catalog in English and Japanese.

Every user-facing message (errors, step logs, the summary) is looked up here by key. Each
language has one YAML file per topic under ``locales/<lang>/``. The files are merged, and a
test checks that both languages define the same keys with the same placeholders.
"""

from __future__ import annotations

import locale
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

LANGUAGES = ("en", "ja")
DEFAULT_LANGUAGE = "en"
LOCALES_DIR = Path(__file__).parent / "locales"

_current_language = DEFAULT_LANGUAGE


@lru_cache(maxsize=None)
def load_catalog(lang: str) -> dict[str, str]:
    """Merge every ``locales/<lang>/*.yaml`` file into one flat key → template mapping."""
    catalog: dict[str, str] = {}
    for path in sorted((LOCALES_DIR / lang).glob("*.yaml")):
        entries = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for key, template in entries.items():
            if key in catalog:
                raise RuntimeError(f"message key {key!r} is defined twice in the {lang} catalog ({path.name})")
            catalog[key] = str(template).rstrip("\n")
    return catalog


def detect_language(explicit: str | None = None) -> str:
    """Choose the language: ``--lang``, then ``FXBUNDLE_LANG``, then the locale, else English."""
    for candidate in (explicit, os.environ.get("FXBUNDLE_LANG")):
        if candidate:
            return candidate.strip().lower()[:2]
    for variable in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = os.environ.get(variable, "")
        if value:
            return "ja" if value.lower().startswith("ja") else DEFAULT_LANGUAGE
    system_locale = locale.getlocale()[0] or ""
    return "ja" if system_locale.lower().startswith("ja") else DEFAULT_LANGUAGE


def set_language(lang: str) -> None:
    global _current_language
    _current_language = lang if lang in LANGUAGES else DEFAULT_LANGUAGE


def current_language() -> str:
    return _current_language


def translate(key: str, lang: str | None = None, /, **params: Any) -> str:
    """Render the message ``key`` in ``lang`` (default: the current language).

    A key missing from the catalog is a programming error, so it raises KeyError.
    """
    template = load_catalog(lang or _current_language)[key]
    return template.format(**params)


def t(key: str, /, **params: Any) -> str:
    """Shorthand for :func:`translate` in the current language."""
    return translate(key, **params)
