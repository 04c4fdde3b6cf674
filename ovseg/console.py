"""Console output of the command lines: the library's log lines printed while a command runs,
written through tqdm so that a running progress bar stays intact."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import TextIO

from tqdm import tqdm


class TqdmHandler(logging.StreamHandler):
    """A log handler writing each line with ``tqdm.write`` (plainly when no bar runs)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


class _LineFormatter(logging.Formatter):
    """INFO lines as they are; warnings and errors prefixed "warning:" / "error:"."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        return message


@contextlib.contextmanager
def library_log_lines(
    level: int = logging.INFO, stream: TextIO | None = None, name: str = "ovseg"
) -> Iterator[logging.Handler]:
    """Print the ``ovseg`` loggers' lines of ``level`` and above, as plain messages, on
    ``stream`` (default: the current ``sys.stderr``) for the duration of the block.

    The logger's level and propagation are restored afterwards, so an application (or a test)
    that runs a command in-process keeps its own logging set-up. Propagation is off inside the
    block: a root handler of the application would print every line a second time.
    """
    package_logger = logging.getLogger(name)
    handler = TqdmHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_LineFormatter())
    handler.setLevel(level)
    saved = package_logger.level, package_logger.propagate
    package_logger.addHandler(handler)
    if package_logger.getEffectiveLevel() > level:
        package_logger.setLevel(level)
    package_logger.propagate = False
    try:
        yield handler
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(saved[0])
        package_logger.propagate = saved[1]
