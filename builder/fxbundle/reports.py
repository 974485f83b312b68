"""``reports/validation.md``: the build's checks, latency and accuracy tables in English and Japanese."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from fxbundle.errors import BundleError


def _number(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}"


def _milliseconds(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _percent(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _share_as_percent(value: Any) -> str:
    return "-" if value is None else f"{100.0 * value:.2f} %"


def _table_cell(text: Any) -> str:
    """Keep a Markdown table row intact: no line breaks or pipes inside a cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _yes_no(value: Any) -> str:
    if value is None:
        return "-"
    return "yes" if value else "no"


def _yes_no_ja(value: Any) -> str:
    if value is None:
        return "-"
    return "はい" if value else "いいえ"


_STATUS_JA = {"passed": "合格", "warning": "警告", "failed": "不合格", "skipped": "省略"}


def _environment(templates_dir: Path) -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir / "reports")),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    environment.filters.update(
        num=_number,
        ms=_milliseconds,
        pct=_percent,
        pct_share=_share_as_percent,
        cell=_table_cell,
        yesno=_yes_no,
        yesno_ja=_yes_no_ja,
        status_ja=lambda status: _STATUS_JA.get(status, status),
    )
    return environment


def render_validation_report(context: dict[str, Any], templates_dir: Path) -> str:
    """Render the English report followed by the Japanese one."""
    environment = _environment(templates_dir)
    parts = []
    for name in ("validation.en.md.j2", "validation.ja.md.j2"):
        try:
            parts.append(environment.get_template(name).render(**context))
        except jinja2.UndefinedError as error:
            raise BundleError("report.template_variable_undefined", template=name, detail=str(error)) from error
        except jinja2.TemplateNotFound as error:
            raise BundleError("report.template_not_found", template=name, directory=str(templates_dir / "reports")) from error
    return "\n---\n\n".join(parts)
