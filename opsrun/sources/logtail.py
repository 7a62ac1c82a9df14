"""Log source: follows files like `tail -F` and turns matching lines into events.

Following. Each log trigger follows its path, or every file its glob matches (the glob is
listed again every second; a file that appears later is read from its start). A missing
file is waited for. At each end of file the path is looked at again: another inode under
the name means a rotation by rename and create, a file shorter than what was read (or
whose last bytes read changed) a truncation in place (copytruncate, `> file`). After a
rename the old file stays open for `rotate_grace_s` to take lines its writers still add;
after a copytruncate the lines between the last position and the truncation are taken
from the copy (the sibling file whose bytes match what was read), when it can be found.
A last line without its newline waits until it is completed. `from: end` (default)
starts a file present at the start after its last complete line; `from: start` reads it
all. Appends are noticed by polling every `poll_interval_s` (two syscalls per file).

Positions. For each followed file the store keeps `(device, inode, offset)` under
`<trigger key>:<path>`; offset is always just after a complete line. Each event carries
the position that holds once it is taken (see opsrun.checkpoints), and the service stores
it in the transaction that records the event's runs: a restart neither repeats nor loses
a line. Other callers of `emit` get at-least-once: the position is also stored after
`emit` returns, and a crash in between repeats that batch, never loses it. Positions
that produced no event are stored at most every second and at stop (re-reading lines that
match nothing emits nothing). At a restart the file is found again by its inode, also
when it was rotated meanwhile (its lines after the position are read first).

Speed. Files are read in 1 MiB chunks and matched a chunk at a time (see `loglines`: a
literal the regex needs is looked for with `bytes.find` first, or the regex runs over the
whole chunk, and only the lines it touches are matched alone).

Events: `trigger`, `path`, `line` (no newline; a trailing CR dropped), `lineno`, and one
field per named group (a group named like one of these is ignored).
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from opsrun.checkpoints import Checkpoint
from opsrun.event import Event, now_rfc3339
from opsrun.globs import compile_glob
from opsrun.ids import new_id
from opsrun.runbook import LogTrigger
from opsrun.sources.base import Emit, PositionStore, log
from opsrun.sources.loglines import CHUNK, Hit, LineMatcher, Reader

if TYPE_CHECKING:
    from opsrun.store import LogPosition

ROUND_BYTES = 4 * CHUNK  # read per file per round, so that one busy file does not starve
COMMIT_EVERY_S = 1.0
GLOB_EVERY_S = 1.0
RESERVED = frozenset({"source", "id", "time", "trigger", "path", "line", "lineno"})
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")


@dataclass
class _Follow:
    """One followed path of one trigger."""

    key: str  # where its position is stored
    trigger_key: str
    trigger: LogTrigger
    matcher: LineMatcher
    path: str
    reader: Reader | None = None
    drains: list[Reader] = field(default_factory=list)  # rotated away, still read
    stored: tuple[int, int, int] | None = None
    stored_at: float = 0.0
    new_file: bool = False  # a file that appeared after the start: read from its start

    def readers(self) -> list[Reader]:
        return [*self.drains, *([self.reader] if self.reader else [])]


class LogSource:
    """Follows the files of log triggers; `poll(emit)` does one round."""

    name = "log"

    def __init__(self, follows: Sequence[tuple[str, LogTrigger]], positions: PositionStore,
                 *, poll_interval_s: float = 0.05, rotate_grace_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._triggers = [(k, t, LineMatcher(t.pattern)) for k, t in follows]
        self._positions = positions
        self._interval = poll_interval_s
        self._grace = rotate_grace_s
        self._clock = clock
        self._follows: dict[str, _Follow] = {}
        self._globbed_at = -GLOB_EVERY_S
        self._started = False
        self._failed = False  # emit raised: what was read since the last commit is not taken
        self._unreadable: set[str] = set()  # paths there but not openable, already logged
        self.ready = threading.Event()
        """Set once every file present at the start has its starting position."""

    def run(self, stop: threading.Event, emit: Emit) -> None:
        """Follow until `stop` is set, then store every position."""
        while not stop.is_set():
            if not self.poll(emit):
                stop.wait(self._interval)
        self.commit()

    def poll(self, emit: Emit, *, glob_now: bool = False) -> int:
        """Read what is new in every file, emit, store positions; return bytes read."""
        now = self._clock()
        if glob_now or now - self._globbed_at >= GLOB_EVERY_S:
            self._globbed_at = now
            self._discover()
            self.ready.set()
        events: list[Event] = []
        total = sum(self._step(f, events, now) for f in list(self._follows.values()))
        if events:
            self._failed = True
            emit(events)
            self._failed = False
        touched = {e.data["path"] for e in events}
        for f in self._follows.values():
            if f.path in touched or now - f.stored_at >= COMMIT_EVERY_S:
                self._store(f, now)
        return total

    def commit(self) -> None:
        """Store every position now; nothing once `emit` has raised (see base)."""
        if not self._failed:
            for f in self._follows.values():
                self._store(f, self._clock())

    def close(self) -> None:
        """Close every file."""
        for f in self._follows.values():
            for r in f.readers():
                r.close()
        self._follows.clear()

    # ── which files ─────────────────────────────────────────────────────────

    def _discover(self) -> None:
        first, self._started = not self._started, True
        for tkey, trigger, matcher in self._triggers:
            glob = compile_glob(trigger.path)
            for path in [glob.pattern] if glob.literal else glob.expand():
                key = f"{tkey}:{path}"
                if key not in self._follows:
                    f = self._follows[key] = _Follow(key, tkey, trigger, matcher, path,
                                                     new_file=not first)
                    if first or not self._adopt(f):
                        self._resume(f)
        for key, f in list(self._follows.items()):
            if not f.readers() and not compile_glob(f.trigger.path).literal \
                    and not os.path.exists(f.path):
                del self._follows[key]  # a globbed file that is gone and fully read

    def _adopt(self, f: _Follow) -> bool:
        """A file renamed within the glob is one already open: carry on with it."""
        try:
            st = os.stat(f.path)
        except OSError:
            return False
        for g in self._follows.values():
            if g.trigger_key != f.trigger_key or g is f:
                continue
            for r in g.readers():
                if (r.dev, r.ino) == (st.st_dev, st.st_ino):
                    if r is g.reader:
                        g.reader = None
                    else:
                        g.drains.remove(r)
                    f.reader = r
                    return True
        return False

    def _resume(self, f: _Follow) -> None:
        pos = self._positions.get_log_position(f.key)
        exists = os.path.exists(f.path)
        if pos is None:
            start = None if (f.trigger.start_at == "end" and not f.new_file) else 0
            f.reader = Reader.open(f.path, start, 0 if start == 0 else None) if exists else None
            return
        f.stored = (pos.device, pos.inode, pos.offset)
        r = Reader.open(f.path, pos.offset, None) if exists else None
        if r is not None and (r.dev, r.ino) == (pos.device, pos.inode):
            size = os.fstat(r.fd).st_size
            if size >= pos.offset and (pos.offset == 0 or r.tail.endswith(b"\n")):
                f.reader = r
                return
            log.warning("log %s: truncated or rewritten while opsrun was down; reading it "
                        "from the start", f.path)
        else:
            old = _find_sibling(f.path, lambda s: (s.st_dev, s.st_ino) == (pos.device,
                                                                          pos.inode))
            rest = Reader.open(old, pos.offset, None) if old else None
            if rest is not None:
                f.drains.append(rest)  # rotated while down: finish the old file first
            else:
                log.warning("log %s: rotated while opsrun was down and the old file is gone "
                            "or compressed; lines written to it after the stored position "
                            "are not seen", f.path)
        if r is not None:
            r.close()
        f.reader = Reader.open(f.path, 0, 0) if exists else None

    # ── reading ─────────────────────────────────────────────────────────────

    def _step(self, f: _Follow, events: list[Event], now: float) -> int:
        total = 0
        for r in list(f.drains):
            got = self._read(f, r, events)
            total += got
            if got:
                r.idle_since = now
            elif now - r.idle_since >= self._grace:
                self._emit_found(f, r.finish(f.matcher), events, self._position(f, r))
                f.drains.remove(r)
                r.close()
        if f.reader is None:
            f.reader = Reader.open(f.path, 0, 0)  # appeared (again): all of it is new
            if f.reader is None:
                self._note_unreadable(f.path)
                return total
            self._unreadable.discard(f.path)
        reader = f.reader
        got = self._read(f, reader, events)
        if not got:
            self._check_rotation(f, reader, now, events)
            if f.reader is not None and f.reader is not reader:
                got = self._read(f, f.reader, events)  # the new file, at once
        return total + got

    def _note_unreadable(self, path: str) -> None:
        """A file that is there but cannot be opened is said once, not skipped in silence."""
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except FileNotFoundError:
            self._unreadable.discard(path)  # not there (yet): waited for, as tail -F does
        except OSError as e:
            if path not in self._unreadable:
                self._unreadable.add(path)
                log.warning("log %s: cannot be opened: %s; its lines are read once it can be",
                            path, e.strerror)

    def _read(self, f: _Follow, r: Reader, events: list[Event]) -> int:
        if r.rewritten():
            self._truncated(f, r, events)
        found, total = r.read(f.matcher, ROUND_BYTES)
        self._emit_found(f, found, events, self._position(f, r))
        return total

    @staticmethod
    def _position(f: _Follow, r: Reader) -> Callable[[int], tuple[int, int, int]] | None:
        """Where the follow stands once a line of `r` is taken: just after that line in the
        followed file; for a rotated-away file still read, the followed (new) file's
        position as it is now, whose lines up to there were taken in earlier rounds."""
        if r is f.reader:
            return lambda after: (r.dev, r.ino, after)
        current = f.reader
        if current is None:
            return None
        at = (current.dev, current.ino, current.offset)
        return lambda after: at

    def _emit_found(self, f: _Follow, found: list[Hit], events: list[Event],
                    position: Callable[[int], tuple[int, int, int]] | None) -> None:
        """Events for matching lines, each with the position to store with its runs (see
        opsrun.checkpoints): `position(offset after the line)` gives (device, inode,
        offset) of the followed file once the line is taken."""
        if not found:
            return
        now = now_rfc3339()
        for lineno, after, text, groups in found:
            extra = {k: v for k, v in groups.items() if k not in RESERVED}
            mark = None if position is None else Checkpoint(((f.key, *position(after)),))
            events.append(Event("log", {
                "source": "log", "id": new_id(), "time": now, "trigger": f.trigger_key,
                "path": f.path, "line": text, "lineno": lineno, **extra}, mark))

    def _check_rotation(self, f: _Follow, r: Reader, now: float, events: list[Event]) -> None:
        try:
            st = os.stat(f.path)
        except OSError:
            st = None
        if st is not None and (st.st_dev, st.st_ino) == (r.dev, r.ino):
            return  # same file; a truncation shows as rewritten() at the next read
        log.info("log %s: rotated (%s); following the new file", f.path,
                 "removed or renamed" if st is None else "a new file under the name")
        # What was written before the rename came after the read that found nothing: it
        # is older than anything in the new file, so it is taken first.
        while self._read(f, r, events):
            pass
        r.idle_since = now
        f.drains.append(r)  # writers may still add to the old file for a moment
        f.reader = Reader.open(f.path, 0, 0) if st is not None else None

    def _truncated(self, f: _Follow, r: Reader, events: list[Event]) -> None:
        log.info("log %s: truncated; reading it from the start", f.path)
        copy = _find_sibling(f.path, lambda s: s.st_size >= r.read_pos and
                             (s.st_dev, s.st_ino) != (r.dev, r.ino), r.tail, r.read_pos)
        rest = Reader.open(copy, r.offset, r.lineno) if copy else None
        if rest is not None:  # copytruncate: what came after our position is in the copy
            rest.counted_at = r.counted_at  # the copy holds the bytes not counted yet
            # Once the copy's lines are taken, the truncated file is to be read from 0.
            restarted = (r.dev, r.ino, 0)
            while True:
                found, got = rest.read(f.matcher, ROUND_BYTES)
                self._emit_found(f, found, events, lambda after: restarted)
                if not got:
                    break
            self._emit_found(f, rest.finish(f.matcher), events, lambda after: restarted)
            rest.close()
        r.restart()

    def _store(self, f: _Follow, now: float) -> None:
        if f.reader is None:
            return
        pos = (f.reader.dev, f.reader.ino, f.reader.offset)
        if pos != f.stored:
            self._positions.set_log_position(f.key, *pos)
            f.stored = pos
        f.stored_at = now


class Backlog(NamedTuple):
    """What a followed file holds beyond its stored position (see `backlog`)."""

    bytes: int  # bytes the source reads when it starts
    rotated: bool  # another file carries the name now
    lost: bool  # rotated, and the old file is gone or compressed: its rest is not read
    truncated: bool  # the same file, shorter than the position: read from its start


def backlog(path: str, pos: LogPosition) -> Backlog:
    """How much of `path` the source will read at start from `pos`, the way `_resume` does."""
    try:
        st: os.stat_result | None = os.stat(path)
    except OSError:
        st = None
    if st is not None and (st.st_dev, st.st_ino) == (pos.device, pos.inode):
        if st.st_size >= pos.offset:
            return Backlog(st.st_size - pos.offset, False, False, False)
        return Backlog(st.st_size, False, False, True)
    old = _find_sibling(path, lambda s: (s.st_dev, s.st_ino) == (pos.device, pos.inode))
    rest = 0
    if old is not None:
        try:
            rest = max(0, os.stat(old).st_size - pos.offset)
        except OSError:
            old = None
    return Backlog(rest + (st.st_size if st is not None else 0), True, old is None, False)


def _find_sibling(path: str, accept: Callable[[os.stat_result], bool], tail: bytes = b"",
                  end: int = 0) -> str | None:
    """A rotated copy of `path` beside it (`app.log.1`, `app.log-2024…`), newest first."""
    folder, name = os.path.split(path)
    try:
        names = [n for n in os.listdir(folder or ".") if n.startswith(name) and n != name
                 and not n.endswith(_COMPRESSED)]
    except OSError:
        return None
    found = []
    for n in names:
        p = os.path.join(folder, n)
        try:
            st = os.stat(p)
        except OSError:
            continue
        if accept(st):
            found.append((st.st_mtime_ns, p))
    for _, p in sorted(found, reverse=True):
        if not tail or _bytes_at(p, end - len(tail), len(tail)) == tail:
            return p
    return None


def _bytes_at(path: str, offset: int, size: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)
