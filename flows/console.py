"""Prefect's console logs for a person at a terminal.

A failed task or flow run is logged with Python's traceback through Prefect's code, twice: about
a hundred lines before the ``tasc`` command's own error line, which already names the file, line,
field and what to do. :func:`hide_tracebacks` keeps those log records to their one line on the
console. Only the console changes: the records Prefect sends to its API (a run's logs in the UI)
keep their tracebacks, and ``TASC_TRACEBACK=1`` leaves the console as Prefect has it."""

from __future__ import annotations

import logging

from prefect.logging.configuration import ensure_logging_setup
from prefect.logging.handlers import PrefectConsoleHandler


class _WithoutTraceback(logging.Formatter):
    """Another formatter's output without the record's traceback and stack."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None  # the record is shared with other handlers
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def hide_tracebacks() -> None:
    """Prefect's console handlers print log records without their tracebacks (idempotent)."""
    ensure_logging_setup()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _WithoutTraceback):
            handler.setFormatter(_WithoutTraceback(handler.formatter or logging.Formatter()))
