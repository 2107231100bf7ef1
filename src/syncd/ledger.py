"""The ledger: what syncd knows it has published, in SQLite in the state directory.

The only module that touches SQLite (the state directory itself and its lock: :mod:`syncd.statedir`). Tables:

- ``meta``: ``manifests_commit`` (the commit the manifest cache reflects), ``manifests_key`` (what else
  shaped it: ``[source] path`` and the manifest rules' version; a different key discards the cache),
  ``manifests_digest`` (a sha256 of key, commit and rows: a cache changed on disk is discarded too),
  ``synced_commit`` (the last commit at which a pass ended with the export matching every manifest).
- ``manifests``: per manifest file at ``manifests_commit``: its blob id and either its assets or its
  problems, so that a pass with no new commit reads no git blob and parses no TOML.
- ``published``: per ``dest``: sha256, size, source, manifest, commit, when, and how (downloaded or
  adopted); ``orphaned_at`` once its manifest entry is gone.
- ``failures``: per ``dest``: its kind (:class:`Problem`: ``failed``, a download that failed and backs off;
  ``refused``, a dest syncd will not write), attempts, last error, first and last failure time.
- ``passes``: per pass (the last :data:`KEEP_PASSES`): start and end (UTC), ``ok``, the commit served and
  the head fetched, and a JSON summary (counts, errors, a sample of pending dests) for ``syncd status``.
- ``meta`` also holds what ``syncd status`` and the metrics need between passes: ``last_success_at``,
  ``head_commit``, ``daemon_pid``, ``next_poll_at``, and the running totals ``total.*`` (downloads,
  bytes, git fetches), which survive restarts.

Schema changes are numbered migrations (:data:`_MIGRATIONS`), run forward in one transaction when a
writer opens an older ledger; a read-only reader (a dry run, ``syncd status``) reads the old layout as it
is.

Every write is one transaction, in WAL mode with ``synchronous=NORMAL``: a crash of syncd loses nothing, and a
power cut can lose only the last rows. That is safe because every row follows the fact it records: a file
that is published but lost its row is found at its dest on the next pass, hashed, and adopted; a lost
failure row only resets a backoff. For the same reason a ledger that is damaged or not a syncd ledger at
all is set aside (``ledger.sqlite3.corrupt-<UTC time>``) and rebuilt by adoption; one written by a newer
syncd is refused. The ledger and its WAL files are never followed through a symlink.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from syncd import logs
from syncd.errors import LedgerError, LedgerRefusedError
from syncd.manifest import Asset
from syncd.statedir import check_state_dir, refuse_link

log = logs.get()
SCHEMA_VERSION = (
    6  # 2: checksum; 3: failures.kind, passes; 4: notify_*; 5: identity, provenance; 6: directories
)
KEEP_PASSES = 100  # pass rows kept for `syncd status`


class How(StrEnum):
    """How a published file got to its dest."""

    DOWNLOADED = "downloaded"
    ADOPTED = "adopted"  # it was already there with the right sha256
    REPLACED = "replaced"  # downloaded over an older file at dest (``replace = true``)
    REPAIRED = "repaired"  # downloaded again by ``syncd verify --repair`` (the bad file quarantined)


class Problem(StrEnum):
    """The kind of a failure row."""

    FAILED = "failed"  # a download or publish failed; retried with backoff
    REFUSED = "refused"  # syncd will not write this dest (a conflict, a foreign file, a symlink …)


_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS manifests (
    path TEXT PRIMARY KEY, blob TEXT NOT NULL, assets TEXT, problems TEXT);
CREATE TABLE IF NOT EXISTS published (
    dest TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL, source TEXT NOT NULL,
    manifest TEXT NOT NULL, commit_id TEXT NOT NULL, published_at TEXT NOT NULL,
    how TEXT NOT NULL, orphaned_at TEXT, checksum TEXT NOT NULL DEFAULT '',
    identity TEXT NOT NULL DEFAULT '', damaged TEXT, provenance TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS failures (
    dest TEXT PRIMARY KEY, sha256 TEXT NOT NULL, attempts INTEGER NOT NULL, last_error TEXT NOT NULL,
    first_failed_at TEXT NOT NULL, last_failed_at TEXT NOT NULL, kind TEXT NOT NULL DEFAULT 'failed');
CREATE TABLE IF NOT EXISTS passes (
    id INTEGER PRIMARY KEY, started_at TEXT NOT NULL, finished_at TEXT, ok INTEGER,
    commit_id TEXT, head_commit TEXT, summary TEXT);
"""
    + """
CREATE TABLE IF NOT EXISTS notify_open (
    key TEXT PRIMARY KEY, first_seen TEXT NOT NULL, passes INTEGER NOT NULL, alert TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS notify_sent (
    channel TEXT NOT NULL, key TEXT NOT NULL, announced_at TEXT NOT NULL, alert TEXT NOT NULL,
    PRIMARY KEY (channel, key));
CREATE TABLE IF NOT EXISTS notify_outbox (
    channel TEXT NOT NULL, key TEXT NOT NULL, item TEXT NOT NULL, queued_at TEXT NOT NULL,
    PRIMARY KEY (channel, key));
"""
    + """
CREATE TABLE IF NOT EXISTS directories (
    path TEXT PRIMARY KEY, identity TEXT NOT NULL, created_at TEXT NOT NULL);
"""
)
_NOTIFY_SCHEMA = _SCHEMA[
    _SCHEMA.index("CREATE TABLE IF NOT EXISTS notify_open") : _SCHEMA.index(
        "CREATE TABLE IF NOT EXISTS directories"
    )
]
_COLUMNS = {
    "meta": ("key", "value"),
    "manifests": ("path", "blob", "assets", "problems"),
    "published": (
        "dest",
        "sha256",
        "size",
        "source",
        "manifest",
        "commit_id",
        "published_at",
        "how",
        "orphaned_at",
        "checksum",
        "identity",
        "damaged",
        "provenance",
    ),
    "failures": (
        "dest",
        "sha256",
        "attempts",
        "last_error",
        "first_failed_at",
        "last_failed_at",
        "kind",
    ),
    "passes": ("id", "started_at", "finished_at", "ok", "commit_id", "head_commit", "summary"),
    "notify_open": ("key", "first_seen", "passes", "alert"),
    "notify_sent": ("channel", "key", "announced_at", "alert"),
    "notify_outbox": ("channel", "key", "item", "queued_at"),
    "directories": ("path", "identity", "created_at"),
}
# The fields of a published row that its checksum covers (orphaned_at is not: it is updated in place,
# and a damaged one only changes when an orphan was first reported).
_ROW_FIELDS = "dest, sha256, size, source, manifest, commit_id, published_at, how"
# Rows a pass would misread: a wrong type or a value syncd never writes (a flipped byte, a hand edit).
_BAD_ROWS = {
    "published": "typeof(dest) != 'text' OR typeof(size) != 'integer' OR size < 0 "
    "OR length(sha256) != 64 OR sha256 GLOB '*[^0-9a-f]*' "
    "OR how NOT IN ('downloaded', 'adopted', 'replaced', 'repaired') OR typeof(identity) != 'text'",
    "failures": "typeof(dest) != 'text' OR typeof(attempts) != 'integer' OR attempts < 1 "
    "OR kind NOT IN ('failed', 'refused')",
    "manifests": "typeof(path) != 'text' OR typeof(blob) != 'text'",
    "directories": "typeof(path) != 'text' OR path = '' OR path GLOB '/*' OR path GLOB '*/' "
    "OR ('/' || path || '/') GLOB '*/../*' OR ('/' || path || '/') GLOB '*/./*' OR path GLOB '*//*'",
    "meta": "key IN ('manifests_commit', 'synced_commit') "
    "AND (length(value) NOT IN (40, 64) OR value GLOB '*[^0-9a-f]*')",
}
_SQLITE_WHY = {
    "SQLITE_NOTADB": "not an SQLite database",
    "SQLITE_CORRUPT": "the file is damaged",
    "SQLITE_FULL": "the disk is full",
    "SQLITE_READONLY": "the file or its directory is read-only",
    "SQLITE_CANTOPEN": "the file cannot be opened",
    "SQLITE_BUSY": "locked by another process",
    "SQLITE_PERM": "permission denied",
    "SQLITE_IOERR": "an I/O error",
    "UnicodeDecodeError": "the file is damaged (text that is not UTF-8)",
}


# What a damaged database can raise: SQLite's errors, and a UnicodeDecodeError when SQLite's own message
# quotes damaged bytes (a corrupt schema entry) that Python then cannot decode.
_DB_ERRORS = (sqlite3.Error, UnicodeError)


def _why(exc: Exception) -> str:
    """Our own words for an SQLite error (its code name and what it means), not the library's text."""
    name = str(getattr(exc, "sqlite_errorname", "") or type(exc).__name__)
    meaning = _SQLITE_WHY.get(name) or _SQLITE_WHY.get("_".join(name.split("_")[:2]))
    return f"{name}: {meaning}" if meaning else name


def _damage(exc: Exception, what: str) -> LedgerError:
    """``what`` failed with ``exc``: garbage (to set aside) if the file itself is bad; otherwise (I/O,
    permissions, a full disk, a lock) a plain :class:`LedgerError`: a good ledger is never set aside for a
    fault around it."""
    name = str(getattr(exc, "sqlite_errorname", "") or type(exc).__name__)
    bad_file = name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT", "SQLITE_FORMAT", "SQLITE_SCHEMA"))
    cls = _Garbage if bad_file or isinstance(exc, UnicodeError) else LedgerError
    return cls(f"{what}: {_why(exc)}")


class _Garbage(LedgerError):
    """The file is not a usable syncd ledger (damaged, not a database, foreign tables or rows); it can
    be set aside and rebuilt, since every file at its dest is adopted again by hash."""


def _check_header(path: Path) -> None:
    """A non-empty file that does not start like an SQLite database is garbage: SQLite itself would
    take a file shorter than its header for an empty database and write over it."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise LedgerError(f"cannot read ledger {path}: {exc.strerror}") from None
    if head and head != b"SQLite format 3\x00":
        raise _Garbage(f"ledger {path} is not an SQLite database")


def _companions(path: Path) -> tuple[Path, ...]:
    """The files SQLite keeps beside a database in WAL mode (and the rollback journal)."""
    return tuple(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))


def _uri(path: Path, **params: str) -> str:
    """An SQLite ``file:`` URI for ``path``: ``#``, ``?`` and ``%`` in the name are escaped."""
    quoted = urllib.parse.quote(str(path.absolute()), safe="/")
    return f"file:{quoted}?{urllib.parse.urlencode(params)}"


def _open_readonly(path: Path) -> sqlite3.Connection:
    """A connection that reads ``path`` and creates or changes nothing beside it.

    ``mode=ro`` alone is not enough: opening a WAL database read-only creates its ``-wal`` and ``-shm``
    files when they are missing. So: while a writer has them (a daemon running, or one killed with
    unmerged pages), read through them with ``mode=ro`` (nothing new is created); when there are none,
    the main file holds everything: read its bytes into memory (a stable snapshot: same inode, size and
    mtime before and after, and still no ``-wal``), and mark the copy non-WAL so SQLite can load it."""
    wal = _companions(path)[0]
    for _ in range(5):
        if wal.exists():  # (its -shm exists too, unless someone deleted it: then SQLite recreates it)
            return sqlite3.connect(_uri(path, mode="ro"), uri=True, check_same_thread=False)
        data, stable = _snapshot(path, wal)
        if stable and not data:
            raise _Garbage(f"ledger {path} is empty (0 bytes)")
        if stable:
            db = sqlite3.connect(":memory:", check_same_thread=False)
            _not_wal(data)
            db.deserialize(data)  # SQLite copies it: the image is dropped when this returns
            return db
        time.sleep(0.05)
    raise LedgerError(f"ledger {path} kept changing while it was read; try again")


def _snapshot(path: Path, wal: Path) -> tuple[bytearray, bool]:
    try:
        with open(path, "rb") as fh:
            before = os.fstat(fh.fileno())
            data = bytearray(before.st_size)  # read into place: one copy of a ledger of 100,000 rows
            del data[fh.readinto(data) :]  # in place (a short read leaves the size check to fail)
        after = os.stat(path)
    except OSError as exc:
        raise LedgerError(f"cannot read ledger {path}: {exc.strerror}") from None
    same = (before.st_ino, before.st_size, before.st_mtime_ns) == (
        after.st_ino,
        after.st_size,
        after.st_mtime_ns,
    )
    return data, same and len(data) == before.st_size and not wal.exists()


def _not_wal(data: bytearray) -> None:
    """Set the database image's header WAL flags (bytes 18 and 19) to rollback mode, in place; an
    in-memory database cannot be in WAL mode, and SQLite refuses to load such an image otherwise."""
    if len(data) >= 100 and data[:16] == b"SQLite format 3\x00" and data[18:20] == b"\x02\x02":
        data[18:20] = b"\x01\x01"


def _digest(key: str, commit: str | None, rows: Iterable[tuple[object, ...]]) -> str:
    """A sha256 over the manifest cache: its key, its commit and every row, in path order."""
    h = hashlib.sha256(f"{key}\n{commit}\n".encode())
    for row in rows:
        h.update("\0".join("" if v is None else str(v) for v in row).encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return h.hexdigest()


def _decode_cache(rows: Iterable[tuple[object, ...]]) -> dict[str, CachedManifest] | None:
    """Manifest cache rows (path, blob, assets, problems) decoded; None when one does not decode."""
    out = {}
    for path, blob, assets, problems in rows:
        try:
            out[str(path)] = CachedManifest(
                blob=str(blob),
                assets=tuple(Asset(**a) for a in json.loads(str(assets or "[]"))),
                problems=tuple(str(p) for p in json.loads(str(problems or "[]"))),
            )
        except (ValueError, TypeError, KeyError):  # bad JSON, or not the fields of an Asset
            return None
    return out


def _row_checksum(row: Iterable[object]) -> str:
    """A short sha256 over one published row's fields (:data:`_ROW_FIELDS`): SQLite has no checksums,
    and a flipped byte in a size or sha256 would otherwise read as a valid row and refuse that dest."""
    text = "\0".join(str(v) for v in row)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _add_row_checksums(db: sqlite3.Connection) -> None:
    """Schema 1 → 2: ``published.checksum``, filled in for every existing row."""
    db.execute("ALTER TABLE published ADD COLUMN checksum TEXT NOT NULL DEFAULT ''")
    rows = db.execute(f"SELECT {_ROW_FIELDS} FROM published").fetchall()  # noqa: S608 (constants)
    db.executemany(
        "UPDATE published SET checksum = ? WHERE dest = ?", [(_row_checksum(r), r[0]) for r in rows]
    )


_REFUSED_PREFIX = "refused: "  # how schema 2 marked a refusal inside failures.last_error


def _add_failure_kind_and_passes(db: sqlite3.Connection) -> None:
    """Schema 2 → 3: ``failures.kind`` (from schema 2's ``refused: `` prefix, which is dropped from the
    text) and the ``passes`` table."""
    db.execute("ALTER TABLE failures ADD COLUMN kind TEXT NOT NULL DEFAULT 'failed'")
    db.execute(
        "UPDATE failures SET kind = 'refused', last_error = substr(last_error, ?) WHERE last_error LIKE ?",
        (len(_REFUSED_PREFIX) + 1, _REFUSED_PREFIX + "%"),
    )
    db.execute(
        "CREATE TABLE passes (id INTEGER PRIMARY KEY, started_at TEXT NOT NULL, finished_at TEXT, "
        "ok INTEGER, commit_id TEXT, head_commit TEXT, summary TEXT)"
    )


def _add_notify_state(db: sqlite3.Connection) -> None:
    """Schema 3 → 4: the notifiers' state (open problems, what each channel was told, its outbox)."""
    for statement in _NOTIFY_SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement.replace("IF NOT EXISTS ", ""))


def _add_identity_and_provenance(db: sqlite3.Connection) -> None:
    """Schema 4 → 5: per published file, its identity on disk (inode, mtime, ctime, mode: a pass re-hashes
    a file whose identity changed), whether a re-hash found it damaged, and its provenance (JSON). Rows
    from before have neither: the next pass records what it sees without re-hashing (run ``syncd verify``
    once to check the files themselves), and their provenance stays unknown."""
    db.execute("ALTER TABLE published ADD COLUMN identity TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE published ADD COLUMN damaged TEXT")
    db.execute("ALTER TABLE published ADD COLUMN provenance TEXT NOT NULL DEFAULT '{}'")


def _add_directories(db: sqlite3.Connection) -> None:
    """Schema 5 → 6: the directories syncd created in the export (pruning removes them once empty). A
    directory created before is not known: it stays when it empties."""
    db.execute(
        "CREATE TABLE directories (path TEXT PRIMARY KEY, identity TEXT NOT NULL, created_at TEXT NOT NULL)"
    )


# Each step takes a ledger from schema N to N + 1, in the same transaction as the user_version bump.
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _add_row_checksums,
    2: _add_failure_kind_and_passes,
    3: _add_notify_state,
    4: _add_identity_and_provenance,
    5: _add_directories,
}


def _columns(version: int) -> dict[str, tuple[str, ...]]:
    """The tables and columns of a ledger at schema ``version`` (0: one that never set it)."""
    if version == 5:
        return {k: v for k, v in _COLUMNS.items() if k != "directories"}
    if version == 4:
        return {**_columns(5), "published": _COLUMNS["published"][:-3]}
    if version in (1, 2, 3):
        old = {k: v for k, v in _COLUMNS.items() if not k.startswith("notify_") and k != "directories"}
        old["published"] = _COLUMNS["published"][:-3]
        if version == 3:
            return old
        del old["passes"]
        old["failures"] = _COLUMNS["failures"][:-1]
        if version == 1:
            old["published"] = _COLUMNS["published"][:-4]
        return old
    return _COLUMNS


def _set_aside(path: Path) -> Path:
    """Move a garbage ledger (and its WAL files, which belong to it alone) out of the way."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for n in range(100):
        aside = path.with_name(f"{path.name}.corrupt-{stamp}" + (f".{n}" if n else ""))
        if not os.path.lexists(aside):
            break
    try:
        for src in (path, *_companions(path)):
            if os.path.lexists(src):
                os.rename(src, aside.with_name(aside.name + src.name[len(path.name) :]))
    except OSError as exc:
        raise LedgerError(f"cannot set aside damaged ledger {path}: {exc.strerror}") from None
    return aside


def _provenance(text: object) -> dict[str, object]:
    """A published row's provenance JSON; ``{}`` when it is missing or does not decode (a damaged
    value hides nothing: the audit log keeps its own copy)."""
    try:
        value = json.loads(str(text))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _add_totals(db: sqlite3.Connection, totals: Mapping[str, int]) -> None:
    for name, n in totals.items():
        db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
            "value = CAST(CAST(value AS INTEGER) + CAST(excluded.value AS INTEGER) AS TEXT)",
            (f"total.{name}", str(n)),
        )


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
    how: How
    orphaned_at: str | None
    identity: str = ""  # staging.identity when last seen good ("": not recorded yet, schema 4)
    damaged: str | None = None  # why a re-hash found the file at that identity bad (None: not found bad)
    provenance_json: str = "{}"  # see syncd.provenance; decoded only when asked (a pass never is)

    @property
    def provenance(self) -> dict[str, object]:
        return _provenance(self.provenance_json)


@dataclass(frozen=True)
class Failure:
    """Why ``dest`` is not published yet."""

    dest: str
    sha256: str
    attempts: int
    last_error: str
    first_failed_at: str
    last_failed_at: str
    kind: Problem = Problem.FAILED


@dataclass(frozen=True)
class PassRecord:
    """One pass as recorded for ``syncd status``: ``finished_at`` and ``ok`` are None while it runs (or
    if it never ended: a crash)."""

    id: int
    started_at: str
    finished_at: str | None
    ok: bool | None
    commit: str | None
    head: str | None
    summary: Mapping[str, object]


class Ledger:
    """Read and write the ledger: one thread at a time (the coordinating thread of the running pass)."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        """Open (or create) the ledger at ``path`` and check that syncd can use it.

        Raises :class:`LedgerRefusedError` (exit 2) for a ledger written by a newer syncd or a symlinked
        file, ``_Garbage`` (a :class:`LedgerError`) for a damaged or foreign file, and
        :class:`LedgerError` when it cannot be opened at all. ``readonly`` (a dry run) writes nothing
        anywhere: see :func:`_open_readonly`."""
        self.path = path
        self.readonly = readonly
        self._batch_every: float | None = None
        self._last_commit = 0.0
        self.version = SCHEMA_VERSION  # the schema as read: older only for a read-only reader
        for p in (path, *_companions(path)):
            refuse_link(p)
        _check_header(path)
        try:
            self._db = self._connect()
        except _DB_ERRORS as exc:
            raise _damage(exc, f"cannot open ledger {path}") from None
        try:
            self._check()
        except BaseException:
            self._db.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        if not self.readonly:
            check_state_dir(self.path.parent, create=True)
            db = sqlite3.connect(self.path, check_same_thread=False)
            db.execute("PRAGMA busy_timeout=5000")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            return db
        if not self.path.exists():
            db = sqlite3.connect(":memory:", check_same_thread=False)
            db.executescript(_SCHEMA)
            return db
        return _open_readonly(self.path)

    def _check(self) -> None:
        """Refuse a newer schema; call a damaged or foreign file garbage; create a new ledger's tables."""
        try:
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise LedgerRefusedError(
                    f"ledger {self.path} was written by a newer syncd (schema {version}; this syncd "
                    f"knows {SCHEMA_VERSION}): upgrade syncd, or move the ledger aside to rebuild it"
                )
            if self._db.execute("PRAGMA quick_check(1)").fetchone()[0] != "ok":
                raise _Garbage(f"ledger {self.path} is damaged (SQLite quick_check failed)")
            tables = {
                str(r[0]) for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            if not tables and not self.readonly:
                self._db.executescript(_SCHEMA)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                return
            self._check_tables(tables, version)
            if 0 < version < SCHEMA_VERSION and not self.readonly:  # a reader reads the old layout
                self._migrate(version)
                version = SCHEMA_VERSION
                tables = {
                    str(r[0]) for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                }
                self._check_tables(tables, version)
            self.version = version or SCHEMA_VERSION
            if version >= 2:
                self._check_checksums()
        except _DB_ERRORS as exc:
            raise _damage(exc, f"ledger {self.path} is unreadable") from None

    def _check_tables(self, tables: set[str], version: int) -> None:
        columns = _columns(version)
        if tables != set(columns):
            odd = ", ".join(sorted(tables ^ set(columns)))
            raise _Garbage(f"ledger {self.path} has unexpected or missing tables ({odd})")
        for table, want in columns.items():
            have = tuple(str(r[1]) for r in self._db.execute(f"PRAGMA table_info({table})"))
            if have != want:
                raise _Garbage(f"ledger {self.path}: table {table} does not have the columns syncd writes")
            bad = _BAD_ROWS.get(table) if columns is _COLUMNS else None
            query = f"SELECT 1 FROM {table} WHERE {bad} LIMIT 1"  # noqa: S608 (our own constants)
            if bad and self._db.execute(query).fetchone():
                raise _Garbage(f"ledger {self.path}: table {table} holds rows syncd never writes")

    def _check_checksums(self) -> None:
        query = f"SELECT {_ROW_FIELDS}, checksum FROM published"  # noqa: S608 (our own constants)
        for row in self._db.execute(query):
            if _row_checksum(row[:-1]) != row[-1]:
                raise _Garbage(f"ledger {self.path}: a published row does not match its checksum")

    def _migrate(self, version: int) -> None:
        """Upgrade the ledger from schema ``version`` to :data:`SCHEMA_VERSION` in one transaction."""
        # An explicit BEGIN: Python's sqlite3 opens a transaction only before DML, so a step's ALTER TABLE
        # or CREATE TABLE would otherwise commit on its own and survive a later step's failure.
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for step in range(version, SCHEMA_VERSION):
                _MIGRATIONS[step](db)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.commit()
        except BaseException:
            db.rollback()
            raise
        log.info("ledger_migrated", ledger=str(self.path), from_schema=version, to_schema=SCHEMA_VERSION)

    @classmethod
    def in_state_dir(cls, state_dir: Path, *, readonly: bool = False) -> Ledger:
        """The ledger of ``state_dir``. A garbage one (damaged, not a database, foreign tables or rows)
        is set aside as ``ledger.sqlite3.corrupt-<UTC time>`` and a new one is started: the next pass
        adopts every file already at its dest by hash. A dry run never sets aside; it raises instead."""
        path = state_dir / "ledger.sqlite3"
        try:
            return cls(path, readonly=readonly)
        except _Garbage as exc:
            if readonly:
                raise LedgerError(
                    f"{exc}; the next syncd sync sets it aside and rebuilds it from the export"
                ) from None
            aside = _set_aside(path)
            log.warning(
                "ledger_set_aside",
                ledger=str(path),
                moved_to=str(aside),
                error=str(exc),
                action="started a new ledger; files already at their dests are adopted by hash",
            )
            return cls(path)

    def close(self) -> None:
        with contextlib.suppress(*_DB_ERRORS):  # closing a damaged ledger still closes it
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
            except _DB_ERRORS as exc:
                raise LedgerError(f"cannot write ledger {self.path}: {_why(exc)}") from None

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self._batch_every is not None and not self.readonly:
            try:
                yield self._db
                if time.monotonic() - self._last_commit >= self._batch_every:
                    self._db.commit()
                    self._last_commit = time.monotonic()
            except _DB_ERRORS as exc:
                raise LedgerError(f"cannot write ledger {self.path}: {_why(exc)}") from None
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
        except _DB_ERRORS as exc:
            raise LedgerError(f"cannot write ledger {self.path}: {_why(exc)}") from None

    def _read(self, sql: str, args: Iterable[object] = ()) -> list[tuple[object, ...]]:
        try:
            return list(self._db.execute(sql, tuple(args)))
        except _DB_ERRORS as exc:
            raise LedgerError(f"cannot read ledger {self.path}: {_why(exc)}") from None

    # meta -------------------------------------------------------------------------------------
    def get(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set(self, key: str, value: str) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # manifest cache ---------------------------------------------------------------------------
    def manifest_cache(self, key: str) -> tuple[str | None, dict[str, CachedManifest]]:
        """The manifest cache and the commit it reflects, if it was built under ``key``, its digest
        matches (no byte of it changed since it was written) and every row decodes; otherwise
        ``(None, {})``, and the caller reads every manifest again (it is only a cache)."""
        if self.get("manifests_key") != key:
            return None, {}
        commit = self.get("manifests_commit")
        rows = self._read("SELECT path, blob, assets, problems FROM manifests ORDER BY path")
        if self.get("manifests_digest") != _digest(key, commit, rows):
            return self._drop_cache("the manifest cache does not match its digest")
        decoded = _decode_cache(rows)
        if decoded is None:
            return self._drop_cache("a cached manifest row does not decode")
        return commit, decoded

    def cached_manifests(self, paths: Iterable[str]) -> dict[str, CachedManifest] | None:
        """Just these files of the manifest cache (absent ones left out), decoded; None when a row does
        not decode. The caller checked :meth:`cache_intact` in the same pass."""
        wanted = sorted(set(paths))
        rows: list[tuple[object, ...]] = []
        for i in range(0, len(wanted), 500):
            part = wanted[i : i + 500]
            rows += self._read(
                "SELECT path, blob, assets, problems FROM manifests WHERE path IN "  # noqa: S608
                f"({','.join('?' * len(part))})",
                part,
            )
        return _decode_cache(rows)

    def cache_intact(self, key: str) -> bool:
        """Whether the manifest cache was built under ``key`` and still matches its digest (checked
        without decoding a row: what a pass with nothing new needs to know)."""
        if self.get("manifests_key") != key:
            return False
        rows = self._read("SELECT path, blob, assets, problems FROM manifests ORDER BY path")
        return self.get("manifests_digest") == _digest(key, self.get("manifests_commit"), rows)

    def _drop_cache(self, why: str) -> tuple[None, dict[str, CachedManifest]]:
        log.warning(
            "ledger_cache_dropped", ledger=str(self.path), error=f"{why}; every manifest is read again"
        )
        return None, {}

    def update_manifests(
        self,
        commit: str,
        key: str,
        upserts: dict[str, CachedManifest],
        deletes: Iterable[str],
        *,
        replace_all: bool = False,
    ) -> None:
        """Record the manifest cache as of ``commit``, built under cache ``key``, in one transaction,
        with a digest of the whole cache (a flipped byte in a cached dest must not publish a file at
        the wrong path: the next pass reads the manifests again instead)."""
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
            rows = list(db.execute("SELECT path, blob, assets, problems FROM manifests ORDER BY path"))
            meta = {"manifests_commit": commit, "manifests_key": key}
            meta["manifests_digest"] = _digest(key, commit, rows)
            db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", list(meta.items()))

    # published --------------------------------------------------------------------------------
    def published(self, dests: Iterable[str] | None = None) -> dict[str, Published]:
        """Every published row (or only those of ``dests``), by dest."""
        fields = "dest, sha256, size, source, manifest, commit_id, published_at, how, orphaned_at"
        if self.version < 5:  # read as it is (a reader of an older ledger)
            select = f"SELECT {fields}, '', NULL, '{{}}' FROM published"  # noqa: S608 (constants)
        else:
            select = f"SELECT {fields}, identity, damaged, provenance FROM published"  # noqa: S608
        if dests is None:
            rows = self._read(select)
        else:
            wanted, rows = sorted(set(dests)), []
            for i in range(0, len(wanted), 500):
                part = wanted[i : i + 500]
                rows += self._read(f"{select} WHERE dest IN ({','.join('?' * len(part))})", part)
        return {
            str(r[0]): Published(*r[:7], How(str(r[7])), r[8], str(r[9]), r[10], str(r[11]))  # type: ignore[arg-type, call-arg]
            for r in rows
        }

    def counts(self) -> tuple[int, int, int]:
        """How many published files are wanted, how many are orphaned, and the wanted files' bytes
        (counted in SQL: a pass's summary needs no row of its own)."""
        rows = self._read(
            "SELECT COALESCE(SUM(orphaned_at IS NULL), 0), COALESCE(SUM(orphaned_at IS NOT NULL), 0), "
            "COALESCE(SUM(CASE WHEN orphaned_at IS NULL THEN size ELSE 0 END), 0) FROM published"
        )
        wanted, orphaned, size = rows[0]
        return int(wanted), int(orphaned), int(size)  # type: ignore[call-overload]

    def orphaned_dests(self) -> list[str]:
        """Dests of published files no manifest lists any more (kept in place, marked orphaned)."""
        return [str(r[0]) for r in self._read("SELECT dest FROM published WHERE orphaned_at IS NOT NULL")]

    def wanted_files(self) -> list[tuple[str, int, str, bool]]:
        """``(dest, size, identity, damaged)`` of every published file still wanted, by dest: what a
        pass with nothing new compares the export with (a few columns, no row decoded into objects)."""
        if self.version < 5:
            old = self._read("SELECT dest, size FROM published WHERE orphaned_at IS NULL ORDER BY dest")
            return [(str(r[0]), int(r[1]), "", False) for r in old]  # type: ignore[call-overload]
        rows = self._read(
            "SELECT dest, size, identity, damaged IS NOT NULL FROM published WHERE orphaned_at IS NULL "
            "ORDER BY dest"
        )
        return [(str(r[0]), int(r[1]), str(r[2]), bool(r[3])) for r in rows]  # type: ignore[call-overload]

    def record_published(
        self,
        asset: Asset,
        commit: str,
        how: How,
        *,
        identity: str = "",
        provenance: Mapping[str, object] | None = None,
    ) -> None:
        """``asset`` is now at its dest (fsynced), with ``identity`` (:func:`syncd.staging.identity`) and
        ``provenance``: remember it and forget any failure."""
        with self._write() as db:
            row = (
                asset.dest,
                asset.sha256,
                asset.size,
                asset.source,
                asset.manifest,
                commit,
                now(),
                str(how),
            )
            db.execute(
                f"INSERT OR REPLACE INTO published({_ROW_FIELDS}, orphaned_at, checksum, identity, "  # noqa: S608
                "damaged, provenance) VALUES (?,?,?,?,?,?,?,?,NULL,?,?,NULL,?)",
                (*row, _row_checksum(row), identity, json.dumps(dict(provenance or {}), sort_keys=True)),
            )
            db.execute("DELETE FROM failures WHERE dest = ?", (asset.dest,))

    def set_identities(self, identities: Mapping[str, str]) -> None:
        """The published files at these dests were seen (or re-hashed) good with these identities."""
        with self._write() as db:
            db.executemany(
                "UPDATE published SET identity = ?, damaged = NULL WHERE dest = ?",
                [(i, d) for d, i in identities.items()],
            )

    def mark_damaged(self, dest: str, identity: str, why: str) -> None:
        """A re-hash found the file at ``dest`` (``identity``) not to be what syncd published: it is
        refused, without another re-hash, until its identity changes."""
        with self._write() as db:
            db.execute("UPDATE published SET identity = ?, damaged = ? WHERE dest = ?", (identity, why, dest))

    def forget(self, dest: str) -> None:
        """The file at ``dest`` is gone: drop the row so the next plan downloads it again."""
        with self._write() as db:
            db.execute("DELETE FROM published WHERE dest = ?", (dest,))

    def directories(self) -> dict[str, str]:
        """The directories (relative to the export root) that syncd created and has not removed, with
        the identity (``dev:ino``) each had then."""
        if self.version < 6:
            return {}
        return {str(r[0]): str(r[1]) for r in self._read("SELECT path, identity FROM directories")}

    def record_directories(self, made: Iterable[tuple[str, str]]) -> None:
        """syncd created these directories (path, ``dev:ino``) in the export to publish into them."""
        with self._write() as db:
            db.executemany(
                "INSERT OR REPLACE INTO directories(path, identity, created_at) VALUES (?, ?, ?)",
                [(p, i, now()) for p, i in made],
            )

    def forget_directories(self, paths: Iterable[str]) -> None:
        """These directories are gone (pruned once empty, or removed by someone else)."""
        with self._write() as db:
            db.executemany("DELETE FROM directories WHERE path = ?", [(p,) for p in paths])

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
        fields = "dest, sha256, attempts, last_error, first_failed_at, last_failed_at"
        if self.version >= 3:
            rows = self._read(f"SELECT {fields}, kind FROM failures")  # noqa: S608 (constants)
            return {str(r[0]): Failure(*r[:6], Problem(str(r[6]))) for r in rows}  # type: ignore[arg-type, call-arg]
        out = {}  # schema 2, read as it is: a refusal was a prefix of the text
        for r in self._read(f"SELECT {fields} FROM failures"):  # noqa: S608 (constants)
            text = str(r[3])
            kind = Problem.REFUSED if text.startswith(_REFUSED_PREFIX) else Problem.FAILED
            text = text.removeprefix(_REFUSED_PREFIX)
            out[str(r[0])] = Failure(r[0], r[1], r[2], text, r[4], r[5], kind)  # type: ignore[arg-type]
        return out

    def record_failure(self, dest: str, sha256: str, error: str, kind: Problem = Problem.FAILED) -> int:
        """Count one more failed attempt (or refusal) at ``dest``; return the attempt count. A change of
        sha256 or of kind starts the count again."""
        t = now()
        with self._write() as db:
            db.execute(
                "INSERT INTO failures(dest, sha256, attempts, last_error, first_failed_at, "
                "last_failed_at, kind) VALUES (?,?,1,?,?,?,?) ON CONFLICT(dest) DO UPDATE SET "
                "attempts = CASE WHEN failures.sha256 = excluded.sha256 AND failures.kind = excluded.kind "
                "THEN failures.attempts + 1 ELSE 1 END, "
                "first_failed_at = CASE WHEN failures.sha256 = excluded.sha256 "
                "AND failures.kind = excluded.kind THEN failures.first_failed_at "
                "ELSE excluded.first_failed_at END, "
                "sha256 = excluded.sha256, last_error = excluded.last_error, "
                "last_failed_at = excluded.last_failed_at, kind = excluded.kind",
                (dest, sha256, error, t, t, str(kind)),
            )
        rows = self._read("SELECT attempts FROM failures WHERE dest = ?", (dest,))
        return int(rows[0][0]) if rows else 1  # type: ignore[call-overload]

    def clear_failures(self, keep: Iterable[str]) -> None:
        """Drop failure rows for dests no longer wanted (not in ``keep``)."""
        keep_set = set(keep)
        stale = [d for d in self.failures() if d not in keep_set]
        with self._write() as db:
            db.executemany("DELETE FROM failures WHERE dest = ?", [(d,) for d in stale])

    # passes and status ------------------------------------------------------------------------
    def pass_started(self) -> int:
        """Record that a pass starts now; return its id (for :meth:`pass_finished`). Only the newest
        :data:`KEEP_PASSES` rows are kept."""
        with self._write() as db:
            cur = db.execute("INSERT INTO passes(started_at) VALUES (?)", (now(),))
            db.execute("DELETE FROM passes WHERE id <= ?", ((cur.lastrowid or 0) - KEEP_PASSES,))
        return int(cur.lastrowid or 0)

    def pass_finished(
        self,
        pass_id: int,
        *,
        ok: bool,
        commit: str | None,
        head: str | None,
        summary: Mapping[str, object],
        totals: Mapping[str, int] | None = None,
    ) -> None:
        """Record the end of pass ``pass_id``, add ``totals`` to the running ``total.*`` counters and,
        when ``ok``, note ``last_success_at``; one transaction."""
        t = now()
        with self._write() as db:
            db.execute(
                "UPDATE passes SET finished_at = ?, ok = ?, commit_id = ?, head_commit = ?, summary = ? "
                "WHERE id = ?",
                (t, int(ok), commit, head, json.dumps(summary, sort_keys=True), pass_id),
            )
            _add_totals(db, totals or {})
            if head:
                db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('head_commit', ?)", (head,))
            if ok:
                db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('last_success_at', ?)", (t,))

    def passes(self, limit: int = 1, *, finished: bool = False) -> list[PassRecord]:
        """The newest ``limit`` pass rows, newest first (only finished ones with ``finished``)."""
        if self.version < 3:
            return []
        where = "WHERE finished_at IS NOT NULL " if finished else ""
        rows = self._read(
            "SELECT id, started_at, finished_at, ok, commit_id, head_commit, summary FROM passes "  # noqa: S608
            f"{where}ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        out = []
        for r in rows:
            try:
                summary = json.loads(str(r[6])) if r[6] is not None else {}
            except ValueError:
                summary = {}
            out.append(
                PassRecord(
                    int(r[0]),  # type: ignore[call-overload]
                    str(r[1]),
                    None if r[2] is None else str(r[2]),
                    None if r[3] is None else bool(r[3]),
                    None if r[4] is None else str(r[4]),
                    None if r[5] is None else str(r[5]),
                    summary if isinstance(summary, dict) else {},
                )
            )
        return out

    def totals(self) -> dict[str, int]:
        """The running ``total.*`` counters (downloads, bytes, git fetches), 0 for any never counted."""
        out = {}
        for key, value in self._read("SELECT key, value FROM meta WHERE key LIKE 'total.%'"):
            with contextlib.suppress(ValueError):
                out[str(key).removeprefix("total.")] = int(str(value))
        return out

    def invalid_manifests(self) -> dict[str, tuple[str, ...]]:
        """The manifest files that were invalid at ``manifests_commit``, with their problems."""
        out = {}
        query = "SELECT path, problems FROM manifests WHERE problems IS NOT NULL AND problems != '[]'"
        for path, problems in self._read(query + " ORDER BY path"):
            try:
                listed = json.loads(str(problems))
            except ValueError:
                listed = ["(the cached problems do not decode; run syncd validate on this file)"]
            out[str(path)] = tuple(str(p) for p in listed) if isinstance(listed, list) else ()
        return out

    def cached_sources(self) -> dict[str, str]:
        """dest → source of every asset in the manifest cache (to name a failing asset's source)."""
        out = {}
        for (assets,) in self._read("SELECT assets FROM manifests WHERE assets IS NOT NULL"):
            with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
                for a in json.loads(str(assets)):
                    out[str(a["dest"])] = str(a["source"])
        return out

    # the notifiers' state (syncd.notify) ------------------------------------------------------
    def notices_open(self) -> dict[str, tuple[str, int, str]]:
        """key → (first seen, passes seen in a row, the problem as JSON) of every open problem."""
        if self.version < 4:
            return {}
        rows = self._read("SELECT key, first_seen, passes, alert FROM notify_open")
        # a damaged row (a hand edit, a flipped byte) is dropped: it must never stop the notifications
        return {str(k): (str(f), n, str(a)) for k, f, n, a in rows if isinstance(n, int) and n > 0}

    def set_notices_open(self, rows: Mapping[str, tuple[str, int, str]]) -> None:
        """Replace the open problems with ``rows`` (one transaction)."""
        with self._write() as db:
            db.execute("DELETE FROM notify_open")
            db.executemany(
                "INSERT INTO notify_open(key, first_seen, passes, alert) VALUES (?, ?, ?, ?)",
                [(k, f, n, a) for k, (f, n, a) in rows.items()],
            )

    def notices_sent(self) -> dict[str, dict[str, tuple[str, str]]]:
        """channel → key → (announced at, the problem as JSON): what each channel was told is open."""
        out: dict[str, dict[str, tuple[str, str]]] = {}
        if self.version < 4:
            return out
        for ch, key, at, alert in self._read("SELECT channel, key, announced_at, alert FROM notify_sent"):
            out.setdefault(str(ch), {})[str(key)] = (str(at), str(alert))
        return out

    def outbox(self) -> dict[str, dict[str, str]]:
        """channel → key → item (JSON) of what waits to be sent (the published digest)."""
        out: dict[str, dict[str, str]] = {}
        if self.version < 4:
            return out
        for ch, key, item in self._read("SELECT channel, key, item FROM notify_outbox ORDER BY queued_at"):
            out.setdefault(str(ch), {})[str(key)] = str(item)
        return out

    def queue_notices(self, items: Mapping[str, Mapping[str, str]]) -> None:
        """Add items (channel → key → JSON) to the outbox; a key already queued is replaced."""
        t = now()
        with self._write() as db:
            db.executemany(
                "INSERT OR REPLACE INTO notify_outbox(channel, key, item, queued_at) VALUES (?, ?, ?, ?)",
                [(ch, k, v, t) for ch, kv in items.items() for k, v in kv.items()],
            )

    def notices_delivered(
        self,
        channel: str,
        *,
        announced: Mapping[str, str],
        at: str,
        recovered: Iterable[str],
        sent: Iterable[str],
    ) -> None:
        """A message reached ``channel``: it now knows ``announced`` (key → JSON) as open since ``at``;
        ``recovered`` keys are closed for it; ``sent`` outbox keys are gone. One transaction."""
        with self._write() as db:
            db.executemany(
                "INSERT OR REPLACE INTO notify_sent(channel, key, announced_at, alert) VALUES (?, ?, ?, ?)",
                [(channel, k, at, a) for k, a in announced.items()],
            )
            db.executemany(
                "DELETE FROM notify_sent WHERE channel = ? AND key = ?", [(channel, k) for k in recovered]
            )
            db.executemany(
                "DELETE FROM notify_outbox WHERE channel = ? AND key = ?", [(channel, k) for k in sent]
            )
