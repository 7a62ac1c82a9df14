"""JSON lines → events, for `opsrun dispatch` and `opsrun watch --stdin`.

One JSON object per line. A line that is not an acceptable event (not JSON, not an
object, over 1 MiB, nested deeper than 64, not UTF-8) becomes a `Rejection` with its line
number and the reason, and the following lines are still read. A line over the limit is
counted and dropped as it streams in: memory stays bounded whatever the input. Blank lines
are skipped; a trailing CR is dropped; the last line may lack its newline.
"""
from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from opsrun.event import MAX_EVENT_BYTES, Event, EventRejected, parse_json_event
from opsrun.sources.base import Emit

READ_SIZE = 65536
EXCERPT = 80  # characters of a rejected line kept to show and audit
_WAKE_S = 0.2  # the longest a read waits before looking at `stop` again


@dataclass(frozen=True)
class Rejection:
    """A line that is not an acceptable event."""

    lineno: int
    reason: str
    excerpt: str  # the start of the line, decoded leniently

    def __str__(self) -> str:
        return f"line {self.lineno}: {self.reason}"


@dataclass(frozen=True)
class _Line:
    lineno: int
    data: bytes | None  # None: over the limit, dropped
    size: int
    head: bytes


class LineSplitter:
    """Cuts a byte stream into lines, keeping at most `limit` bytes of any one line."""

    def __init__(self, limit: int = MAX_EVENT_BYTES) -> None:
        self.limit = limit
        self.lineno = 0
        self._buf = bytearray()
        self._dropping = False
        self._dropped = 0
        self._head = b""

    def feed(self, data: bytes) -> list[_Line]:
        """The lines completed by `data`."""
        out: list[_Line] = []
        start = 0
        while (nl := data.find(b"\n", start)) != -1:
            out.append(self._complete(data[start:nl]))
            start = nl + 1
        rest = data[start:]
        if self._dropping:
            self._dropped += len(rest)
        elif len(self._buf) + len(rest) > self.limit:
            self._dropping, self._head = True, bytes(self._buf[:EXCERPT]) or rest[:EXCERPT]
            self._dropped = len(self._buf) + len(rest)
            self._buf.clear()
        else:
            self._buf += rest
        return out

    def end(self) -> list[_Line]:
        """The last line, when the input ended without a newline."""
        if self._dropping or self._buf:
            return [self._complete(b"")]
        return []

    def _complete(self, piece: bytes) -> _Line:
        self.lineno += 1
        if self._dropping:
            line = _Line(self.lineno, None, self._dropped + len(piece), self._head)
            self._dropping, self._dropped = False, 0
            return line
        size = len(self._buf) + len(piece)
        data = bytes(self._buf) + piece if self._buf else piece
        self._buf.clear()
        if size > self.limit:
            return _Line(self.lineno, None, size, data[:EXCERPT])
        return _Line(self.lineno, data, size, data[:EXCERPT])


def parse_line(line: _Line, source: str = "json") -> Event | Rejection | None:
    """The event on one line, its rejection, or None for a blank line."""
    excerpt = line.head.decode("utf-8", "replace")
    if line.data is None:
        return Rejection(line.lineno, f"the line is {line.size:,} bytes; the limit is "
                                      f"{MAX_EVENT_BYTES:,} (1 MiB)", excerpt)
    raw = line.data[:-1] if line.data.endswith(b"\r") else line.data
    if not raw.strip():
        return None
    try:
        return parse_json_event(raw, source)
    except EventRejected as e:
        return Rejection(line.lineno, str(e), excerpt)


def read_events(stream: BinaryIO, *, source: str = "json") -> Iterator[Event | Rejection]:
    """Events and rejections from a binary stream of JSON lines, as each line arrives."""
    splitter = LineSplitter()
    read = getattr(stream, "read1", stream.read)  # read1: do not wait for a full buffer
    while data := read(READ_SIZE):
        for line in splitter.feed(data):
            if (item := parse_line(line, source)) is not None:
                yield item
    for line in splitter.end():
        if (item := parse_line(line, source)) is not None:
            yield item


class StdinJsonSource:
    """JSON lines from a stream (stdin) as a source; `finished` is set at end of input.

    The source reads the stream's file descriptor directly (so that waiting for input can
    be stopped); nothing else may read from the stream meanwhile.
    """

    name = "stdin"

    def __init__(self, stream: BinaryIO, on_reject: Callable[[Rejection], None], *,
                 source: str = "json") -> None:
        self._stream = stream
        self._on_reject = on_reject
        self._source = source
        self.finished = threading.Event()

    def run(self, stop: threading.Event, emit: Emit) -> None:
        """Read lines until end of input or until `stop` is set."""
        fd = self._stream.fileno()
        splitter = LineSplitter()
        while not stop.is_set():
            ready, _, _ = select.select([fd], [], [], _WAKE_S)
            if not ready:
                continue
            data = os.read(fd, READ_SIZE)
            self._hand_over(splitter.feed(data) if data else splitter.end(), emit)
            if not data:
                self.finished.set()
                return

    def _hand_over(self, lines: list[_Line], emit: Emit) -> None:
        events = []
        for line in lines:
            item = parse_line(line, self._source)
            if isinstance(item, Rejection):
                self._on_reject(item)
            elif item is not None:
                events.append(item)
        if events:
            emit(events)
