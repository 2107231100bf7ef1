"""structlog set-up: one JSON object per line on stderr, or readable lines when stderr is a terminal.

Every event carries ``event``, ``level`` and ``timestamp`` (UTC, ISO 8601) plus its context (asset, dest,
commit, bytes, duration_s, error …). Tracebacks are rendered as plain text without local variables, so a
secret held in a local can never reach the log.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog


def _lead_with_essentials(_: Any, __: str, event_dict: Any) -> Any:
    """Put timestamp, level and event first so each JSON line reads left to right."""
    head = {k: event_dict.pop(k) for k in ("timestamp", "level", "event") if k in event_dict}
    return {**head, **event_dict}


def configure(
    stream: TextIO | None = None, *, level: int = logging.INFO, console: bool | None = None
) -> None:
    """Configure structlog for the process: JSON unless ``stream`` is a terminal."""
    out = stream or sys.stderr
    if console is None:
        console = out.isatty()
    renderer: Any
    if console:
        renderer = structlog.dev.ConsoleRenderer(
            exception_formatter=structlog.dev.plain_traceback, sort_keys=False
        )
    else:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not console:
        processors.append(structlog.processors.format_exc_info)
    processors += [_lead_with_essentials, renderer]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def get() -> Any:
    """The syncd logger."""
    return structlog.get_logger("syncd")
