"""The read-rate limit of syncd verify and the periodic re-hash (pure: a fake clock and stop event)."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import examples
from syncd.throttle import Throttle

pytestmark = pytest.mark.unit


class FakeTime(threading.Event):
    """A stop event whose wait() advances a fake clock instead of sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def wait(self, timeout: float | None = None) -> bool:
        self.now += timeout or 0.0
        return self.is_set()


@given(st.lists(st.integers(1, 10**7), min_size=1, max_size=200), st.floats(1e3, 1e9))
@settings(max_examples=examples(200), deadline=None)
def test_reads_average_at_most_the_rate(chunks: list[int], rate: float) -> None:
    """Whatever the chunk sizes, the bytes taken by time t never exceed rate * t (the bucket starts
    empty), and the throttle never makes a reader wait more than needed."""
    t = FakeTime()
    throttle = Throttle(rate, t, clock=t.clock)
    taken = 0
    for n in chunks:
        assert throttle.take(n)
        taken += n
        assert taken <= rate * t.now * (1 + 1e-9) + 1e-6  # the bucket starts empty: never ahead
    assert t.now <= taken / rate * (1 + 1e-9) + 1e-6  # and never waits longer than the rate needs


def test_no_rate_never_waits_and_a_stop_ends_the_wait() -> None:
    t = FakeTime()
    assert Throttle(None, t, clock=t.clock).take(10**12) and t.now == 0
    throttle = Throttle(100.0, t, clock=t.clock)
    t.set()
    assert throttle.take(1000) is False
