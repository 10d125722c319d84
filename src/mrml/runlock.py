"""One writer per run folder: `OUT/.lock`, held with flock for the run's life.

The kernel drops a flock when its process exits, crashes or is killed, so a lock file left behind
by a dead run is stale by construction: the next run takes it over.
"""
from __future__ import annotations

import errno
import os
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
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (removing it would race a new holder)
            self.fd = None
