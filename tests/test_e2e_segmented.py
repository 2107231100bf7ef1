"""End to end: `syncd sync` downloads a big file in segments from a real nginx capped per connection, and
after a SIGKILL mid-download the next pass asks only for the ranges that are missing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import World, syncd_command
from servers import GitRepo, Nginx, start_nginx
from syncd.staging import staging_name

pytestmark = pytest.mark.e2e

MiB = 1 << 20


@pytest.fixture
def slow_nginx(tmp_path: Path) -> Iterator[Nginx]:
    """nginx with limit_rate 2 MiB/s per connection: a WAN-like cap, slow enough to kill mid-download."""
    server = start_nginx(tmp_path / "slow-nginx", limit_rate=2 * MiB)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def slow_world(tmp_path: Path, git_repo: GitRepo, slow_nginx: Nginx) -> World:
    w = World(tmp_path / "world", git_repo, slow_nginx)
    w.write_config(download={"segments": 4, "segment_min_size": "1MiB", "concurrency": 2, "timeout": "10s"})
    return w


def asked_ranges(nginx: Nginx, path: str, since: int) -> list[tuple[int, int]]:
    out = []
    for line in nginx.access_log.read_text()[since:].splitlines():
        if f" {path} " not in line:
            continue
        m = re.search(r"bytes=(\d+)-(\d+)", line)
        assert m, f"a request without a closed Range: {line}"
        out.append((int(m.group(1)), int(m.group(2)) + 1))
    return out


def test_segmented_sync_is_byte_exact_over_ranged_requests(slow_world: World) -> None:
    """`syncd sync` fetches a 12 MiB file over several ranged requests (no plain GET) and publishes it
    byte-exact (how much faster that is under a cap is bench/bench_sync.py's big-capped case)."""
    w = slow_world
    big = w.asset("w.bin", 12 * MiB, seed=1)
    w.manifest("m.toml", {**big, "dest": "models/w.bin"})
    w.repo.commit("add weights")
    since = len(w.nginx.access_log.read_text())
    run = w.sync()
    assert run.code == 0, run.err
    assert (w.export / "models/w.bin").read_bytes() == (w.blobs / "w.bin").read_bytes()
    time.sleep(0.1)
    assert len(asked_ranges(w.nginx, f"/bearer/{big['source']}", since)) >= 4


def test_sigkill_mid_segmented_download_resumes_only_missing_ranges(slow_world: World) -> None:
    """SIGKILL while the segments stream: the ranges recorded in the staging metadata are kept and the
    next pass asks nginx only for the rest; the result is byte-exact and nothing partial was ever at dest."""
    w = slow_world
    big = w.asset("w.bin", 24 * MiB, seed=2)
    w.manifest("m.toml", {**big, "dest": "models/w.bin"})
    w.repo.commit("add weights")
    meta = w.export / ".syncd-staging" / f"{staging_name('models/w.bin')}.meta"
    env = {k: v for k, v in os.environ.items() if k not in ("SYNCD_CONFIG", "NOTIFY_SOCKET")}
    proc = subprocess.Popen(
        [syncd_command(), "sync", "-c", str(w.config_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    kept: list[tuple[int, int]] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ranges = json.loads(meta.read_text()).get("ranges") or []
            except (FileNotFoundError, ValueError):
                ranges = []
            if sum(b - a for a, b in ranges) >= 6 * MiB:
                break
            assert not (w.export / "models/w.bin").exists()
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the download finished before it could be killed"
    assert not (w.export / "models/w.bin").exists()
    kept = [(a, b) for a, b in json.loads(meta.read_text())["ranges"]]
    kept_bytes = sum(b - a for a, b in kept)
    assert 6 * MiB <= kept_bytes < 24 * MiB
    data = (w.blobs / "w.bin").read_bytes()
    part = (meta.parent / f"{staging_name('models/w.bin')}.part").read_bytes()
    assert all(part[a:b] == data[a:b] for a, b in kept)

    since = len(w.nginx.access_log.read_text())
    run = w.sync()
    assert run.code == 0, run.err
    assert (w.export / "models/w.bin").read_bytes() == data
    assert run.one("asset_published")["dest"] == "models/w.bin"
    time.sleep(0.1)
    asked = asked_ranges(w.nginx, f"/bearer/{big['source']}", since)
    assert asked
    for a, b in asked:
        assert all(b <= ka or a >= kb for ka, kb in kept), f"asked {a}-{b} again, kept {kept}"
    # (Requested ranges may overlap one another: a split piece's first request still names its old end.)
    assert w.staging_files() == []
