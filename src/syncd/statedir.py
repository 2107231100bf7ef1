"""The state directory and its lock: safe to keep state in, one syncd at a time.

The state directory (``[state] directory``) holds the ledger, the bare clone and ``lock``. Whoever can
write there can swap the ledger or the lock for a symlink, so it must belong to the user syncd runs as and
be writable by no one else (syncd creates it 0700); state files are opened without following symlinks.
``lock`` is an exclusive ``flock`` held for the life of the process (``syncd run``, ``syncd sync``); it
holds the holder's pid for the message a second syncd prints.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path
from typing import IO

from syncd.errors import LedgerError, LedgerRefusedError, LockHeldError


def check_state_dir(state_dir: Path, *, create: bool) -> bool:
    """Check that ``state_dir`` is safe to keep syncd's state in; ``create`` makes it (0700) if missing.

    Out: whether it exists. Raises :class:`LedgerRefusedError` if it is not a directory, is owned by
    another user than the one syncd runs as, or is writable by group or others (whoever can write there
    can swap the ledger or the lock for a symlink); :class:`LedgerError` if it cannot be inspected."""
    if create:
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise LedgerError(f"cannot create state directory {state_dir}: {exc.strerror}") from None
    try:
        st = os.stat(state_dir)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise LedgerError(f"cannot inspect state directory {state_dir}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise LedgerRefusedError(f"state directory {state_dir} is not a directory")
    if st.st_uid != os.geteuid():
        raise LedgerRefusedError(
            f"state directory {state_dir} is owned by uid {st.st_uid}, not by the user syncd runs as "
            f"(uid {os.geteuid()}): chown it to that user"
        )
    if st.st_mode & 0o022:
        raise LedgerRefusedError(
            f"state directory {state_dir} is writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): chmod go-w it (syncd creates it 0700)"
        )
    return True


def refuse_link(path: Path) -> None:
    """Refuse a symlink or a non-file where a state file belongs (missing is fine)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise LedgerError(f"cannot inspect {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise LedgerRefusedError(f"{path} is a symlink; syncd does not follow it: remove it")
    if not stat.S_ISREG(st.st_mode):
        raise LedgerRefusedError(f"{path} is not a regular file: remove it")


class StateLock:
    """An exclusive ``flock`` on ``<state>/lock``, held for the life of the process that took it."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "lock"
        self._fh: IO[str] | None = None

    def acquire(self, *, readonly: bool = False) -> None:
        """Take the lock or raise :class:`LockHeldError` naming the holder.

        The lock file is opened with ``O_NOFOLLOW``: a symlink there is refused
        (:class:`LedgerRefusedError`), never followed and truncated. ``readonly`` (a dry run) creates
        and writes nothing: without a state directory or a lock file there is nothing to lock."""
        if not check_state_dir(self.path.parent, create=not readonly):
            return
        flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a FIFO there must not hang us
        flags |= os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT
        try:
            fd = os.open(self.path, flags, 0o600)
        except FileNotFoundError:
            return  # readonly, and no syncd ever ran a pass here
        except OSError as exc:
            if os.path.islink(self.path):
                raise LedgerRefusedError(
                    f"lock file {self.path} is a symlink; syncd does not follow it: remove it"
                ) from None
            raise LedgerError(f"cannot open lock file {self.path}: {exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise LedgerRefusedError(f"lock file {self.path} is not a regular file: remove it")
        fh = os.fdopen(fd, "r" if readonly else "r+", encoding="utf-8", errors="replace")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _pid_in(fh)
            fh.close()
            raise LockHeldError(
                f"another syncd (pid {holder}) is running on state directory {self.path.parent}; "
                "wait for it to finish or stop it (systemctl stop syncd)"
            ) from None
        if not readonly:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _pid_in(fh: IO[str]) -> str:
    """The holder's pid as written in the lock file, if it looks like one."""
    fh.seek(0)
    text = fh.read(32).strip()
    return text if text.isdigit() else "unknown"
