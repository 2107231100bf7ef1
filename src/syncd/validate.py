"""``syncd validate``: check manifest files the way the daemon would, for a required CI check.

In: paths (files, or directories whose ``*.toml`` files below them are checked) and an optional base
revision. Out: a list of problems (``FILE:LINE: message`` or ``FILE: asset[N].field: message``); empty
means valid. With a base revision, an asset that changes the sha256 of a dest that existed at the base
without ``replace = true`` is reported, because the daemon would refuse it.
"""

from __future__ import annotations

from pathlib import Path

from syncd import gitsource, manifest
from syncd.errors import GitError, ManifestError
from syncd.manifest import Asset


def collect(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """The manifest files named by ``paths`` and problems for paths that do not exist."""
    files: list[Path] = []
    problems: list[str] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob(f"*{gitsource.MANIFEST_SUFFIX}") if f.is_file())
            files += found
        elif p.is_file():
            files.append(p)
        else:
            problems.append(f"{p}: no such file or directory")
    return files, problems


def validate(paths: list[Path], base: str | None = None) -> tuple[int, list[str]]:
    """Validate ``paths``; return (number of files checked, problems)."""
    files, problems = collect(paths)
    assets: list[Asset] = []
    for f in files:
        try:
            assets += manifest.parse(str(f), f.read_bytes())
        except ManifestError as exc:
            problems += exc.problems
        except OSError as exc:
            problems.append(f"{f}: cannot read: {exc.strerror}")
    for dest, claims in manifest.conflicts(assets).items():
        problems += manifest.conflict_problems(dest, claims)
    if base is not None:
        problems += _immutability(paths, base, assets)
    return len(files), problems


def _immutability(paths: list[Path], base: str, assets: list[Asset]) -> list[str]:
    before: dict[str, str] = {}
    problems: list[str] = []
    for p in paths:
        try:
            _, blobs = gitsource.read_at_revision(p, base)
        except GitError as exc:
            problems.append(f"{p}: {exc}")
            continue
        for name, data in blobs.items():
            try:
                for a in manifest.parse(name, data):
                    before[a.dest] = a.sha256
            except ManifestError:
                continue  # an invalid file at the base published nothing
    for a in assets:
        old = before.get(a.dest)
        if old is not None and old != a.sha256 and not a.replace:
            problems.append(
                f"{a.where()}.sha256: dest {a.dest!r} has sha256 {old} at {base}; changing a "
                "published file breaks readers (ESTALE) and is refused unless the asset says "
                "replace = true"
            )
    return problems
