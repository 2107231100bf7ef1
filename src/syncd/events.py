"""The event path: what a pass tells the world, as small typed events, and the bus that delivers them.

The engine (:mod:`syncd.reconcile`, :mod:`syncd.daemon`) emits one event per thing that happened; observers
consume them: the JSON log (:class:`LogObserver`), the systemd STATUS line (:mod:`syncd.systemd`), the
metrics (:mod:`syncd.metrics`), and later mail, webhooks and the audit log. Observers never write the
export or decide anything. An observer that raises is logged once (``observer_failed``, with the
exception's type and frames, never its text) and skipped for that event: it can never break a pass.
Observers are called on the emitting thread (the pass's coordinating thread, or a download thread for
:class:`AssetRetry`), so they must be quick and thread-safe; slow ones (mail, webhooks) queue their work.

Each event's ``name`` is its log event name, and its fields are the log fields (docs/operations.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from syncd import logs

log = logs.get()
INFO, WARNING, ERROR = logging.INFO, logging.WARNING, logging.ERROR
MAX_PROBLEMS_LOGGED = 20  # per manifest_invalid event; `syncd validate` lists every problem
MAX_PROBLEM_CHARS = 500


@dataclass(frozen=True)
class Event:
    """Base of every event: ``name`` (the log event) and ``level``; the fields are the dataclass's."""

    name: ClassVar[str] = "event"
    level: ClassVar[int] = INFO

    def log_level(self) -> int:
        return self.level

    def fields(self) -> dict[str, Any]:
        """The log fields: every dataclass field, in order; None values are left out."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v for k, v in out.items() if v is not None}


# the pass ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PassStarted(Event):
    name: ClassVar[str] = "pass_started"
    level: ClassVar[int] = logging.DEBUG
    dry_run: bool
    started_at: str


@dataclass(frozen=True)
class PassProgress(Event):
    """Download progress during a pass, at most once a second (not logged)."""

    name: ClassVar[str] = "pass_progress"
    level: ClassVar[int] = logging.DEBUG
    files_done: int
    files: int
    bytes_done: int
    bytes_total: int


@dataclass(frozen=True)
class Counts:
    """The export's state at the end of a pass, as ``syncd status`` and ``syncd_assets`` show it."""

    published: int = 0  # in the ledger, wanted or not yet orphaned
    pending: int = 0  # wanted, not at its dest, not failing or refused (interrupted, or a dry run)
    failing: int = 0  # a download failed; retried (with backoff in the daemon)
    refused: int = 0  # syncd will not write the dest
    orphaned: int = 0  # published, no longer in any manifest (left in place)
    deferred: int = 0  # failing, waiting out its backoff this pass
    invalid_manifests: int = 0
    published_bytes: int = 0


@dataclass(frozen=True)
class PassFinished(Event):
    """One pass ended. ``ok``: the export matches every manifest at ``commit``."""

    name: ClassVar[str] = "pass_finished"
    commit: str
    ok: bool
    dry_run: bool
    published: int
    adopted: int
    skipped: int
    refused: int
    failed: int
    orphaned: int
    deferred: int
    pending: int
    invalid_manifests: int
    git_error: str | None
    source_error: str | None
    bytes: int
    duration_s: float
    git_problem: str | None = None  # "unreachable", "rewritten" or "not_in_clone" (reconcile.GitProblem)
    started_at: str = ""
    finished_at: str = ""
    head: str | None = None
    pruned: int = 0  # files removed by [prune] this pass
    prune_problem: str | None = None  # a tripped safety valve (plan.VALVES): nothing was removed
    prune_error: str | None = None  # ... and why, for people
    state: Counts = field(default_factory=Counts)
    totals: Mapping[str, int] = field(default_factory=dict)  # the ledger's running totals after it
    last_success_at: str | None = None  # from the ledger: this pass, or an earlier one
    synced_commit: str | None = None  # from the ledger: the last commit the export was in sync with

    def log_level(self) -> int:
        return INFO if self.ok else ERROR

    def fields(self) -> dict[str, Any]:
        out = super().fields()
        for k in ("started_at", "finished_at", "head", "state", "totals", "last_success_at", "synced_commit"):
            out.pop(k, None)
        out.setdefault("git_error", None)
        out.setdefault("source_error", None)
        return out


@dataclass(frozen=True)
class PassFailed(Event):
    """No pass was possible (the export root missing or held, git unreachable before a first fetch, the
    ledger unusable); the daemon tries again at the next interval."""

    name: ClassVar[str] = "pass_failed"
    level: ClassVar[int] = ERROR
    error: str
    error_type: str
    at: str = ""

    def fields(self) -> dict[str, Any]:
        return {"error": self.error, "error_type": self.error_type}


# git --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GitFetched(Event):
    name: ClassVar[str] = "git_fetched"
    commit: str
    branch: str


@dataclass(frozen=True)
class GitFailed(Event):
    name: ClassVar[str] = "git_fetch_failed"
    level: ClassVar[int] = ERROR
    error: str
    source: str
    serving_commit: str


@dataclass(frozen=True)
class GitNotFetched(Event):
    name: ClassVar[str] = "git_not_fetched"
    commit: str
    reason: str


@dataclass(frozen=True)
class GitRewritten(Event):
    """The branch no longer descends from the last synced commit; ``followed`` with allow_force_push."""

    name: ClassVar[str] = "git_history_rewritten"
    previous: str
    commit: str
    branch: str
    followed: bool
    serving_commit: str | None = None
    error: str | None = None

    def log_level(self) -> int:
        return WARNING if self.followed else ERROR

    def fields(self) -> dict[str, Any]:
        out = super().fields()
        out.pop("followed")
        if self.followed:
            out["action"] = "following it"
        return out


@dataclass(frozen=True)
class SignatureVerified(Event):
    """The commit to serve carries a good signature by a trusted key (logged once per new commit)."""

    name: ClassVar[str] = "signature_verified"
    commit: str
    signer: str
    key: str


@dataclass(frozen=True)
class SignatureRefused(Event):
    """The branch head's signature did not verify: syncd serves the last verified commit, or nothing."""

    name: ClassVar[str] = "signature_refused"
    level: ClassVar[int] = ERROR
    commit: str
    author: str
    status: str  # signatures.Status: unsigned, unknown_key, bad_signature, expired, error
    error: str
    serving_commit: str | None = None  # None: no verified commit to serve, nothing was planned
    key: str | None = None


@dataclass(frozen=True)
class SourcePathMissing(Event):
    name: ClassVar[str] = "source_path_missing"
    level: ClassVar[int] = ERROR
    path: str
    commit: str
    error: str


@dataclass(frozen=True)
class ManifestInvalid(Event):
    """One manifest file is invalid: all its assets are skipped. The log shows at most
    :data:`MAX_PROBLEMS_LOGGED` problems of :data:`MAX_PROBLEM_CHARS` each (a 9,000-asset file with a typo
    in every asset made a 7 MB line, which journald splits into invalid JSON); validate lists all."""

    name: ClassVar[str] = "manifest_invalid"
    level: ClassVar[int] = ERROR
    manifest: str
    commit: str
    problems: tuple[str, ...]

    def fields(self) -> dict[str, Any]:
        probs = self.problems
        shown = [p if len(p) <= MAX_PROBLEM_CHARS else p[:MAX_PROBLEM_CHARS] + "…" for p in probs]
        more = len(probs) - MAX_PROBLEMS_LOGGED
        return {
            "manifest": self.manifest,
            "commit": self.commit,
            "error": "; ".join(shown[:3]) + (f"; and {len(probs) - 3} more" if len(probs) > 3 else ""),
            "problems": shown[:MAX_PROBLEMS_LOGGED] + ([f"… and {more} more"] if more > 0 else []),
            "problem_count": len(probs),
        }


# assets -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StagingCleaned(Event):
    name: ClassVar[str] = "staging_cleaned"
    files: int
    staging: str


def provenance_fields(provenance: Mapping[str, Any] | None) -> dict[str, Any]:
    """A published file's provenance (``provenance.Provenance.to_json()``) as the log and the audit log
    show it: ``author``, ``merger``, ``introduced``, ``merge_commit``, ``pr``, ``signer``, ``signer_key``,
    each only when known (``syncd provenance DEST`` shows all of it)."""
    p = provenance or {}
    shown = {
        "author": person(p.get("author_name"), p.get("author_email")),
        "merger": person(p.get("merger_name"), p.get("merger_email")),
        "introduced": p.get("introduced_commit"),
        "merge_commit": p.get("merge_commit"),
        "pr": p.get("pr_ref"),
        "signer": p.get("signer"),
        "signer_key": p.get("signer_key"),
    }
    return {k: v for k, v in shown.items() if v}


def _with_provenance(out: dict[str, Any], provenance: Mapping[str, Any] | None) -> dict[str, Any]:
    out.pop("provenance", None)
    return {**out, **provenance_fields(provenance)}


def person(name: object, email: object) -> str:
    """``Name <e-mail>`` (or the part that is known; "" for neither)."""
    if not (name or email):
        return ""
    return f"{name} <{email}>" if email else str(name)


@dataclass(frozen=True)
class AssetPublished(Event):
    name: ClassVar[str] = "asset_published"
    dest: str
    source: str
    sha256: str
    bytes: int
    duration_s: float
    mb_per_s: float
    manifest: str
    commit: str
    replaced: bool
    provenance: Mapping[str, Any] | None = None  # provenance.Provenance.to_json()

    def fields(self) -> dict[str, Any]:
        return _with_provenance(super().fields(), self.provenance)


@dataclass(frozen=True)
class AssetAdopted(Event):
    name: ClassVar[str] = "asset_adopted"
    dest: str
    sha256: str
    bytes: int
    manifest: str
    commit: str
    provenance: Mapping[str, Any] | None = None
    source: str = ""

    def fields(self) -> dict[str, Any]:
        return _with_provenance(super().fields(), self.provenance)


@dataclass(frozen=True)
class AssetRechecked(Event):
    """A published file was hashed again (its inode, times or mode changed, or the periodic
    verification picked it) and is still the reviewed file; ``mode_restored``: chmod 0444 again."""

    name: ClassVar[str] = "asset_rechecked"
    dest: str
    reason: str
    mode_restored: bool
    commit: str
    sha256: str = ""
    bytes: int = 0


@dataclass(frozen=True)
class AssetFailed(Event):
    name: ClassVar[str] = "asset_failed"
    level: ClassVar[int] = ERROR
    dest: str
    source: str
    manifest: str
    sha256: str
    error: str
    failed_passes: int
    commit: str
    retry: str = "next pass"
    error_class: str = ""  # errors.error_class: checksum_mismatch, http_404, export_full, download_failed…


@dataclass(frozen=True)
class AssetRefused(Event):
    name: ClassVar[str] = "asset_refused"
    level: ClassVar[int] = ERROR
    dest: str
    manifest: str
    error: str
    commit: str
    cause: str = ""  # plan.REFUSALS: symlink, sha256_changed, foreign_file, conflict…
    source: str = ""
    sha256: str = ""
    passes: int = 1  # consecutive passes that refused it (1: the first; the audit log records only it)


@dataclass(frozen=True)
class AssetQuarantined(Event):
    """``syncd verify --repair`` moved a bad file (or the symlink or directory in its place) aside."""

    name: ClassVar[str] = "asset_quarantined"
    level: ClassVar[int] = WARNING
    dest: str
    moved_to: str  # relative to the export root: .syncd-quarantine/<UTC time>/<dest>
    finding: str  # verify.KINDS
    error: str
    sha256: str  # what the ledger says the file should be (not the bad file's)
    size: int


@dataclass(frozen=True)
class AssetRepaired(Event):
    """``syncd verify --repair`` restored the published file at ``dest`` (downloaded, or mode 0444)."""

    name: ClassVar[str] = "asset_repaired"
    dest: str
    sha256: str
    bytes: int
    source: str
    how: str  # "downloaded" (a quarantined or missing file) or "mode_restored"
    commit: str
    provenance: Mapping[str, Any] | None = None

    def fields(self) -> dict[str, Any]:
        return _with_provenance(super().fields(), self.provenance)


@dataclass(frozen=True)
class RepairFailed(Event):
    name: ClassVar[str] = "repair_failed"
    level: ClassVar[int] = ERROR
    dest: str
    finding: str
    error: str


@dataclass(frozen=True)
class AssetRetry(Event):
    name: ClassVar[str] = "asset_retry"
    level: ClassVar[int] = WARNING
    dest: str
    attempt: int
    error: str
    wait_s: float
    source: str


@dataclass(frozen=True)
class AssetDeferred(Event):
    name: ClassVar[str] = "asset_deferred"
    dest: str
    reason: str
    commit: str


@dataclass(frozen=True)
class AssetInterrupted(Event):
    name: ClassVar[str] = "asset_interrupted"
    dest: str
    error: str
    commit: str


@dataclass(frozen=True)
class AssetOrphaned(Event):
    name: ClassVar[str] = "asset_orphaned"
    level: ClassVar[int] = WARNING
    dest: str
    reason: str
    commit: str


@dataclass(frozen=True)
class AssetPruned(Event):
    """``[prune]`` (or ``syncd prune --confirm``) removed a file whose manifest entry had been gone for
    the grace period; ``gone``: it was already missing, only the ledger forgot it."""

    name: ClassVar[str] = "asset_pruned"
    level: ClassVar[int] = INFO
    dest: str
    sha256: str
    bytes: int
    orphaned_since: str
    source: str
    manifest: str
    published_commit: str
    gone: bool = False
    directories: tuple[str, ...] = ()  # the empty directories syncd created for it, removed too


@dataclass(frozen=True)
class PruneRefused(Event):
    """A safety valve tripped: this pass removes nothing (``syncd prune --confirm`` goes past it)."""

    name: ClassVar[str] = "prune_refused"
    level: ClassVar[int] = ERROR
    valve: str  # plan.VALVES
    would_remove: int
    published: int
    error: str
    commit: str


@dataclass(frozen=True)
class PruneFailed(Event):
    """One file could not be removed (changed, replaced, or an I/O error): it stays; the others go."""

    name: ClassVar[str] = "prune_failed"
    level: ClassVar[int] = WARNING
    dest: str
    error: str


# delivery ---------------------------------------------------------------------------------------------
Observer = Callable[[Event], None]


class LogObserver:
    """The JSON log: one structlog event per event, named and leveled as the event says."""

    def __call__(self, event: Event) -> None:
        level = event.log_level()
        if level > logging.DEBUG:
            log.log(level, event.name, **event.fields())


class EventBus:
    """Delivers each event to every observer, in order; one that raises is reported once per
    (observer, event type) and skipped."""

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self.observers = list(observers)
        self._reported: set[tuple[int, str]] = set()
        self._lock = threading.Lock()

    def add(self, observer: Observer, *, first: bool = False) -> None:
        """Deliver to ``observer`` too: last, or ``first`` (the audit log: durable before others hear)."""
        if first:
            self.observers.insert(0, observer)
        else:
            self.observers.append(observer)

    def remove(self, observer: Observer) -> None:
        self.observers = [o for o in self.observers if o is not observer]

    def emit(self, event: Event) -> None:
        for observer in self.observers:
            try:
                observer(event)
            except Exception as exc:  # an observer may fail; the pass may not
                self._report(observer, event, exc)

    def _report(self, observer: Observer, event: Event, exc: Exception) -> None:
        key = (id(observer), event.name)
        with self._lock:
            if key in self._reported:
                return
            self._reported.add(key)
        where = [
            f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}"
            for f in traceback.extract_tb(exc.__traceback__)
        ]
        # Never the exception's text (it may hold a URL or a header); log directly, not through the bus.
        with contextlib.suppress(Exception):
            log.error(
                "observer_failed",
                observer=type(observer).__name__,
                event_name=event.name,
                error_type=type(exc).__name__,
                frames=where,
                error="an observer failed; the pass goes on (reported once per observer and event)",
            )


def summary(event: PassFinished) -> Mapping[str, Any]:
    """What the ledger keeps of a finished pass for ``syncd status``."""
    return {
        **event.fields(),
        "started_at": event.started_at,
        "head": event.head,
        "state": dataclasses.asdict(event.state),
    }
