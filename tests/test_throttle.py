"""Throttle windows: the pure rule, the store that keeps them (one transaction with the
runs), the timer that fires once_after windows, and the runbook key that asks for them."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from opsrun.runbook import Throttle, load_runbook
from opsrun.runs.throttle import ThrottleTimer, throttled_event
from opsrun.store import Store
from opsrun.throttle_window import ONCE_AFTER, ONCE_WITHIN, Entry, ThrottleSpec, Window, enter
from tests.helpers.files import write
from tests.helpers.wait import wait_for


def row(n: int, spec: ThrottleSpec | None, runbook: str = "storm") -> dict[str, Any]:
    return {"run_id": f"run-{n:04d}", "runbook": runbook, "state": "queued",
            "event": {"id": f"ev-{n}", "n": n}, "params": {}, "trigger": "storm/event/x",
            "throttle": spec, "event_source": "json"}


def record(store: Store, n: int, spec: ThrottleSpec | None) -> Entry:
    out: dict[str, Entry] = {}
    store.record_runs([row(n, spec)], throttled=out)
    return out[f"run-{n:04d}"]


# ── the rule ───────────────────────────────────────────────────────────────

def test_once_within_runs_the_first_event_and_counts_the_rest() -> None:
    spec = ThrottleSpec(ONCE_WITHIN, "DiskFull", 600)
    first = enter(None, "storm", spec, 1000.0, "e1", "t", {})
    assert first.runs and first.opened and first.window.until == 1600.0
    second = enter(first.window, "storm", spec, 1001.0, "e2", "t", {})
    assert not second.runs and not second.opened
    assert (second.window.events, second.window.suppressed()) == (2, 1)
    after = enter(second.window, "storm", spec, 1600.0, "e3", "t", {})
    assert after.runs and after.opened and after.window.opened_at == 1600.0


def test_once_after_runs_nothing_and_keeps_the_last_event() -> None:
    spec = ThrottleSpec(ONCE_AFTER, "", 60)
    first = enter(None, "storm", spec, 10.0, "e1", "t1", {"n": 1})
    assert not first.runs and first.opened and first.window.suppressed() == 1
    second = enter(first.window, "storm", spec, 20.0, "e2", "t2", {"n": 2})
    assert not second.runs
    w = second.window
    assert (w.first_event_id, w.last_event_id, w.trigger, w.last_event) == (
        "e1", "e2", "t2", {"n": 2})


def test_the_run_of_a_once_after_window_carries_what_it_collected() -> None:
    w = Window("storm", "k", ONCE_AFTER, 0.0, 90.0, 3, "e1", "e3", "t",
               {"source": "log", "data": {"id": "e3", "line": "x"}})
    source, data = throttled_event(w)
    assert source == "log" and data["line"] == "x"
    assert data["throttled"] == {"count": 3, "first": "1970-01-01T00:00:00.000000Z",
                                 "first_event_id": "e1", "key": "k", "window_s": 90.0}


# ── the store ──────────────────────────────────────────────────────────────

def test_store_records_only_the_run_a_window_lets_through(tmp_path: Path) -> None:
    spec = ThrottleSpec(ONCE_WITHIN, "a", 600)
    with Store.open(tmp_path) as store:
        assert record(store, 1, spec).runs
        assert not record(store, 2, spec).runs
        assert record(store, 3, spec._replace(key="b")).runs  # another key, another window
        out: dict[str, Entry] = {}
        store.record_runs([row(4, None)], throttled=out)  # a runbook without throttle
        assert out == {}
        entry = record(store, 5, spec)
        assert entry.window.suppressed() == 2
        assert sorted(r.id for r in store.list_runs()) == ["run-0001", "run-0003", "run-0004"]


def test_windows_survive_reopening_the_store(tmp_path: Path) -> None:
    spec = ThrottleSpec(ONCE_WITHIN, "a", 600)
    with Store.open(tmp_path) as store:
        record(store, 1, spec)
    with Store.open(tmp_path) as store:  # a restart
        assert not record(store, 2, spec).runs
        [w] = store.throttle_windows("storm")
        assert (w.key, w.events, w.first_event_id) == ("a", 2, "ev-1")


def test_an_ended_once_within_window_lets_the_next_event_run(tmp_path: Path) -> None:
    spec = ThrottleSpec(ONCE_WITHIN, "a", 0.05)
    with Store.open(tmp_path) as store:
        first = record(store, 1, spec)
        wait_for(lambda: time.time() > first.window.until, timeout=5)
        assert record(store, 2, spec).runs
        assert len(store.throttle_windows()) == 1  # the ended one was cleared away


def test_a_once_after_window_fires_once_when_due(tmp_path: Path) -> None:
    spec = ThrottleSpec(ONCE_AFTER, "", 0.05)
    with Store.open(tmp_path) as store:
        for n in range(3):
            assert not record(store, n, spec).runs
        assert store.list_runs() == []
        assert store.due_throttles(["storm"], now=time.time() - 1) == []
        end = store.next_throttle_end(["storm", "other"])
        assert end is not None
        [w] = store.due_throttles(["storm"], now=end)
        assert (w.events, w.last_event) == (3, {"source": "json", "data": {"id": "ev-2",
                                                                           "n": 2}})
        assert store.due_throttles(["other"], now=end) == []
        fired = row(99, None)
        assert store.fire_throttle(w, fired)
        assert not store.fire_throttle(w, fired | {"run_id": "run-0100"})  # fired already
        assert [r.id for r in store.list_runs()] == ["run-0099"]
        assert store.next_throttle_end(["storm"]) is None


def test_two_processes_sharing_the_store_let_one_event_through(tmp_path: Path) -> None:
    """The check and the update are one transaction: of many events at once from two
    connections (two processes), exactly one runs."""
    spec = ThrottleSpec(ONCE_WITHIN, "a", 600)
    stores = [Store.open(tmp_path), Store.open(tmp_path)]
    go = threading.Barrier(8)
    ran: list[bool] = []

    def send(n: int) -> None:
        go.wait()
        ran.append(record(stores[n % 2], n, spec).runs)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ran) == [False] * 7 + [True]
    [w] = stores[0].throttle_windows()
    assert w.suppressed() == 7
    for s in stores:
        s.close()


# ── the timer ──────────────────────────────────────────────────────────────

def test_timer_fires_a_window_at_its_end_without_polling(tmp_path: Path) -> None:
    spec = ThrottleSpec(ONCE_AFTER, "", 0.2)
    rb = load_runbook(write(tmp_path / "rb", "storm.yaml", """\
        throttle: {once_after: 200ms}
        steps:
          - run: 'true'
        """))
    fired: list[Window] = []
    done = threading.Event()

    def fire(w: Window) -> None:
        fired.append(w)
        store.fire_throttle(w, None)
        done.set()

    with Store.open(tmp_path / "state") as store:
        timer = ThrottleTimer(store, lambda: [rb], fire, lambda *a, **k: None,
                              rescan_s=60).start()
        try:
            entry = record(store, 1, spec)
            timer.wake()  # what the dispatcher does when a once_after window opens
            assert done.wait(10), "the window did not fire"
            assert time.time() >= entry.window.until
            assert [w.events for w in fired] == [1]
        finally:
            timer.stop()


# ── the runbook key ────────────────────────────────────────────────────────

@pytest.mark.parametrize(("text", "expected"), [
    ("{once_within: 10m, key: \"${{ event.labels.alertname }}\"}",
     Throttle("once_within", 600.0, "${{ event.labels.alertname }}")),
    ("{once_after: 90s}", Throttle("once_after", 90.0, "")),
])
def test_runbook_throttle_is_parsed(tmp_path: Path, text: str, expected: Throttle) -> None:
    rb = load_runbook(write(tmp_path, "r.yaml", f"""\
        on: [{{event: {{where: {{type: alert}}}}}}]
        throttle: {text}
        steps:
          - run: 'true'
        """))
    assert rb.throttle == expected


def test_no_throttle_by_default(tmp_path: Path) -> None:
    rb = load_runbook(write(tmp_path, "r.yaml", "steps:\n  - run: 'true'\n"))
    assert rb.throttle is None
