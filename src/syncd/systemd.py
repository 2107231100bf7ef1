"""Talk to systemd (``sd_notify``): readiness, status line, watchdog, reload and stop; and the observer
that keeps the STATUS line (``systemctl status syncd``) true to the last pass.

Uses the ``sdnotify`` package for the socket (``$NOTIFY_SOCKET``, abstract sockets included). Messages are
sent as UTF-8 (``sdnotify.notify`` encodes Latin-1, which would garble a ``·`` in ``systemctl status``).
Without ``$NOTIFY_SOCKET`` (a terminal, a test) every call is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import sdnotify

from syncd import events as ev
from syncd.progress import human, status_text


class Notifier:
    """sd_notify messages for ``Type=notify`` services."""

    def __init__(self) -> None:
        self._n = sdnotify.SystemdNotifier() if os.environ.get("NOTIFY_SOCKET") else None
        if self._n is not None and self._n.socket is not None:
            # Never block a pass on a slow reader of the socket: a status line can be dropped.
            self._n.socket.settimeout(0.25)
        self._status = ""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        #: how often to ping the watchdog (half its timeout), or None without a watchdog
        self.watchdog_interval: float | None = (
            int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else None
        )

    def send(self, *lines: str) -> None:
        if self._n is None or self._n.socket is None:
            return
        # systemd gone or its socket full: never a reason to stop syncing.
        with contextlib.suppress(OSError):
            self._n.socket.sendall("\n".join(lines).encode("utf-8"))

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        """Set the one-line status shown by ``systemctl status`` (only sent when it changes)."""
        if text != self._status:
            self._status = text
            self.send(f"STATUS={text}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")


def ago(seconds: float) -> str:
    """An age for people: ``just now``, ``4 min ago``, ``3 h ago``, ``2 d ago``."""
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 2 * 86400:
        return f"{int(seconds // 3600)} h ago"
    return f"{int(seconds // 86400)} d ago"


_GIT_WORDS = {
    "unreachable": "git unreachable",
    "rewritten": "branch rewritten, not followed",
    "not_in_clone": "commit missing from the clone",
    "signature_refused": "unsigned or untrusted head refused",
    "no_verified_commit": "no verified commit to serve",
}


def status_line(
    last: ev.PassFinished | ev.PassFailed | None,
    last_success: datetime | None,
    next_poll: datetime | None,
    now: datetime,
) -> str:
    """The one line ``systemctl status syncd`` shows after a pass: what state the export is in, the age
    of the last successful pass, and when the next poll is."""
    when = f"next poll {next_poll.astimezone(UTC):%H:%M:%S} UTC" if next_poll else "no poll scheduled"
    success = "never" if last_success is None else ago((now - last_success).total_seconds())
    if last is None:
        return f"starting · last success {success} · {when}"
    if isinstance(last, ev.PassFailed):
        return f"last pass failed: {last.error[:120]} · last success {success} · {when} (syncd status)"
    if last.ok:
        size = human(last.state.published_bytes)
        return f"in sync at {last.commit[:7]} · {last.state.published} assets · {size} · {when}"
    st = last.state
    parts = [f"{n} {what}" for n, what in ((st.failing, "failing"), (st.refused, "refused")) if n]
    parts += [f"{st.invalid_manifests} invalid manifests"] if st.invalid_manifests else []
    parts += [f"{st.pending} pending"] if st.pending else []
    parts += [_GIT_WORDS.get(last.git_problem or "", "git error")] if last.git_error else []
    parts += ["[source] path missing"] if last.source_error else []
    parts += [f"prune refused ({last.prune_problem})"] if last.prune_problem else []
    serving = f"serving {last.commit[:7]}" if last.commit else "nothing served"
    return f"{', '.join(parts)} · {serving} · last success {success} · {when} (syncd status)"


class StatusObserver:
    """The systemd STATUS line, from events: progress during a pass, the outcome after it. The daemon
    calls :meth:`refresh` between passes so the age of the last success stays current."""

    def __init__(self, notifier: Notifier, next_poll: Callable[[], datetime | None]) -> None:
        self.notifier = notifier
        self.next_poll = next_poll
        self.last: ev.PassFinished | ev.PassFailed | None = None
        self.last_success: datetime | None = None
        self.running = False
        self._lock = threading.Lock()

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.PassStarted):
            self.running = True
            self.notifier.status("polling git")
        elif isinstance(event, ev.PassProgress):
            self.notifier.status(
                status_text(event.files_done, event.files, event.bytes_done, event.bytes_total)
            )
        elif isinstance(event, ev.PassFinished | ev.PassFailed):
            if isinstance(event, ev.PassFinished) and event.ok and event.finished_at:
                self.last_success = datetime.fromisoformat(event.finished_at)
            self.last, self.running = event, False
            self.refresh()

    def refresh(self) -> None:
        """Send the after-pass line again (its ages change); nothing while a pass runs."""
        with self._lock:
            if not self.running:
                self.notifier.status(
                    status_line(self.last, self.last_success, self.next_poll(), datetime.now(UTC))
                )
