"""Advisory file locks (flock) as context managers.

flock locks belong to an open file description: two threads sharing one descriptor do not
exclude each other, and a forked child shares its parent's lock. Callers that need
exclusion between threads add a threading.Lock; callers that may fork reopen the lock file.
"""
from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from opsrun.errors import StateError


class LockTimeout(StateError):
    """Another process held a lock for longer than the caller was willing to wait."""


def open_lock_file(path: Path) -> int:
    """Open (creating with mode 0600) a file used only to be locked; return its descriptor."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        hint = _LIMITS.get(e.errno or 0, "check that its folder exists and is writable by this "
                                         "user")
        raise StateError(f"cannot open the lock file {path}: {e.strerror}; {hint}") from e


_LIMITS = {
    errno.EMFILE: "this process's limit on open files is reached: raise it with ulimit -n "
                  "(LimitNOFILE= in a systemd unit)",
    errno.ENFILE: "the system's limit on open files is reached (fs.file-max)",
    errno.ENOSPC: "the disk is full: free some space",
    errno.EROFS: "the file system is read-only",
}


@contextmanager
def flock(fd: int, *, shared: bool = False, timeout_s: float | None = None,
          what: str = "the lock") -> Iterator[None]:
    """Hold an flock on `fd` for the duration of the block.

    Without `timeout_s` this waits as long as it takes. With it, a lock still held by someone
    else after `timeout_s` seconds raises LockTimeout naming `what`.
    """
    op = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    if timeout_s is None:
        fcntl.flock(fd, op)  # EINTR is retried by Python itself (PEP 475)
    else:
        _acquire_with_deadline(fd, op, timeout_s, what)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


@contextmanager
def locked_path(path: Path, *, shared: bool = False,
                timeout_s: float | None = None) -> Iterator[int]:
    """Open `path` as a lock file, lock it, and yield its descriptor; close it afterwards."""
    fd = open_lock_file(path)
    try:
        with flock(fd, shared=shared, timeout_s=timeout_s, what=str(path)):
            yield fd
    finally:
        os.close(fd)


def _acquire_with_deadline(fd: int, op: int, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    pause = 0.0002
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            raise LockTimeout(f"{what} was held by another process for more than "
                              f"{timeout_s:g}s; find it with `fuser -v {what}` "
                              "(a stopped or hung opsrun?) and try again")
        # Short pauses first: under contention the holder usually finishes within a
        # millisecond (one fsync); back off so a long hold does not burn a core.
        time.sleep(pause)
        pause = min(pause * 2, 0.01)

