"""structlog set-up: one JSON object per line, to journald, stderr, or readable lines on a terminal.

Every event carries ``timestamp`` (UTC, ISO 8601), ``level`` and ``event`` plus its context (dest, commit,
bytes, duration_s, error …). Tracebacks are rendered as plain text without local variables, so a secret held
in a local can never reach the log.

Under systemd, when ``$JOURNAL_STREAM`` names the device and inode of our stderr (systemd's documented test
for "stderr is the journal"), each event is sent with journald's native protocol instead: ``MESSAGE`` is the
same JSON line, ``PRIORITY`` follows the level (so ``journalctl -p err`` shows errors), and every scalar
field is also a journal field ``SYNCD_<KEY>`` (``journalctl -u syncd SYNCD_EVENT=asset_failed``). The
protocol is a datagram of ``KEY=value`` lines to ``/run/systemd/journal/socket``; about forty lines here
instead of a compiled dependency. If a datagram cannot be sent, the line goes to stderr as usual.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import struct
import sys
from typing import Any, TextIO

import structlog

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}
_FIELD = re.compile(r"[^A-Z0-9_]")


def _lead_with_essentials(_: Any, __: str, event_dict: Any) -> Any:
    """Put timestamp, level and event first so each JSON line reads left to right."""
    head = {k: event_dict.pop(k) for k in ("timestamp", "level", "event") if k in event_dict}
    return {**head, **event_dict}


def journal_is_stderr() -> bool:
    """Whether stderr is connected to journald (``$JOURNAL_STREAM`` matches fd 2)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def journal_fields(event_dict: dict[str, Any], line: str) -> dict[str, str]:
    """The journal fields for one event: MESSAGE, PRIORITY, SYSLOG_IDENTIFIER and SYNCD_*."""
    fields = {
        "MESSAGE": line,
        "PRIORITY": str(_PRIORITY.get(str(event_dict.get("level", "info")), 6)),
        "SYSLOG_IDENTIFIER": "syncd",
    }
    for key, value in event_dict.items():
        if isinstance(value, str | int | float | bool) and key not in ("timestamp",):
            name = "SYNCD_" + _FIELD.sub("_", key.upper())
            fields[name] = value if isinstance(value, str) else json.dumps(value)
    return fields


def encode_journal(fields: dict[str, str]) -> bytes:
    """journald's native datagram format; values with a newline use the length-prefixed form."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", errors="replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class _Tolerant:
    """A log stream whose write failures are dropped: a closed pipe or a full disk under stderr (the
    journal restarting, a `| logger` that died) must never stop a pass or the daemon."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except (OSError, ValueError):  # BrokenPipeError, ENOSPC; ValueError: the stream was closed
            return 0

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stream.flush()

    def isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (OSError, ValueError):
            return False


class JournalLogger:
    """A structlog logger that sends each event to journald, falling back to ``stream``."""

    def __init__(self, stream: TextIO, path: str = JOURNAL_SOCKET) -> None:
        self.stream = stream
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def msg(self, message: str = "", fields: dict[str, str] | None = None) -> None:
        try:
            self.sock.sendto(encode_journal(fields or {"MESSAGE": message}), self.path)
        except OSError:
            self.stream.write(message + "\n")
            self.stream.flush()

    debug = info = warning = warn = error = critical = exception = log = failure = fatal = msg


class _JournalRenderer:
    """Final processor: the JSON line plus the journal fields, as keyword arguments for JournalLogger."""

    def __init__(self) -> None:
        self._json = structlog.processors.JSONRenderer(sort_keys=False)

    def __call__(self, logger: Any, name: str, event_dict: Any) -> dict[str, Any]:
        line = str(self._json(logger, name, event_dict))
        return {"message": line, "fields": journal_fields(event_dict, line)}


class _ToStructlog(logging.Handler):
    """Route stdlib logging (APScheduler's warnings) into the same JSON events."""

    def emit(self, record: logging.LogRecord) -> None:
        get().log(record.levelno, "library_log", library=record.name, message=record.getMessage())


def configure(
    stream: TextIO | None = None,
    *,
    level: int = logging.INFO,
    console: bool | None = None,
    journal: bool | None = None,
) -> None:
    """Configure structlog for the process: journald if it is our stderr, else JSON unless a terminal."""
    out: Any = _Tolerant(stream or sys.stderr)
    if journal is None:
        journal = stream is None and journal_is_stderr()
    if console is None:
        console = not journal and out.isatty()
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    factory: Any = structlog.WriteLoggerFactory(out)  # one write per event (print makes two)
    if console:
        processors.append(
            structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback, sort_keys=False)
        )
    else:
        processors += [structlog.processors.format_exc_info, _lead_with_essentials]
        if journal:
            processors.append(_JournalRenderer())
            sink = JournalLogger(out)
            factory = lambda *args: sink  # noqa: E731 (one shared socket for the process)
        else:
            processors.append(structlog.processors.JSONRenderer(sort_keys=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    bridge = logging.getLogger("apscheduler")
    bridge.handlers[:] = [_ToStructlog()]
    bridge.setLevel(logging.WARNING)
    bridge.propagate = False


def get() -> Any:
    """The syncd logger."""
    return structlog.get_logger("syncd")
