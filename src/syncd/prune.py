"""Pruning in a pass (engine path): gather what :func:`syncd.plan.prune` decides on, then carry it out.

``decide`` reads the ledger's published rows and looks at each orphan's dest (nothing is changed);
``carry_out`` removes each file through :meth:`syncd.publish.Export.remove` (only while it is still the
file syncd recorded), then the empty directories syncd made for it, then forgets its ledger row, with one
event each (``asset_pruned``, ``prune_failed``), or, when a safety valve tripped, removes nothing and
emits ``prune_refused``. A crash at any point converges: a file half-way sits in staging (cleaned at the
next pass), a removed file whose row was not yet forgotten is found missing and forgotten.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from syncd import events as ev
from syncd.config import Prune
from syncd.desired import Desired
from syncd.errors import PublishError
from syncd.ledger import Ledger, now
from syncd.plan import Pruning, prune
from syncd.publish import Export


@dataclass
class Outcome:
    """What ``carry_out`` did: files removed (and their bytes), files that stayed after an error, and a
    tripped valve with its message."""

    pruned: int = 0
    pruned_bytes: int = 0
    failed: int = 0
    problem: str = ""
    error: str = ""


def decide(
    ledger: Ledger,
    export: Export,
    desired: Desired,
    cfg: Prune,
    *,
    trusted: bool,
    fetched: bool = True,
    confirm: bool = False,
) -> Pruning:
    """What pruning removes now. ``desired``: the assets at the commit the pass serves (a dest it wants is
    never an orphan; one planned as an orphan but not yet marked, in a dry run, counts as orphaned now).
    ``trusted``: the served commit is not in place of a refused head; ``fetched``: the head was fetched
    this pass (git was reachable)."""
    wanted = desired.assets.keys() | desired.conflicts.keys()
    stamp = now()
    rows = {
        d: dataclasses.replace(p, orphaned_at=None if d in wanted else p.orphaned_at or stamp)
        for d, p in ledger.published().items()
    }
    observed = {d: export.observe(d) for d, p in rows.items() if p.orphaned_at is not None}
    return prune(
        rows,
        observed,
        now=datetime.now(UTC),
        grace=cfg.grace,
        max_files=cfg.max_files,
        max_fraction=cfg.max_fraction,
        head_assets=len(wanted),
        invalid=frozenset(desired.invalid),
        trusted=trusted,
        fetched=fetched,
        confirm=confirm,
    )


def carry_out(
    ledger: Ledger, export: Export, pruning: Pruning, emit: Callable[[ev.Event], None], commit: str
) -> Outcome:
    """Remove what ``pruning`` says, one event per file; or, with a tripped valve, nothing."""
    out = Outcome()
    if pruning.valve:
        out.problem = pruning.valve
        out.error = (
            f"{pruning.reason}; nothing was removed (syncd prune lists the files; syncd prune --confirm "
            "removes them)"
        )
        emit(
            ev.PruneRefused(
                valve=pruning.valve, would_remove=pruning.would_remove, published=pruning.published,
                error=out.error, commit=commit,
            )
        )  # fmt: skip
        return out
    created = ledger.directories()
    for r in pruning.remove:
        p = r.row
        try:
            removed = not r.gone and export.remove(r.dest, p.identity, p.size)
            dirs = export.remove_empty_dirs(r.dest, created)
        except PublishError as exc:
            out.failed += 1
            emit(ev.PruneFailed(dest=r.dest, error=str(exc)))
            continue
        ledger.forget(r.dest)
        ledger.forget_directories(dirs)
        if removed:
            out.pruned += 1
            out.pruned_bytes += r.size
        emit(
            ev.AssetPruned(
                dest=r.dest, sha256=p.sha256, bytes=p.size, orphaned_since=r.orphaned_at, source=p.source,
                manifest=p.manifest, published_commit=p.commit, gone=not removed, directories=tuple(dirs),
            )
        )  # fmt: skip
    return out
