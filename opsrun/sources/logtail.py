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
`<trigger key>:<path>`; offset is always just after a complete line. A batch of events
is handed to `emit` first and the position is stored after `emit` returns: a crash in
between repeats that batch at the next start, never loses it (at-least-once). Positions
that produced no event are stored at most every second and at stop (re-reading lines that
match nothing emits nothing). At a restart the file is found again by its inode, also
when it was rotated meanwhile (its lines after the position are read first).

Speed. Files are read in 1 MiB chunks and matched a chunk at a time: a regex that needs
a literal text (`Out of memory: Killed process`) is first looked for with `bytes.find`
in the whole chunk, and only the lines holding it are decoded and matched.

Events: `trigger`, `path`, `line` (no newline; a trailing CR dropped), `lineno`, and one
field per named group (a group named like one of these is ignored).
"""
from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from opsrun.event import Event, now_rfc3339
from opsrun.globs import compile_glob
from opsrun.ids import new_id
from opsrun.runbook import LogTrigger
from opsrun.sources.base import Emit, PositionStore, log

try:  # the regex parser; only used to find a literal to pre-filter with
    import re._parser as _sre_parse  # type: ignore[import-not-found]
    from re._constants import LITERAL, SUBPATTERN  # type: ignore[import-not-found]
except ImportError:  # Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]
    from sre_constants import LITERAL, SUBPATTERN  # type: ignore[no-redef]

CHUNK = 1 << 20
MAX_LINE = 1 << 20  # a longer line is cut to this many bytes
ROUND_BYTES = 4 * CHUNK  # read per file per round, so that one busy file does not starve
TAIL = 64  # last bytes read, kept to notice a file rewritten under us
COMMIT_EVERY_S = 1.0
GLOB_EVERY_S = 1.0
RESERVED = frozenset({"source", "id", "time", "trigger", "path", "line", "lineno"})
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")


class LineMatcher:
    """A trigger's `match:` applied to whole chunks of complete lines."""

    def __init__(self, pattern: re.Pattern[str] | None) -> None:
        self.pattern = pattern
        self.literal = required_literal(pattern) if pattern is not None else None

    def scan(self, buf: bytes) -> list[tuple[int, str, dict[str, Any]]]:
        """(line index, text, named groups) of each matching line; `buf` ends with b"\\n"."""
        if self.pattern is None:
            return [(i, _text(b), {}) for i, b in enumerate(buf.split(b"\n")[:-1])]
        search = self.pattern.search
        out = []
        if self.literal is not None:
            find, lit, count, counted = buf.find, self.literal, 0, 0
            at = find(lit)
            while at != -1:
                start = buf.rfind(b"\n", 0, at) + 1
                end = buf.find(b"\n", at)
                count += buf.count(b"\n", counted, start)
                counted = start
                text = _text(buf[start:end])
                m = search(text)
                if m is not None:
                    out.append((count, text, m.groupdict()))
                at = find(lit, end + 1)
            return out
        lines = buf.decode("utf-8", "replace").split("\n")
        lines.pop()
        if b"\r" in buf:  # most logs have no CR: skip the per-line strip
            lines = [s[:-1] if s.endswith("\r") else s for s in lines]
        return [(i, s, m.groupdict()) for i, s in enumerate(lines)
                if (m := search(s)) is not None]


def required_literal(pattern: re.Pattern[str]) -> bytes | None:
    """The longest text every match must contain (at least 3 bytes), as UTF-8, or None."""
    if pattern.flags & re.IGNORECASE:
        return None
    try:
        parsed = _sre_parse.parse(pattern.pattern, pattern.flags)
    except Exception:  # an internal parser: when in doubt, do not pre-filter
        return None
    best, run = "", ""
    for op, av in _flat(parsed):
        if op is LITERAL and chr(av) not in "\n\r\ufffd":
            run += chr(av)
            best = max(best, run, key=len)
        else:
            run = ""
    data = best.encode("utf-8")
    return data if len(data) >= 3 else None


def _flat(items: Any) -> Any:
    for op, av in items:
        if op is SUBPATTERN and not (av[1] & re.IGNORECASE):
            yield from _flat(av[3])  # a group is as required as its surroundings
        else:
            yield op, av


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").removesuffix("\r")


@dataclass
class _Reader:
    """One open file and how far it is handled."""

    path: str
    fd: int
    dev: int
    ino: int
    offset: int  # just after the last complete line handled
    read_pos: int  # how far the file was read (offset + the pending partial line)
    lineno: int | None  # complete lines before `offset`; None until an event needs it
    partial: bytes = b""
    skipping: bool = False  # inside an over-long line, dropping bytes until its newline
    tail: bytes = b""
    idle_since: float = 0.0

    def close(self) -> None:
        os.close(self.fd)


def _open(path: str, offset: int | None, lineno: int | None) -> _Reader | None:
    """Open a file at `offset` (None: after its last complete line)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    skipping = False
    if offset is None:
        look = os.pread(fd, min(st.st_size, 65536), max(0, st.st_size - 65536))
        nl = look.rfind(b"\n")
        offset = st.st_size - len(look) + nl + 1 if nl >= 0 or st.st_size <= 65536 \
            else st.st_size
        skipping = nl < 0 and st.st_size > 65536
    r = _Reader(path, fd, st.st_dev, st.st_ino, offset, offset, lineno, skipping=skipping)
    r.tail = os.pread(fd, min(TAIL, offset), offset - min(TAIL, offset)) if offset else b""
    return r


@dataclass
class _Follow:
    """One followed path of one trigger."""

    key: str  # where its position is stored
    trigger_key: str
    trigger: LogTrigger
    matcher: LineMatcher
    path: str
    reader: _Reader | None = None
    drains: list[_Reader] = field(default_factory=list)  # rotated away, still read
    stored: tuple[int, int, int] | None = None
    stored_at: float = 0.0
    new_file: bool = False  # a file that appeared after the start: read from its start


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
        self.ready = threading.Event()
        """Set once every file present at the start has its starting position."""

    def run(self, stop: threading.Event, emit: Emit) -> None:
        """Follow until `stop` is set, then store every position."""
        while not stop.is_set():
            if not self.poll(emit):
                stop.wait(self._interval)
        self.commit()

    def poll(self, emit: Emit) -> int:
        """Read what is new in every file, emit, store positions; return bytes read."""
        now = self._clock()
        if now - self._globbed_at >= GLOB_EVERY_S:
            self._globbed_at = now
            self._discover()
            self.ready.set()
        events: list[Event] = []
        total = 0
        for f in self._follows.values():
            total += self._step(f, events, now)
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
        if self._failed:
            return
        for f in self._follows.values():
            self._store(f, self._clock())

    def close(self) -> None:
        """Close every file."""
        for f in self._follows.values():
            for r in [*f.drains, *([f.reader] if f.reader else [])]:
                r.close()
        self._follows.clear()

    # ── which files ─────────────────────────────────────────────────────────

    def _discover(self) -> None:
        first = not self._started
        self._started = True
        for tkey, trigger, matcher in self._triggers:
            glob = compile_glob(trigger.path)
            paths = [glob.pattern] if glob.literal else glob.expand()
            for path in paths:
                key = f"{tkey}:{path}"
                if key not in self._follows:
                    f = _Follow(key, tkey, trigger, matcher, path, new_file=not first)
                    self._follows[key] = f
                    if first or not self._adopt(f):
                        self._resume(f)
        for key, f in list(self._follows.items()):
            if f.reader is None and not f.drains and not compile_glob(f.trigger.path).literal \
                    and not os.path.exists(f.path):
                del self._follows[key]  # a globbed file that is gone and fully read

    def _adopt(self, f: _Follow) -> bool:
        """A file renamed within the glob is the one already open: carry on with it."""
        try:
            st = os.stat(f.path)
        except OSError:
            return False
        for g in self._follows.values():
            if g.trigger_key != f.trigger_key or g is f:
                continue
            for r in [*g.drains, *([g.reader] if g.reader else [])]:
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
        try:
            st = os.stat(f.path)
        except OSError:
            st = None
        if pos is None:
            start = None if (f.trigger.start_at == "end" and not f.new_file) else 0
            f.reader = _open(f.path, start, 0 if start == 0 else None) if st else None
            return
        f.stored = (pos.device, pos.inode, pos.offset)
        if st is not None and (st.st_dev, st.st_ino) == (pos.device, pos.inode):
            r = _open(f.path, pos.offset, None) if st.st_size >= pos.offset else None
            if r is not None and (pos.offset == 0 or r.tail.endswith(b"\n")):
                f.reader = r
                return
            if r is not None:
                r.close()
            log.warning("log %s: truncated or rewritten while opsrun was down; reading it "
                        "from the start", f.path)
        else:
            old = _find_sibling(f.path, lambda s: (s.st_dev, s.st_ino) == (pos.device,
                                                                          pos.inode))
            if old is not None:
                r = _open(old, pos.offset, None)
                if r is not None:
                    f.drains.append(r)
            else:
                log.warning("log %s: rotated while opsrun was down and the old file is gone "
                            "or compressed; lines written to it after the stored position "
                            "are not seen", f.path)
        f.reader = _open(f.path, 0, 0) if st else None

    # ── reading ─────────────────────────────────────────────────────────────

    def _step(self, f: _Follow, events: list[Event], now: float) -> int:
        total = 0
        for r in list(f.drains):
            got = self._read(f, r, events)
            total += got
            if got:
                r.idle_since = now
            elif now - r.idle_since >= self._grace:
                self._flush_partial(f, r, events)
                f.drains.remove(r)
                r.close()
        if f.reader is None:
            f.reader = _open(f.path, 0, 0)  # appeared (again): all of it is new
            if f.reader is None:
                return total
        reader = f.reader
        got = self._read(f, reader, events)
        if not got:
            self._check_rotation(f, reader, events, now)
            if f.reader is not None and f.reader is not reader:
                got = self._read(f, f.reader, events)  # the new file, at once
        return total + got

    def _read(self, f: _Follow, r: _Reader, events: list[Event]) -> int:
        if r.tail and os.pread(r.fd, len(r.tail), r.read_pos - len(r.tail)) != r.tail:
            self._truncated(f, r, events)
        total = 0
        while total < ROUND_BYTES:
            data = os.pread(r.fd, CHUNK, r.read_pos)
            if not data:
                break
            total += len(data)
            self._take(f, r, data, events)
            if len(data) < CHUNK:
                break
        return total

    def _take(self, f: _Follow, r: _Reader, data: bytes, events: list[Event]) -> None:
        r.read_pos += len(data)
        r.tail = (r.tail + data[-TAIL:])[-TAIL:]
        last = data.rfind(b"\n")
        if last < 0:
            if not r.skipping:
                r.partial += data
                self._cut(f, r)
            return
        head, rest = data[:last + 1], data[last + 1:]
        if r.skipping:  # the over-long line ends at the first newline
            head = head[head.find(b"\n") + 1:]
            buf = (r.partial + b"\n" if r.partial else b"") + head
            r.skipping = False
        else:
            buf = r.partial + head
        r.partial = rest
        self._cut(f, r)
        self._lines(f, r, buf, r.read_pos - len(data) + last + 1, events)

    def _cut(self, f: _Follow, r: _Reader) -> None:
        if len(r.partial) > MAX_LINE:
            log.warning("log %s: a line longer than %d bytes is cut", f.path, MAX_LINE)
            r.partial, r.skipping = r.partial[:MAX_LINE], True

    def _lines(self, f: _Follow, r: _Reader, buf: bytes, end: int,
               events: list[Event]) -> None:
        found = f.matcher.scan(buf) if buf else []
        if found:
            if r.lineno is None:
                r.lineno = _count_lines(r.fd, r.offset)
            now, base = now_rfc3339(), r.lineno + 1
            for index, text, groups in found:
                data = {k: v for k, v in groups.items() if k not in RESERVED}
                events.append(Event("log", {
                    "source": "log", "id": new_id(), "time": now, "trigger": f.trigger_key,
                    "path": f.path, "line": text, "lineno": base + index, **data}))
        if r.lineno is not None:
            r.lineno += buf.count(b"\n")
        r.offset = end

    def _flush_partial(self, f: _Follow, r: _Reader, events: list[Event]) -> None:
        """A file nobody writes any more: its unfinished last line is a line."""
        if r.partial and not r.skipping:
            self._lines(f, r, r.partial + b"\n", r.read_pos, events)
            r.partial = b""

    def _check_rotation(self, f: _Follow, r: _Reader, events: list[Event], now: float) -> None:
        try:
            st = os.stat(f.path)
        except OSError:
            st = None
        if st is not None and (st.st_dev, st.st_ino) == (r.dev, r.ino):
            if st.st_size < r.read_pos:
                self._truncated(f, r, events)
            return
        log.info("log %s: rotated (%s); following the new file", f.path,
                 "removed or renamed" if st is None else "a new file under the name")
        r.idle_since = now
        f.drains.append(r)  # writers may still add to the old file for a moment
        f.reader = _open(f.path, 0, 0) if st is not None else None

    def _truncated(self, f: _Follow, r: _Reader, events: list[Event]) -> None:
        log.info("log %s: truncated; reading it from the start", f.path)
        copy = _find_sibling(f.path, lambda s: s.st_size >= r.read_pos and
                             (s.st_dev, s.st_ino) != (r.dev, r.ino), r.tail, r.read_pos)
        if copy is not None:  # copytruncate: what came after our position is in the copy
            rest = _open(copy, r.offset, r.lineno)
            if rest is not None:
                while self._read(f, rest, events):
                    pass
                self._flush_partial(f, rest, events)
                rest.close()
        r.offset = r.read_pos = 0
        r.lineno, r.partial, r.skipping, r.tail = 0, b"", False, b""

    def _store(self, f: _Follow, now: float) -> None:
        if f.reader is None:
            return
        pos = (f.reader.dev, f.reader.ino, f.reader.offset)
        if pos != f.stored:
            self._positions.set_log_position(f.key, *pos)
            f.stored = pos
        f.stored_at = now


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


def _count_lines(fd: int, end: int) -> int:
    count, pos = 0, 0
    while pos < end:
        data = os.pread(fd, min(CHUNK * 4, end - pos), pos)
        if not data:
            break
        count += data.count(b"\n")
        pos += len(data)
    return count
