"""Unit tests for syncd.publish and syncd.staging on a real directory: the export lock, publishing from
the verified descriptor, staging ownership and clean-up, per-dest observation errors, no descriptor
leaks."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from syncd import publish, staging
from syncd.errors import ConfigError, LockHeldError, PublishError
from syncd.publish import STAGING_MARKER, Export, State, staging_name
from syncd.staging import STAGING_LOCK

pytestmark = pytest.mark.unit

SHA = "0" * 64  # stage() only compares it with resume metadata
GOOD = b"verified bytes " * 1000
EVIL = b"swapped in by someone else"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def tree(top: Path) -> dict[str, str]:
    """Every path under ``top``: file bytes' sha256, link target, 'dir' or 'other'."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(top))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "other"
    return out


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "export"
    r.mkdir()
    return r


@pytest.fixture
def export(root: Path) -> Iterator[Export]:
    e = Export(root, root / ".syncd-staging")
    e.open()
    try:
        yield e
    finally:
        e.close()


def staged_with(export: Export, dest: str, data: bytes = GOOD) -> publish.StagedFile:
    staged = export.stage(dest, SHA, len(data))
    staged.write(data)
    return staged


# --------------------------------------------------------------------------- the export lock


def test_second_open_of_one_export_is_refused_until_the_first_closes(root: Path) -> None:
    """A second Export on the same root (another staging, as another state dir would have) gets
    LockHeldError naming the export and the holder's pid; after close() it opens."""
    first = Export(root, root / ".syncd-staging")
    first.open()
    other_staging = root.parent / "other-staging"
    second = Export(root, other_staging)
    try:
        with pytest.raises(LockHeldError) as info:
            second.open()
        assert str(root) in str(info.value) and f"pid {os.getpid()}" in str(info.value)
        assert not other_staging.exists()  # refused before it created anything
        lock = os.lstat(root / ".syncd.lock")
        assert stat.S_ISREG(lock.st_mode) and stat.S_IMODE(lock.st_mode) == 0o600
    finally:
        first.close()
    second.open()
    second.close()


@pytest.mark.parametrize("shared", ["configured", "first_default"])
def test_second_open_of_one_staging_is_refused_until_the_first_closes(root: Path, shared: str) -> None:
    """Two exports (other roots) naming one staging directory, or the second naming the first's default
    one: the second open gets LockHeldError naming staging and the holder's pid, leaks no descriptor and
    leaves its own export unlocked; after the first closes it opens."""
    other = root.parent / "export2"
    other.mkdir()
    staging = root.parent / "shared-staging" if shared == "configured" else root / ".syncd-staging"
    first = Export(root, staging)
    first.open()
    before = open_fds()
    try:
        for _ in range(20):
            with pytest.raises(LockHeldError) as info:
                Export(other, staging).open()
            text = str(info.value)
            assert f"staging directory {staging}" in text and f"pid {os.getpid()}" in text
        assert open_fds() == before
        probe = os.open(other / ".syncd.lock", os.O_RDWR)
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # refused second: its export is free again
        finally:
            os.close(probe)
    finally:
        first.close()
    second = Export(other, staging)
    second.open()
    second.close()
    assert open_fds() == before - 4  # first's root, export lock, staging and staging lock are closed


def test_reopening_leaves_the_lock_files_untouched(root: Path) -> None:
    """A second open by the same process (the daemon's next pass) rewrites neither lock file: their
    mtime, ctime and bytes stay as the first pass left them."""

    def stamps() -> list[tuple[int, int, bytes]]:
        paths = (root / ".syncd.lock", root / ".syncd-staging" / STAGING_LOCK)
        return [(p.stat().st_mtime_ns, p.stat().st_ctime_ns, p.read_bytes()) for p in paths]

    e = Export(root, root / ".syncd-staging")
    e.open()
    e.close()
    first = stamps()
    assert [b for *_, b in first] == [f"{os.getpid()}\n".encode()] * 2
    time.sleep(0.05)
    e.open()
    e.close()
    assert stamps() == first


def test_a_lock_file_holding_another_pid_gets_ours(root: Path) -> None:
    """A lock file left by an earlier process (another pid, or junk) is rewritten with our pid."""
    (root / ".syncd.lock").write_bytes(b"999999999\njunk")
    e = Export(root, root / ".syncd-staging")
    e.open()
    try:
        assert (root / ".syncd.lock").read_bytes() == f"{os.getpid()}\n".encode()
    finally:
        e.close()


def test_dry_run_open_takes_no_lock_and_creates_nothing(root: Path) -> None:
    """create_staging=False works beside a locked export and changes nothing on disk."""
    holder = Export(root, root / ".syncd-staging")
    holder.open()
    try:
        (root / "d").mkdir()
        (root / "d" / "f").write_bytes(b"x")
        before = tree(root.parent)
        dry = Export(root, root.parent / "custom-staging")
        dry.open(create_staging=False)
        try:
            assert dry.observe("d/f").state is State.FILE
            assert dry.clean_staging() == []
        finally:
            dry.close()
        assert tree(root.parent) == before
    finally:
        holder.close()


def test_lock_file_symlink_is_refused_and_not_followed(root: Path, tmp_path: Path) -> None:
    """A symlink planted at .syncd.lock is refused (PublishError); its target is neither created nor
    truncated, and no descriptor is left open."""
    target = tmp_path / "target"
    target.write_bytes(b"keep me")
    os.symlink(target, root / ".syncd.lock")
    before = open_fds()
    for _ in range(20):
        with pytest.raises(PublishError, match="symlink"):
            Export(root, root / ".syncd-staging").open()
    assert open_fds() == before
    assert target.read_bytes() == b"keep me"


def test_lock_held_path_leaks_no_descriptor(root: Path) -> None:
    """Refused opens (lock held) close every descriptor they opened."""
    holder = Export(root, root / ".syncd-staging")
    holder.open()
    try:
        before = open_fds()
        for _ in range(50):
            with pytest.raises(LockHeldError):
                Export(root, root / ".syncd-staging").open()
        assert open_fds() == before
    finally:
        holder.close()


# --------------------------------------------------------------------------- publishing


def test_publish_lands_verified_bytes_read_only_and_empties_staging(export: Export, root: Path) -> None:
    """publish() puts the staged bytes at dest with mode 0444, one link, and leaves staging empty."""
    staged_with(export, "a/b/c.bin").publish()
    st = os.lstat(root / "a/b/c.bin")
    assert (root / "a/b/c.bin").read_bytes() == GOOD
    assert stat.S_IMODE(st.st_mode) == 0o444 and st.st_nlink == 1
    assert os.listdir(root / ".syncd-staging") == [STAGING_LOCK]


def test_staging_name_swapped_before_publish_never_reaches_dest(export: Export, root: Path) -> None:
    """A file renamed over the staging name before publish is never published: the publish fails (the
    verified file lost its last name) and dest stays empty."""
    staged = staged_with(export, "x.bin")
    intruder = root / ".syncd-staging" / "intruder"
    intruder.write_bytes(EVIL)
    os.replace(intruder, root / ".syncd-staging" / staged.part)
    with pytest.raises(PublishError, match="removed before it could be published"):
        staged.publish()
    assert not (root / "x.bin").exists()


@pytest.mark.parametrize("meddling", ["grown", "truncated", "linked_elsewhere"])
def test_staging_file_another_writer_touched_is_never_published(
    export: Export, root: Path, meddling: str
) -> None:
    """A staging file someone else also wrote into (its size is not the expected one) or linked elsewhere
    (link count 2) is refused at publish: nothing appears at dest, and it stays writable (never 0444)."""
    staged = staged_with(export, "x.bin")
    part = root / ".syncd-staging" / staged.part
    if meddling == "grown":
        with open(part, "ab") as fh:
            fh.write(b"more")
    elif meddling == "truncated":
        os.truncate(part, 3)
    else:
        os.link(part, root.parent / "elsewhere")
    with pytest.raises(PublishError, match="changed by someone else"):
        staged.publish()
    assert not (root / "x.bin").exists()
    assert stat.S_IMODE(part.stat().st_mode) == 0o600


def test_staging_file_deleted_before_publish_fails_the_publish(export: Export, root: Path) -> None:
    """A staging file unlinked by someone else (another syncd's clean-up) cannot be published."""
    staged = staged_with(export, "x.bin")
    os.unlink(root / ".syncd-staging" / staged.part)
    with pytest.raises(PublishError, match="removed"):
        staged.publish()
    assert not (root / "x.bin").exists()


def test_racing_swapper_never_gets_its_bytes_published(export: Export, root: Path) -> None:
    """While a thread keeps swapping other files in under the staging name, every publish either puts
    the verified bytes at dest or fails; the swapped bytes never appear at a dest."""
    outcomes = {"published": 0, "failed": 0}
    rng = random.Random(7)  # noqa: S311 (timing jitter, not crypto)
    for i in range(40):
        dest = f"race/{i}.bin"
        staged = staged_with(export, dest)
        target = root / ".syncd-staging" / staged.part
        stop = threading.Event()

        def swap(target: Path = target, stop: threading.Event = stop, n: int = i) -> None:
            time.sleep(rng.uniform(0, 0.004))  # sometimes before the publish, sometimes during or after
            k = 0
            while not stop.is_set() and k < 200:
                tmp = target.with_name(f"swap{n}.{k}")
                tmp.write_bytes(EVIL)
                os.replace(tmp, target)
                k += 1

        t = threading.Thread(target=swap)
        t.start()
        try:
            staged.publish()
            outcomes["published"] += 1
        except PublishError:
            outcomes["failed"] += 1
        finally:
            stop.set()
            t.join()
        p = root / dest
        if p.exists():
            assert p.read_bytes() == GOOD
    assert sum(outcomes.values()) == 40


def test_publish_never_replaces_a_file_that_appeared(export: Export, root: Path) -> None:
    """Without replace, a file that appeared at dest after planning stays as it was; publish fails."""
    staged = staged_with(export, "x.bin")
    (root / "x.bin").write_bytes(b"someone else's")
    with pytest.raises(PublishError, match="appeared"):
        staged.publish()
    staged.discard()
    assert (root / "x.bin").read_bytes() == b"someone else's"
    assert os.listdir(root / ".syncd-staging") == [STAGING_LOCK]


def test_replace_swaps_a_regular_file_and_refuses_links_and_dirs(export: Export, root: Path) -> None:
    """replace=True puts the new bytes over an old regular file atomically; a symlink or directory at
    dest is refused; staging is left empty in every case."""
    (root / "old.bin").write_bytes(b"old")
    staged_with(export, "old.bin").publish(replace=True)
    assert (root / "old.bin").read_bytes() == GOOD
    os.symlink("old.bin", root / "link.bin")
    (root / "dir.bin").mkdir()
    for dest in ("link.bin", "dir.bin"):
        staged = staged_with(export, dest)
        with pytest.raises(PublishError):
            staged.publish(replace=True)
        staged.discard()
    assert os.readlink(root / "link.bin") == "old.bin" and (root / "dir.bin").is_dir()
    assert os.listdir(root / ".syncd-staging") == [STAGING_LOCK]


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "plain-rename"])
def test_without_proc_the_name_is_checked_against_the_descriptor(
    export: Export, root: Path, monkeypatch: pytest.MonkeyPatch, renameat2: bool
) -> None:
    """With no /proc: a normal publish lands, a swapped staging name is refused, an existing dest is
    kept (renameat2 NOREPLACE, or the plain-rename fallback's check)."""
    monkeypatch.setattr(staging, "PROC_FD", "/nonexistent/proc/self/fd")
    if not renameat2:
        monkeypatch.setattr(staging, "_libc_renameat2", lambda: None)
    staged_with(export, "ok.bin").publish()
    assert (root / "ok.bin").read_bytes() == GOOD

    staged = staged_with(export, "swapped.bin")
    intruder = root / ".syncd-staging" / "intruder"
    intruder.write_bytes(EVIL)
    os.replace(intruder, root / ".syncd-staging" / staged.part)
    with pytest.raises(PublishError, match="replaced"):
        staged.publish()
    staged.discard()
    assert not (root / "swapped.bin").exists()

    (root / "taken.bin").write_bytes(b"theirs")
    staged = staged_with(export, "taken.bin")
    with pytest.raises(PublishError, match="appeared"):
        staged.publish()
    staged.discard()
    assert (root / "taken.bin").read_bytes() == b"theirs"

    (root / "old.bin").write_bytes(b"old")
    staged_with(export, "old.bin").publish(replace=True)
    assert (root / "old.bin").read_bytes() == GOOD
    assert os.listdir(root / ".syncd-staging") == [STAGING_LOCK]


def test_resume_never_writes_into_a_staging_file_linked_at_a_dest(export: Export, root: Path) -> None:
    """A crash between link and unlink leaves the dest's inode in staging: stage() starts a fresh file
    instead of resuming (and truncating) it, so the published file is untouched."""
    staged_with(export, "x.bin").publish()
    stem = staging_name("x.bin")
    os.link(root / "x.bin", root / ".syncd-staging" / f"{stem}.part")
    (root / ".syncd-staging" / f"{stem}.meta").write_text(f'{{"sha256": "{SHA}", "validator": null}}')
    staged = export.stage("x.bin", SHA, len(GOOD))
    staged.restart(None)
    staged.write(b"new")
    staged.discard()
    assert (root / "x.bin").read_bytes() == GOOD


def test_fifo_or_bad_meta_in_staging_is_replaced_not_opened(export: Export, root: Path) -> None:
    """A FIFO at a staging name (with a FIFO or garbage as its .meta) never blocks stage(); a fresh
    regular file is used instead."""
    staging = root / ".syncd-staging"
    for i, meta in enumerate(("fifo", "garbage", "validator")):
        dest = f"f{i}.bin"
        stem = staging_name(dest)
        os.mkfifo(staging / f"{stem}.part")
        if meta == "fifo":
            os.mkfifo(staging / f"{stem}.meta")
        elif meta == "garbage":
            (staging / f"{stem}.meta").write_bytes(b"\xff\x00 not json")
        else:
            (staging / f"{stem}.meta").write_text(f'{{"sha256": "{SHA}", "validator": [1]}}')
        staged = export.stage(dest, SHA, 10)
        assert stat.S_ISREG(os.fstat(staged.fd).st_mode) and staged.validator is None
        staged.write(b"0123456789")
        staged.publish()
        assert (root / dest).read_bytes() == b"0123456789"


def test_hash_and_adopt_refuse_a_fifo_without_blocking(export: Export, root: Path) -> None:
    """hash_file and make_read_only on a FIFO (swapped in after observe) raise PublishError at once."""
    os.mkfifo(root / "pipe")
    with pytest.raises(PublishError, match="regular file"):
        export.hash_file("pipe")
    with pytest.raises(PublishError, match="regular file"):
        export.make_read_only("pipe")


# --------------------------------------------------------------------------- staging ownership


def test_existing_data_directory_is_not_taken_as_staging(root: Path) -> None:
    """A non-empty directory without syncd's marker is refused as staging (ConfigError on
    export.staging); its files, including ones named like syncd's, stay."""
    data = root / "data"
    data.mkdir()
    (data / "model.bin").write_bytes(b"precious")
    (data / f"{'a' * 32}.part").write_bytes(b"looks like ours")
    data.chmod(0o755)
    before = tree(root.parent)
    before_fds = open_fds()
    for _ in range(30):
        with pytest.raises(ConfigError) as info:
            Export(root, data).open()
        assert info.value.path == "export.staging" and "marker" in str(info.value)
    assert open_fds() == before_fds
    after = tree(root.parent)
    assert after.pop("export/.syncd.lock")  # the export lock, taken before staging is looked at
    assert after == before
    assert stat.S_IMODE(data.stat().st_mode) == 0o755


@pytest.mark.parametrize("which", ["root", "parent", "grandparent"])
def test_staging_at_root_or_an_ancestor_is_refused(root: Path, which: str) -> None:
    """Staging may never be the export root or one of its parents (even marked): refused, nothing
    removed, modes untouched."""
    target = {"root": root, "parent": root.parent, "grandparent": root.parent.parent}[which]
    (root / "keep.bin").write_bytes(b"keep")
    (root.parent / f"{'b' * 32}.part").write_bytes(b"outside the export")
    marker = target / STAGING_MARKER
    marker.write_bytes(b"planted")
    mode = stat.S_IMODE(target.stat().st_mode)
    try:
        with pytest.raises(ConfigError, match="parents"):
            Export(root, target).open()
        assert (root / "keep.bin").read_bytes() == b"keep"
        assert (root.parent / f"{'b' * 32}.part").exists()
        assert stat.S_IMODE(target.stat().st_mode) == mode
    finally:
        marker.unlink()


def test_empty_or_syncd_only_directory_is_adopted_and_marked(root: Path, tmp_path: Path) -> None:
    """An empty directory (or one holding only syncd's staging names) becomes staging: marked, 0700,
    and accepted on every later open."""
    for name, content in (("empty", []), ("old-syncd", [f"{'c' * 32}.part", f"{'c' * 32}.meta"])):
        d = tmp_path / name
        d.mkdir(mode=0o755)
        for f in content:
            (d / f).write_bytes(b"x")
        for _ in range(2):
            e = Export(root, d)
            e.open()
            e.close()
        assert (d / STAGING_MARKER).is_file() and stat.S_IMODE(d.stat().st_mode) == 0o700


def test_staging_that_is_a_symlink_is_refused(root: Path, tmp_path: Path) -> None:
    """A staging path whose last component is a symlink is refused as export.staging."""
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    with pytest.raises(ConfigError, match="symlink"):
        Export(root, tmp_path / "link").open()
    assert os.listdir(real) == []


def test_clean_staging_removes_only_syncd_names(export: Export, root: Path) -> None:
    """Start-of-pass clean-up removes syncd's stale names and keeps resumable pairs; foreign files,
    directories, FIFOs and the marker are left alone."""
    staging = root / ".syncd-staging"
    a, b, c = (h * 32 for h in "abc")
    ours = [f"{a}.part", f"{b}.meta.tmp", f"{c}.pub"]
    resumable = [f"{b}.part", f"{b}.meta"]
    foreign = ["notes.txt", f"{a}.part.bak", f"{'A' * 32}.part", STAGING_MARKER]
    for n in ours + resumable + foreign:
        (staging / n).write_bytes(b"x")
    (staging / f"{'d' * 32}.part").mkdir()
    os.mkfifo(staging / "fifo")
    assert sorted(export.clean_staging()) == sorted(ours)
    left = set(os.listdir(staging))
    assert left == {*resumable, *foreign, STAGING_LOCK, f"{'d' * 32}.part", "fifo"}
    export.clean_staging(keep=set())
    assert set(os.listdir(staging)) == {*foreign, STAGING_LOCK, f"{'d' * 32}.part", "fifo"}


def test_staging_in_root_is_the_relative_path_or_none(root: Path, tmp_path: Path) -> None:
    """staging_in_root() gives the staging dir's path below the root, None outside it."""
    assert Export(root, root / ".syncd-staging").staging_in_root() == ".syncd-staging"
    assert Export(root, root / "a" / "stage").staging_in_root() == "a/stage"
    assert Export(root, tmp_path / "elsewhere").staging_in_root() is None
    assert Export(root, root).staging_in_root() is None


def test_broken_staging_leaks_no_descriptor(root: Path, tmp_path: Path) -> None:
    """Opening an export whose staging cannot be used (a file, a missing parent, foreign contents),
    many times in one process, leaves the number of open descriptors unchanged."""
    (tmp_path / "a-file").write_bytes(b"x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_bytes(b"x")
    broken = [tmp_path / "a-file", tmp_path / "missing" / "staging", foreign]
    before = open_fds()
    for _ in range(40):
        for where in broken:
            with pytest.raises((ConfigError, PublishError)):
                Export(root, where).open()
    assert open_fds() == before
    e = Export(root, root / ".syncd-staging")
    e.open()
    e.close()
    assert open_fds() == before


# --------------------------------------------------------------------------- observing


def fail_open_of(name: str, err: int) -> Callable[..., Any]:
    real = os.open

    def fake(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if path == name:
            raise OSError(err, os.strerror(err))
        return real(path, flags, *args, **kw)

    return fake


@pytest.mark.parametrize("err", [errno.EACCES, errno.ESTALE, errno.EIO])
def test_uninspectable_parent_is_one_unreadable_dest(
    export: Export, root: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    """A parent directory that cannot be opened (EACCES, ESTALE, EIO) makes that dest UNREADABLE with
    the errno's name; observe() does not raise and other dests are observed as usual."""
    (root / "bad").mkdir()
    (root / "good").mkdir()
    (root / "good" / "f").write_bytes(b"1234")
    monkeypatch.setattr(os, "open", fail_open_of("bad", err))
    obs = export.observe("bad/f")
    assert obs.state is State.UNREADABLE
    assert errno.errorcode[err] in obs.detail and str(root) not in obs.detail
    seen = export.observe("good/f")
    assert (seen.state, seen.size, seen.mode) == (State.FILE, 4, 0o644) and seen.identity


def test_adopt_refuses_a_file_swapped_or_changed_after_its_hash(export: Export, root: Path) -> None:
    """make_read_only adopts only the file hash_file read: one renamed over it, or written to, after the
    hash is left untouched (PublishError); the unchanged one becomes 0444."""
    (root / "a.bin").write_bytes(GOOD)
    export.hash_file("a.bin")
    (root / "other").write_bytes(EVIL)
    os.chmod(root / "other", 0o644)
    os.replace(root / "other", root / "a.bin")
    with pytest.raises(PublishError, match="changed while being adopted"):
        export.make_read_only("a.bin")
    assert stat.S_IMODE((root / "a.bin").stat().st_mode) == 0o644

    (root / "b.bin").write_bytes(GOOD)
    export.hash_file("b.bin")
    time.sleep(0.01)
    with open(root / "b.bin", "ab") as fh:
        fh.write(b"appended")
    with pytest.raises(PublishError, match="changed"):
        export.make_read_only("b.bin")

    (root / "c.bin").write_bytes(GOOD)
    os.chmod(root / "c.bin", 0o644)
    assert export.hash_file("c.bin") == (hashlib.sha256(GOOD).hexdigest(), len(GOOD))
    export.make_read_only("c.bin")
    assert stat.S_IMODE((root / "c.bin").stat().st_mode) == 0o444


def test_file_written_to_while_hashed_is_not_judged(
    export: Export, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that grows while hash_file reads it raises PublishError ('changed while being checked')
    instead of returning a hash of bytes that are no longer what is there."""
    (root / "a.bin").write_bytes(GOOD)
    real_read = os.read
    appended: list[bool] = []

    def read_then_append(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        if not appended:  # once: the reader then meets the new end of file
            appended.append(True)
            with open(root / "a.bin", "ab") as fh:
                fh.write(b"more")
        return data

    monkeypatch.setattr(os, "read", read_then_append)
    with pytest.raises(PublishError, match="changed while being checked"):
        export.hash_file("a.bin")


def test_file_system_without_locks_fails_clearly(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An NFS mount without lockd (flock → ENOLCK) fails the open with a PublishError that says what to
    do, never unlocked, and leaks no descriptor."""

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    before = open_fds()
    for _ in range(10):
        with pytest.raises(PublishError, match=r"grants no locks.*ENOLCK.*nolock"):
            Export(root, root / ".syncd-staging").open()
    assert open_fds() == before
    assert not (root / ".syncd-staging").exists()
