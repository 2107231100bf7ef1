"""``syncd verify``: every published file on the export checked against the ledger, byte for byte.

For each file the ledger says syncd published (or adopted), the export is looked at without following any
symlink (:class:`~syncd.publish.Export`, opened as a dry run: no lock, nothing created) and the file is
hashed again, at most ``--max-rate`` MB/s (:class:`~syncd.throttle.Throttle`) so that a check never starves
the GPU servers' reads. A finding is one of :data:`KINDS`. It reads only: safe beside a running daemon.
The repair (``--repair``) is the engine's: :meth:`syncd.reconcile.Reconciler.repair`.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TextIO

from syncd.errors import PublishError
from syncd.ledger import Published
from syncd.progress import human
from syncd.publish import Export, State
from syncd.throttle import Throttle

# What can be wrong with a published file, in the order a report lists them.
KINDS = (
    "missing",  # nothing at dest
    "symlink",  # a symlink replaced the file
    "not_a_file",  # a directory, FIFO or device replaced the file
    "blocked",  # a parent directory was replaced by a symlink or a file
    "unreadable",  # the dest cannot be inspected or read (EACCES, EIO, ESTALE)
    "size",  # a file of another size
    "sha256",  # a file of the right size with other bytes (changed in place)
    "mode",  # the bytes are right, but the mode is no longer 0444
)
REPAIRABLE = frozenset({"missing", "symlink", "not_a_file", "size", "sha256", "mode"})


@dataclass(frozen=True)
class Finding:
    dest: str
    kind: str  # one of KINDS
    detail: str
    sha256: str  # what the ledger says the file is
    size: int

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Report:
    files: int = 0  # published files checked
    bytes: int = 0  # bytes hashed
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False


def selected(published: Mapping[str, Published], prefixes: Sequence[str]) -> list[Published]:
    """The ledger's files under any of ``prefixes`` (a dest, or a directory: ``a/b`` matches ``a/b`` and
    ``a/b/…``, never ``a/bc``), in dest order; all of them without prefixes."""
    wanted = [p.strip("/") for p in prefixes]
    return [
        p
        for d, p in sorted(published.items())
        if not wanted or any(w == "" or d == w or d.startswith(w + "/") for w in wanted)
    ]


def check(export: Export, row: Published, on_bytes: Callable[[int], None] | None = None) -> list[Finding]:
    """What is wrong with the file at ``row.dest`` (empty: it is the published file, mode 0444)."""
    seen = export.observe(row.dest)

    def finding(kind: str, detail: str) -> list[Finding]:
        return [Finding(row.dest, kind, detail, row.sha256, row.size)]

    if seen.state is State.MISSING:
        if row.orphaned_at is not None:
            return []  # no manifest lists it any more: removing it by hand is allowed
        return finding("missing", "nothing is at dest")
    if seen.state is State.SYMLINK:
        return finding("symlink", "a symlink is at dest instead of the published file")
    if seen.state is State.OTHER:
        return finding("not_a_file", "something other than a regular file is at dest")
    if seen.state is State.BLOCKED:
        return finding("blocked", seen.detail)
    if seen.state is State.UNREADABLE:
        return finding("unreadable", seen.detail)
    if seen.size != row.size:
        return finding("size", f"{seen.size} bytes at dest, {row.size} published")
    out = []
    if seen.mode != 0o444:
        out += finding("mode", f"mode {seen.mode:04o}, published 0444")
    try:
        actual, size = export.hash_file(row.dest, on_bytes)
    except PublishError as exc:
        return finding("unreadable", str(exc))
    if actual != row.sha256 or size != row.size:
        out = finding("sha256", f"sha256 {actual} ({size} bytes), published {row.sha256}") + out
    return out


class _Stop(Exception):
    pass


def scan(
    export: Export,
    rows: Iterable[Published],
    *,
    max_rate: float | None = None,
    stream: TextIO | None = None,
    stop: threading.Event | None = None,
    bytes_read: list[int] | None = None,
) -> Iterator[tuple[Published, list[Finding]]]:
    """Check every row in turn; ``max_rate`` in MB/s; progress redrawn on ``stream`` (a terminal);
    ``bytes_read[0]`` counts the bytes hashed."""
    rows = list(rows)
    report_bytes = bytes_read if bytes_read is not None else [0]
    stop = stop or threading.Event()
    throttle = Throttle(max_rate * 1e6 if max_rate else None, stop)
    meter = _Meter(stream, len(rows), sum(r.size for r in rows))

    def on_bytes(n: int) -> None:
        meter.add(n)
        report_bytes[0] += n
        if not throttle.take(n):
            raise _Stop

    try:
        for row in rows:
            try:
                found = check(export, row, on_bytes)
            except _Stop:
                return
            meter.file_done()
            yield row, found
    finally:
        meter.finish()


class _Meter:
    """``verify 120/3,000 files · 12.1 of 500.0 GiB · 410 MB/s · ETA 20 min`` on a terminal."""

    def __init__(self, stream: TextIO | None, files: int, total: int) -> None:
        self.stream = stream if stream is not None and stream.isatty() else None
        self.files, self.total = files, total
        self.done = self.bytes = 0
        self.started = self.drawn = time.monotonic()

    def add(self, n: int) -> None:
        self.bytes += n
        if self.stream is not None and time.monotonic() - self.drawn >= 0.2:
            self._draw()

    def file_done(self) -> None:
        self.done += 1
        if self.stream is not None:
            self._draw()

    def _draw(self) -> None:
        assert self.stream is not None
        self.drawn = now = time.monotonic()
        rate = self.bytes / max(now - self.started, 1e-6)
        eta = (self.total - self.bytes) / rate if rate > 0 else 0.0
        line = (
            f"verify {self.done:,}/{self.files:,} files · {human(self.bytes)} of {human(self.total)} · "
            f"{rate / 1e6:.0f} MB/s · ETA {_eta(eta)}"
        )
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()

    def finish(self) -> None:
        if self.stream is not None:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _eta(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run(
    export: Export,
    published: Mapping[str, Published],
    prefixes: Sequence[str],
    *,
    max_rate: float | None,
    on_finding: Callable[[Finding], None],
    stream: TextIO | None = sys.stderr,
) -> Report:
    """Check the selected files, calling ``on_finding`` for each finding as it comes; raises
    :class:`SyncdError` only when the export cannot be checked at all."""
    report = Report()
    started = time.monotonic()
    rows = selected(published, prefixes)
    hashed = [0]
    try:
        for _, found in scan(export, rows, max_rate=max_rate, stream=stream, bytes_read=hashed):
            report.files += 1
            report.bytes = hashed[0]
            for f in found:
                report.findings.append(f)
                on_finding(f)
    except KeyboardInterrupt:
        report.interrupted = True
    report.seconds = time.monotonic() - started
    return report
