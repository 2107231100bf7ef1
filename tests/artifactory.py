"""A local stand-in for Artifactory's storage API, on a real HTTP server on 127.0.0.1.

It serves the files under ``root`` (the real nginx's root, so syncd downloads the same bytes from
nginx) as JFrog documents the API:

- ``GET /artifactory/api/storage/{repo}/{path}``: a file's info (``size`` as a string, ``checksums``
  with ``sha1``, ``md5`` and ``sha256``), or a folder's (``children``); ``404`` with JFrog's error body.
- ``GET /artifactory/api/storage/{repo}/{folder}?list&deep=1``: every file below it (``files[].uri``
  relative to the folder, ``size`` a number, ``sha1`` only: no sha256, as the real API).
- ``GET /artifactory/{repo}/{path}``: a ``302`` to the file on nginx's ``/open/`` location (another
  origin, as Artifactory redirects to its storage), so credentials must not follow.

Every request needs ``Authorization: Bearer <token>`` (401 otherwise) and is recorded. ``no_sha256``
names sources whose info lacks ``checksums.sha256`` (old artifacts); ``answers`` overrides the answer for
an API path (``repo/path``, or ``repo/path?list`` for its listing): a hostile or broken server.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from servers import Stoppable, nonblocking_accept

PREFIX = "/artifactory"
API = PREFIX + "/api/storage/"


@dataclass
class StorageApi(Stoppable):
    """The stand-in; ``url`` is the Artifactory base URL (``http://127.0.0.1:PORT/artifactory``)."""

    root: Path
    redirect_base: str  # where downloads are redirected: nginx's /open/ location
    token: str = "art-" + "0123456789abcdef" * 2
    no_sha256: set[str] = field(default_factory=set)
    answers: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path?query, Authorization)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._sums: dict[tuple[str, int, int], dict[str, str]] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        nonblocking_accept(self._server)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PREFIX}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def api_requests(self) -> list[str]:
        with self._lock:
            return [p for p, _ in self.requests if p.startswith(API)]

    def _record(self, path: str, auth: str | None) -> None:
        with self._lock:
            self.requests.append((path, auth))

    def _info(self, rel: str) -> tuple[int, Any]:
        path = self.root / rel
        if not rel or ".." in rel.split("/") or not path.exists():
            return 404, {"errors": [{"status": 404, "message": "Unable to find item"}]}
        repo, _, inner = rel.partition("/")
        stamp = datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat()
        base = {
            "repo": repo,
            "path": "/" + inner,
            "created": stamp,
            "lastModified": stamp,
            "uri": f"{self.url}/api/storage/{rel}",
        }
        if path.is_dir():
            children = [{"uri": "/" + c.name, "folder": c.is_dir()} for c in sorted(path.iterdir())]
            return 200, {**base, "children": children}
        sums, size = self._checksums(path)
        if rel in self.no_sha256:
            sums = {k: v for k, v in sums.items() if k != "sha256"}
        return 200, {
            **base,
            "downloadUri": f"{self.url}/{rel}",
            "mimeType": "application/octet-stream",
            "size": str(size),
            "checksums": sums,
            "originalChecksums": dict(sums),
        }

    def _checksums(self, path: Path) -> tuple[dict[str, str], int]:
        """The file's checksums, computed once per (path, size, mtime): Artifactory stores them, so the
        stand-in should not make each info request cost a hash of the file."""
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._sums.get(key)
        if hit is None:
            data = path.read_bytes()
            hit = {
                "sha1": hashlib.sha1(data).hexdigest(),  # noqa: S324 - Artifactory's field, not security
                "md5": hashlib.md5(data).hexdigest(),  # noqa: S324
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            with self._lock:
                self._sums[key] = hit
        return dict(hit), st.st_size

    def _list(self, rel: str) -> tuple[int, Any]:
        top = self.root / rel
        if not top.is_dir():
            return 400, {"errors": [{"status": 400, "message": "Expected a folder"}]}
        files = []
        for p in sorted(top.rglob("*")):
            if p.is_file():
                sums, size = self._checksums(p)
                files.append(
                    {
                        "uri": "/" + str(p.relative_to(top)),
                        "size": size,
                        "lastModified": datetime.fromtimestamp(p.stat().st_mtime, UTC).isoformat(),
                        "folder": False,
                        "sha1": sums["sha1"],
                    }
                )
        return 200, {"uri": f"{self.url}/api/storage/{rel}", "created": "", "files": files}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm and the
                # client's delayed ACK hold the body back ~40 ms per request on a kept-alive connection.
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                auth = self.headers.get("Authorization")
                api._record(self.path, auth)
                parts = urlsplit(self.path)
                path = unquote(parts.path)
                if auth != f"Bearer {api.token}":
                    self._send(401, {"errors": [{"status": 401, "message": "Bad credentials"}]})
                elif path.startswith(API):
                    rel = path[len(API) :].strip("/")
                    key = rel + "?list" if parts.query.startswith("list") else rel
                    if key in api.answers:
                        status, body = api.answers[key]
                        self._raw(status, body)
                    elif parts.query.startswith("list"):
                        self._send(*api._list(rel))
                    else:
                        self._send(*api._info(rel))
                elif path.startswith(PREFIX + "/"):
                    self.send_response(302)
                    self.send_header("Location", f"{api.redirect_base}/{parts.path[len(PREFIX) + 1 :]}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._send(404, {"errors": [{"status": 404, "message": "Not Found"}]})

            def _send(self, status: int, body: Any) -> None:
                self._raw(
                    status, json.dumps(body).encode(), "application/vnd.org.jfrog.artifactory.storage+json"
                )

            def _raw(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
