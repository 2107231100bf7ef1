"""The ledger: what syncd knows it has published, in SQLite in the state directory.

The only module that touches SQLite and the state directory's lock file. Tables:

- ``meta``: ``manifests_commit`` (the commit the manifest cache reflects), ``manifests_key`` (what else
  shaped it: ``[source] path`` and the manifest rules' version; a different key discards the cache),
  ``synced_commit`` (the last commit at which a pass ended with the export matching every manifest).
- ``manifests``: per manifest file at ``manifests_commit``: its blob id and either its assets or its
  problems, so that a pass with no new commit reads no git blob and parses no TOML.
- ``published``: per ``dest``: sha256, size, source, manifest, commit, when, and how (downloaded or
  adopted); ``orphaned_at`` once its manifest entry is gone.
- ``failures``: per ``dest``: attempts, last error, first and last failure time.

Every write is one transaction, in WAL mode with ``synchronous=NORMAL``: a crash of syncd loses nothing, and a
power cut can lose only the last rows. That is safe because every row follows the fact it records: a file
that is published but lost its row is found at its dest on the next pass, hashed, and adopted; a lost
failure row only resets a backoff.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from syncd.errors import LedgerError, LockHeldError
from syncd.manifest import Asset

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS manifests (
    path TEXT PRIMARY KEY, blob TEXT NOT NULL, assets TEXT, problems TEXT);
CREATE TABLE IF NOT EXISTS published (
    dest TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL, source TEXT NOT NULL,
    manifest TEXT NOT NULL, commit_id TEXT NOT NULL, published_at TEXT NOT NULL,
    how TEXT NOT NULL, orphaned_at TEXT);
CREATE TABLE IF NOT EXISTS failures (
    dest TEXT PRIMARY KEY, sha256 TEXT NOT NULL, attempts INTEGER NOT NULL, last_error TEXT NOT NULL,
    first_failed_at TEXT NOT NULL, last_failed_at TEXT NOT NULL);
"""


def now() -> str:
    """The current UTC time as ISO 8601, the ledger's time format."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class CachedManifest:
    """One manifest file as last parsed: its blob, and its assets or its problems."""

    blob: str
    assets: tuple[Asset, ...] = ()
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class Published:
    """A file syncd put (or adopted) at ``dest``."""

    dest: str
    sha256: str
    size: int
    source: str
    manifest: str
    commit: str
    published_at: str
    how: str
    orphaned_at: str | None


@dataclass(frozen=True)
class Failure:
    """Why ``dest`` is not published yet."""

    dest: str
    sha256: str
    attempts: int
    last_error: str
    first_failed_at: str
    last_failed_at: str


class StateLock:
    """An exclusive ``flock`` on ``<state>/lock``, held for the life of the process that took it."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "lock"
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`LockHeldError` naming the holder."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held until release())
        except OSError as exc:
            raise LedgerError(f"cannot open lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise LockHeldError(
                f"another syncd (pid {holder}) is running on state directory {self.path.parent}; "
                "wait for it to finish or stop it (systemctl stop syncd)"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class Ledger:
    """Read and write the ledger: one thread at a time (the coordinating thread of the running pass)."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._batch_every: float | None = None
        self._last_commit = 0.0
        try:
            if readonly:
                if not path.exists():
                    self._db = sqlite3.connect(":memory:")
                else:
                    self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            else:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._db = sqlite3.connect(path, check_same_thread=False)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            if not readonly or not path.exists():
                self._db.executescript(_SCHEMA)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open ledger {path}: {exc}") from None

    @classmethod
    def in_state_dir(cls, state_dir: Path, *, readonly: bool = False) -> Ledger:
        return cls(state_dir / "ledger.sqlite3", readonly=readonly)

    def close(self) -> None:
        self._db.close()

    def batch(self, every: float = 0.5) -> contextlib.AbstractContextManager[None]:
        """Within this block, writes are committed at most every ``every`` seconds and at its end: one
        transaction per few hundred small assets instead of one each. Safe because every row records a
        fact already on disk (see the module docstring)."""
        return self._batch(every)

    @contextlib.contextmanager
    def _batch(self, every: float) -> Iterator[None]:
        self._batch_every, self._last_commit = every, time.monotonic()
        try:
            yield
        finally:
            self._batch_every = None
            try:
                self._db.commit()
            except sqlite3.Error as exc:
                raise LedgerError(f"cannot write ledger {self.path}: {exc}") from None

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self._batch_every is not None and not self.readonly:
            try:
                yield self._db
                if time.monotonic() - self._last_commit >= self._batch_every:
                    self._db.commit()
                    self._last_commit = time.monotonic()
            except sqlite3.Error as exc:
                raise LedgerError(f"cannot write ledger {self.path}: {exc}") from None
            return
        if self.readonly:
            # A dry run plans against the ledger but never changes it: writes go to a scratch copy.
            scratch = sqlite3.connect(":memory:")
            scratch.executescript(_SCHEMA)
            yield scratch
            scratch.close()
            return
        try:
            with self._db:
                yield self._db
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot write ledger {self.path}: {exc}") from None

    def _read(self, sql: str, args: Iterable[object] = ()) -> list[tuple[object, ...]]:
        try:
            return list(self._db.execute(sql, tuple(args)))
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read ledger {self.path}: {exc}") from None

    # meta -------------------------------------------------------------------------------------
    def get(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set(self, key: str, value: str) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # manifest cache ---------------------------------------------------------------------------
    def manifests(self) -> dict[str, CachedManifest]:
        out = {}
        for path, blob, assets, problems in self._read("SELECT path, blob, assets, problems FROM manifests"):
            out[str(path)] = CachedManifest(
                blob=str(blob),
                assets=tuple(Asset(**a) for a in json.loads(str(assets or "[]"))),
                problems=tuple(json.loads(str(problems or "[]"))),
            )
        return out

    def update_manifests(
        self,
        commit: str,
        key: str,
        upserts: dict[str, CachedManifest],
        deletes: Iterable[str],
        *,
        replace_all: bool = False,
    ) -> None:
        """Record the manifest cache as of ``commit``, built under cache ``key``, in one transaction."""
        with self._write() as db:
            if replace_all:
                db.execute("DELETE FROM manifests")
            db.executemany("DELETE FROM manifests WHERE path = ?", [(p,) for p in deletes])
            db.executemany(
                "INSERT OR REPLACE INTO manifests(path, blob, assets, problems) VALUES (?,?,?,?)",
                [
                    (p, c.blob, json.dumps([a.__dict__ for a in c.assets]), json.dumps(c.problems))
                    for p, c in upserts.items()
                ],
            )
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('manifests_commit', ?)", (commit,))
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('manifests_key', ?)", (key,))

    # published --------------------------------------------------------------------------------
    def published(self) -> dict[str, Published]:
        rows = self._read(
            "SELECT dest, sha256, size, source, manifest, commit_id, published_at, how, orphaned_at "
            "FROM published"
        )
        return {str(r[0]): Published(*r) for r in rows}  # type: ignore[arg-type]

    def record_published(self, asset: Asset, commit: str, how: str) -> None:
        """``asset`` is now at its dest (fsynced): remember it and forget any failure."""
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO published(dest, sha256, size, source, manifest, commit_id, "
                "published_at, how, orphaned_at) VALUES (?,?,?,?,?,?,?,?,NULL)",
                (asset.dest, asset.sha256, asset.size, asset.source, asset.manifest, commit, now(), how),
            )
            db.execute("DELETE FROM failures WHERE dest = ?", (asset.dest,))

    def forget(self, dest: str) -> None:
        """The file at ``dest`` is gone: drop the row so the next plan downloads it again."""
        with self._write() as db:
            db.execute("DELETE FROM published WHERE dest = ?", (dest,))

    def mark_orphaned(self, dests: Iterable[str]) -> None:
        with self._write() as db:
            db.executemany(
                "UPDATE published SET orphaned_at = ? WHERE dest = ? AND orphaned_at IS NULL",
                [(now(), d) for d in dests],
            )

    def unmark_orphaned(self, dests: Iterable[str]) -> None:
        with self._write() as db:
            db.executemany("UPDATE published SET orphaned_at = NULL WHERE dest = ?", [(d,) for d in dests])

    # failures ---------------------------------------------------------------------------------
    def failures(self) -> dict[str, Failure]:
        rows = self._read(
            "SELECT dest, sha256, attempts, last_error, first_failed_at, last_failed_at FROM failures"
        )
        return {str(r[0]): Failure(*r) for r in rows}  # type: ignore[arg-type]

    def record_failure(self, dest: str, sha256: str, error: str) -> int:
        """Count one more failed attempt at ``dest``; return the attempt count."""
        t = now()
        with self._write() as db:
            db.execute(
                "INSERT INTO failures(dest, sha256, attempts, last_error, first_failed_at, "
                "last_failed_at) VALUES (?,?,1,?,?,?) ON CONFLICT(dest) DO UPDATE SET "
                "attempts = CASE WHEN failures.sha256 = excluded.sha256 "
                "THEN failures.attempts + 1 ELSE 1 END, "
                "sha256 = excluded.sha256, last_error = excluded.last_error, "
                "last_failed_at = excluded.last_failed_at",
                (dest, sha256, error, t, t),
            )
        rows = self._read("SELECT attempts FROM failures WHERE dest = ?", (dest,))
        return int(rows[0][0]) if rows else 1  # type: ignore[call-overload]

    def clear_failures(self, keep: Iterable[str]) -> None:
        """Drop failure rows for dests no longer wanted (not in ``keep``)."""
        keep_set = set(keep)
        stale = [d for d in self.failures() if d not in keep_set]
        with self._write() as db:
            db.executemany("DELETE FROM failures WHERE dest = ?", [(d,) for d in stale])
