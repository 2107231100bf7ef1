"""The audit log: a tamper-evident, append-only record of what syncd did, in ``<state>/audit.jsonl``.

One JSON object per line (UTF-8, ``\\n``-terminated), keys in a fixed order: ``seq`` (1, 2, 3 … with no
gaps), ``time`` (UTC, ISO 8601 to the second), ``event``, the caller's fields in the order given, and
``prev`` last: the sha256 (hex) of the previous line's exact bytes without its newline, 64 zeros
(:data:`GENESIS`) for the first. Editing, removing, moving or inserting a record breaks the chain at the
first record after the change; removing records from the end is caught only against an anchor (the last
seq and line hash, which syncd keeps in its ledger). :func:`verify` hashes the lines as stored, never a
re-serialization. A line cut off by a power cut or a full disk (no newline at its end) is dropped at the
next append, and a chained ``audit_log_repaired`` record keeps its length and sha256.

:class:`AuditLog` writes (one writer: the caller holds the state-directory lock); :func:`read`,
:func:`select`, :func:`verify` and :func:`render` serve ``syncd audit``. Failures are :class:`AuditError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from syncd import events as ev
from syncd import logs
from syncd.errors import SyncdError
from syncd.progress import human

_log = logs.get()

FILE_NAME = "audit.jsonl"
GENESIS = "0" * 64
BROKEN = "audit_log_broken"  # the writer found the log shorter than its anchor: kept as evidence
MAX_LINE = 1024 * 1024  # a record is a few hundred bytes; a longer line is not one of ours
BLOCK = 64 * 1024  # the tail is read backwards in blocks of this size
RESERVED = ("seq", "time", "event", "prev")

_OPEN = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a FIFO there must not hang us


class AuditError(SyncdError):
    """The audit log could not be opened, read or appended to, or is not a file syncd may write."""


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _open_error(path: Path, doing: str, exc: OSError) -> AuditError:
    if os.path.islink(path):
        return AuditError(f"audit log {path} is a symlink; syncd does not follow it: remove it")
    return AuditError(f"cannot {doing} audit log {path}: {_why(exc)}")


def _check_regular(fd: int, path: Path) -> None:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AuditError(f"audit log {path} is not a regular file: remove it")


def _sha(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _encode(record: Mapping[str, object]) -> bytes:
    """One line without its newline. A lone surrogate (undecodable bytes in a name) has no UTF-8 form:
    such a record is written with ASCII escapes, which read back to the same strings."""
    try:
        text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(record, separators=(",", ":"), allow_nan=False).encode("ascii")


class AuditLog:
    """One writer at a time (the caller holds syncd's state-directory lock).

    The file is opened at the first :meth:`append` (or :attr:`head`) with ``O_RDWR | O_APPEND``: the tail
    is read through the same descriptor that is written, so what was read is what is appended to."""

    def __init__(self, path: Path, expected: tuple[int, str] | None = None) -> None:
        """``expected``: where the log must reach (syncd's ledger keeps the anchor): checked at the first
        :meth:`check` or :meth:`append`, as a log disturbed while open is checked at every one."""
        self.path = path
        self._expected = expected if expected is not None and expected[0] > 0 else None
        self._fd: int | None = None
        self._size = 0  # where the last complete line ends, as far as this writer knows
        self._head: tuple[int, str] = (0, GENESIS)
        self._torn: tuple[int, str] | None = None  # (bytes, sha256) after the last newline, to drop
        self._dir_unsynced = False  # created the file; its directory entry is not yet on disk

    @property
    def head(self) -> tuple[int, str]:
        """(last seq, sha256 of the last complete line); ``(0, GENESIS)`` for an empty or missing log.
        Reads the file's tail if nothing was appended yet (never creates it). Raises :class:`AuditError`."""
        if self._fd is None:
            self._open(create=False)
        return self._head

    def append(self, event: str, fields: Mapping[str, object]) -> dict[str, object]:
        """Append one record (``seq``, ``time``, ``event``, ``fields`` in order, ``prev``) with one write.

        Out: the record written. Raises :class:`AuditError` if the log cannot be opened or written (the
        file is then as it was: keep the record and append it later), or if the record would be longer
        than :data:`MAX_LINE`; :class:`ValueError` if ``fields`` uses a reserved key."""
        for key in RESERVED:
            if key in fields:
                raise ValueError(f"audit field {key!r} is set by the audit log, not by its caller")
        self.check()
        return self._write(event, fields)

    def check(self) -> bool:
        """Make sure the log is where this writer left it (or, at first, where ``expected`` says it
        ends) before anything is appended: records cut off or rewritten, the file deleted, replaced or
        appended to by someone else get an ``audit_log_broken`` record (:meth:`_broken`); a torn last line
        is dropped with an ``audit_log_repaired`` one. Returns whether it wrote such a record."""
        opened = self._fd is None
        if opened:
            self._open(create=True)
        assert self._fd is not None
        before = self._head
        if opened and self._expected is not None:
            if self._head[0] <= self._expected[0]:  # (more records: the ledger lost its last anchor)
                before = self._expected
            self._expected = None
        try:
            st = os.fstat(self._fd)
            try:
                at_path = os.stat(self.path, follow_symlinks=False)
            except FileNotFoundError:
                at_path = None
        except OSError as exc:
            raise AuditError(f"cannot inspect audit log {self.path}: {_why(exc)}") from None
        if at_path is None or (at_path.st_dev, at_path.st_ino) != (st.st_dev, st.st_ino):
            self.close()  # deleted or replaced while open: continue the file that is at the path
            self._open(create=True)
        elif st.st_size != self._size + (self._torn[0] if self._torn else 0):
            self._load_tail(st.st_size)  # a failed rollback, or someone else wrote: the file is the truth
        found, wrote = self._head, self._torn is not None
        if self._torn is not None:
            self._repair()
        if before[0] > 0 and found != before:
            self._broken(before, found)
            wrote = True
        return wrote

    def _broken(self, expected: tuple[int, str], found: tuple[int, str]) -> None:
        """The log is not where this writer left it (records cut off or rewritten, the file deleted or
        replaced while open): say so in the chain (:data:`BROKEN`) before going on, and in the log."""
        fields = {"expected_seq": expected[0], "expected_sha256": expected[1], "found_seq": found[0],
                  "found_sha256": found[1]}  # fmt: skip
        _log.error(
            "audit_log_tampered",
            file=str(self.path),
            error=f"the audit log ends at record {found[0]} but syncd had written {expected[0]}: records "
            "were removed or rewritten",
            action="an audit_log_broken record was appended; syncd audit --verify reports it",
            **fields,
        )
        self._write(BROKEN, fields)

    def flush(self) -> None:
        """Make what was appended durable: fsync the file, and its directory once after creating it."""
        if self._fd is None:
            return
        try:
            os.fsync(self._fd)
            if self._dir_unsynced:
                dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
                self._dir_unsynced = False
        except OSError as exc:
            raise AuditError(f"cannot flush audit log {self.path} to disk: {_why(exc)}") from None

    def close(self) -> None:
        """Close the file (without fsync: call :meth:`flush` first). Appending again reopens it."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self, *, create: bool) -> None:
        flags = os.O_RDWR | os.O_APPEND | _OPEN
        try:
            try:
                fd = os.open(self.path, flags)
            except FileNotFoundError:
                if not create:
                    return
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                self._dir_unsynced = True
        except OSError as exc:
            raise _open_error(self.path, "open", exc) from None
        _check_regular(fd, self.path)
        self._fd = fd
        try:
            self._load_tail(os.fstat(fd).st_size)
        except BaseException:
            self.close()
            raise

    def _load_tail(self, size: int) -> None:
        """Learn the head from the last complete line, reading only the end of the file."""
        assert self._fd is not None
        try:
            end = _rfind_newline(self._fd, size)  # the last line's newline
            if end < 0:
                start, line = 0, b""
            else:
                start = _rfind_newline(self._fd, end) + 1
                line = _pread_all(self._fd, end - start, start)
            torn = _hash_range(self._fd, end + 1, size) if end + 1 < size else None
        except OSError as exc:
            raise AuditError(f"cannot read audit log {self.path}: {_why(exc)}") from None
        if end < 0:
            self._head = (0, GENESIS)
        else:
            record = _parse(line)
            seq = record.get("seq")
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
                raise AuditError(
                    f"the last line of audit log {self.path} (line ending at byte {end}) is not an audit "
                    "record, so syncd cannot continue its chain: check it with `syncd audit --verify`, "
                    "then move the file aside"
                )
            self._head = (seq, _sha(line))
        self._size = end + 1
        self._torn = torn

    def _repair(self) -> None:
        """Drop a line cut off mid-write, keeping its length and sha256 in a chained record."""
        assert self._fd is not None and self._torn is not None
        dropped, digest = self._torn
        try:
            os.ftruncate(self._fd, self._size)
        except OSError as exc:
            raise AuditError(f"cannot repair audit log {self.path}: {_why(exc)}") from None
        self._write("audit_log_repaired", {"dropped_bytes": dropped, "dropped_sha256": digest})
        self._torn = None

    def _write(self, event: str, fields: Mapping[str, object]) -> dict[str, object]:
        assert self._fd is not None
        seq, prev = self._head
        now = datetime.now(UTC).replace(microsecond=0).isoformat()
        record: dict[str, object] = {"seq": seq + 1, "time": now, "event": event, **fields, "prev": prev}
        line = _encode(record)
        if len(line) > MAX_LINE:
            raise AuditError(
                f"audit record {event!r} for {self.path} is {len(line):,} bytes, more than the "
                f"{MAX_LINE:,} a line may hold: its fields are too long"
            )
        data = line + b"\n"
        try:
            written = os.write(self._fd, data)
        except OSError as exc:
            self._rollback()
            raise AuditError(
                f"cannot append to audit log {self.path}: {_why(exc)}; the record was not written"
            ) from None
        if written != len(data):
            self._rollback()
            raise AuditError(
                f"cannot append to audit log {self.path}: only {written} of {len(data)} bytes were "
                "written (is the disk full?); the record was not written"
            )
        self._size += len(data)
        self._head = (seq + 1, _sha(line))
        return record

    def _rollback(self) -> None:
        """Cut a partial write off again; if that fails too, the next append finds and repairs it."""
        assert self._fd is not None
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._size)


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    chunks: list[bytes] = []
    while n > 0:
        chunk = os.pread(fd, min(n, BLOCK), offset)
        if not chunk:
            raise OSError(0, "the file shrank while it was read")
        chunks.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _rfind_newline(fd: int, end: int) -> int:
    """The offset of the last ``\\n`` before ``end``, or -1: reads backwards, one block at a time."""
    while end > 0:
        start = max(0, end - BLOCK)
        block = _pread_all(fd, end - start, start)
        at = block.rfind(b"\n")
        if at >= 0:
            return start + at
        end = start
    return -1


def _hash_range(fd: int, start: int, end: int) -> tuple[int, str]:
    digest = hashlib.sha256()
    for offset in range(start, end, BLOCK):
        digest.update(_pread_all(fd, min(BLOCK, end - offset), offset))
    return end - start, digest.hexdigest()


def _parse(line: bytes) -> dict[str, object]:
    """The JSON object on ``line``, or ``{}`` if it is not one."""
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):  # bad JSON or UTF-8; absurdly deep nesting
        return {}
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class Entry:
    """One line of the log: its 1-based line number, and its record (``{}`` if not a JSON object)."""

    line: int
    record: dict[str, object]


def _lines(path: Path) -> Iterator[tuple[int, bytes | None, bool]]:
    """(line number, bytes without the newline or ``None`` if over :data:`MAX_LINE`, ended by a
    newline) for each line, streamed. Missing file: nothing. Raises :class:`AuditError`."""
    try:
        fd = os.open(path, os.O_RDONLY | _OPEN)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _open_error(path, "open", exc) from None
    _check_regular(fd, path)
    with os.fdopen(fd, "rb") as fh:
        number = 0
        while True:
            try:
                raw = fh.readline(MAX_LINE + 1)
                if not raw:
                    return
                number += 1
                if raw.endswith(b"\n"):
                    yield number, raw[:-1], True
                elif len(raw) <= MAX_LINE:
                    yield number, raw, False  # cut off: the file ends here
                else:
                    complete = _skip_line(fh)
                    yield number, None, complete
            except OSError as exc:
                raise AuditError(f"cannot read audit log {path}: {_why(exc)}") from None


def _skip_line(fh: BinaryIO) -> bool:
    while chunk := fh.readline(BLOCK):
        if chunk.endswith(b"\n"):
            return True
    return False


def read(path: Path) -> Iterator[Entry]:
    """Every line of the log at ``path`` in order, streamed; a line that is not a JSON object (or is
    longer than :data:`MAX_LINE`) has record ``{}``: :func:`verify` judges it. A missing file yields
    nothing; a symlink is never followed. Raises :class:`AuditError` (while iterating)."""
    for number, raw, _complete in _lines(path):
        yield Entry(number, _parse(raw) if raw is not None else {})


def _time(record: Mapping[str, object]) -> datetime | None:
    value = record.get("time")
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def select(
    entries: Iterable[Entry], *, since: datetime | None = None, dest_prefix: str | None = None
) -> Iterator[Entry]:
    """The entries with ``time >= since`` (an aware datetime; records without a readable time are left
    out) and whose ``dest`` is ``dest_prefix`` or lies under it (``a/b`` matches ``a/b`` and ``a/b/c``,
    not ``a/bc``; ``a/b/`` matches only what is under ``a/b``). Raises :class:`ValueError` for a naive
    ``since``."""
    if since is not None and since.tzinfo is None:
        raise ValueError("since must be an aware datetime (with a time zone)")
    for entry in entries:
        if since is not None:
            at = _time(entry.record)
            if at is None or at < since:
                continue
        if dest_prefix is not None and not _under(entry.record.get("dest"), dest_prefix):
            continue
        yield entry


def _under(dest: object, prefix: str) -> bool:
    if not isinstance(dest, str):
        return False
    if prefix.endswith("/"):
        return dest.startswith(prefix) or prefix.strip("/") == ""
    return dest == prefix or dest.startswith(prefix + "/")


@dataclass(frozen=True)
class Verification:
    """What :func:`verify` found. ``records``: the records checked good; ``head``: (seq, line sha256) of
    the last of them. When not ``ok``, ``broken_seq`` is the first record that is not as syncd wrote it
    (the seq that line should carry) and ``broken_line`` its line (``None`` if it is missing from the
    end); ``why`` says what failed. ``ok`` with a ``why`` notes a last line cut off mid-write."""

    ok: bool
    records: int
    head: tuple[int, str]
    broken_line: int | None = None
    broken_seq: int | None = None
    why: str = ""


def _problem(record: dict[str, object], line: int, seq: int, prev: str) -> str:
    """What is wrong with ``record`` on ``line`` if it should be record ``seq`` following ``prev``."""
    if not record:
        return f"line {line} is not a JSON object"
    for key in RESERVED:
        if key not in record:
            return f"line {line} has no {key!r}: it is not an audit record"
    got = record["seq"]
    if not isinstance(got, int) or isinstance(got, bool):
        return f"line {line} has a seq that is not a number"
    if not isinstance(record["event"], str) or not isinstance(record["prev"], str):
        return f"record {got} (line {line}) has an event or prev that is not a string"
    if _time(record) is None:
        return f"record {got} (line {line}) has no readable time with a time zone"
    if got > seq:
        removed = f"record {seq} was" if got == seq + 1 else f"records {seq} to {got - 1} were"
        if seq == 1:
            return f"the log starts at record {got} (line {line}): {removed} removed"
        return f"seq jumps from {seq - 1} to {got} (line {line}): {removed} removed or moved"
    if got < seq:
        return (
            f"line {line} holds record {got} after record {seq - 1}: a record was duplicated, "
            "moved or inserted"
        )
    if record["prev"] != prev:
        if seq == 1:
            return f"record 1 (line {line}): prev is not 64 zeros, as the first record's must be"
        return (
            f"record {seq} (line {line}): prev does not match the sha256 of record {seq - 1}: "
            "a record before it was edited or removed"
        )
    return ""


def verify(path: Path, anchor: tuple[int, str] | None = None) -> Verification:
    """Check the whole chain at ``path`` line by line and name the first broken record.

    ``anchor`` is the (seq, line sha256) the writer recorded elsewhere (syncd's ledger): the log must hold
    that record with that hash; records after it are fine. Raises :class:`AuditError` only when the file
    cannot be read (or is a symlink); damage is reported, never raised."""
    want_seq, want_hash = anchor if anchor is not None else (0, GENESIS)
    head: tuple[int, str] = (0, GENESIS)
    broken: Verification | None = None
    seen = False
    for number, raw, complete in _lines(path):
        seen = True
        seq = head[0] + 1
        if raw is None:
            why = f"line {number} is longer than {MAX_LINE:,} bytes: it is not an audit record"
            return Verification(False, head[0], head, number, seq, why)
        if not complete:
            note = (
                f"line {number} is cut off ({len(raw)} bytes without a newline): a write was interrupted; "
                "syncd drops it, and records that it did, at its next append"
            )
            if broken is not None:
                return replace(broken, records=head[0], head=head, why=f"{broken.why}; and {note}")
            return _tail(head, want_seq, note)
        problem = _problem(_parse(raw), number, seq, head[1])
        if not problem and seq == want_seq and _sha(raw) != want_hash:
            problem = (
                f"record {seq} (line {number}) is not the one syncd wrote (its sha256 differs from the "
                "one in the ledger): it, or the log up to it, was rewritten"
            )
        if not problem and _parse(raw).get("event") == BROKEN and broken is None:
            found = _parse(raw)
            why = (
                f"record {seq} (line {number}): syncd found this log cut short or rewritten when it "
                f"appended again (it ended at record {found.get('found_seq')}, but syncd had written "
                f"{found.get('expected_seq')}): records were removed or rewritten before this point"
            )
            broken = Verification(False, seq, (seq, _sha(raw)), number, seq, why)
        if problem:
            if broken is not None:  # the first break is the one syncd recorded; this one came later
                return replace(broken, why=f"{broken.why}; and later, {problem}")
            return Verification(False, head[0], head, number, seq, problem)
        head = (seq, _sha(raw))
    if not seen and want_seq > 0:
        why = f"the audit log {path} is missing, but syncd had written {want_seq} records (ledger)"
        return Verification(False, 0, head, None, 1, why)
    end = _tail(head, want_seq, "")
    if broken is not None:
        return replace(
            broken, records=head[0], head=head, why=broken.why + (f"; and {end.why}" if end.why else "")
        )
    return end


def _tail(head: tuple[int, str], want_seq: int, note: str) -> Verification:
    """The verdict once every complete line checked good: the anchor must not lie beyond the end."""
    if head[0] < want_seq:
        gone = want_seq - head[0]
        last = "the last record was" if gone == 1 else f"the last {gone} records were"
        why = f"the log ends at record {head[0]}, but syncd had written {want_seq} (ledger): {last} removed"
        return Verification(False, head[0], head, None, head[0] + 1, f"{why}; {note}" if note else why)
    return Verification(True, head[0], head, why=note)


_LABELS = {"sha256": "sha256", "size": "", "commit": "commit", "author": "author", "merger": "merger"}
_LABELS |= {"signer": "signer", "source": "source"}
_SHORT = {"sha256": 12, "commit": 8}


def _shown(value: object) -> str:
    """``value`` as text with every non-printable character (and the backslash) escaped, repr-style:
    a hostile name cannot move the cursor, colour the terminal or start a new line."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    text = "".join(c if c.isprintable() and c != "\\" else repr(c)[1:-1] for c in text)
    if " " in text or '"' in text:  # quoted: a value with spaces cannot pose as another field
        text = '"' + text.replace('"', '\\"') + '"'
    return text


def render(record: Mapping[str, object]) -> str:
    """One readable line for ``syncd audit``: time, event, dest, then the other fields that are present
    and not empty (``sha256 ab12cd34ef56…  1.0 MiB  commit 4f2a9c1d  author …``)."""
    at = _time(record)
    parts = [at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if at else _shown(record.get("time", "?"))]
    parts.append(_shown(record.get("event", "?")))
    if record.get("dest") not in (None, ""):
        parts.append(_shown(record["dest"]))
    rest = [k for k in _LABELS if k in record] + [
        k for k in record if k not in _LABELS and k not in (*RESERVED, "dest")
    ]
    for key in rest:
        value = record[key]
        if value is None or value == "" or value == [] or value == {}:
            continue
        if key == "size" and isinstance(value, int) and not isinstance(value, bool):
            parts.append(human(value))
            continue
        text = _shown(value)
        if key in _SHORT and isinstance(value, str) and len(value) > _SHORT[key]:
            text = text[: _SHORT[key]] + ("…" if key == "sha256" else "")
        parts.append(f"{_LABELS.get(key, _shown(key))} {text}".lstrip())
    return "  ".join(parts)


# the event path ---------------------------------------------------------------------------------------
def record_for(event: ev.Event) -> tuple[str, dict[str, object]] | None:
    """The audit record an event makes, as (event, fields), or None: every change syncd makes to the
    export and every trust decision, once (a refusal only at its first pass)."""
    if isinstance(event, ev.AssetPublished):
        fields: dict[str, object] = {
            "dest": event.dest, "sha256": event.sha256, "size": event.bytes, "source": event.source,
            "manifest": event.manifest, "commit": event.commit, **ev.provenance_fields(event.provenance),
        }  # fmt: skip
        return ("replaced" if event.replaced else "published"), fields
    if isinstance(event, ev.AssetAdopted):
        return "adopted", {
            "dest": event.dest, "sha256": event.sha256, "size": event.bytes, "source": event.source,
            "manifest": event.manifest, "commit": event.commit, **ev.provenance_fields(event.provenance),
        }  # fmt: skip
    if isinstance(event, ev.AssetRefused) and event.passes <= 1:
        return "refused", {
            "dest": event.dest, "sha256": event.sha256, "source": event.source, "manifest": event.manifest,
            "commit": event.commit, "cause": event.cause, "reason": event.error,
        }  # fmt: skip
    if isinstance(event, ev.AssetRechecked) and event.mode_restored:
        return "mode_restored", {"dest": event.dest, "sha256": event.sha256, "size": event.bytes,
                                 "commit": event.commit}  # fmt: skip
    if isinstance(event, ev.AssetQuarantined):
        return "quarantined", {
            "dest": event.dest, "expected_sha256": event.sha256, "expected_size": event.size,
            "moved_to": event.moved_to,
            "finding": event.finding,
        }  # fmt: skip
    if isinstance(event, ev.AssetRepaired):
        return ("repaired" if event.how == "downloaded" else "mode_restored"), {
            "dest": event.dest, "sha256": event.sha256, "size": event.bytes, "source": event.source,
            "commit": event.commit, **ev.provenance_fields(event.provenance),
        }  # fmt: skip
    if isinstance(event, ev.SignatureRefused):
        return "signature_refused", {
            "commit": event.commit, "author": event.author, "status": event.status, "reason": event.error,
            "serving_commit": event.serving_commit, "key": event.key,
        }  # fmt: skip
    if isinstance(event, ev.GitRewritten):
        return ("rewrite_followed" if event.followed else "rewrite_refused"), {
            "commit": event.commit, "previous": event.previous, "branch": event.branch,
            "serving_commit": event.serving_commit,
        }  # fmt: skip
    if isinstance(event, ev.AssetPruned):
        return "pruned", {
            "dest": event.dest, "sha256": event.sha256, "size": event.bytes, "source": event.source,
            "manifest": event.manifest, "commit": event.published_commit,
            "orphaned_since": event.orphaned_since, "already_gone": event.gone,
        }  # fmt: skip
    if isinstance(event, ev.PruneRefused):
        return "prune_refused", {"valve": event.valve, "would_remove": event.would_remove,
                                 "reason": event.error, "commit": event.commit}  # fmt: skip
    return None


class AuditObserver:
    """The audit log on the event path: each record is appended as its event arrives and fsynced when
    the pass ends, before the observers after it (the log, STATUS, mail) hear that it ended; it is
    added first on the bus. Each record also goes to the journal as ``audit_record`` with
    ``SYNCD_AUDIT=1``. A record that cannot be written (a full disk) is kept in memory and written at the
    next event; ``audit_failed`` says so once per error, and :attr:`healthy` is False until it is.
    ``anchor((seq, sha256))`` is called after each flush (the ledger keeps it, so that removed records at
    the end of the log are caught). Repeated trust refusals of one commit are recorded once per process."""

    def __init__(
        self,
        path: Path,
        anchor: Callable[[tuple[int, str]], None] | None = None,
        expected: tuple[int, str] | None = None,
    ) -> None:
        self.log = AuditLog(path, expected)  # expected: the anchor the ledger holds
        self.anchor = anchor
        self._checked = False
        self.pending: list[tuple[str, dict[str, object]]] = []
        self.error = ""
        self._dirty = False  # appended since the last flush
        self._decided: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def __call__(self, event: ev.Event) -> None:
        found = record_for(event)
        with self._lock:
            if found is not None and not self._repeated(found):
                self.pending.append(found)
                self._write()
            if isinstance(event, ev.PassFinished | ev.PassFailed):
                self._flush()

    def _repeated(self, found: tuple[str, dict[str, object]]) -> bool:
        name, fields = found
        if name not in ("signature_refused", "rewrite_refused"):
            return False
        key = (name, str(fields.get("commit")))
        if key in self._decided:
            return True
        self._decided.add(key)
        return False

    def _write(self) -> None:
        if not self._checked:  # at the first event, even with nothing to append (an idle pass)
            try:
                self._dirty = self.log.check() or self._dirty
            except AuditError as exc:
                self._failed(str(exc))
                return
            self._checked = True
        while self.pending:
            name, fields = self.pending[0]
            try:
                record = self.log.append(name, {k: v for k, v in fields.items() if v not in (None, "")})
            except AuditError as exc:
                self._failed(str(exc))
                return
            self.pending.pop(0)
            self._dirty = True
            line = _encode(record).decode("utf-8", "surrogateescape")
            _log.info("audit_record", audit=1, seq=record["seq"], audit_event=name, dest=fields.get("dest"),
                      commit=fields.get("commit"), record=line)  # fmt: skip

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        self._write()
        if not self._dirty and not self.error:
            return  # nothing appended since the last flush: no fsync, no ledger write (an idle pass)
        try:
            self.log.flush()
        except AuditError as exc:
            self._failed(str(exc))
            return
        self._dirty = False
        if not self.pending:
            if self.error:
                _log.info("audit_recovered", file=str(self.log.path))
            self.error = ""
            if self.anchor is not None:
                with contextlib.suppress(Exception):
                    self.anchor(self.log.head)

    def _failed(self, error: str) -> None:
        if error != self.error:
            _log.error("audit_failed", file=str(self.log.path), error=error, pending=len(self.pending),
                       action="kept in memory; written at the next event")  # fmt: skip
        self.error = error

    @property
    def healthy(self) -> bool:
        return not self.pending and not self.error

    def close(self) -> None:
        with self._lock:
            self._flush()
            self.log.close()
