"""A real systemd in a container for the system tests: a cached debootstrap tree booted with systemd-nspawn.

Plain Python (no pytest import). The flow, each step bounded by a timeout:

1. :func:`cached_tree` returns the pristine Debian tree, building it once with ``debootstrap --variant=minbase
   --include=…`` from the mirror apt already uses here (about a minute). It lives in
   ``$SYNCD_CONTAINER_CACHE`` (default ``/var/cache/syncd-test``) as ``bookworm-<hash of suite, variant and
   include list>``, so changing the list builds a new tree. It is built beside its final name and renamed
   into place, under a lock, so a half-built tree is never used.
2. :func:`prepare_root` copies it (``cp -a --reflink=auto``) to a fresh directory that a session may dirty.
3. :func:`build_wheels` builds the project's wheel and its dependencies' on the host (pip in the tree cannot
   reach the package registry); :func:`install_venv` installs them in the tree as a venv (``/opt/syncd``).
4. :func:`boot` starts ``systemd-nspawn --register=no --keep-unit -b --console=pipe`` (the host's network,
   so 127.0.0.1 reaches servers on the host), finds the container's PID 1 and waits until
   ``systemctl is-system-running`` says running or degraded. :meth:`Container.run` runs a command inside
   through ``nsenter``; :meth:`Container.poweroff` shuts it down, killing by PID what does not stop in time.
   Each nspawn gets a cgroup of its own first: without systemd as the host's PID 1, two containers at once
   would otherwise share their units' cgroups.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from servers import _pid_alive

SUITE = "bookworm"
VARIANT = "minbase"
INCLUDE = (
    "systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "ca-certificates", "procps",
    "openssh-server",  # test_fleet.py: Ansible reaches each host over SSH
)  # fmt: skip
DEFAULT_CACHE = Path("/var/cache/syncd-test")
FALLBACK_MIRROR = "http://deb.debian.org/debian"
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Commands inside the tree get this environment, not the host's (whose PIP_* and proxy settings would leak).
CLEAN_ENV = {
    "PATH": CLEAN_PATH,
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "PIP_NO_CACHE_DIR": "1",
}
# Boots here although PID 1 of the host is not systemd; --console=pipe because there is no tty.
NSPAWN_FLAGS = ("--register=no", "--keep-unit", "-b", "--console=pipe")
DEBOOTSTRAP_TIMEOUT = 900.0
WHEEL_TIMEOUT = 300.0
INSTALL_TIMEOUT = 300.0
BOOT_TIMEOUT = 60.0
POWEROFF_TIMEOUT = 30.0
KILL_TIMEOUT = 10.0
# What a wheel build needs from the project: everything but caches, VCS data, venvs and build output.
_NOT_FOR_WHEEL = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*cache", ".hypothesis", ".benchmarks"
)


class ContainerError(RuntimeError):
    """A step of building, booting or driving the container failed (the message carries the output)."""


def missing_tools() -> list[str]:
    """The host tools the system tests need but cannot find."""
    return [tool for tool in ("debootstrap", "systemd-nspawn", "nsenter") if shutil.which(tool) is None]


def run_bounded(
    args: Sequence[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    input: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` in a new session, killing its process group on timeout; raise on failure if ``check``."""
    proc = subprocess.Popen(
        list(args),
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
        text=True,
        encoding="utf-8",
        errors="replace",
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise ContainerError(
            f"timed out after {timeout}s: {' '.join(args)}\nstdout:\n{out[-4000:]}\nstderr:\n{err[-4000:]}"
        ) from None
    result = subprocess.CompletedProcess(list(args), proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise ContainerError(
            f"exit status {proc.returncode}: {' '.join(args)}\nstdout:\n{out[-4000:]}\nstderr:\n{err[-4000:]}"
        )
    return result


# --------------------------------------------------------------------------- the cached tree


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt uses here for ``SUITE`` (one-line or deb822 sources), else deb.debian.org."""
    files = [apt_dir / "sources.list"]
    files += sorted((apt_dir / "sources.list.d").glob("*.list"))
    files += sorted((apt_dir / "sources.list.d").glob("*.sources"))
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = _deb822(stanza)
                if (
                    "deb" in fields.get("types", "").split()
                    and SUITE in fields.get("suites", "").split()
                    and fields.get("enabled", "yes").lower() != "no"
                    and fields.get("uris")
                ):
                    return fields["uris"].split()[0]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    return words[1]
    return FALLBACK_MIRROR


def _deb822(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in stanza.splitlines():
        if line.startswith("#") or ":" not in line or line[:1].isspace():
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    return fields


def cache_dir() -> Path:
    """Where pristine trees are kept: ``$SYNCD_CONTAINER_CACHE``, else ``/var/cache/syncd-test``."""
    return Path(os.environ.get("SYNCD_CONTAINER_CACHE") or DEFAULT_CACHE)


def cache_key() -> str:
    """A short hash of what goes into the tree, so that a changed package list gets a new tree."""
    spec = f"{SUITE} {VARIANT} {','.join(sorted(INCLUDE))}"
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def cached_tree(log: Path | None = None) -> tuple[Path, bool]:
    """The pristine tree, built with debootstrap if missing. Returns ``(path, built_now)``."""
    base = cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    tree = base / f"{SUITE}-{cache_key()}"
    if tree.is_dir():
        return tree, False
    with _locked(base / f".{tree.name}.lock", DEBOOTSTRAP_TIMEOUT + 60):
        if tree.is_dir():  # another session built it while we waited
            return tree, False
        building = base / f".{tree.name}.build-{os.getpid()}"
        _remove_tree(building)
        try:
            result = run_bounded(
                [
                    "debootstrap",
                    f"--variant={VARIANT}",
                    f"--include={','.join(INCLUDE)}",
                    SUITE,
                    str(building),
                    debian_mirror(),
                ],
                timeout=DEBOOTSTRAP_TIMEOUT,
            )
            if log is not None:
                log.write_text(result.stdout + result.stderr)
            for deb in (building / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()  # 50 MB that every session would copy for nothing
            building.rename(tree)
        except BaseException:
            _remove_tree(building)
            raise
    return tree, True


@contextlib.contextmanager
def _locked(path: Path, timeout: float = DEBOOTSTRAP_TIMEOUT) -> Iterator[None]:
    """Hold an exclusive lock on ``path``, waiting at most ``timeout`` for another builder to finish."""
    deadline = time.monotonic() + timeout
    with path.open("a") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ContainerError(f"{path} stayed locked for {timeout}s (another build?)") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.absolute()).rstrip("/") + "/"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    points = [line.split()[4].replace("\\040", " ") for line in lines]
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """Delete a root tree, after unmounting what a killed debootstrap may have left mounted in it."""
    for point in _mounts_under(path):
        run_bounded(["umount", "--lazy", point], timeout=30, check=False)
    if left := _mounts_under(path):
        raise ContainerError(f"refusing to delete {path}: still mounted inside: {left}")
    if path.exists():
        shutil.rmtree(path)


def prepare_root(dest: Path) -> tuple[Path, bool]:
    """A fresh, writable copy of the pristine tree at ``dest``. Returns ``(dest, tree_built_now)``."""
    tree, built = cached_tree(dest.parent / "debootstrap.log")
    if dest.exists():
        raise ContainerError(f"{dest} already exists")
    run_bounded(["cp", "-a", "--reflink=auto", str(tree), str(dest)], timeout=300)
    return dest, built


def remove_root(root: Path) -> None:
    """Delete a session's root (never the cache); keep it if ``$SYNCD_CONTAINER_KEEP`` is set."""
    if os.environ.get("SYNCD_CONTAINER_KEEP"):
        print(f"container: keeping {root} (SYNCD_CONTAINER_KEEP is set)", file=sys.stderr)
        return
    if root.resolve().is_relative_to(cache_dir().resolve()):
        raise ContainerError(f"refusing to delete {root}: it is inside the cache")
    _remove_tree(root)


# --------------------------------------------------------------------------- installing into the tree


def build_wheels(project: Path, dest: Path) -> list[Path]:
    """Wheels of ``project`` and of every dependency, built on the host into ``dest``.

    The project is copied first (without .git, .venv, build/ and caches) so that a stale ``build/`` never ends
    up in the wheel and the work tree is not written to while others edit it.
    """
    source = dest.parent / f"{dest.name}-src"
    shutil.copytree(project, source, ignore=_NOT_FOR_WHEEL, symlinks=True)
    try:
        run_bounded(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                "--disable-pip-version-check",
                str(source),
                "-w",
                str(dest),
            ],
            timeout=WHEEL_TIMEOUT,
        )
    finally:
        shutil.rmtree(source, ignore_errors=True)
    return sorted(dest.glob("*.whl"))


def chroot(root: Path, *cmd: str, timeout: float = INSTALL_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in the (not booted) tree with a clean environment."""
    return run_bounded(["chroot", str(root), *cmd], timeout=timeout, env=CLEAN_ENV)


def install_venv(root: Path, wheels: Path, venv: str, package: str) -> None:
    """Create ``venv`` in the tree and install ``package`` from ``wheels`` only (no index)."""
    inside = root / "var/tmp/container-wheels"
    shutil.copytree(wheels, inside)
    try:
        chroot(root, "python3", "-m", "venv", venv)
        chroot(
            root,
            f"{venv}/bin/pip",
            "install",
            "--quiet",
            "--no-index",
            "--find-links",
            "/var/tmp/container-wheels",
            package,
        )
    finally:
        shutil.rmtree(inside, ignore_errors=True)


RELEASE_TIMEOUT = 600.0


def build_release(project: Path, out: Path, version: str | None = None) -> Path:
    """``scripts/release [--version VERSION] --out OUT`` of ``project``: the artifact's path."""
    argv = [str(project / "scripts" / "release"), "--out", str(out)]
    if version is not None:
        argv += ["--version", version]
    run_bounded(argv, timeout=RELEASE_TIMEOUT)
    found = sorted(out.glob(f"syncd-{version or '*'}-linux-x86_64.tar.gz"))
    if len(found) != 1:
        raise ContainerError(f"scripts/release left {found} in {out}")
    return found[0]


def unpack_release(root: Path, artifact: Path, where: str = "/var/tmp") -> str:
    """Unpack ``artifact`` into the tree under ``where``; the path (in the tree) of its install.sh."""
    import tarfile

    with tarfile.open(artifact) as t:
        t.extractall(root / where.lstrip("/"), filter="tar")
    top = artifact.name.removesuffix("-linux-x86_64.tar.gz")
    return f"{where}/{top}/install.sh"


def install_release(root: Path, artifact: Path) -> str:
    """Install ``artifact`` into the (not booted) tree with its own install.sh, as on a host with no
    network: returns install.sh's output."""
    return chroot(root, unpack_release(root, artifact)).stdout


def install_file(root: Path, path: str, data: bytes | str, mode: int = 0o644, owner: int = 0) -> Path:
    """Write ``data`` to ``path`` in the tree (parents created) with ``mode``, uid and gid ``owner``."""
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    target.write_bytes(data)
    os.chown(target, owner, owner)
    target.chmod(mode)
    return target


def user_ids(root: Path, name: str) -> tuple[int, int]:
    """``(uid, gid)`` of user ``name`` in the tree's /etc/passwd."""
    for line in (root / "etc/passwd").read_text().splitlines():
        parts = line.split(":")
        if parts[0] == name:
            return int(parts[2]), int(parts[3])
    raise ContainerError(f"no user {name!r} in {root}/etc/passwd")


# --------------------------------------------------------------------------- the booted container


@dataclass
class Container:
    """A booted systemd-nspawn container: ``nspawn_pid`` on the host, ``pid`` its systemd (PID 1 inside)."""

    root: Path
    name: str
    nspawn_pid: int
    pid: int
    console: Path
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    cgroups: list[Path] = field(default_factory=list)
    _stopped: bool = field(default=False, repr=False)

    def run(
        self, *cmd: str, timeout: float = 60, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the container (all its namespaces, its root) and return the result."""
        return run_bounded(
            ["nsenter", "-t", str(self.pid), "-a", *cmd],
            timeout=timeout,
            env=CLEAN_ENV,
            input=input,
            check=check,
        )

    def poweroff(self) -> None:
        """``systemctl poweroff`` inside; then SIGTERM/SIGKILL nspawn and PID 1 by PID (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._shut_down()
        finally:
            if not self._alive():
                _remove_cgroups(self.cgroups)

    def _shut_down(self) -> None:
        if self._alive():
            with contextlib.suppress(ContainerError):
                self.run("systemctl", "poweroff", "--no-block", timeout=10, check=False)
            if self._wait(POWEROFF_TIMEOUT):
                return
            # nspawn turns SIGTERM into an orderly shutdown request for a booted container
            _kill(self.nspawn_pid, signal.SIGTERM)
            if self._wait(KILL_TIMEOUT):
                return
            _kill(self.pid, signal.SIGKILL)  # PID 1 of its namespace: takes every process inside along
            _kill(self.nspawn_pid, signal.SIGKILL)
            if not self._wait(KILL_TIMEOUT):
                raise ContainerError(f"nspawn (pid {self.nspawn_pid}) did not exit after SIGKILL")

    def _alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return _pid_alive(self.nspawn_pid)

    def _wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._alive() and not _pid_alive(self.pid):
                return True
            time.sleep(0.1)
        return False


def _kill(pid: int, sig: signal.Signals) -> None:
    if pid <= 0:  # never signal -1 (every process) or 0 (our group)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _private_cgroups(name: str) -> list[Path]:
    """A new cgroup ``name`` below ours in the hierarchies nspawn uses (name=systemd v1, cgroup2).

    With no systemd as the host's PID 1, every nspawn starts in the same cgroup and puts its container in
    ``<that cgroup>/payload``: two containers at once would share their units' cgroups, so one's ``systemctl
    stop syncd`` waits for the other's processes (seen here). One cgroup per nspawn keeps them apart. Best
    effort: a hierarchy that is missing or not writable is left out.
    """
    ours: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if controllers == "name=systemd":
            ours["name=systemd"] = path
        elif number == "0" and not controllers:
            ours["cgroup2"] = path
    made = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, point, fstype, options = line.split()[:4]
        if fstype == "cgroup" and "name=systemd" in options.split(","):
            key = "name=systemd"
        elif fstype == "cgroup2":
            key = "cgroup2"
        else:
            continue
        if key in ours:
            mine = Path(point, ours.pop(key).lstrip("/"), name)
            with contextlib.suppress(OSError):
                mine.mkdir()
                made.append(mine)
    return made


def _remove_cgroups(paths: list[Path]) -> None:
    """rmdir the (by now empty) cgroups bottom-up: nspawn leaves payload/ and supervisor/ in them."""
    for top in paths:
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def boot(root: Path, console: Path) -> Container:
    """Boot the tree with systemd-nspawn and wait until its systemd reports running (or degraded)."""
    name = f"syncd-test-{uuid.uuid4().hex[:8]}"
    cgroups = _private_cgroups(name)
    # sh moves itself into those cgroups ("$1", "$2": cgroup.procs files), then becomes nspawn (same PID).
    enter = 'for f in "$1" "$2"; do [ -z "$f" ] || echo $$ > "$f"; done; shift 2; exec "$@"'
    procs = [*(str(d / "cgroup.procs") for d in cgroups), "", ""][:2]
    nspawn = ["systemd-nspawn", "-D", str(root), f"--machine={name}", *NSPAWN_FLAGS]
    with console.open("ab") as out:
        proc = subprocess.Popen(
            ["sh", "-c", enter, "sh", *procs, *nspawn],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=CLEAN_ENV,
            start_new_session=True,
        )
    box = Container(root, name, proc.pid, -1, console, proc, cgroups=cgroups)
    atexit.register(box.poweroff)
    try:
        box.pid = _find_init(proc, console)
        _wait_running(box)
    except BaseException:
        with contextlib.suppress(Exception):
            box.poweroff()
        raise
    return box


def _find_init(proc: subprocess.Popen[bytes], console: Path) -> int:
    """The container's systemd: the child of nspawn whose command is systemd."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ContainerError(f"systemd-nspawn exited with {proc.returncode}:\n{_tail(console)}")
        for child in _children(proc.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return child
        time.sleep(0.05)
    raise ContainerError(f"no systemd under nspawn (pid {proc.pid}) after {BOOT_TIMEOUT}s:\n{_tail(console)}")


def _wait_running(box: Container) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    state = ""
    while time.monotonic() < deadline:
        if not box._alive():
            raise ContainerError(f"the container stopped while booting:\n{_tail(box.console)}")
        with contextlib.suppress(ContainerError):
            state = box.run("systemctl", "is-system-running", timeout=10, check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
        time.sleep(0.2)
    raise ContainerError(
        f"systemd in the container is {state!r}, not running, after {BOOT_TIMEOUT}s:\n{_tail(box.console)}"
    )


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
