"""JST-stamped logging and the step reporter the build pipeline uses.

Every step writes a start line and an end line (with its duration) stamped
``YYYY-MM-DD HH:MM:SS JST``. Console lines are in the chosen language; the full debug log
kept in the bundle receives the same lines plus DEBUG records from every module.
"""

from __future__ import annotations

import logging
import logging.handlers
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator

from fxbundle.i18n import t

JST = timezone(timedelta(hours=9), "JST")
LOGGER_NAME = "fxbundle"


def jst_now() -> datetime:
    return datetime.now(JST)


def jst_stamp(moment: datetime | None = None) -> str:
    moment = (moment or jst_now()).astimezone(JST)
    return moment.strftime("%Y-%m-%d %H:%M:%S") + " JST"


class JSTFormatter(logging.Formatter):
    """``2026-12-04 21:03:05 JST INFO    message`` whatever the machine's time zone is."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = jst_stamp(datetime.fromtimestamp(record.created, JST))
        text = f"{stamp} {record.levelname:<7} {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def buffer_log() -> logging.handlers.MemoryHandler:
    """Collect DEBUG and above from every fxbundle module until :func:`flush_to_file` names the file.

    The build log lives inside the bundle, whose staging directory exists only after the
    first step; buffering keeps that step's lines in the log too.
    """
    handler = logging.handlers.MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1, target=None)
    handler.setLevel(logging.DEBUG)
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    return handler


def flush_to_file(buffer: logging.handlers.MemoryHandler, path: Path) -> logging.Handler:
    """Write the buffered records to ``path`` and send later records there; return the file handler."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(JSTFormatter())
    buffer.setTarget(handler)
    buffer.flush()
    detach(buffer)
    logging.getLogger(LOGGER_NAME).addHandler(handler)
    return handler


def detach(handler: logging.Handler) -> None:
    logging.getLogger(LOGGER_NAME).removeHandler(handler)
    handler.close()


class StepReporter:
    """Logs the start and end of each named step and notifies an optional progress callback."""

    def __init__(self, total: int, on_progress: Callable[[str, int, int], None] | None = None) -> None:
        self.total = total
        self.done = 0
        self.on_progress = on_progress
        self.durations: dict[str, float] = {}
        self.logger = logging.getLogger(f"{LOGGER_NAME}.steps")

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        label = t(f"step.{name}")
        number = self.done + 1
        self.logger.info(t("log.step_start", number=number, total=self.total, step=label))
        if self.on_progress:
            self.on_progress(label, self.done, self.total)
        started = time.perf_counter()
        try:
            yield
        except Exception:
            seconds = time.perf_counter() - started
            self.logger.error(t("log.step_failed", number=number, total=self.total, step=label, seconds=f"{seconds:.1f}"))
            raise
        seconds = time.perf_counter() - started
        self.durations[name] = round(seconds, 3)
        self.done += 1
        self.logger.info(t("log.step_end", number=number, total=self.total, step=label, seconds=f"{seconds:.1f}"))
        if self.on_progress:
            self.on_progress(label, self.done, self.total)

    def info(self, key: str, **params: object) -> None:
        self.logger.info(t(key, **params))

    def warning(self, key: str, **params: object) -> None:
        self.logger.warning(t(key, **params))
