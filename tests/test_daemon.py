"""``syncd run`` as a subprocess: sd_notify over a real AF_UNIX datagram socket, signals, scheduling."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from structlog.testing import capture_logs

from git_http import GitHttp
from harness import World, syncd_command
from servers import GitRepo, Nginx, start_nginx
from syncd import config as syncd_config
from syncd import daemon as syncd_daemon
from syncd.ledger import SCHEMA_VERSION
from syncd.publish import staging_name
from test_faults_git import DripServer

pytestmark = pytest.mark.e2e


class Daemon:
    """A running ``syncd run`` with its notify socket and its JSON log collected."""

    def __init__(self, world: World, tmp: Path, extra_env: dict[str, str] | None = None) -> None:
        self.sock_path = tmp / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self.events: list[dict[str, Any]] = []
        env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "JOURNAL_STREAM")}
        env.update({"NOTIFY_SOCKET": str(self.sock_path), **(extra_env or {})})
        self.proc = subprocess.Popen(
            [syncd_command(), "run", "-c", str(world.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.events.append(json.loads(line))  # every line must be a JSON event

    def _drain(self) -> None:
        # Bounded in time, not in messages: watchdog pings may never let the socket go quiet, and 100
        # pings at 0.1 s each made every wait take 10 s.
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            try:
                self.messages += self.sock.recv(4096).decode().split("\n")
            except TimeoutError:
                return

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._drain()
            if check():
                return
        raise AssertionError(f"timed out waiting for {what}; notify={self.messages} log={self.events}")

    def wait_message(self, prefix: str, after: int = 0, timeout: float = 20) -> str:
        self.wait_for(prefix, lambda: any(m.startswith(prefix) for m in self.messages[after:]), timeout)
        return next(m for m in self.messages[after:] if m.startswith(prefix))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event]

    def wait_event(self, event: str, count: int = 1, timeout: float = 20) -> dict[str, Any]:
        self.wait_for(f"{count}x {event}", lambda: len(self.named(event)) >= count, timeout)
        return self.named(event)[count - 1]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        self._drain()
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.sock.close()


@pytest.fixture
def daemon_at(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start a daemon on a given world (for tests that build their own)."""
    started: list[Daemon] = []

    def start(world: World, **env: str) -> Daemon:
        d = Daemon(world, tmp_path, env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()


@pytest.fixture
def daemon(world: World, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(**env: str) -> Daemon:
        d = Daemon(world, tmp_path, env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()


def test_ready_status_and_first_pass(world: World, daemon: Callable[..., Daemon]) -> None:
    """READY=1 comes with the first pass; STATUS then reads 'in sync at <commit> · N assets · size · next
    poll'."""
    a = world.asset("a.bin", 10_000, seed=1)
    world.manifest("a.toml", {**a, "dest": "a.bin"})
    commit = world.repo.commit("a")
    world.write_config(schedule={"interval": "1h"})
    d = daemon()
    d.wait_message("READY=1")
    status = d.wait_message(f"STATUS=in sync at {commit[:7]} · 1 assets · 9.8 KiB · next poll ")
    assert status.endswith(" UTC")
    assert (world.export / "a.bin").read_bytes() == (world.blobs / "a.bin").read_bytes()
    assert d.stop() == 0
    assert "STOPPING=1" in d.messages
    assert d.named("daemon_stopped")


def test_usr1_runs_a_pass_now(world: World, daemon: Callable[..., Daemon]) -> None:
    """SIGUSR1 starts a pass at once: a commit merged after start lands without waiting an interval."""
    world.write_config(schedule={"interval": "1h"})
    world.manifest("a.toml", {**world.asset("a.bin", 100, seed=1), "dest": "a.bin"})
    world.repo.commit("a")
    d = daemon()
    d.wait_event("pass_finished")
    b = world.asset("b.bin", 5000, seed=2)
    world.manifest("b.toml", {**b, "dest": "b.bin"})
    world.repo.commit("b")
    d.proc.send_signal(signal.SIGUSR1)
    ev = d.wait_event("asset_published", count=2)
    assert ev["dest"] == "b.bin"
    assert (world.export / "b.bin").read_bytes() == (world.blobs / "b.bin").read_bytes()
    assert d.stop() == 0


def test_interval_schedules_passes(world: World, daemon: Callable[..., Daemon]) -> None:
    """With a short interval and no jitter, passes repeat on their own."""
    world.write_config(schedule={"interval": "1s", "jitter": 0})
    world.manifest("a.toml", {**world.asset("a.bin", 100, seed=1), "dest": "a.bin"})
    world.repo.commit("a")
    d = daemon()
    d.wait_event("pass_finished", count=3, timeout=15)
    assert d.stop() == 0
    finished = [e["timestamp"] for e in d.named("pass_finished")]
    assert len(finished) >= 3


def test_reload_applies_new_interval(world: World, daemon: Callable[..., Daemon]) -> None:
    """SIGHUP re-reads the config: RELOADING=1 then READY=1, and the new interval is in force."""
    world.write_config(schedule={"interval": "1h"})
    world.manifest("a.toml", {**world.asset("a.bin", 100, seed=1), "dest": "a.bin"})
    world.repo.commit("a")
    d = daemon()
    d.wait_event("pass_finished")
    mark = len(d.messages)
    world.write_config(schedule={"interval": "1s", "jitter": 0})
    d.proc.send_signal(signal.SIGHUP)
    assert d.wait_event("config_reloaded")["interval_s"] == 1.0
    d.wait_message("RELOADING=1", after=mark)
    d.wait_message("READY=1", after=mark)
    d.wait_event("pass_finished", count=3, timeout=15)  # the 1h schedule would never get here
    assert d.stop() == 0


def test_invalid_reload_keeps_old_config(world: World, daemon: Callable[..., Daemon]) -> None:
    """A reload with a broken config logs an error naming the key and keeps running on the old one."""
    world.write_config(schedule={"interval": "1h"})
    world.manifest("a.toml", {**world.asset("a.bin", 100, seed=1), "dest": "a.bin"})
    world.repo.commit("a")
    d = daemon()
    d.wait_event("pass_finished")
    world.write_config(schedule={"interval": "soon"})
    d.proc.send_signal(signal.SIGHUP)
    failed = d.wait_event("config_reload_failed")
    assert failed["level"] == "error" and "at 'schedule.interval'" in failed["error"]
    b = world.asset("b.bin", 100, seed=2)
    world.manifest("b.toml", {**b, "dest": "b.bin"})
    world.repo.commit("b")
    d.proc.send_signal(signal.SIGUSR1)
    assert d.wait_event("asset_published", count=2)["dest"] == "b.bin"
    assert d.proc.poll() is None
    assert d.stop() == 0


def test_watchdog_pings(world: World, daemon: Callable[..., Daemon]) -> None:
    """With WATCHDOG_USEC set, WATCHDOG=1 pings arrive at half that period."""
    world.write_config(schedule={"interval": "1h"})
    d = daemon(WATCHDOG_USEC="200000")
    d.wait_message("READY=1")
    d.wait_for("5 pings", lambda: d.messages.count("WATCHDOG=1") >= 5, timeout=10)
    assert d.stop() == 0


def test_failed_pass_status(world: World, daemon: Callable[..., Daemon]) -> None:
    """A failed asset makes STATUS say what is wrong, what is served and the age of the last success."""
    world.write_config(schedule={"interval": "1h"})
    bad = {**world.asset("a.bin", 100, seed=1), "sha256": "0" * 64}
    world.manifest("a.toml", {**bad, "dest": "a.bin"})
    commit = world.repo.commit("bad")
    d = daemon()
    status = d.wait_message(f"STATUS=1 failing · serving {commit[:7]} · last success never · next poll ")
    assert status.endswith(" UTC (syncd status)")
    assert d.named("asset_failed")[0]["level"] == "error"
    assert d.stop() == 0


def test_sigterm_mid_download_stops_cleanly(world: World, daemon: Callable[..., Daemon]) -> None:
    """SIGTERM during downloads exits 0 promptly. Staging keeps at most resumable partials (a prefix of the
    asset's bytes with its .meta), every dest present is complete, and the next sync lands all of it."""
    world.write_config(schedule={"interval": "1h"}, download={"concurrency": 2})
    assets = [{**world.asset(f"{i}.bin", 30_000_000, seed=i), "dest": f"big/{i}.bin"} for i in range(6)]
    world.manifest("big.toml", *assets)
    world.repo.commit("big")
    d = daemon()
    d.wait_message("READY=1")
    time.sleep(0.3)
    started = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - started < 15
    staging = world.export / ".syncd-staging"
    by_stem = {staging_name(a["dest"]): a for a in assets}
    for name in world.staging_files():
        stem, _, ext = name.rpartition(".")
        assert ext in ("part", "meta") and stem in by_stem, f"unexpected staging file {name}"
        assert {f"{stem}.part", f"{stem}.meta"} <= set(world.staging_files()), f"{name} is not resumable"
        if ext == "part":
            kept = (staging / name).read_bytes()
            source = (world.blobs / by_stem[stem]["source"].split("/", 1)[1]).read_bytes()
            assert len(kept) < len(source) and source.startswith(kept)
    for a in assets:
        dest = world.export / a["dest"]
        if dest.exists():  # anything that made it is complete and verified
            assert hashlib.sha256(dest.read_bytes()).hexdigest() == a["sha256"]
    run = world.sync()
    assert run.code == 0, run.err
    assert world.staging_files() == []
    for a in assets:
        assert hashlib.sha256((world.export / a["dest"]).read_bytes()).hexdigest() == a["sha256"]


def test_second_daemon_refused(world: World, daemon: Callable[..., Daemon]) -> None:
    """A second syncd run on the same state directory exits 1 with the holder's pid."""
    world.write_config(schedule={"interval": "1h"})
    world.manifest("a.toml", {**world.asset("a.bin", 100, seed=1), "dest": "a.bin"})
    world.repo.commit("a")
    first = daemon()
    first.wait_event("pass_finished")
    second = world.run("run", "-c", str(world.config_path), timeout=30)
    assert second.code == 1
    assert f"pid {first.proc.pid}" in second.one("command_failed")["error"]
    assert first.stop() == 0


def test_sigterm_during_a_long_pass_exits_promptly(
    world: World, daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """SIGTERM while a pass is still downloading ends the daemon within seconds (no shutdown deadlock).
    The file comes from an nginx capped at 20 MiB/s (the same files), so that its download lasts
    about 20 s whatever the machine: uncapped, loopback fetched it before the SIGTERM arrived."""
    (tmp_path / "capped").mkdir()
    (tmp_path / "capped" / "root").symlink_to(world.nginx.root, target_is_directory=True)
    capped = start_nginx(tmp_path / "capped", limit_rate="20m")
    try:
        world.write_config(
            schedule={"interval": "1h"},
            download={"concurrency": 1, "segments": 1},
            artifactory={"url": capped.open_url()},
        )
        big = {**world.asset("big.bin", 400_000_000, seed=7), "dest": "big.bin"}
        world.manifest("big.toml", big)
        world.repo.commit("big")
        _stop_mid_download(world, daemon)
    finally:
        capped.stop()


def _stop_mid_download(world: World, daemon: Callable[..., Daemon]) -> None:
    d = daemon()
    d.wait_message("READY=1")
    d.wait_message("STATUS=downloading")
    started = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - started < 10
    assert not (world.export / "big.bin").exists()
    assert d.named("asset_interrupted") and not d.named("asset_failed")
    assert all(name.endswith((".part", ".meta")) for name in world.staging_files())


def test_export_held_by_another_syncd_fails_the_pass_not_the_daemon(
    world: World, daemon: Callable[..., Daemon]
) -> None:
    """While another syncd holds the export lock, each pass fails clearly and the daemon keeps running;
    the first pass after the lock is released lands everything. config_insecure is logged at start."""
    a = world.asset("a.bin", 1000, seed=1)
    world.manifest("a.toml", {**a, "dest": "a.bin"})
    world.repo.commit("a")
    world.write_config(schedule={"interval": "300ms", "jitter": 0})
    with open(world.export / ".syncd.lock", "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        d = daemon()
        failed = d.wait_event("pass_failed", count=2)
        assert failed["error_type"] == "LockHeldError" and d.proc.poll() is None
        assert not d.named("internal_error") and not d.named("asset_published")
        d.wait_message("STATUS=last pass failed: ")
    d.wait_event("asset_published")
    assert (world.export / "a.bin").read_bytes() == (world.blobs / "a.bin").read_bytes()
    insecure = d.named("config_insecure")
    assert len(insecure) == 1 and "artifactory.url" in insecure[0]["warning"]
    assert d.stop() == 0


def test_reload_onto_an_unusable_ledger_fails_passes_until_it_is_fixed(
    world: World, daemon: Callable[..., Daemon]
) -> None:
    """If the ledger cannot be reopened on reload (here: a newer schema), each pass fails clearly and
    tries again; once it is usable again the daemon carries on, never having stopped."""
    a = world.asset("a.bin", 1000, seed=1)
    world.manifest("a.toml", {**a, "dest": "a.bin"})
    world.repo.commit("a")
    world.write_config(schedule={"interval": "300ms", "jitter": 0})
    d = daemon()
    d.wait_event("asset_published")

    def user_version(n: int) -> None:
        db = sqlite3.connect(world.state / "ledger.sqlite3")
        db.execute(f"PRAGMA user_version = {n}")
        db.close()

    user_version(9)
    d.proc.send_signal(signal.SIGHUP)
    failed = d.wait_event("pass_failed", count=2)
    assert failed["error_type"] == "LedgerRefusedError" and "written by a newer syncd" in failed["error"]
    user_version(SCHEMA_VERSION)
    mark = len(d.named("pass_finished"))
    ok = d.wait_event("pass_finished", count=mark + 1)
    assert ok["ok"] and ok["skipped"] == 1
    assert d.proc.poll() is None and not d.named("internal_error")
    assert d.stop() == 0


def test_sigterm_while_git_drips_exits_promptly(world: World, daemon: Callable[..., Daemon]) -> None:
    """With a git server that drips its answer, each pass gives up on it after one timeout and serves the
    last fetched commit (assets land); SIGTERM then ends the daemon within seconds, exit 0."""
    a = world.asset("a.bin", 100, seed=1)
    world.manifest("m.toml", {**a, "dest": "a.bin"})
    head = world.repo.commit("a")
    assert world.sync().code == 0
    (world.export / "a.bin").unlink()
    drip = DripServer()
    try:
        world.source["url"] = drip.url()
        world.write_config(schedule={"interval": "1s", "jitter": 0}, download={"timeout": "2s"})
        d = daemon()
        ev = d.wait_event("git_fetch_failed", timeout=30)
        assert ev["serving_commit"] == head and "no complete answer" in ev["error"]
        d.wait_event("pass_finished", timeout=30)
        assert hashlib.sha256((world.export / "a.bin").read_bytes()).hexdigest() == a["sha256"]
        d.wait_for("a second pass", lambda: len(d.named("git_fetch_failed")) >= 2, timeout=30)
        started = time.monotonic()
        assert d.stop(timeout=60) == 0
        assert time.monotonic() - started < 8  # before: still running 120 s after SIGTERM
        assert not d.named("stop_forced")
        # the passes overran the 1 s interval; APScheduler's "skipped" notice is not logged for that
        assert not [e for e in d.named("library_log") if "maximum number" in e.get("message", "")]
    finally:
        drip.close()


def test_daemon_recovers_when_the_dripping_git_server_answers(
    git_http: GitHttp, nginx: Nginx, tmp_path: Path, daemon_at: Callable[..., Daemon]
) -> None:
    """A first clone from a dripping git server fails its passes (never two fetches at once); once the
    server answers, the next pass clones and the assets land."""
    name = f"manifests-{uuid.uuid4().hex[:12]}.git"
    repo = GitRepo(git_http.repos_dir / name, tmp_path / "work" / "manifests", url=git_http.url(name))
    up = urlsplit(git_http.url(name))
    assert up.hostname is not None and up.port is not None
    drip = DripServer(upstream=(up.hostname, up.port))
    try:
        token = tmp_path / "keys" / "git.token"
        token.parent.mkdir()
        token.write_text(git_http.token + "\n")
        token.chmod(0o600)
        source = {"url": drip.url(up.path), "token_file": str(token)}
        world = World(tmp_path / "world", repo, nginx, source=source)
        a = world.asset("a.bin", 100, seed=1)
        world.manifest("m.toml", {**a, "dest": "a.bin"})
        repo.commit("a")
        world.write_config(schedule={"interval": "1s", "jitter": 0}, download={"timeout": "2s"})
        d = daemon_at(world)
        ev = d.wait_event("pass_failed", timeout=30)
        assert f"git server {drip.url(up.path)} sent no complete answer" in ev["error"]
        drip.healthy.set()
        d.wait_for("the asset", lambda: (world.export / "a.bin").exists(), timeout=40)
        assert hashlib.sha256((world.export / "a.bin").read_bytes()).hexdigest() == a["sha256"]
        assert d.stop(timeout=60) == 0
    finally:
        drip.close()


@pytest.mark.unit
def test_stop_is_bounded_when_a_pass_never_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass that ignores the stop is waited for at most timeout + STOP_GRACE; then stop_forced (a
    warning) and the stop returns without closing what the pass still holds."""
    conf = tmp_path / "syncd.conf"
    conf.write_text(
        f'[source]\nurl = "{(tmp_path / "repo.git").as_uri()}"\n'
        '[artifactory]\nurl = "http://127.0.0.1:1/a"\n'
        f'[export]\nroot = "{tmp_path / "export"}"\n[download]\ntimeout = "1s"\n'
        f'[state]\ndirectory = "{tmp_path / "state"}"\n'
    )
    (tmp_path / "export").mkdir()
    monkeypatch.setattr(syncd_daemon, "STOP_GRACE", 0.5)
    d = syncd_daemon.Daemon(conf, syncd_config.load(conf))
    d.scheduler.start()
    held, release = threading.Event(), threading.Event()

    def stuck_pass() -> None:
        with d._pass_lock:
            held.set()
            release.wait(30)

    worker = threading.Thread(target=stuck_pass, daemon=True)
    worker.start()
    assert held.wait(5)
    started = time.monotonic()
    with capture_logs() as events:
        d._stop()
    took = time.monotonic() - started
    release.set()
    worker.join(5)
    assert d.forced
    assert 1.2 < took < 10, took
    forced = [e for e in events if e["event"] == "stop_forced"]
    assert len(forced) == 1 and forced[0]["log_level"] == "warning"
    assert [e["forced"] for e in events if e["event"] == "daemon_stopped"] == [True]
    d.rec.close()


def test_a_broken_log_pipe_never_stops_the_daemon(world: World, tmp_path: Path) -> None:
    """stderr is a pipe whose reader goes away (the journal restarting, a dead `| logger`): the daemon
    keeps answering SIGUSR1 and publishing, and still stops with exit 0."""
    world.write_config(schedule={"interval": "1h"})
    world.manifest("a.toml", {**world.asset("a.bin", 1000, seed=1), "dest": "a.bin"})
    world.repo.commit("a")
    env = {
        k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")
    }
    proc = subprocess.Popen(
        [syncd_command(), "run", "-c", str(world.config_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if b'"pass_finished"' in line:
                break
        proc.stderr.close()  # the reader is gone: every later log write is EPIPE
        world.manifest("b.toml", {**world.asset("b.bin", 2000, seed=2), "dest": "b.bin"})
        world.repo.commit("b")
        deadline = time.monotonic() + 20
        while not (world.export / "b.bin").exists() and time.monotonic() < deadline:
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
        assert proc.poll() is None, "the daemon died of a broken log pipe"
        assert (world.export / "b.bin").read_bytes() == (world.blobs / "b.bin").read_bytes()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.parametrize("moment", ["during the pass", "after the pass, before the job returns"])
def test_a_pass_request_is_never_lost(tmp_path: Path, moment: str) -> None:
    """A request (SIGUSR1, /trigger) made while a pass runs, or in the moment after it when the job has
    not returned yet, gets exactly one more pass; never two at once."""
    conf = tmp_path / "syncd.conf"
    conf.write_text(
        f'[source]\nurl = "{(tmp_path / "repo.git").as_uri()}"\n'
        '[artifactory]\nurl = "http://127.0.0.1:1/a"\n'
        f'[export]\nroot = "{tmp_path / "export"}"\n[schedule]\ninterval = "1h"\n'
        f'[state]\ndirectory = "{tmp_path / "state"}"\n'
    )
    (tmp_path / "export").mkdir()
    d = syncd_daemon.Daemon(conf, syncd_config.load(conf))
    passes: list[float] = []
    at, go = threading.Event(), threading.Event()
    concurrent = threading.Lock()

    def fake_pass() -> None:
        assert concurrent.acquire(blocking=False), "two passes at once"
        try:
            passes.append(time.monotonic())
            if len(passes) == 1 and moment == "during the pass":
                at.set()
                go.wait(5)
        finally:
            concurrent.release()

    real_record = d._record_schedule

    def slow_record() -> None:
        real_record()
        if len(passes) == 1 and moment != "during the pass":
            at.set()
            go.wait(5)

    d.rec.run_pass = fake_pass  # type: ignore[method-assign]
    d._record_schedule = slow_record  # type: ignore[method-assign]
    d.scheduler.add_job(d._job, d._trigger(), id=syncd_daemon.JOB, next_run_time=datetime.now(UTC))
    d.scheduler.start()
    try:
        assert at.wait(5)
        d.pass_now()
        go.set()
        deadline = time.monotonic() + 5
        while len(passes) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert len(passes) == 2, passes
    finally:
        d._stop()
