"""A raw-socket HTTP server on 127.0.0.1 that answers exactly as scripted, however wrong that is.

``HostileServer`` serves *good* routes correctly (Content-Length, ETag, ``Range: bytes=N-``) and
*scripted* routes from a list of :class:`Reply` (one per request, the last repeated): any status line and
reason phrase, any header bytes (duplicated, malformed, non-ASCII, control characters), 1xx responses
before the final one (or endless), header lines sent slowly, bodies framed by Content-Length, chunked
(with extensions, trailers, slow framing) or by closing, cut short, padded or replaced by garbage.

Every wait is bounded and ends when the server stops; the server records each request's path and
headers (to check that credentials went only where they may). Plain Python: no pytest import.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

MAX_SLOW = 30.0  # no scripted slowness lasts longer than this, whatever the script says


@dataclass
class Reply:
    """One scripted answer. ``body`` is sent as given; ``framing`` is "length" (Content-Length of the
    body, unless ``headers`` carry their own), "chunked" or "close" (no length; the connection closes)."""

    status: bytes = b"200"
    reason: bytes = b"OK"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    framing: str = "length"
    informational: int = 0  # 1xx responses sent before the final one
    endless_1xx: bool = False  # keep sending 100 Continue until the client goes away (bounded by MAX_SLOW)
    line_delay: float = 0.0  # seconds between header lines
    cut_at: int | None = None  # close after this many body bytes
    chunk_size: int = 16384
    chunk_ext: bytes = b""  # appended to every chunk-size line (";" included by the script)
    trailers: list[bytes] = field(default_factory=list)
    framing_delay: float = 0.0  # seconds between chunked framing pieces (chunk-size lines, trailers)
    body_delay: float = 0.0  # seconds between body pieces of ``chunk_size`` bytes
    raw: bytes | None = None  # send exactly these bytes instead of a response, then close


@dataclass
class Seen:
    """One request as the server read it."""

    path: str  # without the query
    target: str  # as requested
    headers: dict[str, str]
    raw_head: bytes


class HostileServer:
    """A threaded raw HTTP/1.1 server; ``url`` is ``http://127.0.0.1:PORT``."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = int(self._sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._good: dict[str, bytes] = {}
        self._scripts: dict[str, list[Reply]] = {}
        self._counts: dict[str, int] = {}
        self.seen: list[Seen] = []
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._loop, name=f"hostile-{self.port}", daemon=True)
        self._accept.start()

    # configuration -------------------------------------------------------------------------------

    def good(self, path: str, body: bytes) -> None:
        """Serve ``body`` at ``path`` correctly (with an ETag and Range support)."""
        with self._lock:
            self._good[path] = body

    def script(self, path: str, replies: list[Reply]) -> None:
        """Answer the n-th request for ``path`` with ``replies[n]`` (the last one from then on)."""
        with self._lock:
            self._scripts[path] = list(replies)
            self._counts[path] = 0

    def reset(self) -> None:
        """Forget recorded requests (routes stay)."""
        with self._lock:
            self.seen = []

    # lifecycle -----------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.close()
        self._accept.join(timeout=5)
        for t in list(self._threads):
            t.join(timeout=MAX_SLOW + 5)

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # serving -------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._sock], [], [], 0.2)
                if not ready:
                    continue
                conn, _ = self._sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            with contextlib.suppress(OSError):
                for _ in range(20):  # keep-alive: a bounded number of requests per connection
                    head = self._read_head(conn)
                    if head is None:
                        return
                    seen = _parse(head)
                    with self._lock:
                        self.seen.append(seen)
                        reply = self._next(seen.path)
                    if reply is None:
                        if not self._send_good(conn, seen):
                            return
                        continue
                    self._send(conn, reply)
                    return  # after a scripted reply the connection always closes

    def _read_head(self, conn: socket.socket) -> bytes | None:
        data = b""
        deadline = time.monotonic() + 10
        while b"\r\n\r\n" not in data:
            if self._stop.is_set() or time.monotonic() > deadline or len(data) > 65536:
                return None
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def _next(self, path: str) -> Reply | None:
        replies = self._scripts.get(path)
        if replies is None:
            return None
        n = self._counts[path]
        self._counts[path] = n + 1
        return replies[min(n, len(replies) - 1)]

    def _send_good(self, conn: socket.socket, seen: Seen) -> bool:
        with self._lock:
            body = self._good.get(seen.path)
        if body is None:
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return False
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        status, extra = b"200 OK", b""
        m = re.fullmatch(r"bytes=(\d+)-", seen.headers.get("range", ""))
        if m and seen.headers.get("if-range") == etag and int(m.group(1)) < len(body):
            start = int(m.group(1))
            extra = f"Content-Range: bytes {start}-{len(body) - 1}/{len(body)}\r\n".encode()
            status, body = b"206 Partial Content", body[start:]
        conn.sendall(
            b"HTTP/1.1 "
            + status
            + b"\r\n"
            + f"Content-Length: {len(body)}\r\nETag: {etag}\r\n".encode()
            + extra
            + b"\r\n"
            + body
        )
        return True

    def _send(self, conn: socket.socket, r: Reply) -> None:
        if r.raw is not None:
            conn.sendall(r.raw)
            return
        for _ in range(r.informational):
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if r.endless_1xx:
            end = time.monotonic() + MAX_SLOW
            while time.monotonic() < end and not self._stop.is_set():
                conn.sendall(b"HTTP/1.1 102 Processing\r\n\r\n")
                self._pause(0.05)
            return
        lines = [b"HTTP/1.1 " + r.status + b" " + r.reason]
        lines += [name + b": " + value for name, value in r.headers]
        names = {name.strip().lower() for name, _ in r.headers}
        if r.framing == "length" and b"content-length" not in names:
            lines.append(b"Content-Length: " + str(len(r.body)).encode())
        if r.framing == "chunked" and b"transfer-encoding" not in names:
            lines.append(b"Transfer-Encoding: chunked")
        lines.append(b"Connection: close")
        for line in lines:
            conn.sendall(line + b"\r\n")
            self._pause(r.line_delay)
        conn.sendall(b"\r\n")
        body = r.body if r.cut_at is None else r.body[: r.cut_at]
        if r.framing == "chunked":
            self._send_chunked(conn, r, body)
        else:
            for i in range(0, len(body), max(r.chunk_size, 1)):
                conn.sendall(body[i : i + r.chunk_size])
                self._pause(r.body_delay)
        if r.cut_at is not None:
            conn.shutdown(socket.SHUT_RDWR)

    def _send_chunked(self, conn: socket.socket, r: Reply, body: bytes) -> None:
        step = max(r.chunk_size, 1)
        for i in range(0, len(body), step):
            piece = body[i : i + step]
            conn.sendall(f"{len(piece):x}".encode() + r.chunk_ext + b"\r\n")
            self._pause(r.framing_delay)
            conn.sendall(piece + b"\r\n")
            self._pause(r.body_delay)
        if r.cut_at is not None:
            return
        conn.sendall(b"0" + r.chunk_ext + b"\r\n")
        for trailer in r.trailers:
            self._pause(r.framing_delay)
            conn.sendall(trailer + b"\r\n")
        conn.sendall(b"\r\n")

    def _pause(self, seconds: float) -> None:
        if seconds > 0:
            self._stop.wait(min(seconds, MAX_SLOW))


def _parse(head: bytes) -> Seen:
    text = head.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    target = parts[1] if len(parts) > 1 else ""
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Seen(target.split("?", 1)[0], target, headers, head)
