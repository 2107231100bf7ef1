"""A read-rate limit shared by threads: the periodic re-hash and ``syncd verify --max-rate`` use it so
that checking the export never starves the GPU servers' reads of it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Throttle:
    """At most ``rate`` bytes per second on average over every :meth:`take` (a token bucket holding one
    second's worth). ``rate`` None: no limit. ``stop`` set: :meth:`take` returns False at once."""

    def __init__(
        self,
        rate: float | None,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.stop = stop or threading.Event()
        self.clock = clock
        self._lock = threading.Lock()
        self._tokens = 0.0  # an empty bucket: even the first second stays within the rate
        self._at = clock()

    def take(self, n: int) -> bool:
        """Wait until ``n`` bytes may be read; False when the stop event was set meanwhile."""
        if self.rate is None:
            return not self.stop.is_set()
        with self._lock:
            now = self.clock()
            self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate) - n
            self._at = now
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        return not self.stop.wait(wait) if wait > 0 else not self.stop.is_set()
