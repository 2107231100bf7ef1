"""Where a download goes: the interface :class:`syncd.staging.StagedFile` implements for the fetcher.

Part of :mod:`syncd.fetch`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from syncd.segments import Extent


class Sink(Protocol):
    """A staging file: the bytes kept from an earlier attempt (``ranges``; one prefix unless a segmented
    download left holes), and the validator (ETag or Last-Modified) recorded when they were started.

    One stream uses :meth:`kept`, :meth:`write` and :meth:`restart`; a segmented download uses
    :meth:`begin_ranges`, :meth:`write_at`, :meth:`read_at` and :meth:`checkpoint`."""

    validator: str | None
    ranges: list[Extent]

    def kept(self) -> Iterator[bytes]:
        """The kept prefix, in order (re-hashed before resuming); bytes kept past a hole are dropped."""
        ...

    def write(self, data: bytes) -> None:
        """Append ``data`` to the kept prefix."""
        ...

    def restart(self, validator: str | None) -> None:
        """Drop every kept byte and remember ``validator`` for a later resume."""
        ...

    def begin_ranges(self, validator: str | None) -> None:
        """Writes go to offsets from now on; remember ``validator`` and which ranges are on disk."""
        ...

    def write_at(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset``."""
        ...

    def read_at(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` (to hash bytes that were written ahead of the hash)."""
        ...

    def checkpoint(self, ranges: list[Extent], *, persist: bool = True) -> None:
        """``ranges`` are written; record them for a resume when ``persist``."""
        ...

    def flush_early(self, start: int, end: int) -> None:
        """Start writing ``[start, end)`` back to disk now (best effort, not waiting)."""
        ...
