"""The file source against real files and inotify (and a scripted watcher for the kernel's
failure modes)."""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from opsrun.event import Event
from opsrun.runbook import FileTrigger
from opsrun.sources import files
from opsrun.sources.files import FileSource
from tests.helpers.wait import wait_for

ALL = ("added", "modified", "deleted")


def trig(*paths: Path | str, events: tuple[str, ...] = ALL, debounce: float = 0.05,
         ignore: tuple[str, ...] = ()) -> FileTrigger:
    return FileTrigger(tuple(str(p) for p in paths), events, debounce, ignore)


class Collect:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.times: list[float] = []
        self.lock = threading.Lock()

    def __call__(self, events: Sequence[Event]) -> None:
        with self.lock:
            self.events.extend(events)
            self.times.extend(time.monotonic() for _ in events)

    def seen(self, key: str | None = None) -> list[tuple[str, str]]:
        with self.lock:
            return [(e.data["change"], os.path.basename(e.data["path"])) for e in self.events
                    if key is None or e.data["trigger"] == key]

    def has(self, change: str, name: str, key: str | None = None) -> bool:
        return (change, name) in self.seen(key)


@contextmanager
def running(source: FileSource, got: Collect | None = None) -> Iterator[Collect]:
    got = Collect() if got is None else got
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop, got))
    thread.start()
    try:
        assert source.ready.wait(5)
        yield got
    finally:
        stop.set()
        thread.join(5)
        assert not thread.is_alive()


def barrier(folder: Path, got: Collect, key: str | None = None) -> None:
    """Make one more change and wait for it: whatever came before it has been reported."""
    name = f"zz-barrier-{time.monotonic_ns()}.txt"
    (folder / name).write_text("b")
    wait_for(lambda: got.has("added", name, key), message=lambda: str(got.seen()))


def test_added_modified_deleted(tmp_path: Path) -> None:
    with running(FileSource([("k", trig(tmp_path / "*.txt"))])) as got:
        f = tmp_path / "a.txt"
        f.write_text("one")
        wait_for(lambda: got.has("added", "a.txt"))
        f.write_text("two")
        wait_for(lambda: got.has("modified", "a.txt"))
        f.unlink()
        wait_for(lambda: got.has("deleted", "a.txt"))
        (tmp_path / "b.csv").write_text("not watched")
        barrier(tmp_path, got)
    assert got.seen() == [("added", "a.txt"), ("modified", "a.txt"), ("deleted", "a.txt"),
                          ("added", got.seen()[-1][1])]
    event = got.events[0]
    assert event.source == "file" and event.data["trigger"] == "k"
    assert event.data["path"] == str(tmp_path / "a.txt")


def test_only_the_changes_asked_for(tmp_path: Path) -> None:
    t = trig(tmp_path / "*.txt", events=("deleted",))
    with running(FileSource([("k", t), ("all", trig(tmp_path / "*.txt"))])) as got:
        f = tmp_path / "a.txt"
        f.write_text("x")
        wait_for(lambda: got.has("added", "a.txt", "all"))
        f.unlink()
        wait_for(lambda: got.has("deleted", "a.txt", "k"))
    assert got.seen("k") == [("deleted", "a.txt")]


def test_an_atomic_save_is_one_modified(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    target.write_text("version: 1\n")
    with running(FileSource([("k", trig(tmp_path / "*"))])) as got:
        # the way editors and config tools save: write a temporary file, rename it over
        tmp = tmp_path / ".config.yaml.tmp-1234"
        tmp.write_text("version: 2\n")
        os.replace(tmp, target)
        wait_for(lambda: got.has("modified", "config.yaml"))
        # vim with backupcopy=no: rename to a backup, write anew, remove the backup
        os.rename(target, tmp_path / "config.yaml~")
        target.write_text("version: 3\n")
        (tmp_path / "config.yaml~").unlink()
        barrier(tmp_path, got)
    assert got.seen()[:-1] == [("modified", "config.yaml"), ("modified", "config.yaml")]


def test_debounce_collects_a_burst_and_waits(tmp_path: Path) -> None:
    f = tmp_path / "data.csv"
    f.write_text("")
    slow = trig(tmp_path / "*.csv", debounce=0.6)
    with running(FileSource([("slow", slow), ("fast", trig(tmp_path / "*.csv"))])) as got:
        start = time.monotonic()
        for i in range(20):
            with f.open("a") as out:
                out.write(f"row {i}\n")
        wait_for(lambda: got.has("modified", "data.csv", "slow"))
        assert got.seen("fast") == [("modified", "data.csv")]
    fast_at = got.times[[e.data["trigger"] for e in got.events].index("fast")]
    slow_at = got.times[[e.data["trigger"] for e in got.events].index("slow")]
    assert got.seen("slow") == [("modified", "data.csv")]
    assert slow_at - start >= 0.55  # the 600 ms quiet time, less watchfiles' 20 ms step
    assert fast_at - start < 0.55


def test_ignore_globs(tmp_path: Path) -> None:
    t = trig(tmp_path / "**", ignore=("*.swp", ".git", str(tmp_path / "private" / "*")))
    (tmp_path / ".git").mkdir()
    (tmp_path / "private").mkdir()
    (tmp_path / "src").mkdir()
    with running(FileSource([("k", t)])) as got:
        (tmp_path / "src" / ".main.c.swp").write_text("x")
        (tmp_path / ".git" / "index").write_text("x")
        (tmp_path / "private" / "key").write_text("x")
        (tmp_path / "src" / "main.c").write_text("x")
        barrier(tmp_path, got)
    assert [name for _, name in got.seen()][:-1] == ["main.c"]


def test_a_folder_that_appears_later(tmp_path: Path) -> None:
    t = trig(tmp_path / "later" / "deeper" / "*.csv")
    with running(FileSource([("k", t)])) as got:
        (tmp_path / "later" / "deeper").mkdir(parents=True)
        (tmp_path / "later" / "deeper" / "a.csv").write_text("x")
        wait_for(lambda: got.has("added", "a.csv"))
        (tmp_path / "later" / "deeper" / "b.csv").write_text("x")
        wait_for(lambda: got.has("added", "b.csv"))
    assert got.seen() == [("added", "a.csv"), ("added", "b.csv")]


def test_a_deep_glob(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    with running(FileSource([("k", trig(tmp_path / "**" / "*.log"))])) as got:
        (tmp_path / "a" / "b" / "x.log").write_text("x")
        (tmp_path / "a" / "c").mkdir()
        (tmp_path / "a" / "c" / "y.log").write_text("y")
        wait_for(lambda: got.has("added", "x.log") and got.has("added", "y.log"))


class SilentNotifier:
    """A watcher whose kernel queue lost everything: it never reports a change."""

    def __init__(self, fail_unless_polling: bool = False, polling: bool = False) -> None:
        if fail_unless_polling and not polling:
            raise OSError(errno.ENOSPC, "OS file watch limit reached.")

    def watch(self, debounce_ms: int, step_ms: int, timeout_ms: int, stop_event: Any) -> Any:
        while not stop_event.is_set():
            time.sleep(0.01)  # the fake kernel idles; the source's stop ends the wait
        return "stop"

    def close(self) -> None:
        pass


def test_lost_events_are_found_by_a_rescan_and_logged(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "old.txt").write_text("x")
    source = FileSource([("k", trig(tmp_path / "*.txt"))], rescan_interval_s=0.1,
                        notifier=lambda paths, recursive, polling: SilentNotifier())
    with caplog.at_level(logging.WARNING, "opsrun.sources"), running(source) as got:
        (tmp_path / "new.txt").write_text("x")
        os.utime(tmp_path / "new.txt", (time.time() - 60, time.time() - 60))  # long ago
        (tmp_path / "old.txt").unlink()
        wait_for(lambda: len(got.seen()) == 2)
    assert sorted(got.seen()) == [("added", "new.txt"), ("deleted", "old.txt")]
    assert "inotify had not reported" in caplog.text and "new.txt" in caplog.text


def test_a_change_in_flight_is_reported_without_alarm(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    source = FileSource([("k", trig(tmp_path / "*.txt"))], rescan_interval_s=0.1,
                        notifier=lambda paths, recursive, polling: SilentNotifier())
    with caplog.at_level(logging.WARNING, "opsrun.sources"), running(source) as got:
        (tmp_path / "new.txt").write_text("x")
        wait_for(lambda: got.has("added", "new.txt"))
    assert "inotify had not reported" not in caplog.text


def test_the_watch_limit_falls_back_to_polling(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    calls: list[bool] = []
    allow_polling = threading.Event()

    def notifier(paths: list[str], recursive: bool, polling: bool) -> SilentNotifier:
        calls.append(polling)
        if polling:
            assert allow_polling.wait(5)
        return SilentNotifier(fail_unless_polling=True, polling=polling)

    source = FileSource([("k", trig(tmp_path / "*.txt"))], notifier=notifier)
    got = Collect()
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop, got))
    with caplog.at_level(logging.ERROR, "opsrun.sources"):
        thread.start()
        try:
            wait_for(lambda: True in calls)  # inotify refused; the polling watcher is coming
            (tmp_path / "a.txt").write_text("x")  # a change while nothing watches
            allow_polling.set()
            wait_for(lambda: got.has("added", "a.txt"))  # found by the rescan that follows
        finally:
            allow_polling.set()
            stop.set()
            thread.join(5)
    assert calls[0] is False and set(calls[1:]) == {True}
    assert "max_user_watches" in caplog.text and "polling" in caplog.text


def test_a_flood_triggers_a_rescan(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "FLOOD", 3)
    flooded = threading.Event()

    class Flood(SilentNotifier):
        def watch(self, debounce_ms: int, step_ms: int, timeout_ms: int,
                  stop_event: Any) -> Any:
            if not flooded.is_set() and (tmp_path / "real.txt").exists():
                flooded.set()
                # many changes, of which the one that matters was dropped by the kernel
                return {(2, str(tmp_path / f"noise-{i}.bin")) for i in range(3)}
            return super().watch(debounce_ms, step_ms, timeout_ms, stop_event) \
                if flooded.is_set() else "timeout"

    source = FileSource([("k", trig(tmp_path / "*.txt"))],
                        notifier=lambda paths, recursive, polling: Flood())
    with caplog.at_level(logging.WARNING, "opsrun.sources"), running(source) as got:
        (tmp_path / "real.txt").write_text("x")
        wait_for(lambda: got.has("added", "real.txt"))
    assert "rescanning in case the kernel's event queue overflowed" in caplog.text


# ── across restarts (the service's state store) ─────────────────────────────

class Recorder(Collect):
    """What the service does with a batch: its checkpoints go into the store with it."""

    def __init__(self, store: Any) -> None:
        super().__init__()
        self.store = store

    def __call__(self, events: Sequence[Event]) -> None:
        from opsrun.checkpoints import merge

        self.store.record_runs([], checkpoint=merge(e.checkpoint for e in events))
        super().__call__(events)


def test_changes_while_down_and_pending_at_a_kill_are_reported_once(tmp_path: Path) -> None:
    from opsrun.store import Store

    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "old.txt").write_text("there before the first start")
    (drop / "edit.txt").write_text("one")
    (drop / "gone.txt").write_text("x")
    with Store.open(tmp_path / "state") as store:
        watch = [("k", trig(drop / "*.txt"))]
        with running(FileSource(watch, states=store), Recorder(store)) as got:
            barrier(drop, got)
        assert [c for c in got.seen() if "barrier" not in c[1]] == []  # the first start
        # While it is down:
        (drop / "new.txt").write_text("dropped while down")
        (drop / "edit.txt").write_text("two, longer")
        (drop / "gone.txt").unlink()
        with running(FileSource(watch, states=store), Recorder(store)) as got:
            wait_for(lambda: len(got.seen()) >= 3, message=lambda: str(got.seen()))
            barrier(drop, got)
        assert sorted(c for c in got.seen() if "barrier" not in c[1]) == [
            ("added", "new.txt"), ("deleted", "gone.txt"), ("modified", "edit.txt")]
        # A change still being debounced when the source stops (a kill) is not lost.
        slow = [("k", trig(drop / "*.txt", debounce=30.0))]
        source = FileSource(slow, states=store)
        with running(source, Recorder(store)) as got:
            (drop / "late.txt").write_text("created just before the kill")
            wait_for(lambda: source._watches[0].pending, timeout=10)
        assert got.seen() == []
        with running(FileSource(watch, states=store), Recorder(store)) as got:
            barrier(drop, got)
        assert [c for c in got.seen() if "barrier" not in c[1]] == [("added", "late.txt")]
        # And what was reported is not reported again.
        with running(FileSource(watch, states=store), Recorder(store)) as got:
            barrier(drop, got)
        assert [c for c in got.seen() if "barrier" not in c[1]] == []
