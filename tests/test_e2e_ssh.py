"""End-to-end over a real sshd: key-pair auth, enforced known_hosts, bounded credential retries."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import World
from servers import Sshd

pytestmark = pytest.mark.e2e


def test_clone_then_fetch_over_ssh(ssh_world: World) -> None:
    """The first pass clones over ssh, the next fetches into the same bare clone."""
    a = ssh_world.asset("a.bin", 1000, seed=1)
    ssh_world.manifest("a.toml", {**a, "dest": "a.bin"})
    first = ssh_world.repo.commit("a")
    run = ssh_world.sync()
    assert run.code == 0, run.err
    assert run.one("git_fetched")["commit"] == first
    clone = ssh_world.state / "repo.git"
    assert (clone / "HEAD").is_file() and not (clone / ".git").exists()
    inode = clone.stat().st_ino
    b = ssh_world.asset("b.bin", 2000, seed=2)
    ssh_world.manifest("b.toml", {**b, "dest": "b.bin"})
    second = ssh_world.repo.commit("b")
    run = ssh_world.sync()
    assert run.code == 0, run.err
    assert run.one("git_fetched")["commit"] == second
    assert clone.stat().st_ino == inode  # fetched in place, never re-cloned
    data = (ssh_world.export / "b.bin").read_bytes()
    assert hashlib.sha256(data).hexdigest() == b["sha256"]


def test_wrong_host_key_is_refused(ssh_world: World, sshd: Sshd) -> None:
    """A known_hosts entry with another key for the host makes the fetch fail: exit 1, nothing synced."""
    shutil.copy(sshd.wrong_known_hosts, Path(ssh_world.source["known_hosts"]))
    a = ssh_world.asset("a.bin", 100, seed=3)
    ssh_world.manifest("a.toml", {**a, "dest": "a.bin"})
    ssh_world.repo.commit("a")
    run = ssh_world.sync()
    assert run.code == 1
    err = run.one("command_failed")["error"]
    assert "host key" in err and "127.0.0.1" in err
    assert ssh_world.export_files() == []
    assert not (ssh_world.state / "repo.git").exists()


def test_unknown_host_is_refused(ssh_world: World) -> None:
    """An empty known_hosts (host never seen) is refused, not trusted on first use."""
    Path(ssh_world.source["known_hosts"]).write_text("")
    a = ssh_world.asset("a.bin", 100, seed=4)
    ssh_world.manifest("a.toml", {**a, "dest": "a.bin"})
    ssh_world.repo.commit("a")
    run = ssh_world.sync()
    assert run.code == 1
    assert "host key" in run.one("command_failed")["error"]


def test_rejected_key_fails_without_looping(ssh_world: World) -> None:
    """A key the server does not accept fails the fetch promptly (no endless credential retries)."""
    key = Path(ssh_world.source["ssh_key"])
    key.unlink()
    Path(f"{key}.pub").unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    a = ssh_world.asset("a.bin", 100, seed=5)
    ssh_world.manifest("a.toml", {**a, "dest": "a.bin"})
    ssh_world.repo.commit("a")
    run = ssh_world.sync(timeout=60)
    assert run.code == 1
    err = run.one("command_failed")["error"]
    assert "rejected" in err or "authentication" in err.lower()


def test_git_unreachable_keeps_serving_last_commit(ssh_world: World, tmp_path: Path) -> None:
    """When git is unreachable after a first sync, the pass reconciles the cached commit and exits 1."""
    a = ssh_world.asset("a.bin", 100, seed=6)
    ssh_world.manifest("a.toml", {**a, "dest": "a.bin"})
    commit = ssh_world.repo.commit("a")
    assert ssh_world.sync().code == 0
    (ssh_world.export / "a.bin").unlink()
    ssh_world.source["known_hosts"] = str(tmp_path / "empty_known_hosts")
    (tmp_path / "empty_known_hosts").write_text("")
    ssh_world.write_config()
    run = ssh_world.sync()
    assert run.code == 1
    assert run.one("git_fetch_failed")["serving_commit"] == commit
    assert (ssh_world.export / "a.bin").exists()
