"""The wire under :class:`syncd.fetch.Fetcher`: sockets behind httpcore's network-backend interface whose
every wait (connect, TLS handshake, read) obeys a per-request time bound (:class:`Watch`), the URL helpers
every message uses, and the one place that turns httpx / httpcore / h11 / ssl / OS exceptions into
syncd's own words (:func:`translate`). The HTTP/1.1 exchanges on these sockets are
:mod:`syncd.fetch.http11`. Name resolution (``getaddrinfo``) is the one wait that is not sliced.

Part of :mod:`syncd.fetch`, the only package that imports httpx, h11 and httpcore.
"""

from __future__ import annotations

import errno
import math
import os
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpcore
import httpx

from syncd.errors import FetchError, StopRequested, SyncdError
from syncd.segments import Aborted

MIN_SPEED = 1024  # bytes/s of payload, over a whole [download] timeout window: slower is a stalled server
STOP_SLICE = 1.0  # longest single socket wait, so that a stop request is seen within about a second
READ_SIZE = 256 << 10  # most bytes taken from a socket at once (bigger: more memory, little faster)
_E = TypeVar("_E", bound=BaseException)
_T = TypeVar("_T")


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) with the default port filled in, to compare origins.

    Raises ValueError for a port that is not a number in 0-65535."""
    p = urlsplit(url)
    port = p.port or (443 if p.scheme == "https" else 80)
    return p.scheme.lower(), (p.hostname or "").lower(), port


def redact(url: str) -> str:
    """The URL without query, fragment or userinfo: safe for logs and messages (never raises)."""
    p = urlsplit(url)
    host = p.hostname or ""
    try:
        port = p.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((p.scheme, netloc, p.path, "", ""))


def host_of(url: str) -> str:
    """``host[:port]`` of ``url``, escaped for a message (server-chosen text: ASCII, bounded)."""
    p = urlsplit(url)
    try:
        port = p.port
    except ValueError:
        port = None
    host = p.hostname or "?"
    return shown(f"{host}:{port}" if port else host, quote=False)


def shown(text: str, limit: int = 64, *, quote: bool = True) -> str:
    """Untrusted text made safe to print: ASCII only, control characters escaped, at most ``limit``
    characters of it (``...`` says it was cut). ``quote`` wraps it like ``repr``."""
    cut = text[:limit]
    out = ascii(cut) if quote else ascii(cut)[1:-1]
    return out + ("..." if len(text) > limit else "")


# time bounds ---------------------------------------------------------------------------------------


class Watch:
    """The bounds on the request this thread is making, checked before and during every socket wait.

    - head: from the start of a request (connect included) until its final response head has arrived,
      at most one ``timeout``, however many ``1xx`` responses or slow header lines the server sends;
    - body: at least ``MIN_SPEED`` bytes/s of payload over each ``timeout`` window; framing (chunk-size
      lines, extensions, trailers) is not payload, so a server sending only framing is cut off too;
    - stop: a set ``stop`` event ends the request at the next check (within ``STOP_SLICE``).
    """

    current = threading.local()  # .watch: the Watch of the request this thread is making, if any

    def __init__(
        self,
        timeout: float,
        stop: threading.Event | None,
        url: str,
        *,
        halted: Callable[[], bool] | None = None,
    ) -> None:
        self.timeout = timeout
        self.stop = stop
        self.halted = halted  # a segmented download's other worker failed: raise Aborted at the next check
        self.url = url  # the original URL: every message names it
        self.target = url  # where the current request goes (after redirects)
        self.hops = 0
        self.phase = "connect"
        self.deadline = math.inf
        self.window = 0.0
        self.bytes = 0

    def head(self, target: str) -> None:
        """A request to ``target`` starts now (the first, or one after a redirect)."""
        self.target, self.phase = target, "head"
        self.deadline = time.monotonic() + self.timeout

    def body(self) -> None:
        """The final response head is in; the body starts."""
        self.phase, self.deadline = "body", math.inf
        self.window, self.bytes = time.monotonic(), 0

    def payload(self, n: int) -> None:
        self.bytes += n
        self.check()

    def check(self) -> None:
        """Raise if syncd is stopping, the head is late, or the body too slow."""
        if self.halted is not None and self.halted():
            raise Aborted
        if self.stop is not None and self.stop.is_set():
            raise StopRequested(
                f"stopping: download from {redact(self.url)} interrupted (partial kept for resume)",
                url=redact(self.url),
            )
        now = time.monotonic()
        if now >= self.deadline:
            raise failure(f"timeout: no complete response head within {self.timeout:g} s", self)
        if self.phase != "body":
            return
        elapsed = now - self.window
        if elapsed < self.timeout:
            return
        if self.bytes < MIN_SPEED * elapsed:
            raise failure(
                f"download too slow: {self.bytes} bytes in {elapsed:.0f} s "
                f"(less than {MIN_SPEED // 1024} KiB/s)",
                self,
            )
        self.window, self.bytes = now, 0

    def wait(self, timeout: float | None) -> float:
        """How long one socket wait may last: the caller's ``timeout``, cut to the head's deadline, the
        body's speed window and ``STOP_SLICE``."""
        now = time.monotonic()
        limit = min(timeout if timeout is not None else math.inf, self.deadline - now, STOP_SLICE)
        if self.phase == "body":
            limit = min(limit, self.window + self.timeout - now)
        return max(limit, 0.001)

    def bound(self, timeout: float | None) -> float | None:
        """The caller's ``timeout`` for one operation that cannot be sliced (connect, TLS handshake, a
        write), cut to the head's deadline."""
        if math.isinf(self.deadline):
            return timeout
        left = max(self.deadline - time.monotonic(), 0.001)
        return left if timeout is None else min(timeout, left)

    def after(self) -> str:
        """`` (after N redirect(s), to HOST)`` once a redirect was followed, else ``""``."""
        if not self.hops:
            return ""
        return f" (after {self.hops} redirect(s), to {host_of(self.target)})"


def watching() -> Watch | None:
    watch: Watch | None = getattr(Watch.current, "watch", None)
    return watch


class Stream(httpcore.NetworkStream):
    """A socket stream whose every wait obeys the thread's :class:`Watch`."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        # httpcore asks for 64 KiB at a time; taking what the socket holds, up to READ_SIZE, costs one
        # parser step and one write per 256 KiB instead of four (h11 buffers whatever comes past a head).
        max_bytes = max(max_bytes, READ_SIZE)
        watch = watching()
        if watch is None:
            return self._inner.read(max_bytes, timeout)
        end = time.monotonic() + (timeout if timeout is not None else math.inf)
        while True:
            watch.check()
            left = end - time.monotonic()
            if left <= 0:
                raise httpcore.ReadTimeout("read timed out")
            try:
                return self._inner.read(max_bytes, watch.wait(left))
            except httpcore.ReadTimeout:
                continue  # one slice ended without data: check the bounds, then wait again

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        watch = watching()
        if watch is not None:
            watch.check()
            timeout = watch.bound(timeout)
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        """The TLS handshake, in waits of at most ``STOP_SLICE`` (the handshake resumes after each), so
        that a stop or the head's deadline ends a server that never answers it."""
        watch = watching()
        if watch is not None:
            watch.check()
        sock = self._inner.get_extra_info("socket")
        end = _until(timeout, watch)
        try:
            tls = ssl_context.wrap_socket(
                sock, server_hostname=server_hostname, do_handshake_on_connect=False
            )
            while True:
                tls.settimeout(_slice(end, watch))
                try:
                    tls.do_handshake()
                    break
                except TimeoutError:
                    continue  # one slice without progress: check the stop and the deadline, go on
        except OSError as exc:  # ssl.SSLError included
            sock.close()
            raise httpcore.ConnectError("TLS handshake failed") from exc
        except BaseException:
            sock.close()
            raise
        return Stream(Socket(tls))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


def _until(timeout: float | None, watch: Watch | None) -> float:
    """The monotonic time by which a connect or handshake must be done: its own timeout, cut to the
    head's deadline."""
    own = time.monotonic() + timeout if timeout is not None else math.inf
    return min(own, watch.deadline) if watch is not None else own


def _slice(end: float, watch: Watch | None) -> float:
    """One wait of a connect or handshake: at most ``STOP_SLICE``, after the stop, abort and deadline
    checks. Raises httpcore's ConnectTimeout once ``end`` has passed."""
    now = time.monotonic()
    if now >= end:
        raise httpcore.ConnectTimeout("timed out connecting")
    if watch is not None:
        watch.check()
    return max(min(end - now, STOP_SLICE), 0.001)


class Socket(httpcore.NetworkStream):
    """A connected (plain or TLS) socket as httpcore's stream interface, its errors as httpcore's types
    (httpcore's own sync stream is private to it).

    The socket stays non-blocking: a read or write is tried first and waited for (``poll``, within its
    timeout) only when the kernel or TLS has nothing yet. A socket with a timeout would set its mode
    (``ioctl``) and ``poll`` before every call: two more system calls per read, each a hand-over of the
    GIL between the download threads, on every small file."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock

    def _wait(self, events: int, timeout: float | None, error: type[Exception]) -> None:
        """Until ``events`` on the socket, or raise ``error`` after ``timeout`` seconds (None: no bound)."""
        poller = select.poll()
        poller.register(self._sock, events | select.POLLERR | select.POLLHUP)
        if not poller.poll(None if timeout is None else max(timeout, 0.0) * 1000):
            raise error("timed out")

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        end = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                try:
                    return self._sock.recv(max_bytes)
                except (BlockingIOError, ssl.SSLWantReadError):
                    events = select.POLLIN
                except ssl.SSLWantWriteError:  # TLS renegotiation or a key update wants to write first
                    events = select.POLLOUT
                left = None if end is None else end - time.monotonic()
                self._wait(events, left, httpcore.ReadTimeout)
        except httpcore.ReadTimeout:
            raise
        except OSError as exc:
            raise httpcore.ReadError("read failed") from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        end = None if timeout is None else time.monotonic() + timeout
        view = memoryview(buffer)
        try:
            while view:
                try:
                    sent = self._sock.send(view)
                    view = view[sent:]
                    continue
                except (BlockingIOError, ssl.SSLWantWriteError):
                    events = select.POLLOUT
                except ssl.SSLWantReadError:
                    events = select.POLLIN
                left = None if end is None else end - time.monotonic()
                self._wait(events, left, httpcore.WriteTimeout)
        except httpcore.WriteTimeout:
            raise
        except OSError as exc:
            raise httpcore.WriteError("write failed") from exc

    def close(self) -> None:
        self._sock.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        raise NotImplementedError("Stream.start_tls does the handshake")

    def get_extra_info(self, info: str) -> Any:
        if info == "socket":
            return self._sock
        if info == "is_readable":  # an idle connection with bytes or an EOF waiting: not reusable
            if self._sock.fileno() < 0:
                return True
            poller = select.poll()
            poller.register(self._sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            return bool(poller.poll(0))
        return None


class Backend(httpcore.NetworkBackend):
    """Connections whose every wait obeys the thread's :class:`Watch`, as :class:`Stream`."""

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        """A TCP connection, waited for in slices of at most ``STOP_SLICE`` (like every other wait), so that
        a stop or the head's deadline ends a connect to a host that drops the SYN."""
        watch = watching()
        if watch is not None:
            watch.check()
        end = _until(timeout, watch)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError("name not resolved") from exc
        last: OSError | None = None
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                err = sock.connect_ex(address)
                poller = select.poll()
                poller.register(sock, select.POLLOUT)
                while err in (errno.EINPROGRESS, errno.EALREADY):
                    if poller.poll(_slice(end, watch) * 1000):
                        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
                sock.setblocking(True)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return Stream(Socket(sock))
            except OSError as exc:
                sock.close()
                last = exc
            except BaseException:
                sock.close()
                raise
        raise httpcore.ConnectError("could not connect") from last

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.UnsupportedProtocol("unix sockets are not used")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


# errors --------------------------------------------------------------------------------------------


def failure(what: str, watch: Watch, *, retryable: bool = True) -> FetchError:
    """A FetchError ``WHAT from ORIGINAL-URL (after redirects, to HOST)``."""
    exc = FetchError(f"{what} from {redact(watch.url)}{watch.after()}", url=redact(watch.url))
    exc.retryable = retryable
    return exc


PHASES = {
    "connect": "before sending the request",
    "head": "waiting for the response head",
    "body": "reading the body",
}


def translate(exc: BaseException, watch: Watch) -> FetchError:
    """An httpx / httpcore / h11 / ssl / OS exception as a FetchError of syncd's own words, by type only:
    their text can hold a header value (h11 quotes the whole offending header) or a URL."""
    phase = PHASES.get(watch.phase, "")
    tls = cause(exc, ssl.SSLError)
    if tls is not None:
        reason = getattr(tls, "reason", None)
        detail = (
            f" ({reason})" if isinstance(reason, str) and re.fullmatch(r"[A-Z0-9_]{1,64}", reason) else ""
        )
        return failure(f"TLS error{detail}", watch)
    if isinstance(exc, httpx.ConnectTimeout | httpcore.ConnectTimeout):
        return failure("timed out connecting", watch)
    if isinstance(exc, httpx.ConnectError | httpcore.ConnectError):
        return failure(f"could not connect{errno_name(exc)}", watch)
    if isinstance(exc, httpx.WriteTimeout | httpcore.WriteTimeout):
        return failure("timed out sending the request", watch)
    if isinstance(exc, httpx.TimeoutException | httpcore.TimeoutException):
        return failure(f"timed out {phase}", watch)
    if isinstance(exc, httpx.LocalProtocolError | httpcore.LocalProtocolError):
        return failure(
            "could not send the request (a header value HTTP does not allow)", watch, retryable=False
        )
    if isinstance(exc, httpx.RemoteProtocolError | httpcore.RemoteProtocolError):
        return failure(f"the server broke the HTTP protocol {phase} (malformed or cut off)", watch)
    if isinstance(exc, httpx.NetworkError | httpcore.NetworkError | OSError):
        return failure(f"connection failed {phase}{errno_name(exc)}", watch)
    if isinstance(exc, httpx.UnsupportedProtocol | httpcore.UnsupportedProtocol | httpx.InvalidURL):
        return failure("URL not usable", watch, retryable=False)
    return failure(f"unexpected {type(exc).__name__} {phase}", watch, retryable=False)


def local(call: Callable[[_T], None], arg: _T, url: str) -> None:
    """``call(arg)`` for the sink or the progress callback: their errors are not the network's."""
    try:
        call(arg)
    except SyncdError:
        raise
    except Exception as exc:
        raise unexpected(exc, url) from None


def unexpected(exc: BaseException, url: str) -> FetchError:
    err = FetchError(f"unexpected {type(exc).__name__} while downloading {redact(url)}", url=redact(url))
    err.retryable = False
    return err


def cause(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first ``kind`` in ``exc``'s chain of causes and contexts, if any (bounded walk)."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return None
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def errno_name(exc: BaseException) -> str:
    """`` (ECONNREFUSED)`` from the OSError behind ``exc``, or ``""``."""
    os_error = cause(exc, OSError)
    if os_error is None or os_error.errno is None:
        return ""
    name = errno.errorcode.get(os_error.errno)
    return f" ({name})" if name else ""
