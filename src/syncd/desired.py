"""The desired state at a commit: every valid asset in every manifest, with conflicts and invalid files
apart. Reads manifests through :mod:`syncd.gitsource` and reuses the ledger's manifest cache (a tree diff
between the cached commit and the head names the files to read again)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from syncd import manifest
from syncd.errors import ManifestError
from syncd.gitsource import ManifestRepo
from syncd.ledger import CachedManifest, Ledger
from syncd.manifest import Asset


@dataclass(frozen=True)
class Desired:
    """The desired state at one commit."""

    commit: str
    assets: dict[str, Asset]
    conflicts: dict[str, list[Asset]]
    invalid: dict[str, tuple[str, ...]]


def cache_key(source_path: str) -> str:
    """Everything that shapes the manifest cache besides the commit: ``[source] path`` (which files
    are manifests) and the version of the parse rules (what a file's parse is)."""
    return json.dumps({"path": source_path, "rules": manifest.RULES_VERSION}, sort_keys=True)


def load_desired(repo: ManifestRepo, ledger: Ledger, head: str) -> Desired:
    """The assets wanted at ``head``, reusing the ledger's manifest cache through a tree diff.

    The cache is used only if it was built under the same :func:`cache_key` and decodes; otherwise every
    manifest at ``head`` is read and parsed again. The caller checks first that ``[source] path`` is a
    directory at ``head`` (:meth:`Reconciler._servable`). Raises :class:`GitError` on a git read error."""
    key = cache_key(repo.source.path)
    cached_commit, cache = ledger.manifest_cache(key)
    if cached_commit != head:
        if cached_commit and repo.has_commit(cached_commit):
            change = repo.changes(cached_commit, head)
            upserts = {p: parse_file(repo, p, repo.blob_id(head, p)) for p in sorted(change.changed)}
            ledger.update_manifests(head, key, upserts, change.deleted)
            for p in change.deleted:
                cache.pop(p, None)
            cache.update(upserts)
        else:
            blobs = repo.manifests(head)
            cache = {
                p: cache[p] if p in cache and cache[p].blob == b else parse_file(repo, p, b)
                for p, b in sorted(blobs.items())
            }
            ledger.update_manifests(head, key, cache, (), replace_all=True)
    every = [a for c in cache.values() for a in c.assets]
    conflicts = manifest.conflicts(every)
    assets = {a.dest: a for a in every if a.dest not in conflicts}
    invalid = {p: c.problems for p, c in sorted(cache.items()) if c.problems}
    return Desired(head, assets, conflicts, invalid)


def parse_file(repo: ManifestRepo, path: str, blob: str) -> CachedManifest:
    """Manifest file ``path`` (blob ``blob``) parsed, or its problems."""
    try:
        return CachedManifest(blob, assets=tuple(manifest.parse(path, repo.read_manifest(path, blob))))
    except ManifestError as exc:
        return CachedManifest(blob, problems=tuple(exc.problems))
