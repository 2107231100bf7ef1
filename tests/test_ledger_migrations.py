r"""Ledger migrations, on real old ledgers written by an earlier `main`:

- tests/fixtures/ledger-schema2.sqlite3 was written by `syncd sync` on main at 60da054 (see
  tests/fixtures/README.md).
- tests/fixtures/ledger-schema3.sqlite3 (40 KiB) was written by `syncd sync` on main at 4c3d944 (schema 3,
  the last before the notify_* tables), run twice, so: two pass rows; `weights/a.bin` (1000 bytes of "a")
  and `weights/b.bin` (2000 bytes of "b") published; `weights/missing.bin` failing with an HTTP 404
  (kind failed, 2 attempts); `foreign/c.bin` refused because a foreign file was at its dest (kind
  refused); `assets/bad.toml` invalid (no sha256, size, dest); the manifest cache at commit 94bdbbbc. Made
  with::

      git -C /work/main worktree add /tmp/syncd-4c3d944 4c3d944
      W=/tmp/mkfix3/w; mkdir -p $W/{blobs/open,export/foreign,state,etc}; chmod 700 $W/state
      export GIT_AUTHOR_NAME="Syncd Fixture" GIT_AUTHOR_EMAIL=fixture@example.invalid \
             GIT_COMMITTER_NAME="Syncd Fixture" GIT_COMMITTER_EMAIL=fixture@example.invalid \
             GIT_AUTHOR_DATE=2026-12-01T12:00:00Z GIT_COMMITTER_DATE=2026-12-01T12:00:00Z \
             GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1
      # blobs/open/a.bin, b.bin, c.bin: 1000 x "a", 2000 x "b", 300 x "c";
      # export/foreign/c.bin: "not the reviewed file\n" (a foreign file at c.bin's dest)
      git init -q --bare -b main $W/manifests.git; git clone -q $W/manifests.git $W/work
      # $W/work/assets/: weights.toml (open/a.bin -> weights/a.bin, open/b.bin -> weights/b.bin),
      # missing.toml (open/missing.bin, sha256 "e" * 64, size 10 -> weights/missing.bin),
      # foreign.toml (open/c.bin -> foreign/c.bin), bad.toml ('[[asset]]\nsource = "x"\n');
      # then git add -A, commit -m "fixture manifests", push origin HEAD:main
      # $W/etc/syncd.conf: [source] url = "file://$W/manifests.git", branch = "main", path = "assets";
      # [artifactory] url = "http://127.0.0.1:$PORT" (no credential: the "open" setup);
      # [export] root = "$W/export"; [state] directory = "$W/state"
      python -m http.server --bind 127.0.0.1 --directory $W/blobs $PORT &
      cd /tmp; for i in 1 2; do PYTHONPATH=/tmp/syncd-4c3d944/src \
          /work/main/.venv/bin/python -m syncd sync -c $W/etc/syncd.conf; done   # exit 1 both times
      cp $W/state/ledger.sqlite3 tests/fixtures/ledger-schema3.sqlite3   # no -wal left: all in the file
      git -C /work/main worktree remove --force /tmp/syncd-4c3d944

The tests upgrade (or read) copies of them; never edit a fixture in place.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
import structlog

from syncd.desired import cache_key
from syncd.errors import LedgerError, LedgerRefusedError
from syncd.ledger import SCHEMA_VERSION, How, Ledger, Problem

pytestmark = pytest.mark.unit
FIXTURE = Path(__file__).parent / "fixtures" / "ledger-schema2.sqlite3"
FIXTURE3 = Path(__file__).parent / "fixtures" / "ledger-schema3.sqlite3"
COMMIT3 = "94bdbbbcdeb13b25e77b88809091182e683ab2e6"  # the manifests' commit in FIXTURE3
NOTIFY_TABLES = ("notify_open", "notify_sent", "notify_outbox")


def _copy(fixture: Path, tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    path = state / "ledger.sqlite3"
    shutil.copyfile(fixture, path)
    return path


@pytest.fixture
def old(tmp_path: Path) -> Path:
    return _copy(FIXTURE, tmp_path)


@pytest.fixture
def old3(tmp_path: Path) -> Path:
    return _copy(FIXTURE3, tmp_path)


def test_schema_2_ledger_from_main_upgrades_to_the_current_schema(old: Path) -> None:
    """Opening the old ledger for writing migrates it once, in place: published rows keep their checksums,
    a 'refused: ' prefix becomes failures.kind (and leaves the text), and the passes table exists."""
    with structlog.testing.capture_logs() as logs:
        ledger = Ledger(old)
    try:
        assert [(e["from_schema"], e["to_schema"]) for e in logs if e["event"] == "ledger_migrated"] == [
            (2, SCHEMA_VERSION)
        ]
        published = ledger.published()
        assert sorted(published) == ["weights/a.bin", "weights/b.bin"]
        assert {p.how for p in published.values()} == {How.DOWNLOADED}
        failures = ledger.failures()
        assert failures["foreign/c.bin"].kind is Problem.REFUSED
        assert failures["foreign/c.bin"].last_error.startswith("a different file is at dest")
        assert failures["weights/missing.bin"].kind is Problem.FAILED
        assert failures["weights/missing.bin"].last_error.startswith("HTTP 404")
        assert ledger.passes() == [] and ledger.totals() == {}
        assert list(ledger.invalid_manifests()) == ["assets/bad.toml"]
        pid = ledger.pass_started()
        ledger.pass_finished(pid, ok=True, commit="c" * 40, head="c" * 40, summary={}, totals={"x": 2})
        assert ledger.passes()[0].ok is True and ledger.totals() == {"x": 2}
    finally:
        ledger.close()
    with structlog.testing.capture_logs() as logs:
        Ledger(old).close()
    assert not [e for e in logs if e["event"] == "ledger_migrated"]
    db = sqlite3.connect(old)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_a_reader_reads_the_old_layout_without_changing_it(old: Path) -> None:
    """A read-only reader (status, a dry run) sees the schema-2 ledger as it is, kinds included, and
    leaves the file byte for byte as it was."""
    before = old.read_bytes()
    ledger = Ledger(old, readonly=True)
    try:
        assert ledger.version == 2
        assert ledger.failures()["foreign/c.bin"].kind is Problem.REFUSED
        assert ledger.passes() == []
    finally:
        ledger.close()
    assert old.read_bytes() == before
    assert sorted(p.name for p in old.parent.iterdir()) == ["ledger.sqlite3"]


def test_a_ledger_newer_than_the_code_is_refused(old: Path) -> None:
    """A ledger from a newer syncd is refused (exit 2), unchanged."""
    db = sqlite3.connect(old)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    before = old.read_bytes()
    with pytest.raises(LedgerRefusedError) as info:
        Ledger(old)
    assert info.value.exit_code == 2 and "newer syncd" in str(info.value)
    assert old.read_bytes() == before


def test_a_failed_migration_leaves_the_old_ledger_intact(old: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A migration that fails half-way (here: a full disk after the real 2 → 3 step ran) rolls back as one
    transaction: the ledger is still schema 2 with every row and its 'refused: ' text."""
    from syncd import ledger as ledger_module

    real = ledger_module._MIGRATIONS[2]

    def step_then_fail(db: sqlite3.Connection) -> None:
        real(db)
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setitem(ledger_module._MIGRATIONS, 2, step_then_fail)
    with pytest.raises(LedgerError):
        Ledger(old)
    db = sqlite3.connect(old)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert db.execute("SELECT count(*) FROM published").fetchone()[0] == 2
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "passes" not in tables
        assert "kind" not in {r[1] for r in db.execute("PRAGMA table_info(failures)")}
        assert (
            db.execute("SELECT count(*) FROM failures WHERE last_error LIKE 'refused: %'").fetchone()[0] == 1
        )
    finally:
        db.close()
    monkeypatch.setitem(ledger_module._MIGRATIONS, 2, real)
    Ledger(old).close()  # and the next start migrates it for real


def _tables(path: Path) -> dict[str, int]:
    """Every table of the ledger at ``path`` with its row count (read with the sqlite3 module)."""
    db = sqlite3.connect(path)
    try:
        names = [str(r[0]) for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {n: int(db.execute(f"SELECT count(*) FROM {n}").fetchone()[0]) for n in names}  # noqa: S608
    finally:
        db.close()


def test_schema_3_ledger_from_main_upgrades_to_the_current_schema(old3: Path) -> None:
    """Opening the schema-3 ledger for writing migrates it once, in place (one ledger_migrated from 3):
    every row stays (published with valid checksums, failures with their kinds, both passes, the totals,
    the manifest cache whose digest still matches); the three notify_* tables exist and are empty and
    take the notifiers' state; a second open does not migrate again."""
    rows_before = _tables(old3)
    assert rows_before == {"meta": 9, "manifests": 4, "published": 2, "failures": 2, "passes": 2}
    with structlog.testing.capture_logs() as logs:
        ledger = Ledger(old3)
    try:
        assert [(e["from_schema"], e["to_schema"]) for e in logs if e["event"] == "ledger_migrated"] == [
            (3, SCHEMA_VERSION)
        ]
        assert ledger.version == SCHEMA_VERSION
        published = ledger.published()
        assert sorted(published) == ["weights/a.bin", "weights/b.bin"]
        assert {p.how for p in published.values()} == {How.DOWNLOADED}
        assert (published["weights/a.bin"].size, published["weights/a.bin"].commit) == (1000, COMMIT3)
        failures = ledger.failures()
        assert sorted(failures) == ["foreign/c.bin", "weights/missing.bin"]
        assert failures["foreign/c.bin"].kind is Problem.REFUSED
        assert failures["foreign/c.bin"].last_error.startswith("a different file is at dest")
        assert failures["weights/missing.bin"].kind is Problem.FAILED
        assert failures["weights/missing.bin"].attempts == 2
        assert failures["weights/missing.bin"].last_error.startswith("HTTP 404")
        passes = ledger.passes(10)
        assert [(p.id, p.ok, p.commit) for p in passes] == [(2, False, COMMIT3), (1, False, COMMIT3)]
        assert passes[1].summary["published"] == 2 and passes[0].summary["skipped"] == 2
        assert ledger.totals() == {
            "downloads_ok": 2,
            "downloads_failed": 2,
            "downloaded_bytes": 3000,
            "git_fetch_ok": 2,
            "git_fetch_failed": 0,
        }
        assert list(ledger.invalid_manifests()) == ["assets/bad.toml"]
        commit, cached = ledger.manifest_cache(cache_key("assets"))
        assert commit == COMMIT3
        assert sorted(cached) == [
            "assets/bad.toml",
            "assets/foreign.toml",
            "assets/missing.toml",
            "assets/weights.toml",
        ]
        assert (ledger.notices_open(), ledger.notices_sent(), ledger.outbox()) == ({}, {}, {})
        # the new tables take the notifiers' state
        ledger.set_notices_open({"asset_failed:weights/missing.bin:http_404": ("t0", 3, "{}")})
        ledger.queue_notices({"mail": {"weights/a.bin@x": "{}"}})
        assert ledger.notices_open() == {"asset_failed:weights/missing.bin:http_404": ("t0", 3, "{}")}
        assert ledger.outbox() == {"mail": {"weights/a.bin@x": "{}"}}
        ledger.set_notices_open({})
        ledger.notices_delivered("mail", announced={}, at="", recovered=(), sent=["weights/a.bin@x"])
    finally:
        ledger.close()
    rows_after = _tables(old3)
    assert rows_after == {**rows_before, **dict.fromkeys(NOTIFY_TABLES, 0), "directories": 0}
    with structlog.testing.capture_logs() as logs:
        Ledger(old3).close()
    assert not [e for e in logs if e["event"] == "ledger_migrated"]
    db = sqlite3.connect(old3)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        db.close()


def test_a_reader_reads_the_schema_3_layout_without_changing_it(old3: Path) -> None:
    """A read-only reader (status, a dry run) of the schema-3 ledger reads it as it is (no notify_*
    tables: no open problems, nothing told, an empty outbox) and leaves the file byte for byte as it was,
    with nothing created beside it."""
    before = old3.read_bytes()
    ledger = Ledger(old3, readonly=True)
    try:
        assert ledger.version == 3
        assert sorted(ledger.published()) == ["weights/a.bin", "weights/b.bin"]
        assert ledger.failures()["foreign/c.bin"].kind is Problem.REFUSED
        assert [p.id for p in ledger.passes(10)] == [2, 1]
        assert ledger.notices_open() == {}
        assert ledger.notices_sent() == {}
        assert ledger.outbox() == {}
    finally:
        ledger.close()
    assert old3.read_bytes() == before
    assert sorted(p.name for p in old3.parent.iterdir()) == ["ledger.sqlite3"]


FIXTURE4 = Path(__file__).parent / "fixtures" / "ledger-schema4.sqlite3"


@pytest.fixture
def old4(tmp_path: Path) -> Path:
    return _copy(FIXTURE4, tmp_path)


def test_schema_4_ledger_from_main_upgrades_to_schema_5(old4: Path) -> None:
    """The schema-4 ledger written by main at 9cf94c5 gains identity, damaged and provenance columns in
    one migration: every row stays with a valid checksum; old rows have no identity (recorded by the next
    pass without a hash) and no provenance ("not recorded"); new rows take both."""
    rows_before = _tables(old4)
    assert rows_before["published"] == 2 and rows_before["failures"] == 2 and rows_before["passes"] == 2
    with structlog.testing.capture_logs() as logs:
        ledger = Ledger(old4)
    try:
        assert [(e["from_schema"], e["to_schema"]) for e in logs if e["event"] == "ledger_migrated"] == [
            (4, 6)
        ]
        published = ledger.published()
        assert sorted(published) == ["weights/a.bin", "weights/b.bin"]
        a = published["weights/a.bin"]
        assert (a.size, a.commit, a.how, a.identity, a.damaged, a.provenance) == (
            1000, COMMIT3, How.DOWNLOADED, "", None, {},
        )  # fmt: skip
        assert ledger.failures()["weights/missing.bin"].attempts == 2
        ledger.set_identities({"weights/a.bin": "1:2:3:444"})
        ledger.mark_damaged("weights/b.bin", "9:9:9:644", "re-hashed: bad")
        b = ledger.published()["weights/b.bin"]
        assert (b.identity, b.damaged) == ("9:9:9:644", "re-hashed: bad")
        assert ledger.published()["weights/a.bin"].identity == "1:2:3:444"
    finally:
        ledger.close()
    assert _tables(old4) == {**rows_before, "directories": 0}
    Ledger(old4).close()  # the checksums still hold after the in-place updates; no second migration
    db = sqlite3.connect(old4)
    try:
        assert (
            db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
        )  # (and 6 after it: the directories table)
        cols = [r[1] for r in db.execute("PRAGMA table_info(published)")]
        assert cols[-3:] == ["identity", "damaged", "provenance"]
    finally:
        db.close()


def test_a_reader_reads_the_schema_4_layout_without_changing_it(old4: Path) -> None:
    before = old4.read_bytes()
    ledger = Ledger(old4, readonly=True)
    try:
        assert ledger.version == 4
        rows = ledger.published()
        assert sorted(rows) == ["weights/a.bin", "weights/b.bin"] and rows["weights/a.bin"].identity == ""
    finally:
        ledger.close()
    assert old4.read_bytes() == before
    assert sorted(p.name for p in old4.parent.iterdir()) == ["ledger.sqlite3"]


FIXTURE5 = Path(__file__).parent / "fixtures" / "ledger-schema5.sqlite3"


@pytest.fixture
def old5(tmp_path: Path) -> Path:
    return _copy(FIXTURE5, tmp_path)


def test_schema_5_ledger_from_main_upgrades_to_schema_6(old5: Path) -> None:
    """The schema-5 ledger written by main at 6b38963 gains the directories table in one migration; its
    rows (with identities and provenance) stay as they were, and no directory is known (those created
    before stay when they empty)."""
    rows_before = _tables(old5)
    assert rows_before["published"] == 2 and rows_before["failures"] == 2 and rows_before["passes"] == 2
    with structlog.testing.capture_logs() as logs:
        ledger = Ledger(old5)
    try:
        assert [(e["from_schema"], e["to_schema"]) for e in logs if e["event"] == "ledger_migrated"] == [
            (5, 6)
        ]
        a = ledger.published()["weights/a.bin"]
        assert (a.size, a.commit, a.how) == (1000, COMMIT3, How.DOWNLOADED)
        assert a.identity and a.provenance.get("introduced_commit") == COMMIT3
        assert ledger.directories() == {}
        ledger.record_directories([("weights", "1:2"), ("weights/sub", "1:3")])
        ledger.forget_directories(["weights/sub"])
        assert ledger.directories() == {"weights": "1:2"}
    finally:
        ledger.close()
    assert {k: v for k, v in _tables(old5).items() if k != "directories"} == rows_before
    Ledger(old5).close()  # no second migration, the checksums hold
    db = sqlite3.connect(old5)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
    finally:
        db.close()


def test_a_reader_reads_the_schema_5_layout_without_changing_it(old5: Path) -> None:
    """syncd status (read-only) on a schema-5 ledger: read as it is, no directories, no file changed."""
    before = old5.read_bytes()
    ledger = Ledger(old5, readonly=True)
    try:
        assert ledger.version == 5
        assert sorted(ledger.published()) == ["weights/a.bin", "weights/b.bin"]
        assert ledger.directories() == {}
    finally:
        ledger.close()
    assert old5.read_bytes() == before


def test_a_directory_row_that_could_leave_the_root_is_garbage(tmp_path: Path) -> None:
    """A hand-edited directories row with '..' (pruning would rmdir outside the export) is refused."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    Ledger(state / "ledger.sqlite3").close()
    db = sqlite3.connect(state / "ledger.sqlite3")
    db.execute("INSERT INTO directories VALUES ('a/../../etc', '1:2', 'x')")
    db.commit()
    db.close()
    with pytest.raises(LedgerError, match="directories holds rows syncd never writes"):
        Ledger(state / "ledger.sqlite3")
