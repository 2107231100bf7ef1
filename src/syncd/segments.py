"""The byte ranges of one segmented download: how the file is cut, which connection fetches what, what
is already on disk, and the sha256 taken over the whole file in order.

No I/O of its own (reading bytes back is the caller's callback) and no HTTP: :mod:`syncd.fetch` runs up
to ``segments`` ranged requests against one :class:`Pieces`, each worker asking :meth:`Pieces.take` for
work and reporting every chunk it wrote through :meth:`Pieces.claim` and :meth:`Pieces.wrote`.

- The missing bytes are cut into pieces of :data:`PIECE` bytes, handed out lowest offset first, so that
  the contiguous prefix grows steadily and is hashed while the rest still downloads.
- A worker whose queue ran dry takes the upper half of the piece with the most bytes still to come
  (:data:`STEAL_MIN` at least): a slow connection holds at most a small rest of the file hostage, and the
  number of connections never grows beyond the number of workers.
- The hash: the worker that writes the chunk at the hash frontier hashes it from memory; bytes that
  arrived ahead of the frontier (or were kept from an earlier attempt) are read back once, when the
  frontier reaches them. Memory stays bounded: at most one :data:`READ_BACK` buffer per hashing thread.
- :meth:`Pieces.extents` is what is on disk (for the resume metadata): only bytes already written.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

PIECE = 16 << 20  # one ranged request's share of a fresh download
STEAL_MIN = 1 << 20  # a free worker splits another's rest only when each half is at least this
READ_BACK = 1 << 20  # bytes read back per step to hash what arrived ahead of the frontier
SLOW_AFTER = 5.0  # seconds without a byte after which a free worker takes over a piece's whole rest
SLOW_FACTOR = 4  # ... or when it is this many times slower than the fastest connection so far
MAX_EXTENTS = 256  # most byte ranges resume metadata may list (a real partial has a few per connection)

Extent = tuple[int, int]  # [start, end) byte offsets


def extents_ok(extents: Iterable[object], size: int) -> list[Extent] | None:
    """``extents`` (from resume metadata) as sorted, disjoint ``[start, end)`` pairs within ``size``,
    adjacent ones merged; None when they are not such a list (the partial is then not trusted)."""
    out: list[Extent] = []
    for item in extents:
        if not isinstance(item, list | tuple) or len(item) != 2:
            return None
        a, b = item
        if type(a) is not int or type(b) is not int or not 0 <= a < b <= size:
            return None
        if out and a < out[-1][1]:
            return None
        if out and a == out[-1][1]:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def prefix(extents: list[Extent]) -> int:
    """How many bytes from offset 0 are kept without a hole."""
    return extents[0][1] if extents and extents[0][0] == 0 else 0


def gaps(size: int, extents: list[Extent]) -> list[Extent]:
    """The byte ranges of a ``size``-byte file that ``extents`` (sorted, disjoint) do not hold."""
    out, at = [], 0
    for a, b in extents:
        if a > at:
            out.append((at, a))
        at = b
    if at < size:
        out.append((at, size))
    return out


def workers_for(size: int, segments: int, min_size: int) -> int:
    """How many concurrent ranged requests a ``size``-byte file gets: 1 below ``min_size``, else up to
    ``segments``, never so many that a worker's first piece is under :data:`STEAL_MIN`."""
    if segments <= 1 or size < min_size or size < 2 * STEAL_MIN:
        return 1
    return max(1, min(segments, size // STEAL_MIN))


@dataclass(eq=False)
class Piece:
    """One byte range ``[start, end)``; ``claimed``: offset up to which a worker has taken bytes to write;
    ``done``: offset up to which they are written. ``end`` shrinks when another worker takes its rest."""

    start: int
    end: int
    claimed: int
    done: int
    busy: bool = False
    touched: float = 0.0  # monotonic time of the last bytes claimed (or of the hand-out)
    taken_over: bool = False  # another worker took all of its rest: its connection may stop waiting
    since: float = 0.0  # when it was handed out ...
    since_at: int = 0  # ... and at which offset (its speed is measured from there)

    def speed(self, now: float) -> float:
        """Bytes/s claimed since the hand-out (0 within the first second: not known yet)."""
        elapsed = now - self.since
        return (self.claimed - self.since_at) / elapsed if elapsed >= 1.0 else 0.0

    @property
    def rest(self) -> int:
        return self.end - self.claimed


class Aborted(Exception):
    """Another worker failed or the download fell back to one stream: stop this one (not an error of
    its own)."""


class Pieces:
    """The pieces of one file, shared by its download workers (every method is thread-safe)."""

    def __init__(self, size: int, kept: list[Extent], piece: int = PIECE) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._all: list[Piece] = [Piece(a, b, b, b) for a, b in kept]
        self._queue: list[Piece] = []
        for a, b in gaps(size, kept):
            for s in range(a, b, piece):
                p = Piece(s, min(s + piece, b), s, s)
                self._all.append(p)
                self._queue.append(p)
        self._all.sort(key=lambda p: p.start)
        self._queue.reverse()  # pop() hands out the lowest offset first
        self._cursor = 0  # index in _all of the piece holding the hash frontier
        self._digest = hashlib.sha256()
        self._hashed = 0
        self._hashing = False
        self._fastest = 0.0  # bytes/s of the fastest connection so far
        self.stopped = False  # set by abort(): every worker stops at its next chunk

    # work -------------------------------------------------------------------------------------------

    def take(self) -> Piece | None:
        """The next piece to fetch, marked busy: a queued one, else the upper half of the busy piece with
        the largest rest; None when nothing is left to hand out (or the download was aborted)."""
        with self._lock:
            if self.stopped:
                return None
            now = time.monotonic()
            if self._queue:
                p = self._queue.pop()
                p.busy, p.touched, p.since, p.since_at = True, now, now, p.claimed
                return p
            victim = max((p for p in self._all if p.busy), key=lambda p: p.rest, default=None)
            if victim is None or victim.rest <= 0:
                return None
            if victim.rest >= 2 * STEAL_MIN:
                mid = victim.claimed + victim.rest // 2
            elif self._lagging(victim, now):
                mid = victim.claimed  # take over all the slow connection still had to fetch
                victim.taken_over = True
            else:
                return None
            p = Piece(mid, victim.end, mid, mid, busy=True, touched=now, since=now, since_at=mid)
            victim.end = mid
            self._all.insert(self._all.index(victim) + 1, p)
            return p

    def _lagging(self, p: Piece, now: float) -> bool:
        """Whether ``p``'s connection stalled (no byte for SLOW_AFTER) or is SLOW_FACTOR times slower than
        the fastest connection seen, with more than a second's worth of its rest still to come."""
        if now - p.touched >= SLOW_AFTER:
            return True
        speed = p.speed(now)
        return 0 < speed * SLOW_FACTOR < self._fastest and p.rest > speed

    def claim(self, p: Piece, n: int) -> int:
        """How many of ``n`` bytes just received for ``p`` (at ``p.claimed``) may be written: fewer when
        another worker took the rest of ``p`` meanwhile, 0 when ``p`` is complete. Raises
        :class:`Aborted` after :meth:`abort`."""
        with self._lock:
            if self.stopped:
                raise Aborted
            k = max(0, min(n, p.end - p.claimed))
            p.claimed += k
            if k:
                p.touched = time.monotonic()
            return k

    def wrote(self, p: Piece, offset: int, data: bytes, read: Callable[[int, int], bytes]) -> None:
        """``data`` is written at ``offset`` (inside ``p``): record it, and advance the hash over it (from
        memory when it is at the frontier) and over anything contiguous after it (read back by ``read``)."""
        with self._lock:
            p.done = offset + len(data)
            inline = not self._hashing and self._hashed == offset
            if inline:
                self._hashing = True
        if inline:
            self._digest.update(data)  # outside the lock: hashlib releases the GIL for big buffers
            with self._lock:
                self._hashed += len(data)
            self._catch_up(read, owned=True)

    def release(self, p: Piece) -> None:
        """``p``'s worker stops working on it (done, or failed): unwritten claimed bytes go back to
        ``p``'s rest and an unfinished ``p`` is queued again for another request."""
        with self._lock:
            now = time.monotonic()
            if p.done > p.since_at and now > p.since:
                self._fastest = max(self._fastest, (p.done - p.since_at) / max(now - p.since, 0.001))
            p.busy = False
            p.claimed = p.done
            if p.done < p.end and not self.stopped:
                self._queue.append(p)

    def abort(self) -> None:
        with self._lock:
            self.stopped = True

    # state ------------------------------------------------------------------------------------------

    def extents(self) -> list[Extent]:
        """The byte ranges written so far, merged (what resume metadata records)."""
        with self._lock:
            spans = [(p.start, p.done) for p in self._all if p.done > p.start]
        return extents_ok(spans, self.size) or []

    def pending(self) -> bool:
        """Whether some piece is still being fetched (or waits in the queue)."""
        with self._lock:
            return any(p.done < p.end for p in self._all)

    def complete(self) -> bool:
        with self._lock:
            return all(p.done == p.end for p in self._all)

    def digest(self, read: Callable[[int, int], bytes]) -> tuple[str, int]:
        """Hash whatever is written and not hashed yet; return the hex sha256 and how many bytes it
        covers (the whole file once :meth:`complete`)."""
        self._catch_up(read, owned=False)
        with self._lock:
            return self._digest.hexdigest(), self._hashed

    def _frontier(self) -> int:
        """The end of the contiguous written prefix (under the lock)."""
        while self._cursor < len(self._all) and self._all[self._cursor].done == self._all[self._cursor].end:
            self._cursor += 1
        if self._cursor == len(self._all):
            return self.size
        return self._all[self._cursor].done

    def _catch_up(self, read: Callable[[int, int], bytes], *, owned: bool) -> None:
        """Hash the written prefix beyond the frontier; one thread at a time (``owned``: the caller
        already holds the hashing turn)."""
        with self._lock:
            if not owned:
                if self._hashing:
                    return  # the thread that has the turn hashes it
                self._hashing = True
        try:
            while True:
                with self._lock:
                    start, end = self._hashed, self._frontier()
                    if start >= end:
                        self._hashing = False
                        return
                data = read(start, min(end - start, READ_BACK))
                if not data:
                    raise OSError("staging file shorter than the bytes written to it")
                self._digest.update(data)
                with self._lock:
                    self._hashed += len(data)
        except BaseException:
            with self._lock:
                self._hashing = False
            raise
