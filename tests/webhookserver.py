"""A real HTTP(S) webhook receiver on 127.0.0.1 for testing syncd's JSON notifications.

Plain Python (no pytest import), like :mod:`servers`.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from servers import STOP_TIMEOUT, Stoppable, TestCA, nonblocking_accept, wait_for_count

__all__ = ["Hit", "WebhookReceiver"]

MAX_BODY = 16 * 1024 * 1024


@dataclass
class Hit:
    """One request the receiver got."""

    method: str
    path: str  # as sent, with any query string
    headers: dict[str, str]  # lower-case names
    body: bytes  # de-chunked if it came with Transfer-Encoding: chunked

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that hangs up, times out or rejects our certificate is part of the tests
        pass


class WebhookReceiver(Stoppable):
    """ThreadingHTTPServer on 127.0.0.1 (in a thread) recording every request in :attr:`hits`.

    Every method and path is answered: ``status`` (default 200, with a small JSON body), or 307 with
    ``Location: redirect_to`` when that is set; ``delay`` seconds are slept first (the hit is recorded
    before the delay). ``status``, ``redirect_to`` and ``delay`` may be changed while running.
    ``tls=ca`` serves HTTPS with the CA's server certificate for 127.0.0.1. Responses are HTTP/1.0,
    so each connection closes after one response.
    """

    def __init__(
        self,
        *,
        status: int = 200,
        redirect_to: str | None = None,
        delay: float = 0,
        tls: TestCA | None = None,
    ) -> None:
        self.status = status
        self.redirect_to = redirect_to
        self.delay = delay
        self._lock = threading.Lock()
        self._hits: list[Hit] = []
        self._stop = threading.Event()
        self._stopped = False
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        nonblocking_accept(self._server)
        if tls is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(tls.server_cert), str(tls.server_key))
            # handshake lazily in the handler thread, so a stuck client cannot block accept()
            self._server.socket = ctx.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self.scheme = "https" if tls is not None else "http"
        self.port: int = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"WebhookReceiver:{self.port}",
            daemon=True,
        )
        self._thread.start()

    # -- public API
    def url(self, path: str = "/hook") -> str:
        """The full URL of ``path`` on this receiver."""
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    @property
    def hits(self) -> list[Hit]:
        """Snapshot of the requests received so far, oldest first."""
        with self._lock:
            return list(self._hits)

    def wait_for(self, n: int = 1, timeout: float = 10) -> list[Hit]:
        """Wait until at least ``n`` requests arrived and return them; AssertionError after ``timeout``."""
        return wait_for_count(
            lambda: self.hits,
            n,
            timeout,
            lambda got: f"webhook {self.url('')}: {[(h.method, h.path, h.body[:200]) for h in got]}",
        )

    def clear(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._hits.clear()

    def stop(self) -> None:
        """Stop serving, wake delayed answers and close the socket (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=STOP_TIMEOUT)

    # -- internals
    def _record(self, hit: Hit) -> None:
        with self._lock:
            self._hits.append(hit)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "syncd-webhook-test/1"
            protocol_version = "HTTP/1.0"
            timeout = 10  # a client that never sends its request is dropped

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks: list[bytes] = []
                    while True:
                        size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(min(length, MAX_BODY)) if length > 0 else b""

            def _answer(self) -> None:
                body = self._read_body()
                owner._record(
                    Hit(
                        method=self.command,
                        path=self.path,
                        headers={k.lower(): v for k, v in self.headers.items()},
                        body=body,
                    )
                )
                if owner.delay > 0 and owner._stop.wait(owner.delay):
                    return  # stopped while delaying: hang up without an answer
                redirect, status = owner.redirect_to, owner.status
                if redirect is not None:
                    status, payload = 307, b""
                else:
                    payload = json.dumps({"status": status}).encode() + b"\n"
                with contextlib.suppress(OSError):
                    self.send_response(status)
                    if redirect is not None:
                        self.send_header("Location", redirect)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _answer

            def finish(self) -> None:
                with contextlib.suppress(OSError):  # the client may have hung up (e.g. its timeout)
                    super().finish()

        return Handler
