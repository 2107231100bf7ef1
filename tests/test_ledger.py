"""The ledger and the state directory under damage: dry runs write nothing, corrupt ledgers are refused
clearly or set aside and rebuilt by adoption, and state files are never followed through a symlink."""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import Run, World, examples
from syncd.ledger import SCHEMA_VERSION

pytestmark = pytest.mark.e2e

FUNCTION_FIXTURES = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


def snapshot(*roots: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int, int, str]]:
    """Every entry under ``roots``: relative name → (mode, size, mtime_ns, sha256 of its bytes)."""
    out: dict[str, tuple[int, int, int, str]] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in skip]
            for name in dirnames + filenames:
                path = Path(dirpath, name)
                st_ = path.lstat()
                digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
                out[str(path)] = (st_.st_mode, st_.st_size, st_.st_mtime_ns, digest)
    return out


def three_assets(world: World) -> dict[str, bytes]:
    """Commit three assets and return dest → the bytes that must be there."""
    want = {}
    for i in range(3):
        a = world.asset(f"{i}.bin", 2000 + i, seed=i)
        world.manifest(f"m{i}.toml", {**a, "dest": f"d{i}/{i}.bin"})
        want[f"d{i}/{i}.bin"] = (world.blobs / f"{i}.bin").read_bytes()
    world.repo.commit("three")
    return want


def assert_exact(world: World, want: dict[str, bytes]) -> None:
    assert world.export_files() == sorted(want)
    for dest, data in want.items():
        assert (world.export / dest).read_bytes() == data, dest


def planned(run: Run, kind: str) -> int:
    """How many dry-run lines plan ``kind`` (download, skip, …)."""
    return sum(1 for line in run.out.splitlines() if line.startswith(kind + " "))


STATE_NAME = st.text(alphabet="#?%&= ab.:;~é", min_size=1, max_size=10).filter(lambda s: s not in (".", ".."))


@settings(max_examples=examples(6), deadline=None, database=None, suppress_health_check=FUNCTION_FIXTURES)
@given(name=STATE_NAME)
def test_dry_run_writes_nothing(world: World, name: str) -> None:
    """A dry run (whatever '#', '?' or '%' the state directory's name holds) reads the real ledger and
    changes no file under the state directory (the bare clone aside, which it fetches into) or the export."""
    state = world.base / f"state-{name}"
    world.write_config(state={"directory": str(state)})
    if not (world.repo.work_path / "assets").exists():
        three_assets(world)
    assert world.sync().code == 0
    new = f"new-{uuid.uuid4().hex[:8]}.bin"
    world.manifest(f"{new}.toml", {**world.asset(new, 10, seed=9), "dest": new})
    world.repo.commit(f"one more for {name!r}")
    beside = sorted(os.listdir(world.base))
    before = snapshot(state, world.export, skip=("repo.git",))
    dry = world.sync("--dry-run")
    assert dry.code == 0, dry.err
    assert f"download  {new}" in dry.out and planned(dry, "skip") >= 3  # it read the real ledger
    assert snapshot(state, world.export, skip=("repo.git",)) == before
    assert sorted(os.listdir(world.base)) == beside  # no stray database file beside the state dir
    writer = sqlite3.connect(state / "ledger.sqlite3")  # as a running daemon: the WAL files exist
    try:
        writer.execute("SELECT count(*) FROM published").fetchall()
        names = sorted(os.listdir(state))
        assert "ledger.sqlite3-wal" in names
        dry = world.sync("--dry-run")  # now read through the escaped file: URI
        assert dry.code == 0 and planned(dry, "skip") >= 3, dry.err
        assert sorted(os.listdir(state)) == names and sorted(os.listdir(world.base)) == beside
    finally:
        writer.close()
    assert world.sync().code == 0  # leave the world converged for the next example


def test_dry_run_beside_a_lock_holder_touches_nothing_at_all(world: World) -> None:
    """Beside a process holding the state lock, a dry run neither fetches nor writes: every file under
    the state directory (the bare clone included) and the export is unchanged, WAL files present or not."""
    three_assets(world)
    assert world.sync().code == 0
    world.manifest("new.toml", {**world.asset("n.bin", 10, seed=9), "dest": "new.bin"})
    world.repo.commit("one more")
    with open(world.state / "lock", "r+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = snapshot(world.state, world.export)
        dry = world.sync("--dry-run")
        assert dry.code == 0, dry.err
        assert "not fetched" in dry.out and planned(dry, "skip") == 3
        assert snapshot(world.state, world.export) == before
        writer = sqlite3.connect(world.state / "ledger.sqlite3")  # like a running daemon: WAL files exist
        try:
            writer.execute("PRAGMA journal_mode=WAL").fetchall()
            writer.execute("SELECT count(*) FROM published").fetchall()
            names = sorted(os.listdir(world.state))
            assert "ledger.sqlite3-wal" in names
            dry = world.sync("--dry-run")
            assert dry.code == 0 and planned(dry, "skip") == 3, dry.err
            assert sorted(os.listdir(world.state)) == names
        finally:
            writer.close()


def test_first_dry_run_creates_no_ledger_or_lock(world: World) -> None:
    """A dry run on a state directory that never saw a pass creates neither the ledger nor the lock."""
    three_assets(world)
    dry = world.sync("--dry-run")
    assert dry.code == 0, dry.err
    assert planned(dry, "download") == 3
    assert not (world.state / "ledger.sqlite3").exists() and not (world.state / "lock").exists()
    assert world.export_files() == []


# corrupted ledgers --------------------------------------------------------------------------------


def _truncate(path: Path, rng: random.Random) -> str:
    data = path.read_bytes()
    cut = rng.randrange(len(data))
    path.write_bytes(data[:cut])
    return f"truncated at {cut}"


def _flip(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    where = sorted(rng.randrange(len(data)) for _ in range(rng.randint(1, 8)))
    for i in where:
        data[i] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))
    return f"flipped bytes at {where}"


def _sql(path: Path, statements: list[str], *args: object) -> None:
    db = sqlite3.connect(path)
    try:
        for s in statements:
            db.execute(s, args)
        db.commit()
    finally:
        db.close()


def _bad_json(path: Path, rng: random.Random) -> str:
    junk = rng.choice(["{not json", "[1, 2", '[{"dest": 1}]', '[{"nope": "x"}]', "null", '"x"', "\x00", 7])
    column = rng.choice(["assets", "problems"])
    _sql(path, [f"UPDATE manifests SET {column} = ?"], junk)  # noqa: S608 (a column name of ours)
    return f"manifests.{column} = {junk!r}"


def _drop_column(path: Path, rng: random.Random) -> str:
    table, column = rng.choice(
        [
            ("published", "source"),
            ("published", "orphaned_at"),
            ("failures", "last_error"),
            ("manifests", "problems"),
        ]
    )
    _sql(path, [f"ALTER TABLE {table} DROP COLUMN {column}"])
    return f"dropped {table}.{column}"


def _add_column(path: Path, rng: random.Random) -> str:
    table = rng.choice(["published", "meta", "manifests"])
    _sql(path, [f"ALTER TABLE {table} ADD COLUMN extra TEXT"])
    return f"added {table}.extra"


def _not_a_database(path: Path, rng: random.Random) -> str:
    path.write_bytes(rng.randbytes(rng.choice([1, 99, 100, 4096, 20000])))
    return "random bytes"


def _newer_schema(path: Path, rng: random.Random) -> str:
    _sql(path, [f"PRAGMA user_version = {rng.randint(SCHEMA_VERSION + 1, 1000)}"])
    return "newer schema"


CORRUPTIONS = [_truncate, _flip, _bad_json, _drop_column, _add_column, _not_a_database, _newer_schema]


@pytest.fixture
def synced(world: World) -> Iterator[tuple[World, dict[str, bytes], bytes]]:
    """A world synced once: the export holds three assets; yields the pristine ledger's bytes."""
    want = three_assets(world)
    assert world.sync().code == 0
    yield world, want, (world.state / "ledger.sqlite3").read_bytes()


def _restore(world: World, pristine: bytes) -> None:
    for p in world.state.iterdir():
        if p.name.startswith("ledger.sqlite3"):
            p.unlink()
    (world.state / "ledger.sqlite3").write_bytes(pristine)


def _assert_clear(run: Run, ledger: Path) -> dict[str, Any]:
    assert "Traceback" not in run.err
    failed = run.one("command_failed")
    assert failed["error_type"] in ("LedgerError", "LedgerRefusedError")
    assert str(ledger) in failed["error"]
    assert not run.named("pass_finished")
    return failed


@settings(max_examples=examples(14), deadline=None, database=None, suppress_health_check=FUNCTION_FIXTURES)
@given(kind=st.sampled_from(CORRUPTIONS), seed=st.integers(0, 2**32 - 1))
def test_corrupt_ledger_is_refused_clearly_or_rebuilt(
    synced: tuple[World, dict[str, bytes], bytes], kind: Any, seed: int
) -> None:
    """A ledger damaged in any generated way gives a clear LedgerError exit, or is set aside (or read
    as it is) and the pass converges: every dest byte-exact, and the next pass changes nothing. (The one
    damage SQLite and the checksums cannot see, a hex digit of the last good commit changed into another,
    reads as a rewritten branch: exit 1 naming it, nothing planned.)"""
    world, want, pristine = synced
    _restore(world, pristine)
    ledger = world.state / "ledger.sqlite3"
    what = kind(ledger, random.Random(seed))  # noqa: S311 (test data)
    run = world.sync()
    note = f"{what}\n{run.err}"
    assert "Traceback" not in run.err, note
    if run.code == 2:
        assert "written by a newer syncd" in _assert_clear(run, ledger)["error"], note
        assert kind is _newer_schema, note
    elif run.named("command_failed"):
        _assert_clear(run, ledger)
    else:
        assert run.named("pass_finished"), note
        assert run.code == 0 or "is not in the clone" in run.one("pass_finished")["git_error"], note
        assert_exact(world, want)
        for aside in run.named("ledger_set_aside"):
            assert aside["ledger"] == str(ledger) and Path(aside["moved_to"]).exists(), note
        again = world.sync()
        finished = again.one("pass_finished")
        assert (finished["published"], finished["adopted"]) == (0, 0), note
        assert again.code == run.code or (run.code == 1 and again.code == 0), note
        assert not again.named("ledger_set_aside"), note
    assert_exact(world, want)
    assert kind not in (_not_a_database, _drop_column, _add_column) or run.named("ledger_set_aside"), note
    assert kind is not _newer_schema or run.code == 2, note
    for p in world.state.glob("ledger.sqlite3.corrupt-*"):
        p.unlink()


def test_set_aside_ledger_is_rebuilt_by_adoption(synced: tuple[World, dict[str, bytes], bytes]) -> None:
    """A ledger that is not a database is renamed aside (one warning naming both paths) and rebuilt:
    every file already at its dest is adopted by hash, none is downloaded again."""
    world, want, _ = synced
    ledger = world.state / "ledger.sqlite3"
    ledger.write_bytes(b"this is not a database, just bytes" * 100)
    run = world.sync()
    assert run.code == 0, run.err
    aside = run.one("ledger_set_aside")
    assert aside["ledger"] == str(ledger) and aside["level"] == "warning"
    moved = Path(aside["moved_to"])
    assert moved.parent == world.state and moved.name.startswith("ledger.sqlite3.corrupt-")
    assert moved.read_bytes().startswith(b"this is not a database")
    finished = run.one("pass_finished")
    assert (finished["adopted"], finished["published"]) == (3, 0)
    assert_exact(world, want)


def test_dry_run_on_a_garbage_ledger_sets_nothing_aside(
    synced: tuple[World, dict[str, bytes], bytes],
) -> None:
    """A dry run on a garbage ledger exits 1 with a clear LedgerError and moves or writes nothing."""
    world, _, _ = synced
    ledger = world.state / "ledger.sqlite3"
    ledger.write_bytes(b"garbage" * 50)
    before = snapshot(world.state, skip=("repo.git",))
    run = world.sync("--dry-run")
    assert run.code == 1
    assert "sets it aside" in _assert_clear(run, ledger)["error"]
    assert snapshot(world.state, skip=("repo.git",)) == before


def test_newer_schema_is_refused(synced: tuple[World, dict[str, bytes], bytes]) -> None:
    """A ledger whose user_version is newer than this syncd's schema is refused with exit 2, untouched."""
    world, _, _ = synced
    ledger = world.state / "ledger.sqlite3"
    _sql(ledger, ["PRAGMA user_version = 7"])
    data = ledger.read_bytes()
    run = world.sync()
    assert run.code == 2
    assert "written by a newer syncd (schema 7" in _assert_clear(run, ledger)["error"]
    assert ledger.read_bytes() == data and not list(world.state.glob("*.corrupt-*"))


# the state directory ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lock", "ledger.sqlite3", "ledger.sqlite3-wal"])
def test_symlinked_state_file_is_refused_and_not_followed(world: World, tmp_path: Path, name: str) -> None:
    """A symlink where the lock or a ledger file belongs is refused (exit 2, naming it); its target stays."""
    three_assets(world)
    world.state.mkdir(mode=0o700)
    target = tmp_path / "precious"
    target.write_bytes(b"do not truncate me\n")
    (world.state / name).symlink_to(target)
    run = world.sync()
    assert run.code == 2, run.err
    failed = run.one("command_failed")
    assert "symlink" in failed["error"] and str(world.state / name) in failed["error"]
    assert target.read_bytes() == b"do not truncate me\n"
    assert world.export_files() == []
    dry = world.sync("--dry-run")
    assert dry.code == 2 and target.read_bytes() == b"do not truncate me\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_state_dir_owned_by_another_user_is_refused(world: World) -> None:
    """A state directory owned by another uid is refused with exit 2 and a message naming both uids."""
    three_assets(world)
    world.state.mkdir(mode=0o700)
    os.chown(world.state, 65534, 65534)
    run = world.sync()
    assert run.code == 2, run.err
    error = run.one("command_failed")["error"]
    assert str(world.state) in error and "uid 65534" in error and f"uid {os.geteuid()}" in error
    assert os.listdir(world.state) == [] and world.export_files() == []


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_state_dir_writable_by_others_is_refused(world: World, mode: int) -> None:
    """A state directory writable by group or others is refused with exit 2; syncd creates its own 0700."""
    three_assets(world)
    world.state.mkdir()
    world.state.chmod(mode)
    run = world.sync()
    assert run.code == 2, run.err
    assert f"mode {mode:04o}" in run.one("command_failed")["error"]
    world.state.rmdir()
    assert world.sync().code == 0
    assert world.state.stat().st_mode & 0o777 == 0o700


def test_fifo_as_lock_file_is_refused_without_hanging(world: World) -> None:
    """A FIFO where the lock file belongs is refused at once (exit 2), not waited on."""
    three_assets(world)
    world.state.mkdir(mode=0o700)
    os.mkfifo(world.state / "lock")
    run = world.sync(timeout=30)
    assert run.code == 2 and "not a regular file" in run.one("command_failed")["error"]


def test_lock_file_with_garbage_names_no_pid(world: World) -> None:
    """A lock held by someone whose lock file holds no pid says 'pid unknown', not the file's bytes."""
    three_assets(world)
    world.state.mkdir(mode=0o700)
    (world.state / "lock").write_text("\x1b[2J\x1b]0;forged title\x07 12345 not a pid\n")
    with open(world.state / "lock") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        run = world.sync()
    assert run.code == 1 and "pid unknown" in run.one("command_failed")["error"]


def test_cache_changed_on_disk_is_read_again_not_trusted(
    synced: tuple[World, dict[str, bytes], bytes],
) -> None:
    """A cached manifest whose bytes changed on disk (a dest edited, still valid JSON) is not trusted:
    the cache is dropped with a warning, the manifests are read again, nothing lands at the wrong path."""
    world, want, _ = synced
    ledger = world.state / "ledger.sqlite3"
    _sql(ledger, ["UPDATE manifests SET assets = replace(assets, 'd0/0.bin', 'd0/0.bjn')"])
    run = world.sync()
    assert run.code == 0, run.err
    assert "digest" in run.one("ledger_cache_dropped")["error"]
    finished = run.one("pass_finished")
    assert (finished["published"], finished["skipped"], finished["orphaned"]) == (0, 3, 0)
    assert_exact(world, want)
    assert not world.sync().named("ledger_cache_dropped")


def test_schema_1_ledger_is_upgraded_in_place(synced: tuple[World, dict[str, bytes], bytes]) -> None:
    """A schema-1 ledger (no row checksums) is upgraded in one transaction: nothing is downloaded or
    adopted again, every row then carries its checksum, and the next pass does not migrate again."""
    world, want, _ = synced
    ledger = world.state / "ledger.sqlite3"
    _sql(
        ledger,
        [
            "ALTER TABLE published DROP COLUMN provenance",
            "ALTER TABLE published DROP COLUMN damaged",
            "ALTER TABLE published DROP COLUMN identity",
            "ALTER TABLE published DROP COLUMN checksum",
            "ALTER TABLE failures DROP COLUMN kind",
            "DROP TABLE passes",
            "DROP TABLE notify_open",
            "DROP TABLE notify_sent",
            "DROP TABLE notify_outbox",
            "DROP TABLE directories",
            "PRAGMA user_version = 1",
        ],
    )
    dry = world.sync("--dry-run")  # a dry run plans on the old layout and upgrades nothing
    assert dry.code == 0 and planned(dry, "skip") == 3 and not dry.named("ledger_migrated"), dry.err
    run = world.sync()
    assert run.code == 0, run.err
    migrated = run.one("ledger_migrated")
    assert (migrated["from_schema"], migrated["to_schema"]) == (1, SCHEMA_VERSION)
    finished = run.one("pass_finished")
    assert (finished["skipped"], finished["published"], finished["adopted"]) == (3, 0, 0)
    db = sqlite3.connect(ledger)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert all(len(c) == 16 for (c,) in db.execute("SELECT checksum FROM published"))
    finally:
        db.close()
    assert not world.sync().named("ledger_migrated")
    assert_exact(world, want)


def test_published_row_changed_on_disk_sets_the_ledger_aside(
    synced: tuple[World, dict[str, bytes], bytes],
) -> None:
    """A published row whose size changed on disk (still a valid row) fails its checksum: the ledger is
    set aside and rebuilt by adoption instead of refusing that dest forever."""
    world, want, _ = synced
    _sql(world.state / "ledger.sqlite3", ["UPDATE published SET size = size + 64 WHERE dest = 'd0/0.bin'"])
    run = world.sync()
    assert run.code == 0, run.err
    assert "checksum" in run.one("ledger_set_aside")["error"]
    assert run.one("pass_finished")["adopted"] == 3 and not run.named("asset_refused")
    assert_exact(world, want)
