"""The HTTP listener (``[http] listen``): ``GET /healthz``, ``GET /metrics`` and ``POST /trigger``.

This is syncd's only server socket. It binds exactly the configured address and serves each connection on
its own daemon thread; it knows nothing of the daemon, the ledger or a pass, and is handed three callables
instead (what the health answer is, the metrics text, how to start a pass), so lower layers still never
import upper ones.

Why the standard library's ``http.server.ThreadingHTTPServer``: it is kept with CPython itself, adds no
dependency to a daemon that runs as root next to an NFS export, and threads fit a daemon that is already
threaded (APScheduler, the download pool). Three fixed routes need no framework, and uvicorn or aiohttp
would bring an event loop for them. What the stdlib does not do for a listener facing a network is added
here, each in one place:

- **Bounded time.** A connection carries one request (HTTP/1.0: no keep-alive), and the request line,
  headers and body must all arrive within ``timeout`` of the connection being accepted, whatever the
  client's pace (a per-read timeout alone lets a client dripping one byte a second hold a thread forever);
  writing the answer gets one more ``timeout``.
- **Bounded load.** At most ``max_connections`` connections are served at once; one beyond that gets a
  fixed 429 and is closed at once, never queued (not 503: on ``/healthz`` 503 means stale, and a
  probe that restarts on 503 must not restart syncd because another client holds the slots).
  Request line and header lines stay bounded by the
  stdlib (64 KiB, 100 headers), a trigger body by :data:`MAX_BODY` (checked on ``Content-Length`` before
  a byte is read; chunked bodies are refused with 411).
- **Nothing quoted, nothing leaked.** Every answer, errors included, is a fixed body of syncd's own (the
  stdlib's error page quotes the request line); no request header or body is ever echoed or logged; the
  ``Server`` header says ``syncd`` without a Python version; a handler exception is a 500 and one
  ``http_error`` event naming its type only.
- **Quiet.** The stdlib's per-request stderr line is off. The only events are ``trigger_accepted``,
  ``trigger_refused`` (remote address and reason) and ``http_error``: a scrape every 15 s logs nothing.
- **No DNS.** ``HTTPServer.server_bind`` does a reverse lookup of the address (``getfqdn``); skipped.

Trigger authentication accepts GitLab's ``X-Gitlab-Token: <secret>`` and the ``X-Hub-Signature-256:
sha256=<hex HMAC-SHA256 of the raw body>`` that GitHub, Gitea and Bitbucket send; both are compared in
constant time (:func:`hmac.compare_digest`). Every credential header present must be right, and present
once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import http.server
import io
import json
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from syncd import logs
from syncd.config import Secret
from syncd.errors import ListenError

log = logs.get()

MAX_BODY = 1024 * 1024  # a webhook body larger than this is refused (413) unread
JSON = "application/json"
_LINGER_SECONDS = 2.0  # after an early answer, how long unread request bytes are drained
_LINGER_BYTES = 4 * MAX_BODY  # and how many, at most
_CLOSE_WAIT_SECONDS = 1.0  # how long close() waits for connection threads to finish
_BUSY_BODY = b'{"error": "too many connections"}'
_BUSY = (
    b"HTTP/1.0 429 Too Many Requests\r\nServer: syncd\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)
_BIND_FAILURES = {
    errno.EADDRINUSE: "address already in use",
    errno.EADDRNOTAVAIL: "no such address on this host",
    errno.EACCES: "permission denied (a port below 1024 needs CAP_NET_BIND_SERVICE)",
    errno.EAFNOSUPPORT: "this host has no IPv6",
}


def signature(secret: bytes, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` value for ``body``: ``sha256=`` and the hex HMAC-SHA256 keyed by
    ``secret``, as GitHub, Gitea and Bitbucket compute it."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def credential(secret: bytes, tokens: list[str], signatures: list[str], body: bytes) -> str | None:
    """Which credential authenticates a trigger (``"gitlab-token"`` or ``"hmac-sha256"``), or None.

    ``tokens`` and ``signatures`` are the values of every ``X-Gitlab-Token`` and ``X-Hub-Signature-256``
    header received (as http.client decodes them, ISO-8859-1). None unless at least one is present, each
    header appears at most once and every one present is right. Comparisons are on bytes, in constant
    time."""
    if not (tokens or signatures) or len(tokens) > 1 or len(signatures) > 1:
        return None
    right = True
    for value in tokens:
        right &= hmac.compare_digest(_raw(value), secret)
    for value in signatures:
        right &= hmac.compare_digest(_raw(value), signature(secret, body).encode("ascii"))
    if not right:
        return None
    return "hmac-sha256" if signatures else "gitlab-token"


def _raw(value: str) -> bytes:
    """A header value's bytes as received, without the blanks around it (not part of it in HTTP)."""
    return value.strip(" \t").encode("latin-1")


def _error(text: str) -> bytes:
    return json.dumps({"error": text}).encode()


def shown(address: tuple[str, int]) -> str:
    """``127.0.0.1:9847`` or ``[::1]:9847``."""
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _DeadlineReader(io.RawIOBase):
    """Reads from a socket until ``deadline`` (time.monotonic()), however the client paces its bytes;
    past it, TimeoutError."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class _App:
    """What the routes answer with: the callables, the secret's bytes, and which route takes which method."""

    def __init__(
        self,
        health: Callable[[], tuple[int, bytes]],
        metrics: Callable[[], bytes],
        trigger: Callable[[], str] | None,
        secret: Secret | None,
    ) -> None:
        self.health = health
        self.metrics = metrics
        self.trigger = trigger if secret is not None else None
        self.secret = secret.reveal().encode("ascii") if secret is not None and trigger else b""
        self.routes = {"/healthz": "GET", "/metrics": "GET"}
        if self.trigger is not None:
            self.routes["/trigger"] = "POST"


class _Handler(http.server.BaseHTTPRequestHandler):
    """One connection, one request: route it, answer with a fixed body, close."""

    server: _Server
    server_version = "syncd"
    sys_version = ""
    protocol_version = "HTTP/1.0"  # one request per connection: its deadline is the request's
    default_request_version = "HTTP/1.0"  # so that even an answer to a garbled request line has a status

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the stdlib's reader: replaced by one with a deadline for the whole request
        self.reader = _DeadlineReader(self.connection, time.monotonic() + self.server.connection_timeout)
        self.rfile = io.BufferedReader(self.reader)
        self.unread = False  # whether the client may still be sending a body we did not read

    def handle(self) -> None:
        super().handle()
        if self.unread:
            self._linger()

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the stdlib's line per request on stderr; the few events worth logging are our own."""

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Answer a malformed request with a fixed body (the stdlib's page quotes the request line)."""
        self.close_connection = True
        self._send(code, _error(HTTPStatus(code).phrase.lower()))

    def _dispatch(self) -> None:
        length = self._length()
        self.unread = length != 0
        app = self.server.app
        path = self.path.partition("?")[0]
        method = app.routes.get(path)
        if method is None:
            self._send(404, _error("not found"))
        elif self.command != method:
            self._send(405, _error("method not allowed"), allow=method)
        elif path == "/healthz":
            self._call(lambda: (*app.health(), JSON))
        elif path == "/metrics":
            self._call(lambda: (200, app.metrics(), CONTENT_TYPE_LATEST))
        else:
            self._trigger(app, length)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    def _trigger(self, app: _App, length: int | None) -> None:
        tokens = self.headers.get_all("X-Gitlab-Token") or []
        signatures = self.headers.get_all("X-Hub-Signature-256") or []
        if not tokens and not signatures:
            return self._refuse(401, "missing credential")
        if "Transfer-Encoding" in self.headers:
            return self._refuse(411, "chunked body")
        if length is None:
            return self._refuse(400, "bad content-length")
        if length > MAX_BODY:
            return self._refuse(413, "body too large")
        body = self.rfile.read(length)
        if len(body) < length:
            return  # the client closed before sending its whole body: nobody to answer
        self.unread = False
        kind = credential(app.secret, tokens, signatures, body)
        if kind is None:
            return self._refuse(403, "wrong credential")
        start = app.trigger

        def accept() -> tuple[int, bytes, str]:
            if start is None:  # cannot happen: the route exists only with a trigger
                raise RuntimeError("no trigger")
            when = start()
            log.info("trigger_accepted", remote=self.client_address[0], credential=kind, when=when)
            return 202, json.dumps({"pass": when}).encode(), JSON

        self._call(accept)

    def _length(self) -> int | None:
        """The request body's length: 0 without Content-Length or Transfer-Encoding (RFC 9112 6.3), None
        when it is chunked or the header is not one decimal number."""
        if "Transfer-Encoding" in self.headers:
            return None
        values = self.headers.get_all("Content-Length") or ["0"]
        text = values[0].strip(" \t")
        if len(values) > 1 or not (text.isascii() and text.isdigit()) or len(text) > 18:
            return None
        return int(text)

    def _refuse(self, status: int, reason: str) -> None:
        log.warning("trigger_refused", remote=self.client_address[0], reason=reason, status=status)
        self._send(status, _error(reason))

    def _call(self, answer: Callable[[], tuple[int, bytes, str]]) -> None:
        """Send what a callback into syncd answers (status, body, content type); its exception is a 500
        and one ``http_error`` event with the exception's type only."""
        try:
            status, body, content_type = answer()
        except Exception as exc:
            log.error("http_error", path=self.path.partition("?")[0], error_type=type(exc).__name__)
            status, body, content_type = 500, _error("internal error"), JSON
        self._send(status, body, content_type)

    def _send(self, status: int, body: bytes, content_type: str = JSON, allow: str = "") -> None:
        self.connection.settimeout(self.server.connection_timeout)  # sendall: the whole answer in one
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if allow:
            self.send_header("Allow", allow)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _linger(self) -> None:
        """After an answer sent before the body was read, drop what the client still sends (bounded in
        time and bytes): closing with unread bytes would reset the connection, and the client could lose
        the answer (a 413 or 401) before reading it."""
        self.reader.deadline = min(self.reader.deadline, time.monotonic() + _LINGER_SECONDS)
        left = _LINGER_BYTES
        try:
            self.connection.shutdown(socket.SHUT_WR)
            while left > 0:
                chunk = self.rfile.read1(65536)
                if not chunk:
                    return
                left -= len(chunk)
        except OSError:
            return


class _Server(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with a bound on connections, IPv6, no DNS at bind, and a close that drops
    the connections still open."""

    daemon_threads = True
    block_on_close = False  # close() waits, briefly, itself
    request_queue_size = 32

    def __init__(self, address: tuple[str, int], app: _App, timeout: float, max_connections: int) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.app = app
        self.connection_timeout = timeout
        self.slots = threading.BoundedSemaphore(max_connections)
        self.active: set[socket.socket] = set()
        self.changed = threading.Condition()
        super().__init__(address, _Handler, bind_and_activate=False)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:  # "::" means IPv6 only, not IPv4 as well
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        socketserver.TCPServer.server_bind(self)  # not HTTPServer's: it does a reverse DNS lookup
        host, port = self.socket.getsockname()[:2]
        self.server_name, self.server_port = host, port

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self._turn_away(request)
            return
        with self.changed:
            self.active.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.changed:
            if request in self.active:
                self.active.discard(request)
                self.slots.release()
                self.changed.notify_all()
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away or timed out is not news; anything else is one event, type only."""
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            log.error("http_error", error_type=type(exc).__name__)

    def drop_connections(self, wait: float) -> None:
        """Shut down every open connection (a blocked read returns at once), then wait up to ``wait``
        seconds for their threads to finish."""
        with self.changed:
            for sock in self.active:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self.changed.wait_for(lambda: not self.active, timeout=wait)

    @staticmethod
    def _turn_away(request: socket.socket) -> None:
        """One connection too many: a fixed 429 if the socket takes it at once, then close."""
        try:
            request.setblocking(False)
            request.send(_BUSY)
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        request.close()


class Listener:
    """syncd's HTTP listener: ``GET /healthz``, ``GET /metrics`` and, with both ``trigger`` and
    ``secret``, ``POST /trigger``.

    ``health`` returns the status (200 or 503) and JSON body of ``/healthz``; ``metrics`` the Prometheus
    text of ``/metrics``; ``trigger`` starts a pass and says when (``"now"`` or ``"after the running
    pass"``). They are called on the connection threads, several at once, and must be thread-safe and
    quick. ``timeout`` bounds each connection (see the module docstring); ``max_connections`` how many are
    served at once."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        health: Callable[[], tuple[int, bytes]],
        metrics: Callable[[], bytes],
        trigger: Callable[[], str] | None,
        secret: Secret | None,
        timeout: float = 10.0,
        max_connections: int = 16,
    ) -> None:
        self.address = address
        self._app = _App(health, metrics, trigger, secret)
        self._timeout = timeout
        self._max_connections = max_connections
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._bound: tuple[str, int] | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Bind and listen on exactly ``address``, then serve on a daemon thread.

        Raises ListenError (naming the address, in syncd's words) when the address cannot be bound, and
        RuntimeError when called twice."""
        with self._lock:
            if self._bound is not None:
                raise RuntimeError("Listener.start() called twice")
            where = shown(self.address)
            try:
                server = _Server(self.address, self._app, self._timeout, self._max_connections)
            except OSError as exc:
                raise ListenError(f"cannot listen on {where}: {_why(exc)}", address=where) from None
            try:
                server.server_bind()
                server.server_activate()
            except OSError as exc:
                server.server_close()
                raise ListenError(f"cannot listen on {where}: {_why(exc)}", address=where) from None
            self._bound = (server.server_name, server.server_port)
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="syncd-httpd", daemon=True
            )
            self._thread.start()

    @property
    def bound(self) -> tuple[str, int]:
        """The address actually bound (a configured port 0 becomes the real port); RuntimeError before
        start()."""
        if self._bound is None:
            raise RuntimeError("Listener not started")
        return self._bound

    def close(self) -> None:
        """Stop accepting, free the port, drop open connections and wait for their threads (about a
        second at most). Idempotent; a no-op before start()."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None or thread is None:
            return
        server.shutdown()  # serve_forever returns within one poll interval
        server.server_close()
        server.drop_connections(_CLOSE_WAIT_SECONDS)
        thread.join(_CLOSE_WAIT_SECONDS)


def _why(exc: OSError) -> str:
    """Why a bind failed, in our words (the library's text is not shown)."""
    if isinstance(exc, socket.gaierror):
        return "not an IP address"
    if exc.errno in _BIND_FAILURES:
        return _BIND_FAILURES[exc.errno]
    return f"error {errno.errorcode.get(exc.errno or 0, exc.errno)}"
