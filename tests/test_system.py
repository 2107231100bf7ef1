"""System tests: the shipped syncd.service under a real systemd (a Debian tree booted with systemd-nspawn).

One container per module: the cached debootstrap tree (see container.py) is copied, and the release
artifact (scripts/release) is installed by its own install.sh, as on a host with no network:
/opt/syncd/<version> and /opt/syncd/current, ``packaging/syncd.service`` unchanged as
/usr/lib/systemd/system/syncd.service, ``packaging/syncd.sysusers`` making the user. syncd pulls manifests
from the session's sshd and assets from its nginx on the host's loopback (the container shares the host's
network). Test-specific unit settings go in drop-ins only.

Time here: about 50 s with the cached tree (15-20 s of it to copy the tree, build and install the wheels and
boot); about 100 s on a machine that must first build the tree (debootstrap, about 55 s more).
Skipped only when debootstrap or systemd-nspawn is not installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from container import (
    Container,
    boot,
    build_release,
    install_file,
    install_release,
    missing_tools,
    prepare_root,
    remove_root,
    user_ids,
)
from harness import manifest_text, to_toml
from mailservers import SmtpServer
from servers import GitRepo, Nginx, Sshd, free_port, make_asset, make_test_ca

if _missing := missing_tools():
    pytest.skip(
        f"system tests need {', '.join(_missing)} (apt-get install debootstrap systemd-container)",
        allow_module_level=True,
    )

# The first test also builds the cached tree on a fresh machine (debootstrap, about a minute).
pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

PROJECT = Path(__file__).resolve().parents[1]
UNIT = PROJECT / "packaging" / "syncd.service"
CONFIG = "/etc/syncd/syncd.conf"
EXPORT = "/srv/nfs/ml-assets"
DROPIN = "/etc/systemd/system/syncd.service.d/50-test-watchdog.conf"
# Passes then run at start, on SIGUSR1 and on a reloaded interval only: each test says which pass it awaits.
QUIET_INTERVAL = "10m"
SYNCED = re.compile(
    r"^in sync at (?P<commit>[0-9a-f]{7}) · (?P<count>\d+) assets · [0-9.]+ [KMGT]?i?B · "
    r"next poll \d\d:\d\d:\d\d UTC$"
)
PRIORITY = {"debug": "7", "info": "6", "warning": "4", "error": "3", "critical": "2"}  # journald's, by level
T = TypeVar("T")


@dataclass
class System:
    """The booted container with syncd installed, and the host side of its world (repo, nginx)."""

    box: Container
    repo: GitRepo
    nginx: Nginx
    tag: str
    uid: int
    gid: int

    @property
    def export(self) -> Path:
        """The export root as seen from the host (inside the container tree)."""
        return self.box.root / EXPORT.lstrip("/")

    @property
    def blobs(self) -> Path:
        return self.nginx.root / self.tag

    # syncd's world ------------------------------------------------------------------------------
    def write_config(self, interval: str = QUIET_INTERVAL, **extra: dict[str, Any]) -> None:
        """Install /etc/syncd/syncd.conf; secrets are relative names, found in $CREDENTIALS_DIRECTORY."""
        cfg = {
            "source": {
                "url": self.repo.url,
                "branch": "main",
                "path": "assets",
                "ssh_key": "id_ed25519",
                "known_hosts": "/etc/syncd/known_hosts",
            },
            "artifactory": {"url": self.nginx.bearer_url(), "token_file": "artifactory.token"},
            "export": {"root": EXPORT},
            "download": {"timeout": "10s"},
            "schedule": {"interval": interval},
            **extra,
        }
        install_file(self.box.root, CONFIG, to_toml(cfg))

    def asset(self, name: str, size: int, seed: int) -> dict[str, Any]:
        """Upload a blob to nginx ("Artifactory"); return its manifest fields."""
        sha, n = make_asset(self.blobs, name, size, seed)
        return {"source": f"{self.tag}/{name}", "sha256": sha, "size": n}

    def merge(self, path: str, *assets: dict[str, Any]) -> str:
        """Commit ``assets/<path>`` with these assets (none: delete it) and push; return the commit."""
        if assets:
            self.repo.write(f"assets/{path}", manifest_text(*assets))
        else:
            self.repo.remove(f"assets/{path}")
        return self.repo.commit(f"assets/{path}")

    # systemd ------------------------------------------------------------------------------------
    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return self.box.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, prop: str) -> str:
        return self.systemctl("show", "-p", prop, "--value", "syncd").stdout.rstrip("\n")

    def main_pid(self) -> int:
        return int(self.show("MainPID"))

    def status(self) -> str:
        return self.show("StatusText")

    def start(self) -> None:
        """Start syncd (the start-rate counter reset first: tests start it more often than ops would)."""
        self.systemctl("reset-failed", "syncd", check=False)
        self.systemctl("start", "syncd", timeout=150)

    def ensure_running(self) -> None:
        """Start syncd unless it is active; wait until its last pass has synced."""
        if self.systemctl("is-active", "syncd", check=False).stdout.strip() != "active":
            self.start()
        self.wait("syncd to report synced", lambda: SYNCED.match(self.status()))

    def usr1(self) -> None:
        """The post-merge hook: ``systemctl kill -s USR1 syncd`` (a pass now)."""
        self.systemctl("kill", "-s", "USR1", "syncd")

    def journal(self, *args: str) -> list[dict[str, Any]]:
        """``journalctl -u syncd -o json ARGS``, one dict per entry."""
        out = self.box.run("journalctl", "--no-pager", "-u", "syncd", "-o", "json", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def events(self, *args: str) -> list[dict[str, Any]]:
        """syncd's own entries (those with SYNCD_EVENT) of :meth:`journal`."""
        return [e for e in self.journal(*args) if "SYNCD_EVENT" in e]

    def cursor(self) -> str:
        """The journal's position now: :meth:`since` it gives the entries that came after."""
        last = self.box.run("journalctl", "--no-pager", "-n", "1", "-o", "json").stdout.splitlines()
        return str(json.loads(last[-1])["__CURSOR"])

    def since(self, cursor: str, event: str | None = None) -> list[dict[str, Any]]:
        """The unit's entries after ``cursor`` (syncd's, or systemd's about it), only ``event``'s if given.

        Filtered here, not by journalctl: bookworm's journalctl (252) given ``--after-cursor`` and a match
        skips the first matching entry after the cursor (systemd issue 30288, fixed in 255).
        """
        out = self.box.run("journalctl", "--no-pager", "-o", "json", f"--after-cursor={cursor}").stdout
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        mine = [e for e in entries if "syncd.service" in (e.get("_SYSTEMD_UNIT"), e.get("UNIT"))]
        return [e for e in mine if event is None or e.get("SYNCD_EVENT") == event]

    def wait_events(self, cursor: str, event: str, timeout: float = 30) -> list[dict[str, Any]]:
        """The ``event`` entries after ``cursor``, once there (journald lags a little behind)."""
        return self.wait(f"a {event} event", lambda: self.since(cursor, event), timeout)

    def wait(self, what: str, probe: Callable[[], T | None], timeout: float = 30, every: float = 0.2) -> T:
        """Poll ``probe`` until it returns something truthy; after ``timeout``, fail with the journal."""
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                tail = self.box.run("journalctl", "--no-pager", "-u", "syncd", "-n", "25", "-o", "cat").stdout
                raise AssertionError(
                    f"no {what} within {timeout}s; last value {value!r}; status {self.status()!r}\n{tail}"
                )
            time.sleep(every)

    def staging_files(self) -> list[str]:
        return sorted(n for n in os.listdir(self.export / ".syncd-staging") if n != ".syncd-staging.lock")


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, sshd: Sshd, nginx: Nginx) -> Iterator[System]:
    """A booted container with syncd installed and configured, the service not started yet."""
    base = tmp_path_factory.mktemp("system")
    root, _ = prepare_root(base / "root")
    try:
        # The release artifact, installed by its own install.sh as on a host with no network.
        installed = install_release(root, build_release(PROJECT, base / "dist"))
        assert installed.splitlines()[-1].startswith("syncd-install: changed"), installed
        uid, gid = user_ids(root, "syncd")
        assert (root / "usr/lib/systemd/system/syncd.service").read_bytes() == UNIT.read_bytes()
        install_file(root, "/etc/syncd/id_ed25519", sshd.client_key.read_bytes(), mode=0o600)
        install_file(root, "/etc/syncd/known_hosts", sshd.known_hosts.read_bytes())
        install_file(root, "/etc/syncd/artifactory.token", nginx.token + "\n", mode=0o600)
        (root / EXPORT.lstrip("/")).mkdir(parents=True)
        os.chown(root / EXPORT.lstrip("/"), uid, gid)
        name = f"system-{uuid.uuid4().hex[:8]}.git"
        repo = GitRepo(sshd.repos_dir / name, base / "work", url=sshd.url(name))
        box = boot(root, base / "console.log")
        try:
            system = System(box, repo, nginx, uuid.uuid4().hex[:8], uid, gid)
            system.write_config()
            system.merge("first.toml", {**system.asset("first.bin", 4096, seed=1), "dest": "first/first.bin"})
            yield system
        finally:
            box.poweroff()
    finally:
        remove_root(root)


@pytest.fixture
def syncd(system: System) -> System:
    """The system with syncd active and its last pass synced."""
    system.ensure_running()
    return system


def test_start_reaches_active_with_status(system: System) -> None:
    """`systemctl start syncd` returns after READY=1: the unit is active and STATUS says what was synced."""
    if system.systemctl("is-active", "syncd", check=False).stdout.strip() == "active":
        system.systemctl("stop", "syncd", timeout=120)
    system.start()
    # Type=notify: start returns, and the unit is "active", only once syncd has sent READY=1.
    assert system.show("Type") == "notify"
    assert system.systemctl("is-active", "syncd").stdout.strip() == "active"
    assert system.show("SubState") == "running"
    assert system.status(), "READY=1 came without a STATUS= line"
    match = system.wait("a 'synced' status", lambda: SYNCED.match(system.status()))
    assert match["commit"] == system.repo.head()[:7]
    first = system.export / "first/first.bin"
    assert (
        hashlib.sha256(first.read_bytes()).hexdigest()
        == hashlib.sha256((system.blobs / "first.bin").read_bytes()).hexdigest()
    )


def test_merged_asset_appears_after_sigusr1(syncd: System) -> None:
    """An asset merged into the repo lands byte-exact in the export after `systemctl kill -s USR1 syncd`."""
    asset = syncd.asset("merged.bin", 300_000, seed=2)
    commit = syncd.merge("merged.toml", {**asset, "dest": "models/merged.bin"})
    cursor = syncd.cursor()
    syncd.usr1()  # the interval is 10 minutes: only this signal can bring the asset in now
    dest = syncd.export / "models/merged.bin"
    syncd.wait("models/merged.bin in the export", lambda: dest.exists())
    assert dest.read_bytes() == (syncd.blobs / "merged.bin").read_bytes()
    assert dest.stat().st_mode & 0o777 == 0o444
    syncd.wait_events(cursor, "pass_finished")
    assert [e["SYNCD_WHEN"] for e in syncd.since(cursor, "pass_requested")] == ["now"]
    published = syncd.since(cursor, "asset_published")
    assert [(e["SYNCD_DEST"], e["SYNCD_COMMIT"]) for e in published] == [("models/merged.bin", commit)]
    # The audit log, written under the unit's sandbox, is in the journal too (SYNCD_AUDIT=1 for a SIEM).
    audited = [e for e in syncd.journal("SYNCD_AUDIT=1") if e.get("SYNCD_DEST") == "models/merged.bin"]
    assert [e["SYNCD_AUDIT_EVENT"] for e in audited] == ["published"], audited
    assert json.loads(audited[0]["SYNCD_RECORD"])["commit"] == commit
    syncd.wait(
        "a 'synced' status at the merge", lambda: syncd.status().startswith(f"in sync at {commit[:7]} ")
    )


def test_runs_as_syncd_and_owns_the_export(syncd: System) -> None:
    """The service runs as the sysusers-made `syncd` user, and nothing in the export or state is root's."""
    pid = syncd.main_pid()
    status = syncd.box.run("cat", f"/proc/{pid}/status").stdout
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
    gids = re.search(r"^Gid:\s+(.*)$", status, re.M)
    assert uids and uids[1].split() == [str(syncd.uid)] * 4
    assert gids and gids[1].split() == [str(syncd.gid)] * 4
    assert syncd.box.run("ps", "-o", "user=", "-p", str(pid)).stdout.strip() == "syncd"
    owners = {}
    for top in (syncd.export, syncd.box.root / "var/lib/syncd"):
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [".", *dirnames, *filenames]:
                path = Path(dirpath, name)
                owners[str(path.relative_to(syncd.box.root))] = (path.lstat().st_uid, path.lstat().st_gid)
    assert "var/lib/syncd/repo.git" in owners and "srv/nfs/ml-assets/first/first.bin" in owners
    assert {path: ids for path, ids in owners.items() if ids != (syncd.uid, syncd.gid)} == {}


def test_status_shows_status_line(syncd: System) -> None:
    """`systemctl status syncd` shows the unit running and syncd's STATUS line."""
    text = syncd.status()
    out = syncd.systemctl("status", "-l", "syncd").stdout
    assert "Active: active (running)" in out
    assert f'Status: "{text}"' in out
    assert SYNCED.match(text)


def test_journal_has_json_messages_and_fields(syncd: System) -> None:
    """`journalctl -u syncd -o json` entries carry a JSON MESSAGE and SYNCD_* fields, which filters match."""
    entries = syncd.events()
    assert entries, "no entry with SYNCD_EVENT in journalctl -u syncd"
    for entry in entries:
        message = json.loads(entry["MESSAGE"])
        assert isinstance(message, dict)
        assert message["event"] == entry["SYNCD_EVENT"]
        assert entry["SYSLOG_IDENTIFIER"] == "syncd" and entry["_UID"] == str(syncd.uid)
        assert entry["PRIORITY"] == PRIORITY[message["level"]]
        if "dest" in message:
            assert entry["SYNCD_DEST"] == message["dest"]
    published = syncd.events("SYNCD_EVENT=asset_published")
    assert {e["SYNCD_DEST"] for e in published} >= {"first/first.bin"}
    assert all(json.loads(e["MESSAGE"])["event"] == "asset_published" for e in published)
    by_dest = syncd.events("SYNCD_DEST=first/first.bin")
    assert by_dest and {e["SYNCD_DEST"] for e in by_dest} == {"first/first.bin"}
    started = syncd.events("SYNCD_EVENT=daemon_started")
    assert started and started[-1]["SYNCD_EXPORT_ROOT"] == EXPORT


def test_failed_asset_shows_in_err_priority_and_status(syncd: System) -> None:
    """An asset whose sha256 does not match is an error in `journalctl -p err` and in the STATUS line."""
    asset = {**syncd.asset("bad.bin", 5000, seed=3), "sha256": "0" * 64, "dest": "bad/bad.bin"}
    syncd.merge("bad.toml", asset)
    cursor = syncd.cursor()
    try:
        syncd.usr1()
        text = syncd.wait(
            "a '1 failing' status",
            lambda: s if (s := syncd.status()).startswith("1 failing · serving ") else None,
        )
        assert "last success" in text and text.endswith("(syncd status)")
        syncd.wait_events(cursor, "pass_finished")
        errors = syncd.journal("-p", "err")
        assert all(int(e["PRIORITY"]) <= 3 for e in errors)
        failed = [e for e in errors if e.get("SYNCD_EVENT") == "asset_failed"]
        assert [e["SYNCD_DEST"] for e in failed] == ["bad/bad.bin"]
        assert failed[0]["PRIORITY"] == "3"
        message = json.loads(failed[0]["MESSAGE"])
        assert message["level"] == "error" and "sha256" in message["error"]
        assert not (syncd.export / "bad/bad.bin").exists()
        assert syncd.staging_files() == []
    finally:
        fixed = syncd.merge("bad.toml")
        syncd.usr1()
        syncd.wait(
            "a 'synced' status after the fix", lambda: syncd.status().startswith(f"in sync at {fixed[:7]} ")
        )


def test_reload_applies_new_interval(syncd: System) -> None:
    """`systemctl reload syncd` re-reads the config in place: same MainPID, the new interval in force."""
    pid = syncd.main_pid()
    cursor = syncd.cursor()
    syncd.write_config(interval="2s")
    try:
        syncd.systemctl("reload", "syncd")
        reloaded = syncd.wait_events(cursor, "config_reloaded")
        assert [float(e["SYNCD_INTERVAL_S"]) for e in reloaded] == [2.0]
        assert syncd.main_pid() == pid
        assert syncd.systemctl("is-active", "syncd").stdout.strip() == "active"
        # No signal this time: the 2 s schedule alone brings a newly merged asset in.
        asset = syncd.asset("scheduled.bin", 2000, seed=4)
        syncd.merge("scheduled.toml", {**asset, "dest": "scheduled.bin"})
        dest = syncd.export / "scheduled.bin"
        syncd.wait("scheduled.bin from a scheduled pass", lambda: dest.exists(), timeout=20)
        assert dest.read_bytes() == (syncd.blobs / "scheduled.bin").read_bytes()
        assert syncd.since(cursor, "pass_requested") == []
        assert syncd.main_pid() == pid
    finally:
        cursor = syncd.cursor()
        syncd.write_config()
        syncd.systemctl("reload", "syncd")
        back = syncd.wait_events(cursor, "config_reloaded")
        assert float(back[-1]["SYNCD_INTERVAL_S"]) == 600.0


def test_watchdog_stall_restarts_service(syncd: System) -> None:
    """A main loop that stops pinging (SIGSTOP) is killed by the watchdog and restarted."""
    install_file(syncd.box.root, DROPIN, "[Service]\nWatchdogSec=3s\nRestartSec=1s\n")
    try:
        syncd.systemctl("daemon-reload")
        syncd.systemctl("reset-failed", "syncd", check=False)
        syncd.systemctl("restart", "syncd", timeout=150)
        assert syncd.show("WatchdogUSec") == "3s"
        syncd.wait("a 'synced' status", lambda: SYNCED.match(syncd.status()))
        time.sleep(4)  # longer than WatchdogSec: the pings keep a healthy service alive
        pid, restarts = syncd.main_pid(), int(syncd.show("NRestarts"))
        assert syncd.systemctl("is-active", "syncd").stdout.strip() == "active"
        cursor = syncd.cursor()
        syncd.box.run("kill", "-STOP", str(pid))

        def restarted() -> bool:
            new = syncd.main_pid()
            return new not in (0, pid) and syncd.show("ActiveState") == "active"

        syncd.wait("a restart after the watchdog timeout", restarted, timeout=20)
        assert int(syncd.show("NRestarts")) == restarts + 1
        syncd.wait(
            "systemd's watchdog timeout message",
            lambda: any("Watchdog timeout" in e.get("MESSAGE", "") for e in syncd.since(cursor)),
        )
        syncd.wait("a 'synced' status after the restart", lambda: SYNCED.match(syncd.status()))
    finally:
        (syncd.box.root / DROPIN.lstrip("/")).unlink()
        syncd.systemctl("daemon-reload")
        syncd.systemctl("reset-failed", "syncd", check=False)
        syncd.systemctl("restart", "syncd", timeout=150)
    assert syncd.show("WatchdogUSec") == "2min"


def test_stop_during_download_is_prompt_and_resumable(syncd: System) -> None:
    """A stop mid-download exits 0 at once; staging keeps at most that download's resume data, and a restart
    completes the asset byte-exact with staging empty."""
    size = 1 << 30  # 1 GiB of zeros, sparse on the host: big enough to still be downloading at the stop
    big = syncd.blobs / "big.bin"
    with big.open("wb") as fh:
        fh.truncate(size)
    sha = _sha256_of_zeros(size)
    commit = syncd.merge(
        "big.toml", {"source": f"{syncd.tag}/big.bin", "sha256": sha, "size": size, "dest": "big.bin"}
    )
    dest = syncd.export / "big.bin"
    try:
        cursor = syncd.cursor()
        syncd.usr1()
        syncd.wait("a 'downloading' status", lambda: syncd.status().startswith("downloading"), every=0.05)
        started = time.monotonic()
        syncd.systemctl("stop", "syncd", timeout=120)
        took = time.monotonic() - started
        state = [syncd.show(p) for p in ("ActiveState", "Result", "ExecMainStatus")]
        assert state == ["inactive", "success", "0"], f"after a stop that took {took:.1f}s"
        assert took < 30, f"stop took {took:.1f}s"
        assert len(syncd.wait_events(cursor, "daemon_stopped")) == 1
        # The issue allows the in-flight download's partial bytes to stay for resume; nothing else may.
        left = syncd.staging_files()
        assert len({name.rsplit(".", 1)[0] for name in left}) <= 1, left
        assert {name.rsplit(".", 1)[-1] for name in left} <= {"part", "meta"}, left
        assert not dest.exists() or dest.stat().st_size == size  # never a partial file at its dest
        syncd.start()
        syncd.wait("big.bin published after the restart", lambda: dest.exists(), timeout=120)
        syncd.wait("a 'synced' status", lambda: syncd.status().startswith(f"in sync at {commit[:7]} "))
        assert syncd.staging_files() == []
        assert dest.stat().st_size == size
        assert _sha256_of_file(dest) == sha
    finally:
        syncd.merge("big.toml")  # a later pass must not fetch 1 GiB again
        big.unlink()


def test_stop_leaves_no_staging_files(syncd: System) -> None:
    """`systemctl stop syncd` ends the service with exit status 0 and an empty staging directory."""
    cursor = syncd.cursor()
    syncd.systemctl("stop", "syncd", timeout=120)
    assert [syncd.show(p) for p in ("ActiveState", "Result", "ExecMainStatus")] == [
        "inactive",
        "success",
        "0",
    ]
    assert syncd.systemctl("is-active", "syncd", check=False).stdout.strip() == "inactive"
    assert len(syncd.wait_events(cursor, "daemon_stopped")) == 1
    assert syncd.staging_files() == []


def _sha256_of_zeros(size: int) -> str:
    digest, zeros = hashlib.sha256(), bytes(1 << 20)
    for _ in range(size >> 20):
        digest.update(zeros)
    return digest.hexdigest()


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_check_config_passes_inside(system: System) -> None:
    """`syncd check-config` passes inside: as root reading /etc/syncd, and as syncd given the credentials."""
    syncd_cmd = ["/opt/syncd/current/bin/syncd", "check-config", "-c", CONFIG]
    as_root = system.box.run(*syncd_cmd, check=False)  # no $CREDENTIALS_DIRECTORY: secrets from /etc/syncd
    assert as_root.returncode == 0, as_root.stderr
    assert f"{CONFIG}: OK" in as_root.stdout
    creds = [
        "-p",
        "LoadCredential=id_ed25519:/etc/syncd/id_ed25519",
        "-p",
        "LoadCredential=artifactory.token:/etc/syncd/artifactory.token",
    ]
    run = ["systemd-run", "--wait", "--pipe", "--quiet", "-p", "User=syncd"]
    as_syncd = system.box.run(*run, *creds, *syncd_cmd, check=False)
    assert as_syncd.returncode == 0, as_syncd.stdout + as_syncd.stderr
    assert f"{CONFIG}: OK" in as_syncd.stdout
    # Without the credentials, the syncd user cannot read the root-only secrets: that is what they are for.
    refused = system.box.run(*run, *syncd_cmd, check=False)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "artifactory.token_file" in refused.stderr


TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
MONITOR_DROPIN = "/etc/systemd/system/syncd.service.d/60-test-monitoring.conf"


def _state_tree(system: System) -> dict[str, tuple[int, int, int]]:
    """Names, modes and owners under the state directory (as root sees them from the host)."""
    base = system.box.root / "var/lib/syncd"
    out = {}
    for p in [base, *sorted(base.rglob("*"))]:
        st = p.lstat()
        out[str(p.relative_to(base))] = (st.st_mode, st.st_uid, st.st_gid)
    return out


def test_status_healthz_and_metrics_under_systemd(syncd: System) -> None:
    """The service with [http] listen and [metrics] textfile (a ReadWritePaths drop-in, as documented):
    `syncd status` answers as root and as syncd (exit 0, then 1 naming a failing dest) and leaves the state
    directory as it was; /healthz is 200 and /metrics current; the listener binds 127.0.0.1 only; the
    textfile is 0644; the unit still rates 2.0 or lower."""
    port = free_port()
    textdir = syncd.box.root / TEXTFILE_DIR.lstrip("/")
    textdir.mkdir(parents=True, exist_ok=True)
    os.chown(textdir, syncd.uid, syncd.gid)
    install_file(syncd.box.root, MONITOR_DROPIN, f"[Service]\nReadWritePaths={TEXTFILE_DIR}\n")
    syncd.write_config(
        http={"listen": f"127.0.0.1:{port}"}, metrics={"textfile": f"{TEXTFILE_DIR}/syncd.prom"}
    )
    status_cmd = ["/opt/syncd/current/bin/syncd", "status", "-c", CONFIG]
    try:
        syncd.systemctl("daemon-reload")
        syncd.systemctl("restart", "syncd", timeout=150)
        syncd.wait("an 'in sync' status", lambda: SYNCED.match(syncd.status()))
        commit = syncd.repo.head()
        healthz = syncd.wait("/healthz", lambda: _get(f"http://127.0.0.1:{port}/healthz"))
        assert healthz.status_code == 200 and healthz.json()["state"] == "ok"
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "syncd_last_pass_success 1.0" in metrics
        # The container shares the host's network namespace: ss here sees the container's sockets.
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True)
        assert [line.split()[3] for line in listening.stdout.splitlines()] == [f"127.0.0.1:{port}"]
        prom = textdir / "syncd.prom"
        syncd.wait("the textfile", prom.exists)
        assert prom.stat().st_mode & 0o777 == 0o644 and "syncd_build_info" in prom.read_text()

        before = _state_tree(syncd)
        as_root = syncd.box.run(*status_cmd, check=False)
        assert as_root.returncode == 0, as_root.stdout + as_root.stderr
        assert as_root.stdout.startswith(f"in sync at {commit[:7]} (")
        as_syncd = syncd.box.run("runuser", "-u", "syncd", "--", *status_cmd, "--json", check=False)
        assert as_syncd.returncode == 0, as_syncd.stdout + as_syncd.stderr
        report = json.loads(as_syncd.stdout)
        assert (report["state"], report["synced_commit"]) == ("ok", commit), report
        assert report["daemon"]["running"] is True
        assert _state_tree(syncd) == before

        bad = {**syncd.asset("sick.bin", 3000, seed=9), "sha256": "0" * 64, "dest": "sick/sick.bin"}
        syncd.merge("sick.toml", bad)
        syncd.usr1()
        syncd.wait("a '1 failing' status", lambda: syncd.status().startswith("1 failing"))
        sick = syncd.box.run(*status_cmd, check=False)
        assert sick.returncode == 1 and "  failing  sick/sick.bin: " in sick.stdout, sick.stdout
        assert _get(f"http://127.0.0.1:{port}/healthz").status_code == 200  # degraded is not unhealthy

        exposure = syncd.box.run("systemd-analyze", "security", "syncd", check=False).stdout
        level = re.search(r"Overall exposure level for syncd\.service: (\d+\.\d+)", exposure)
        assert level and float(level.group(1)) <= 2.0, exposure
        gate = syncd.box.run("systemd-analyze", "security", "--threshold=20", "syncd", check=False)
        assert gate.returncode == 0, gate.stdout + gate.stderr
    finally:
        if (syncd.repo.work_path / "assets/sick.toml").exists():  # not there if the test failed before
            syncd.merge("sick.toml")
        (syncd.box.root / MONITOR_DROPIN.lstrip("/")).unlink()
        syncd.write_config()
        syncd.systemctl("daemon-reload")
        syncd.systemctl("restart", "syncd", timeout=150)
        syncd.wait("an 'in sync' status", lambda: SYNCED.match(syncd.status()))


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None


NOTIFY_DROPIN = "/etc/systemd/system/syncd.service.d/70-test-notify.conf"
SMTP_PASSWORD = "smtp-Pa55-in-the-container-never-shown"


def test_a_failing_asset_is_mailed_once_under_systemd(syncd: System, tmp_path: Path) -> None:
    """The service with [notify.smtp] (STARTTLS, AUTH; the password a LoadCredential= of a drop-in, as
    packaging/syncd.service shows) at an SMTP server on the host, and an asset whose source Artifactory does
    not have: over four 2 s passes (the first fails it, the others wait out its 60 s backoff), exactly one
    mail (its subject naming the new problem and the dest, Auto-Submitted: auto-generated), one
    notification_sent in the journal, and no secret in the journal or the mail; after the fix, one recovery
    mail."""
    ca = make_test_ca(tmp_path / "ca")
    root = syncd.box.root
    dest = "notify/missing.bin"
    missing = {"source": f"{syncd.tag}/missing.bin", "sha256": "d" * 64, "size": 10, "dest": dest}
    with SmtpServer(starttls=ca, auth={"syncd": SMTP_PASSWORD}) as smtp:
        try:
            install_file(root, "/etc/syncd/smtp.password", SMTP_PASSWORD + "\n", mode=0o600)
            install_file(root, "/etc/syncd/smtp-ca.pem", ca.cert.read_bytes())
            install_file(
                root, NOTIFY_DROPIN, "[Service]\nLoadCredential=smtp.password:/etc/syncd/smtp.password\n"
            )
            syncd.write_config(
                interval="2s",
                notify={"events": ["problem", "recovery"]},
                **{
                    "notify.smtp": {
                        "host": "127.0.0.1",
                        "port": smtp.port,
                        "security": "starttls",
                        "username": "syncd",
                        "password_file": "smtp.password",
                        "from": "syncd <syncd@nfs01.bank.example>",
                        "to": ["ml-platform-ops@bank.example"],
                        "timeout": "5s",
                        "ca_file": "/etc/syncd/smtp-ca.pem",
                    }
                },
            )
            commit = syncd.merge("notify.toml", missing)
            cursor = syncd.cursor()
            syncd.systemctl("daemon-reload")
            syncd.systemctl("restart", "syncd", timeout=150)
            pid = str(syncd.main_pid())

            def passes() -> list[dict[str, Any]]:
                done = [e for e in syncd.since(cursor, "pass_finished") if e.get("_PID") == pid]
                return done if len(done) >= 4 else []

            # Four passes: what a third one sent (or recorded as sent) is in by the end of the fourth.
            done = syncd.wait("four passes of the restarted syncd", passes, timeout=60)
            # The first pass fails the download; later ones wait out its backoff (60 s): never synced.
            assert done[0]["SYNCD_FAILED"] == "1"
            assert all(int(e["SYNCD_FAILED"]) + int(e["SYNCD_DEFERRED"]) == 1 for e in done), done
            (mail,) = smtp.wait_for(1, timeout=10)
            sent = syncd.wait_events(cursor, "notification_sent")
            assert len(smtp.messages) == 1, [m.message["Subject"] for m in smtp.messages]
            assert len(sent) == 1 and sent[0]["_PID"] == pid
            assert (sent[0]["SYNCD_KIND"], sent[0]["SYNCD_NEW"]) == ("problem", "1"), sent[0]
            assert syncd.since(cursor, "notify_failed") == []
            host = syncd.box.run("cat", "/proc/sys/kernel/hostname").stdout.strip().split(".")[0]
            h = mail.message
            assert h["Subject"].startswith(f"[syncd {host}] ") and f"1 new problem: {dest}: " in h["Subject"]
            assert h["Auto-Submitted"] == "auto-generated" and h["Message-ID"] and h["Date"]
            assert h["From"] == "syncd <syncd@nfs01.bank.example>"
            assert (
                mail.tls and mail.auth_user == "syncd" and mail.rcpt_tos == ["ml-platform-ops@bank.example"]
            )
            text = h.get_content()
            for want in (
                f"dest: {dest}",
                f"source: {syncd.tag}/missing.bin",
                "manifest: assets/notify.toml",
                f"commit: {commit[:12]}",
                "what to do: Artifactory has no file at the source",
            ):
                assert want in text, (want, text)
            journal = syncd.box.run("journalctl", "--no-pager", "-u", "syncd", "-o", "json").stdout
            for secret in (SMTP_PASSWORD, syncd.nginx.token):
                assert secret not in journal
                assert secret not in mail.data.decode("utf-8", "replace")

            fixed = syncd.merge("notify.toml")
            syncd.usr1()
            recovered = smtp.wait_for(2, timeout=30)[1]
            assert recovered.message["Subject"].startswith(f"[syncd {host}] 1 recovered: {dest}: ")
            syncd.wait(
                "a 'synced' status after the fix",
                lambda: syncd.status().startswith(f"in sync at {fixed[:7]} "),
            )
            assert len(smtp.messages) == 2
        finally:
            if (syncd.repo.work_path / "assets/notify.toml").exists():  # not there if the test failed late
                syncd.merge("notify.toml")
            for path in (NOTIFY_DROPIN, "/etc/syncd/smtp.password", "/etc/syncd/smtp-ca.pem"):
                (root / path.lstrip("/")).unlink(missing_ok=True)
            syncd.write_config()
            syncd.systemctl("daemon-reload")
            syncd.systemctl("restart", "syncd", timeout=150)
            syncd.wait("an 'in sync' status", lambda: SYNCED.match(syncd.status()))
