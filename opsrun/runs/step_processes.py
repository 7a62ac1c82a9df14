"""The processes of a run's steps, found again after the process that ran them died.

Every local step runs in its own process group (proc.py), and its leader's pid and start
time are appended to `<state>/runs/<run id>.pids` when it starts — without an fsync: the
file need only outlive a crash of opsrun, and after a power cut no step is left running.
When the run's driver was killed (`kill -9`, the OOM killer), `find` gives what is still
alive of the run: the members of those groups, and any process whose environment carries
the run's `OPSRUN_RUN_ID` (which also finds what left the group with setsid). `stop` ends
them: SIGTERM, then SIGKILL after the grace period.

A group id is trusted only while its leader is the process recorded (same start time) or
a member carries the run's id: once a group is gone its number may be reused.
"""
from __future__ import annotations

import os
import select
import signal
import time
from pathlib import Path
from typing import NamedTuple


class StepProcess(NamedTuple):
    """A live process of a run: pid, and its command line for the record."""

    pid: int
    command: str


def record(runs_folder: Path, run_id: str, pid: int) -> None:
    """Remember a step's process group leader (a best effort: a failure costs only this)."""
    start = _start_time(pid)
    try:
        fd = os.open(runs_folder / f"{run_id}.pids",
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        os.write(fd, f"{pid} {start or 0}\n".encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def forget(runs_folder: Path, run_id: str) -> None:
    """Drop the record of a run whose steps are over."""
    try:
        (runs_folder / f"{run_id}.pids").unlink()
    except OSError:
        pass


def find(runs_folder: Path, run_id: str) -> list[StepProcess]:
    """What still runs of the run's steps (never this process)."""
    groups = _recorded_groups(runs_folder / f"{run_id}.pids")
    marker = f"OPSRUN_RUN_ID={run_id}".encode()
    table = _processes()
    trusted = {pgid for pgid, start in groups.items()
               if (pgid in table and table[pgid][1] == start)
               or any(pg == pgid and _has_env(pid, marker) for pid, (pg, _s) in table.items())}
    me = os.getpid()
    found = [pid for pid, (pgid, _start) in table.items() if pid != me and (
        pgid in trusted or _has_env(pid, marker))]
    return [StepProcess(pid, _command(pid)) for pid in sorted(found)]


def stop(processes: list[StepProcess], grace_s: float) -> list[StepProcess]:
    """SIGTERM each, SIGKILL those left after `grace_s`; return those that needed SIGKILL."""
    _signal([p.pid for p in processes], signal.SIGTERM)
    _wait_gone([p.pid for p in processes], grace_s)
    left = [p for p in processes if _alive(p.pid)]
    _signal([p.pid for p in left], signal.SIGKILL)
    _wait_gone([p.pid for p in left], 5.0)
    return left


def _wait_gone(pids: list[int], timeout_s: float) -> None:
    """Wait until these processes (not our children) have exited, or the timeout passes.

    A pidfd becomes readable when its process exits, so this waits on the kernel rather
    than looking again and again.
    """
    fds: dict[int, int] = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except OSError:
            pass  # gone already (or a kernel without pidfds: nothing to wait on)
    deadline = time.monotonic() + timeout_s
    try:
        while fds and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(list(fds), [], [], left)
            for fd in ready:
                os.close(fd)
                del fds[fd]
    finally:
        for fd in fds:
            os.close(fd)


def _recorded_groups(path: Path) -> dict[int, int]:
    try:
        text = path.read_text("ascii", "replace")
    except OSError:
        return {}
    groups: dict[int, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            groups[int(parts[0])] = int(parts[1])
    return groups


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    return data[data.rfind(b")") + 2:].split()


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _processes() -> dict[int, tuple[int, int]]:
    """pid → (process group, start time) of every live process (zombies left out)."""
    out: dict[int, tuple[int, int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields and len(fields) > 19 and fields[0] != b"Z":
            out[int(entry)] = (int(fields[2]), int(fields[19]))
    return out


def _has_env(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:
        return False


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()[:500]
    except OSError:
        return "?"


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != b"Z"


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
