"""The manifest repository: a persistent bare clone kept up to date with pygit2 (libgit2).

The only module that imports pygit2; every pygit2 error leaves it as :class:`~syncd.errors.GitError`.

- The clone lives at ``<state>/repo.git``. It is created once (into a temporary directory, then renamed into
  place, so a crash never leaves a half-made clone at that path) and only fetched afterwards.
- Only the configured branch is fetched, into ``refs/remotes/origin/<branch>``.
- SSH host keys are checked against the configured ``known_hosts``: libgit2 reads
  ``<homedir>/.ssh/known_hosts``, so syncd points ``pygit2.settings.homedir`` at a private directory in the
  state directory holding a copy of that file, and its certificate callback returns libgit2's verdict
  (returning ``True`` would accept any key).
- HTTPS certificates are verified against the system trust store (OpenSSL's default CA file and
  directory, ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` honoured), the same store as Artifactory's
  (:func:`_trust_system_store`); an untrusted certificate fails the fetch in syncd's words.
- The credentials callback answers once; a second call means the credential was rejected, and the fetch
  fails instead of looping. It answers only for the scheme, host and port of ``[source] url``: a server
  that redirects elsewhere (libgit2 follows the first request's redirect) never receives the token or key.
- Every libgit2 fetch (the first clone's too) runs on its own daemon thread with its own ``Repository``
  object, and the pass waits for it with deadlines: no sign of progress (any callback) for one
  ``[download] timeout``, or :data:`FETCH_LIMIT_FACTOR` timeouts in all, or the stop event set, and the
  pass gets a :class:`GitError` at once. libgit2's own timeout is per read, so a server that drips its
  answer (one header line every few seconds) would hold a fetch forever. The abandoned thread is left to
  end with its connection (its callbacks abort at their next call); while it lives no other fetch starts
  on that clone (two libgit2 fetches into one clone at once could corrupt it). Reads go through the pass
  thread's own ``Repository`` object, which libgit2 allows beside another writer.
- Messages are syncd's own: libgit2's text is mapped to a fixed phrase, or kept escaped and bounded with
  every URL in it stripped of userinfo and query (see :func:`_reason`); a URL is shown by :func:`_safe`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pygit2
from pygit2.enums import CredentialType, FetchPrune

from syncd import logs, manifest
from syncd.config import GitSource, origin
from syncd.errors import GitError, ManifestError

log = logs.get()

MANIFEST_SUFFIX = manifest.SUFFIX
# A manifest's entry id is its blob id, or this prefix and the blob id when git records a symbolic link
# (mode 120000): the daemon reads what git stores, and a link's blob is the link text, not its target.
SYMLINK_ID = "symlink:"
# A manifest whose path is not valid UTF-8 is listed under its escaped path (manifest.escape_name) with
# this prefix on its entry id, and read as invalid: the ledger, JSON logs and people need a UTF-8 name.
BADNAME_ID = "badname:"
_GIT_SYMLINK = 0o120000
_GIT_FILE_TYPE = 0o170000
_GIT_REGULAR = 0o100000  # 100644 and 100755 (executable) alike


@dataclass(frozen=True)
class Change:
    """What changed among the manifest files between two commits."""

    changed: frozenset[str]  # added or modified manifest paths
    deleted: frozenset[str]


class _Callbacks(pygit2.RemoteCallbacks):
    def __init__(self, source: GitSource) -> None:
        super().__init__()
        self.source = source
        self.attempts = 0

    def credentials(self, url: str, username_from_url: str | None, allowed_types: Any) -> Any:
        """The key or token for a request to ``url``; raises :class:`GitError` when ``url`` is not on
        ``[source] url``'s origin (a redirect), on a second call (rejected) or when none is configured."""
        src = self.source
        want = origin(src.url)
        if want is None or origin(url) != want:
            raise GitError(
                f"git server {_safe(src.url)} sent syncd on to {_safe(url)}; credentials go only to "
                f"the scheme, host and port of [source] url, so none were sent"
            )
        self.attempts += 1
        if self.attempts > 1:
            raise GitError(f"git server {_safe(url)} rejected syncd's credentials")
        if allowed_types & CredentialType.SSH_KEY and src.ssh_key is not None:
            pub = Path(f"{src.ssh_key}.pub")
            user = username_from_url or src.username or "git"
            return pygit2.Keypair(user, pub if pub.is_file() else None, src.ssh_key, "")
        if allowed_types & CredentialType.USERPASS_PLAINTEXT and src.token is not None:
            return pygit2.UserPass(src.username or "syncd", src.token.reveal())
        raise GitError(f"git server {_safe(url)} asks for credentials that are not configured")

    def certificate_check(self, certificate: Any, valid: bool, host: bytes | str) -> bool:
        if not valid:
            name = _escaped(host.decode(errors="replace") if isinstance(host, bytes) else host, 200)
            if urlsplit(self.source.url).scheme.lower() == "https":
                raise GitError(
                    f"the TLS certificate of {name} is not trusted (not signed by a CA in the system trust "
                    "store, or not issued for that host); refusing to connect"
                )
            raise GitError(
                f"host key or certificate of {name} is unknown or changed "
                "(check [source] known_hosts); refusing to connect"
            )
        return True


# A fetch may take this many [download] timeouts in all, however steadily the server shows progress.
FETCH_LIMIT_FACTOR = 10
_WAIT_STEP = 0.2  # how often the pass looks at the stop event and the deadlines while a fetch runs


class _Abandoned(GitError):
    """Raised in a fetch thread's callback: the pass stopped waiting for it."""


class _FetchJob:
    """One libgit2 fetch into the clone at ``path``, on its own daemon thread and ``Repository`` object.

    In: the clone's path (made, with remote ``origin``, by the caller), the refspec, the source (for
    credentials). Out: :attr:`done` set when libgit2 returned, :attr:`error` its exception or None.
    :attr:`progress_at` is the monotonic time of the last callback (a sign the server is answering)."""

    def __init__(self, path: Path, refspec: str, source: GitSource, cleanup: bool) -> None:
        self.path = path
        self.refspec = refspec
        self.source = source
        self.cleanup = cleanup  # remove ``path`` if the job is abandoned (a first clone's temporary dir)
        self.done = threading.Event()
        self.abandoned = threading.Event()
        self.error: BaseException | None = None
        self.progress_at = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="syncd-git-fetch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def abandon(self) -> None:
        """The pass gives up on this fetch: its next callback aborts it."""
        self.abandoned.set()

    def alive(self) -> bool:
        """Whether libgit2 may still write into the clone (done is set only after the cleanup)."""
        return not self.done.is_set()

    def _run(self) -> None:
        try:
            repo = pygit2.Repository(str(self.path))
            repo.remotes["origin"].fetch(
                [self.refspec], callbacks=_Watched(self.source, self), prune=FetchPrune.NO_PRUNE
            )
            del repo
        except BaseException as exc:  # handed to the waiting pass thread, translated there
            self.error = exc
        finally:
            if self.cleanup and self.abandoned.is_set():
                shutil.rmtree(self.path, ignore_errors=True)
            self.done.set()


class _Watched(_Callbacks):
    """The source's callbacks, each also a sign of progress and a point where an abandoned fetch aborts."""

    def __init__(self, source: GitSource, job: _FetchJob) -> None:
        super().__init__(source)
        self.job = job

    def _tick(self) -> None:
        if self.job.abandoned.is_set():
            raise _Abandoned("the fetch was abandoned")
        self.job.progress_at = time.monotonic()

    def credentials(self, url: str, username_from_url: str | None, allowed_types: Any) -> Any:
        self._tick()
        return super().credentials(url, username_from_url, allowed_types)

    def certificate_check(self, certificate: Any, valid: bool, host: bytes | str) -> bool:
        self._tick()
        return super().certificate_check(certificate, valid, host)

    def sideband_progress(self, string: str) -> None:
        self._tick()

    def transfer_progress(self, stats: Any) -> None:
        self._tick()

    def update_tips(self, refname: str, old: Any, new: Any) -> None:
        self._tick()


# The fetch thread of each clone path that may still be running (at most one per clone, see _FetchJob).
_JOBS: dict[Path, _FetchJob] = {}
_JOBS_LOCK = threading.Lock()


def _busy(path: Path) -> bool:
    """Whether an abandoned fetch thread still works on the clone at ``path`` (or its temporary dir)."""
    with _JOBS_LOCK:
        return any(job.alive() for job in _JOBS.values() if job.path.parent == path.parent)


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*")
# libgit2's messages that syncd can say in its own words (the first match wins; matched lowercased).
_KNOWN_REASONS = (
    (re.compile(r"unexpected http status code: (\d{3})"), "the server answered HTTP {0}"),
    (re.compile(r"too many redirects"), "too many redirects or authentication replays"),
    (re.compile(r"cannot redirect"), "a redirect to another scheme was refused"),
    (re.compile(r"failed to resolve address"), "the host name does not resolve"),
    (re.compile(r"connection refused"), "the connection was refused"),
    (re.compile(r"timed out|timeout"), "the server did not answer in time ([download] timeout)"),
    (re.compile(r"hostkey|host key"), "the ssh host key was refused (check [source] known_hosts)"),
    (re.compile(r"certificate|ssl|tls"), "the TLS connection failed (certificate or handshake)"),
    (re.compile(r"authentication|unauthorized"), "authentication failed"),
    (re.compile(r"failed to resolve path|not a git repository|repository not found"), "no repository there"),
    (re.compile(r"early eof|unexpected eof|connection reset|broken pipe"), "the connection was cut"),
)
_MAX_DETAIL = 160


def _safe(url: str) -> str:
    """``url`` fit for a message: scheme, host, port and path only (no userinfo, query or fragment),
    non-ASCII and control characters escaped, at most 200 characters."""
    try:
        p = urlsplit(url)
        host, port = p.hostname or "", p.port
    except ValueError:
        return "(an unparsable URL)"
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{port}" if port else "")
    return _escaped(urlunsplit((p.scheme, netloc, p.path, "", "")), 200)


def _escaped(text: str, limit: int) -> str:
    """``text`` with anything but printable ASCII escaped (no line can be forged), cut to ``limit``."""
    shown = text.encode("ascii", "backslashreplace").decode("ascii")
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in shown)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _reason(exc: BaseException) -> str:
    """Why a pygit2 call failed, in syncd's words: a fixed phrase for libgit2's known failures, else its
    text with every URL reduced by :func:`_safe`, escaped and bounded (never a header or credential)."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    if isinstance(exc, KeyError):
        return "not found"
    text = str(exc)
    lowered = text.lower()
    for pattern, phrase in _KNOWN_REASONS:
        m = pattern.search(lowered)
        if m:
            return phrase.format(*m.groups())
    if "authorization" in lowered or "bearer" in lowered:
        return f"libgit2 {type(exc).__name__} (its text may quote a credential: not shown)"
    detail = _URL_IN_TEXT.sub(lambda m: _safe(m.group(0)), text)
    return f"libgit2: {_escaped(detail, _MAX_DETAIL)}"


def _trust_system_store() -> None:
    """Point libgit2's OpenSSL at the system trust store, the locations :func:`syncd.fetch.trust_context`
    uses for Artifactory: OpenSSL's default CA file and directory as Python's ``ssl`` module reports them
    (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` honoured).

    The pygit2 wheel bundles its own OpenSSL, whose compiled-in defaults name its build directory
    (``/project/ci/ssl/cert.pem``), not the system's. pygit2 sets these same locations once at import;
    syncd sets them again before each HTTPS fetch rather than rest on that import-time detail (libgit2
    adds what it loads to its store and never drops any of it before a restart). Process-wide."""
    paths = ssl.get_default_verify_paths()
    if paths.cafile is None and paths.capath is None:
        raise GitError(
            "no system trust store for TLS: OpenSSL's default CA file and directory do not exist "
            "(install ca-certificates, or set SSL_CERT_FILE)"
        )
    try:
        pygit2.settings.set_ssl_cert_locations(paths.cafile, paths.capath)
    except pygit2.GitError:
        where = " and ".join(_escaped(str(p), 200) for p in (paths.cafile, paths.capath) if p)
        raise GitError(f"cannot load the system trust store for TLS from {where}") from None


class ManifestRepo:
    """The bare clone of the manifest repository and the reads syncd needs from it."""

    def __init__(self, source: GitSource, state_dir: Path, timeout: float) -> None:
        self.source = source
        self.path = state_dir / "repo.git"
        self.home = state_dir / "ssh-home"
        self.timeout = timeout
        self.timeout_ms = int(timeout * 1000)
        self._listing: tuple[str, dict[str, str]] | None = None  # see _listed
        self._blobs: dict[tuple[str, str], str | None] = {}  # (commit, path) -> blob: see _blob_of
        self._repo: pygit2.Repository | None = None
        self._stop: threading.Event | None = None

    @property
    def ref(self) -> str:
        return f"refs/remotes/origin/{self.source.branch}"

    def fetch(self, stop: threading.Event | None = None) -> str:
        """Create or update the bare clone; return the branch head's commit id (hex).

        A clone that cannot be opened, fetched into or read (killed mid-write, corrupted on disk) is moved
        aside and cloned again; the export is not touched. Network, authentication and host-key failures
        raise :class:`GitError` without touching the clone, and so do a server that shows no progress
        for one timeout (or takes :data:`FETCH_LIMIT_FACTOR` timeouts in all), ``stop`` being set (within
        about :data:`_WAIT_STEP` s), and a previous, abandoned fetch still running.
        """
        self._stop = stop
        if _busy(self.path):
            raise GitError(
                f"the previous fetch from {_safe(self.source.url)} has not finished (the server never "
                "completed its answer); not starting another one"
            )
        self._prepare_ssh()
        if urlsplit(self.source.url).scheme.lower() == "https":
            _trust_system_store()
        pygit2.settings.server_connect_timeout = self.timeout_ms
        pygit2.settings.server_timeout = self.timeout_ms
        try:
            return self._fetch_once()
        except _Damaged as exc:
            self._set_aside(str(exc))
            return self._fetch_once()

    def _fetch_once(self) -> str:
        repo = self._open_or_create()
        try:
            remote = repo.remotes["origin"]
            if remote.url != self.source.url:
                repo.remotes.set_url("origin", self.source.url)
                remote = repo.remotes["origin"]
        except (pygit2.GitError, KeyError, ValueError) as exc:
            raise _Damaged(f"remote 'origin' unreadable: {_reason(exc)}") from None
        refspec = f"+refs/heads/{self.source.branch}:{self.ref}"
        try:
            self._fetch_in_thread(self.path, refspec, cleanup=False)
        except GitError:
            raise
        except (pygit2.GitError, OSError, KeyError, ValueError) as exc:
            problem = self._damage()
            if problem:
                raise _Damaged(f"fetch failed ({_reason(exc)}) and {problem}") from None
            raise GitError(f"fetch from {_safe(self.source.url)} failed: {_reason(exc)}") from None
        try:
            head = str(repo.references[self.ref].resolve().target)
        except KeyError:
            raise GitError(
                f"branch {self.source.branch!r} does not exist in {_safe(self.source.url)}"
            ) from None
        except (pygit2.GitError, ValueError) as exc:
            raise _Damaged(f"{self.ref} unreadable: {_reason(exc)}") from None
        problem = self._damage(head)
        if problem:
            raise _Damaged(problem)
        return head

    def _fetch_in_thread(self, path: Path, refspec: str, *, cleanup: bool) -> None:
        """Run one libgit2 fetch into the clone at ``path`` on a :class:`_FetchJob` and wait for it.

        Raises what libgit2 raised, or :class:`GitError` when the pass stops waiting (stop event, no
        progress for one timeout, the overall limit); the thread is then abandoned, never joined."""
        job = _FetchJob(path, refspec, self.source, cleanup)
        with _JOBS_LOCK:
            _JOBS[self.path] = job
        job.start()
        started = time.monotonic()
        limit = self.timeout * FETCH_LIMIT_FACTOR
        while not job.done.wait(_WAIT_STEP):
            now = time.monotonic()
            why = ""
            if self._stop is not None and self._stop.is_set():
                why = "was still answering when syncd stopped"
            elif now - job.progress_at > self.timeout:
                why = f"sent no complete answer within {self.timeout:g} s ([download] timeout)"
            elif now - started > limit:
                why = f"did not finish the fetch within {limit:g} s ({FETCH_LIMIT_FACTOR} x the timeout)"
            if why:
                job.abandon()
                raise GitError(f"git server {_safe(self.source.url)} {why}; fetch abandoned")
        if job.error is not None:
            raise job.error

    def _damage(self, head: str | None = None) -> str:
        """Why the clone is unusable, or "" when it can be read (``head``'s commit and tree included)."""
        repo = self._repo
        if repo is None:
            return ""
        try:
            if head is None:
                ref = repo.references.get(self.ref)
                if ref is None:
                    return ""
                head = str(ref.resolve().target)
            list_manifests(repo[head].peel(pygit2.Commit).tree, self.source.path)
        except (pygit2.GitError, KeyError, ValueError, OSError) as exc:
            return f"the clone cannot be read ({_reason(exc)})"
        return ""

    def _set_aside(self, why: str) -> None:
        """Move a damaged clone out of the way (kept for a post-mortem) so the next open clones anew."""
        self._repo = None
        aside = self.path.with_name(f"repo.git.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
        for old in sorted(self.path.parent.glob("repo.git.damaged-*"))[:-1]:
            shutil.rmtree(old, ignore_errors=True)  # keep only the latest post-mortem copy
        os.rename(self.path, aside)
        log.error("git_clone_repaired", error=why, moved_to=str(aside), action="cloning again")

    def last_fetched(self) -> str:
        """The branch head as last fetched, without fetching or repairing anything (read-only: for a dry
        run beside a running daemon, which owns the clone)."""
        if self._repo is None:
            try:
                self._repo = pygit2.Repository(str(self.path))
            except (pygit2.GitError, ValueError) as exc:
                raise GitError(f"no usable clone at {self.path} yet: {_reason(exc)}") from None
        try:
            return str(self._repo.references[self.ref].resolve().target)
        except (KeyError, pygit2.GitError, ValueError) as exc:
            raise GitError(f"branch {self.source.branch!r} was never fetched: {_reason(exc)}") from None

    def _open_or_create(self) -> pygit2.Repository:
        if self._repo is not None:
            return self._repo
        if _busy(self.path):  # an abandoned fetch still writes there: read only, clean nothing
            try:
                self._repo = pygit2.Repository(str(self.path))
            except (pygit2.GitError, ValueError) as exc:
                raise GitError(f"no usable clone at {self.path} yet: {_reason(exc)}") from None
            return self._repo
        for tmp in self.path.parent.glob(".repo.git.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)  # a clone interrupted by a crash
        if self.path.exists():
            _remove_stale_locks(self.path)
            try:
                self._repo = pygit2.Repository(str(self.path))
                self._repo.references.get(self.ref)
            except (pygit2.GitError, ValueError) as exc:
                self._repo = None
                self._set_aside(f"cannot open the bare clone: {_reason(exc)}")
            else:
                return self._repo
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".repo.git.tmp-", dir=self.path.parent))
        try:
            repo = pygit2.init_repository(str(tmp), bare=True)
            repo.remotes.create("origin", self.source.url)
            del repo  # the fetch thread opens its own
            self._fetch_in_thread(tmp, f"+refs/heads/{self.source.branch}:{self.ref}", cleanup=True)
            os.rename(tmp, self.path)
        except GitError:
            if not _busy(self.path):  # else the abandoned thread removes it when it ends
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        except (pygit2.GitError, OSError, KeyError, ValueError) as exc:
            if not _busy(self.path):
                shutil.rmtree(tmp, ignore_errors=True)
            raise GitError(f"clone of {_safe(self.source.url)} failed: {_reason(exc)}") from None
        self._repo = pygit2.Repository(str(self.path))
        return self._repo

    def _prepare_ssh(self) -> None:
        if self.source.known_hosts is None:
            return
        ssh_dir = self.home / ".ssh"
        ssh_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            data = self.source.known_hosts.read_bytes()
        except OSError as exc:
            raise GitError(f"cannot read known_hosts {self.source.known_hosts}: {exc.strerror}") from None
        target = ssh_dir / "known_hosts"
        tmp = ssh_dir / "known_hosts.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, target)
        # libgit2 looks for known_hosts under this home directory; the setting is process-wide.
        pygit2.settings.homedir = str(self.home)

    def _commit(self, commit_id: str) -> pygit2.Commit:
        repo = self._open_or_create()
        try:
            obj = repo[commit_id]
            return obj.peel(pygit2.Commit)
        except (KeyError, ValueError, pygit2.GitError) as exc:
            raise GitError(f"commit {commit_id} is not in the clone: {exc}") from None

    def has_commit(self, commit_id: str) -> bool:
        """Whether ``commit_id`` exists in the clone."""
        try:
            self._commit(commit_id)
        except GitError:
            return False
        return True

    def is_ancestor(self, old: str, new: str) -> bool:
        """Whether ``old`` is ``new`` or one of its ancestors (a fast-forward)."""
        if old == new:
            return True
        repo = self._open_or_create()
        return bool(repo.descendant_of(new, old))

    def has_directory(self, commit_id: str, path: str) -> bool:
        """Whether ``path`` is a directory at ``commit_id`` (the root ``""`` always is)."""
        if not path:
            return True
        try:
            return bool(self._commit(commit_id).tree[path].type_str == "tree")
        except KeyError:
            return False

    def manifests(self, commit_id: str) -> dict[str, str]:
        """Every manifest file at ``commit_id``: path → blob id."""
        return list_manifests(self._commit(commit_id).tree, self.source.path)

    def _listed(self, commit_id: str) -> dict[str, str]:
        """:meth:`manifests`, kept for the last commit asked (:meth:`blob_id` of escaped paths)."""
        if self._listing is None or self._listing[0] != commit_id:
            self._listing = (commit_id, self.manifests(commit_id))
        return self._listing[1]

    def changes(self, old: str, new: str) -> Change:
        """Manifest files added, modified or deleted from ``old`` to ``new`` (a tree diff)."""
        diff = self._commit(old).tree.diff_to_tree(self._commit(new).tree)
        changed: set[str] = set()
        deleted: set[str] = set()
        for delta in diff.deltas:
            old, new = delta.old_file.path, delta.new_file.path
            gone = delta.status == pygit2.enums.DeltaStatus.DELETED
            was = _is_manifest(old, self.source.path, delta.old_file.mode)
            now = not gone and _is_manifest(new, self.source.path, delta.new_file.mode)
            if now:
                changed.add(manifest.escape_name(new))
            if was and not (now and old == new):  # deleted, renamed, or now a submodule
                deleted.add(manifest.escape_name(old))
        return Change(frozenset(changed), frozenset(deleted - changed))

    def blob_id(self, commit_id: str, path: str) -> str:
        """The entry id of manifest ``path`` (as :meth:`changes` names it) at ``commit_id`` (see
        :data:`SYMLINK_ID`, :data:`BADNAME_ID`)."""
        try:
            entry = self._commit(commit_id).tree[path]
        except KeyError:
            listed = self._listed(commit_id).get(path)  # an escaped non-UTF-8 path: not a tree key
            if listed is None or not listed.startswith(BADNAME_ID):
                raise GitError(f"{path} does not exist at {commit_id[:12]}") from None
            return listed
        found = _entry_id(entry.id, entry.filemode)
        if found is None:
            raise GitError(f"{path} at {commit_id[:12]} is not a file")
        return found

    def read_manifest(self, path: str, entry_id: str) -> bytes:
        """The bytes of manifest ``path`` from its entry id (from :meth:`manifests` or :meth:`blob_id`).

        Raises :class:`ManifestError` for a symbolic link or a blob over :data:`manifest.MAX_BYTES` (the
        problems ``syncd validate`` reports; the big blob is not read into memory), :class:`GitError` if
        the blob cannot be read."""
        if entry_id.startswith(BADNAME_ID):
            raise ManifestError(path, [manifest.name_problem(path)])
        if entry_id.startswith(SYMLINK_ID):
            raise ManifestError(path, [manifest.symlink_problem(path)])
        try:
            _, size = self._open_or_create().odb.read_header(entry_id)
        except (KeyError, ValueError, pygit2.GitError) as exc:
            raise GitError(f"cannot read blob {entry_id} ({type(exc).__name__})") from None
        if size > manifest.MAX_BYTES:
            raise ManifestError(path, [manifest.size_problem(path, size)])
        return self.read(entry_id)

    def read(self, blob_id: str) -> bytes:
        """The content of a blob."""
        try:
            return bytes(self._open_or_create()[blob_id].read_raw())
        except (KeyError, ValueError, pygit2.GitError) as exc:
            raise GitError(f"cannot read blob {blob_id}: {exc}") from None

    # provenance -----------------------------------------------------------------------------------
    def commit_info(self, commit_id: str) -> CommitInfo:
        """Who made ``commit_id`` and when (author and committer), and its message (at most 4 KiB)."""
        c = self._commit(commit_id)
        message = _text(c.raw_message[:4096])
        return CommitInfo(
            commit=str(c.id),
            author_name=_text(c.author.raw_name),
            author_email=_text(c.author.raw_email),
            authored_at=_when(c.author),
            summary=message.split("\n", 1)[0][:200],
            committer_name=_text(c.committer.raw_name),
            committer_email=_text(c.committer.raw_email),
            committed_at=_when(c.committer),
            message=message,
            parents=len(c.parents),
        )

    def signed_parts(self, commit_id: str) -> tuple[bytes | None, bytes | None, int]:
        """``commit_id``'s signature, the bytes it signs, and the committer's unix time (what git's
        verification judges ``valid-after``/``valid-before`` at); ``(None, None, t)`` if unsigned."""
        c = self._commit(commit_id)
        try:
            signature, payload = c.gpg_signature
        except (ValueError, pygit2.GitError) as exc:
            raise GitError(f"cannot read the signature of commit {commit_id[:12]}: {_reason(exc)}") from None
        return signature, payload, int(c.commit_time)

    def merged_by(self, head: str, commit_id: str, limit: int = 5000) -> str:
        """The commit on ``head``'s first-parent chain that brought ``commit_id`` into the branch: the
        oldest one on that chain that ``commit_id`` is reachable from (``commit_id`` itself when it was
        committed straight onto the branch). At most ``limit`` steps back (then the last reached)."""
        repo = self._open_or_create()
        target = self._commit(commit_id).id
        current = self._commit(head)
        for _ in range(limit):
            if current.id == target or not current.parents:
                break
            parent = current.parents[0]
            if parent.id != target and not repo.descendant_of(parent.id, target):
                break
            current = parent
        return str(current.id)

    def introduced(self, head: str, path: str, holds: Callable[[str], bool], limit: int = 5000) -> str:
        """The commit that introduced what ``holds`` finds in file ``path`` at ``head``: from ``head``,
        step to a parent whose ``path`` still holds it (the same blob, or ``holds(blob id)``), on any parent
        path; the commit where no parent does is the one. Through a merge this follows the branch that
        brought the change, so a pull request's own commit is found, not its merge. At most ``limit``
        steps (then the oldest commit reached); raises :class:`GitError` when ``head`` cannot be read."""
        current = self._commit(head)
        seen: dict[str, bool] = {}
        for _ in range(limit):
            blob = self._blob_of(current, path)
            step = None
            for parent in current.parents:
                pblob = self._blob_of(parent, path)
                if pblob is None:
                    continue
                if pblob != blob and pblob not in seen:
                    seen[pblob] = holds(pblob)
                if pblob == blob or seen[pblob]:
                    step = parent
                    break
            if step is None:
                break
            current = step
        return str(current.id)

    def _blob_of(self, commit: Any, path: str) -> str | None:
        """:func:`_blob_at`, memoized (a commit's tree never changes): a pass traces every asset of a
        manifest through the same commits, and a tree lookup by path is the cost of each step."""
        key = (str(commit.id), path)
        if key not in self._blobs:
            if len(self._blobs) >= 200_000:
                self._blobs.clear()
            self._blobs[key] = _blob_at(commit, path)
        return self._blobs[key]


@dataclass(frozen=True)
class CommitInfo:
    """A commit's author (name, e-mail, date) and first message line, as git records them."""

    commit: str
    author_name: str
    author_email: str
    authored_at: str
    summary: str
    committer_name: str = ""
    committer_email: str = ""
    committed_at: str = ""
    message: str = ""
    parents: int = 1


def _when(sig: Any) -> str:
    return datetime.fromtimestamp(sig.time, timezone(timedelta(minutes=sig.offset))).isoformat(
        timespec="seconds"
    )


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _blob_at(commit: Any, path: str) -> str | None:
    try:
        entry = commit.tree[path]
    except (KeyError, ValueError):
        return None
    return str(entry.id) if entry.type_str == "blob" else None


class _Damaged(Exception):
    """The bare clone is unusable and must be cloned again."""


def _remove_stale_locks(path: Path) -> None:
    """Delete ``*.lock`` files left by a process killed mid-write (syncd holds the state lock, so no
    other writer can own them); libgit2 refuses to update a ref or config while its lock file exists."""
    for lock in path.rglob("*.lock"):
        with contextlib.suppress(OSError):
            lock.unlink()
            log.warning("git_stale_lock_removed", file=str(lock))


def _entry_id(oid: Any, mode: int) -> str | None:
    """A tree entry's manifest entry id: the blob id, tagged for a symbolic link; None for anything
    that is not a file (a tree, a submodule's commit)."""
    if mode == _GIT_SYMLINK:
        return SYMLINK_ID + str(oid)
    if mode & _GIT_FILE_TYPE == _GIT_REGULAR:
        return str(oid)
    return None


def _is_manifest(path: str, prefix: str, mode: int) -> bool:
    """Whether a path in a diff is a manifest: the same rule as :func:`list_manifests`."""
    if not manifest.is_manifest_name(path) or _entry_id("", mode) is None:
        return False
    return not prefix or path.startswith(prefix + "/")


def list_manifests(tree: Any, prefix: str) -> dict[str, str]:
    """Walk ``tree`` under ``prefix``; return every manifest as path → entry id.

    A manifest is a file (mode 100644 or 100755) or a symbolic link (120000, listed so that it is
    reported invalid, see :data:`SYMLINK_ID`) whose name ends in exactly ``.toml``. Directories are
    walked whatever their name; submodules are skipped (their files are not in this repository).
    ``syncd validate`` applies the same rule to a work tree (:mod:`syncd.validate`). A path that is not
    valid UTF-8 (the file's or a directory's name) is listed escaped, its id tagged :data:`BADNAME_ID`;
    should its escaped form equal a real manifest's path, the real one is listed."""
    found: dict[str, str] = {}
    if prefix:
        try:
            entry = tree[prefix]
        except KeyError:
            return found
        if entry.type_str != "tree":
            return found
        tree = entry
    stack: list[tuple[str, Any]] = [(prefix, tree)]
    while stack:
        base, t = stack.pop()
        for e in t:
            path = f"{base}/{e.name}" if base else e.name
            if e.type_str == "tree":
                stack.append((path, e))
            elif manifest.is_manifest_name(e.name):
                entry_id = _entry_id(e.id, e.filemode)
                if entry_id is None:
                    continue
                if manifest.is_utf8_name(path):
                    found[path] = entry_id
                else:
                    found.setdefault(manifest.escape_name(path), BADNAME_ID + entry_id)
    return found


def read_at_revision(path: Path, rev: str) -> tuple[Path, dict[str, bytes]]:
    """For ``syncd validate --base``: the git work tree containing ``path`` and every ``*.toml``
    file at ``rev`` under ``path`` (relative to that work tree), as repo-relative path → bytes."""
    try:
        found = pygit2.discover_repository(str(path))
        if found is None:
            raise GitError(f"{path} is not inside a git repository (needed for --base)")
        repo = pygit2.Repository(found)
        commit = repo.revparse_single(rev).peel(pygit2.Commit)
    except (KeyError, ValueError, pygit2.GitError) as exc:
        raise GitError(f"cannot resolve --base {rev!r}: {exc}") from None
    if repo.workdir is None:
        raise GitError(f"{found} is a bare repository; run validate in a checkout")
    workdir = Path(repo.workdir).resolve()
    try:
        rel = path.resolve().relative_to(workdir).as_posix()
    except ValueError:
        raise GitError(f"{path} is outside the work tree {workdir}") from None
    rel = "" if rel == "." else rel
    try:
        entry = commit.tree[rel] if rel else None
    except KeyError:
        return workdir, {}
    if entry is not None and entry.type_str != "tree":
        blobs = {rel: _entry_id(entry.id, entry.filemode)} if manifest.is_manifest_name(rel) else {}
    else:
        blobs = dict(list_manifests(commit.tree, rel))
    # A symbolic link or an oversized file at the base was an invalid manifest there: it published nothing.
    return workdir, {
        p: bytes(repo[b].read_raw())
        for p, b in blobs.items()
        if b
        and not b.startswith((SYMLINK_ID, BADNAME_ID))
        and repo.odb.read_header(b)[1] <= manifest.MAX_BYTES
    }


def signed_head(path: Path, rev: str = "HEAD") -> tuple[str, str, bytes | None, bytes | None, int]:
    """For ``syncd validate --verify-signatures``: in the git repository containing ``path``, the commit
    at ``rev``, its author, its signature and signed bytes, and its committer time."""
    try:
        found = pygit2.discover_repository(str(path))
        if found is None:
            raise GitError(f"{path} is not inside a git repository (needed for --verify-signatures)")
        commit = pygit2.Repository(found).revparse_single(rev).peel(pygit2.Commit)
        signature, payload = commit.gpg_signature
    except (KeyError, ValueError, pygit2.GitError) as exc:
        raise GitError(f"cannot read commit {rev!r} for --verify-signatures: {_reason(exc)}") from None
    author = f"{_text(commit.author.raw_name)} <{_text(commit.author.raw_email)}>"
    return str(commit.id), author, signature, payload, int(commit.commit_time)
