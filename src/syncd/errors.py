"""The one exception tree of syncd.

Every error that syncd raises on purpose is a :class:`SyncdError`. Library exceptions (pygit2, httpx,
sqlite3, OSError) are translated into one of these at the module that owns the outside thing
(``raise FetchError(...) from exc``) and never leak upward. ``cli`` is the one place that turns them
into messages and exit codes::

    SyncdError
    ├── ConfigError          bad or unreadable configuration          → exit 2
    ├── ManifestError        one manifest file is invalid              (that file is skipped)
    ├── GitError             git unreachable, refused, host key wrong
    ├── FetchError           one asset could not be downloaded
    │   ├── HTTPStatusError      the server answered 4xx/5xx
    │   ├── VerifyError          size or sha256 differs from the manifest
    │   └── StopRequested        syncd is stopping; the download was interrupted
    ├── PublishError         the export refused a write, or a dest is unsafe
    │   ├── ExportMissingError   export root is missing (the mount is missing)
    │   └── ExportFullError      no space left on the export file system
    ├── LedgerError          the SQLite ledger could not be read or written
    │   └── LedgerRefusedError   newer schema, symlinked or unsafe state: exit 2
    ├── InternalError        a bug inside one asset's work or a pass (its type and frames, never its text)
    ├── LockHeldError        another syncd holds the state directory or publishes into the export
    ├── ListenError          the HTTP listener cannot bind its address (in use, not on this host)
    └── NotifyError          a mail or webhook was not accepted (never fails a pass)

Messages never contain secrets: credentials travel in headers and callbacks, never in URLs or text.
"""

from __future__ import annotations

import os
import traceback


class SyncdError(Exception):
    """Root of every error syncd raises on purpose; ``str()`` is a complete, secret-free message."""

    exit_code = 1


class ConfigError(SyncdError):
    """The configuration is invalid; ``problems`` lists every one as ``at 'path': message``."""

    exit_code = 2

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: invalid configuration:\n  " + "\n  ".join(problems))


class ManifestError(SyncdError):
    """A manifest file failed validation; ``problems`` are ready-to-print lines."""

    def __init__(self, file: str, problems: list[str]) -> None:
        self.file = file
        self.problems = problems
        super().__init__("; ".join(problems))


class GitError(SyncdError):
    """Fetching or reading the manifest repository failed."""


class FetchError(SyncdError):
    """Downloading one asset failed; ``retryable`` says whether a later attempt may succeed."""

    retryable = True

    def __init__(self, message: str, *, url: str = "") -> None:
        self.url = url
        super().__init__(message)


class HTTPStatusError(FetchError):
    """The server answered with an error status."""

    def __init__(self, message: str, *, url: str, status: int, retry_after: float | None = None) -> None:
        self.status = status
        self.retry_after = retry_after
        super().__init__(message, url=url)
        self.retryable = status >= 500 or status in (408, 429)


class VerifyError(FetchError):
    """The bytes do not match the manifest (size or sha256); they are never kept."""

    retryable = False

    def __init__(self, message: str, *, url: str = "", expected: str = "", actual: str = "") -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(message, url=url)


class StopRequested(FetchError):
    """syncd is stopping: a download was interrupted. Not the asset's fault; its partial is kept."""


class PublishError(SyncdError):
    """Writing into the export failed or was refused."""


class ExportMissingError(PublishError):
    """The export root does not exist: the NFS mount is missing. syncd never creates it."""


class ExportFullError(PublishError):
    """The export file system is full (ENOSPC): every download fails until space is freed."""


class LedgerError(SyncdError):
    """The ledger (SQLite in the state directory) failed."""


class LedgerRefusedError(LedgerError):
    """The state directory or ledger needs a person: written by a newer syncd, a symlink, or unsafe
    ownership or mode. Exit 2, so that systemd does not restart syncd in a loop."""

    exit_code = 2


class LockHeldError(SyncdError):
    """Another syncd process holds the state directory lock or the export's lock (``.syncd.lock``)."""


class ListenError(SyncdError):
    """The HTTP listener (``[http] listen``) cannot bind its address: in use, not on this host, or not
    permitted. Exit 1, so that systemd retries: the address may be freed, or configured, a moment later."""

    def __init__(self, message: str, *, address: str) -> None:
        self.address = address
        super().__init__(message)


class NotifyError(SyncdError):
    """A notification (mail, webhook) was not accepted: logged as ``notify_failed``, sent again at the
    next pass; it never fails a pass or the exit code of ``syncd sync``."""


class InternalError(SyncdError):
    """An unexpected exception inside one asset's work (a bug): that asset fails, the pass goes on."""


def error_class(exc: BaseException) -> str:
    """A short, stable name for what kind of failure ``exc`` is (never its text, a size or a time): the
    notifiers' dedup key uses it, so the same failure is announced once however its message varies."""
    if isinstance(exc, VerifyError):
        return "size_mismatch" if exc.expected.isdigit() else "checksum_mismatch"
    if isinstance(exc, HTTPStatusError):
        return f"http_{exc.status}"
    if isinstance(exc, ExportFullError):
        return "export_full"
    if isinstance(exc, InternalError):
        return "internal_error"
    if isinstance(exc, PublishError):
        return "publish_failed"
    if isinstance(exc, FetchError):
        return "download_failed"
    return type(exc).__name__


def frames(exc: BaseException) -> list[str]:
    """Where ``exc`` travelled, as ``file:line in function`` (innermost last): enough to find the bug,
    and safe to log, unlike a traceback, whose last line is the exception's text."""
    return [
        f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}"
        for f in traceback.extract_tb(exc.__traceback__)
    ]


def internal_error(exc: BaseException) -> InternalError:
    """A message of our own for ``exc``: its type and where it was raised, never its text (which can
    hold a header value, a URL with credentials or a response body)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    return InternalError(
        f"internal error: {type(exc).__name__}{where} (a bug in syncd; please report it with this "
        "line and the syncd version)"
    )
