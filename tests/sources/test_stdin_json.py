"""JSON lines → events or rejections with line numbers, in bounded memory."""
from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator, Sequence

from opsrun.event import MAX_EVENT_BYTES, Event
from opsrun.sources.stdin_json import (
    LineSplitter,
    Rejection,
    StdinJsonSource,
    read_events,
)
from tests.helpers.wait import wait_for


def items(data: bytes) -> list[Event | Rejection]:
    return list(read_events(io.BytesIO(data)))


def test_good_and_bad_lines_mixed() -> None:
    data = (b'{"type": "a"}\n'
            b'not json\n'
            b'\n'
            b'[1, 2]\n'
            b'{"type": "b", "id": "mine"}\r\n'
            b'"text"\n'
            b'{"type": "c"}')  # the last line has no newline
    out = items(data)
    assert [(type(x).__name__, getattr(x, "lineno", None)) for x in out] == [
        ("Event", None), ("Rejection", 2), ("Rejection", 4), ("Event", None),
        ("Rejection", 6), ("Event", None)]
    good = [x for x in out if isinstance(x, Event)]
    assert [e.data["type"] for e in good] == ["a", "b", "c"]
    assert good[1].id == "mine" and good[0].source == "json"
    bad = [x for x in out if isinstance(x, Rejection)]
    assert bad[0].reason.startswith("not JSON") and bad[0].excerpt == "not json"
    assert "must be an object" in bad[1].reason and "a list" in bad[1].reason
    assert str(bad[2]).startswith("line 6: ")


def test_invalid_utf8_is_rejected_with_its_line() -> None:
    (good, bad) = items(b'{"ok": 1}\n{"name": "\xff\xfe"}\n')
    assert isinstance(good, Event)
    assert isinstance(bad, Rejection) and bad.lineno == 2
    assert "UTF-8" in bad.reason


def test_deep_nesting_is_rejected() -> None:
    deep = b'{"a": ' * 70 + b"1" + b"}" * 70
    ok = b'{"a": ' * 60 + b"1" + b"}" * 60
    (first, second) = items(deep + b"\n" + ok + b"\n")
    assert isinstance(first, Rejection) and "deep" in first.reason
    assert isinstance(second, Event)


class Trickle(io.RawIOBase):
    """A stream that hands out a huge input in small pieces and never holds it whole."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces

    def readable(self) -> bool:
        return True

    def read1(self, size: int = -1) -> bytes:
        return next(self._pieces, b"")

    read = read1


def test_an_oversize_line_is_dropped_in_bounded_memory() -> None:
    def pieces() -> Iterator[bytes]:
        yield b'{"before": 1}\n{"big": "'
        for _ in range(48):  # 3 MiB in 64 KiB pieces
            yield b"x" * 65536
        yield b'"}\n{"after": 2}\n'

    splitter = LineSplitter()
    out = []
    peak = 0
    for piece in pieces():
        out.extend(splitter.feed(piece))
        peak = max(peak, len(splitter._buf))
    assert peak <= MAX_EVENT_BYTES
    assert [(line.lineno, line.data is None) for line in out] == [(1, False), (2, True),
                                                                  (3, False)]
    assert out[1].size == 3 * 1024 * 1024 + len(b'{"big": "') + len(b'"}')
    events = list(read_events(Trickle(pieces())))  # type: ignore[arg-type]
    assert isinstance(events[1], Rejection) and events[1].lineno == 2
    assert "limit is 1,048,576" in events[1].reason
    assert events[1].excerpt.startswith('{"big": "xxx')
    assert isinstance(events[2], Event) and events[2].data["after"] == 2


def test_a_line_of_exactly_the_limit_is_read() -> None:
    body = b'{"p": "' + b"y" * (MAX_EVENT_BYTES - 9) + b'"}'
    assert len(body) == MAX_EVENT_BYTES
    (event,) = items(body + b"\n")
    assert isinstance(event, Event)
    (rejected,) = items(body + b" \n")
    assert isinstance(rejected, Rejection)


def test_an_oversize_last_line_without_newline() -> None:
    (rejected,) = items(b"z" * (MAX_EVENT_BYTES + 5))
    assert isinstance(rejected, Rejection) and rejected.lineno == 1


def test_the_source_reads_a_pipe_until_its_end() -> None:
    read_fd, write_fd = os.pipe()
    stream = os.fdopen(read_fd, "rb", buffering=0)
    got: list[Event] = []
    rejected: list[Rejection] = []

    def emit(events: Sequence[Event]) -> None:
        got.extend(events)

    source = StdinJsonSource(stream, rejected.append)
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop, emit))
    thread.start()
    os.write(write_fd, b'{"n": 1}\n{"n": ')
    wait_for(lambda: len(got) == 1)
    os.write(write_fd, b'2}\nbad\n')
    wait_for(lambda: len(got) == 2 and rejected)
    assert rejected[0].lineno == 3
    os.write(write_fd, b'{"n": 3}')
    os.close(write_fd)
    wait_for(source.finished.is_set)
    thread.join(5)
    assert [e.data["n"] for e in got] == [1, 2, 3]
    stream.close()


def test_the_source_stops_while_waiting_for_input() -> None:
    read_fd, write_fd = os.pipe()
    stream = os.fdopen(read_fd, "rb", buffering=0)
    source = StdinJsonSource(stream, lambda r: None)
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop, lambda events: None))
    thread.start()
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and not source.finished.is_set()
    os.close(write_fd)
    stream.close()
