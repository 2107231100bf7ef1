"""Git faults: rewritten history, stale locks and damaged clones. The export keeps what is good."""

from __future__ import annotations

import hashlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import World

pytestmark = pytest.mark.e2e


class DripServer:
    """A git HTTP server on 127.0.0.1 that never completes an answer: ``HTTP/1.1 200 OK``, then one header
    line every ``every`` s (each read arrives well within any per-read timeout). Once :attr:`healthy` is
    set, dripping connections are closed and new ones are forwarded to ``upstream`` (host, port), a real
    git server. Bounded: a connection drips at most ``max_lines`` lines."""

    def __init__(
        self, upstream: tuple[str, int] | None = None, every: float = 0.5, max_lines: int = 600
    ) -> None:
        self.upstream = upstream
        self.every = every
        self.max_lines = max_lines
        self.healthy = threading.Event()
        self.closed = threading.Event()
        self.requests = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def url(self, path: str = "/m.git") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.closed.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.requests += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                if self.healthy.is_set() and self.upstream is not None:
                    self._forward(conn)
                    return
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                for i in range(self.max_lines):
                    if self.closed.wait(self.every) or self.healthy.is_set():
                        return
                    conn.sendall(b"X-Drip-%d: y\r\n" % i)
            except OSError:
                return

    def _forward(self, conn: socket.socket) -> None:
        assert self.upstream is not None
        with socket.create_connection(self.upstream, timeout=30) as up:
            conn.settimeout(30)
            back = threading.Thread(target=_pump, args=(up, conn), daemon=True)
            back.start()
            _pump(conn, up)
            back.join(timeout=30)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` to ``dst`` until EOF (then half-close ``dst``) or an error."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        return


@pytest.fixture
def drip() -> Iterator[DripServer]:
    server = DripServer()
    yield server
    server.close()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def published_then_rewritten(world: World) -> tuple[dict[str, object], dict[str, object], str]:
    """Sync commit 1 (asset a), then replace it on the branch by a commit with asset c (force-push)."""
    a = world.asset("a.bin", 1000, seed=1)
    c = world.asset("c.bin", 2000, seed=3)
    world.manifest("m.toml", {**a, "dest": "a.bin"})
    first = world.repo.commit("a")
    assert world.sync().code == 0
    world.repo.force_reset(f"{first}~0")
    world.manifest("m.toml", {**c, "dest": "c.bin"})
    world.repo.git("add", "--all")
    world.repo.git("commit", "--quiet", "--amend", "-m", "rewritten")
    world.repo.force_reset(world.repo.head())
    return a, c, first


def test_force_push_is_refused_by_default(world: World) -> None:
    """A rewritten branch is not followed: error event, last good commit still served, exit 1."""
    a, _, first = published_then_rewritten(world)
    (world.export / "a.bin").unlink()  # the last good commit is still reconciled
    run = world.sync()
    assert run.code == 1
    ev = run.one("git_history_rewritten")
    assert ev["level"] == "error" and ev["previous"] == first and ev["serving_commit"] == first
    assert "allow_force_push" in ev["error"]
    assert sha(world.export / "a.bin") == a["sha256"]
    assert not (world.export / "c.bin").exists()
    assert world.sync().code == 1  # stays refused, pass after pass


def test_force_push_followed_when_allowed(world: World) -> None:
    """With allow_force_push = true the rewritten head is synced (a warning says so)."""
    _, c, _ = published_then_rewritten(world)
    world.source["allow_force_push"] = True
    world.write_config()
    run = world.sync()
    assert run.code == 0, run.err
    assert run.one("git_history_rewritten")["level"] == "warning"
    assert sha(world.export / "c.bin") == c["sha256"]
    assert run.one("asset_orphaned")["dest"] == "a.bin"


def test_stale_lock_file_is_removed(world: World) -> None:
    """A ref lock left by a process killed mid-fetch does not block the next fetch."""
    a = world.asset("a.bin", 100, seed=1)
    world.manifest("m.toml", {**a, "dest": "a.bin"})
    world.repo.commit("a")
    assert world.sync().code == 0
    lock = world.state / "repo.git" / "refs" / "remotes" / "origin" / "main.lock"
    lock.write_text("0" * 40 + "\n")
    b = world.asset("b.bin", 100, seed=2)
    world.manifest("b.toml", {**b, "dest": "b.bin"})
    head = world.repo.commit("b")
    run = world.sync()
    assert run.code == 0, run.err
    assert run.one("git_fetched")["commit"] == head
    assert run.one("git_stale_lock_removed")["file"] == str(lock)
    assert sha(world.export / "b.bin") == b["sha256"]


@pytest.mark.parametrize("damage", ["objects", "head-ref", "config"])
def test_damaged_clone_is_recloned(world: World, damage: str) -> None:
    """A corrupted bare clone is set aside and cloned again; the export is not touched."""
    a = world.asset("a.bin", 100, seed=1)
    world.manifest("m.toml", {**a, "dest": "a.bin"})
    world.repo.commit("a")
    assert world.sync().code == 0
    before = (world.export / "a.bin").stat()
    clone = world.state / "repo.git"
    if damage == "objects":
        shutil.rmtree(clone / "objects")
        (clone / "objects").mkdir()
    elif damage == "head-ref":
        (clone / "refs" / "remotes" / "origin" / "main").write_text("garbage\n")
    else:
        (clone / "config").write_text("[[[ not a config\n")
    b = world.asset("b.bin", 100, seed=2)
    world.manifest("b.toml", {**b, "dest": "b.bin"})
    world.repo.commit("b")
    run = world.sync()
    assert run.code == 0, run.err
    assert run.one("git_clone_repaired")["level"] == "error"
    assert sha(world.export / "b.bin") == b["sha256"]
    after = (world.export / "a.bin").stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert list(world.state.glob("repo.git.damaged-*"))


def test_interrupted_first_clone_is_cleaned(world: World) -> None:
    """A temporary clone left by a crash during the first clone is removed; the clone is made anew."""
    world.state.mkdir()
    leftover = world.state / ".repo.git.tmp-abc123"
    (leftover / "objects").mkdir(parents=True)
    a = world.asset("a.bin", 100, seed=1)
    world.manifest("m.toml", {**a, "dest": "a.bin"})
    world.repo.commit("a")
    assert world.sync().code == 0
    assert not leftover.exists()


def test_missing_repository(world: World) -> None:
    """A repository URL that does not exist fails with exit 1 and names the URL."""
    world.source["url"] = world.repo.url + "-missing"
    world.write_config()
    run = world.sync()
    assert run.code == 1
    assert "-missing" in run.one("command_failed")["error"]


def test_dripping_git_server_bounds_sync(world: World, drip: DripServer) -> None:
    """A git server that drips its answer fails `syncd sync` within a few timeouts (exit 1, the URL named);
    with a last fetched commit, that commit is still served."""
    a = world.asset("a.bin", 100, seed=1)
    world.manifest("m.toml", {**a, "dest": "a.bin"})
    head = world.repo.commit("a")
    world.source["url"] = drip.url()
    world.write_config(download={"timeout": "2s"})
    started = time.monotonic()
    first = world.sync(timeout=60)
    took = time.monotonic() - started
    assert first.code == 1
    assert (
        f"git server {drip.url()} sent no complete answer within 2 s" in first.one("command_failed")["error"]
    )
    assert took < 20, took  # before: held until the server hung up (minutes)

    world.source["url"] = world.repo.url
    world.write_config(download={"timeout": "2s"})
    assert world.sync().code == 0
    (world.export / "a.bin").unlink()
    world.source["url"] = drip.url()
    world.write_config(download={"timeout": "2s"})
    started = time.monotonic()
    run = world.sync(timeout=60)
    took = time.monotonic() - started
    assert run.code == 1
    ev = run.one("git_fetch_failed")
    assert ev["serving_commit"] == head and drip.url() in ev["error"]
    assert "no complete answer" in ev["error"]
    assert sha(world.export / "a.bin") == a["sha256"]  # the last fetched commit was reconciled
    assert took < 20, took
