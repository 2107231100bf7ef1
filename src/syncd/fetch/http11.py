"""The HTTP/1.1 exchanges under :class:`syncd.fetch.Fetcher`: httpx's transport interface, h11 for the
request and every response head, and a body with a ``Content-Length`` taken straight from the socket.

Part of :mod:`syncd.fetch`. Why not httpcore's pool, which syncd used before: it hands every body byte
through h11's receive buffer (appended to a bytearray, sliced out, copied into a new ``bytes``), three
copies under the GIL of every byte before syncd writes it; for a multi-GiB file on two cores that cost
as much as the sha256 (docs/performance.md). Here:

- The request is serialised and every response head parsed by h11 (the same well-kept parser httpcore
  uses, with the same 100 KiB bound on a head): status line, header syntax, ``Content-Length`` and
  ``Transfer-Encoding`` are validated there, not by hand.
- A body framed by a valid ``Content-Length`` (and no ``Transfer-Encoding``) is read from the socket
  with the :class:`~syncd.fetch.wire.Stream` reads that obey the request's :class:`~syncd.fetch.wire.Watch`,
  each read yielded as it came (one copy, the kernel's). A chunked body, or one that runs until the
  connection closes, goes through h11 event by event, as before.
- A connection goes back to the pool only after a complete body, from an HTTP/1.1 answer without
  ``Connection: close``, with no byte past the body; anything else (an early close, an error, a stop, a
  server sending more than it announced) closes it. An idle connection that became readable (the server
  closed it, or sent bytes nobody asked for) is closed, not reused.
- Errors are httpcore's exception types (``ConnectError``, ``ReadTimeout``, ``RemoteProtocolError``, ...),
  which :func:`~syncd.fetch.wire.translate` maps to syncd's words by type.
"""

from __future__ import annotations

import math
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import h11
import httpcore
import httpx

from syncd.fetch.wire import READ_SIZE, Backend, watching

MAX_HEAD = 100 << 10  # the largest response head (status line and headers) accepted, as httpcore's
Key = tuple[bytes, bytes, int]  # (scheme, host, port)


class Transport(httpx.BaseTransport):
    """httpx's transport over a bounded pool of HTTP/1.1 connections (at most ``max_connections`` open,
    ``max_keepalive_connections`` of them idle)."""

    def __init__(self, ctx: ssl.SSLContext, *, max_connections: int, max_keepalive_connections: int) -> None:
        ctx.set_alpn_protocols(["http/1.1"])
        self._ctx = ctx
        self._backend = Backend()
        self._max = max_connections
        self._max_idle = max_keepalive_connections
        self._cond = threading.Condition()
        self._idle: list[_Conn] = []  # oldest first
        self._open = 0  # connections open or being opened, idle ones included
        self._closed = False

    # the pool ---------------------------------------------------------------------------------------

    def _checkout(self, key: Key, pool_timeout: float | None) -> _Conn | None:
        """An idle connection to ``key`` (None: the caller may open a new one, already counted). Waits,
        within the request's bounds, while ``max_connections`` are open and none of them is idle."""
        end = time.monotonic() + (pool_timeout if pool_timeout is not None else math.inf)
        stale: list[_Conn] = []
        try:
            with self._cond:
                while True:
                    for conn in reversed(list(self._idle)):  # the most recently used first
                        if conn.key == key:
                            self._idle.remove(conn)
                            if conn.stream.get_extra_info("is_readable"):
                                stale.append(conn)  # closed by the server (or it sent unasked bytes)
                                self._open -= 1
                                continue
                            return conn
                    if self._open < self._max:
                        self._open += 1
                        return None
                    if self._idle:  # full, but some are idle for another origin: make room
                        stale.append(self._idle.pop(0))
                        self._open -= 1
                        continue
                    watch = watching()
                    if watch is not None:
                        watch.check()
                    left = end - time.monotonic()
                    if left <= 0:
                        raise httpcore.PoolTimeout("no connection became free in time")
                    self._cond.wait(watch.wait(left) if watch is not None else min(left, 1.0))
        finally:
            for conn in stale:
                conn.stream.close()

    def _checkin(self, conn: _Conn, *, reusable: bool) -> None:
        with self._cond:
            keep = reusable and not self._closed and len(self._idle) < self._max_idle
            if keep:
                self._idle.append(conn)
            else:
                self._open -= 1
            self._cond.notify()
        if not keep:
            conn.stream.close()

    def _forget(self) -> None:
        """A connection being opened failed: it no longer counts."""
        with self._cond:
            self._open -= 1
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        for conn in idle:
            conn.stream.close()

    # one exchange -----------------------------------------------------------------------------------

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        url = request.url
        scheme, host = url.raw_scheme, url.raw_host
        if scheme not in (b"http", b"https"):
            raise httpcore.UnsupportedProtocol("only http and https URLs are fetched")
        port = url.port or (443 if scheme == b"https" else 80)
        key: Key = (scheme, host, port)
        conn = self._checkout(key, timeouts.get("pool"))
        if conn is None:
            try:
                conn = self._connect(key, url.host, timeouts)
            except BaseException:
                self._forget()
                raise
        try:
            return self._exchange(conn, request, timeouts)
        except BaseException:
            self._checkin(conn, reusable=False)
            raise

    def _connect(self, key: Key, server_hostname: str, timeouts: dict[str, float | None]) -> _Conn:
        scheme, host, port = key
        stream = self._backend.connect_tcp(host.decode("ascii"), port, timeouts.get("connect"))
        if scheme == b"https":
            try:
                stream = stream.start_tls(self._ctx, server_hostname, timeouts.get("connect"))
            except BaseException:
                stream.close()
                raise
        return _Conn(key, stream)

    def _exchange(
        self, conn: _Conn, request: httpx.Request, timeouts: dict[str, float | None]
    ) -> httpx.Response:
        parser = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        target = request.url.raw_path
        try:
            head = parser.send(h11.Request(method=request.method, target=target, headers=request.headers.raw))
            assert isinstance(request.stream, Iterable)
            if any(chunk for chunk in request.stream):  # syncd only sends GETs without a body
                raise httpcore.LocalProtocolError("a request body is not supported")
            head += parser.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise httpcore.LocalProtocolError(str(exc)) from None
        conn.stream.write(head, timeouts.get("write"))
        read = timeouts.get("read")
        while True:
            event = _next(parser, conn, read)
            if isinstance(event, h11.Response):
                break
            if not isinstance(event, h11.InformationalResponse):  # pragma: no cover - h11 allows no other
                raise httpcore.RemoteProtocolError("unexpected event before the response head")
        body = _Body(self, conn, parser, event, read)
        return httpx.Response(
            status_code=event.status_code,
            headers=event.headers.raw_items(),
            stream=body,
            extensions={"http_version": b"HTTP/" + event.http_version, "reason_phrase": event.reason},
        )


class _Conn:
    __slots__ = ("key", "stream")

    def __init__(self, key: Key, stream: httpcore.NetworkStream) -> None:
        self.key = key
        self.stream = stream


def _next(parser: h11.Connection, conn: _Conn, timeout: float | None) -> Any:
    """The next h11 event of the response, reading from the socket as h11 needs."""
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            raise httpcore.RemoteProtocolError(str(exc)) from None
        if event is not h11.NEED_DATA:
            return event
        data = conn.stream.read(READ_SIZE, timeout)
        if data == b"" and parser.their_state is h11.SEND_RESPONSE:
            raise httpcore.RemoteProtocolError("Server disconnected without sending a response.")
        parser.receive_data(data)


def _keep_alive(event: h11.Response) -> bool:
    """Whether the server lets the connection carry another request (h11's own rule)."""
    if event.http_version < b"1.1":
        return False
    tokens = b",".join(v for n, v in event.headers if n == b"connection")
    return b"close" not in {t.strip().lower() for t in tokens.split(b",")}


def _length(event: h11.Response) -> int | None:
    """The body's length when it is framed by Content-Length alone (h11 validated the value), else None:
    a chunked body, or one until the connection closes, goes through h11."""
    if event.status_code in (204, 304):
        return 0
    length = None
    for name, value in event.headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            length = int(value)
    return length


class _Body(httpx.SyncByteStream):
    """The response body; hands the connection back to the pool (or closes it) on :meth:`close`."""

    def __init__(
        self,
        transport: Transport,
        conn: _Conn,
        parser: h11.Connection,
        head: h11.Response,
        timeout: float | None,
    ) -> None:
        self._transport = transport
        self._conn: _Conn | None = conn
        self._parser = parser
        self._head = head
        self._timeout = timeout
        self._reusable = False  # set once the whole body, and nothing more, was read

    def __iter__(self) -> Iterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        length = _length(self._head)
        if length is None:
            yield from self._framed(conn)
            return
        lead, _ = self._parser.trailing_data  # bytes that came with the head
        left = length
        if left == 0:
            self._reusable = not lead and _keep_alive(self._head)
            return
        while left > 0:
            if lead:
                data, lead = lead, b""
            else:
                data = conn.stream.read(min(left, READ_SIZE), self._timeout)
                if not data:
                    raise httpcore.RemoteProtocolError("peer closed connection before the whole body")
            extra = len(data) > left  # more than Content-Length: never reuse this connection
            if extra:
                data = data[:left]
            left -= len(data)
            if left == 0:
                # Decided before the last chunk is handed out: a caller that stops once it has all it
                # asked for (a ranged piece) still gives a clean connection back to the pool.
                self._reusable = not extra and _keep_alive(self._head)
            yield data

    def _framed(self, conn: _Conn) -> Iterator[bytes]:
        while True:
            event = _next(self._parser, conn, self._timeout)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
        parser = self._parser
        leftover, closed = parser.trailing_data
        self._reusable = (
            parser.our_state is h11.DONE
            and parser.their_state is h11.DONE
            and not leftover
            and not closed  # a body framed by the server's close: the connection is gone
            and _keep_alive(self._head)
            # Content-Length and Transfer-Encoding together: h11 decoded it as chunked, as HTTP says,
            # but such a message "ought to be handled as an error" (RFC 9112 6.3): never reuse it.
            and not any(n == b"content-length" for n, _ in self._head.headers)
        )

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._transport._checkin(conn, reusable=self._reusable)
