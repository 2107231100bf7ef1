"""Prove that the test servers and helpers in tests/servers.py behave as advertised."""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest

from servers import (
    FaultServer,
    GitRepo,
    Nginx,
    Sshd,
    _pid_alive,
    _port_open,
    make_asset,
    start_nginx,
    start_sshd,
)

pytestmark = pytest.mark.integration


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _get(
    url: str, headers: dict[str, str] | None = None, *, follow: bool = True
) -> tuple[int, dict[str, str], bytes]:
    """GET `url`; return (status, lowercased headers, body) without raising on HTTP errors."""
    opener = urllib.request.build_opener() if follow else urllib.request.build_opener(_NoRedirect)
    req = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - loopback http only
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def _git_clone(sshd: Sshd, url: str, dest: Path, known_hosts: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "GIT_SSH_COMMAND": (
            f"ssh -i {sshd.client_key} -o UserKnownHostsFile={known_hosts} "
            "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes -o BatchMode=yes"
        ),
        "GIT_TERMINAL_PROMPT": "0",
    }
    return subprocess.run(
        ["git", "clone", url, str(dest)], capture_output=True, text=True, env=env, timeout=60
    )


# --------------------------------------------------------------------------- sshd


def test_sshd_key_files(sshd: Sshd) -> None:
    """The client key is 0600 with a .pub twin; known_hosts files differ only in the key."""
    assert stat.S_IMODE(sshd.client_key.stat().st_mode) == 0o600
    assert sshd.client_key.with_suffix(".pub") == Path(str(sshd.client_key) + ".pub")
    assert sshd.client_key.with_suffix(".pub").read_text().startswith("ssh-ed25519 ")
    good = sshd.known_hosts.read_text().split()
    wrong = sshd.wrong_known_hosts.read_text().split()
    assert good[:2] == [f"[127.0.0.1]:{sshd.port}", "ssh-ed25519"]
    assert wrong[:2] == good[:2]
    assert good[2] != wrong[2]
    assert sshd.url("x.git") == f"ssh://root@127.0.0.1:{sshd.port}{sshd.repos_dir / 'x.git'}"


def test_ssh_clone_with_correct_known_hosts(sshd: Sshd, ssh_git_repo: GitRepo, tmp_path: Path) -> None:
    """git clone over ssh with the client key and the right known_hosts gets the pushed commit."""
    ssh_git_repo.write("assets/a.toml", 'name = "a"\n')
    sha = ssh_git_repo.commit("first")
    dest = tmp_path / "clone"
    proc = _git_clone(sshd, ssh_git_repo.url, dest, sshd.known_hosts)
    assert proc.returncode == 0, proc.stderr
    assert (dest / "assets" / "a.toml").read_text() == 'name = "a"\n'
    head = subprocess.run(["git", "-C", str(dest), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert head.stdout.strip() == sha
    branch = subprocess.run(
        ["git", "-C", str(dest), "branch", "--show-current"], capture_output=True, text=True
    )
    assert branch.stdout.strip() == "main"


def test_ssh_clone_rejects_wrong_host_key(sshd: Sshd, ssh_git_repo: GitRepo, tmp_path: Path) -> None:
    """git clone over ssh fails host key verification when known_hosts has a different key."""
    ssh_git_repo.write("a.toml", "x = 1\n")
    ssh_git_repo.commit("first")
    dest = tmp_path / "clone"
    proc = _git_clone(sshd, ssh_git_repo.url, dest, sshd.wrong_known_hosts)
    assert proc.returncode != 0
    assert "Host key verification failed" in proc.stderr
    assert not (dest / "a.toml").exists()


def test_sshd_start_and_stop(tmp_path: Path) -> None:
    """start_sshd listens on its port and stop() ends the process and frees the port."""
    server = start_sshd(tmp_path / "sshd")
    try:
        assert _port_open(server.port)
        assert _pid_alive(server.pid)
    finally:
        server.stop()
    assert not _pid_alive(server.pid)
    assert not _port_open(server.port)
    server.stop()  # idempotent


# --------------------------------------------------------------------------- nginx


@pytest.fixture
def asset(nginx: Nginx) -> tuple[str, bytes]:
    """A 300 KiB deterministic asset under nginx.root; returns (relpath, content)."""
    relpath = "pkg/sub/asset.bin"
    digest, size = make_asset(nginx.root, relpath, 300 * 1024, seed=7)
    data = (nginx.root / relpath).read_bytes()
    assert hashlib.sha256(data).hexdigest() == digest and len(data) == size
    return relpath, data


def test_nginx_bearer_requires_exact_token(nginx: Nginx, asset: tuple[str, bytes]) -> None:
    """/bearer/ gives 200 with the exact Bearer token; 401 without, wrong token or wrong case."""
    relpath, data = asset
    url = f"{nginx.bearer_url()}/{relpath}"
    status, _, body = _get(url, {"Authorization": f"Bearer {nginx.token}"})
    assert (status, body) == (200, data)
    assert _get(url)[0] == 401
    assert _get(url, {"Authorization": f"Bearer {nginx.token}x"})[0] == 401
    assert _get(url, {"Authorization": f"bearer {nginx.token}"})[0] == 401
    assert _get(url, {"Authorization": nginx.token})[0] == 401


def test_nginx_basic_auth(nginx: Nginx, asset: tuple[str, bytes]) -> None:
    """/basic/ gives 200 with user/password and 401 without or with a wrong password."""
    relpath, data = asset
    url = f"{nginx.basic_url()}/{relpath}"
    good = base64.b64encode(f"{nginx.user}:{nginx.password}".encode()).decode()
    bad = base64.b64encode(f"{nginx.user}:nope".encode()).decode()
    status, _, body = _get(url, {"Authorization": f"Basic {good}"})
    assert (status, body) == (200, data)
    assert _get(url)[0] == 401
    assert _get(url, {"Authorization": f"Basic {bad}"})[0] == 401
    assert _get(url, {"Authorization": f"Bearer {nginx.token}"})[0] == 401


def test_nginx_open_range_request(nginx: Nginx, asset: tuple[str, bytes]) -> None:
    """/open/ answers a Range request with 206, Content-Range and the right bytes."""
    relpath, data = asset
    url = f"{nginx.open_url()}/{relpath}"
    assert _get(url)[2] == data
    status, headers, body = _get(url, {"Range": "bytes=1000-"})
    assert status == 206
    assert headers["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    assert body == data[1000:]
    assert _get(f"{nginx.open_url()}/missing.bin")[0] == 404
    assert _get(f"{nginx.base_url}/{relpath}")[0] == 404


def test_nginx_access_log_has_no_credentials(nginx: Nginx, asset: tuple[str, bytes]) -> None:
    """The access log records request, status and range but never the token or password."""
    relpath, _ = asset
    _get(
        f"{nginx.bearer_url()}/{relpath}",
        {"Authorization": f"Bearer {nginx.token}", "Range": "bytes=5-"},
    )
    log = nginx.access_log.read_text()
    assert f"GET /bearer/{relpath} HTTP/1.1 206 bytes=5-" in log
    assert nginx.token not in log and nginx.password not in log


def test_nginx_start_and_stop(tmp_path: Path) -> None:
    """start_nginx listens on its port and stop() ends master and workers and frees the port."""
    server = start_nginx(tmp_path / "nginx")
    try:
        assert _port_open(server.port)
        # The master listens before it forks its workers: wait (bounded) for them to appear.
        children_file = Path(f"/proc/{server.pid}/task/{server.pid}/children")
        deadline = time.monotonic() + 10
        while not (children := children_file.read_text().split()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert children, "expected nginx worker processes"
    finally:
        server.stop()
    assert not _pid_alive(server.pid)
    assert not any(_pid_alive(int(pid)) for pid in children)
    assert not _port_open(server.port)


# --------------------------------------------------------------------------- FaultServer


def test_fault_server_records_headers(fault_server: FaultServer) -> None:
    """FaultServer records method, path and lowercased headers, so a missing auth is visible."""
    fault_server.route("/a", body=b"hello")
    assert _get(f"{fault_server.url}/a", {"Authorization": "Bearer s3cret", "X-Thing": "1"})[::2] == (
        200,
        b"hello",
    )
    assert _get(f"{fault_server.url}/a")[0] == 200
    (m1, p1, h1), (m2, p2, h2) = fault_server.requests
    assert (m1, p1, h1["authorization"], h1["x-thing"]) == ("GET", "/a", "Bearer s3cret", "1")
    assert (m2, p2) == ("GET", "/a") and "authorization" not in h2


def test_fault_server_redirect(fault_server: FaultServer) -> None:
    """A redirect route answers 302 + Location; the target's log shows if Authorization leaked."""
    with FaultServer() as other:
        other.route("/blob", body=b"payload")
        fault_server.route("/start", redirect=f"{other.url}/blob")
        status, headers, _ = _get(f"{fault_server.url}/start", follow=False)
        assert (status, headers["location"]) == (302, f"{other.url}/blob")
        # urllib forwards Authorization across origins: the target server records the leak.
        status, _, body = _get(f"{fault_server.url}/start", {"Authorization": "Bearer s3cret"})
        assert (status, body) == (200, b"payload")
        assert fault_server.requests[-1][2]["authorization"] == "Bearer s3cret"
        assert other.requests[-1][2].get("authorization") == "Bearer s3cret"
        # httpx drops it on a cross-origin redirect: the target records no such header.
        other.clear_requests()
        resp = httpx.get(
            f"{fault_server.url}/start",
            headers={"Authorization": "Bearer s3cret"},
            follow_redirects=True,
        )
        assert (resp.status_code, resp.content) == (200, b"payload")
        assert [(m, p) for m, p, _ in other.requests] == [("GET", "/blob")]
        assert "authorization" not in other.requests[0][2]


def test_fault_server_status_range_head_404(fault_server: FaultServer) -> None:
    """FaultServer serves custom status/headers, Range (206/416), HEAD, and 404 otherwise."""
    body = bytes(range(256)) * 4
    fault_server.route("/f", body=body, headers={"ETag": '"v1"'})
    fault_server.route("/boom", status=503, body=b"down", headers={"Retry-After": "1"})
    status, headers, got = _get(f"{fault_server.url}/f", {"Range": "bytes=1000-"})
    assert (status, headers["content-range"], got, headers["etag"]) == (
        206,
        "bytes 1000-1023/1024",
        body[1000:],
        '"v1"',
    )
    assert _get(f"{fault_server.url}/f", {"Range": "bytes=5000-"})[0] == 416
    assert _get(f"{fault_server.url}/boom")[:1] == (503,)
    assert _get(f"{fault_server.url}/boom")[1]["retry-after"] == "1"
    assert _get(f"{fault_server.url}/nothing")[0] == 404
    conn = http.client.HTTPConnection("127.0.0.1", fault_server.port, timeout=10)
    try:
        conn.request("HEAD", "/f")
        resp = conn.getresponse()
        assert (resp.status, resp.getheader("Content-Length"), resp.read()) == (200, "1024", b"")
    finally:
        conn.close()
    assert fault_server.requests[-1][:2] == ("HEAD", "/f")


def test_fault_server_truncated_body(fault_server: FaultServer) -> None:
    """A route may lie about Content-Length so the client sees a truncated body."""
    fault_server.route("/short", body=b"abc", headers={"Content-Length": "100"})
    conn = http.client.HTTPConnection("127.0.0.1", fault_server.port, timeout=10)
    try:
        conn.request("GET", "/short")
        resp = conn.getresponse()
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
    finally:
        conn.close()


def test_fault_server_stop_frees_port() -> None:
    """FaultServer used as a context manager stops listening on exit."""
    with FaultServer() as server:
        port = server.port
        assert _port_open(port)
    assert not _port_open(port)


# --------------------------------------------------------------------------- GitRepo and make_asset


def test_git_repo_commit_remove_force_reset(git_repo: GitRepo) -> None:
    """GitRepo commits and pushes (incl. deletions) to main; force_reset rewinds the bare repo."""
    git_repo.write("a.toml", "a = 1\n")
    git_repo.write("dir/b.toml", "b = 2\n")
    first = git_repo.commit("first")
    assert git_repo.head() == first == git_repo.remote_head()
    git_repo.remove("a.toml")
    second = git_repo.commit("second")
    assert second != first and git_repo.remote_head() == second
    files = git_repo._git(None, "--git-dir", str(git_repo.bare_path), "ls-tree", "-r", "--name-only", "main")
    assert files.split() == ["dir/b.toml"]
    git_repo.force_reset(first)
    assert git_repo.head() == first == git_repo.remote_head()
    assert (git_repo.work_path / "a.toml").exists()
    assert git_repo.url == git_repo.bare_path.as_uri()


def test_make_asset_is_deterministic(tmp_path: Path) -> None:
    """make_asset writes the same bytes for the same seed and returns their sha256 and size."""
    size = 3 * 1024 * 1024 + 17
    d1, s1 = make_asset(tmp_path, "x/one.bin", size, seed=1)
    d2, _ = make_asset(tmp_path, "y/two.bin", size, seed=1)
    d3, _ = make_asset(tmp_path, "z/three.bin", size, seed=2)
    data = (tmp_path / "x/one.bin").read_bytes()
    assert (s1, len(data), hashlib.sha256(data).hexdigest()) == (size, size, d1)
    assert d1 == d2 != d3
    assert make_asset(tmp_path, "empty.bin", 0) == (hashlib.sha256(b"").hexdigest(), 0)
