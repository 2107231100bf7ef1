"""syncd's staging directory and the files in it, up to the moment one is linked into the export.

Only :mod:`syncd.publish` uses this module; together they are the only writers under ``export.root``.

**Staging is syncd's own directory.** The default ``<root>/.syncd-staging`` is reserved (no dest may
start with ``.syncd``). A configured one must be on the root's file system, must not be the root or one
of its ancestors, and must be empty or carry syncd's marker file ``.syncd-staging`` (written when syncd
creates or adopts it); a dest at or under it is refused by :func:`syncd.plan.plan`. The clean-up removes
only syncd's own staging names (a 32-hex stem with ``.part``, ``.meta``, ``.meta.tmp`` or ``.pub``) and
leaves anything else alone.

**What is published is the file that was verified.** A :class:`StagedFile` keeps the descriptor its bytes
were written and verified through, and is linked at its dest *from that descriptor* (``linkat`` of
``/proc/self/fd/N`` with ``AT_SYMLINK_FOLLOW``), never by its name in staging: a file swapped in under the
staging name cannot be published, and one deleted from staging makes the publish fail. ``linkat`` fails
with ``EEXIST`` when anything is at dest, which gives ``RENAME_NOREPLACE`` semantics on every file system,
NFS included; only when the plan says ``replace`` is the descriptor linked to a fresh name in staging that
is then renamed over the dest. Without ``/proc`` (or on a file system without hard links) the staging
name is checked against the descriptor (same device and inode) and moved with
``renameat2(RENAME_NOREPLACE)`` where libc and the file system offer it, else with ``rename`` after
checking that nothing is at dest (a short window, only on such systems).

Errors leave as :class:`~syncd.errors.PublishError`; an unusable staging directory is a
:class:`~syncd.errors.ConfigError` on ``export.staging``.
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
from pathlib import Path

from syncd import segments
from syncd.errors import ConfigError, ExportFullError, LockHeldError, PublishError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO or device planted where a file is expected must not block the open.
FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
READ_CHUNK = 1 << 20
_META_MAX = 64 << 10
# Downloads at least this big record their resume metadata when they start (so a crash mid-way can resume);
# smaller ones only when a transport fault leaves them half done.
RESUME_META_EARLY = 8 << 20
DEFAULT_STAGING = ".syncd-staging"
STAGING_MARKER = ".syncd-staging"  # inside a configured staging directory: syncd made or adopted it
# Inside every staging directory (default or configured): flocked for a whole pass by the syncd using it, so
# two exports sharing one staging directory never write into each other's partial files.
STAGING_LOCK = ".syncd-staging.lock"
_MARKER_TEXT = b"syncd's staging directory: syncd deletes its own temporary files here each pass.\n"
_STAGING_NAME = re.compile(r"[0-9a-f]{32}\.(?:part|meta|meta\.tmp|pub|gone)")  # .gone: a prune's
PROC_FD = "/proc/self/fd"
# errno values of linkat on a file system without hard links (vfat: EPERM; some FUSE: ENOSYS).
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})
_RENAME_NOREPLACE = 1


@functools.cache
def _proc_fd_usable(path: str) -> bool:
    """Whether ``path`` (``/proc/self/fd``) is there to link an open file from: asked once per process
    and path, not once per published file."""
    return os.path.isdir(path)


def staging_name(dest: str) -> str:
    """The staging file stem for ``dest`` (a hash: dests may be long or nested)."""
    return hashlib.sha256(dest.encode()).hexdigest()[:32]


def identity(st: os.stat_result) -> str:
    """What a pass compares to tell that a published file was touched since syncd recorded it: inode,
    mtime, ctime and mode (``ino:mtime_ns:ctime_ns:mode``; the size is kept apart). The device number
    is left out: it can change across a reboot or remount, and would then re-hash the whole export.
    Userspace can set a file's mtime back, never its ctime."""
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}:{stat.S_IMODE(st.st_mode):o}"


def os_error(action: str, where: str, exc: OSError) -> PublishError:
    """A PublishError for ``exc``: the action, where, and the errno's text (never a library message)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ExportFullError(f"{action} {where}: no space left on the export file system")
    return PublishError(f"{action} {where}: {exc.strerror or type(exc).__name__}")


def _problem(staging: Path, problem: str) -> ConfigError:
    return ConfigError("export.staging", [f"at 'export.staging': {staging} {problem}"])


# --------------------------------------------------------------------------- the directory


def open_staging(staging: Path, root: Path, root_st: os.stat_result) -> int:
    """Create or adopt ``staging`` (see the module docstring), make it 0700, return a descriptor of it.

    Raises :class:`ConfigError` when it is not syncd's to use, :class:`PublishError` on I/O errors; no
    descriptor stays open when it raises."""
    created = False
    try:
        os.mkdir(staging, 0o700)
        created = True
    except FileExistsError:
        pass
    except OSError as exc:
        raise os_error("cannot create staging directory", str(staging), exc) from None
    try:
        fd = os.open(staging, DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _problem(staging, "is a symlink or not a directory") from None
        raise os_error("cannot open staging directory", str(staging), exc) from None
    try:
        _check(fd, staging, root, root_st, created)
    except BaseException:
        os.close(fd)
        raise
    return fd


def lock_staging(fd: int, staging: Path) -> int:
    """flock ``<staging>/.syncd-staging.lock`` for the whole pass; return its descriptor.

    Raises :class:`LockHeldError` when another syncd uses this staging directory (two exports configured
    with one ``export.staging``), :class:`PublishError` otherwise; no descriptor stays open then."""
    return take_lock(
        fd,
        STAGING_LOCK,
        f"{staging}/{STAGING_LOCK}",
        lambda holder: (
            f"another syncd is using staging directory {staging}{holder}; each export needs a staging "
            "directory of its own (check export.staging in both configs)"
        ),
    )


def take_lock(dir_fd: int, name: str, where: str, held: Callable[[str], str]) -> int:
    """Open ``name`` in ``dir_fd`` (``O_RDWR | O_NOFOLLOW``, so NFS grants the lock), flock it (LOCK_EX,
    never blocking), record our pid in it only when it holds another (a pass changes nothing on disk), and
    return the descriptor.

    Raises :class:`LockHeldError` with ``held(" (pid N)")`` when it is held, :class:`PublishError` when
    the file is unsafe or the file system grants no locks; no descriptor stays open then."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | FILE_FLAGS, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PublishError(f"lock file {where} is a symlink; refused (remove it)") from None
        raise os_error("cannot create the lock file", where, exc) from None
    try:
        _lock_fd(fd, where, held)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lock_fd(fd: int, where: str, held: Callable[[str], str]) -> None:
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise os_error("cannot create the lock file", where, exc) from None
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        raise PublishError(f"lock file {where} is not a plain file of its own; refused (remove it)")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise PublishError(
                f"cannot lock {where}: its file system grants no locks ({_errno_text(exc)}); on NFS "
                "run rpc.statd/lockd on both sides, or mount with 'nolock' (then only syncd instances "
                "on this host exclude each other)"
            ) from None
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise os_error("cannot lock", where, exc) from None
        raise LockHeldError(held(holder(fd))) from None
    mine = f"{os.getpid()}\n".encode()
    with contextlib.suppress(OSError):  # the pid is for people only
        if os.pread(fd, 64, 0) != mine:
            os.ftruncate(fd, 0)
            os.pwrite(fd, mine, 0)


def holder(fd: int) -> str:
    """`` (pid N)`` from a lock file, or nothing when it does not hold a pid."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {text})" if text.isdigit() else ""


def _errno_text(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    text = exc.strerror or type(exc).__name__
    return f"{text} ({name})" if name else text


def _check(fd: int, staging: Path, root: Path, root_st: os.stat_result, created: bool) -> None:
    try:
        sst = os.fstat(fd)
    except OSError as exc:
        raise os_error("cannot open staging directory", str(staging), exc) from None
    if sst.st_dev != root_st.st_dev:
        raise _problem(
            staging, f"is on another file system than {root}; rename into the export would not be atomic"
        )
    if _is_root_or_ancestor(root, sst):
        raise _problem(staging, f"is {root} or one of its parents; staging must be a directory of its own")
    if staging != root / DEFAULT_STAGING:
        _claim(fd, staging, created)
    if stat.S_IMODE(sst.st_mode) != 0o700:
        try:
            os.fchmod(fd, 0o700)
        except OSError as exc:
            raise os_error("cannot set mode 0700 on staging directory", str(staging), exc) from None


def _is_root_or_ancestor(root: Path, sst: os.stat_result) -> bool:
    real = Path(os.path.realpath(root))
    for d in (real, *real.parents):
        try:
            st = os.stat(d)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (sst.st_dev, sst.st_ino):
            return True
    return False


def _claim(fd: int, staging: Path, created: bool) -> None:
    """Accept a configured staging directory only if syncd made it: marked, or empty (or holding only
    syncd's own staging names, as an older syncd left them); mark it then."""
    try:
        names = os.listdir(fd)
        if STAGING_MARKER in names:
            if stat.S_ISREG(os.stat(STAGING_MARKER, dir_fd=fd, follow_symlinks=False).st_mode):
                return
        elif created or all(n == STAGING_LOCK or _STAGING_NAME.fullmatch(n) for n in names):
            _mark(fd)
            return
    except OSError as exc:
        raise os_error("cannot adopt staging directory", str(staging), exc) from None
    raise _problem(
        staging,
        f"holds {len(names)} entries that syncd did not make and no {STAGING_MARKER} marker; syncd "
        "deletes its temporary files there each pass, so it needs an empty directory of its own "
        "(or leave export.staging unset)",
    )


def _mark(fd: int) -> None:
    try:
        mfd = os.open(STAGING_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | FILE_FLAGS, 0o644, dir_fd=fd)
    except FileExistsError:
        return  # another syncd marked it just now: the lock decides who uses it
    try:
        os.write(mfd, _MARKER_TEXT)
    finally:
        os.close(mfd)


def clean(fd: int, keep: set[str] | None = None) -> list[str]:
    """Remove syncd's own leftovers from the staging directory ``fd``; return the names removed.

    Only syncd's staging names (see :func:`staging_name`) are touched; anything else is left alone.
    With ``keep=None`` (start of a pass) partial downloads with their ``.meta`` are kept for resume and
    every other staging name goes. With a set of dests, only the partials of those dests are kept."""
    try:
        names = {n for n in os.listdir(fd) if _STAGING_NAME.fullmatch(n)}
    except OSError as exc:
        raise os_error("cannot list staging directory", "", exc) from None
    wanted = {staging_name(d) for d in keep} if keep is not None else None
    removed = []
    for name in sorted(names):
        stem, _, ext = name.partition(".")
        resumable = ext in ("part", "meta") and {f"{stem}.part", f"{stem}.meta"} <= names
        if resumable and (wanted is None or stem in wanted):
            continue
        try:
            os.unlink(name, dir_fd=fd)
            removed.append(name)
        except (IsADirectoryError, FileNotFoundError, PermissionError):
            continue  # a directory by that name (EISDIR, or EPERM on some systems) is left alone
        except OSError as exc:
            raise os_error("cannot clean staging file", name, exc) from None
    return removed


def unlink_names(fd: int, *names: str) -> None:
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=fd)


# --------------------------------------------------------------------------- one staged file


Kept = tuple[int, str | None, list[segments.Extent]]  # descriptor, validator, byte ranges on disk


def open_part(fd: int, stem: str, sha256: str, size: int) -> Kept:
    """A descriptor of ``<stem>.part`` in staging ``fd``, the validator to resume it with and the byte
    ranges it holds: the partial kept for ``sha256`` (a ``size``-byte file), else a new empty file
    (anything unusable by that name is removed). Raises OSError."""
    part = f"{stem}.part"
    create = os.O_RDWR | os.O_CREAT | os.O_EXCL | FILE_FLAGS
    try:
        return os.open(part, create, 0o600, dir_fd=fd), None, []
    except FileExistsError:
        kept = _resume(fd, part, f"{stem}.meta", sha256, size)
    return kept or (os.open(part, create, 0o600, dir_fd=fd), None, [])


def _resume(fd: int, part: str, meta: str, sha256: str, size: int) -> Kept | None:
    """The kept partial for ``sha256``, its validator and byte ranges (``ranges`` in the metadata of a
    segmented download, else the whole file as one prefix), or None after removing what cannot be
    resumed (another version, bad metadata, not a plain file of its own)."""
    try:
        with open(meta, "rb", opener=lambda n, f: os.open(n, f | FILE_FLAGS, dir_fd=fd)) as fh:
            info = json.loads(fh.read(_META_MAX))
        if not isinstance(info, dict) or info.get("sha256") != sha256:
            raise ValueError("partial of another version")
        validator = info.get("validator")
        if validator is not None and not isinstance(validator, str):
            raise ValueError("bad validator")
        pfd = os.open(part, os.O_RDWR | FILE_FLAGS, dir_fd=fd)
        st = os.fstat(pfd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(pfd)  # a FIFO, or a file also linked elsewhere (a dest): never write into it
            raise ValueError("not a plain staging file")
        length = min(st.st_size, size)
        if "ranges" not in info:
            return pfd, validator, [(0, length)] if length else []  # one stream's (or an older syncd's)
        raw = info["ranges"]
        ranges = None
        if isinstance(raw, list) and len(raw) <= segments.MAX_EXTENTS:
            ranges = segments.extents_ok(raw, length)
        if ranges is None:
            os.close(pfd)
            raise ValueError("ranges that do not fit the partial")
        return pfd, validator, ranges
    except (OSError, ValueError, RecursionError):
        unlink_names(fd, part, meta)
        return None


class StagedFile:
    """A file being written in staging; it reaches its dest only through :meth:`publish`.

    Implements :class:`syncd.fetch.Sink`: ``kept()`` yields the bytes from an earlier attempt, ``restart``
    drops them and records the validator for a later resume in ``<name>.meta``. ``on_publish`` is the
    export's walk to the dest's directory, which calls back :meth:`link_into`."""

    def __init__(
        self,
        staging_fd: int,
        on_publish: Callable[[StagedFile, bool], None],
        dest: str,
        stem: str,
        fd: int,
        sha256: str,
        validator: str | None,
        kept: list[segments.Extent],
        expected: int = 0,
    ) -> None:
        self.expected = expected
        self.ranges = kept
        self._meta_lock = threading.Lock()
        self._ranged = False  # a segmented download writes at offsets: the metadata lists its ranges
        self.flushed = False  # its bytes were made durable by a group flush (see flush_group)
        self._dir = staging_fd
        self._on_publish = on_publish
        self.dest = dest
        self.stem = stem
        self.part = f"{stem}.part"
        self.meta = f"{stem}.meta"
        self.fd = fd
        self.sha256 = sha256
        self.validator = validator
        self.size = segments.prefix(kept)
        self.resumed = validator is not None or bool(kept)

    def kept(self) -> Iterator[bytes]:
        """The kept prefix, for one stream to continue; bytes kept past a hole (a segmented download's)
        are dropped first."""
        if self._ranged or self.ranges != ([(0, self.size)] if self.size else []):
            try:
                os.ftruncate(self.fd, self.size)
            except OSError as exc:
                raise os_error("cannot reset staging file for", self.dest, exc) from None
            self.ranges = [(0, self.size)] if self.size else []
            self._ranged = False
        offset = 0
        while offset < self.size:
            chunk = os.pread(self.fd, min(READ_CHUNK, self.size - offset), offset)
            if not chunk:
                break
            offset += len(chunk)
            yield chunk

    def restart(self, validator: str | None) -> None:
        self.validator = validator
        if self.size or self.resumed or self._ranged:  # a new, empty file needs no reset (common)
            try:
                os.ftruncate(self.fd, 0)
                self.size = 0
                self.ranges = []
                self._ranged = False
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.meta, dir_fd=self._dir)
            except OSError as exc:
                raise os_error("cannot reset staging file for", self.dest, exc) from None
        if self.expected >= RESUME_META_EARLY:
            self._write_meta()  # a big download may be cut by a crash: make it resumable from the start

    def begin_ranges(self, validator: str | None) -> None:
        """A segmented download starts (or resumes) with ``validator``: writes go to offsets from now on
        and the resume metadata records which byte ranges are on disk."""
        self.validator = validator
        self._ranged = True
        self._write_meta()

    def write_at(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            raise os_error("cannot write staging file for", self.dest, exc) from None

    def read_at(self, offset: int, n: int) -> bytes:
        try:
            return os.pread(self.fd, n, offset)
        except OSError as exc:
            raise os_error("cannot read back staging file for", self.dest, exc) from None

    def checkpoint(self, ranges: list[segments.Extent], *, persist: bool = True) -> None:
        """``ranges`` are on disk now (recorded for a resume when ``persist``); a prefix of them starts
        the writeback of its last bytes early, so that the flush before the publish has less to do."""
        self.ranges = ranges
        self.size = segments.prefix(ranges)
        if persist:
            self._write_meta()

    def flush_early(self, start: int, end: int) -> None:
        """Start writing ``[start, end)`` to disk now (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, not
        waiting): the durability still comes from the fdatasync in :meth:`publish`. Best effort."""
        fn = _libc_sync_file_range()
        if fn is not None and end > start:
            fn(self.fd, start, end - start, _SYNC_FILE_RANGE_WRITE)

    def _write_meta(self) -> None:
        with self._meta_lock:
            self._write_meta_locked()

    def _write_meta_locked(self) -> None:
        try:
            tmp = f"{self.meta}.tmp"
            info: dict[str, object] = {"dest": self.dest, "sha256": self.sha256, "validator": self.validator}
            if self._ranged:  # else the file's length is its kept prefix (one stream writes in order)
                info["ranges"] = [list(r) for r in self.ranges]
            data = json.dumps(info).encode()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | FILE_FLAGS, 0o600, dir_fd=self._dir)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.rename(tmp, self.meta, src_dir_fd=self._dir, dst_dir_fd=self._dir)
        except OSError as exc:
            raise os_error("cannot record resume data for", self.dest, exc) from None

    def write(self, data: bytes) -> None:
        """Append ``data`` to the kept prefix (one stream)."""
        self.write_at(self.size, data)
        self.size += len(data)
        self.ranges = [(0, self.size)]

    def publish(self, *, replace: bool = False) -> str:
        """fdatasync, chmod 0444, link into place from the still open descriptor (the directory is fsynced
        by :meth:`syncd.publish.Export.sync_dirs`); the descriptor is closed either way. Returns the
        published file's :func:`identity` as it is at its dest (after the link, which changes its ctime).

        Raises :class:`PublishError` when something is at dest (unless ``replace``), the path is unsafe,
        or the staging file was removed or replaced by someone else."""
        try:
            try:
                if not self.flushed:
                    os.fdatasync(self.fd)  # the bytes and the size: all a reader needs after a power cut
                st = os.fstat(self.fd)
            except OSError as exc:
                raise os_error("cannot flush staging file for", self.dest, exc) from None
            self._check_untouched(st)
            try:
                os.fchmod(self.fd, 0o444)
            except OSError as exc:
                raise os_error("cannot flush staging file for", self.dest, exc) from None
            self._on_publish(self, replace)
            try:
                return identity(os.fstat(self.fd))
            except OSError as exc:
                raise os_error("cannot inspect published file", self.dest, exc) from None
        finally:
            os.close(self.fd)
            self.fd = -1

    def _check_untouched(self, st: os.stat_result) -> None:
        """Defence in depth behind the staging lock: the sha256 was taken over the bytes as they were
        streamed, so a file another writer also wrote into (other size, or linked elsewhere) is refused
        (one removed from staging, link count 0, fails in :meth:`link_into` with its own message)."""
        if st.st_nlink > 1 or st.st_size != self.expected or st.st_size != self.size:
            raise PublishError(
                f"{self.dest}: its staging file was changed by someone else before it could be published; "
                "refused (is another syncd using this staging directory?)"
            )

    def link_into(self, parent: int, name: str, *, replace: bool) -> None:
        """Make ``name`` in the directory ``parent`` this very file (see the module docstring).

        Raises FileExistsError when something is at ``name`` (unless ``replace``), OSError, or
        :class:`PublishError` when the staging file was removed or replaced by someone else."""
        # Resume data goes first: a crash after the link must not leave a "resumable" file that is the dest.
        unlink_names(self._dir, self.meta)
        try:
            if replace:
                self._replace(parent, name)
            else:
                self._link_new(parent, name)
        except FileNotFoundError:
            if _unlinked(self.fd):
                raise PublishError(
                    f"{self.dest}: its staging file was removed before it could be published "
                    "(is another syncd using this staging directory?)"
                ) from None
            raise
        self._drop_name()

    def _link_new(self, parent: int, name: str) -> None:
        if _proc_fd_usable(PROC_FD):
            try:
                os.link(f"{PROC_FD}/{self.fd}", name, dst_dir_fd=parent, follow_symlinks=True)
                return
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
        self._check_name_is_fd()
        if not _renameat2_noreplace(self.part, self._dir, name, parent):
            with contextlib.suppress(FileNotFoundError):
                os.stat(name, dir_fd=parent, follow_symlinks=False)
                raise FileExistsError(errno.EEXIST, "File exists")
            os.rename(self.part, name, src_dir_fd=self._dir, dst_dir_fd=parent)

    def _replace(self, parent: int, name: str) -> None:
        if _proc_fd_usable(PROC_FD):
            fresh = f"{self.stem}.pub"
            unlink_names(self._dir, fresh)
            try:
                os.link(f"{PROC_FD}/{self.fd}", fresh, dst_dir_fd=self._dir, follow_symlinks=True)
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
            else:
                try:
                    os.rename(fresh, name, src_dir_fd=self._dir, dst_dir_fd=parent)
                except BaseException:
                    unlink_names(self._dir, fresh)
                    raise
                return
        self._check_name_is_fd()
        os.rename(self.part, name, src_dir_fd=self._dir, dst_dir_fd=parent)

    def _check_name_is_fd(self) -> None:
        """Without /proc: the staging name must still be the file written through the descriptor."""
        if not _same_file(self._dir, self.part, self.fd):
            raise PublishError(
                f"{self.dest}: its staging file was replaced before it could be published; refused "
                "(is another syncd using this staging directory?)"
            )

    def _drop_name(self) -> None:
        """After the link: remove the staging name, if it is still the published file."""
        with contextlib.suppress(OSError):
            if _same_file(self._dir, self.part, self.fd):
                os.unlink(self.part, dir_fd=self._dir)

    def keep(self) -> None:
        """Close, leaving the partial bytes in staging for the next attempt to resume."""
        if self.fd >= 0 and self.ranges:
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
                os.unlink(name, dir_fd=self._dir)


def _same_file(dir_fd: int, name: str, fd: int) -> bool:
    """Whether ``name`` in ``dir_fd`` is the file open as ``fd`` (raises OSError if ``name`` is gone)."""
    named = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    mine = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)


def _unlinked(fd: int) -> bool:
    try:
        return os.fstat(fd).st_nlink == 0
    except OSError:
        return False


_SYNC_FILE_RANGE_WRITE = 2


def flush_group(staging_fd: int, files: list[StagedFile]) -> bool:
    """Make the bytes of every file in ``files`` durable with one ``syncfs`` of the staging directory's file
    system (group commit: one journal commit and one cache flush instead of one per file), and mark them
    so that their :meth:`StagedFile.publish` skips its own fdatasync.

    False (nothing marked: each file then flushes itself) when ``syncfs`` is missing, fails, or cannot be
    trusted to report a writeback error of any file (Linux before 5.8). Never raises."""
    if len(files) < 2 or not _syncfs_reports_errors():
        return False
    fn = _libc_syncfs()
    if fn is None or fn(staging_fd) != 0:
        return False
    for f in files:
        f.flushed = True
    return True


@functools.cache
def _syncfs_reports_errors() -> bool:
    """Whether this kernel's syncfs returns writeback errors (errseq on the super block, Linux 5.8)."""
    if os.uname().sysname != "Linux":
        return False
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= (5, 8)


@functools.cache
def _libc_syncfs() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


@functools.cache
def _libc_sync_file_range() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


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
