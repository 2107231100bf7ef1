"""The export: the only module that writes under ``export.root``.

Every ``dest`` is reached by walking its components from a descriptor of the export root with
``O_NOFOLLOW``: a symlink anywhere below the root (a parent directory or the dest itself) is refused, never
followed, so no symlink can redirect a write outside the export. The root itself may be a symlink (a mount
point chosen by ops); it is never created: a missing root means the NFS mount is missing.

A file becomes visible at its ``dest`` only by ``rename`` from the staging directory (same file system),
after its bytes were verified and fsynced and its mode set to 0444; the directory is fsynced after the
rename. Errors leave as :class:`~syncd.errors.PublishError`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from syncd.errors import ConfigError, ExportMissingError, PublishError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_CHUNK = 1 << 20
# Downloads at least this big record their resume metadata when they start (so a crash mid-way can resume);
# smaller ones only when a transport fault leaves them half done.
RESUME_META_EARLY = 8 << 20


class State(Enum):
    MISSING = "missing"  # nothing at dest (parents may be missing too)
    FILE = "file"  # a regular file
    SYMLINK = "symlink"  # a symlink at dest: refused
    OTHER = "other"  # a directory, socket, …: refused
    BLOCKED = "blocked"  # a parent component is a symlink or not a directory: refused


@dataclass(frozen=True)
class Observation:
    """What is at a dest right now, seen without following any symlink."""

    state: State
    size: int = -1
    detail: str = ""


def _os_error(action: str, where: str, exc: OSError) -> PublishError:
    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        reason = "no space left on the export file system"
    return PublishError(f"{action} {where}: {reason}")


class Export:
    """The export root and its staging directory."""

    def __init__(self, root: Path, staging: Path) -> None:
        self.root = root
        self.staging = staging
        self._root_fd = -1
        self._staging_fd = -1
        self._lock = threading.Lock()
        self._unsynced_dirs: set[tuple[str, ...]] = set()

    def open(self, *, create_staging: bool = True) -> None:
        """Check the root, create the staging directory (0700) and hold descriptors of both."""
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
        self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if not create_staging and not self.staging.exists():
            return
        try:
            os.mkdir(self.staging, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise _os_error("cannot create staging directory", str(self.staging), exc) from None
        try:
            self._staging_fd = os.open(self.staging, _DIR_FLAGS)
            sst = os.fstat(self._staging_fd)
        except OSError as exc:
            raise _os_error("cannot open staging directory", str(self.staging), exc) from None
        if sst.st_dev != st.st_dev:
            raise ConfigError(
                "export.staging",
                [
                    f"at 'export.staging': {self.staging} is on another file system than "
                    f"{self.root}; rename into the export would not be atomic"
                ],
            )
        if stat.S_IMODE(sst.st_mode) != 0o700:
            os.fchmod(self._staging_fd, 0o700)

    def sync_dirs(self) -> None:
        """fsync every directory a rename went into since the last call, each once.

        Batching is safe: the file's bytes were fsynced before its rename, so a power cut can at worst
        undo a rename (the dest is missing, and the next pass downloads it again), never expose bad bytes.
        """
        with self._lock:
            dirs, self._unsynced_dirs = self._unsynced_dirs, set()
        for parts in sorted(dirs):
            try:
                with self._walk(list(parts), create=False) as fd:
                    if fd is not None:
                        os.fsync(fd)
            except (OSError, _Blocked):
                continue  # best effort: a vanished directory has nothing left to persist

    def close(self) -> None:
        self.sync_dirs()
        for fd in (self._root_fd, self._staging_fd):
            if fd >= 0:
                os.close(fd)
        self._root_fd = self._staging_fd = -1

    # reading ----------------------------------------------------------------------------------
    def observe(self, dest: str) -> Observation:
        """Look at ``dest`` without following symlinks and without creating anything."""
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
            raise _os_error("cannot inspect", dest, exc) from None
        if stat.S_ISLNK(st.st_mode):
            return Observation(State.SYMLINK, detail="a symlink is at dest")
        if stat.S_ISREG(st.st_mode):
            return Observation(State.FILE, size=st.st_size)
        return Observation(State.OTHER, detail="something other than a regular file is at dest")

    def hash_file(self, dest: str) -> tuple[str, int]:
        """sha256 and size of the regular file at ``dest`` (read without following symlinks)."""
        *parents, name = dest.split("/")
        digest = hashlib.sha256()
        size = 0
        try:
            with self._walk(parents, create=False) as parent:
                if parent is None:
                    raise PublishError(f"{dest} disappeared while being checked")
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
                try:
                    while chunk := os.read(fd, _READ_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                finally:
                    os.close(fd)
        except _Blocked as b:
            raise PublishError(f"{dest}: {b}") from None
        except OSError as exc:
            raise _os_error("cannot read", dest, exc) from None
        return digest.hexdigest(), size

    def make_read_only(self, dest: str) -> None:
        """chmod 0444 the file at ``dest`` (used when adopting a file found in place)."""
        *parents, name = dest.split("/")
        try:
            with self._walk(parents, create=False) as parent:
                if parent is None:
                    raise PublishError(f"{dest} disappeared while being adopted")
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
                try:
                    os.fchmod(fd, 0o444)
                finally:
                    os.close(fd)
        except _Blocked as b:
            raise PublishError(f"{dest}: {b}") from None
        except OSError as exc:
            raise _os_error("cannot set mode 0444 on", dest, exc) from None

    # writing ----------------------------------------------------------------------------------
    def clean_staging(self, keep: set[str] | None = None) -> list[str]:
        """Remove leftovers from the staging directory; return the names removed.

        With ``keep=None`` (start of a pass) partial downloads with their ``.meta`` are kept for resume and
        everything else goes. With a set of dests, only the partials of those dests are kept."""
        if self._staging_fd < 0:
            return []
        names = set(os.listdir(self._staging_fd))
        wanted = {staging_name(d) for d in keep} if keep is not None else None
        removed = []
        for name in sorted(names):
            stem, _, ext = name.rpartition(".")
            resumable = ext in ("part", "meta") and {f"{stem}.part", f"{stem}.meta"} <= names
            if resumable and (wanted is None or stem in wanted):
                continue
            try:
                os.unlink(name, dir_fd=self._staging_fd)
                removed.append(name)
            except (IsADirectoryError, FileNotFoundError):
                continue
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
        validator = None
        create = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                fd = os.open(part, create, 0o600, dir_fd=self._staging_fd)
            except FileExistsError:
                # A partial from an earlier attempt: resume it if it is for this very sha256.
                try:
                    with open(meta, "rb", opener=self._opener) as fh:
                        info = json.loads(fh.read())
                    if info.get("sha256") != sha256:
                        raise ValueError("partial of another version") from None
                    validator = info.get("validator")
                    fd = os.open(part, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._staging_fd)
                except (OSError, ValueError):
                    for name in (part, meta):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(name, dir_fd=self._staging_fd)
                    fd = os.open(part, create, 0o600, dir_fd=self._staging_fd)
            kept = os.lseek(fd, 0, os.SEEK_END)
        except OSError as exc:
            raise _os_error("cannot create staging file for", dest, exc) from None
        need, free = size - min(kept, size), self.free_bytes()
        if need > free:
            os.close(fd)
            if kept == 0:  # nothing worth keeping: leave staging as it was
                for name in (part, meta):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=self._staging_fd)
            raise PublishError(
                f"not enough space on the export for {dest}: {need} bytes still to download, {free} free"
            )
        return StagedFile(self, dest, stem, fd, sha256, validator, kept, size)

    def _opener(self, name: str, flags: int) -> int:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._staging_fd)

    def _publish(self, staged: StagedFile, *, replace: bool) -> None:
        *parents, name = staged.dest.split("/")
        try:
            with self._walk(parents, create=True) as parent:
                assert parent is not None
                try:
                    st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                except FileNotFoundError:
                    pass
                else:
                    if stat.S_ISLNK(st.st_mode):
                        raise PublishError(f"{staged.dest}: a symlink is at dest; refused")
                    if not stat.S_ISREG(st.st_mode) or not replace:
                        raise PublishError(f"{staged.dest}: something appeared at dest; refused")
                os.rename(staged.part, name, src_dir_fd=self._staging_fd, dst_dir_fd=parent)
            with self._lock:
                self._unsynced_dirs.add(tuple(parents))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged.meta, dir_fd=self._staging_fd)
        except _Blocked as b:
            raise PublishError(f"{staged.dest}: {b}") from None
        except OSError as exc:
            raise _os_error("cannot publish", staged.dest, exc) from None

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
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
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
        """fdatasync, chmod 0444, rename into place (the directory is fsynced by :meth:`Export.sync_dirs`)."""
        try:
            os.fdatasync(self.fd)  # the bytes and the size: all a reader needs after a power cut
            os.fchmod(self.fd, 0o444)
        except OSError as exc:
            raise _os_error("cannot flush staging file for", self.dest, exc) from None
        finally:
            os.close(self.fd)
            self.fd = -1
        self.export._publish(self, replace=replace)

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
