"""A hostile file system under the export, at every stage of a pass (observe, stage, publish, adopt).

(a) In-process passes against nginx, with a generated layout: for each asset, maybe one hostile change
(a directory symlinked outside, a vanishing directory, a FIFO, a symlink, a directory or a foreign file at
the dest, a file swapped under an adoption) made at the very moment syncd reaches that stage for it.
(b) ``syncd sync`` as an unprivileged user (tests run as root, which no permission stops) with directories
it cannot search or write and files it cannot read, in a seeded layout.

The property each time: the pass ends; every other asset lands byte for byte; nothing outside the export
is touched; no symlink is followed; every regular file at a dest is the manifest's bytes or the foreign
file put there, never partial; the ledger agrees with the export; one failure or refusal per bad asset,
never an internal error.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import World, examples, parse_events, syncd_command
from servers import GitRepo, Nginx
from syncd import config, logs
from syncd.ledger import Ledger
from syncd.publish import Export
from syncd.reconcile import Reconciler
from syncd.staging import StagedFile, staging_name

pytestmark = pytest.mark.e2e

NOBODY = 65534
FOREIGN = b"a foreign file put there by someone else"
OUTSIDE_FILE = b"outside: must never change"

DOWNLOAD_STAGES = ["observe", "stage", "publish"]
ADOPT_STAGES = ["adopt-hash", "adopt-chmod"]
DOWNLOAD_HARMS = ["symlink-parent", "vanish-parent", "fifo-at-dest", "symlink-at-dest", "dir-at-dest", "file"]
ADOPT_HARMS = ["symlink-parent", "vanish-parent", "fifo-at-dest", "symlink-at-dest", "dir-at-dest", "file"]

Harm = tuple[str, str] | None


# --------------------------------------------------------------------------- helpers


def snapshot(top: Path) -> dict[str, Any]:
    """Every path below ``top`` (and ``top`` itself) with mode, owner and bytes or link target."""
    found: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [".", *dirnames, *filenames]:
            p = Path(dirpath, name)
            st_ = p.lstat()
            if stat.S_ISLNK(st_.st_mode):
                what: Any = "-> " + os.readlink(p)
            elif stat.S_ISREG(st_.st_mode):
                what = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                what = stat.S_IFMT(st_.st_mode)
            found[str(p.relative_to(top))] = (st_.st_mode, st_.st_uid, what)
    return found


def regular_files(root: Path) -> dict[str, bytes]:
    """Every regular file under the export (no symlink followed), syncd's own ``.syncd*`` names excluded."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):  # os.walk does not follow directory symlinks
        if dirpath == str(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".syncd")]
        for name in filenames:
            p = Path(dirpath, name)
            if stat.S_ISREG(p.lstat().st_mode) and not (dirpath == str(root) and name.startswith(".syncd")):
                out[str(p.relative_to(root))] = p.read_bytes()
    return out


def no_symlink_on_path(root: Path, dest: str) -> bool:
    p = root
    for part in dest.split("/"):
        p = p / part
        if p.is_symlink():
            return False
    return True


def events_of(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def place(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Put ``data`` at ``path`` atomically (rename over whatever file is there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".hostile-tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


def harm(kind: str, root: Path, dest: str, outside: Path) -> None:
    """Make one hostile change around ``dest`` (its parent is ``g<i>/sub``)."""
    path = root / dest
    parent = path.parent
    if kind in ("symlink-parent", "vanish-parent"):
        if parent.is_symlink() or parent.is_file():
            parent.unlink()
        elif parent.exists():
            shutil.rmtree(parent)
        if kind == "symlink-parent":
            parent.symlink_to(outside / "d")
        return
    parent.mkdir(parents=True, exist_ok=True)
    if kind == "file":
        place(path, FOREIGN)
        return
    if path.is_symlink() or path.is_file():
        path.unlink()
    if kind == "fifo-at-dest":
        os.mkfifo(path)
    elif kind == "symlink-at-dest":
        path.symlink_to(outside / "f")
    elif kind == "dir-at-dest":
        path.mkdir()


def watch(root: Path, allowed: dict[str, set[str]], done: threading.Event, bad: list[str]) -> None:
    """Until ``done``: every regular file that can be opened at a dest (no symlink followed, no FIFO
    waited on) must hash to one of ``allowed[dest]``; anything else is appended to ``bad``."""
    for _ in range(100_000):  # bounded
        if done.is_set():
            return
        for dest, shas in allowed.items():
            try:
                fd = os.open(root / dest, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue  # missing, a symlink, a parent that is a symlink or gone: nothing visible there
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    digest = hashlib.sha256()
                    while chunk := os.read(fd, 1 << 20):
                        digest.update(chunk)
                    if digest.hexdigest() not in shas:
                        bad.append(f"{dest}: {digest.hexdigest()}")
            finally:
                os.close(fd)
        time.sleep(0.002)


class Hooks:
    """Wraps the Export at each stage so that a harm happens exactly when syncd gets there for a dest."""

    def __init__(self, root: Path, outside: Path, harms: dict[str, tuple[str, str]]) -> None:
        self.root, self.outside, self.harms = root, outside, harms
        self.fired: set[str] = set()
        self._lock = threading.Lock()

    def at(self, stage: str, dest: str) -> None:
        h = self.harms.get(dest)
        with self._lock:
            if h is None or h[0] != stage or dest in self.fired:
                return
            self.fired.add(dest)
        harm(h[1], self.root, dest, self.outside)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def wrap(cls: Any, name: str, stage: str, dest_of: Callable[..., str]) -> None:
            real = getattr(cls, name)

            def hooked(obj: Any, *args: Any, **kw: Any) -> Any:
                self.at(stage, dest_of(obj, *args))
                return real(obj, *args, **kw)

            monkeypatch.setattr(cls, name, hooked)

        wrap(Export, "observe", "observe", lambda _e, dest: dest)
        real_all = Export.observe_all

        def observe_all(obj: Any, dests: Any) -> Any:
            def fed() -> Any:  # each dest's harm lands just before the walk reaches that dest
                for dest in dests:
                    self.at("observe", dest)
                    yield dest

            return real_all(obj, fed())

        monkeypatch.setattr(Export, "observe_all", observe_all)
        wrap(Export, "stage", "stage", lambda _e, dest, *_: dest)
        wrap(StagedFile, "publish", "publish", lambda s, *_: s.dest)
        wrap(Export, "hash_file", "adopt-hash", lambda _e, dest: dest)
        wrap(Export, "make_read_only", "adopt-chmod", lambda _e, dest: dest)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="syncd-hostile-fs-"))
    base.chmod(0o755)  # traversable by nobody (pytest's tmp dirs are 0700)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def new_world(scratch: Path, nginx: Nginx) -> tuple[World, Path]:
    base = Path(tempfile.mkdtemp(dir=scratch))
    base.chmod(0o755)
    world = World(
        base / "world", GitRepo(base / "remote" / "manifests.git", base / "work" / "manifests"), nginx
    )
    outside = base / "outside"
    (outside / "d").mkdir(parents=True)
    (outside / "f").write_bytes(OUTSIDE_FILE)
    (outside / "d" / "inner").write_bytes(OUTSIDE_FILE)
    return world, outside


def check_ledger_agrees(world: World) -> dict[str, str]:
    """Every published row is a regular file at its dest (no symlink on the way) with that sha256."""
    db = Ledger.in_state_dir(world.state, readonly=True)
    try:
        rows = {d: p.sha256 for d, p in db.published().items()}
    finally:
        db.close()
    for dest, sha in rows.items():
        assert no_symlink_on_path(world.export, dest), dest
        p = world.export / dest
        assert stat.S_ISREG(p.lstat().st_mode), dest
        assert hashlib.sha256(p.read_bytes()).hexdigest() == sha, f"ledger says {dest} is {sha}"
    return rows


# --------------------------------------------------------------------------- (a) every stage, in-process

harms_strategy = st.one_of(
    st.none(),
    st.tuples(st.sampled_from(DOWNLOAD_STAGES), st.sampled_from(DOWNLOAD_HARMS)),
    st.tuples(st.sampled_from(ADOPT_STAGES), st.sampled_from(ADOPT_HARMS)),
)


@settings(
    max_examples=examples(12),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(layout=st.lists(harms_strategy, min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_harm_at_any_stage_fails_only_that_asset(
    scratch: Path, nginx: Nginx, monkeypatch: pytest.MonkeyPatch, layout: list[Harm], seed: int
) -> None:
    """Whatever is swapped in at observe, stage, publish or adopt for one dest, that asset alone fails or
    is refused (or lands, if the harm left it a clean path), the rest land, nothing outside the export
    changes, no regular file at a dest is anything but verified bytes or the foreign file, and the
    ledger agrees with the export."""
    world, outside = new_world(scratch, nginx)
    layout = [*layout, None]  # at least one asset with nothing against it
    entries, harms = [], {}
    for i, h in enumerate(layout):
        dest = f"g{i}/sub/f{i}.bin"
        entry = {
            **world.asset(f"f{i}.bin", 1000 + (seed * 7 + i * 4099) % 70_000, seed=seed + i),
            "dest": dest,
        }
        entries.append(entry)
        (world.export / f"g{i}").mkdir()
        (world.export / f"g{i}" / "keep.txt").write_bytes(FOREIGN)  # a foreign neighbour: never touched
        if h is not None:
            harms[dest] = h
            if h[0] in ADOPT_STAGES:  # the right bytes are already there: the pass verifies and adopts
                place(world.export / dest, (world.blobs / f"f{i}.bin").read_bytes())
    world.manifest("m.toml", *entries)
    world.repo.commit("hostile")
    outside_before = snapshot(outside)
    log = io.StringIO()
    logs.configure(log, console=False, journal=False)
    hooks = Hooks(world.export, outside, harms)
    allowed = {e["dest"]: {e["sha256"], hashlib.sha256(FOREIGN).hexdigest()} for e in entries}
    seen_bad: list[str] = []
    done = threading.Event()
    watcher = threading.Thread(target=watch, args=(world.export, allowed, done, seen_bad), daemon=True)
    with monkeypatch.context() as mp:
        hooks.install(mp)
        rec = Reconciler(config.load(world.config_path))
        watcher.start()
        try:
            result = rec.run_pass()
        finally:
            rec.close()
            done.set()
            watcher.join(timeout=30)
    events = events_of(log.getvalue())
    assert hooks.fired <= set(harms)
    assert {d for d, (stage, _) in harms.items() if stage in ("observe", "stage")} <= hooks.fired
    assert seen_bad == []

    assert snapshot(outside) == outside_before
    assert result.published + result.adopted + result.failed + result.refused == len(entries)
    bad = [e for e in events if e["event"] in ("asset_failed", "asset_refused")]
    assert all("internal error" not in e["error"] for e in bad), bad
    assert sorted(e["dest"] for e in bad) == sorted({e["dest"] for e in bad})  # one event per asset
    assert {e["dest"] for e in bad} <= set(harms)
    files = regular_files(world.export)
    for entry in entries:
        dest = entry["dest"]
        data = files.get(dest)
        if data is not None:
            assert data == FOREIGN or hashlib.sha256(data).hexdigest() == entry["sha256"], dest
        if dest not in harms:
            assert data is not None and hashlib.sha256(data).hexdigest() == entry["sha256"], dest
            assert stat.S_IMODE((world.export / dest).lstat().st_mode) == 0o444
    for i in range(len(entries)):
        assert files[f"g{i}/keep.txt"] == FOREIGN
    wanted = {e["dest"]: e for e in entries}
    for path, data in files.items():
        assert path in wanted or data == FOREIGN, f"unexpected file {path}"
    rows = check_ledger_agrees(world)
    assert {d for d in wanted if d not in harms} <= set(rows)
    stems = {staging_name(d) for d in wanted}
    assert all(n.partition(".")[0] in stems for n in world.staging_files())


# --------------------------------------------------------------------------- (b) permissions, as nobody

PERM_HARMS = ["ok", "unreadable-dir", "unreadable-file", "unwritable-dir", "fifo", "symlink-dir"]


def run_as_nobody(world: World, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    env = {k: v for k, v in os.environ.items() if k != "SYNCD_CONFIG"}
    env["HOME"] = "/nonexistent"
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    proc = subprocess.run(
        [*cmd, syncd_command(), "sync", "-c", str(world.config_path), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    return proc.returncode, parse_events(proc.stderr), proc.stdout


@pytest.mark.parametrize("seed", range(examples(2)))
def test_unreadable_and_unwritable_places_fail_only_their_assets(
    scratch: Path, nginx: Nginx, seed: int
) -> None:
    """As an unprivileged user: a dest whose directory cannot be searched is refused alone ('cannot
    inspect', EACCES) instead of aborting the pass; an unreadable file at a dest and an unwritable
    directory fail only their asset; FIFOs and symlinked directories are refused; every other asset lands;
    nothing root-owned or outside the export changes; staging is left empty."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    rng = random.Random(seed)  # noqa: S311 (a reproducible layout, not crypto)
    world, outside = new_world(scratch, nginx)
    kinds = ["ok", "unreadable-dir", "unreadable-file", "unwritable-dir"] + [
        rng.choice(PERM_HARMS) for _ in range(4)
    ]
    rng.shuffle(kinds)
    entries = []
    for i in range(len(kinds)):
        entry = {
            **world.asset(f"p{i}.bin", 500 + rng.randrange(50_000), seed=seed * 100 + i),
            "dest": f"p{i}/x.bin",
        }
        entries.append(entry)
    world.manifest("m.toml", *entries)
    world.repo.commit("perm")
    for dirpath, _, filenames in os.walk(world.base):
        for name in [".", *filenames]:
            os.chown(os.path.join(dirpath, name), NOBODY, NOBODY)
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(world.repo.bare_path)], check=True)
    root_owned = []
    for i, kind in enumerate(kinds):
        d = world.export / f"p{i}"
        if kind == "unreadable-dir":
            (d / "hidden").mkdir(parents=True)
            d.chmod(0o700)  # root's: nobody cannot search it
            root_owned.append(d)
        elif kind == "unreadable-file":
            d.mkdir()
            os.chown(d, NOBODY, NOBODY)
            place(d / "x.bin", (world.blobs / f"p{i}.bin").read_bytes(), mode=0o600)  # root's, right bytes
            root_owned.append(d / "x.bin")
        elif kind == "unwritable-dir":
            d.mkdir(mode=0o755)  # root's: nobody can look but not write
            root_owned.append(d)
        elif kind == "fifo":
            d.mkdir()
            os.mkfifo(d / "x.bin")
        elif kind == "symlink-dir":
            d.symlink_to(outside / "d")
    protected = {str(p): snapshot(p) for p in root_owned}
    outside_before = snapshot(outside)

    code, events, _ = run_as_nobody(world)
    assert code == 1
    assert [e for e in events if e["event"] == "command_failed"] == []
    assert len([e for e in events if e["event"] == "pass_finished"]) == 1
    by_dest: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        if e["event"] in ("asset_failed", "asset_refused", "asset_published", "asset_adopted"):
            by_dest.setdefault(e["dest"], []).append(e)
    for kind, entry in zip(kinds, entries, strict=True):
        dest = entry["dest"]
        evs = by_dest.get(dest, [])
        assert len(evs) == 1, (kind, evs)
        ev = evs[0]
        assert "internal error" not in ev.get("error", "")
        if kind == "ok":
            assert ev["event"] == "asset_published"
            p = world.export / dest
            assert hashlib.sha256(p.read_bytes()).hexdigest() == entry["sha256"]
        elif kind == "unreadable-dir":
            assert (
                ev["event"] == "asset_refused" and "cannot inspect" in ev["error"] and "EACCES" in ev["error"]
            )
            assert str(world.export) not in ev["error"]
        elif kind in ("unreadable-file", "unwritable-dir"):
            assert ev["event"] == "asset_failed" and "permission denied" in ev["error"].lower(), ev
        else:
            assert ev["event"] == "asset_refused", ev
    assert {str(p): snapshot(p) for p in root_owned} == protected
    assert snapshot(outside) == outside_before
    assert world.staging_files() == []
    check_ledger_agrees(world)


# --------------------------------------------------------------------------- (c) staging must be syncd's own


def test_data_directory_as_staging_is_refused_and_keeps_its_files(world: World) -> None:
    """[export] staging pointing at an existing data directory inside the export: the sync exits 2 with
    a config_invalid naming export.staging; the directory's files (even ones named like syncd's) stay."""
    data = world.export / "data"
    data.mkdir()
    (data / "model.bin").write_bytes(FOREIGN)
    (data / f"{'e' * 32}.part").write_bytes(FOREIGN)
    data.chmod(0o755)
    world.write_config(export={"staging": str(data)})
    entry = {**world.asset("x.bin", 1000, seed=1), "dest": "x.bin"}
    world.manifest("m.toml", entry)
    world.repo.commit("one")
    before = snapshot(data)
    run = world.sync()
    assert run.code == 2, run.err
    ev = run.one("config_invalid")
    assert "export.staging" in ev["error"] and "marker" in ev["error"]
    assert snapshot(data) == before
    assert not (world.export / "x.bin").exists()


def test_export_parent_as_staging_is_refused(world: World) -> None:
    """[export] staging = the export's parent: refused (exit 2), nothing in the parent removed."""
    parent = world.export.parent
    (parent / f"{'f' * 32}.meta").write_bytes(FOREIGN)
    (parent / "notes.txt").write_bytes(FOREIGN)
    world.write_config(export={"staging": str(parent)})
    before = sorted(os.listdir(parent))
    run = world.sync()
    assert run.code == 2, run.err
    assert sorted(os.listdir(parent)) == before
    assert (parent / f"{'f' * 32}.meta").read_bytes() == FOREIGN


def test_dest_under_a_staging_directory_inside_the_export_is_refused(world: World) -> None:
    """With staging at <export>/stage (created and marked by syncd), a dest under it is refused naming
    export.staging, pass after pass, without a download; the other asset lands; a foreign file syncd
    finds in its staging is left alone."""
    world.write_config(export={"staging": str(world.export / "stage")})
    inside = {**world.asset("in.bin", 1000, seed=2), "dest": "stage/in.bin"}
    ok = {**world.asset("ok.bin", 1000, seed=3), "dest": "ok.bin"}
    world.manifest("m.toml", inside, ok)
    world.repo.commit("two")
    for n in range(2):
        run = world.sync()
        assert run.code == 1, run.err
        refused = run.one("asset_refused")
        assert refused["dest"] == "stage/in.bin" and "export.staging" in refused["error"]
        assert run.named("asset_published") == ([] if n else [run.one("asset_published")])
        assert (world.export / "stage" / ".syncd-staging").is_file()
        (world.export / "stage" / "foreign.txt").write_bytes(FOREIGN)
    assert (world.export / "stage" / "foreign.txt").read_bytes() == FOREIGN
    assert hashlib.sha256((world.export / "ok.bin").read_bytes()).hexdigest() == ok["sha256"]
    assert sorted(os.listdir(world.export / "stage")) == [
        ".syncd-staging",
        ".syncd-staging.lock",
        "foreign.txt",
    ]


@pytest.mark.parametrize("broken", ["foreign-directory", "regular-file"])
def test_daemon_with_unusable_staging_leaks_no_descriptor(world: World, broken: str) -> None:
    """`syncd run` at a 200 ms interval whose staging is refused every pass (a foreign directory, or a
    file) keeps a constant number of open descriptors (it used to leak the root's descriptor each pass)
    and stays up."""
    foreign = world.export / "busy"
    if broken == "regular-file":
        foreign.write_bytes(FOREIGN)
        staging = foreign
    else:
        foreign.mkdir()
        (foreign / "theirs.txt").write_bytes(FOREIGN)
        staging = foreign
    world.write_config(export={"staging": str(staging)}, schedule={"interval": "200ms", "jitter": 0})
    proc = subprocess.Popen(
        [syncd_command(), "run", "-c", str(world.config_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k not in ("SYNCD_CONFIG", "NOTIFY_SOCKET")},
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
    reader.start()

    def fds_over(seconds: float) -> int:
        deadline, low = time.monotonic() + seconds, 1 << 30
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError):
                low = min(low, len(os.listdir(f"/proc/{proc.pid}/fd")))
            time.sleep(0.02)
        return low

    try:
        for _ in range(300):  # up to 30 s for the first failed pass: the daemon is fully up then
            if any('"pass_failed"' in line for line in list(lines)):
                break
            time.sleep(0.1)
        early = fds_over(0.5)  # the lowest count in a window: a pass in progress may hold a few more
        time.sleep(3.0)  # ~15 more failed passes
        late = fds_over(0.5)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        reader.join(timeout=5)
    failed = [e for e in parse_events("".join(lines)) if e.get("event") == "pass_failed"]
    assert len(failed) >= 10 and all("staging" in e["error"] for e in failed)
    assert late <= early, (early, late)
    assert (foreign / "theirs.txt" if foreign.is_dir() else foreign).read_bytes() == FOREIGN
