"""Ledger migrations, on a real old ledger: tests/fixtures/ledger-schema2.sqlite3 was written by
`syncd sync` on main at 60da054 (see tests/fixtures/README.md)."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
import structlog

from syncd.errors import LedgerError, LedgerRefusedError
from syncd.ledger import SCHEMA_VERSION, How, Ledger, Problem

pytestmark = pytest.mark.unit
FIXTURE = Path(__file__).parent / "fixtures" / "ledger-schema2.sqlite3"


@pytest.fixture
def old(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    path = state / "ledger.sqlite3"
    shutil.copyfile(FIXTURE, path)
    return path


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
