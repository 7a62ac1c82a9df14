"""The lock that says "this process drives this run", held while it runs or waits.

`<state>/runs/<run id>.lock` is flocked by the process driving the run (`opsrun run`,
`resume`, `dispatch`, or the service) and holds its pid. The kernel drops the lock when
the process dies, so `opsrun resume`, `cancel` and the service's start-up can tell a run
nobody drives any more from one another process is still working on or waiting for.
Once the run has ended the lock file is removed, still locked (with the record of its
step processes), so that the folder does not keep one file per run ever made: whoever
opens the name later makes a new file, locks it, and finds the run ended.
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from opsrun import file_lock
from opsrun.errors import StateError, UsageError
from opsrun.runs import step_processes
from opsrun.store import FINAL_RUN_STATES, Store


class RunBusy(UsageError):
    """Another process drives the run."""


class DriverLock:
    """A run's driver lock, held by this process; `take` it, `release` it once."""

    def __init__(self, fd: int, path: Path, run_id: str) -> None:
        self.fd, self.path, self.run_id = fd, path, run_id

    @classmethod
    def take(cls, state_dir: Path, run_id: str) -> DriverLock | None:
        """The lock of `run_id`, or None if another process holds it."""
        path = runs_dir(state_dir) / f"{run_id}.lock"
        fd = file_lock.open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:  # a full disk: say so before anything runs
            os.close(fd)
            raise StateError(f"cannot write {path}: {e.strerror}; nothing was run (free some "
                             "space on the state folder's disk)") from None
        return cls(fd, path, run_id)

    def release(self, *, ended: bool = False) -> None:
        """Let go; for a run that has `ended`, remove its files first, still locked."""
        if ended:
            step_processes.forget(self.path.parent, self.run_id)
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass  # a lock file left behind does no harm
        os.close(self.fd)


@contextmanager
def driving(state_dir: Path, run_id: str, store: Store) -> Iterator[None]:
    """Hold the run's driver lock while the block runs or waits; RunBusy if another has it."""
    lock = DriverLock.take(state_dir, run_id)
    if lock is None:
        raise RunBusy(f"run {run_id} is still being run or waited on by another opsrun "
                      f"process (pid {driver_pid(state_dir, run_id) or '?'}); stop that "
                      "process first, or answer it with opsrun approve/deny")
    ended = False
    try:
        yield
        run = store.get_run(run_id)
        ended = run is not None and run.state in FINAL_RUN_STATES
    finally:
        lock.release(ended=ended)


def runs_dir(state_dir: Path) -> Path:
    """`<state>/runs`: run locks and sockets; as open to the group as the state folder is."""
    folder = state_dir / "runs"
    if not folder.is_dir():
        st = state_dir.stat()
        folder.mkdir(exist_ok=True)
        try:
            os.chown(folder, -1, st.st_gid)
        except OSError:
            pass
        os.chmod(folder, 0o700 | (st.st_mode & 0o050))
    return folder


def driver_pid(state_dir: Path, run_id: str) -> int | None:
    """The pid of the process driving a run, if one holds its lock."""
    path = state_dir / "runs" / f"{run_id}.lock"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isascii() and text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
