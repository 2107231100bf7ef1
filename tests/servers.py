"""Real loopback servers and fixtures-independent helpers for syncd tests.

Everything here is plain Python (no pytest import) so that it can also be used
from scripts. All servers listen on 127.0.0.1 only and are stopped by PID.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit

__all__ = [
    "FaultServer",
    "GitRepo",
    "Nginx",
    "Sshd",
    "free_port",
    "make_asset",
    "start_nginx",
    "start_sshd",
]

SSHD_BIN = "/usr/sbin/sshd"
NGINX_BIN = "/usr/sbin/nginx"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
SESSION_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


# --------------------------------------------------------------------------- utilities


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, raising with its output on failure."""
    proc = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(
            f"command failed ({proc.returncode}): {' '.join(args)}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def _wait_for_port(proc: subprocess.Popen[bytes], port: int, log: Path, what: str) -> None:
    """Wait until `port` accepts connections; raise with the log if it never does."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with status {proc.returncode} before listening on "
                f"127.0.0.1:{port}; log {log}:\n{_read(log)}"
            )
        if _port_open(port):
            return
        time.sleep(0.05)
    _stop_pid(proc.pid, proc, signal.SIGTERM)
    raise RuntimeError(
        f"{what} did not listen on 127.0.0.1:{port} within {START_TIMEOUT}s; log {log}:\n{_read(log)}"
    )


def _listening(port: int) -> bool:
    """Whether any socket listens on 127.0.0.1:``port`` (read from /proc/net/tcp: no connection made)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
            return True
    return False


def _wait_port_free(port: int) -> None:
    """Wait (bounded) until nothing listens on ``port``. A child forked for a connection holds the inherited
    listener for a moment after the master has gone, until the kernel has finished killing it."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while _listening(port) and time.monotonic() < deadline:
        time.sleep(0.02)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # never probe or signal -1 (every process) or 0 (our group)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive: its process is gone, only its exit status waits to be read
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _stop_pid(pid: int, proc: subprocess.Popen[bytes] | None, sig: signal.Signals) -> None:
    """Send `sig` to `pid`, wait for it, and SIGKILL its process group if it lingers.

    The servers are started with ``start_new_session=True``, so their process group id
    equals their PID and the fallback also reaches worker children.
    """
    if proc is not None and proc.poll() is not None:
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT)
    else:
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait(timeout=STOP_TIMEOUT)


# --------------------------------------------------------------------------- sshd


@dataclass
class Sshd:
    """A private OpenSSH server on 127.0.0.1 that serves git repositories as root.

    ``client_key`` is ``workdir/id_ed25519`` (no suffix), so its public half is both
    ``client_key.with_suffix('.pub')`` and ``Path(str(client_key) + '.pub')``.
    """

    port: int
    pid: int
    workdir: Path
    client_key: Path
    known_hosts: Path
    wrong_known_hosts: Path
    repos_dir: Path
    log: Path
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def url(self, repo: str) -> str:
        """``ssh://root@127.0.0.1:PORT/<absolute path of repos_dir/repo>``."""
        path = (self.repos_dir / repo).absolute()
        return f"ssh://root@127.0.0.1:{self.port}{path}"

    def ssh_command(self, known_hosts: Path | None = None) -> str:
        """A ``GIT_SSH_COMMAND`` value using the client key and strict host key checking."""
        kh = known_hosts if known_hosts is not None else self.known_hosts
        return (
            f"ssh -i {self.client_key} -o UserKnownHostsFile={kh} "
            "-o GlobalKnownHostsFile=/dev/null "
            "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes -o BatchMode=yes"
        )

    def stop(self) -> None:
        """Terminate the listening sshd by PID and wait for it and its port (idempotent)."""
        _stop_pid(self.pid, self._proc, signal.SIGTERM)
        _wait_port_free(self.port)


def _keygen(path: Path, comment: str) -> None:
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    path.chmod(0o600)


def start_sshd(workdir: Path) -> Sshd:
    """Start ``sshd -D -e`` with a private config under `workdir` and wait until it listens."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation directory

    host_key = workdir / "ssh_host_ed25519_key"
    client_key = workdir / "id_ed25519"
    wrong_host_key = workdir / "wrong_host_ed25519_key"
    for key, comment in (
        (host_key, "syncd-test-host"),
        (client_key, "syncd-test-client"),
        (wrong_host_key, "syncd-test-wrong-host"),
    ):
        if not key.exists():
            _keygen(key, comment)
    authorized_keys = workdir / "authorized_keys"
    shutil.copyfile(client_key.with_suffix(".pub"), authorized_keys)
    authorized_keys.chmod(0o600)
    repos_dir = workdir / "repos"
    repos_dir.mkdir(exist_ok=True)
    config = workdir / "sshd_config"
    log = workdir / "sshd.log"

    last_error: Exception | None = None
    for _attempt in range(3):  # the free port may be taken in between; retry a few times
        port = free_port()
        config.write_text(
            "\n".join(
                [
                    f"Port {port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {host_key}",
                    f"PidFile {workdir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {authorized_keys}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "UseDNS no",
                    "PrintMotd no",
                    "X11Forwarding no",
                    "MaxStartups 64",
                    "LogLevel VERBOSE",
                    f"SetEnv PATH={SESSION_PATH}",
                    "",
                ]
            )
        )
        _run([SSHD_BIN, "-t", "-f", str(config)])
        with log.open("ab") as log_fh:
            proc = subprocess.Popen(
                [SSHD_BIN, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=log_fh,
                start_new_session=True,
            )
        try:
            _wait_for_port(proc, port, log, "sshd")
        except RuntimeError as exc:
            last_error = exc
            _stop_pid(proc.pid, proc, signal.SIGTERM)
            continue
        break
    else:
        raise RuntimeError(f"could not start sshd: {last_error}")

    server = Sshd(
        port=port,
        pid=proc.pid,
        workdir=workdir,
        client_key=client_key,
        known_hosts=workdir / "known_hosts",
        wrong_known_hosts=workdir / "wrong_known_hosts",
        repos_dir=repos_dir,
        log=log,
        _proc=proc,
    )
    atexit.register(server.stop)
    try:
        scan = _run(["ssh-keyscan", "-p", str(port), "-t", "ed25519", "-T", "5", "127.0.0.1"])
        lines = [ln for ln in scan.stdout.splitlines() if ln and not ln.startswith("#")]
        host_pub = host_key.with_suffix(".pub").read_text().split()[:2]
        expected = f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}"
        if lines != [expected]:
            raise RuntimeError(f"ssh-keyscan gave {lines!r}, expected {[expected]!r}")
        server.known_hosts.write_text(expected + "\n")
        wrong_pub = wrong_host_key.with_suffix(".pub").read_text().split()[:2]
        server.wrong_known_hosts.write_text(f"[127.0.0.1]:{port} {wrong_pub[0]} {wrong_pub[1]}\n")
    except Exception:
        server.stop()
        raise
    return server


# --------------------------------------------------------------------------- nginx


@dataclass
class Nginx:
    """A private nginx on 127.0.0.1 serving `root` under /bearer/, /basic/ and /open/."""

    port: int
    pid: int
    root: Path
    token: str
    user: str
    password: str
    access_log: Path
    error_log: Path
    workdir: Path
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def bearer_url(self) -> str:
        """Location that needs ``Authorization: Bearer <token>`` exactly."""
        return f"{self.base_url}/bearer"

    def basic_url(self) -> str:
        """Location that needs HTTP Basic auth with `user`/`password`."""
        return f"{self.base_url}/basic"

    def open_url(self) -> str:
        """Location without authentication."""
        return f"{self.base_url}/open"

    def stop(self) -> None:
        """Fast-shutdown nginx (SIGTERM to the master) by PID and wait for it and its port (idempotent)."""
        _stop_pid(self.pid, self._proc, signal.SIGTERM)
        _wait_port_free(self.port)


_NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root root;
pid "{workdir}/nginx.pid";
error_log "{error_log}" info;

events {{
    worker_connections 512;
}}

http {{
    default_type application/octet-stream;
    sendfile on;
    server_tokens off;
    log_format syncd_test '$request $status $http_range "$http_if_range"';
    access_log "{access_log}" syncd_test;

    client_body_temp_path "{tmp}/client_body";
    proxy_temp_path "{tmp}/proxy";
    fastcgi_temp_path "{tmp}/fastcgi";
    uwsgi_temp_path "{tmp}/uwsgi";
    scgi_temp_path "{tmp}/scgi";

    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        autoindex off;

        location /bearer/ {{
            if ($http_authorization != "Bearer {token}") {{
                return 401;
            }}
            alias "{root}/";{limit}
        }}

        location /basic/ {{
            auth_basic "syncd-test";
            auth_basic_user_file "{htpasswd}";
            alias "{root}/";{limit}
        }}

        location /open/ {{
            alias "{root}/";{limit}
        }}

        location / {{
            return 404;
        }}
    }}
}}
"""


def launch_nginx(
    workdir: Path, config: Path, error_log: Path, render: Callable[[int], str], what: str
) -> tuple[subprocess.Popen[bytes], int]:
    """Write ``render(port)`` as nginx's config and start nginx on a free port (a few tries, since a
    free port can be taken in between); return the process and the port."""
    last_error: Exception | None = None
    for _attempt in range(3):
        port = free_port()
        config.write_text(render(port))
        base = [NGINX_BIN, "-p", str(workdir), "-e", str(error_log), "-c", str(config)]
        _run([*base, "-t", "-q"])
        with error_log.open("ab") as log_fh:
            proc = subprocess.Popen(
                base, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=log_fh, start_new_session=True
            )
        try:
            _wait_for_port(proc, port, error_log, what)
        except RuntimeError as exc:
            last_error = exc
            _stop_pid(proc.pid, proc, signal.SIGTERM)
            continue
        return proc, port
    raise RuntimeError(f"could not start {what}: {last_error}")


def start_nginx(workdir: Path, *, limit_rate: int | str | None = None) -> Nginx:
    """Start ``nginx -p DIR -c CONF`` (``daemon off``) under `workdir` and wait until it listens.

    ``limit_rate``: when given, each location that serves files gets ``limit_rate N;`` (nginx's per-request,
    so per-connection, cap in bytes/s: an int, or a size string such as ``"50m"``, which nginx reads as
    50 MiB/s). None (the default) leaves the configuration exactly as without it.
    """
    limit = ""
    if limit_rate is not None:
        if isinstance(limit_rate, bool) or not re.fullmatch(r"[1-9][0-9]*[kKmMgG]?", str(limit_rate)):
            raise ValueError(
                f"limit_rate: a positive byte count such as 50000000 or '50m', not {limit_rate!r}"
            )
        limit = f"\n            limit_rate {limit_rate};"
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "root"
    root.mkdir(exist_ok=True)
    tmp = workdir / "tmp"
    tmp.mkdir(exist_ok=True)
    token = "tok" + secrets.token_hex(16)
    user = "user" + secrets.token_hex(4)
    password = "pw" + secrets.token_hex(12)
    htpasswd = workdir / "htpasswd"
    _run(["htpasswd", "-bcB", str(htpasswd), user, password])
    config = workdir / "nginx.conf"
    access_log = workdir / "access.log"
    error_log = workdir / "error.log"

    proc, port = launch_nginx(
        workdir,
        config,
        error_log,
        lambda port: _NGINX_CONF.format(
            workdir=workdir,
            error_log=error_log,
            access_log=access_log,
            tmp=tmp,
            port=port,
            token=token,
            root=root,
            htpasswd=htpasswd,
            limit=limit,
        ),
        "nginx",
    )

    server = Nginx(
        port=port,
        pid=proc.pid,
        root=root,
        token=token,
        user=user,
        password=password,
        access_log=access_log,
        error_log=error_log,
        workdir=workdir,
        _proc=proc,
    )
    atexit.register(server.stop)
    return server


# --------------------------------------------------------------------------- fault server


def nonblocking_accept(server: Any) -> None:
    """Make a socketserver's listening socket non-blocking. Its loop select()s, then accept()s: when the
    pending connection is gone by then (the client gave up), a blocking accept() waits for the next one,
    and shutdown() waits for it forever (seen in CI: a test hung 300 s). Non-blocking, that accept()
    raises, the loop goes on, and shutdown() returns. Accepted sockets are still blocking."""
    server.socket.setblocking(False)


_S = TypeVar("_S", bound="Stoppable")
_T = TypeVar("_T")


class Stoppable:
    """A test server used as ``with Server() as s:``; its ``stop`` runs at the end of the block."""

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def wait_for_count(
    get: Callable[[], list[_T]], n: int, timeout: float, describe: Callable[[list[_T]], str]
) -> list[_T]:
    """Poll ``get()`` until it holds at least ``n`` items and return them; AssertionError naming what
    arrived (``describe``) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = get()
        if len(got) >= n:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"expected {n} within {timeout}s, got {len(got)}: {describe(got)}")
        time.sleep(0.02)


@dataclass(frozen=True)
class _Route:
    status: int
    body: bytes
    headers: dict[str, str]
    redirect: str | None
    delay: float
    send_length: bool = True
    ranges: bool = True
    drip: tuple[int, float] | None = None
    cut_at: int | None = None
    faults: list[tuple[int, dict[str, str]]] = field(default_factory=list)


class FaultServer(Stoppable):
    """A ThreadingHTTPServer on 127.0.0.1 answering registered routes, for faults nginx can't make.

    Only GET and HEAD are routed (other methods get 405); unknown paths get 404.
    Plain 200 body routes honour ``Range: bytes=N-`` / ``bytes=N-M`` with 206 and
    Content-Range; they carry an ETag (as nginx does). A route's ``headers`` are sent verbatim and may
    override Content-Length (e.g. to fake a truncated body). Responses use HTTP/1.0, so the
    connection closes after each response.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._routes: dict[str, _Route] = {}
        self._requests: list[tuple[str, str, dict[str, str]]] = []
        self._cuts: dict[str, int] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        nonblocking_accept(self._server)
        self.port: int = int(self._server.server_address[1])
        self.url: str = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"FaultServer:{self.port}", daemon=True
        )
        self._thread.start()
        self._stopped = False

    # -- public API
    def route(
        self,
        path: str,
        *,
        status: int = 200,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        redirect: str | None = None,
        delay: float = 0.0,
        send_length: bool = True,
        ranges: bool = True,
        drip: tuple[int, float] | None = None,
        cut_at: int | None = None,
        cut_times: int = 0,
        faults: list[tuple[int, dict[str, str]]] | None = None,
    ) -> None:
        """Register the GET/HEAD response for `path` (302 to `redirect`; sleep `delay` s first).

        With ``send_length=False`` no Content-Length is sent: the body ends when the connection closes.
        ``ranges=False`` ignores Range headers (always 200). ``drip=(n, s)`` sends the body n bytes at a
        time with s seconds between. ``cut_at=N`` with ``cut_times=K``: the first K responses stop after
        N body bytes (the connection is closed mid-body). ``faults=[(status, headers), …]``: the first
        requests get these error answers, one each, before the route answers normally.
        """
        with self._lock:
            self._routes[path] = _Route(
                status=302 if redirect is not None and status == 200 else status,
                body=body,
                headers=dict(headers or {}),
                redirect=redirect,
                delay=delay,
                send_length=send_length,
                ranges=ranges,
                drip=drip,
                cut_at=cut_at,
                faults=list(faults or []),
            )
            self._cuts[path] = cut_times

    @property
    def requests(self) -> list[tuple[str, str, dict[str, str]]]:
        """Snapshot of ``(method, path, lowercased headers)`` for every request received."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=STOP_TIMEOUT)

    # -- internals
    def _record(self, method: str, path: str, headers: dict[str, str]) -> None:
        with self._lock:
            self._requests.append((method, path, headers))

    def _lookup(self, path: str) -> _Route | None:
        with self._lock:
            return self._routes.get(path) or self._routes.get(urlsplit(path).path)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "FaultServer/1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _begin(self) -> None:
                owner._record(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})

            def _serve(self, with_body: bool) -> None:
                self._begin()
                route = owner._lookup(self.path)
                if route is None:
                    self._send(404, {}, b"not found\n", with_body)
                    return
                if route.delay:
                    time.sleep(route.delay)
                with owner._lock:
                    fault = route.faults.pop(0) if route.faults else None
                    key = self.path if self.path in owner._cuts else urlsplit(self.path).path
                    cut = route.cut_at if owner._cuts.get(key, 0) > 0 else None
                    if cut is not None:
                        owner._cuts[key] -= 1
                if fault is not None:
                    self._send(fault[0], dict(fault[1]), b"fault\n", with_body)
                    return
                headers = dict(route.headers)
                if route.redirect is not None:
                    headers.setdefault("Location", route.redirect)
                    self._send(route.status, headers, route.body, with_body)
                    return
                body, status = route.body, route.status
                if body and "etag" not in {k.lower() for k in headers}:
                    # a validator, as nginx sends: syncd resumes a partial only with If-Range
                    headers["ETag"] = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
                rng = self.headers.get("Range") if route.ranges else None
                if status == 200 and rng:
                    try:
                        parsed = _parse_range(rng, len(body))
                    except _UnsatisfiableRange:
                        headers["Content-Range"] = f"bytes */{len(body)}"
                        self._send(416, headers, b"", with_body)
                        return
                    if parsed is not None:
                        start, end = parsed
                        headers["Content-Range"] = f"bytes {start}-{end}/{len(body)}"
                        body, status = body[start : end + 1], 206
                if route.ranges:
                    headers.setdefault("Accept-Ranges", "bytes")
                self._send(status, headers, body, with_body, route.send_length, route.drip, cut)

            def _send(
                self,
                status: int,
                headers: dict[str, str],
                body: bytes,
                with_body: bool,
                send_length: bool = True,
                drip: tuple[int, float] | None = None,
                cut: int | None = None,
            ) -> None:
                self.send_response(status)
                lower = {k.lower() for k in headers}
                if send_length and "content-length" not in lower:
                    self.send_header("Content-Length", str(len(body)))
                if "content-type" not in lower:
                    self.send_header("Content-Type", "application/octet-stream")
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if not (with_body and body):
                    return
                if cut is not None:
                    body = body[:cut]
                step, pause = drip if drip else (len(body), 0.0)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    for i in range(0, len(body), step):
                        self.wfile.write(body[i : i + step])
                        self.wfile.flush()
                        if pause:
                            time.sleep(pause)
                if cut is not None:
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)

            def do_GET(self) -> None:
                self._serve(with_body=True)

            def do_HEAD(self) -> None:
                self._serve(with_body=False)

            def _not_allowed(self) -> None:
                self._begin()
                self._send(405, {"Allow": "GET, HEAD"}, b"", with_body=True)

            do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

        return Handler


class _UnsatisfiableRange(Exception):
    """The requested range starts beyond the end of the body (answer 416)."""


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """Parse a single ``bytes=N-`` / ``bytes=N-M`` range; None means "ignore it, send 200"."""
    unit, _, spec = value.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        raise _UnsatisfiableRange(value)
    return start, end


# --------------------------------------------------------------------------- git


class GitRepo:
    """A bare manifest repository plus a work clone on branch ``main``, driven by the git CLI.

    ``url`` is what a syncd config should point at: by default ``bare_path.as_uri()``
    (a ``file://`` URL); the ssh fixture passes an ``ssh://`` URL instead.
    """

    def __init__(self, bare_path: Path, work_path: Path, *, url: str | None = None) -> None:
        self.bare_path = Path(bare_path).absolute()
        self.work_path = Path(work_path).absolute()
        self.url = url if url is not None else self.bare_path.as_uri()
        self.env = {
            **os.environ,
            "GIT_AUTHOR_NAME": "Syncd Test",
            "GIT_AUTHOR_EMAIL": "syncd-test@example.invalid",
            "GIT_COMMITTER_NAME": "Syncd Test",
            "GIT_COMMITTER_EMAIL": "syncd-test@example.invalid",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_TERMINAL_PROMPT": "0",
        }
        self.bare_path.parent.mkdir(parents=True, exist_ok=True)
        self.work_path.parent.mkdir(parents=True, exist_ok=True)
        self._git(None, "init", "--quiet", "--bare", str(self.bare_path))
        self._git(None, "init", "--quiet", str(self.work_path))
        self.git("symbolic-ref", "HEAD", "refs/heads/main")
        self.git("remote", "add", "origin", str(self.bare_path))

    def _git(self, cwd: Path | None, *args: str) -> str:
        return _run(["git", "-c", "init.defaultBranch=main", *args], cwd=cwd, env=self.env).stdout

    def git(self, *args: str) -> str:
        """Run ``git ARGS`` in the work clone and return stdout."""
        return self._git(self.work_path, *args)

    def write(self, relpath: str, text: str) -> Path:
        """Write `text` to work/`relpath` (creating directories); returns the path."""
        path = self.work_path / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def remove(self, relpath: str) -> None:
        """Delete a file or directory from the work tree (committed by the next `commit`)."""
        path = self.work_path / relpath
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()

    def commit(self, message: str) -> str:
        """Commit all changes (incl. deletions), push to the bare repo's main, return the sha."""
        self.git("add", "--all")
        self.git("commit", "--quiet", "--allow-empty", "-m", message)
        self.git("push", "--quiet", "origin", "HEAD:refs/heads/main")
        return self.head()

    def head(self) -> str:
        """The work clone's HEAD commit sha."""
        return self.git("rev-parse", "HEAD").strip()

    def remote_head(self) -> str:
        """The bare repo's ``main`` sha."""
        return self._git(None, "--git-dir", str(self.bare_path), "rev-parse", "refs/heads/main").strip()

    def force_reset(self, sha: str) -> None:
        """``reset --hard`` the work clone to `sha` and force-push it to the bare repo's main."""
        self.git("reset", "--quiet", "--hard", sha)
        self.git("push", "--quiet", "--force", "origin", "HEAD:refs/heads/main")


# --------------------------------------------------------------------------- assets


def make_asset(root: Path, relpath: str, size: int, seed: int = 0) -> tuple[str, int]:
    """Write `size` deterministic pseudo-random bytes to root/relpath; return (sha256 hex, size)."""
    path = Path(root) / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)  # noqa: S311 - deterministic test data, not crypto
    digest = hashlib.sha256()
    remaining = size
    chunk = 1 << 20
    with path.open("wb") as fh:
        while remaining > 0:
            data = rng.randbytes(min(chunk, remaining))
            digest.update(data)
            fh.write(data)
            remaining -= len(data)
    return digest.hexdigest(), size


# --------------------------------------------------------------------------- TLS: a test CA, nginx over TLS


@dataclass
class TestCA:
    """A throw-away certificate authority (``cert``, PEM) and a server certificate it signed for
    127.0.0.1 (IP subjectAltName, ``server_cert`` + ``server_key``), made with the ``openssl`` CLI."""

    __test__ = False  # not a pytest test class

    cert: Path
    key: Path
    server_cert: Path
    server_key: Path


def make_test_ca(workdir: Path, name: str = "syncd test CA") -> TestCA:
    """Create a CA and a server certificate for 127.0.0.1 under ``workdir`` (valid for two days)."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = workdir / "ca.key", workdir / "ca.pem"
    key, csr, cert = workdir / "server.key", workdir / "server.csr", workdir / "server.pem"
    ext = workdir / "server.ext"
    subject = f"/O=syncd tests/CN={name} {secrets.token_hex(4)}"  # unique: never the same as any real CA
    _run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(ca_key), "-out", str(ca_cert), "-days", "2", "-subj", subject,
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"]
    )  # fmt: skip
    _run(
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(csr), "-subj", "/O=syncd tests/CN=127.0.0.1"]
    )  # fmt: skip
    ext.write_text(
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectAltName = IP:127.0.0.1\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid\n"
    )
    _run(
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "2", "-sha256", "-extfile", str(ext), "-out", str(cert)]
    )  # fmt: skip
    for private in (ca_key, key):
        private.chmod(0o600)
    return TestCA(cert=ca_cert, key=ca_key, server_cert=cert, server_key=key)


def ca_bundle(path: Path, *parts: Path) -> Path:
    """Write the PEM files ``parts`` concatenated to ``path`` (a CA bundle like
    ``/etc/ssl/certs/ca-certificates.crt``); return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = [p.read_bytes() for p in parts]
    path.write_bytes(b"".join(c if c.endswith(b"\n") else c + b"\n" for c in chunks))
    return path


@dataclass
class TlsNginx:
    """A private nginx on 127.0.0.1 speaking only HTTPS with a certificate signed by a :class:`TestCA`.

    ``/bearer/`` and ``/open/`` serve ``root`` as :class:`Nginx` does (same token); ``/git/<repo>`` is
    smart HTTP (git-http-backend through an already running fcgiwrap's socket, Basic auth) when started
    with ``git_socket``."""

    port: int
    pid: int
    root: Path
    workdir: Path
    access_log: Path
    error_log: Path
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    @property
    def base_url(self) -> str:
        """``https://127.0.0.1:PORT``."""
        return f"https://127.0.0.1:{self.port}"

    def bearer_url(self) -> str:
        return f"{self.base_url}/bearer"

    def git_url(self, repo: str) -> str:
        return f"{self.base_url}/git/{repo}"

    def stop(self) -> None:
        """Stop nginx by PID and wait for it and its port (idempotent)."""
        _stop_pid(self.pid, self._proc, signal.SIGTERM)
        _wait_port_free(self.port)


_TLS_NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root root;
pid "{workdir}/nginx.pid";
error_log "{error_log}" info;

events {{
    worker_connections 256;
}}

http {{
    default_type application/octet-stream;
    server_tokens off;
    log_format syncd_tls '$request $status $ssl_protocol';
    access_log "{access_log}" syncd_tls;

    client_body_temp_path "{tmp}/client_body";
    proxy_temp_path "{tmp}/proxy";
    fastcgi_temp_path "{tmp}/fastcgi";
    uwsgi_temp_path "{tmp}/uwsgi";
    scgi_temp_path "{tmp}/scgi";
    client_max_body_size 0;

    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate "{cert}";
        ssl_certificate_key "{key}";
        ssl_protocols TLSv1.2 TLSv1.3;
        autoindex off;

        location /bearer/ {{
            if ($http_authorization != "Bearer {token}") {{
                return 401;
            }}
            alias "{root}/";
        }}

        location /open/ {{
            alias "{root}/";
        }}
{git}
        location / {{
            return 404;
        }}
    }}
}}
"""

_TLS_GIT_LOCATION = """
        location /git/ {{
            auth_basic "syncd-git";
            auth_basic_user_file "{htpasswd}";

            fastcgi_split_path_info ^(/git)(/.*)$;
            fastcgi_pass unix:{socket};
            fastcgi_param SCRIPT_FILENAME /usr/lib/git-core/git-http-backend;
            fastcgi_param GIT_PROJECT_ROOT "{repos}";
            fastcgi_param GIT_HTTP_EXPORT_ALL 1;
            fastcgi_param PATH_INFO $fastcgi_path_info;
            fastcgi_param QUERY_STRING $query_string;
            fastcgi_param REQUEST_METHOD $request_method;
            fastcgi_param CONTENT_TYPE $content_type;
            fastcgi_param CONTENT_LENGTH $content_length;
            fastcgi_param REMOTE_USER $remote_user;
            fastcgi_param REMOTE_ADDR $remote_addr;
            fastcgi_param SERVER_PROTOCOL $server_protocol;
            fastcgi_param HTTPS on;
            fastcgi_param GATEWAY_INTERFACE CGI/1.1;
        }}
"""


def start_tls_nginx(
    workdir: Path,
    ca: TestCA,
    root: Path,
    token: str,
    *,
    git_socket: Path | None = None,
    git_repos: Path | None = None,
    git_htpasswd: Path | None = None,
) -> TlsNginx:
    """Start an HTTPS-only nginx under ``workdir`` with ``ca``'s server certificate, serving ``root`` (and
    git smart HTTP when ``git_socket``, ``git_repos`` and ``git_htpasswd`` are given); return once it
    listens."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / "tmp"
    tmp.mkdir(exist_ok=True)
    config = workdir / "nginx.conf"
    access_log = workdir / "access.log"
    error_log = workdir / "error.log"
    git = ""
    if git_socket is not None:
        assert git_repos is not None and git_htpasswd is not None
        git = _TLS_GIT_LOCATION.format(htpasswd=git_htpasswd, socket=git_socket, repos=git_repos)
    proc, port = launch_nginx(
        workdir,
        config,
        error_log,
        lambda port: _TLS_NGINX_CONF.format(
            workdir=workdir,
            error_log=error_log,
            access_log=access_log,
            tmp=tmp,
            port=port,
            cert=ca.server_cert,
            key=ca.server_key,
            token=token,
            root=Path(root).absolute(),
            git=git,
        ),
        "nginx (TLS)",
    )
    server = TlsNginx(
        port=port,
        pid=proc.pid,
        root=Path(root).absolute(),
        workdir=workdir,
        access_log=access_log,
        error_log=error_log,
        _proc=proc,
    )
    atexit.register(server.stop)
    return server
