"""The export: the only module that writes under ``export.root`` (with :mod:`syncd.staging`, its part
for the staging directory and the staged files).

Every ``dest`` is reached by walking its components from a descriptor of the export root with
``O_NOFOLLOW``: a symlink anywhere below the root (a parent directory or the dest itself) is refused, never
followed, so no symlink can redirect a write outside the export. The root itself may be a symlink (a mount
point chosen by ops); it is never created: a missing root means the NFS mount is missing.

**One writer per export.** :meth:`Export.open` takes an exclusive ``flock`` on ``<root>/.syncd.lock``
(opened ``O_RDWR | O_NOFOLLOW``, so that NFS, which emulates ``flock`` with POSIX locks, grants it) and
holds it until :meth:`Export.close`: a second syncd on the same export, whatever its state directory, gets
:class:`~syncd.errors.LockHeldError` before it cleans or writes anything. The staging directory is locked
the same way (``<staging>/.syncd-staging.lock``, taken after the export lock, for the whole pass): two
exports sharing one staging directory never resume or write into each other's partial files. Each lock
file gets our pid only when it holds another, so a pass that changes nothing leaves it untouched.
Top-level names starting with ``.syncd`` are reserved (no dest can be one). A dry run
(``create_staging=False``) takes no lock, opens no staging directory and creates nothing.

A file becomes visible at its ``dest`` only after its bytes were verified, fdatasynced and set to 0444,
and only by a link from the very descriptor they were written through, never replacing anything unless
the plan says ``replace`` (see :mod:`syncd.staging`); the directory is fsynced after the link (batched,
:meth:`Export.sync_dirs`). A file found in place is adopted (chmod 0444) only if it is still the file
that was hashed.

Errors leave as :class:`~syncd.errors.PublishError`; an unusable staging directory is a
:class:`~syncd.errors.ConfigError` on ``export.staging``. :meth:`Export.observe` never raises for one
dest: a directory that cannot be inspected is :attr:`State.UNREADABLE`, which plans a refusal of that
dest alone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from syncd import staging
from syncd.errors import ExportMissingError, PublishError
from syncd.staging import (
    DIR_FLAGS,
    FILE_FLAGS,
    READ_CHUNK,
    RESUME_META_EARLY,
    STAGING_MARKER,
    StagedFile,
    os_error,
    staging_name,
)

__all__ = [
    "LOCK_NAME",
    "RESUME_META_EARLY",
    "STAGING_MARKER",
    "Export",
    "Observation",
    "StagedFile",
    "State",
    "staging_name",
]

LOCK_NAME = ".syncd.lock"
QUARANTINE = ".syncd-quarantine"  # where syncd verify --repair moves bad files (top-level .syncd* is ours)


class State(Enum):
    MISSING = "missing"  # nothing at dest (parents may be missing too)
    FILE = "file"  # a regular file
    SYMLINK = "symlink"  # a symlink at dest: refused
    OTHER = "other"  # a directory, socket, …: refused
    BLOCKED = "blocked"  # a parent component is a symlink or not a directory: refused
    UNREADABLE = "unreadable"  # dest or a parent cannot be inspected (EACCES, ESTALE, EIO…): refused


@dataclass(frozen=True)
class Observation:
    """What is at a dest right now, seen without following any symlink."""

    state: State
    size: int = -1
    detail: str = ""
    identity: str = ""  # a regular file's staging.identity (inode, mtime, ctime, mode)
    mode: int = 0  # a regular file's permission bits


def _reason(exc: OSError) -> str:
    """``strerror (ENAME)`` of ``exc``: no path, no library text."""
    name = errno.errorcode.get(exc.errno or 0, "")
    text = exc.strerror or type(exc).__name__
    return f"{text} ({name})" if name else text


class Export:
    """The export root, its lock and its staging directory.

    ``open()`` then any number of ``observe``/``stage``/``publish`` calls (from several threads), then
    ``close()``. Descriptors are only held between the two."""

    def __init__(self, root: Path, staging: Path) -> None:
        self.root = root
        self.staging = staging
        self._root_fd = -1
        self._lock_fd = -1
        self._staging_fd = -1
        self._staging_lock_fd = -1
        self._lock = threading.Lock()
        self._unsynced_dirs: set[tuple[str, ...]] = set()
        self._hashed: dict[str, tuple[int, ...]] = {}  # dest → identity of the file hash_file read
        self._created: list[tuple[str, str]] = []  # (path, dev:ino) made to publish into, not yet taken

    def open(self, *, create_staging: bool = True) -> None:
        """Check the root and hold a descriptor of it; unless ``create_staging`` is False (a dry run:
        nothing is created, locked or changed), also lock the export and create or adopt staging (0700).

        Raises :class:`ExportMissingError` (no root), :class:`LockHeldError` (another syncd publishes
        into this export), :class:`ConfigError` (staging unusable), :class:`PublishError` (I/O). On every
        error path each descriptor opened so far is closed again."""
        try:
            root_st = self._open_root()
            if create_staging:
                self._take_lock()
                self._open_staging(root_st)
        except BaseException:
            self._close_fds()
            raise

    def _open_root(self) -> os.stat_result:
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            raise ExportMissingError(
                f"export root {self.root} does not exist (is the NFS export mounted?); syncd never creates it"
            ) from None
        except OSError as exc:
            raise os_error("cannot reach export root", str(self.root), exc) from None
        if not stat.S_ISDIR(st.st_mode):
            raise ExportMissingError(f"export root {self.root} is not a directory")
        try:
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            return os.fstat(self._root_fd)
        except OSError as exc:
            raise os_error("cannot open export root", str(self.root), exc) from None

    def _take_lock(self) -> None:
        """flock ``<root>/.syncd.lock`` (LOCK_EX, never blocking) with our pid in it."""
        self._lock_fd = staging.take_lock(
            self._root_fd,
            LOCK_NAME,
            f"{self.root}/{LOCK_NAME}",
            lambda holder: (
                f"another syncd is publishing into export {self.root}{holder}; "
                "one export takes one syncd (check for a second instance or config)"
            ),
        )

    def _open_staging(self, root_st: os.stat_result) -> None:
        """Open staging, then lock it for the pass: the export lock covers one export only, and two
        exports may name one staging directory (or one may use the other's default one)."""
        self._staging_fd = staging.open_staging(self.staging, self.root, root_st)
        self._staging_lock_fd = staging.lock_staging(self._staging_fd, self.staging)

    def staging_in_root(self) -> str | None:
        """The staging directory as a dest-like path (``a/b``) when it lies inside the root, else None.

        Lexical, on resolved paths; used by the plan to refuse dests at or under staging."""
        root = Path(os.path.realpath(self.root))
        staging = Path(os.path.realpath(self.staging))
        if staging == root or root not in staging.parents:
            return None
        return staging.relative_to(root).as_posix()

    def sync_dirs(self) -> None:
        """fsync every directory a rename went into since the last call, each once.

        Batching is safe: the file's bytes were fsynced before its link, so a power cut can at worst
        undo a link (the dest is missing, and the next pass downloads it again), never expose bad bytes.
        """
        with self._lock:
            dirs, self._unsynced_dirs = self._unsynced_dirs, set()
        if self._root_fd < 0:
            return
        for parts in sorted(dirs):
            try:
                with self._walk(list(parts), create=False) as fd:
                    if fd is not None:
                        os.fsync(fd)
            except (OSError, _Blocked):
                continue  # best effort: a vanished directory has nothing left to persist

    def close(self) -> None:
        """fsync what is pending, then close every descriptor (which releases the export lock)."""
        try:
            self.sync_dirs()
        finally:
            self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._staging_lock_fd, self._staging_fd, self._lock_fd, self._root_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._root_fd = self._lock_fd = self._staging_fd = self._staging_lock_fd = -1

    # reading ----------------------------------------------------------------------------------
    def observe(self, dest: str) -> Observation:
        """Look at ``dest`` without following symlinks and without creating anything. Never raises: a
        dest that cannot be inspected is :attr:`State.UNREADABLE` (its detail names only the errno)."""
        with contextlib.closing(self.observe_all([dest])) as seen:
            return next(seen)[1]

    def observe_all(self, dests: Iterable[str]) -> Generator[tuple[str, Observation], None, None]:
        """:meth:`observe` for each of ``dests``, opening a directory once for a run of dests in it (in
        sorted order, once per directory): what a pass with nothing new costs is this stat walk."""
        with contextlib.ExitStack() as stack:
            held: tuple[str, ...] | None = None
            parent: int | None = None
            failed: Observation | None = None
            for dest in dests:
                *parents, name = dest.split("/")
                if tuple(parents) != held:
                    stack.close()
                    held, parent, failed = tuple(parents), None, None
                    try:
                        parent = stack.enter_context(self._walk(parents, create=False))
                    except _Blocked as b:
                        failed = Observation(State.BLOCKED, detail=str(b))
                    except OSError as exc:
                        failed = Observation(State.UNREADABLE, detail=f"cannot inspect dest: {_reason(exc)}")
                yield dest, failed or self._observe_in(parent, name)

    @staticmethod
    def _observe_in(parent: int | None, name: str) -> Observation:
        if parent is None:
            return Observation(State.MISSING)
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return Observation(State.MISSING)
        except OSError as exc:
            return Observation(State.UNREADABLE, detail=f"cannot inspect dest: {_reason(exc)}")
        if stat.S_ISLNK(st.st_mode):
            return Observation(State.SYMLINK, detail="a symlink is at dest")
        if stat.S_ISREG(st.st_mode):
            return Observation(
                State.FILE, size=st.st_size, identity=staging.identity(st), mode=stat.S_IMODE(st.st_mode)
            )
        return Observation(State.OTHER, detail="something other than a regular file is at dest")

    @contextlib.contextmanager
    def _open_dest(self, dest: str, gone: str) -> Iterator[int]:
        """A read-only descriptor of the regular file at ``dest`` (no symlink followed, no FIFO opened
        for long). Raises :class:`PublishError` (``gone`` when it is missing) or OSError."""
        *parents, name = dest.split("/")
        try:
            with self._walk(parents, create=False) as parent:
                if parent is None:
                    raise PublishError(f"{dest} {gone}")
                try:
                    fd = os.open(name, os.O_RDONLY | FILE_FLAGS, dir_fd=parent)
                except FileNotFoundError:
                    raise PublishError(f"{dest} {gone}") from None
        except _Blocked as b:
            raise PublishError(f"{dest}: {b}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise PublishError(f"{dest}: something other than a regular file is at dest; refused")
            yield fd
        finally:
            os.close(fd)

    def hash_file(self, dest: str, on_bytes: Callable[[int], None] | None = None) -> tuple[str, int]:
        """sha256 and size of the regular file at ``dest`` (read without following symlinks); the file's
        identity is remembered for :meth:`make_read_only`.

        Raises :class:`PublishError` when it is gone, not a regular file, unreadable, or changed while
        being read. ``on_bytes(n)`` is called after each chunk read (a rate limit, a stop: it may raise)."""
        digest = hashlib.sha256()
        size = 0
        try:
            with self._open_dest(dest, "disappeared while being checked") as fd:
                seen = _identity(os.fstat(fd))
                while chunk := os.read(fd, READ_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
                if _identity(os.fstat(fd)) != seen:
                    raise PublishError(f"{dest} changed while being checked; left untouched")
        except OSError as exc:
            raise os_error("cannot read", dest, exc) from None
        with self._lock:
            self._hashed[dest] = seen
        return digest.hexdigest(), size

    def make_read_only(self, dest: str) -> str:
        """chmod 0444 the file at ``dest`` (adopting a file found in place), only if it is still the very
        file :meth:`hash_file` read (same inode, size, mtime and ctime): a file swapped in or changed
        after the check is never adopted. Returns the file's :func:`staging.identity` after the chmod.

        Raises :class:`PublishError` as :meth:`hash_file` does, and when the file changed."""
        with self._lock:
            seen = self._hashed.pop(dest, None)
        try:
            with self._open_dest(dest, "disappeared while being adopted") as fd:
                if seen is None or _identity(os.fstat(fd)) != seen:
                    raise PublishError(f"{dest} changed while being adopted; left untouched")
                if stat.S_IMODE(os.fstat(fd).st_mode) != 0o444:
                    os.fchmod(fd, 0o444)
                return staging.identity(os.fstat(fd))
        except OSError as exc:
            raise os_error("cannot set mode 0444 on", dest, exc) from None

    # writing ----------------------------------------------------------------------------------
    def quarantine(self, dest: str, stamp: str, *, link: bool = False) -> str:
        """Move whatever is at ``dest`` (a file, a symlink itself, a directory) to
        ``<root>/.syncd-quarantine/<stamp>/<dest>`` by one rename (never deleted: it is evidence), with the
        quarantine directories created 0700; returns that path relative to the root. ``link``: hard-link
        a regular file there instead, leaving it at dest until the repaired file replaces it by rename
        (the dest is never missing); falls back to a rename across file systems. Raises
        :class:`PublishError` when nothing is there, a parent of dest is blocked, or the move fails."""
        *parents, name = dest.split("/")
        where = [QUARANTINE, stamp, *parents]
        try:
            with self._walk(parents, create=False) as parent:
                if parent is None:
                    raise PublishError(f"{dest}: nothing at dest to quarantine")
                with self._walk_private(where) as qdir:
                    linked = False
                    if link:
                        try:
                            os.link(name, name, src_dir_fd=parent, dst_dir_fd=qdir, follow_symlinks=False)
                            linked = True
                        except OSError as exc:
                            if exc.errno != errno.EXDEV:
                                raise
                    if not linked:
                        os.rename(name, name, src_dir_fd=parent, dst_dir_fd=qdir)
                    os.fsync(qdir)
                os.fsync(parent)
        except _Blocked as b:
            raise PublishError(f"{dest}: {b}") from None
        except FileNotFoundError:
            raise PublishError(f"{dest}: nothing at dest to quarantine") from None
        except OSError as exc:
            raise os_error("cannot quarantine", dest, exc) from None
        return "/".join([*where, name])

    @contextlib.contextmanager
    def _walk_private(self, parts: list[str]) -> Iterator[int]:
        """A descriptor of ``root/parts…``, each missing directory created 0700 (symlinks refused)."""
        fd = os.dup(self._root_fd)
        try:
            for part in parts:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=fd)
                try:
                    nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise _Blocked(
                            f"{part} in the quarantine path is a symlink or not a directory"
                        ) from None
                    raise
                os.close(fd)
                fd = nfd
            yield fd
        finally:
            os.close(fd)

    def clean_staging(self, keep: set[str] | None = None) -> list[str]:
        """Remove syncd's own leftovers from staging (see :func:`syncd.staging.clean`); return their names.
        Nothing in a dry run (no staging open)."""
        if self._staging_fd < 0:
            return []
        return staging.clean(self._staging_fd, keep)

    def free_bytes(self) -> int:
        """Bytes available to syncd on the export's file system."""
        st = os.fstatvfs(self._staging_fd)
        return st.f_bavail * st.f_frsize

    def stage(self, dest: str, sha256: str, size: int) -> StagedFile:
        """The staging file for ``dest``: the partial kept from an earlier attempt at the same sha256 (to
        resume), else a new empty one. Raises :class:`PublishError` when the bytes still to come do not fit
        on the export's file system."""
        stem = staging_name(dest)
        try:
            fd, validator, ranges = staging.open_part(self._staging_fd, stem, sha256, size)
        except OSError as exc:
            raise os_error("cannot create staging file for", dest, exc) from None
        kept = sum(b - a for a, b in ranges)
        try:
            need, free = size - min(kept, size), self.free_bytes()
        except OSError as exc:
            os.close(fd)
            raise os_error("cannot create staging file for", dest, exc) from None
        if need > free:
            os.close(fd)
            if kept == 0:  # nothing worth keeping: leave staging as it was
                staging.unlink_names(self._staging_fd, f"{stem}.part", f"{stem}.meta")
            raise PublishError(
                f"not enough space on the export for {dest}: {need} bytes still to download, {free} free"
            )
        return StagedFile(self._staging_fd, self._publish, dest, stem, fd, sha256, validator, ranges, size)

    def flush_group(self, files: list[StagedFile]) -> bool:
        """One flush for many verified staging files before they are published (group commit; see
        :func:`syncd.staging.flush_group`). False: each publish flushes its own file."""
        return staging.flush_group(self._staging_fd, files)

    def _publish(self, staged: StagedFile, replace: bool) -> None:
        """Walk to the dest's directory (creating it) and link the verified file there."""
        *parents, name = staged.dest.split("/")
        try:
            with self._walk(parents, create=True) as parent:
                assert parent is not None
                if replace:
                    self._check_replaceable(staged.dest, name, parent)
                staged.link_into(parent, name, replace=replace)
        except _Blocked as b:
            raise PublishError(f"{staged.dest}: {b}") from None
        except FileExistsError:
            raise PublishError(f"{staged.dest}: something appeared at dest; refused") from None
        except OSError as exc:
            raise os_error("cannot publish", staged.dest, exc) from None
        with self._lock:
            self._unsynced_dirs.add(tuple(parents))

    def created(self) -> list[tuple[str, str]]:
        """The directories syncd created since the last call (path relative to the root, ``dev:ino``),
        for the ledger: pruning removes only those, once empty, and only while they are the same
        directory."""
        with self._lock:
            out, self._created = self._created, []
        return out

    # removing (pruning) ---------------------------------------------------------------------------
    def remove(self, dest: str, identity: str, size: int) -> bool:
        """Remove the file at ``dest`` if it is still the one syncd recorded (``identity``, ``size``):
        it is renamed into staging, checked again there (the same inode, size and mtime: nothing swapped
        in between), then unlinked, and both directories are fsynced. Returns False when nothing is at
        dest (already gone). Raises :class:`PublishError`, and leaves the file in place, when it is a
        symlink, not a regular file, changed since syncd recorded it, or below a symlink."""
        *parents, name = _plain_parts(dest)
        stem = f"{staging_name(dest)}.gone"
        try:
            with self._walk(parents, create=False) as parent:
                if parent is None:
                    return False
                try:
                    st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                except FileNotFoundError:
                    return False
                if not stat.S_ISREG(st.st_mode):
                    raise PublishError(f"{dest}: not a regular file (a symlink or a directory); kept")
                if staging.identity(st) != identity or st.st_size != size:
                    raise PublishError(
                        f"{dest}: changed since syncd recorded it (inode, size or times); kept"
                    )
                os.rename(name, stem, src_dir_fd=parent, dst_dir_fd=self._staging_fd)
                moved = os.stat(stem, dir_fd=self._staging_fd, follow_symlinks=False)
                if (moved.st_ino, moved.st_size, moved.st_mtime_ns) != (
                    st.st_ino,
                    st.st_size,
                    st.st_mtime_ns,
                ):
                    self._put_back(dest, stem, parent, name)
                os.unlink(stem, dir_fd=self._staging_fd)
                os.fsync(parent)
                os.fsync(self._staging_fd)
        except _Blocked as b:
            raise PublishError(f"{dest}: {b}; kept") from None
        except OSError as exc:
            raise os_error("cannot remove", dest, exc) from None
        return True

    def _put_back(self, dest: str, stem: str, parent: int, name: str) -> None:
        """Another file was swapped in at dest between the check and the rename: it goes back by a hard
        link (never over something new at dest); if it cannot, it stays in staging under a name that
        cleaning never removes. Raises :class:`PublishError` either way."""
        kept = stem.removesuffix(".gone") + ".kept"
        try:
            os.link(stem, name, src_dir_fd=self._staging_fd, dst_dir_fd=parent, follow_symlinks=False)
        except OSError:
            os.rename(stem, kept, src_dir_fd=self._staging_fd, dst_dir_fd=self._staging_fd)
            raise PublishError(
                f"{dest}: replaced while being removed; the other file is kept in {self.staging} as {kept}"
            ) from None
        os.unlink(stem, dir_fd=self._staging_fd)
        raise PublishError(f"{dest}: replaced while being removed; the other file was put back")

    def remove_empty_dirs(self, dest: str, created: Mapping[str, str]) -> list[str]:
        """Remove the directories on ``dest``'s path that syncd created (``created``: path → ``dev:ino``)
        and that are now empty, deepest first, stopping at the first that is not empty, not syncd's, or
        not the directory syncd made (one re-created at the path); returns those removed (and those
        already gone or re-created, which the ledger then forgets)."""
        parts = _plain_parts(dest)[:-1]
        gone: list[str] = []
        for depth in range(len(parts), 0, -1):
            path = "/".join(parts[:depth])
            if path not in created:
                break
            try:
                with self._walk(parts[: depth - 1], create=False) as parent:
                    if parent is None:
                        gone.append(path)
                        continue
                    st = os.stat(parts[depth - 1], dir_fd=parent, follow_symlinks=False)
                    if f"{st.st_dev}:{st.st_ino}" != created[path]:
                        gone.append(path)  # someone else's directory now: kept, and no longer syncd's
                        break
                    os.rmdir(parts[depth - 1], dir_fd=parent)
                    os.fsync(parent)
            except FileNotFoundError:
                pass
            except (OSError, _Blocked):
                break  # not empty (ENOTEMPTY), a symlink (ENOTDIR), or unreadable: kept
            gone.append(path)
        return gone

    def _check_replaceable(self, dest: str, name: str, parent: int) -> None:
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise PublishError(f"{dest}: a symlink is at dest; refused")
        if not stat.S_ISREG(st.st_mode):
            raise PublishError(f"{dest}: something other than a regular file is at dest; refused")

    @contextlib.contextmanager
    def _walk(self, parts: list[str], *, create: bool) -> Iterator[int | None]:
        """Yield a descriptor of the directory ``root/parts…`` (None when missing and not creating).

        Raises :class:`_Blocked` if a component is a symlink or not a directory.
        """
        fd = os.dup(self._root_fd)
        try:
            for i, part in enumerate(parts):
                try:
                    nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        fd = -1
                        yield None
                        return
                    made = True
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:
                        made = False
                    nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
                    if made:
                        st = os.fstat(nfd)
                        with self._lock:
                            self._created.append(("/".join(parts[: i + 1]), f"{st.st_dev}:{st.st_ino}"))
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        where = "/".join(parts[: i + 1])
                        raise _Blocked(f"{where} is a symlink or not a directory; refused") from None
                    raise
                os.close(fd)
                fd = nfd
            yield fd
        finally:
            if fd >= 0:
                os.close(fd)


def _plain_parts(path: str) -> list[str]:
    """``path``'s components; raises :class:`PublishError` for one that could leave the root."""
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise PublishError(f"{path!r} is not a plain relative path; refused")
    return parts


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _Blocked(Exception):
    """A path component below the export root is a symlink or not a directory."""
