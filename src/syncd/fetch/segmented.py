"""One big file over several ranged requests at once, written into the one staging file.

Part of :mod:`syncd.fetch`; the byte bookkeeping (pieces, work stealing, the in-order hash) is
:mod:`syncd.segments`.

- The first request (the probe) asks for the first missing piece with ``Range`` (and ``If-Range`` when
  resuming). Its redirects are followed once, credentials only to the origin; every later request goes
  to the final URL. The probe's answer decides: a ``206`` for exactly that range of a file of the
  manifest's size, with a strong ``ETag`` or a ``Last-Modified``, starts the other workers; anything else
  (a ``200``, no validator, an odd ``Content-Range``) falls back to one stream from byte 0.
- Every request carries ``If-Range`` with that validator; a ``200``, a ``416``, or a ``206`` with another
  validator or range means the file changed under the download: the workers stop, the staged bytes are
  dropped and one stream starts over (whose hash then decides).
- A transport fault on one piece puts its unwritten rest back in the queue for the next request; more
  faults than workers in one attempt fail the attempt (retryable: the written ranges stay for resume).
- Written ranges are recorded in the staging file's metadata once a second and whenever a piece is done,
  so that after a crash or a stop only the missing ranges are asked for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

from syncd import segments
from syncd.errors import FetchError, HTTPStatusError, StopRequested, SyncdError, VerifyError
from syncd.fetch.answers import RANGE, Response, Send, check_headers, validator_of
from syncd.fetch.sink import Sink
from syncd.fetch.wire import Watch, failure, redact, translate
from syncd.manifest import Asset

IDLE_POLL = 0.05  # seconds an idle worker waits before looking again for a slow piece to take over
CHECKPOINT_EVERY = 1.0  # seconds between two records of the written ranges (besides each finished piece)


class _Fallback(Exception):
    """The server cannot (or can no longer) serve this file in ranges: download it as one stream."""


class Segmented:
    """One segmented download attempt of ``asset`` into ``sink`` over ``workers`` connections."""

    def __init__(
        self,
        send: Send,
        home: tuple[str, str, int],
        usable: Callable[[str | None], str | None],
        *,
        timeout: float,
        stop: threading.Event | None,
        workers: int,
        asset: Asset,
        url: str,
        sink: Sink,
        progress: Callable[[int], None],
    ) -> None:
        self.send, self.home, self.usable = send, home, usable
        self.timeout, self.stop, self.workers = timeout, stop, workers
        self.asset, self.url, self.sink, self.progress = asset, url, sink, progress
        self.target: str | None = None  # the final URL, once the probe's redirects were followed
        self.validator: str | None = None
        self.ready = threading.Event()  # the probe's answer is in: the other workers may start
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.fallback = False
        self.faults = 0
        self._last_checkpoint = time.monotonic()
        self.pieces = segments.Pieces(asset.size, [])

    def run(self) -> bool:
        """Download and verify; True when done, False when the file must come as one stream (the sink
        then holds nothing). Raises as :meth:`syncd.fetch.Fetcher.download` does."""
        self.validator = self.usable(self.sink.validator)
        if self.validator is None and self.sink.ranges:
            self.sink.restart(None)  # kept bytes without a validator cannot be resumed safely
        self.pieces = segments.Pieces(self.asset.size, list(self.sink.ranges), segments.PIECE)
        if not self.pieces.complete():
            first = self.pieces.take()
            assert first is not None  # something is missing, so something is queued
            with ThreadPoolExecutor(self.workers - 1, thread_name_prefix="syncd-seg") as pool:
                others = [pool.submit(self._worker, None) for _ in range(self.workers - 1)]
                self._worker(first)
                for f in others:
                    f.result()
        return self._finish()

    # workers ----------------------------------------------------------------------------------------

    def _worker(self, first: segments.Piece | None) -> None:
        """Fetch pieces until none is left; ``first`` (the caller's) is the probe. Never raises: the
        first error is kept in ``self.error`` and stops every worker."""
        try:
            if first is None:
                self.ready.wait()
            piece = first
            while True:
                if piece is None:
                    piece = self.pieces.take()
                    if piece is None:
                        if self.pieces.stopped or not self.pieces.pending():
                            break
                        time.sleep(IDLE_POLL)  # others still fetch: one may turn out slow enough to take over
                        continue
                with self._lock:
                    probe, used = self.target is None, self.target or self.url
                try:
                    self._fetch(piece, used, probe=probe)
                except FetchError as exc:
                    if not self._recoverable(exc, used):
                        raise
                except segments.Aborted:
                    if self.pieces.stopped:
                        raise  # else another worker took over this piece's rest: take the next one
                finally:
                    self.pieces.release(piece)
                piece = None
        except segments.Aborted:
            pass
        except _Fallback:
            self._fail(None)
        except BaseException as exc:
            self._fail(exc)
        finally:
            if first is not None:
                self.ready.set()

    def _recoverable(self, exc: FetchError, used: str) -> bool:
        """Whether another request may fetch the rest of a piece after ``exc`` (counted: more faults than
        workers in one attempt fail it). A 416 or any 4xx from a redirect target is answered as well."""
        if isinstance(exc, StopRequested | VerifyError):
            return False
        if isinstance(exc, HTTPStatusError):
            if exc.status == 416:
                raise _Fallback from None  # the file is shorter than the ranges asked for: it changed
            if not exc.retryable:
                if used == self.url:
                    return False
                with self._lock:  # a signed URL may have expired: the next request asks the origin again
                    if self.target == used:
                        self.target = None
        with self._lock:
            self.faults += 1
            return self.faults <= self.workers

    def _fail(self, exc: BaseException | None) -> None:
        with self._lock:
            if self.error is None and not self.fallback:
                if exc is None:
                    self.fallback = True
                else:
                    self.error = exc
        self.pieces.abort()
        self.ready.set()

    # one request ------------------------------------------------------------------------------------

    def _fetch(self, piece: segments.Piece, used: str, *, probe: bool) -> None:
        """One ranged request for the rest of ``piece`` to ``used``: the final URL, or for a ``probe``
        the asset's URL, whose redirects are followed and whose answer decides the rest."""
        start, end = piece.done, piece.end
        headers = {"Range": f"bytes={start}-{end - 1}"}
        if self.validator is not None:
            headers["If-Range"] = self.validator
        # Stop waiting once the download is aborted or another worker took over this piece's whole rest.
        watch = Watch(
            self.timeout, self.stop, self.url, halted=lambda: self.pieces.stopped or piece.taken_over
        )
        Watch.current.watch = watch
        try:
            with Response(self.send, self.home, used, headers, watch) as resp:
                self._accept(resp, watch, start, end, probe=probe)
                if probe:
                    with self._lock:
                        self.target = watch.target
                    self.ready.set()
                self._body(piece, resp, watch, start, end)
        except (SyncdError, segments.Aborted, _Fallback):
            raise
        except Exception as exc:
            raise translate(exc, watch) from None
        finally:
            Watch.current.watch = None

    def _accept(self, resp: httpx.Response, watch: Watch, start: int, end: int, *, probe: bool) -> None:
        """Check an answer's head: exactly the range asked, of a file of the manifest's size, of the
        version being downloaded. Raises :class:`_Fallback` or a :class:`FetchError`."""
        if resp.status_code != 206:
            raise _Fallback  # Range ignored, or If-Range found another version
        m = RANGE.fullmatch(resp.headers.get("content-range", "").strip())
        if m is None or m.group(3) == "*" or (int(m.group(1)), int(m.group(2))) != (start, end - 1):
            raise _Fallback
        if int(m.group(3)) != self.asset.size:
            raise VerifyError(
                f"server's Content-Range says {int(m.group(3))} bytes, not the manifest's size "
                f"{self.asset.size}; not downloading{watch.after()}",
                url=redact(self.url),
                expected=str(self.asset.size),
                actual=str(int(m.group(3))),
            )
        seen = validator_of(resp)
        if self.validator is None:
            self.validator = self.usable(seen)
            if self.validator is None:
                raise _Fallback  # no ETag or Last-Modified: ranges of two versions could be spliced
        elif seen is not None and seen != self.validator:
            raise _Fallback
        if probe:
            check_headers(self.asset, watch, resp, full=False)
            self.sink.begin_ranges(self.validator)  # from now on the metadata lists the ranges written

    def _body(self, piece: segments.Piece, resp: httpx.Response, watch: Watch, start: int, end: int) -> None:
        """Write the answer's bytes at their offsets until the piece is done (or its rest was taken by
        another worker, which this one then leaves to it)."""
        watch.body()
        offset = start
        for chunk in resp.iter_raw():
            if offset + len(chunk) > end:
                raise failure(
                    f"server sent more than the range {start}-{end - 1} asked", watch, retryable=False
                )
            n = self.pieces.claim(piece, len(chunk))
            if n:
                data = chunk if n == len(chunk) else chunk[:n]
                self.sink.write_at(offset, data)
                self.pieces.wrote(piece, offset, data, self.sink.read_at)
                offset += n
                self.progress(n)
            watch.payload(len(chunk))
            if n < len(chunk) or offset >= piece.end:
                break
            self._checkpoint(force=False)
        if offset < piece.end:
            raise failure(f"range {start}-{end - 1} ended after {offset - start} bytes", watch)
        self.sink.flush_early(start, offset)
        self._checkpoint(force=True)

    def _checkpoint(self, *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_checkpoint < CHECKPOINT_EVERY:
            return
        with self._lock:
            self._last_checkpoint = now
            self.sink.checkpoint(self.pieces.extents())

    # the end ----------------------------------------------------------------------------------------

    def _finish(self) -> bool:
        if self.fallback:
            self.sink.restart(None)
            return False
        if self.error is not None:
            self.sink.checkpoint(self.pieces.extents(), persist=False)
            raise self.error
        actual, covered = self.pieces.digest(self.sink.read_at)
        self.sink.checkpoint([(0, self.asset.size)], persist=False)
        if covered != self.asset.size:  # cannot happen: every piece is done
            raise FetchError(
                f"download ended after {covered} of {self.asset.size} bytes", url=redact(self.url)
            )
        if actual != self.asset.sha256:
            raise VerifyError(
                f"sha256 mismatch: expected {self.asset.sha256}, got {actual}",
                url=redact(self.url),
                expected=self.asset.sha256,
                actual=actual,
            )
        return True
