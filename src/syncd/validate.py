"""``syncd validate``: check manifest files the way the daemon would, for a required CI check.

In: paths (files, or directories whose manifests below them are checked) and an optional base revision.
Out: a :class:`Report`: problems (``FILE:LINE: message`` or ``FILE: asset[N].field: message``; none means
valid) and warnings (lookalike dests, names the daemon ignores). With a base revision, an asset that
changes the sha256 of a dest that existed at the base without ``replace = true`` is reported, because the
daemon would refuse it. With a :class:`~syncd.storage.Storage` (``--remote``), assets new or changed since
the base are checked against Artifactory (:mod:`syncd.remote`).

What is a manifest is decided as the daemon decides it in git (:func:`syncd.gitsource.list_manifests`):
a name ending in exactly ``.toml``; a symbolic link so named is an invalid manifest (git stores the link's
text, so the daemon never reads its target); a path that is not valid UTF-8 is an invalid manifest
(the daemon cannot record it); directories are walked whatever their name, but never
through a symbolic link, and never into a ``.git`` directory or a submodule (another repository's
files, which the daemon does not see).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from syncd import gitsource, manifest
from syncd.errors import GitError, ManifestError
from syncd.manifest import Asset

if TYPE_CHECKING:  # validate without --remote never loads the HTTP stack
    from syncd.storage import Storage


@dataclass
class Report:
    """What validate found: ``files`` manifests checked, ``problems`` (exit 1), ``warnings``."""

    files: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    signed: str = ""  # with --verify-signatures: "commit 4f2a9c1d0e3b signed by alice@bank.example"
    remote_checked: int = -1  # with --remote: how many assets were asked about (-1: not asked)


@dataclass
class _Found:
    files: list[Path] = field(default_factory=list)
    links: list[Path] = field(default_factory=list)
    badnames: list[Path] = field(default_factory=list)  # paths not valid UTF-8: invalid, as in the daemon
    seen: set[Path] = field(default_factory=set)

    def add(self, path: Path, link: bool) -> None:
        key = Path(os.path.realpath(path.parent)) / path.name  # one file named twice is read once
        if key not in self.seen:
            self.seen.add(key)
            if not manifest.is_utf8_name(str(path)):
                self.badnames.append(path)
            else:
                (self.links if link else self.files).append(path)

    def count(self) -> int:
        return len(self.files) + len(self.links) + len(self.badnames)


def collect(paths: list[Path], report: Report) -> _Found:
    """The manifests named by ``paths`` (directories walked); problems and warnings go to ``report``."""
    found = _Found()
    for p in paths:
        try:
            st = p.lstat()
        except OSError:
            report.problems.append(f"{p}: no such file or directory")
            continue
        if stat.S_ISLNK(st.st_mode) and not p.is_dir():
            found.add(p, link=True)  # a link to a file: a symlink manifest; a link to a directory: followed
        elif p.is_dir():
            before = found.count()
            _walk(p, found, report)
            if found.count() == before:
                report.problems.append(f"no manifest files (*{manifest.SUFFIX}) found under {p}")
        elif stat.S_ISREG(st.st_mode) and manifest.is_manifest_name(p.name):
            found.add(p, link=False)
        elif stat.S_ISREG(st.st_mode):
            report.problems.append(
                f"{p}: not a manifest: syncd reads only files whose name ends in {manifest.SUFFIX!r}"
            )
        else:
            report.problems.append(f"{p}: not a regular file")
    return found


def _walk(top: Path, found: _Found, report: Report) -> None:
    """Walk ``top`` (bounded by the tree: links are never followed) in sorted order."""
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name, reverse=True)
        except OSError as exc:
            report.problems.append(f"{d}: cannot read directory: {exc.strerror}")
            continue
        for e in entries:
            _entry(Path(e.path), e, stack, found, report)


def _entry(path: Path, e: os.DirEntry[str], stack: list[Path], found: _Found, report: Report) -> None:
    named = manifest.is_manifest_name(e.name)
    if e.is_symlink():
        if named:
            found.add(path, link=True)
    elif e.is_dir(follow_symlinks=False):
        if e.name == ".git":
            return
        if (path / ".git").exists():
            report.warnings.append(
                f"{path}: is a git submodule or another repository; syncd does not read its manifests"
            )
            return
        stack.append(path)
    elif named and e.is_file(follow_symlinks=False):
        found.add(path, link=False)
    elif named:
        report.problems.append(f"{path}: not a regular file")
    elif e.name.lower().endswith(manifest.SUFFIX):
        report.warnings.append(
            f"{path}: ends in {e.name[-len(manifest.SUFFIX) :]!r}, not {manifest.SUFFIX!r}: syncd ignores it"
        )


def _read(path: Path) -> bytes | str:
    """A manifest's bytes, or a problem line (unreadable; over the size limit, without reading it all)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(manifest.MAX_BYTES + 1)
            if len(data) > manifest.MAX_BYTES:
                return manifest.size_problem(str(path), os.fstat(fh.fileno()).st_size)
    except OSError as exc:
        return f"{path}: cannot read: {exc.strerror}"
    return data


def validate(
    paths: list[Path],
    base: str | None = None,
    signatures: tuple[str, Path] | None = None,
    remote: Storage | None = None,
) -> Report:
    """Validate ``paths`` as the daemon would; return what was found. ``signatures`` (mode, trust file):
    also check that the commit checked out (``HEAD``, the merge result in CI) carries a signature the
    daemon would accept. ``remote``: also ask Artifactory whether each new or changed asset (all of
    them without ``base``) matches what it holds (:mod:`syncd.remote`)."""
    report = Report()
    if signatures is not None and paths:
        report.problems += _signature(paths[0], *signatures, report)
    found = collect(paths, report)
    report.files = found.count()
    report.problems += [manifest.name_problem(manifest.escape_name(str(p))) for p in sorted(found.badnames)]
    report.problems += [manifest.symlink_problem(str(p)) for p in sorted(found.links)]
    assets: list[Asset] = []
    lines: dict[str, list[dict[str, int]]] = {}
    for f in sorted(found.files):
        data = _read(f)
        if isinstance(data, str):
            report.problems.append(data)
            continue
        try:
            parsed = manifest.parse(str(f), data)
        except ManifestError as exc:
            report.problems += exc.problems
            continue
        assets += parsed
        tables = manifest.field_lines(data)
        if len(tables) == len(parsed):
            lines[str(f)] = tables
    for dest, claims in manifest.conflicts(assets).items():
        report.problems += manifest.conflict_problems(dest, claims)
    for group in manifest.lookalikes(assets):
        report.warnings += manifest.lookalike_warnings(group)
    report.warnings += [f"{a.where()}.dest: {w}" for a in assets if (w := manifest.dest_warning(a.dest))]
    before = None
    if base is not None:
        before, problems = _at_base(paths, base)
        report.problems += problems + _immutability(base, before, assets)
    if remote is not None:
        from syncd import remote as remote_check

        asked = remote_check.changed(assets, before)
        report.remote_checked = len(asked)
        report.problems += remote_check.check(asked, lines, remote)
    return report


def _at_base(paths: list[Path], base: str) -> tuple[dict[str, Asset], list[str]]:
    """The assets of the manifests under ``paths`` at revision ``base`` (by dest), and read problems."""
    before: dict[str, Asset] = {}
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
                    before[a.dest] = a
            except ManifestError:
                continue  # an invalid file at the base published nothing
    return before, problems


def _immutability(base: str, before: dict[str, Asset], assets: list[Asset]) -> list[str]:
    problems: list[str] = []
    for a in assets:
        was = before.get(a.dest)
        old = was.sha256 if was is not None else None
        if old is not None and old != a.sha256 and not a.replace:
            problems.append(
                f"{a.where()}.sha256: dest {a.dest!r} has sha256 {old} at {base}; changing a "
                "published file breaks readers (ESTALE) and is refused unless the asset says "
                "replace = true"
            )
    return problems


def _signature(path: Path, mode: str, trust_file: Path, report: Report) -> list[str]:
    from syncd.signatures import Verifier

    try:
        commit, author, sig, payload, when = gitsource.signed_head(path)
    except GitError as exc:
        return [f"{path}: {exc}"]
    verdict = Verifier(mode, trust_file).verify(sig, payload or b"", when)
    if verdict.ok:
        report.signed = f"commit {commit[:12]} signed by {verdict.signer} ({verdict.key})"
        return []
    return [
        f"commit {commit[:12]} by {author}: signature refused ({verdict.status}): {verdict.reason}; "
        "the daemon would not serve it (it keeps the last verified commit, if there is one)"
    ]
