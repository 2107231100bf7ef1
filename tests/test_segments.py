"""The byte bookkeeping of a segmented download (syncd.segments): pure, no sockets."""

from __future__ import annotations

import hashlib
import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd import segments
from syncd.segments import Pieces, extents_ok, gaps, prefix, workers_for

MiB = 1 << 20


def test_extents_are_checked_and_merged() -> None:
    """Resume metadata's ranges are trusted only as sorted, disjoint, in-bounds integer pairs."""
    assert extents_ok([[0, 10], [10, 20], [30, 40]], 40) == [(0, 20), (30, 40)]
    assert extents_ok([], 5) == []
    for bad in (
        [[0, 50]],
        [[5, 5]],
        [[10, 20], [0, 5]],
        [[0, 10], [5, 20]],
        [["0", 1]],
        [[0, 1, 2]],
        [[True, 3]],
    ):
        assert extents_ok(bad, 40) is None, bad


def test_gaps_and_prefix() -> None:
    """What is missing from a file, and how much of it is kept from byte 0 without a hole."""
    assert gaps(100, [(10, 20), (50, 100)]) == [(0, 10), (20, 50)]
    assert gaps(100, []) == [(0, 100)]
    assert gaps(100, [(0, 100)]) == []
    assert prefix([(0, 30), (40, 50)]) == 30
    assert prefix([(5, 30)]) == 0
    assert prefix([]) == 0


def test_workers_for_size() -> None:
    """Small files get one stream; big ones up to `segments` connections, never a first piece under
    STEAL_MIN."""
    assert workers_for(63 * MiB, 4, 64 * MiB) == 1
    assert workers_for(64 * MiB, 4, 64 * MiB) == 4
    assert workers_for(64 * MiB, 1, 64 * MiB) == 1
    assert workers_for(3 * MiB, 8, 1) == 3
    assert workers_for(MiB, 8, 1) == 1


def _read(data: bytes):
    return lambda offset, n: data[offset : offset + n]


def _simulate(size: int, kept: list[tuple[int, int]], piece: int, workers: int, seed: int) -> Pieces:
    """Run `workers` simulated connections over one Pieces, interleaving their chunks at random (work
    stealing included), writing into a bytearray; return the Pieces after the last byte."""
    rng = random.Random(seed)  # noqa: S311 (test data)
    data = bytes(rng.getrandbits(8) for _ in range(size))
    disk = bytearray(size)
    for a, b in kept:
        disk[a:b] = data[a:b]
    pieces = Pieces(size, kept, piece)
    active: list[list[object]] = []  # [piece, offset]
    while True:
        while len(active) < workers:
            p = pieces.take()
            if p is None:
                break
            active.append([p, p.done])
        if not active:
            break
        slot = rng.randrange(len(active))
        p, offset = active[slot]
        assert isinstance(p, segments.Piece) and isinstance(offset, int)
        n = pieces.claim(p, rng.randint(1, 5000))
        if n == 0 or rng.random() < 0.02:  # done, stolen, or the connection breaks now and then
            pieces.release(p)
            active.pop(slot)
            continue
        disk[offset : offset + n] = data[offset : offset + n]
        pieces.wrote(p, offset, data[offset : offset + n], _read(bytes(disk)))
        active[slot][1] = offset + n
        if offset + n >= p.end:
            pieces.release(p)
            active.pop(slot)
    assert bytes(disk) == data
    digest, covered = pieces.digest(_read(bytes(disk)))
    assert covered == size
    assert digest == hashlib.sha256(data).hexdigest()
    return pieces


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 60_000),
    piece=st.integers(1, 20_000),
    workers=st.integers(1, 6),
    seed=st.integers(0, 2**32),
    kept_cuts=st.lists(st.integers(0, 60_000), max_size=6),
)
def test_any_interleaving_hashes_the_whole_file_in_order(
    size: int, piece: int, workers: int, seed: int, kept_cuts: list[int]
) -> None:
    """Whatever order connections deliver chunks in, with stealing, faults and kept ranges, every byte is
    written once where it belongs and the sha256 covers the whole file in order."""
    cuts = sorted({c for c in kept_cuts if c < size})
    kept = [(a, b) for a, b in zip(cuts[::2], cuts[1::2], strict=False) if a < b]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(segments, "STEAL_MIN", 512)
        pieces = _simulate(size, kept, piece, workers, seed)
    assert pieces.complete()
    assert pieces.extents() == [(0, size)]


def test_free_worker_takes_half_of_the_largest_rest() -> None:
    """With nothing queued, a free worker splits the busy piece with the most left."""
    pieces = Pieces(10 * MiB, [], 10 * MiB)
    slow = pieces.take()
    assert slow is not None and (slow.start, slow.end) == (0, 10 * MiB)
    assert pieces.claim(slow, MiB) == MiB
    stolen = pieces.take()
    assert stolen is not None
    assert (stolen.start, stolen.end) == (MiB + 9 * MiB // 2, 10 * MiB)
    assert slow.end == stolen.start
    # the slow connection's next chunk is cut at its new end
    assert pieces.claim(slow, 9 * MiB) == slow.end - MiB


def test_extents_record_only_written_bytes() -> None:
    """Claimed but unwritten bytes are not recorded; a released piece goes back to the queue from its done."""
    pieces = Pieces(100, [(0, 10)], 30)
    p = pieces.take()
    assert p is not None and (p.start, p.end) == (10, 40)
    assert pieces.claim(p, 20) == 20
    pieces.wrote(p, 10, b"x" * 5, lambda o, n: b"k" * n)
    assert pieces.extents() == [(0, 15)]
    pieces.release(p)
    again = pieces.take()
    assert again is p and p.claimed == 15


def test_abort_stops_every_worker() -> None:
    """After abort, claim raises Aborted and nothing more is handed out."""
    pieces = Pieces(100, [], 10)
    p = pieces.take()
    assert p is not None
    pieces.abort()
    with pytest.raises(segments.Aborted):
        pieces.claim(p, 5)
    assert pieces.take() is None


def test_threads_hash_in_order() -> None:
    """Real threads writing their pieces concurrently still produce the file's sha256."""
    size, piece = 3_000_000, 100_000
    data = random.Random(7).randbytes(size)  # noqa: S311 (test data)
    disk = bytearray(size)
    pieces = Pieces(size, [], piece)

    def read(offset: int, n: int) -> bytes:
        return bytes(disk[offset : offset + n])

    def worker() -> None:
        while (p := pieces.take()) is not None:
            offset = p.done
            while offset < p.end:
                n = pieces.claim(p, 7000)
                if n == 0:
                    break
                disk[offset : offset + n] = data[offset : offset + n]
                pieces.wrote(p, offset, data[offset : offset + n], read)
                offset += n
            pieces.release(p)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pieces.complete()
    assert pieces.digest(read) == (hashlib.sha256(data).hexdigest(), size)
