"""Decide what a pass must do, without any I/O: desired state + ledger + what the export shows → actions.

The plan is plain data: it is what ``syncd sync --dry-run`` prints, and what the executor carries out.

=========  =====================================================================================
kind       when
=========  =====================================================================================
download   nothing at dest; or the ledger's file vanished (it comes back); or ``replace = true``
skip       the ledger says this sha256 is at dest and a file of that size is there
verify     a file is at dest that the ledger does not know: hash it once, adopt it if it matches
recheck    the ledger's file is at dest, but its inode, mtime, ctime or mode changed since syncd recorded
           them (or ``[verify] interval`` picked it this pass): hash it again; good, it is kept (mode
           0444 restored); bad, it is refused and marked damaged
refuse     a symlink or non-file at dest or on its path; a dest that cannot be inspected (EACCES,
           ESTALE, EIO: that dest alone waits for the next pass); a changed sha256 without ``replace``;
           a file the ledger knows but whose size changed by hand, or that a re-hash found damaged (and
           that has not changed since); a dest claimed twice; a dest at or under the staging directory
orphan     the ledger has a file whose manifest entry is gone: left in place, reported (and, with
           ``[prune] enabled``, removed by :func:`prune` once its grace has passed)
defer      a download that failed pass after pass waits out its backoff (``syncd run`` only)
=========  =====================================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum

from syncd.ledger import Published
from syncd.manifest import Asset, conflict_reason
from syncd.publish import Observation, State


class Kind(Enum):
    DOWNLOAD = "download"
    SKIP = "skip"
    VERIFY = "verify"
    RECHECK = "recheck"
    REFUSE = "refuse"
    ORPHAN = "orphan"
    DEFER = "defer"


@dataclass(frozen=True)
class Action:
    """One thing to do (or not do) about one dest, and why."""

    kind: Kind
    dest: str
    asset: Asset | None = None
    reason: str = ""
    replace: bool = False
    # A refusal's stable name (REFUSALS): the notifiers' dedup key, never parsed from text; for a recheck,
    # why: "changed" (its identity moved) or "periodic" ([verify] interval, read at [verify] max_rate).
    cause: str = ""


# Why a dest is refused, as stable names (the reason text says it for people).
REFUSALS = (
    "symlink",  # a symlink at dest
    "blocked_path",  # a symlink or non-directory on the dest's path
    "not_a_file",  # a directory, FIFO or device at dest
    "unreadable",  # the dest cannot be inspected (EACCES, ESTALE, EIO)
    "sha256_changed",  # the manifest changed a published file's sha256 without replace = true
    "changed_outside",  # the published file's size was changed by hand
    "conflict",  # two entries claim the dest
    "in_staging",  # the dest is syncd's staging directory
    "foreign_file",  # a file syncd did not publish, with other content, is at dest
)
# Why a published file is hashed again (a recheck's cause).
RECHECKS = (
    "changed",  # its inode, mtime, ctime or mode is not what syncd recorded
    "periodic",  # [verify] interval picked it this pass (read at [verify] max_rate)
)


def plan(
    desired: Mapping[str, Asset],
    conflicts: Mapping[str, list[Asset]],
    published: Mapping[str, Published],
    observed: Mapping[str, Observation],
    deferred: Mapping[str, str] | None = None,
    *,
    staging: str | None = None,
    recheck: frozenset[str] = frozenset(),
) -> list[Action]:
    """Every action for this pass, in dest order: desired dests, conflicts, then orphans.

    ``deferred`` maps dests still in their across-pass backoff to the reason; their downloads wait.
    ``staging`` is the staging directory's path inside the export (``Export.staging_in_root()``), if it
    lies there: a dest at or under it is refused (syncd empties that directory every pass). ``recheck``
    names published dests to hash again this pass even if nothing about them changed (the periodic
    verification's slice)."""
    actions = [
        _in_staging(a, staging) or _one(a, published.get(d), observed[d], d in recheck)
        for d, a in sorted(desired.items())
    ]
    if deferred:
        actions = [
            Action(Kind.DEFER, a.dest, a.asset, deferred[a.dest])
            if a.kind is Kind.DOWNLOAD and a.dest in deferred
            else a
            for a in actions
        ]
    actions += [
        Action(Kind.REFUSE, dest, claims[0], conflict_reason(dest, claims), cause="conflict")
        for dest, claims in sorted(conflicts.items())
    ]
    actions += [
        Action(Kind.ORPHAN, dest, reason=f"no manifest lists it any more (was {p.manifest})")
        for dest, p in sorted(published.items())
        if dest not in desired and dest not in conflicts
    ]
    return actions


def _in_staging(asset: Asset, staging: str | None) -> Action | None:
    if staging is None or (asset.dest != staging and not asset.dest.startswith(staging + "/")):
        return None
    return Action(
        Kind.REFUSE,
        asset.dest,
        asset,
        f"dest is syncd's staging directory (export.staging = {staging}) or lies under it; refused",
        cause="in_staging",
    )


def _one(asset: Asset, known: Published | None, seen: Observation, recheck: bool = False) -> Action:
    dest = asset.dest
    if seen.state in (State.SYMLINK, State.OTHER, State.BLOCKED):
        cause = {State.SYMLINK: "symlink", State.BLOCKED: "blocked_path"}.get(seen.state, "not_a_file")
        return Action(Kind.REFUSE, dest, asset, f"{seen.detail}; refusing to write there", cause=cause)
    if seen.state is State.UNREADABLE:
        return Action(Kind.REFUSE, dest, asset, f"{seen.detail}; left alone this pass", cause="unreadable")
    if known is None:
        if seen.state is State.MISSING:
            return Action(Kind.DOWNLOAD, dest, asset, "new")
        return Action(Kind.VERIFY, dest, asset, "a file not published by syncd is at dest")
    if known.sha256 != asset.sha256:
        if not asset.replace:
            return Action(
                Kind.REFUSE,
                dest,
                asset,
                f"dest was published with sha256 {known.sha256} (commit {known.commit[:12]}); "
                "changing a published file needs replace = true in the manifest",
                cause="sha256_changed",
            )
        return Action(Kind.DOWNLOAD, dest, asset, "replace = true: new content", replace=True)
    if seen.state is State.MISSING:
        return Action(Kind.DOWNLOAD, dest, asset, "published before but missing from the export")
    if seen.size != known.size:
        return Action(
            Kind.REFUSE,
            dest,
            asset,
            f"file at dest was changed outside syncd (size {seen.size}, ledger says {known.size})",
            cause="changed_outside",
        )
    if known.damaged is not None and seen.identity == known.identity:
        return Action(
            Kind.REFUSE,
            dest,
            asset,
            f"file at dest was changed outside syncd ({known.damaged}); run syncd verify --repair to "
            "quarantine it and restore the reviewed file",
            cause="changed_outside",
        )
    if known.identity and seen.identity != known.identity:
        return Action(
            Kind.RECHECK,
            dest,
            asset,
            "changed on disk since syncd recorded it (inode, times or mode)",
            cause="changed",
        )
    if recheck:
        return Action(Kind.RECHECK, dest, asset, "periodic re-hash ([verify] interval)", cause="periodic")
    return Action(Kind.SKIP, dest, asset, "already published")


def signature_gate(head: str, head_ok: bool, last: str | None, last_ok: bool) -> str | None:
    """The commit a pass serves under ``[source] verify_signatures``: the head when its signature
    verifies; otherwise the last commit planned at when that one verifies (the head is refused, as a
    rewritten branch is); otherwise None: nothing is planned, nothing is orphaned."""
    if head_ok:
        return head
    if last and last != head and last_ok:
        return last
    return None


def verify_slice(
    sizes: Mapping[str, int], cursor: str, share: float, cap: float
) -> tuple[list[str], str | None]:
    """The dests the periodic verification re-hashes this pass, and the new cursor.

    ``sizes``: published dests still wanted, and their sizes. From the first dest after ``cursor`` (in
    dest order, wrapping around), dests are taken until they add up to ``share`` of all the bytes (at
    least one file, at most ``cap`` bytes after the first): over ``1 / share`` passes every file is
    re-hashed once. The cursor is the last dest taken (None: nothing to do)."""
    if not sizes:
        return [], None
    order = sorted(sizes)
    start = next((i for i, d in enumerate(order) if d > cursor), 0)
    budget = min(sum(sizes.values()) * share, cap)
    picked: list[str] = []
    used = 0
    for n in range(len(order)):
        dest = order[(start + n) % len(order)]
        if picked and used + sizes[dest] > budget:
            break
        picked.append(dest)
        used += sizes[dest]
    return picked, picked[-1]


# pruning -------------------------------------------------------------------------------------------

# Why a pass removes nothing at all (each an error event, a status problem and a notification).
VALVES = (
    "max_files",  # more than [prune] max_files files would go
    "max_fraction",  # more than [prune] max_fraction of the published files would go
    "no_assets",  # the manifests at the head hold no asset while the ledger has published files
    "untrusted_head",  # the head was refused (signature, rewritten branch): the last good one is served
)


@dataclass(frozen=True)
class Removal:
    """A published file to remove: its manifest entry has been gone for longer than the grace."""

    row: Published  # what the ledger recorded (its orphaned_at set)
    gone: bool = False  # nothing is at dest any more: only the ledger forgets it

    @property
    def dest(self) -> str:
        return self.row.dest

    @property
    def size(self) -> int:
        return self.row.size

    @property
    def orphaned_at(self) -> str:
        return str(self.row.orphaned_at)


@dataclass(frozen=True)
class Pruning:
    """What pruning does this pass: ``remove`` (empty when a valve tripped), ``kept`` (dest, why it stays:
    within the grace, changed since syncd recorded it, ...), and the tripped valve with its reason."""

    remove: list[Removal]
    kept: list[tuple[str, str]]
    valve: str = ""
    reason: str = ""
    held: int = 0  # with a valve: the files it kept from removal
    published: int = 0  # the files the ledger knows as published (what max_fraction is a fraction of)

    @property
    def would_remove(self) -> int:
        """Files that go (or, with a valve, would have gone); a row whose file is gone is not one."""
        return self.held if self.valve else sum(1 for r in self.remove if not r.gone)


def prune(
    published: Mapping[str, Published],
    observed: Mapping[str, Observation],
    *,
    now: datetime,
    grace: float,
    max_files: int,
    max_fraction: float,
    head_assets: int,
    invalid: frozenset[str] = frozenset(),
    trusted: bool = True,
    fetched: bool = True,
    confirm: bool = False,
) -> Pruning:
    """Which orphaned files (``published`` rows with ``orphaned_at``) go this pass.

    A file goes when it has been orphaned for at least ``grace`` seconds and is still exactly what syncd
    recorded (``observed``: a regular file of the recorded identity and size). While any manifest is
    invalid at the head (``invalid``: their paths) nothing goes: an invalid file may hold any entry (one
    moved there from another file, say), so no orphan is known to be unwanted. Then the valves:
    more than ``max_files`` or ``max_fraction`` of the published files, no asset at the head
    (``head_assets`` == 0), or an untrusted head: nothing goes. ``confirm`` (``syncd prune --confirm``,
    an admin's decision) goes past the valves but the untrusted head, never past the grace or the
    identity check. Not ``fetched`` (git unreachable this pass: the head may want a dest again): nothing
    goes, and no valve trips (the fetch failure is the problem already reported)."""
    remove: list[Removal] = []
    kept: list[tuple[str, str]] = []
    for dest, p in sorted(published.items()):
        if p.orphaned_at is None:
            continue
        why, gone = _keep(p, observed.get(dest), now, grace, invalid)
        if why:
            kept.append((dest, why))
        else:
            remove.append(Removal(p, gone=gone))
    total = len(published)
    out = Pruning(remove, kept, published=total)
    n = out.would_remove
    if not fetched and remove:
        why = "the branch head could not be fetched this pass (it may want the dest again); kept"
        return Pruning([], sorted(kept + [(r.dest, why) for r in remove]), published=total)
    if n == 0:
        return out
    if not trusted:
        valve = ("untrusted_head", "the branch head was refused (signature or rewritten history)")
    elif confirm:
        return out
    elif head_assets == 0:
        valve = ("no_assets", f"the manifests at the head hold no asset, but {total} file(s) are published")
    elif n > max_files:
        valve = ("max_files", f"{n} file(s) would be removed, more than [prune] max_files = {max_files}")
    elif n > max_fraction * total:
        valve = (
            "max_fraction",
            f"{n} of {total} published file(s) would be removed, more than [prune] max_fraction = "
            f"{max_fraction:g}",
        )
    else:
        return out
    held = [(r.dest, "safety valve: " + valve[0]) for r in remove]
    return Pruning([], sorted(kept + held), valve[0], valve[1], held=n, published=total)


def _keep(
    p: Published, seen: Observation | None, now: datetime, grace: float, invalid: frozenset[str]
) -> tuple[str, bool]:
    """Why an orphan stays this pass ("" when it goes), and whether nothing is at its dest."""
    try:
        since = datetime.fromisoformat(str(p.orphaned_at))
    except ValueError:
        return "its orphaned time in the ledger is unreadable", False
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    if invalid:
        first = min(invalid)
        more = f" and {len(invalid) - 1} more" if len(invalid) > 1 else ""
        return (
            f"{first}{more} invalid at the head (it may still list this dest): nothing is pruned until fixed",
            False,
        )
    left = grace - (now - since).total_seconds()
    if left > 0:
        after = since + timedelta(seconds=grace)
        return f"orphaned since {p.orphaned_at}; removable after {after:%Y-%m-%dT%H:%M:%SZ}", False
    if seen is None or seen.state is State.MISSING:
        return "", True
    if seen.state is not State.FILE:
        return f"not a regular file at dest ({seen.detail or seen.state.value}); kept", False
    if not p.identity:
        return "no identity recorded for it (published before syncd recorded identities); kept", False
    if p.damaged is not None or seen.identity != p.identity or seen.size != p.size:
        return "changed since syncd recorded it (inode, size or times); kept", False
    return "", False
