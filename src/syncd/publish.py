"""The export: the only module that writes under ``export.root``.

Every ``dest`` is reached by walking its components from a descriptor of the export root with
``O_NOFOLLOW``: a symlink anywhere below the root (a parent directory or the dest itself) is refused, never
followed, so no symlink can redirect a write outside the export. The root itself may be a symlink (a mount
point chosen by ops); it is never created: a missing root means the NFS mount is missing.

**One writer per export.** :meth:`Export.open` takes an exclusive ``flock`` on ``<root>/.syncd.lock``
(opened ``O_RDWR | O_NOFOLLOW``, so that NFS, which emulates ``flock`` with POSIX locks, grants it) and
holds it until :meth:`Export.close`: a second syncd on the same export, whatever its state directory, gets
:class:`~syncd.errors.LockHeldError` before it cleans or writes anything. Top-level names starting with
``.syncd`` are reserved (no dest can be one). A dry run (``create_staging=False``) takes no lock, opens no
staging directory and creates nothing.

**Staging is syncd's own directory.** The default ``<root>/.syncd-staging`` is reserved. A configured one
must be on the root's file system, must not be the root or one of its ancestors, and must be empty or
carry syncd's marker file ``.syncd-staging`` (written when syncd creates or adopts it); a dest at or under
it is refused by :func:`syncd.plan.plan`. The clean-up removes only syncd's own staging names (a 32-hex
stem with ``.part``, ``.meta``, ``.meta.tmp`` or ``.pub``) and leaves anything else alone.

**What is published is the file that was verified.** A file becomes visible at its ``dest`` only after its
bytes were verified, fdatasynced and set to 0444, and it is linked there *from the open descriptor* the
bytes were written through (``linkat`` of ``/proc/self/fd/N`` with ``AT_SYMLINK_FOLLOW``), never by its
name in staging: a file swapped in under the staging name cannot be published, and one deleted from
staging makes the publish fail. ``linkat`` fails with ``EEXIST`` when anything is at dest, which gives
``RENAME_NOREPLACE`` semantics on every file system, NFS included; only when the plan says ``replace`` is
the descriptor linked to a fresh name in staging that is then renamed over the dest. Without ``/proc``
(or on a file system without hard links) the staging name is checked against the descriptor (same device
and inode) and moved with ``renameat2(RENAME_NOREPLACE)`` where libc and the file system offer it, else
with ``rename`` after checking that nothing is at dest (a short window, only on such systems). The
directory is fsynced after the link (batched, :meth:`Export.sync_dirs`).

Errors leave as :class:`~syncd.errors.PublishError`; an unusable staging directory is a
:class:`~syncd.errors.ConfigError` on ``export.staging``. :meth:`Export.observe` never raises for one
dest: a directory that cannot be inspected is :attr:`State.UNREADABLE`, which plans a refusal of that
dest alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from syncd.errors import ConfigError, ExportMissingError, LockHeldError, PublishError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO or device planted where a file is expected must not block the open.
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_READ_CHUNK = 1 << 20
_META_MAX = 64 << 10
# Downloads at least this big record their resume metadata when they start (so a crash mid-way can resume);
# smaller ones only when a transport fault leaves them half done.
RESUME_META_EARLY = 8 << 20
LOCK_NAME = ".syncd.lock"
DEFAULT_STAGING = ".syncd-staging"
STAGING_MARKER = ".syncd-staging"  # inside a configured staging directory: syncd made or adopted it
_MARKER_TEXT = b"syncd's staging directory: syncd deletes its own temporary files here each pass.\n"
_STAGING_NAME = re.compile(r"[0-9a-f]{32}\.(?:part|meta|meta\.tmp|pub)")
_PROC_FD = "/proc/self/fd"
# errno values of linkat on a file system without hard links (vfat: EPERM; some FUSE: ENOSYS).
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})
_RENAME_NOREPLACE = 1


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


def _reason(exc: OSError) -> str:
    """``strerror (ENAME)`` of ``exc``: no path, no library text."""
    name = errno.errorcode.get(exc.errno or 0, "")
    text = exc.strerror or type(exc).__name__
    return f"{text} ({name})" if name else text


def _os_error(action: str, where: str, exc: OSError) -> PublishError:
    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        reason = "no space left on the export file system"
    return PublishError(f"{action} {where}: {reason}")


def _staging_problem(staging: Path, problem: str) -> ConfigError:
    return ConfigError("export.staging", [f"at 'export.staging': {staging} {problem}"])


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
        self._lock = threading.Lock()
        self._unsynced_dirs: set[tuple[str, ...]] = set()
        self._hashed: dict[str, tuple[int, ...]] = {}  # dest → identity of the file hash_file read

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
            raise _os_error("cannot reach export root", str(self.root), exc) from None
        if not stat.S_ISDIR(st.st_mode):
            raise ExportMissingError(f"export root {self.root} is not a directory")
        try:
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            return os.fstat(self._root_fd)
        except OSError as exc:
            raise _os_error("cannot open export root", str(self.root), exc) from None

    def _take_lock(self) -> None:
        """flock ``<root>/.syncd.lock`` (LOCK_EX, never blocking) and write our pid into it."""
        where = f"{self.root}/{LOCK_NAME}"
        try:
            self._lock_fd = os.open(
                LOCK_NAME, os.O_RDWR | os.O_CREAT | _FILE_FLAGS, 0o600, dir_fd=self._root_fd
            )
            st = os.fstat(self._lock_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PublishError(f"export lock {where} is a symlink; refused (remove it)") from None
            raise _os_error("cannot create the lock file", where, exc) from None
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise PublishError(f"export lock {where} is not a plain file of its own; refused (remove it)")
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _os_error("cannot lock export", where, exc) from None
            raise LockHeldError(
                f"another syncd is publishing into export {self.root}{_holder(self._lock_fd)}; "
                "one export takes one syncd (check for a second instance or config)"
            ) from None
        with contextlib.suppress(OSError):  # the pid is for people only
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)

    def _open_staging(self, root_st: os.stat_result) -> None:
        created = False
        try:
            os.mkdir(self.staging, 0o700)
            created = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise _os_error("cannot create staging directory", str(self.staging), exc) from None
        try:
            self._staging_fd = os.open(self.staging, _DIR_FLAGS)
            sst = os.fstat(self._staging_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _staging_problem(self.staging, "is a symlink or not a directory") from None
            raise _os_error("cannot open staging directory", str(self.staging), exc) from None
        if sst.st_dev != root_st.st_dev:
            raise _staging_problem(
                self.staging,
                f"is on another file system than {self.root}; rename into the export would not be atomic",
            )
        if self._is_root_or_ancestor(sst):
            raise _staging_problem(
                self.staging, f"is {self.root} or one of its parents; staging must be a directory of its own"
            )
        if self.staging != self.root / DEFAULT_STAGING:
            self._claim(created)
        if stat.S_IMODE(sst.st_mode) != 0o700:
            try:
                os.fchmod(self._staging_fd, 0o700)
            except OSError as exc:
                raise _os_error("cannot set mode 0700 on staging directory", str(self.staging), exc) from None

    def _is_root_or_ancestor(self, sst: os.stat_result) -> bool:
        real = Path(os.path.realpath(self.root))
        for d in (real, *real.parents):
            try:
                st = os.stat(d)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (sst.st_dev, sst.st_ino):
                return True
        return False

    def _claim(self, created: bool) -> None:
        """Accept a configured staging directory only if syncd made it: marked, or empty (or holding only
        syncd's own staging names, as an older syncd left them); mark it then."""
        try:
            names = os.listdir(self._staging_fd)
            if STAGING_MARKER in names:
                st = os.stat(STAGING_MARKER, dir_fd=self._staging_fd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    return
            elif created or all(_STAGING_NAME.fullmatch(n) for n in names):
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE_FLAGS
                fd = os.open(STAGING_MARKER, flags, 0o644, dir_fd=self._staging_fd)
                try:
                    os.write(fd, _MARKER_TEXT)
                finally:
                    os.close(fd)
                return
        except OSError as exc:
            raise _os_error("cannot adopt staging directory", str(self.staging), exc) from None
        raise _staging_problem(
            self.staging,
            f"holds {len(names)} entries that syncd did not make and no {STAGING_MARKER} marker; syncd "
            "deletes its temporary files there each pass, so it needs an empty directory of its own "
            "(or leave export.staging unset)",
        )

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
        for fd in (self._staging_fd, self._lock_fd, self._root_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._root_fd = self._lock_fd = self._staging_fd = -1

    # reading ----------------------------------------------------------------------------------
    def observe(self, dest: str) -> Observation:
        """Look at ``dest`` without following symlinks and without creating anything. Never raises: a
        dest that cannot be inspected is :attr:`State.UNREADABLE` (its detail names only the errno)."""
        *parents, name = dest.split("/")
        try:
            with self._walk(parents, create=False) as parent:
                if parent is None:
                    return Observation(State.MISSING)
                try:
                    st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                except FileNotFoundError:
                    return Observation(State.MISSING)
        except _Blocked as b:
            return Observation(State.BLOCKED, detail=str(b))
        except OSError as exc:
            return Observation(State.UNREADABLE, detail=f"cannot inspect dest: {_reason(exc)}")
        if stat.S_ISLNK(st.st_mode):
            return Observation(State.SYMLINK, detail="a symlink is at dest")
        if stat.S_ISREG(st.st_mode):
            return Observation(State.FILE, size=st.st_size)
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
                    fd = os.open(name, os.O_RDONLY | _FILE_FLAGS, dir_fd=parent)
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

    def hash_file(self, dest: str) -> tuple[str, int]:
        """sha256 and size of the regular file at ``dest`` (read without following symlinks); the file's
        identity is remembered for :meth:`make_read_only`.

        Raises :class:`PublishError` when it is gone, not a regular file or unreadable."""
        digest = hashlib.sha256()
        size = 0
        try:
            with self._open_dest(dest, "disappeared while being checked") as fd:
                while chunk := os.read(fd, _READ_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                seen = _identity(os.fstat(fd))
        except OSError as exc:
            raise _os_error("cannot read", dest, exc) from None
        with self._lock:
            self._hashed[dest] = seen
        return digest.hexdigest(), size

    def make_read_only(self, dest: str) -> None:
        """chmod 0444 the file at ``dest`` (adopting a file found in place), only if it is still the very
        file :meth:`hash_file` read (same inode, size, mtime and ctime): a file swapped in or changed
        after the check is never adopted.

        Raises :class:`PublishError` as :meth:`hash_file` does, and when the file changed."""
        with self._lock:
            seen = self._hashed.pop(dest, None)
        try:
            with self._open_dest(dest, "disappeared while being adopted") as fd:
                if seen is None or _identity(os.fstat(fd)) != seen:
                    raise PublishError(f"{dest} changed while being adopted; left untouched")
                os.fchmod(fd, 0o444)
        except OSError as exc:
            raise _os_error("cannot set mode 0444 on", dest, exc) from None

    # writing ----------------------------------------------------------------------------------
    def clean_staging(self, keep: set[str] | None = None) -> list[str]:
        """Remove syncd's own leftovers from the staging directory; return the names removed.

        Only syncd's staging names (see :func:`staging_name`) are touched; anything else is left alone.
        With ``keep=None`` (start of a pass) partial downloads with their ``.meta`` are kept for resume and
        every other staging name goes. With a set of dests, only the partials of those dests are kept."""
        if self._staging_fd < 0:
            return []
        try:
            names = {n for n in os.listdir(self._staging_fd) if _STAGING_NAME.fullmatch(n)}
        except OSError as exc:
            raise _os_error("cannot list staging directory", str(self.staging), exc) from None
        wanted = {staging_name(d) for d in keep} if keep is not None else None
        removed = []
        for name in sorted(names):
            stem, _, ext = name.partition(".")
            resumable = ext in ("part", "meta") and {f"{stem}.part", f"{stem}.meta"} <= names
            if resumable and (wanted is None or stem in wanted):
                continue
            try:
                os.unlink(name, dir_fd=self._staging_fd)
                removed.append(name)
            except (IsADirectoryError, FileNotFoundError, PermissionError):
                continue  # a directory by that name (EISDIR, or EPERM on some systems) is left alone
            except OSError as exc:
                raise _os_error("cannot clean staging file", name, exc) from None
        return removed

    def free_bytes(self) -> int:
        """Bytes available to syncd on the export's file system."""
        st = os.fstatvfs(self._staging_fd)
        return st.f_bavail * st.f_frsize

    def stage(self, dest: str, sha256: str, size: int) -> StagedFile:
        """The staging file for ``dest``: the partial kept from an earlier attempt at the same sha256 (to
        resume), else a new empty one. Raises :class:`PublishError` when the bytes still to come do not fit
        on the export's file system."""
        stem = staging_name(dest)
        part, meta = f"{stem}.part", f"{stem}.meta"
        create = os.O_RDWR | os.O_CREAT | os.O_EXCL | _FILE_FLAGS
        try:
            try:
                fd = os.open(part, create, 0o600, dir_fd=self._staging_fd)
                validator = None
            except FileExistsError:
                kept = self._resume(part, meta, sha256)
                if kept is None:
                    fd, validator = os.open(part, create, 0o600, dir_fd=self._staging_fd), None
                else:
                    fd, validator = kept
        except OSError as exc:
            raise _os_error("cannot create staging file for", dest, exc) from None
        try:
            kept_bytes = os.lseek(fd, 0, os.SEEK_END)
            need, free = size - min(kept_bytes, size), self.free_bytes()
        except OSError as exc:
            os.close(fd)
            raise _os_error("cannot create staging file for", dest, exc) from None
        if need > free:
            os.close(fd)
            if kept_bytes == 0:  # nothing worth keeping: leave staging as it was
                self._unlink_staging(part, meta)
            raise PublishError(
                f"not enough space on the export for {dest}: {need} bytes still to download, {free} free"
            )
        return StagedFile(self, dest, stem, fd, sha256, validator, kept_bytes, size)

    def _resume(self, part: str, meta: str, sha256: str) -> tuple[int, str | None] | None:
        """The kept partial for ``sha256`` and its validator, or None after removing what cannot be
        resumed (another version, bad metadata, not a plain file of its own)."""
        try:
            with open(meta, "rb", opener=self._opener) as fh:
                info = json.loads(fh.read(_META_MAX))
            if not isinstance(info, dict) or info.get("sha256") != sha256:
                raise ValueError("partial of another version")
            validator = info.get("validator")
            if validator is not None and not isinstance(validator, str):
                raise ValueError("bad validator")
            fd = os.open(part, os.O_RDWR | _FILE_FLAGS, dir_fd=self._staging_fd)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                os.close(fd)  # a FIFO, or a file also linked elsewhere (a dest): never write into it
                raise ValueError("not a plain staging file")
            return fd, validator
        except (OSError, ValueError):
            self._unlink_staging(part, meta)
            return None

    def _unlink_staging(self, *names: str) -> None:
        for name in names:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self._staging_fd)

    def _opener(self, name: str, flags: int) -> int:
        return os.open(name, flags | _FILE_FLAGS, dir_fd=self._staging_fd)

    def _publish(self, staged: StagedFile, *, replace: bool) -> None:
        """Link the verified descriptor's file at its dest (see the module docstring)."""
        *parents, name = staged.dest.split("/")
        # Resume data goes first: a crash after the link must not leave a "resumable" file that is the dest.
        self._unlink_staging(staged.meta)
        try:
            with self._walk(parents, create=True) as parent:
                assert parent is not None
                if replace:
                    self._check_replaceable(staged.dest, name, parent)
                    self._replace(staged, name, parent)
                else:
                    self._link_new(staged, name, parent)
        except _Blocked as b:
            raise PublishError(f"{staged.dest}: {b}") from None
        except FileExistsError:
            raise PublishError(f"{staged.dest}: something appeared at dest; refused") from None
        except OSError as exc:
            if exc.errno == errno.ENOENT and _unlinked(staged.fd):
                raise PublishError(
                    f"{staged.dest}: its staging file was removed before it could be published "
                    "(is another syncd using this staging directory?)"
                ) from None
            raise _os_error("cannot publish", staged.dest, exc) from None
        with self._lock:
            self._unsynced_dirs.add(tuple(parents))
        self._drop_staging_name(staged)

    def _check_replaceable(self, dest: str, name: str, parent: int) -> None:
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise PublishError(f"{dest}: a symlink is at dest; refused")
        if not stat.S_ISREG(st.st_mode):
            raise PublishError(f"{dest}: something other than a regular file is at dest; refused")

    def _link_new(self, staged: StagedFile, name: str, parent: int) -> None:
        """Make ``name`` in ``parent`` the staged file; FileExistsError if anything is there."""
        if os.path.isdir(_PROC_FD):
            try:
                os.link(f"{_PROC_FD}/{staged.fd}", name, dst_dir_fd=parent, follow_symlinks=True)
                return
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
        self._check_name_is_fd(staged)
        if not _renameat2_noreplace(staged.part, self._staging_fd, name, parent):
            with contextlib.suppress(FileNotFoundError):
                os.stat(name, dir_fd=parent, follow_symlinks=False)
                raise FileExistsError(errno.EEXIST, "File exists")
            os.rename(staged.part, name, src_dir_fd=self._staging_fd, dst_dir_fd=parent)

    def _replace(self, staged: StagedFile, name: str, parent: int) -> None:
        """Put the staged file at ``name`` in ``parent`` in place of what is there (replace = true)."""
        if os.path.isdir(_PROC_FD):
            fresh = f"{staged.stem}.pub"
            self._unlink_staging(fresh)
            try:
                os.link(f"{_PROC_FD}/{staged.fd}", fresh, dst_dir_fd=self._staging_fd, follow_symlinks=True)
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
            else:
                try:
                    os.rename(fresh, name, src_dir_fd=self._staging_fd, dst_dir_fd=parent)
                except BaseException:
                    self._unlink_staging(fresh)
                    raise
                return
        self._check_name_is_fd(staged)
        os.rename(staged.part, name, src_dir_fd=self._staging_fd, dst_dir_fd=parent)

    def _check_name_is_fd(self, staged: StagedFile) -> None:
        """Without /proc: the staging name must still be the file written through the descriptor."""
        named = os.stat(staged.part, dir_fd=self._staging_fd, follow_symlinks=False)
        mine = os.fstat(staged.fd)
        if (named.st_dev, named.st_ino) != (mine.st_dev, mine.st_ino):
            raise PublishError(
                f"{staged.dest}: its staging file was replaced before it could be published; refused "
                "(is another syncd using this staging directory?)"
            )

    def _drop_staging_name(self, staged: StagedFile) -> None:
        """After the link: remove the staging name, if it is still the published file."""
        with contextlib.suppress(OSError):
            named = os.stat(staged.part, dir_fd=self._staging_fd, follow_symlinks=False)
            mine = os.fstat(staged.fd)
            if (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(staged.part, dir_fd=self._staging_fd)

    @contextlib.contextmanager
    def _walk(self, parts: list[str], *, create: bool) -> Iterator[int | None]:
        """Yield a descriptor of the directory ``root/parts…`` (None when missing and not creating).

        Raises :class:`_Blocked` if a component is a symlink or not a directory.
        """
        fd = os.dup(self._root_fd)
        try:
            for i, part in enumerate(parts):
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        fd = -1
                        yield None
                        return
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
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


def _holder(fd: int) -> str:
    """`` (pid N)`` from the lock file, or nothing when it does not hold a pid."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {text})" if text.isdigit() else ""


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _unlinked(fd: int) -> bool:
    try:
        return os.fstat(fd).st_nlink == 0
    except OSError:
        return False


@functools.cache
def _libc_renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _renameat2_noreplace(src: str, src_dir: int, dst: str, dst_dir: int) -> bool:
    """renameat2(RENAME_NOREPLACE); False when libc, the kernel or the file system cannot do it.

    Raises FileExistsError when something is at ``dst``, OSError on other failures."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(src_dir, os.fsencode(src), dst_dir, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err))


class _Blocked(Exception):
    """A path component below the export root is a symlink or not a directory."""


class StagedFile:
    """A file being written in staging; it reaches its dest only through :meth:`publish`.

    Implements :class:`syncd.fetch.Sink`: ``kept()`` yields the bytes from an earlier attempt, ``restart``
    drops them and records the validator for a later resume in ``<name>.meta``."""

    def __init__(
        self,
        export: Export,
        dest: str,
        stem: str,
        fd: int,
        sha256: str,
        validator: str | None,
        kept: int,
        expected: int = 0,
    ) -> None:
        self.expected = expected
        self.export = export
        self.dest = dest
        self.stem = stem
        self.part = f"{stem}.part"
        self.meta = f"{stem}.meta"
        self.fd = fd
        self.sha256 = sha256
        self.validator = validator
        self.size = kept
        self.resumed = validator is not None or kept > 0

    def kept(self) -> Iterator[bytes]:
        offset = 0
        while offset < self.size:
            chunk = os.pread(self.fd, min(_READ_CHUNK, self.size - offset), offset)
            if not chunk:
                break
            offset += len(chunk)
            yield chunk

    def restart(self, validator: str | None) -> None:
        self.validator = validator
        if self.size or self.resumed:  # a new, empty file needs no reset (the common case)
            try:
                os.ftruncate(self.fd, 0)
                os.lseek(self.fd, 0, os.SEEK_SET)
                self.size = 0
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.meta, dir_fd=self.export._staging_fd)
            except OSError as exc:
                raise _os_error("cannot reset staging file for", self.dest, exc) from None
        if self.expected >= RESUME_META_EARLY:
            self._write_meta()  # a big download may be cut by a crash: make it resumable from the start

    def _write_meta(self) -> None:
        try:
            tmp = f"{self.meta}.tmp"
            info = {"dest": self.dest, "sha256": self.sha256, "validator": self.validator}
            data = json.dumps(info).encode()
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _FILE_FLAGS,
                0o600,
                dir_fd=self.export._staging_fd,
            )
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.rename(tmp, self.meta, src_dir_fd=self.export._staging_fd, dst_dir_fd=self.export._staging_fd)
        except OSError as exc:
            raise _os_error("cannot record resume data for", self.dest, exc) from None

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as exc:
            raise _os_error("cannot write staging file for", self.dest, exc) from None
        self.size += len(data)

    def publish(self, *, replace: bool = False) -> None:
        """fdatasync, chmod 0444, link into place from the still open descriptor (the directory is fsynced
        by :meth:`Export.sync_dirs`); the descriptor is closed either way.

        Raises :class:`PublishError` when something is at dest (unless ``replace``), the path is unsafe,
        or the staging file was removed or replaced by someone else."""
        try:
            try:
                os.fdatasync(self.fd)  # the bytes and the size: all a reader needs after a power cut
                os.fchmod(self.fd, 0o444)
            except OSError as exc:
                raise _os_error("cannot flush staging file for", self.dest, exc) from None
            self.export._publish(self, replace=replace)
        finally:
            os.close(self.fd)
            self.fd = -1

    def keep(self) -> None:
        """Close, leaving the partial bytes in staging for the next attempt to resume."""
        if self.fd >= 0 and self.size > 0:
            self._write_meta()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Close and delete the staging file (unverified bytes are never kept)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for name in (self.part, self.meta):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.export._staging_fd)


def staging_name(dest: str) -> str:
    """The staging file stem for ``dest`` (a hash: dests may be long or nested)."""
    return hashlib.sha256(dest.encode()).hexdigest()[:32]
