"""What Artifactory says about a path: its storage API, read through :class:`~syncd.fetch.Fetcher`.

``GET {base}/api/storage/{repo}/{path}`` answers, for a file, ``size`` (a string of digits) and
``checksums.sha256`` (absent for a file Artifactory never computed it for); for a folder, ``children``.
``GET …?list&deep=1`` lists every file below a folder (``files[].uri`` relative to it, ``folder``), with
sha1 only, so each file's sha256 is asked for on its own. A plain HTTP server has no storage API: a 404
there is told apart from a missing file by asking for the file's first byte (:meth:`Storage.exists`).

Used by ``syncd manifest new`` and ``syncd validate --remote``; what a hostile server sends is checked
here (a size that is not digits, a sha256 that is not 64 hex digits, a listed path with ``..``) and turned
into a :class:`~syncd.errors.FetchError` that names the path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from syncd.errors import FetchError
from syncd.fetch import Fetcher

API = "api/storage"
WORKERS = 8  # storage API requests in flight at once (manifest new, validate --remote)
_SHA256 = re.compile(r"[0-9a-fA-F]{64}", re.ASCII)
_DIGITS = re.compile(r"[0-9]{1,20}", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Info:
    """One path as Artifactory's storage API describes it. ``sha256`` is None when Artifactory does not
    know it; ``folder`` paths have no size."""

    source: str
    folder: bool = False
    size: int = 0
    sha256: str | None = None


class Storage:
    """Artifactory's storage API on one :class:`Fetcher` (its origin, credential and time bounds)."""

    def __init__(self, fetcher: Fetcher) -> None:
        self.fetcher = fetcher

    def info(self, source: str) -> Info | None:
        """What the storage API says about ``source`` (a path under the base URL: ``repo/dir/file``), or
        None when it answers 404 (no such path, or no storage API at all). Raises :class:`FetchError`."""
        data = self.fetcher.api_json(f"{API}/{source.strip('/')}")
        if data is None:
            return None
        try:
            return parse_info(source, data)
        except FetchError as exc:
            self.fetcher.scrub(exc)  # the answer is the server's text: it may echo the token
            raise

    def listing(self, folder: str) -> list[str] | None:
        """Every file below ``folder``, as sources (``folder/sub/file``), sorted; None on a 404. Raises
        :class:`FetchError` for an answer that is not a listing, or an entry that is not a plain relative
        path."""
        folder = folder.strip("/")
        data = self.fetcher.api_json(f"{API}/{folder}", "list&deep=1&listFolders=0")
        if data is None:
            return None
        try:
            return parse_listing(folder, data)
        except FetchError as exc:
            self.fetcher.scrub(exc)
            raise

    def exists(self, source: str) -> bool:
        """Whether ``source`` can be downloaded (asked after the storage API answered 404, to tell "no
        such file" from "no storage API here")."""
        return self.fetcher.exists(source)


def parse_info(source: str, data: Any) -> Info:
    """A storage API answer for ``source`` → :class:`Info`; raises :class:`FetchError` for one that is
    not the shape JFrog documents."""
    if not isinstance(data, dict):
        raise _bad(source, "is not a JSON object")
    if "children" in data:
        if "size" in data or "checksums" in data:
            raise _bad(source, "describes both a folder (children) and a file (size, checksums)")
        return Info(source, folder=True)
    size = data.get("size")
    if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        n = size
    elif isinstance(size, str) and _DIGITS.fullmatch(size):
        n = int(size)
    else:
        raise _bad(source, "has no size of digits")
    checksums = data.get("checksums", {})
    if not isinstance(checksums, dict):
        raise _bad(source, "has checksums that are not a JSON object")
    sha256 = checksums.get("sha256")
    if sha256 is not None and not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)):
        raise _bad(source, "has a checksums.sha256 that is not 64 hex digits")
    return Info(source, size=n, sha256=sha256.lower() if sha256 else None)


def parse_listing(folder: str, data: Any) -> list[str]:
    """A ``?list&deep=1`` answer below ``folder`` → the sources of its files, sorted."""
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list):
        raise _bad(folder, "is not a file listing (no 'files' list)")
    out = []
    for entry in files:
        uri = entry.get("uri") if isinstance(entry, dict) else None
        if not isinstance(uri, str):
            raise _bad(folder, "lists an entry without a 'uri'")
        if entry.get("folder") in (True, "true"):
            continue
        parts = uri.strip("/").split("/")
        if not uri.startswith("/") or any(p in ("", ".", "..") for p in parts) or _CONTROL.search(uri):
            raise _bad(folder, f"lists {uri[:80]!r}, which is not a plain path below the folder")
        out.append(f"{folder}/{'/'.join(parts)}")
    return sorted(set(out))


def _bad(source: str, what: str) -> FetchError:
    return FetchError(f"Artifactory's storage API answer for {source!r} {what}")
