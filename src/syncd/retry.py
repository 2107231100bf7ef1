"""When to try a download again: within a pass (tenacity) and across passes (a backoff in the ledger).

Within a pass: up to ``[download] retries`` attempts per asset, for transport faults only (connection
errors, timeouts, a body cut short, HTTP 5xx, 408 and 429); the wait doubles from ``backoff`` with random
jitter up to ``backoff_max``, and a server's ``Retry-After`` is honoured up to ``backoff_max``. HTTP
401/403/404 and checksum or size mismatches are not retried within the pass: the same request would get the
same answer; the next pass tries again.

Across passes (``syncd run`` only): an asset that failed N passes in a row is skipped until
``min(60 s * 2^(N-1), 1 h)`` after its last failure, so a broken upload does not hammer Artifactory every
interval. ``syncd sync``, run by hand, ignores this and tries everything now.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta

import tenacity

from syncd.errors import FetchError, HTTPStatusError

PASS_BACKOFF_BASE = 60.0
PASS_BACKOFF_MAX = 3600.0


def retryable(exc: BaseException) -> bool:
    """Whether another attempt within the pass may succeed."""
    return isinstance(exc, FetchError) and exc.retryable


class _Wait(tenacity.wait.wait_base):
    """Exponential backoff with jitter, at least the server's Retry-After, at most ``maximum``."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.base = tenacity.wait_exponential_jitter(initial=initial, max=maximum, jitter=initial)
        self.maximum = maximum

    def __call__(self, state: tenacity.RetryCallState) -> float:
        wait = float(self.base(state))
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, HTTPStatusError) and exc.retry_after is not None:
            wait = max(wait, exc.retry_after)
        return min(wait, self.maximum)


def within_pass(
    attempts: int,
    initial: float,
    maximum: float,
    stop: threading.Event,
    on_retry: Callable[[tenacity.RetryCallState], None],
) -> tenacity.Retrying:
    """The retry loop for one asset; waits end early when ``stop`` is set."""
    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts) | tenacity.stop_when_event_set(stop),
        wait=_Wait(initial, maximum),
        retry=tenacity.retry_if_exception(retryable),
        sleep=lambda seconds: _sleep(stop, seconds),
        before_sleep=on_retry,
        reraise=True,
    )


def _sleep(stop: threading.Event, seconds: float) -> None:
    stop.wait(seconds)  # a stop request ends the wait at once


def next_attempt(failed_passes: int, last_failed: datetime) -> datetime:
    """When an asset that failed ``failed_passes`` passes in a row may be tried again by the daemon."""
    delay = min(PASS_BACKOFF_BASE * 2 ** max(failed_passes - 1, 0), PASS_BACKOFF_MAX)
    return last_failed + timedelta(seconds=delay)
