"""``syncd manifest new``: write the manifest for uploads from what Artifactory says about them.

In: source paths under the Artifactory base URL (files, or folders with ``recursive``), an optional
``--dest`` (a path for one file, or a directory prefix ending in ``/``). Out: the text of a manifest that
:func:`syncd.manifest.parse` accepts (it is parsed before it is shown or written), one ``[[asset]]`` per
file, sorted by dest. The sha256 and size come from the storage API; a file it has no sha256 for, a
server without the API (plain HTTP) and ``hash_locally`` stream the file and hash it instead.

Dests: without ``--dest``, a file's dest is its source without the repository key (the first part:
``ml-datasets/imagenet/v2/a.tar`` → ``imagenet/v2/a.tar``). With ``--dest PREFIX/``, a file given by name
lands at ``PREFIX/<its name>`` and a file found below a folder at ``PREFIX/<its path below the folder>``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from syncd import manifest
from syncd.errors import FetchError, ManifestError, SyncdError
from syncd.progress import Progress, human
from syncd.storage import WORKERS, Info, Storage


class AuthoringError(SyncdError):
    """Some sources could not be described; ``problems`` has one line per source, nothing was written."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class Entry:
    """One file for the manifest: where it is, what it hashes to, and where it lands."""

    source: str
    sha256: str
    size: int
    dest: str
    hashed: bool = False  # streamed and hashed here, not told by the storage API


@dataclass(frozen=True)
class _Wanted:
    source: str
    top: str  # the SOURCE argument it was found under (itself for a file given by name)
    info: Info | None = None  # what the storage API said (None: hash it, unless ask)
    ask: bool = False  # ask the storage API about it first (a file found in a listing)


def dest_for(source: str, top: str, dest: str | None) -> str:
    """Where ``source`` (found under the argument ``top``) lands; ``dest`` as given to ``--dest``."""
    if dest is None:
        _, _, rest = source.partition("/")
        return rest or source
    if not dest.endswith("/"):
        return dest
    below = source[len(top) :].strip("/") if source != top else source.rsplit("/", 1)[-1]
    return dest + below


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string (JSON's escapes are TOML's; DEL is escaped too)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def render(entries: list[Entry], when: datetime | None = None) -> str:
    """The manifest text for ``entries`` (sorted by dest), with a header comment."""
    when = when or datetime.now(UTC)
    total = sum(e.size for e in entries)
    lines = [
        f"# Written by syncd manifest new on {when:%Y-%m-%d}: {len(entries)} asset(s), {human(total)}.",
        "# Review the dests, then open a pull request; CI runs syncd validate --remote.",
    ]
    for e in sorted(entries, key=lambda e: e.dest):
        lines += [
            "",
            "[[asset]]",
            f"source = {toml_string(e.source)}",
            f"sha256 = {toml_string(e.sha256)}",
            f"size = {e.size}",
            f"dest = {toml_string(e.dest)}",
        ]
    return "\n".join(lines) + "\n"


def check(name: str, text: str) -> list[str]:
    """Problems syncd validate would report for ``text`` as the manifest ``name`` (none: it is valid)."""
    try:
        assets = manifest.parse(name, text.encode("utf-8"))
    except ManifestError as exc:
        return exc.problems
    problems = []
    for dest, claims in manifest.conflicts(assets).items():
        problems += manifest.conflict_problems(dest, claims)
    return problems


def describe(
    storage: Storage,
    sources: list[str],
    *,
    dest: str | None = None,
    recursive: bool = False,
    hash_locally: bool = False,
    progress: Progress | None = None,
    workers: int = WORKERS,
) -> list[Entry]:
    """An :class:`Entry` per file named by ``sources``. Raises :class:`AuthoringError` with a line per
    source that does not exist, is a folder without ``recursive``, or could not be read; and for a
    ``dest`` without a trailing ``/`` that would name more than one file."""
    problems: list[str] = []
    wanted: list[_Wanted] = []
    with ThreadPoolExecutor(workers, thread_name_prefix="syncd-storage") as pool:
        tops = [s.strip("/") for s in sources]
        expanded = pool.map(lambda s: _expand(storage, s, recursive, hash_locally), tops)
        for top, found in zip(tops, expanded, strict=True):
            if isinstance(found, str):
                problems.append(f"{top}: {found}")
            else:
                wanted += found
        if dest is not None and not dest.endswith("/") and len(wanted) > 1:
            problems.append(
                f"--dest {dest!r} names one file, but {len(wanted)} files were found; end it with '/' to "
                "use it as a directory"
            )
        if problems:
            raise AuthoringError(problems)
        if progress is not None:
            progress.files = len(wanted)
        done = list(pool.map(lambda w: _entry(storage, w, dest, progress), wanted))
    if progress is not None:
        progress.finish()
    problems = [d for d in done if isinstance(d, str)]
    if problems:
        raise AuthoringError(problems)
    return [d for d in done if isinstance(d, Entry)]


def _expand(storage: Storage, top: str, recursive: bool, hash_locally: bool) -> list[_Wanted] | str:
    """The files ``top`` names (with what the storage API said about each), or why there are none."""
    try:
        if hash_locally and not recursive:
            return [_Wanted(top, top)]
        info = storage.info(top)
        if info is None:
            if recursive:
                return (
                    "the storage API answered 404: no such folder, or no Artifactory storage API at this "
                    "URL (--recursive needs it)"
                )
            if not storage.exists(top):
                return "no such file in Artifactory (HTTP 404)"
            return [_Wanted(top, top)]  # a plain HTTP server: hashed here
        if not info.folder:
            return [_Wanted(top, top, None if hash_locally else info)]
        if not recursive:
            return "is a folder; add --recursive to list every file below it"
        files = storage.listing(top)
        if not files:
            return "is a folder with no files below it"
        return [_Wanted(f, top, ask=not hash_locally) for f in files]
    except FetchError as exc:
        return str(exc)


def _entry(storage: Storage, w: _Wanted, dest: str | None, progress: Progress | None) -> Entry | str:
    where = dest_for(w.source, w.top, dest)
    add: Callable[[int], None] = progress.add_bytes if progress is not None else (lambda n: None)
    try:
        info = storage.info(w.source) if w.ask else w.info
        if w.ask and info is None:
            return f"{w.source}: listed below {w.top}, but the storage API answered 404 for it"
        if info is not None and info.folder:
            return f"{w.source}: listed as a file, but the storage API says it is a folder"
        if info is not None and info.sha256 is not None:
            entry = Entry(w.source, info.sha256, info.size, where)
        else:
            sha256, size = storage.fetcher.hash_remote(w.source, add)
            if info is not None and size != info.size:
                return (
                    f"{w.source}: the storage API says {info.size} bytes, but the download gave {size}; "
                    "not written (ask an Artifactory admin to check the file)"
                )
            entry = Entry(w.source, sha256, size, where, hashed=True)
    except FetchError as exc:
        return f"{w.source}: {exc}"
    if progress is not None:
        progress.file_done()
    return entry


def write_new(path: Path, text: str, *, force: bool = False) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file beside it, fsynced, then linked
    into place); an existing file is kept unless ``force``. Raises :class:`FileExistsError` or OSError."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails with EEXIST: never over a file that exists
    finally:
        if tmp.exists():
            tmp.unlink()
