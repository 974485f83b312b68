"""Error types and the exit codes the CLI maps them to.

Every error carries a catalog key and its parameters, so the CLI can print it in the
user's language. ``str(error)`` gives the English text for logs and tracebacks.
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_GATE_FAILED = 3


class FxBundleError(Exception):
    """A failed step or bad input: exit code 1. The message names the object, the rule and the fix."""

    exit_code = EXIT_ERROR

    def __init__(self, key: str, /, **params: Any) -> None:
        self.key = key
        self.params = params
        super().__init__(self.render("en"))

    def render(self, lang: str) -> str:
        from fxbundle.i18n import translate

        return translate(self.key, lang, **self.params)


class UsageError(FxBundleError):
    """A command line that cannot be run as given: exit code 2."""

    exit_code = EXIT_USAGE


class CheckpointError(FxBundleError):
    """A checkpoint that is missing, unreadable, unsafe or inconsistent."""


class ConfigError(FxBundleError):
    """A configuration or pair file that is missing or invalid."""


class DataError(FxBundleError):
    """Bars or test windows that are missing or invalid."""


class ExportError(FxBundleError):
    """ONNX export, optimization or conversion failed."""


class BundleError(FxBundleError):
    """The bundle cannot be written."""


class GateFailed(FxBundleError):
    """A validation gate failed: exit code 3, and nothing is written."""

    exit_code = EXIT_GATE_FAILED
