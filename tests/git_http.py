"""A real smart-HTTP git server on 127.0.0.1: nginx + fcgiwrap + git-http-backend behind HTTP Basic auth.

Plain Python (no pytest import), like :mod:`servers`. ``start_git_http(workdir)`` starts

- ``fcgiwrap -s unix:<workdir>/fcgiwrap.sock``, restricted to ``git-http-backend`` (a direct child), and
- a private nginx (its own conf, ``daemon off``, pid/logs/temp paths in `workdir`) listening on
  127.0.0.1:PORT, serving ``/git/<repo>`` through FastCGI to git-http-backend with
  ``GIT_PROJECT_ROOT=<workdir>/repos``, protected by ``auth_basic`` (user ``syncd``, password = a random
  token, from ``htpasswd -bcB``).

Both processes run as root (the repos are root's too) and are stopped by PID.
"""

from __future__ import annotations

import atexit
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from servers import START_TIMEOUT, _read, _run, _stop_pid, _wait_port_free, launch_nginx

__all__ = ["GIT_HTTP_BACKEND", "GitHttp", "start_git_http"]

FCGIWRAP_BIN = "/usr/sbin/fcgiwrap"  # Debian package "fcgiwrap"
GIT_HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"
USER = "syncd"


@dataclass
class GitHttp:
    """nginx + fcgiwrap serving the bare repos under ``repos_dir`` as ``http://…/git/<repo>``."""

    port: int
    repos_dir: Path
    user: str
    token: str
    workdir: Path
    error_log: Path
    access_log: Path
    fcgiwrap_log: Path
    socket: Path
    nginx_pid: int
    fcgiwrap_pid: int
    _nginx: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    _fcgiwrap: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def url(self, repo: str) -> str:
        """``http://127.0.0.1:PORT/git/<repo>``: syncd refuses userinfo in [source] url; its user name for
        basic auth is ``[source] username``, by default ``syncd`` (:data:`USER`)."""
        return f"http://127.0.0.1:{self.port}/git/{repo}"

    def stop(self) -> None:
        """Stop nginx, then fcgiwrap, each by PID, and wait for them (idempotent)."""
        _stop_pid(self.nginx_pid, self._nginx, signal.SIGTERM)
        _wait_port_free(self.port)
        _stop_pid(self.fcgiwrap_pid, self._fcgiwrap, signal.SIGTERM)
        self.socket.unlink(missing_ok=True)


_CONF = """\
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
    log_format syncd_git '$request $status $remote_user';
    access_log "{access_log}" syncd_git;

    client_body_temp_path "{tmp}/client_body";
    proxy_temp_path "{tmp}/proxy";
    fastcgi_temp_path "{tmp}/fastcgi";
    uwsgi_temp_path "{tmp}/uwsgi";
    scgi_temp_path "{tmp}/scgi";
    client_max_body_size 0;

    server {{
        listen 127.0.0.1:{port};
        server_name localhost;

        location /git/ {{
            auth_basic "syncd-git";
            auth_basic_user_file "{htpasswd}";

            fastcgi_split_path_info ^(/git)(/.*)$;
            fastcgi_pass unix:{socket};
            fastcgi_param SCRIPT_FILENAME {backend};
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
            fastcgi_param GATEWAY_INTERFACE CGI/1.1;
        }}

        location / {{
            return 404;
        }}
    }}
}}
"""


def _socket_ready(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


def _start_fcgiwrap(workdir: Path, sock: Path, log: Path) -> subprocess.Popen[bytes]:
    """Run ``fcgiwrap -s unix:SOCK -p git-http-backend`` and wait (bounded) until the socket accepts."""
    sock.unlink(missing_ok=True)  # fcgiwrap cannot bind over a stale socket file
    with log.open("ab") as log_fh:
        proc = subprocess.Popen(
            [FCGIWRAP_BIN, "-s", f"unix:{sock}", "-p", GIT_HTTP_BACKEND],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=log_fh,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"fcgiwrap exited with status {proc.returncode} before listening on {sock}; "
                f"log {log}:\n{_read(log)}"
            )
        if sock.exists() and _socket_ready(sock):
            return proc
        time.sleep(0.05)
    _stop_pid(proc.pid, proc, signal.SIGTERM)
    sock.unlink(missing_ok=True)
    raise RuntimeError(f"fcgiwrap did not listen on {sock} within {START_TIMEOUT}s; log {log}:\n{_read(log)}")


def start_git_http(workdir: Path) -> GitHttp:
    """Start fcgiwrap and a private nginx under `workdir`; return once both accept connections."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    repos = workdir / "repos"
    repos.mkdir(exist_ok=True)
    tmp = workdir / "tmp"
    tmp.mkdir(exist_ok=True)
    token = "gittok" + secrets.token_hex(16)
    htpasswd = workdir / "htpasswd"
    _run(["htpasswd", "-bcB", str(htpasswd), USER, token])
    sock = workdir / "fcgiwrap.sock"
    fcgiwrap_log = workdir / "fcgiwrap.log"
    config = workdir / "nginx.conf"
    access_log = workdir / "access.log"
    error_log = workdir / "error.log"

    fcgiwrap = _start_fcgiwrap(workdir, sock, fcgiwrap_log)
    try:
        nginx, port = launch_nginx(
            workdir,
            config,
            error_log,
            lambda port: _CONF.format(
                workdir=workdir,
                error_log=error_log,
                access_log=access_log,
                tmp=tmp,
                port=port,
                htpasswd=htpasswd,
                socket=sock,
                backend=GIT_HTTP_BACKEND,
                repos=repos,
            ),
            "nginx (git smart HTTP)",
        )
    except BaseException:
        _stop_pid(fcgiwrap.pid, fcgiwrap, signal.SIGTERM)
        raise

    server = GitHttp(
        port=port,
        repos_dir=repos,
        user=USER,
        token=token,
        workdir=workdir,
        error_log=error_log,
        access_log=access_log,
        fcgiwrap_log=fcgiwrap_log,
        socket=sock,
        nginx_pid=nginx.pid,
        fcgiwrap_pid=fcgiwrap.pid,
        _nginx=nginx,
        _fcgiwrap=fcgiwrap,
    )
    atexit.register(server.stop)
    return server
