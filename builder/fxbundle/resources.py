"""Locate templates, MQL5 includes, default config and example data.

An installed wheel carries ``templates/``, ``mql5/`` and ``config/`` under ``fxbundle/_data``;
a source checkout (editable install) has them at the repository root. A project directory
may hold its own copies, which win over the built-in ones.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
_WHEEL_DATA = PACKAGE_DIR / "_data"
_SOURCE_ROOT = PACKAGE_DIR.parent.parent  # builder/fxbundle -> repository root


def builtin_dir(name: str) -> Path:
    """Return the built-in ``templates``, ``mql5`` or ``config`` directory."""
    for root in (_WHEEL_DATA, _SOURCE_ROOT):
        candidate = root / name
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"built-in directory {name!r} is missing from the fxbundle installation ({PACKAGE_DIR}); reinstall fxbundle")


def find_file(name: str, subdir: str, project_dir: Path | None = None) -> Path:
    """Return ``<project>/<subdir>/<name>`` if it exists, else the built-in file."""
    if project_dir is not None:
        candidate = Path(project_dir) / subdir / name
        if candidate.is_file():
            return candidate
    return builtin_dir(subdir) / name


def templates_dir(project_dir: Path | None = None) -> Path:
    """Return the project's ``templates/`` if it has one, else the built-in templates."""
    if project_dir is not None and (Path(project_dir) / "templates").is_dir():
        return Path(project_dir) / "templates"
    return builtin_dir("templates")


def source_checkout_root() -> Path | None:
    """Return the repository root when running from a source checkout, else None."""
    return _SOURCE_ROOT if (_SOURCE_ROOT / "pyproject.toml").is_file() else None


def default_fx_data_dir() -> Path:
    """Return the folder of example H1 bars: ``FXBUNDLE_FX_DATA``, else ``../shared/data/fx`` beside the checkout."""
    configured = os.environ.get("FXBUNDLE_FX_DATA")
    if configured:
        return Path(configured)
    root = source_checkout_root() or Path.cwd()
    return (root.parent / "shared" / "data" / "fx").resolve()
