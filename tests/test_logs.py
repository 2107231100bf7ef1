"""Log output: the journald native protocol, and JSON events that never carry secrets."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
from pathlib import Path

import pytest

from syncd import logs

pytestmark = pytest.mark.unit


def test_fields_for_an_event() -> None:
    """MESSAGE is the JSON line, PRIORITY follows the level, scalars become SYNCD_* fields."""
    event = {
        "timestamp": "t",
        "level": "error",
        "event": "asset_failed",
        "dest": "a/b.tar",
        "attempts": 2,
        "problems": ["x"],
    }
    fields = logs.journal_fields(event, '{"a": 1}')
    assert fields["MESSAGE"] == '{"a": 1}'
    assert fields["PRIORITY"] == "3"
    assert fields["SYSLOG_IDENTIFIER"] == "syncd"
    assert fields["SYNCD_EVENT"] == "asset_failed"
    assert fields["SYNCD_DEST"] == "a/b.tar"
    assert fields["SYNCD_ATTEMPTS"] == "2"
    assert "SYNCD_PROBLEMS" not in fields and "SYNCD_TIMESTAMP" not in fields


def test_native_encoding_of_multiline_values() -> None:
    """A value with a newline uses journald's length-prefixed binary form; others KEY=value."""
    data = logs.encode_journal({"A": "one", "B": "two\nlines"})
    assert data == b"A=one\nB\n" + struct.pack("<Q", 9) + b"two\nlines\n"


def test_journal_logger_sends_datagrams(tmp_path: Path) -> None:
    """JournalLogger sends one datagram per event to the journal socket."""
    path = str(tmp_path / "journal.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    out = io.StringIO()
    logs.JournalLogger(out, path).msg("line", {"MESSAGE": "line", "PRIORITY": "6"})
    assert server.recv(4096) == b"MESSAGE=line\nPRIORITY=6\n"
    assert out.getvalue() == ""


def test_journal_logger_falls_back_to_stream(tmp_path: Path) -> None:
    """Without a journal socket the JSON line still reaches stderr."""
    out = io.StringIO()
    logs.JournalLogger(out, str(tmp_path / "missing.sock")).msg("the line", {"MESSAGE": "the line"})
    assert out.getvalue() == "the line\n"


def test_journal_stream_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    """$JOURNAL_STREAM counts only when it names the device and inode of fd 2."""
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert logs.journal_is_stderr()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    assert not logs.journal_is_stderr()
    monkeypatch.setenv("JOURNAL_STREAM", "garbage")
    assert not logs.journal_is_stderr()


def test_json_lines_lead_with_timestamp_level_event() -> None:
    """Each JSON line starts with timestamp, level and event, then the context."""
    out = io.StringIO()
    logs.configure(out, console=False, journal=False)
    logs.get().warning("asset_orphaned", dest="x")
    line = json.loads(out.getvalue())
    assert list(line)[:4] == ["timestamp", "level", "event", "dest"]
    assert line["level"] == "warning" and line["dest"] == "x"
