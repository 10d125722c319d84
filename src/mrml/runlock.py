"""One writer per run folder: `OUT/.lock`, held with flock for the run's life.

The kernel drops a flock when its process exits, crashes or is killed, so a lock file left behind
by a dead run is stale by construction: the next run takes it over. The lock is never opened through
a symlink (O_NOFOLLOW) and only a regular file with one link, owned by this user, is taken (and its
old pid overwritten); anything else placed at `OUT/.lock` is refused in one line, untouched.
"""
from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

from .errors import UsageError

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


class RunLock:
    """Exclusive lock on run folder `out`; `release()` (or process exit) frees it."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        if fcntl is None:
            return self
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise UsageError(f"{self.path.parent} is in use by another mrml train (pid {holder}): "
                                 "wait for it to finish or pick another --out") from None
            # a file system without flock (some network mounts): run unlocked, and say so
            print(f"warning: cannot lock {self.path} ({e.strerror or e}); make sure no other run writes there",
                  file=sys.stderr)
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def _open(self) -> int:
        """The lock file's descriptor; a symlink, a non-regular file, a hard link or another user's file is refused."""
        refuse = (f"{self.path} is not a lock file mrml made ({{}}): remove it (it is left untouched), "
                  "then run again, or pick another --out")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UsageError(refuse.format("a symbolic link")) from None
            if e.errno in (errno.EISDIR, errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP):
                raise UsageError(refuse.format("not a regular file")) from None
            raise UsageError(f"cannot open {self.path}: {e.strerror or e}; choose a writable --out") from None
        st = os.fstat(fd)
        why = ("not a regular file" if not stat.S_ISREG(st.st_mode) else
               f"a file with {st.st_nlink} hard links" if st.st_nlink != 1 else
               "owned by another user" if hasattr(os, "geteuid") and st.st_uid != os.geteuid() else None)
        if why is not None:
            os.close(fd)
            raise UsageError(refuse.format(why))
        return fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (removing it would race a new holder)
            self.fd = None


def holder(out: Path) -> str | None:
    """The pid (as written) of another process holding `out`'s lock now, or None (free, absent, not a plain file,
    or no flock here). Opens nothing for writing and follows no symlink."""
    if fcntl is None:
        return None
    path = Path(out) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # nobody holds it (our shared lock goes with the close below)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            return None
        return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)
