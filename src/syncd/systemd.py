"""Talk to systemd (``sd_notify``): readiness, status line, watchdog, reload and stop.

Uses the ``sdnotify`` package for the socket (``$NOTIFY_SOCKET``, abstract sockets included). Messages are
sent as UTF-8 (``sdnotify.notify`` encodes Latin-1, which would garble a ``·`` in ``systemctl status``).
Without ``$NOTIFY_SOCKET`` (a terminal, a test) every call is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import time

import sdnotify


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
