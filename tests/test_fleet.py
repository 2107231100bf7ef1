"""The Ansible role on a fleet of two: each host a Debian tree booted with systemd under systemd-nspawn,
running its own sshd on its own loopback port, reached by ``ansible-playbook`` over SSH.

The play is packaging/ansible/playbook.yml as shipped (the first host is the canary). It installs the
release artifact built from this checkout (copied from the control node: the hosts use no network for it),
configures both hosts against the session's sshd-served manifest repo and nginx, and starts syncd. The
tests then run in order, each on the state the one before left:

1. the first run installs, configures and starts syncd on both, and a merged asset lands on both;
2. a second run reports changed=0 on both and restarts nothing;
3. a changed interval reloads syncd (same MainPID); ``--check --diff`` shows a change without making it;
4. a bad variable fails the play on the canary, and both hosts keep their config and process;
5. a release with a higher version restarts syncd on it and migrates a real schema 5 ledger (backed up
   first);
6. ``install.sh --rollback`` brings the old release back, and the next play restarts syncd onto it.

Time here: about 3-4 minutes (two boots, six plays). Skipped only when debootstrap or systemd-nspawn is not
installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from container import (
    Container,
    boot,
    build_release,
    chroot,
    install_file,
    missing_tools,
    prepare_root,
    remove_root,
    user_ids,
)
from harness import manifest_text
from servers import GitRepo, Nginx, Sshd, free_port, make_asset

if _missing := missing_tools():
    pytest.skip(
        f"fleet tests need {', '.join(_missing)} (apt-get install debootstrap systemd-container)",
        allow_module_level=True,
    )

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

PROJECT = Path(__file__).resolve().parents[1]
ANSIBLE = PROJECT / "packaging" / "ansible"
EXPORT = "/srv/nfs/ml-assets"
CONFIG = "/etc/syncd/syncd.conf"
OLD, NEW = "9.2.0", "9.2.1"  # versions no real release uses
HOSTS = ("host0", "host1")  # host0 is the canary
RECAP = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
    r"\s+failed=(?P<failed>\d+)",
    re.M,
)
T = TypeVar("T")


@dataclass
class Host:
    name: str
    box: Container
    port: int

    def run(self, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.box.run(*cmd, check=check, timeout=timeout)

    def main_pid(self) -> int:
        return int(self.run("systemctl", "show", "-p", "MainPID", "--value", "syncd").stdout.strip())

    def active(self) -> str:
        return self.run("systemctl", "is-active", "syncd", check=False).stdout.strip()

    def path(self, inside: str) -> Path:
        return self.box.root / inside.lstrip("/")

    def current(self) -> str:
        return os.readlink(self.path("/opt/syncd/current"))

    def running_release(self) -> str:
        """The /opt/syncd/<version> the running syncd's pygit2 was loaded from (its memory map)."""
        maps = self.run("cat", f"/proc/{self.main_pid()}/maps").stdout  # the container's /proc
        found = set(re.findall(r"/opt/syncd/([^/\s]+)/lib/python3\.11/site-packages/pygit2", maps))
        assert len(found) == 1, found
        return found.pop()


@dataclass
class Fleet:
    hosts: list[Host]
    repo: GitRepo
    nginx: Nginx
    releases: dict[str, Path]
    inventory: Path
    base: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def play(
        self, *flags: str, **extra: Any
    ) -> tuple[subprocess.CompletedProcess[str], dict[str, dict[str, int]]]:
        """``ansible-playbook -i INVENTORY playbook.yml FLAGS -e EXTRA``: the result, the recap per host."""
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")},
            "ANSIBLE_ROLES_PATH": str(ANSIBLE / "roles"),
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_LOCAL_TEMP": str(self.base / "ansible-local"),
            "ANSIBLE_REMOTE_TEMP": "/root/.ansible/tmp",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "ANSIBLE_PIPELINING": "True",
        }
        argv = [ansible_playbook(), "-i", str(self.inventory), str(ANSIBLE / "playbook.yml"), *flags]
        if extra:
            argv += ["-e", json.dumps(extra)]
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
        recap = {
            m["host"]: {k: int(m[k]) for k in ("ok", "changed", "unreachable", "failed")}
            for m in RECAP.finditer(done.stdout)
        }
        return done, recap

    def asset(self, name: str, size: int, seed: int) -> dict[str, Any]:
        sha, n = make_asset(self.nginx.root / self.tag, name, size, seed)
        return {"source": f"{self.tag}/{name}", "sha256": sha, "size": n}

    def merge(self, path: str, *assets: dict[str, Any]) -> str:
        self.repo.write(f"assets/{path}", manifest_text(*assets))
        return self.repo.commit(f"assets/{path}")


def ansible_playbook() -> str:
    beside = Path(sys.executable).parent / "ansible-playbook"
    found = str(beside) if beside.exists() else shutil.which("ansible-playbook")
    assert found, "ansible-playbook is missing (ansible-core, a test dependency)"
    return found


def wait(what: str, probe: Callable[[], T | None], timeout: float = 60, every: float = 0.3) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout}s (last: {value!r})")
        time.sleep(every)


def landed(host: Host, dest: str, sha256: str) -> bool:
    path = host.path(f"{EXPORT}/{dest}")
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256


def reloaded(host: Host) -> int:
    """How many config_reloaded events syncd has logged to the journal."""
    out = host.run(
        "journalctl", "--no-pager", "-u", "syncd", "SYNCD_EVENT=config_reloaded", "-o", "cat"
    ).stdout
    return len([line for line in out.splitlines() if line.strip()])


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def prepare_host(root: Path, port: int, client_pub: str) -> None:
    """sshd on 127.0.0.1:``port`` for root with the test key only; the syncd user and the export (the
    role configures syncd, it does not make the export: that is the NFS layer's)."""
    install_file(
        root,
        "/etc/ssh/sshd_config.d/50-test.conf",
        f"Port {port}\nListenAddress 127.0.0.1\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUseDNS no\n",
    )
    install_file(root, "/root/.ssh/authorized_keys", client_pub, mode=0o600)
    (root / "root/.ssh").chmod(0o700)
    chroot(root, "ssh-keygen", "-A")
    install_file(root, "/usr/lib/sysusers.d/syncd.conf", (PROJECT / "packaging/syncd.sysusers").read_bytes())
    chroot(root, "systemd-sysusers")
    uid, gid = user_ids(root, "syncd")
    (root / EXPORT.lstrip("/")).mkdir(parents=True)
    os.chown(root / EXPORT.lstrip("/"), uid, gid)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, sshd: Sshd, nginx: Nginx) -> Iterator[Fleet]:
    base = tmp_path_factory.mktemp("fleet")
    releases = {v: build_release(PROJECT, base / "dist", v) for v in (OLD, NEW)}
    name = f"fleet-{uuid.uuid4().hex[:8]}.git"
    repo = GitRepo(sshd.repos_dir / name, base / "work", url=sshd.url(name))
    client_pub = Path(str(sshd.client_key) + ".pub").read_text()
    roots: list[Path] = []
    hosts: list[Host] = []
    try:
        for host in HOSTS:
            root, _ = prepare_root(base / host)
            roots.append(root)
            port = free_port()
            prepare_host(root, port, client_pub)
            hosts.append(Host(host, boot(root, base / f"{host}-console.log"), port))
        for h in hosts:
            wait(f"sshd of {h.name} on port {h.port}", lambda h=h: listening(h.port))
        inventory = base / "inventory.yml"
        fleet = Fleet(hosts, repo, nginx, releases, inventory, base)
        host_vars = {
            h.name: {
                "ansible_host": "127.0.0.1",
                "ansible_port": h.port,
                "ansible_user": "root",
                "ansible_ssh_private_key_file": str(sshd.client_key),
                "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
                "ansible_python_interpreter": "/usr/bin/python3",
            }
            for h in hosts
        }
        inventory.write_text(
            json.dumps(
                {
                    "all": {
                        "vars": {
                            "syncd_release_archive": str(releases[OLD]),
                            "syncd_source": {
                                "url": repo.url,
                                "branch": "main",
                                "path": "assets",
                                "ssh_key": "id_ed25519",
                                "known_hosts": "/etc/syncd/known_hosts",
                            },
                            "syncd_artifactory": {
                                "url": nginx.bearer_url(),
                                "token_file": "artifactory.token",
                            },
                            "syncd_export": {"root": EXPORT},
                            "syncd_download": {"timeout": "10s"},
                            "syncd_schedule": {"interval": "10m"},
                            "syncd_artifactory_token": nginx.token,
                            "syncd_ssh_private_key": sshd.client_key.read_text(),
                            "syncd_known_hosts": sshd.known_hosts.read_text().splitlines(),
                        },
                        "children": {
                            "syncd_fleet": {"hosts": host_vars},
                            "syncd_canary": {"hosts": {HOSTS[0]: {}}},
                        },
                    }
                },
                indent=1,
            )
        )
        yield fleet
    finally:
        for h in hosts:
            h.box.poweroff()
        for root in roots:
            remove_root(root)


@pytest.fixture(scope="module")
def first(fleet: Fleet) -> dict[str, Any]:
    """An asset merged before the first play; the first play's result."""
    asset = {**fleet.asset("first.bin", 5000, seed=11), "dest": "fleet/first.bin"}
    fleet.merge("first.toml", asset)
    done, recap = fleet.play()
    return {"asset": asset, "done": done, "recap": recap}


def test_first_play_installs_configures_and_starts_syncd_on_both(fleet: Fleet, first: dict[str, Any]) -> None:
    """The play succeeds on both hosts; each runs syncd from /opt/syncd/OLD with the rendered config, its
    credentials are root-only, and the asset merged before it is on both exports byte-exact."""
    done, recap = first["done"], first["recap"]
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert set(recap) == set(HOSTS)
    for h in fleet.hosts:
        assert recap[h.name]["failed"] == 0 and recap[h.name]["changed"] > 0
        assert h.active() == "active"
        assert h.current() == OLD and h.running_release() == OLD
        for secret in ("artifactory.token", "id_ed25519"):
            st = h.path(f"/etc/syncd/{secret}").stat()
            assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
        syncd = "/opt/syncd/current/bin/syncd"
        check = h.run("env", "CREDENTIALS_DIRECTORY=/etc/syncd", syncd, "check-config", "-c", CONFIG)
        assert check.returncode == 0
    a = first["asset"]
    for h in fleet.hosts:
        wait(f"{a['dest']} on {h.name}", lambda h=h: landed(h, a["dest"], a["sha256"]))


def test_an_asset_merged_later_lands_on_both(fleet: Fleet, first: dict[str, Any]) -> None:
    """A second merged asset lands on both hosts after their next pass (SIGUSR1, the post-merge hook)."""
    asset = {**fleet.asset("second.bin", 7000, seed=12), "dest": "fleet/second.bin"}
    fleet.merge("second.toml", asset)
    for h in fleet.hosts:
        h.run("systemctl", "kill", "-s", "USR1", "syncd")
    for h in fleet.hosts:
        wait(f"second.bin on {h.name}", lambda h=h: landed(h, asset["dest"], asset["sha256"]))


def test_a_second_run_changes_nothing(fleet: Fleet, first: dict[str, Any]) -> None:
    """The same play again: changed=0 and failed=0 on both, and syncd was not restarted or reloaded."""
    pids = {h.name: h.main_pid() for h in fleet.hosts}
    done, recap = fleet.play()
    assert done.returncode == 0, done.stdout[-4000:]
    assert {h: (r["changed"], r["failed"]) for h, r in recap.items()} == {h: (0, 0) for h in HOSTS}
    assert {h.name: h.main_pid() for h in fleet.hosts} == pids


def test_a_changed_interval_reloads_with_the_same_main_pid(fleet: Fleet, first: dict[str, Any]) -> None:
    """A new [schedule] interval is written and syncd reloaded on both: same MainPID, new config, and a
    config_reloaded event in the journal."""
    pids = {h.name: h.main_pid() for h in fleet.hosts}
    reloads = {h.name: reloaded(h) for h in fleet.hosts}
    done, recap = fleet.play(syncd_schedule={"interval": "9m"})
    assert done.returncode == 0, done.stdout[-4000:]
    for h in fleet.hosts:
        assert recap[h.name]["changed"] >= 1
        assert 'interval = "9m"' in h.path(CONFIG).read_text()
        assert h.main_pid() == pids[h.name]
        wait(f"a config_reloaded event on {h.name}", lambda h=h: reloaded(h) > reloads[h.name])


def test_check_diff_shows_a_config_change_without_making_it(fleet: Fleet, first: dict[str, Any]) -> None:
    """``--check --diff`` with a new interval reports a change on both hosts and shows the TOML line that
    would change, but writes nothing and reloads nothing."""
    before = {h.name: (h.path(CONFIG).read_bytes(), h.main_pid(), reloaded(h)) for h in fleet.hosts}
    done, recap = fleet.play("--check", "--diff", syncd_schedule={"interval": "7m"})
    assert done.returncode == 0, done.stdout[-4000:]
    assert '+interval = "7m"' in done.stdout and '-interval = "9m"' in done.stdout
    for h in fleet.hosts:
        assert recap[h.name]["changed"] >= 1 and recap[h.name]["failed"] == 0
        assert (h.path(CONFIG).read_bytes(), h.main_pid(), reloaded(h)) == before[h.name]


def test_a_bad_variable_fails_on_the_canary_and_both_keep_the_old_config(
    fleet: Fleet, first: dict[str, Any]
) -> None:
    """``concurrency = 0`` fails `syncd check-config` on the canary: the play fails there, the rest of the
    fleet is not touched, and both hosts keep their config bytes and their running syncd."""
    before = {h.name: (h.path(CONFIG).read_bytes(), h.main_pid()) for h in fleet.hosts}
    done, recap = fleet.play(syncd_schedule={"interval": "9m"}, syncd_download={"concurrency": 0})
    assert done.returncode != 0
    assert recap[HOSTS[0]]["failed"] == 1
    assert "concurrency" in done.stdout
    assert recap.get(HOSTS[1], {}).get("changed", 0) == 0
    for h in fleet.hosts:
        assert (h.path(CONFIG).read_bytes(), h.main_pid()) == before[h.name]
        assert h.active() == "active"


def ledger_schema(host: Host) -> int:
    """The ledger's PRAGMA user_version, read inside the host (its sqlite, the WAL included)."""
    out = host.run(
        "/usr/bin/python3",
        "-c",
        "import sqlite3; print(sqlite3.connect('file:/var/lib/syncd/ledger.sqlite3?mode=ro', uri=True)"
        ".execute('PRAGMA user_version').fetchone()[0])",
    ).stdout
    return int(out.strip())


def test_a_new_release_restarts_syncd_on_it_and_migrates_an_old_ledger(
    fleet: Fleet, first: dict[str, Any]
) -> None:
    """The play with the NEW artifact: /opt/syncd/current is NEW, syncd was restarted (another MainPID) and
    runs from /opt/syncd/NEW. On host1, whose ledger was swapped (syncd stopped) for a real schema 5
    ledger (tests/fixtures), install.sh backs that ledger up first and the restarted syncd migrates it to
    the current schema; host0's ledger needed no migration and got no backup."""
    from syncd.ledger import SCHEMA_VERSION

    old = fleet.hosts[1]
    old.run("systemctl", "stop", "syncd")
    state = old.path("/var/lib/syncd")
    for leftover in ("ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm"):
        (state / leftover).unlink(missing_ok=True)
    uid, gid = user_ids(old.box.root, "syncd")
    fixture = (PROJECT / "tests/fixtures/ledger-schema5.sqlite3").read_bytes()
    install_file(old.box.root, "/var/lib/syncd/ledger.sqlite3", fixture, mode=0o600, owner=uid)
    os.chown(state / "ledger.sqlite3", uid, gid)
    assert ledger_schema(old) == 5
    pids = {h.name: h.main_pid() for h in fleet.hosts}
    done, recap = fleet.play(
        syncd_schedule={"interval": "9m"}, syncd_release_archive=str(fleet.releases[NEW])
    )
    assert done.returncode == 0, done.stdout[-4000:]
    for h in fleet.hosts:
        assert recap[h.name]["changed"] >= 1
        assert h.current() == NEW
        assert os.readlink(h.path("/opt/syncd/previous")) == OLD
        wait(f"syncd active on {h.name}", lambda h=h: h.active() == "active")
        assert h.main_pid() != pids[h.name]
        assert h.running_release() == NEW
    backup = state / f"ledger.sqlite3.before-{NEW}"
    copy = sqlite3.connect(f"file:{backup}?mode=ro", uri=True)
    assert copy.execute("PRAGMA user_version").fetchone()[0] == 5
    copy.close()
    wait("the schema 5 ledger migrated", lambda: ledger_schema(old) == SCHEMA_VERSION)
    assert not fleet.hosts[0].path(f"/var/lib/syncd/ledger.sqlite3.before-{NEW}").exists()


def test_rollback_brings_the_old_release_back(fleet: Fleet, first: dict[str, Any]) -> None:
    """``/opt/syncd/current/install.sh --rollback`` flips current back to OLD on both hosts, where the NEW
    process keeps running; the play with the OLD artifact then finds a syncd running another release
    than current and restarts it (install.sh itself reports unchanged), and a play after that changes
    nothing."""
    for h in fleet.hosts:
        out = h.run("/opt/syncd/current/install.sh", "--rollback").stdout
        assert out.splitlines()[-1] == f"syncd-install: changed rolled back to syncd {OLD} (from {NEW})"
        assert h.current() == OLD and h.running_release() == NEW
    pids = {h.name: h.main_pid() for h in fleet.hosts}
    done, recap = fleet.play(syncd_schedule={"interval": "9m"})
    assert done.returncode == 0, done.stdout[-4000:]
    for h in fleet.hosts:
        assert recap[h.name]["changed"] >= 1
        wait(f"syncd active on {h.name}", lambda h=h: h.active() == "active")
        assert h.main_pid() != pids[h.name]
        assert h.running_release() == OLD
    done, recap = fleet.play(syncd_schedule={"interval": "9m"})
    assert done.returncode == 0, done.stdout[-4000:]
    assert {h: r["changed"] for h, r in recap.items()} == {h: 0 for h in HOSTS}
