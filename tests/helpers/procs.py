"""Looking at processes from the outside, through /proc."""
from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def processes_of(run_id: str) -> list[int]:
    """Live processes whose environment names this run (as every step process's does)."""
    found = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"OPSRUN_RUN_ID={run_id}".encode() in env and alive(pid):
            found.append(pid)
    return found
