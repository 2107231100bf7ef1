"""A pass that plans only what changed since the last healthy pass: at 100,000 assets the full pass
(every manifest decoded, every asset planned) costs seconds and hundreds of MiB, while a pass usually
has nothing new or one changed manifest file.

- :func:`since_last` says whether the last pass left a state this shortcut may start from: the same
  commit synced and cached, nothing failing, refused, invalid, deferred or pending, no prune or periodic
  re-hash due, the manifest cache intact, and the ledger's wanted files exactly that commit's assets.
- :func:`narrow` then returns what the pass must plan: nothing when the head did not move, else the
  dests of the changed manifest files only; and in both cases it checks every other wanted file with a
  stat (size and identity as recorded). Anything unusual (a file touched or missing, an invalid or
  conflicting manifest, too many files changed) returns None: the full pass runs, which decides
  everything; this module never decides an action itself.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from syncd import manifest
from syncd.config import Config
from syncd.desired import Desired, cache_key, parse_file
from syncd.gitsource import ManifestRepo
from syncd.ledger import CachedManifest, Ledger, Published
from syncd.manifest import Asset
from syncd.publish import Export, Observation

MAX_CHANGED = 50  # more changed manifest files than this: the full pass


@dataclass(frozen=True)
class Narrow:
    """What a pass plans: ``desired`` (only the changed files' assets), ``published`` for those dests,
    the dests they dropped and the orphans, ``observed`` for the desired ones; ``skipped``: the other
    wanted files, seen intact;
    ``wanted``: every dest the head asks for, sorted (for the next pass's check)."""

    desired: Desired
    published: dict[str, Published]
    observed: dict[str, Observation]
    skipped: int
    wanted: list[str]


def dests_digest(dests: Iterable[str]) -> str:
    """A digest of a sorted list of dests: what :func:`since_last` compares with the ledger's."""
    h = hashlib.sha256()
    for d in dests:
        h.update(d.encode())
        h.update(b"\0")
    return h.hexdigest()


def since_last(cfg: Config, ledger: Ledger, *, dry_run: bool, prune_mode: str, periodic: bool) -> str | None:
    """The commit of the last pass when this pass may start from it (see the module docstring), else
    None."""
    if dry_run or cfg.prune.enabled or prune_mode or (periodic and cfg.verify_interval is not None):
        return None
    synced = ledger.get("synced_commit")
    if not synced or synced != ledger.get("manifests_commit"):
        return None
    last = ledger.passes(1, finished=True)
    state = last[0].summary.get("state") if last else None
    if not last or not last[0].ok or last[0].commit != synced or not isinstance(state, dict):
        return None
    if any(state.get(k) for k in ("failing", "refused", "invalid_manifests", "deferred", "pending")):
        return None
    if ledger.failures() or not ledger.cache_intact(cache_key(cfg.source.path)):
        return None
    return synced


def narrow(
    cfg: Config, ledger: Ledger, repo: ManifestRepo, export: Export, head: str, synced: str
) -> Narrow | None:
    """What a pass at ``head`` must plan, starting from the healthy pass at ``synced`` (see the module
    docstring); None: the full pass. Updates the manifest cache to ``head`` when it returns a Narrow."""
    files = ledger.wanted_files()
    if ledger.get("wanted_digest") != f"{synced}:{dests_digest(f[0] for f in files)}":
        return None  # the ledger's files are not exactly the assets the last pass asked for
    new: dict[str, Asset] = {}
    gone: set[str] = set()
    upserts: dict[str, CachedManifest] = {}
    deleted: frozenset[str] = frozenset()
    if head != synced:
        if not repo.has_commit(synced):
            return None
        change = repo.changes(synced, head)
        deleted = change.deleted
        touched = change.changed | deleted
        if len(touched) > MAX_CHANGED:
            return None
        old = ledger.cached_manifests(touched)
        if old is None:
            return None
        upserts = {p: parse_file(repo, p, repo.blob_id(head, p)) for p in sorted(change.changed)}
        if any(c.problems for c in upserts.values()):
            return None  # an invalid file: the full pass reports it
        assets = [a for c in upserts.values() for a in c.assets]
        if manifest.conflicts(assets):
            return None
        new = {a.dest: a for a in assets}
        gone = {a.dest for c in old.values() for a in c.assets}
        wanted_before = {f[0] for f in files}
        if any(d in wanted_before and d not in gone for d in new):
            return None  # a dest another (unchanged) manifest lists: a conflict for the full pass
    rest = [f for f in files if f[0] not in gone and f[0] not in new]
    with contextlib.closing(export.observe_all(f[0] for f in rest)) as seen:
        for (_, size, identity, damaged), (_, obs) in zip(rest, seen, strict=True):
            if damaged or not identity or obs.identity != identity or obs.size != size:
                return None
    if head != synced:
        ledger.update_manifests(head, cache_key(cfg.source.path), upserts, deleted)
    # Orphans stay in the plan (as in a full pass, a pass counts every file no manifest lists).
    touched_dests = sorted(gone | set(new) | set(ledger.orphaned_dests()))
    return Narrow(
        desired=Desired(head, new, {}, {}),
        published=ledger.published(touched_dests) if touched_dests else {},
        observed=dict(export.observe_all(sorted(new))),
        skipped=len(rest),
        wanted=sorted([f[0] for f in rest] + list(new)),
    )
