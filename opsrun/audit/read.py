"""Reading the audit log: its lines across segments, oldest first, the last ones, and those
appended while one follows it (across rotations); and what recovery needs from its tail.

Readers take no lock here; the commands hold `reading_lock` where a consistent view of
several files matters.
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Collection, Generator, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from opsrun.audit.format import is_record, list_segments


def finished_runs(path: Path, run_ids: Collection[str], *,
                  tail_bytes: int = 4 * 1024 * 1024) -> dict[str, dict[str, Any]]:
    """The `run.finished` records of these runs in the last `tail_bytes` of the log.

    For recovery after a crash: a run's end is recorded here before the state store hears
    of it, so a process killed in between leaves a run that ended but is stored `running`.
    """
    wanted = set(run_ids)
    found: dict[str, dict[str, Any]] = {}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return found
    try:
        size = os.fstat(fd).st_size
        start = max(0, size - tail_bytes)
        data = os.pread(fd, size - start, start)
    finally:
        os.close(fd)
    for line in data.split(b"\n")[1 if start else 0:]:
        if b'"kind":"run.finished"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn line
        if isinstance(record, dict) and record.get("run_id") in wanted:
            found[record["run_id"]] = record
    return found


def files(log_path: Path) -> list[Path]:
    """Every file of the log, oldest first: its closed segments, then the current file."""
    return [p for _, p in list_segments(log_path)] + [log_path]


def record(line: bytes) -> dict[str, Any] | None:
    """The record a line holds, or None if it is not a complete record."""
    if not is_record(line):
        return None
    value: dict[str, Any] = json.loads(line)
    return value


def all_lines(log_path: Path) -> Iterator[bytes]:
    """Every line of every file of the log, oldest first, without newlines."""
    for file in files(log_path):
        try:
            with open(file, "rb") as f:
                for line in f:
                    yield line.rstrip(b"\n")
        except FileNotFoundError:
            continue


def last_lines(log_path: Path, count: int, current_size: int | None = None) -> list[bytes]:
    """The last `count` lines of the log (the current file read up to `current_size`)."""
    out: list[bytes] = []
    for file in reversed(files(log_path)):
        try:
            data = _tail_lines(file, count - len(out),
                               current_size if file == log_path else None)
        except FileNotFoundError:
            continue
        out[:0] = data
        if len(out) >= count:
            break
    return out[-count:] if count else []


def _tail_lines(file: Path, count: int, size: int | None = None) -> list[bytes]:
    with open(file, "rb") as f:
        size = f.seek(0, os.SEEK_END) if size is None else size
        window = 64 * 1024
        while True:
            start = max(0, size - window)
            f.seek(start)
            lines = f.read(size - start).split(b"\n")
            if lines and lines[-1] == b"":
                lines.pop()
            if start == 0 or len(lines) > count:
                return lines[-count:] if count else []
            window *= 8


def open_at_end(log_path: Path, start: bool = False) -> BinaryIO | None:
    """The current file, positioned at its end (or start); None if there is none yet."""
    try:
        f = open(log_path, "rb")
    except FileNotFoundError:
        return None
    if not start:
        f.seek(0, os.SEEK_END)
    return f


def follow(log_path: Path, f: BinaryIO | None, poll_s: float,
           stop: threading.Event) -> Iterator[bytes | None]:
    """Lines appended to `f` and to the files after it, across rotations, until `stop`.

    None stands for an incomplete record at the end of a segment, which is skipped.
    """
    pending = b""
    while not stop.wait(poll_s):
        if f is None:
            f = open_at_end(log_path, start=True)
            continue
        lines, pending = _split(pending + f.read())
        yield from lines
        if _moved(log_path, f):
            lines, pending = _split(pending + f.read())  # the old file's last words
            yield from lines
            if pending:
                yield None
            pending = b""
            followed = os.fstat(f.fileno()).st_ino
            f.close()
            f = yield from _catch_up(log_path, followed)
    if f is not None:
        f.close()


def _split(data: bytes) -> tuple[list[bytes], bytes]:
    lines = data.split(b"\n")
    return lines[:-1], lines[-1]


def _moved(log_path: Path, f: BinaryIO) -> bool:
    try:
        return os.stat(log_path).st_ino != os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return False  # between the rename and the new file: look again next time


def _catch_up(log_path: Path, followed: int
              ) -> Generator[bytes | None, None, BinaryIO | None]:
    """The lines of the segments closed after the file that was followed; returns the
    current file, opened at its start.

    Several rotations may have happened between two looks, and more may happen while
    catching up: repeat until the list of segments holds still.
    """
    while True:
        segments = list_segments(log_path)
        inodes = [_inode(p) for _, p in segments]
        if followed in inodes:
            for _, path in segments[inodes.index(followed) + 1:]:
                with open(path, "rb") as closed:
                    lines, rest = _split(closed.read())
                yield from lines
                if rest:
                    yield None
                followed = _inode(path)
        f = open_at_end(log_path, start=True)
        if [n for n, _ in list_segments(log_path)] == [n for n, _ in segments]:
            return f
        if f is not None:
            f.close()  # rotated again meanwhile: what was opened is a segment now


def _inode(path: Path) -> int:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return -1
