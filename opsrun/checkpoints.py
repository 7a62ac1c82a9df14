"""What a source has handed over, stored in the same transaction as the runs it starts.

A log source's read position and a file source's snapshot of a path say "everything up
to here is taken". Stored after the runs, a crash in between repeats those events at the
next start; stored before, it loses them. So an event carries the checkpoint that is true
once it (and every event before it) is taken, and the state store writes it with the
event's runs (store.record_runs): a restart neither repeats nor loses a line or a change.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

FileStat = tuple[int, int, int, int, int]  # inode, device, size, mtime_ns, ctime_ns


class Checkpoint(NamedTuple):
    """Source state to store with the runs of the events up to it."""

    # (position key, device, inode, offset just after the event's line)
    log_positions: tuple[tuple[str, int, int, int], ...] = ()
    # (trigger key, path, its state as reported; None: gone)
    file_states: tuple[tuple[str, str, FileStat | None], ...] = ()
    # (trigger key, journal cursor of the event's entry)
    journal_cursors: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.log_positions or self.file_states or self.journal_cursors)


def merge(checkpoints: Iterable[Checkpoint | None]) -> Checkpoint:
    """One checkpoint for many, in order: the last word on each position or path wins."""
    positions: dict[str, tuple[str, int, int, int]] = {}
    states: dict[tuple[str, str], tuple[str, str, FileStat | None]] = {}
    cursors: dict[str, tuple[str, str]] = {}
    for cp in checkpoints:
        if not cp:
            continue
        for p in cp.log_positions:
            positions[p[0]] = p
        for s in cp.file_states:
            states[(s[0], s[1])] = s
        for c in cp.journal_cursors:
            cursors[c[0]] = c
    return Checkpoint(tuple(positions.values()), tuple(states.values()),
                      tuple(cursors.values()))
