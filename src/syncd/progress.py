"""Download progress (files and bytes): a redrawn line on a terminal, and a short status for systemd."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TextIO


def human(n: float) -> str:
    """Bytes as a short human string: ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def status_text(files_done: int, files: int, bytes_done: int, total: int) -> str:
    """``downloading 3/10 (1.2 of 8.0 GiB)``: the STATUS line during downloads."""
    gib = 1024**3
    return f"downloading {files_done}/{files} ({bytes_done / gib:.1f} of {total / gib:.1f} GiB)"


class Progress:
    """Counts files and bytes from many threads; redraws at most ten times a second on a TTY, and
    calls ``on_status(files_done, files, bytes_done, total_bytes)`` at most once a second."""

    def __init__(
        self,
        stream: TextIO | None,
        files: int,
        total_bytes: int,
        on_status: Callable[[int, int, int, int], None] | None = None,
        *,
        label: str = "syncing",
    ) -> None:
        self.stream = stream
        self.label = label
        self.on_status = on_status
        self._last_status = 0.0
        self.files = files
        self.total = total_bytes
        self.done_files = 0
        self.done_bytes = 0
        self._lock = threading.Lock()
        self._last = 0.0

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.done_bytes += n
            self._draw(force=False)

    def file_done(self) -> None:
        with self._lock:
            self.done_files += 1
            self._draw(force=True)

    def finish(self) -> None:
        if self.stream is not None and self.files:
            with self._lock:
                self._draw(force=True)
                self.stream.write("\n")
                self.stream.flush()

    def status_line(self) -> str:
        return status_text(self.done_files, self.files, self.done_bytes, self.total)

    def _draw(self, *, force: bool) -> None:
        now = time.monotonic()
        if self.on_status is not None and (force or now - self._last_status >= 1.0):
            self._last_status = now
            self.on_status(self.done_files, self.files, self.done_bytes, self.total)
        if self.stream is None:
            return
        if not force and now - self._last < 0.1:
            return
        self._last = now
        of = f" of {human(self.total)}" if self.total else ""
        self.stream.write(
            f"\r\x1b[K{self.label} {self.done_files}/{self.files} files · {human(self.done_bytes)}{of}"
        )
        self.stream.flush()
