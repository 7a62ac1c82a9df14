"""Reading one log file in big chunks, and matching a trigger's `match:` a chunk at a time.

`Reader` holds one open file: where its complete lines end (`offset`), the unfinished
last line, the line count, and the last bytes read (to notice the file being rewritten).
Lines over MAX_LINE bytes are cut to that length, so memory stays bounded. Lines are
counted only when a match needs its line number: counting every newline of a log that
never matches would cost more than searching it.

`LineMatcher` finds the matching lines of a chunk. The meaning is always Python's `pattern.search(line)` on each line (without its newline
and a trailing CR). Three ways get there, the fastest that is exact for the pattern:

1. When every match must contain a literal text of 3+ bytes (`Out of memory: Killed
   process` in `Out of memory: Killed process \\d+`), `bytes.find` looks for it in the raw
   chunk; only the lines that hold it are decoded and searched. With IGNORECASE the
   literal keeps to ASCII characters other than i, k and s (the only ones Unicode case
   folding gives non-ASCII partners: İ ı K ſ) and is looked for in the lowered chunk.
2. Otherwise, when the pattern cannot tell a line inside a chunk from a line alone (no
   `\\A`, `\\Z`, lookaround, atomic group, possessive repeat or conditional), the pattern
   (with MULTILINE) searches the decoded chunk; each line a hit touches is then searched
   alone, and the search goes on from the next line. A line that matches alone matches in
   the chunk at the same place, so no line is missed; hits that span lines are dropped.
3. Otherwise each line is searched alone.
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from opsrun.sources.base import log

# The regex parser of the standard library, used to read a pattern's structure.
if sys.version_info >= (3, 11):
    import re._constants as _sre  # type: ignore[import-not-found]
    import re._parser as _sre_parse  # type: ignore[import-not-found]
else:
    import sre_constants as _sre
    import sre_parse as _sre_parse

Found = tuple[int, str, dict[str, Any]]  # line index in a chunk, text, named groups
Hit = tuple[int, int, str, dict[str, Any]]  # line number, file offset after it, text, groups

CHUNK = 1 << 20
MAX_LINE = 1 << 20  # a longer line is cut to this many bytes
TAIL = 64  # last bytes read, kept to notice a file rewritten under us

_UNSAFE = {getattr(_sre, name) for name in ("ASSERT", "ASSERT_NOT", "ATOMIC_GROUP",
                                            "POSSESSIVE_REPEAT", "GROUPREF_EXISTS")
           if hasattr(_sre, name)}
_STRING_EDGES = {_sre.AT_BEGINNING_STRING, _sre.AT_END_STRING}
_FOLDS_BEYOND_ASCII = frozenset("iksIKS")


class LineMatcher:
    """`scan(chunk)` finds the lines of a chunk that a pattern matches."""

    def __init__(self, pattern: re.Pattern[str] | None) -> None:
        self.pattern = pattern
        self.literal = required_literal(pattern) if pattern is not None else None
        self.folded = pattern is not None and bool(pattern.flags & re.IGNORECASE)
        self.chunk_pattern = None
        if pattern is not None and chunk_safe(pattern):
            # A leading \b makes the engine try every position; without it the search
            # finds a superset of the lines, and each is checked with the real pattern.
            text = pattern.pattern
            hunt = text[2:] if text.startswith(("\\b", "\\B")) and len(text) > 2 else text
            self.chunk_pattern = re.compile(hunt, pattern.flags | re.MULTILINE)

    @property
    def strategy(self) -> str:
        """Which way `scan` goes: literal, chunk, line or all."""
        if self.pattern is None:
            return "all"
        return "literal" if self.literal else "chunk" if self.chunk_pattern else "line"

    def scan(self, buf: bytes, start: int = 0, end: int | None = None) -> list[Found]:
        """Each matching line of `buf[start:end]` (which ends with a newline): index, text,
        groups. Bounds rather than a slice, so the literal search copies nothing."""
        if self.literal is not None and not self.folded:
            return self._by_literal(buf, self.literal, start, len(buf) if end is None else end)
        if start or end is not None:
            buf = buf[start:end]
        if self.pattern is None:
            return [(i, _text(b), {}) for i, b in enumerate(buf.split(b"\n")[:-1])]
        if self.literal is not None:
            return self._by_literal(buf, self.literal, 0, len(buf))
        text = buf.decode("utf-8", "replace")
        if self.chunk_pattern is not None:
            # lines are matched without a trailing CR, so the chunk must not have them
            return self._by_chunk(text.replace("\r\n", "\n") if "\r" in text else text)
        lines = text.split("\n")
        lines.pop()
        if "\r" in text:
            lines = [s.removesuffix("\r") for s in lines]
        search = self.pattern.search
        return [(i, s, m.groupdict()) for i, s in enumerate(lines)
                if (m := search(s)) is not None]

    def _by_literal(self, buf: bytes, literal: bytes, first: int, stop: int) -> list[Found]:
        assert self.pattern is not None
        search, out, count, counted = self.pattern.search, [], 0, first
        hay = buf.lower() if self.folded else buf  # ASCII lowering keeps every offset
        at = hay.find(literal, first, stop)
        while at != -1:
            start = buf.rfind(b"\n", first, at) + 1 or first
            end = buf.find(b"\n", at, stop)
            count += buf.count(b"\n", counted, start)
            counted = start
            text = _text(buf[start:end])
            if (m := search(text)) is not None:
                out.append((count, text, m.groupdict()))
            at = hay.find(literal, end + 1, stop)
        return out

    def _by_chunk(self, text: str) -> list[Found]:
        assert self.pattern is not None and self.chunk_pattern is not None
        search, hunt, out, count, counted = (self.pattern.search, self.chunk_pattern.search,
                                             [], 0, 0)
        pos = 0
        while (hit := hunt(text, pos)) is not None:
            at = hit.start()
            end = text.find("\n", at)
            if end == -1:
                break  # an empty match after the last newline: no line is there
            start = text.rfind("\n", 0, at) + 1
            count += text.count("\n", counted, start)
            counted = start
            line = text[start:end]
            if (m := search(line)) is not None:
                out.append((count, line, m.groupdict()))
            pos = end + 1
        return out


def required_literal(pattern: re.Pattern[str]) -> bytes | None:
    """The longest text every match must contain (3+ bytes) as UTF-8, or None.

    For an IGNORECASE pattern the text is lowered and holds only ASCII characters whose
    case partners are all ASCII.
    """
    fold = bool(pattern.flags & re.IGNORECASE)
    unicode_fold = fold and not pattern.flags & re.ASCII
    parsed = _parse(pattern)
    if parsed is None:
        return None
    best, run = "", ""
    for op, av in _flat(parsed):
        c = chr(av) if op is _sre.LITERAL else ""
        usable = c and c not in "\n\r\ufffd" and not (
            fold and (ord(c) > 127 or (unicode_fold and c in _FOLDS_BEYOND_ASCII)))
        if usable:
            run += c
            best = max(best, run, key=len)
        else:
            run = ""
    data = best.lower().encode("ascii") if fold else best.encode("utf-8")
    return data if len(data) >= 3 else None


def chunk_safe(pattern: re.Pattern[str]) -> bool:
    """Whether the pattern matches a line inside a chunk wherever it matches it alone."""
    parsed = _parse(pattern)
    if parsed is None:
        return False
    for op, av in _walk(parsed):
        if op in _UNSAFE or (op is _sre.AT and av in _STRING_EDGES):
            return False
    return True


def _parse(pattern: re.Pattern[str]) -> Any:
    try:
        return _sre_parse.parse(pattern.pattern, pattern.flags)
    except Exception:  # an internal parser: when in doubt, take the plain way
        return None


def _flat(items: Any) -> Iterator[tuple[Any, Any]]:
    """The top-level sequence, with plain groups opened (they are as required as it)."""
    for op, av in items:
        if op is _sre.SUBPATTERN and not (av[1] & re.IGNORECASE):
            yield from _flat(av[3])
        else:
            yield op, av


def _walk(items: Any) -> Iterator[tuple[Any, Any]]:
    """Every node of a parsed pattern."""
    for op, av in items:
        yield op, av
        for sub in _subpatterns(av):
            yield from _walk(sub)


def _subpatterns(av: Any) -> Iterator[Any]:
    if isinstance(av, _sre_parse.SubPattern):
        yield av
    elif isinstance(av, (tuple, list)):
        for x in av:
            yield from _subpatterns(x)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").removesuffix("\r")


@dataclass
class Reader:
    """One open log file and how far it is handled."""

    path: str
    fd: int
    dev: int
    ino: int
    offset: int  # just after the last complete line handled
    read_pos: int  # how far the file was read: offset + the unfinished line
    lineno: int | None  # complete lines before `counted_at`; None until a match needs it
    counted_at: int = 0  # the file offset `lineno` counts up to (at most `offset`)
    partial: bytes = b""
    skipping: bool = False  # inside an over-long line, dropping bytes until its newline
    tail: bytes = b""
    idle_since: float = 0.0

    @classmethod
    def open(cls, path: str, offset: int | None, lineno: int | None) -> Reader | None:
        """Open a file at `offset` (None: after its last complete line), or None."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        size = os.fstat(fd).st_size
        skipping = False
        if offset is None:
            look = os.pread(fd, min(size, 65536), size - min(size, 65536))
            nl = look.rfind(b"\n")
            skipping = nl < 0 and size > len(look)  # in a line too long to see its start
            offset = size if skipping else size - len(look) + nl + 1
        st = os.fstat(fd)
        r = cls(path, fd, st.st_dev, st.st_ino, offset, offset, lineno, offset,
                skipping=skipping)
        r.tail = os.pread(fd, min(TAIL, offset), offset - min(TAIL, offset))
        return r

    def close(self) -> None:
        os.close(self.fd)

    def rewritten(self) -> bool:
        """Whether the bytes last read are no longer there (truncated, maybe regrown)."""
        if not self.tail:
            return False
        return os.pread(self.fd, len(self.tail), self.read_pos - len(self.tail)) != self.tail

    def restart(self) -> None:
        """Read again from the start of the file (it was truncated)."""
        self.offset = self.read_pos = self.counted_at = 0
        self.lineno, self.partial, self.skipping, self.tail = 0, b"", False, b""

    def lines_before_offset(self) -> int:
        """Complete lines before `offset`, counting in the file only what is not counted yet.

        The bytes are read again from this reader's own file, which still holds them: a
        renamed file is the same inode, and after a copytruncate the copy is opened with
        the count and offset of the truncated original.
        """
        if self.lineno is None:
            self.lineno, self.counted_at = _count_lines(self.fd, 0, self.offset), self.offset
        elif self.counted_at < self.offset:
            self.lineno += _count_lines(self.fd, self.counted_at, self.offset)
            self.counted_at = self.offset
        return self.lineno

    def read(self, matcher: LineMatcher, budget: int) -> tuple[list[Hit], int]:
        """Read up to `budget` bytes; the matching complete lines (numbered) and bytes read."""
        found: list[Hit] = []
        total = 0
        while total < budget:
            data = os.pread(self.fd, CHUNK, self.read_pos)
            if not data:
                break
            total += len(data)
            self._take(data, matcher, found)
            if len(data) < CHUNK:
                break
        return found, total

    def finish(self, matcher: LineMatcher) -> list[Hit]:
        """The unfinished last line of a file nobody writes any more, as a line."""
        found: list[Hit] = []
        if self.partial and not self.skipping:
            buf = self.partial + b"\n"
            self.partial = b""
            self._match(buf, 0, len(buf), self.read_pos, matcher, found)
        return found

    def _take(self, data: bytes, matcher: LineMatcher, found: list[Hit]) -> None:
        self.read_pos += len(data)
        self.tail = (self.tail + data[-TAIL:])[-TAIL:]
        last = data.rfind(b"\n")
        if last < 0:
            if not self.skipping:
                self.partial += data
                self._cut()
            return
        end = self.read_pos - len(data) + last + 1
        if self.skipping:  # the over-long line ends at the first newline
            first = data.find(b"\n") + 1
            cut_line = self.partial + b"\n" if self.partial else b""
            self.partial, self.skipping = data[last + 1:], False
            self._cut()
            buf = cut_line + data[first:last + 1]
            self._match(buf, 0, len(buf), end, matcher, found)
        elif self.partial:
            # The unfinished line and the first line of this chunk are joined; the rest of
            # the chunk is searched in place.
            first = data.find(b"\n") + 1
            joined = self.partial + data[:first]
            self.partial = data[last + 1:]
            self._cut()
            self._match(joined, 0, len(joined), self.offset + len(joined), matcher, found)
            self._match(data, first, last + 1, end, matcher, found)
        else:
            self.partial = data[last + 1:]
            self._cut()
            self._match(data, 0, last + 1, end, matcher, found)

    def _cut(self) -> None:
        if len(self.partial) > MAX_LINE:
            log.warning("log %s: a line longer than %d bytes is cut", self.path, MAX_LINE)
            self.partial, self.skipping = self.partial[:MAX_LINE], True

    def _match(self, buf: bytes, start: int, stop: int, end: int, matcher: LineMatcher,
               found: list[Hit]) -> None:
        """Match the complete lines of `buf[start:stop]`, which begin at `offset` and end
        at file offset `end`."""
        hits = matcher.scan(buf, start, stop) if stop > start else []
        if hits:
            base = self.lines_before_offset() + 1
            ends = _line_ends(buf, start, stop, [index for index, _, _ in hits])
            shift = end - stop  # buf[i] is at file offset i + shift
            found.extend((base + index, after + shift, text, groups)
                         for (index, text, groups), after in zip(hits, ends))
            self.lineno = base - 1 + buf.count(b"\n", start, stop)
            self.counted_at = end
        self.offset = end


def _line_ends(buf: bytes, start: int, stop: int, indices: list[int]) -> list[int]:
    """Where in `buf` each of these lines of `buf[start:stop]` ends (after its newline)."""
    if len(indices) == 1 and indices[0] < 64:  # the common case of a rare match: few finds
        at = start
        for _ in range(indices[0] + 1):
            at = buf.index(b"\n", at, stop) + 1
        return [at]
    ends = list(accumulate(len(line) + 1 for line in buf[start:stop].split(b"\n")))
    return [start + ends[i] for i in indices]


def _count_lines(fd: int, pos: int, end: int) -> int:
    count = 0
    while pos < end:
        data = os.pread(fd, min(CHUNK * 4, end - pos), pos)
        if not data:
            break
        count += data.count(b"\n")
        pos += len(data)
    return count
