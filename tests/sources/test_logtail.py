"""The log source against real files, the real logrotate, and restarts."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opsrun.event import Event
from opsrun.runbook import LogTrigger
from opsrun.sources import loglines
from opsrun.sources.loglines import LineMatcher, chunk_safe, required_literal
from opsrun.sources.logtail import LogSource
from opsrun.store import Store
from tests.helpers.wait import wait_for

KEY = "rb/log/abc"
NUMBERED = r"line (?P<n>\d+)"


def trig(path: Path | str, match: str | None = NUMBERED, start: str = "end") -> LogTrigger:
    return LogTrigger(str(path), match, start)


class Collect:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.lock = threading.Lock()

    def __call__(self, events: Sequence[Event]) -> None:
        with self.lock:
            self.events.extend(events)

    @property
    def lines(self) -> list[str]:
        with self.lock:
            return [e.data["line"] for e in self.events]

    @property
    def numbers(self) -> list[int]:
        with self.lock:
            return [int(e.data["n"]) for e in self.events]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "state") as s:
        yield s


def append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


def test_new_lines_groups_and_line_numbers(tmp_path: Path, store: Store) -> None:
    log = tmp_path / "app.log"
    log.write_text("line 0 old\n" * 3)
    got = Collect()
    source = LogSource([(KEY, trig(log))], store)
    source.poll(got)
    assert got.events == []  # from: end
    append(log, "noise\nline 7 boom\r\n")
    source.poll(got)
    (event,) = got.events
    assert event.source == "log"
    assert {k: event.data[k] for k in ("trigger", "path", "line", "lineno", "n")} == {
        "trigger": KEY, "path": str(log), "line": "line 7 boom", "lineno": 5, "n": "7"}


def test_from_start_and_every_line_without_match(tmp_path: Path, store: Store) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"a\nb\n\xff\xfe broken utf-8\n")
    got = Collect()
    LogSource([(KEY, trig(log, None, "start"))], store).poll(got)
    assert got.lines == ["a", "b", "\ufffd\ufffd broken utf-8"]
    assert [e.data["lineno"] for e in got.events] == [1, 2, 3]


def test_a_partial_last_line_waits_for_its_newline(tmp_path: Path, store: Store) -> None:
    log = tmp_path / "app.log"
    log.write_text("")
    got = Collect()
    source = LogSource([(KEY, trig(log))], store)
    source.poll(got)
    append(log, "line 1 first ha")
    source.poll(got)
    assert got.events == []
    append(log, "lf\nline 2 ")
    source.poll(got)
    assert got.lines == ["line 1 first half"]
    source.commit()
    # the stored position is after the complete line only
    pos = store.get_log_position(f"{KEY}:{log}")
    assert pos is not None and pos.offset == len("line 1 first half\n")


def test_a_file_created_later_is_read_from_its_start(tmp_path: Path, store: Store) -> None:
    log = tmp_path / "later" / "app.log"
    got = Collect()
    source = LogSource([(KEY, trig(log))], store)
    source.poll(got)
    log.parent.mkdir()
    log.write_text("line 1\nline 2\n")
    source.poll(got)
    assert got.numbers == [1, 2]


def test_truncation_in_place(tmp_path: Path, store: Store) -> None:
    log = tmp_path / "app.log"
    log.write_text("")
    got = Collect()
    source = LogSource([(KEY, trig(log))], store)
    source.poll(got)
    append(log, "line 1\nline 2\n")
    source.poll(got)
    log.write_text("line 3\n")  # `> app.log` and a new line, shorter than before
    source.poll(got)
    append(log, "line 4\nline 5 and the file grows past where it was\n")
    source.poll(got)
    log.write_text("line 6 rewritten while longer than what was read before\n")
    source.poll(got)
    assert got.numbers == [1, 2, 3, 4, 5, 6]
    assert [e.data["lineno"] for e in got.events] == [1, 2, 1, 2, 3, 1]


def test_a_glob_follows_every_file_and_new_ones(tmp_path: Path, store: Store) -> None:
    (tmp_path / "a.log").write_text("line 1\n")
    (tmp_path / "b.txt").write_text("line 2\n")
    got = Collect()
    source = LogSource([(KEY, trig(tmp_path / "*.log", start="start"))], store)
    source.poll(got)
    (tmp_path / "c.log").write_text("line 3\n")
    source.poll(got, glob_now=True)  # list the glob again now rather than in a second
    assert sorted(got.numbers) == [1, 3]
    assert {os.path.basename(e.data["path"]) for e in got.events} == {"a.log", "c.log"}


def test_rotation_by_rename_and_late_lines_in_the_old_file(tmp_path: Path,
                                                           store: Store) -> None:
    log = tmp_path / "app.log"
    log.write_text("")
    got = Collect()
    source = LogSource([(KEY, trig(log))], store)
    source.poll(got)
    writer = log.open("a")  # a writer that has not reopened yet
    writer.write("line 1\n")
    writer.flush()
    os.rename(log, tmp_path / "app.log.1")
    log.write_text("line 3\n")
    source.poll(got)
    writer.write("line 2 still in the old file\n")
    writer.close()
    source.poll(got)
    source.poll(got)
    assert sorted(got.numbers) == [1, 2, 3]


def test_copytruncate_takes_the_tail_from_the_copy(tmp_path: Path, store: Store) -> None:
    log = tmp_path / "app.log"
    log.write_text("")
    got = Collect()
    source = LogSource([(KEY, trig(log))], store)
    source.poll(got)
    append(log, "line 1\n")
    source.poll(got)
    append(log, "line 2 written just before the copy\n")
    shutil.copyfile(log, tmp_path / "app.log.1")
    with log.open("r+") as f:
        f.truncate(0)
    append(log, "line 3\n")
    source.poll(got)
    assert got.numbers == [1, 2, 3]


def test_line_numbers_are_exact_across_chunks_when_counted_late(tmp_path: Path,
                                                                store: Store) -> None:
    # Lines are counted only when a match needs a number: after megabytes of lines that
    # match nothing, across chunk edges, with a line split over two reads, and in the copy
    # of a copytruncate, the numbers must still be the true ones.
    log = tmp_path / "app.log"
    filler = "".join(f"quiet {i:07d} nothing to see here\n" for i in range(90_000))  # ~3 MB
    log.write_text(filler + "line 1 after the quiet part\n" + filler[:-1])
    got = Collect()
    source = LogSource([(KEY, trig(log, start="start"))], store)
    source.poll(got)
    assert [e.data["lineno"] for e in got.events] == [90_001]
    append(log, "\nline 2\n")  # completes the unfinished last line, then a match
    source.poll(got)
    assert [e.data["lineno"] for e in got.events] == [90_001, 180_002]
    append(log, filler)
    source.poll(got)  # read, matched nothing, not counted
    append(log, "line 3 just before the copy\n")
    shutil.copyfile(log, tmp_path / "app.log.1")
    with log.open("r+") as f:
        f.truncate(0)
    append(log, "line 4\n")
    source.poll(got)
    assert [(e.data["lineno"], int(e.data["n"])) for e in got.events] == [
        (90_001, 1), (180_002, 2), (270_003, 3), (1, 4)]


class Writer(threading.Thread):
    """Appends numbered lines until stopped, reopening the file every `reopen` lines."""

    def __init__(self, path: Path, reopen: int | None) -> None:
        super().__init__(daemon=True)
        self.path, self.reopen = path, reopen
        self.stop = threading.Event()
        self.count = 0

    def run(self) -> None:
        f = self.path.open("a", buffering=1)
        while not self.stop.is_set():
            for _ in range(10):
                f.write(f"line {self.count}\n")
                self.count += 1
            if self.reopen is not None and self.count % self.reopen == 0:
                f.close()
                f = self.path.open("a", buffering=1)
            self.stop.wait(0.001)  # pace the writer: a steady log, not a flood
        f.close()


def logrotate(tmp_path: Path, log: Path, mode: str) -> None:
    config = tmp_path / "logrotate.conf"
    config.write_text(f"{log} {{\n  rotate 10\n  {mode}\n  missingok\n  nocompress\n}}\n")
    done = subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "logrotate.state"),
                           str(config)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


@contextmanager
def following(source: LogSource) -> Iterator[Collect]:
    got = Collect()
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop, got))
    thread.start()
    try:
        yield got
    finally:
        stop.set()
        thread.join(10)
        assert not thread.is_alive()


def on_disk(tmp_path: Path) -> list[int]:
    numbers = []
    for p in tmp_path.glob("app.log*"):
        numbers += [int(n) for n in re.findall(r"line (\d+)", p.read_text())]
    return numbers


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="needs logrotate")
@pytest.mark.parametrize(("mode", "reopen"), [("create", 20), ("copytruncate", None)])
def test_logrotate_with_a_writer_running(tmp_path: Path, store: Store, mode: str,
                                         reopen: int | None) -> None:
    log = tmp_path / "app.log"
    log.write_text("")
    source = LogSource([(KEY, trig(log))], store, poll_interval_s=0.01)
    writer = Writer(log, reopen)
    with following(source) as got:
        assert source.ready.wait(5)  # following before the writer starts
        writer.start()
        for _ in range(3):
            seen = len(got.events)
            wait_for(lambda: len(got.events) >= seen + 200)
            logrotate(tmp_path, log, mode)
        wait_for(lambda: len(got.events) >= seen + 200)
        writer.stop.set()
        writer.join(10)
        wait_for(lambda: len(got.numbers) >= writer.count or
                 set(got.numbers) >= set(on_disk(tmp_path)), timeout=15,
                 message=lambda: f"written {writer.count}, tailed {len(got.numbers)}, on disk "
                                 f"but not tailed {sorted(set(on_disk(tmp_path)) - set(got.numbers))[:20]}")
    tailed = got.numbers
    assert len(tailed) == len(set(tailed)), "a line was reported twice"
    assert set(tailed) <= set(range(writer.count))
    if mode == "create":
        assert sorted(tailed) == list(range(writer.count)), "a line was lost"
    else:
        # copytruncate itself loses what is written between its copy and its truncate;
        # whatever is on disk must have been seen
        assert set(on_disk(tmp_path)) <= set(tailed), "a line was lost"
    assert len(list(tmp_path.glob("app.log.*"))) == 3


def test_a_restart_resumes_from_the_stored_position(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("")
    got = Collect()
    with Store.open(tmp_path / "state") as store:
        first = LogSource([(KEY, trig(log))], store)
        first.poll(got)
        append(log, "".join(f"line {i}\n" for i in range(0, 500)))
        first.poll(got)
        first.commit()
        first.close()
    # while opsrun is down: more lines, a rotation, lines in the new file
    append(log, "".join(f"line {i}\n" for i in range(500, 700)))
    os.rename(log, tmp_path / "app.log.1")
    log.write_text("".join(f"line {i}\n" for i in range(700, 800)))
    with Store.open(tmp_path / "state") as store:
        second = LogSource([(KEY, trig(log))], store)
        second.poll(got)
        second.poll(got)
        append(log, "line 800\n")
        second.poll(got)
        second.close()
    assert got.numbers == list(range(801))
    assert got.events[-1].data["lineno"] == 101


def test_a_restart_in_the_middle_of_a_running_writer(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("")
    writer = Writer(log, reopen=None)
    with Store.open(tmp_path / "state") as store:
        first = LogSource([(KEY, trig(log))], store, poll_interval_s=0.01)
        with following(first) as before:
            assert first.ready.wait(5)
            writer.start()
            wait_for(lambda: len(before.events) >= 300)
        first.close()  # stopped (positions stored) while the writer goes on
        second = LogSource([(KEY, trig(log))], store, poll_interval_s=0.01)
        with following(second) as after:
            wait_for(lambda: len(after.events) >= 300)
            writer.stop.set()
            writer.join(10)
            wait_for(lambda: len(before.events) + len(after.events) >= writer.count)
        second.close()
    both = before.numbers + after.numbers
    assert both == list(range(writer.count))  # in order, none lost, none twice


def test_events_not_taken_are_delivered_again(tmp_path: Path, store: Store) -> None:
    log = tmp_path / "app.log"
    log.write_text("")
    source = LogSource([(KEY, trig(log))], store)
    source.poll(Collect())
    source.commit()
    append(log, "line 1\nline 2\n")

    def broken(events: Sequence[Event]) -> None:
        raise RuntimeError("the queue is down")

    with pytest.raises(RuntimeError):
        source.poll(broken)
    source.commit()  # a stop after a failed hand-off stores nothing
    got = Collect()
    LogSource([(KEY, trig(log))], store).poll(got)
    assert got.numbers == [1, 2]


def test_run_follows_appends_until_stopped(tmp_path: Path, store: Store) -> None:
    log = tmp_path / "app.log"
    log.write_text("")
    source = LogSource([(KEY, trig(log))], store, poll_interval_s=0.01)
    with following(source) as got:
        assert source.ready.wait(5)
        append(log, "line 1\n")
        wait_for(lambda: got.numbers == [1])
        append(log, "line 2\n")
        wait_for(lambda: got.numbers == [1, 2])
    pos = store.get_log_position(f"{KEY}:{log}")
    assert pos is not None and pos.offset == log.stat().st_size


def test_an_overlong_line_is_cut(tmp_path: Path, store: Store,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loglines, "MAX_LINE", 100)
    monkeypatch.setattr(loglines, "CHUNK", 64)
    log = tmp_path / "app.log"
    log.write_text("")
    got = Collect()
    source = LogSource([(KEY, trig(log, None))], store)
    source.poll(got)
    append(log, "x" * 1000)
    for _ in range(20):
        source.poll(got)
    append(log, "x" * 1000 + "\nafter\n")
    for _ in range(40):
        source.poll(got)
    assert [len(s) for s in got.lines] == [100, 5] and got.lines[1] == "after"


@pytest.mark.parametrize(("pattern", "literal"), [
    (r"Out of memory: Killed process \d+ \((?P<proc>[\w-]+)\)",
     b"Out of memory: Killed process "),
    (r"(?P<level>ERROR) code=\d+", b"ERROR code="),
    (r"^\s*foo\d+barbaz$", b"barbaz"),
    (r"(?i)Error code", b"error code"),
    (r"(?i)segfault at", b"egfault at"),  # s has a non-ASCII partner: ſ
    (r"(?ia)segfault", b"segfault"),
    (r"(?i)kiss", None),
    (r"error|fatal", None),
    (r"\d+", None),
    (r"(?:abc)?defg", b"defg"),
    (r"ab", None),
    (r"[éè]llo wörld", "llo wörld".encode()),
    (r"[é]llo", "éllo".encode()),
])
def test_required_literal(pattern: str, literal: bytes | None) -> None:
    assert required_literal(re.compile(pattern)) == literal


def test_the_prefilter_gives_the_same_answers() -> None:
    lines = [f"{i} Out of memory: Killed process {i} (web-{i})" if i % 7 == 0 else
             f"{i} ok Out of memory: nothing" if i % 5 == 0 else f"{i} fine" for i in range(200)]
    buf = ("\n".join(lines) + "\n").encode()
    pattern = re.compile(r"Out of memory: Killed process \d+ \((?P<proc>[\w-]+)\)")
    fast = LineMatcher(pattern)
    assert fast.literal is not None
    slow = LineMatcher(pattern)
    slow.literal = None
    assert fast.scan(buf) == slow.scan(buf)
    assert [i for i, _, _ in fast.scan(buf)] == list(range(0, 200, 7))


@pytest.mark.parametrize(("pattern", "safe"), [
    (r"ERROR \d+", True), (r"^\s*$", True), (r"[^x]+y", True), (r"(a|b)\1", True),
    (r"\Afoo", False), (r"foo\Z", False), (r"foo(?=bar)", False), (r"(?<!x)foo", False),
    (r"(?>a+)b", False), (r"a++b", False), (r"(a)?(?(1)b|c)", False),
])
def test_chunk_safe(pattern: str, safe: bool) -> None:
    assert chunk_safe(re.compile(pattern)) is safe


STRATEGY_PATTERNS = [
    r"ERROR (?P<code>\d+)", r"^\s*$", r"^$", r"[^x]+y$", r"\bab\b", r"\Bb", r"b\s+a",
    r"(?i)AbC", r"(?i)kiss", r"a.*b", r"(?s)a.b", r"\d{2,}$", r"^a", r"é+", r"\W", r"x*",
    r"(?P<w>\w+) \1", r"(?m)b$", r"\r",
]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab xyé1ERO\r\tKkſ\u212a", max_size=12), max_size=25))
def test_every_strategy_finds_the_lines_plain_search_finds(lines: list[str]) -> None:
    buf = "".join(line + "\n" for line in lines).encode("utf-8")
    for pattern in STRATEGY_PATTERNS:
        compiled = re.compile(pattern)
        expected = []
        for i, line in enumerate(lines):
            text = line.removesuffix("\r")
            if (m := compiled.search(text)) is not None:
                expected.append((i, text, m.groupdict()))
        matcher = LineMatcher(compiled)
        assert matcher.scan(buf) == expected, (pattern, matcher.strategy)
        matcher.literal = None
        assert matcher.scan(buf) == expected, (pattern, "chunk")
        matcher.chunk_pattern = None
        assert matcher.scan(buf) == expected, (pattern, "line")


def test_rename_rotation_keeps_the_order_of_lines(tmp_path: Path, store: Store,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A line written to the old file just before the rename (after the read that found
    nothing) comes before the new file's lines."""
    log = tmp_path / "app.log"
    log.write_text("")
    got = Collect()
    source = LogSource([(KEY, trig(log))], store)
    source.poll(got)
    real_read = loglines.Reader.read
    fired = []

    def read_then_rotate(self: loglines.Reader, matcher: LineMatcher, budget: int):
        found = real_read(self, matcher, budget)
        if not found[1] and not fired:  # the writer acts between our read and our stat
            fired.append(1)
            append(log, "line 1 old file\n")
            log.rename(tmp_path / "app.log.1")
            log.write_text("line 2 new file\n")
        return found

    monkeypatch.setattr(loglines.Reader, "read", read_then_rotate)
    source.poll(got)
    source.poll(got)
    assert got.numbers == [1, 2]
    source.close()


def test_each_event_carries_the_position_after_its_line(tmp_path: Path, store: Store) -> None:
    """Stored with an event's runs (as the service does), its position makes a restart
    after a crash go on after exactly the lines whose runs were recorded: none repeated,
    none lost, also when a crash falls between two parts of one batch."""
    from opsrun.checkpoints import merge

    log = tmp_path / "app.log"
    log.write_text("")
    source = LogSource([(KEY, trig(log, start="start"))], store)
    source.poll(Collect())
    append(log, "line 1\nnoise\nline 2\nline 3\n")

    def first_two_then_crash(events: Sequence[Event]) -> None:
        store.record_runs([], checkpoint=merge(e.checkpoint for e in events[:2]))
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        source.poll(first_two_then_crash)
    source.close()
    again = Collect()
    restarted = LogSource([(KEY, trig(log, start="start"))], store)
    restarted.poll(again)
    assert again.numbers == [3]
    restarted.close()
