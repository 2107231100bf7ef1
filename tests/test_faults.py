"""Download, disk and stop faults: never a partial file at dest, the ledger stays true, and the asset lands
by itself once the fault is gone.

Artifactory is a :class:`~servers.FaultServer` on loopback (routes ``/art/<source>``) so that each test can
cut, drip, truncate, corrupt or refuse one asset; the export is a real directory (a size-limited tmpfs for
ENOSPC). Every test runs the installed ``syncd`` as a subprocess.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import Run, World, parse_events, syncd_command
from servers import FaultServer, GitRepo, Nginx
from test_daemon import Daemon

pytestmark = pytest.mark.e2e

NOBODY = 65534
MiB = 1 << 20


# --------------------------------------------------------------------------- helpers


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ledger_rows(world: World, table: str) -> dict[str, tuple[Any, ...]]:
    """``published`` or ``failures`` rows by dest (empty when no ledger was written yet)."""
    path = world.state / "ledger.sqlite3"
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {r[0]: r for r in db.execute(f"SELECT * FROM {table}")}  # noqa: S608 (fixed names)
    finally:
        db.close()


def range_start(headers: dict[str, str]) -> int | None:
    """N of a ``Range: bytes=N-`` request header, else None."""
    m = re.fullmatch(r"bytes=(\d+)-", headers.get("range", "").strip())
    return int(m.group(1)) if m else None


def assert_landed(world: World, entry: dict[str, Any]) -> None:
    """``entry`` is at its dest byte for byte, read-only, and the ledger says so (and no failure)."""
    dest = world.export / entry["dest"]
    assert sha(dest) == entry["sha256"]
    assert dest.stat().st_size == entry["size"]
    assert stat.S_IMODE(dest.lstat().st_mode) == 0o444
    row = ledger_rows(world, "published")[entry["dest"]]
    assert (row[1], row[2], row[8]) == (entry["sha256"], entry["size"], None)
    assert entry["dest"] not in ledger_rows(world, "failures")


def assert_absent(world: World, entry: dict[str, Any], failed_passes: int | None = None) -> None:
    """Nothing at ``entry``'s dest, no published row; ``failed_passes`` failures recorded if given."""
    dest = world.export / entry["dest"]
    assert not dest.exists() and not dest.is_symlink(), f"{dest} must not exist"
    assert entry["dest"] not in ledger_rows(world, "published")
    if failed_passes is not None:
        row = ledger_rows(world, "failures")[entry["dest"]]
        assert (row[1], row[2]) == (entry["sha256"], failed_passes)


def partial_of(world: World) -> tuple[Path, Path] | None:
    """The one ``(part, meta)`` pair in staging, None when staging is empty; anything else fails."""
    names = world.staging_files()
    if not names:
        return None
    parts = [n for n in names if n.endswith(".part")]
    assert len(parts) == 1, names
    stem = parts[0].removesuffix(".part")
    assert sorted(names) == [f"{stem}.meta", f"{stem}.part"], names
    staging = world.export / ".syncd-staging"
    return staging / f"{stem}.part", staging / f"{stem}.meta"


class Faults:
    """A world whose Artifactory is a FaultServer: serve assets with faults, count their requests."""

    def __init__(self, world: World, server: FaultServer) -> None:
        self.world = world
        self.server = server
        self.bodies: dict[str, bytes] = {}
        self.config()

    def config(self, **download: Any) -> None:
        """Point the config at the FaultServer with short waits; ``download`` overrides [download] keys."""
        self.world.extra_config["artifactory"] = {"url": f"{self.server.url}/art"}
        self.world.extra_config["download"] = {
            "backoff": "50ms",
            "backoff_max": "200ms",
            "timeout": "2s",
            **download,
        }
        self.world.write_config()

    def serve(self, name: str, size: int, seed: int, dest: str | None = None, **route: Any) -> dict[str, Any]:
        """Create the asset's bytes, serve them (with ``route`` faults); return its manifest entry."""
        entry = {**self.world.asset(name, size, seed), "dest": dest or name}
        self.bodies[entry["source"]] = (self.world.blobs / name).read_bytes()
        self.route(entry, **route)
        return entry

    def route(self, entry: dict[str, Any], **route: Any) -> None:
        """(Re)register the asset's route: its true bytes unless ``body`` is given; no fault by default."""
        route.setdefault("body", self.bodies[entry["source"]])
        self.server.route(f"/art/{entry['source']}", **route)

    def gets(self, entry: dict[str, Any]) -> list[dict[str, str]]:
        """Headers of every GET of the asset so far."""
        path = f"/art/{entry['source']}"
        return [h for m, p, h in self.server.requests if m == "GET" and p == path]

    def commit(self, *entries: dict[str, Any], manifest: str = "m.toml") -> str:
        self.world.manifest(manifest, *entries)
        return self.world.repo.commit(f"{manifest}: {len(entries)} assets")


@pytest.fixture
def faults(world: World, fault_server: FaultServer) -> Faults:
    return Faults(world, fault_server)


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, str], None]]:
    """Mount a size-limited tmpfs on a directory (skip if not permitted); unmounted at teardown."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> None:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            text = proc.stderr.lower()
            if any(w in text for w in ("permission denied", "not permitted", "must be superuser")):
                pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
            raise AssertionError(f"mount tmpfs on {path} failed: {proc.stderr}")
        mounted.append(path)

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def remount(path: Path, size: str) -> None:
    """Grow (or shrink) a mounted tmpfs: the disk got freed."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)


# --------------------------------------------------------------------------- transport faults


def test_cut_once_resumes_within_the_pass(faults: Faults) -> None:
    """A connection cut mid-body is retried in the same pass and resumes with Range from the kept bytes."""
    a = faults.serve("a.bin", 300_000, seed=1, cut_at=100_000, cut_times=1)
    faults.commit(a)
    run = faults.world.sync()
    assert run.code == 0, run.err
    retry = run.one("asset_retry")
    assert (retry["dest"], retry["attempt"], retry["level"]) == ("a.bin", 1, "warning")
    gets = faults.gets(a)
    assert len(gets) == 2
    assert "range" not in gets[0]
    offset = range_start(gets[1])
    assert offset is not None and 0 < offset <= 100_000, gets[1]
    assert run.one("asset_published")["dest"] == "a.bin"
    assert_landed(faults.world, a)
    assert faults.world.staging_files() == []


def test_cut_every_attempt_keeps_partial_then_resumes(faults: Faults) -> None:
    """Cut on every attempt: exit 1 with the partial kept in staging; the next pass resumes it and lands."""
    faults.config(retries=3)
    a = faults.serve("a.bin", 1_000_000, seed=2, cut_at=50_000, cut_times=1000)
    faults.commit(a)
    run = faults.world.sync()
    assert run.code == 1
    failed = run.one("asset_failed")
    assert failed["dest"] == "a.bin" and failed["retry"] == "next pass"
    assert len(run.named("asset_retry")) == 2
    assert len(faults.gets(a)) == 3
    assert_absent(faults.world, a, failed_passes=1)
    kept = partial_of(faults.world)
    assert kept is not None, "a transport fault keeps the partial for resume"
    kept_bytes = kept[0].stat().st_size
    assert 0 < kept_bytes < a["size"]
    assert (faults.world.blobs / "a.bin").read_bytes()[:kept_bytes] == kept[0].read_bytes()

    faults.route(a)  # the network is healthy again
    faults.server.clear_requests()
    run = faults.world.sync()
    assert run.code == 0, run.err
    gets = faults.gets(a)
    assert len(gets) == 1 and range_start(gets[0]) == kept_bytes
    assert_landed(faults.world, a)
    assert faults.world.staging_files() == []


@pytest.mark.parametrize("status", [503, 429])
def test_retry_after_then_success(faults: Faults, status: int) -> None:
    """503/429 with Retry-After: 0 twice, then 200: retried within the same pass, exit 0."""
    a = faults.serve("a.bin", 50_000, seed=3, faults=[(status, {"Retry-After": "0"})] * 2)
    faults.commit(a)
    run = faults.world.sync()
    assert run.code == 0, run.err
    retries = run.named("asset_retry")
    assert [r["attempt"] for r in retries] == [1, 2]
    assert all(f"HTTP {status}" in r["error"] for r in retries)
    assert len(faults.gets(a)) == 3
    assert_landed(faults.world, a)


def test_long_retry_after_is_capped_by_backoff_max(faults: Faults) -> None:
    """A Retry-After of an hour waits at most backoff_max, and the asset lands in the same pass."""
    a = faults.serve("a.bin", 10_000, seed=4, faults=[(503, {"Retry-After": "3600"})])
    faults.commit(a)
    started = time.monotonic()
    run = faults.world.sync(timeout=60)
    assert run.code == 0, run.err
    assert time.monotonic() - started < 30
    assert run.one("asset_retry")["wait_s"] <= 0.2
    assert_landed(faults.world, a)


def test_500_on_every_attempt_uses_exactly_the_retries(faults: Faults) -> None:
    """HTTP 500 on every attempt: exactly [download] retries requests, exit 1; next pass (fixed) lands."""
    faults.config(retries=3)
    a = faults.serve("a.bin", 20_000, seed=5, faults=[(500, {})] * 100)
    faults.commit(a)
    run = faults.world.sync()
    assert run.code == 1
    assert len(faults.gets(a)) == 3
    assert len(run.named("asset_retry")) == 2
    assert "HTTP 500" in run.one("asset_failed")["error"]
    assert_absent(faults.world, a, failed_passes=1)
    assert faults.world.staging_files() == []

    faults.route(a)
    run = faults.world.sync()
    assert run.code == 0, run.err
    assert_landed(faults.world, a)


@pytest.mark.parametrize("status", [404, 401, 403])
def test_client_errors_are_not_retried_within_the_pass(faults: Faults, status: int) -> None:
    """404/401/403: one request, no retry in the pass, exit 1 naming the status; next pass (fixed) lands."""
    a = faults.serve("a.bin", 20_000, seed=6, faults=[(status, {})] * 100)
    faults.commit(a)
    run = faults.world.sync()
    assert run.code == 1
    assert len(faults.gets(a)) == 1
    assert run.named("asset_retry") == []
    failed = run.one("asset_failed")
    assert f"HTTP {status}" in failed["error"] and failed["retry"] == "next pass"
    assert_absent(faults.world, a, failed_passes=1)
    assert faults.world.staging_files() == []

    faults.route(a)
    faults.server.clear_requests()
    run = faults.world.sync()  # a one-shot sync ignores the across-pass backoff
    assert run.code == 0, run.err
    assert len(faults.gets(a)) == 1
    assert_landed(faults.world, a)


def test_truncated_body_is_retried_and_never_published(faults: Faults) -> None:
    """A body that ends early (no Content-Length) is retried, fails, and nothing reaches dest."""
    faults.config(retries=3)
    a = faults.serve("a.bin", 200_000, seed=7)
    faults.route(a, body=faults.bodies[a["source"]][:150_000], send_length=False)
    faults.commit(a)
    run = faults.world.sync()
    assert run.code == 1
    retries = run.named("asset_retry")
    assert retries and "ended after 150000 of 200000 bytes" in retries[0]["error"]
    assert len(faults.gets(a)) >= 2
    assert run.one("asset_failed")["dest"] == "a.bin"
    assert_absent(faults.world, a, failed_passes=1)
    kept = partial_of(faults.world)
    if kept is not None:  # a kept partial holds only true bytes
        data = kept[0].read_bytes()
        assert data == faults.bodies[a["source"]][: len(data)]

    faults.route(a)
    run = faults.world.sync()
    assert run.code == 0, run.err
    assert_landed(faults.world, a)
    assert faults.world.staging_files() == []


def test_wrong_bytes_are_not_retried_and_not_kept(faults: Faults) -> None:
    """Same length, wrong bytes: sha256 mismatch, one request, nothing at dest, nothing kept in staging."""
    a = faults.serve("a.bin", 100_000, seed=8)
    faults.route(a, body=os.urandom(a["size"]))
    faults.commit(a)
    run = faults.world.sync()
    assert run.code == 1
    assert len(faults.gets(a)) == 1
    assert run.named("asset_retry") == []
    assert "sha256 mismatch" in run.one("asset_failed")["error"]
    assert_absent(faults.world, a, failed_passes=1)
    assert faults.world.staging_files() == []

    faults.route(a)
    run = faults.world.sync()
    assert run.code == 0, run.err
    assert_landed(faults.world, a)


def test_range_ignored_restarts_the_download(faults: Faults) -> None:
    """With a partial kept, a server that ignores Range sends 200: the download starts over, byte-exact."""
    faults.config(retries=1)
    a = faults.serve("a.bin", 400_000, seed=9, cut_at=100_000, cut_times=1)
    faults.commit(a)
    assert faults.world.sync().code == 1
    kept = partial_of(faults.world)
    assert kept is not None and kept[0].stat().st_size == 100_000

    faults.route(a, ranges=False)
    faults.server.clear_requests()
    run = faults.world.sync()
    assert run.code == 0, run.err
    gets = faults.gets(a)
    assert len(gets) == 1 and range_start(gets[0]) == 100_000  # asked to resume, got the whole file
    assert_landed(faults.world, a)
    assert faults.world.staging_files() == []


def test_slow_drip_fails_too_slow_in_bounded_time(faults: Faults) -> None:
    """A server dripping 100 bytes/s fails the asset as 'too slow' within seconds; next pass (fixed) lands."""
    faults.config(timeout="1s", retries=2)
    a = faults.serve("a.bin", 100_000, seed=10, drip=(50, 0.5))
    faults.commit(a)
    started = time.monotonic()
    run = faults.world.sync(timeout=60)
    took = time.monotonic() - started
    assert run.code == 1
    assert "too slow" in run.one("asset_failed")["error"]
    assert took < 30, f"syncd took {took:.1f}s"
    assert_absent(faults.world, a, failed_passes=1)

    faults.route(a)
    run = faults.world.sync()
    assert run.code == 0, run.err
    assert_landed(faults.world, a)
    assert faults.world.staging_files() == []


def test_stuck_server_is_bounded_by_the_timeout(faults: Faults) -> None:
    """A server that never answers within [download] timeout fails the asset in bounded time, exit 1."""
    faults.config(timeout="1s", retries=2)
    a = faults.serve("a.bin", 10_000, seed=11, delay=4.0)
    faults.commit(a)
    started = time.monotonic()
    run = faults.world.sync(timeout=60)
    took = time.monotonic() - started
    assert run.code == 1
    failed = run.one("asset_failed")
    assert "timeout" in failed["error"].lower(), failed
    assert took < 15, f"syncd took {took:.1f}s"
    assert_absent(faults.world, a, failed_passes=1)

    faults.route(a)
    run = faults.world.sync()
    assert run.code == 0, run.err
    assert_landed(faults.world, a)


# --------------------------------------------------------------------------- disk faults


def test_not_enough_space_fails_fast(faults: Faults, tmpfs: Callable[[Path, str], None]) -> None:
    """An asset bigger than the free space fails before any request, leaves no staging file; one that
    fits lands; once space is freed the next pass publishes the big one."""
    world = faults.world
    tmpfs(world.export, "4m")
    blocker = world.export / "blocker.fill"
    blocker.write_bytes(b"\0" * (5 * MiB // 2))
    big = faults.serve("big.bin", 2 * MiB, seed=12, dest="big/big.bin")
    small = faults.serve("small.bin", 300_000, seed=13)
    faults.commit(big, small)
    run = world.sync()
    assert run.code == 1
    failed = run.one("asset_failed")
    assert failed["dest"] == "big/big.bin" and "not enough space" in failed["error"]
    assert faults.gets(big) == []  # refused before downloading a byte
    assert run.one("asset_published")["dest"] == "small.bin"
    assert_landed(world, small)
    assert_absent(world, big, failed_passes=1)
    assert world.staging_files() == []

    blocker.unlink()  # the operator freed the disk
    run = world.sync()
    assert run.code == 0, run.err
    assert_landed(world, big)
    assert world.staging_files() == []


def test_enospc_mid_write(faults: Faults, tmpfs: Callable[[Path, str], None]) -> None:
    """Two 1.5 MiB assets on a 2 MiB export both pass the space check; the one that writes second hits
    ENOSPC: it fails with 'no space left', its staging file is removed, the other lands; exit 1."""
    world = faults.world
    tmpfs(world.export, "2m")
    faults.config(concurrency=2)
    size = 3 * MiB // 2
    # Both are staged (and pass the check) at once; a's bytes come first, b's once a has landed.
    a = faults.serve("a.bin", size, seed=14, delay=0.3)
    b = faults.serve("b.bin", size, seed=15, delay=1.5)
    faults.commit(a, b)
    run = world.sync()
    assert run.code == 1
    assert run.named("asset_failed") and all(e["dest"] == "b.bin" for e in run.named("asset_failed"))
    assert "no space left" in run.one("asset_failed")["error"]
    assert run.one("asset_published")["dest"] == "a.bin"
    assert_landed(world, a)
    assert_absent(world, b, failed_passes=1)
    assert world.staging_files() == []

    remount(world.export, "8m")  # the disk got bigger
    run = world.sync()
    assert run.code == 0, run.err
    assert_landed(world, b)
    assert world.staging_files() == []


@pytest.fixture
def open_world(nginx: Nginx, fault_server: FaultServer) -> Iterator[Faults]:
    """A world under a directory any user can traverse (pytest's tmp dirs are 0700), for runs as nobody."""
    base = Path(tempfile.mkdtemp(prefix="syncd-eacces-"))
    base.chmod(0o755)
    try:
        repo = GitRepo(base / "remote" / "manifests.git", base / "work" / "manifests")
        yield Faults(World(base / "world", repo, nginx), fault_server)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def tree(root: Path, skip: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every path under ``root`` (except ``skip``) with mode, owner, size and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (
                st.st_mode,
                st.st_uid,
                st.st_size,
                st.st_mtime_ns,
            )
    return out


def owned_by_nobody(skip: Path) -> set[str]:
    """Paths in the usual scratch places owned by nobody (except under ``skip``)."""
    found = set()
    for top in ("/tmp", "/var/tmp", "/dev/shm"):
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if not Path(dirpath, d).is_relative_to(skip)]
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                try:
                    if os.lstat(p).st_uid == NOBODY:
                        found.add(p)
                except OSError:
                    continue
    return found


def sync_as_nobody(world: World) -> Run:
    env = {k: v for k, v in os.environ.items() if k != "SYNCD_CONFIG"}
    env["HOME"] = "/nonexistent"
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    proc = subprocess.run(
        [*cmd, syncd_command(), "sync", "-c", str(world.config_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr, parse_events(proc.stderr))


def test_export_not_writable(open_world: Faults) -> None:
    """An export the service user cannot write: exit 1 with a permission error, nothing written anywhere;
    once the export is writable the next pass publishes."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    faults, world = open_world, open_world.world
    a = faults.serve("a.bin", 30_000, seed=16, dest="sub/a.bin")
    faults.commit(a)
    # The service user owns its state and its token; the export belongs to root, mode 0755.
    os.chown(world.config_path.parent / "artifactory.token", NOBODY, NOBODY)
    world.state.mkdir(mode=0o700)
    os.chown(world.state, NOBODY, NOBODY)
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(world.repo.bare_path)], check=True)
    world.export.chmod(0o755)
    before = tree(world.base, skip=world.state)
    strays_before = owned_by_nobody(skip=world.state)

    run = sync_as_nobody(world)
    assert run.code == 1, run.err
    error = run.one("command_failed")["error"]
    assert "permission denied" in error.lower() and str(world.export) in error
    assert tree(world.base, skip=world.state) == before  # export untouched, no staging anywhere
    assert owned_by_nobody(skip=world.state) - strays_before == set()
    assert ledger_rows(world, "published") == {}

    os.chown(world.export, NOBODY, NOBODY)
    run = sync_as_nobody(world)
    assert run.code == 0, run.err
    assert_landed(world, a)
    assert (world.export / "sub/a.bin").stat().st_uid == NOBODY
    assert world.staging_files() == []


# --------------------------------------------------------------------------- the daemon


def test_sigterm_mid_download_keeps_only_a_resumable_partial(faults: Faults, tmp_path: Path) -> None:
    """SIGTERM while a drip-fed download runs: exit 0 in seconds, nothing at dest, at most the partial in
    staging, no failure counted; a later sync resumes it and publishes."""
    world = faults.world
    world.extra_config["schedule"] = {"interval": "1h"}
    world.write_config()
    big = faults.serve("big.bin", 20 * MiB, seed=17, drip=(64 * 1024, 0.05))
    faults.commit(big)
    d = Daemon(world, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not any(p.stat().st_size > 0 for p in (world.export / ".syncd-staging").glob("*.part")):
            assert time.monotonic() < deadline, f"the download never started: {d.events}"
            time.sleep(0.05)
        started = time.monotonic()
        assert d.stop(timeout=10) == 0
        assert time.monotonic() - started < 5
    finally:
        d.close()
    assert d.named("daemon_stopped")
    assert_absent(world, big)
    assert big["dest"] not in ledger_rows(world, "failures")  # a stop is not the asset's fault
    kept = partial_of(world)
    kept_bytes = kept[0].stat().st_size if kept else 0
    if kept:
        assert kept_bytes < big["size"]
        assert faults.bodies[big["source"]][:kept_bytes] == kept[0].read_bytes()

    faults.route(big)
    faults.server.clear_requests()
    run = world.sync()
    assert run.code == 0, run.err
    gets = faults.gets(big)
    assert len(gets) == 1
    assert range_start(gets[0]) == (kept_bytes or None)
    assert_landed(world, big)
    assert world.staging_files() == []


def test_daemon_backs_off_across_passes_but_sync_does_not(faults: Faults, tmp_path: Path) -> None:
    """syncd run: after a 404 the asset is deferred on later passes (no request every interval); a manual
    syncd sync tries it at once; once uploaded it lands."""
    world = faults.world
    world.extra_config["schedule"] = {"interval": "1s", "jitter": 0}
    world.write_config()
    ok = faults.serve("ok.bin", 1000, seed=18)
    bad = faults.serve("bad.bin", 1000, seed=19, faults=[(404, {})] * 100)
    faults.commit(ok, bad)
    d = Daemon(world, tmp_path)
    try:
        d.wait_event("asset_failed")
        first = len(d.named("pass_finished"))
        d.wait_event("pass_finished", count=first + 5, timeout=30)
        assert d.stop() == 0
    finally:
        d.close()
    assert len(d.named("asset_failed")) == 1
    assert len(faults.gets(bad)) in (1, 2), "a failing asset must not be fetched every interval"
    deferred = [e for e in d.named("asset_deferred") if e["dest"] == "bad.bin"]
    assert len(deferred) >= 4
    assert "next try after" in deferred[0]["reason"]
    assert_landed(world, ok)
    assert_absent(world, bad, failed_passes=len(faults.gets(bad)))

    faults.server.clear_requests()
    run = world.sync()  # by hand: no backoff
    assert run.code == 1
    assert len(faults.gets(bad)) == 1
    assert "HTTP 404" in run.one("asset_failed")["error"]

    faults.route(bad)  # the missing upload arrives
    run = world.sync()
    assert run.code == 0, run.err
    assert_landed(world, bad)
