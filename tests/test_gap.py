"""The start-up report (`daemon.gap`): what happened while the service was down."""
from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

from opsrun.matcher import Matcher
from opsrun.runbook import ScheduleTrigger, load_runbooks
from opsrun.service import gap
from opsrun.sources.logtail import backlog
from opsrun.sources.schedule import MISSED_COUNT_LIMIT, missed_fires
from opsrun.store import LogPosition, Store
from tests.helpers.files import write
from tests.helpers.service import Service
from tests.helpers.wait import wait_for

UTC = timezone.utc
T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)


def every(cron: str, catch_up: str = "last") -> ScheduleTrigger:
    return ScheduleTrigger(cron, "UTC", catch_up, 0.0)


# ── missed fires ────────────────────────────────────────────────────────────

def test_fires_between_the_mark_and_now_are_counted_with_the_last() -> None:
    m = missed_fires(every("*/5 * * * *"), T0, T0 + timedelta(minutes=32))
    assert (m.fires, m.more, m.due_now) == (6, False, False)
    assert m.last == T0 + timedelta(minutes=30)


def test_a_fire_less_than_the_grace_late_is_not_missed() -> None:
    m = missed_fires(every("*/5 * * * *"), T0, T0 + timedelta(minutes=30, seconds=20))
    assert (m.fires, m.due_now) == (5, True)
    assert m.last == T0 + timedelta(minutes=25)
    assert missed_fires(every("*/5 * * * *"), T0, T0 + timedelta(seconds=30)).fires == 0


def test_counting_stops_at_the_limit_and_says_so() -> None:
    m = missed_fires(every("* * * * * *"), T0, T0 + timedelta(hours=2))
    assert (m.fires, m.more) == (MISSED_COUNT_LIMIT, True)
    assert m.last == T0 + timedelta(hours=2) - timedelta(seconds=1)  # the latest is due now


# ── log backlog ─────────────────────────────────────────────────────────────

def position(path: Path, offset: int, key: str = "t") -> LogPosition:
    st = os.stat(path)
    return LogPosition(f"{key}:{path}", st.st_dev, st.st_ino, offset)


def test_backlog_of_the_same_file_is_what_was_appended(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("one\n")
    pos = position(log, 4)
    with open(log, "a") as f:
        f.write("two\nthree\n")
    assert backlog(str(log), pos) == (10, False, False, False)


def test_backlog_of_a_truncated_file_is_all_of_it(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("one\ntwo\n")
    pos = position(log, 8)
    log.write_text("x\n")
    assert backlog(str(log), pos) == (2, False, False, True)


def test_backlog_after_a_rotation_counts_the_old_files_rest(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("one\n")
    pos = position(log, 4)
    with open(log, "a") as f:
        f.write("two\n")
    log.rename(tmp_path / "app.log.1")
    log.write_text("three\n")
    assert backlog(str(log), pos) == (4 + 6, True, False, False)
    (tmp_path / "app.log.1").unlink()
    assert backlog(str(log), pos) == (6, True, True, False)


# ── the report from a real store ────────────────────────────────────────────

RUNBOOK = """\
name: NAME
on:
  - schedule: {cron: "*/10 * * * *", catch_up: CATCH}
  - log: {path: LOG, match: ERROR}
steps:
  - run: "true"
"""


def matcher(rbdir: Path, log: Path) -> Matcher:
    for name, catch in (("nightly", "last"), ("often", "none")):
        write(rbdir, f"{name}.yaml", RUNBOOK.replace("NAME", name).replace("CATCH", catch)
              .replace("LOG", str(log)))
    found, problems = load_runbooks([rbdir])
    assert not problems
    return Matcher(sorted(found, key=lambda r: r.name))


def test_report_names_missed_fires_log_bytes_and_queued_events(
        tmp_path: Path, rbdir: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("ok\n")
    m = matcher(rbdir, log)
    [nightly, often] = m.bound("schedule")
    with Store.open(tmp_path / "state") as store:
        store.service_started(4242)
        store.service_seen(stopped=True)
        store.set_schedule_mark(nightly.key, T0)
        store.set_schedule_mark(often.key, T0)
        for b in m.bound("log"):
            st = os.stat(log)
            store.set_log_position(f"{b.key}:{log}", st.st_dev, st.st_ino, 3)
        with open(log, "a") as f:
            f.write("ERROR one\nfine\n")
        store.enqueue_events([{"type": "a"}, {"type": "b"}])
        now = datetime.now(UTC)
        life = store.service_life()
        assert life is not None
        rep = gap.report(gap.GapParts(store, m, T0 + timedelta(hours=1, minutes=5)))
    assert rep["previous"]["pid"] == 4242 and rep["previous"]["clean_stop"] is True
    assert rep["down_s"] >= 0 and life.stopped_at is not None and life.stopped_at <= now
    by_runbook = {s["runbook"]: s for s in rep["schedules"]}
    assert by_runbook["nightly"]["missed"] == 6
    assert by_runbook["nightly"]["last_missed"] == "2026-12-07T10:00:00Z"
    assert by_runbook["nightly"]["action"].startswith("the last missed fire runs once")
    assert by_runbook["often"]["action"] == "dropped (catch_up: none)"
    assert [(g["runbook"], g["bytes"]) for g in rep["logs"]] == [("nightly", 15), ("often", 15)]
    assert rep["events_queued"] == 2 and rep["oldest_queued_at"]
    line = gap.summary(rep)
    assert "12 schedule fire(s) missed, 1 caught up" in line
    assert "30 log bytes to read in 2 file(s)" in line and "2 event(s) queued" in line
    json.dumps(rep)  # the audit record carries it as it is


def test_a_first_start_reports_nothing(tmp_path: Path, rbdir: Path) -> None:
    m = matcher(rbdir, tmp_path / "app.log")
    with Store.open(tmp_path / "state") as store:
        rep = gap.report(gap.GapParts(store, m, T0))
    assert rep["previous"] is None and not gap.worth_recording(rep)


# ── the service ─────────────────────────────────────────────────────────────

SERVICE_RUNBOOK = """\
name: watched
on:
  - schedule: {cron: "0 3 * * *", catch_up: last}
  - log: {path: LOG, match: ERROR}
steps:
  - run: echo "$OPSRUN_EVENT_FILE" >> OUT
"""


def kinds(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r["kind"] == kind]


def test_the_service_reports_its_downtime_in_the_log_status_and_audit(
        tmp_path: Path, rbdir: Path, services: list[Service]) -> None:
    log, out = tmp_path / "app.log", tmp_path / "out"
    log.write_text("start\n")
    write(rbdir, "watched.yaml", SERVICE_RUNBOOK.replace("LOG", str(log))
          .replace("OUT", str(out)))
    first = Service(tmp_path, rbdir)
    services.append(first)
    first.start()
    assert not kinds(first.audit(), "daemon.gap")  # a first start has nothing to tell
    with open(log, "a") as f:
        f.write("ERROR before\n")
    wait_for(lambda: out.exists() and len(out.read_text().splitlines()) == 1, timeout=20,
             message=first.log)
    assert first.stop() == 0

    # While it is down: the nightly fire passes (its mark moves back two days), lines are
    # logged and events are emitted to the queue.
    db = sqlite3.connect(first.state / "state.db")
    db.execute("UPDATE schedule_marks SET last_fire = ?",
               ((datetime.now(UTC) - timedelta(days=2)).isoformat(),))
    db.commit()
    db.close()
    with open(log, "a") as f:
        f.write("ERROR while down\nquiet\n")
    assert first.cli("emit", '{"type": "x"}').returncode == 0

    second = Service(tmp_path, rbdir)
    services.append(second)
    second.start()
    [rec] = kinds(second.audit(), "daemon.gap")
    assert rec["previous"]["clean_stop"] is True
    [sched] = rec["schedules"]
    assert sched["missed"] == 2 and sched["catch_up"] == "last"
    [lg] = rec["logs"]
    assert lg["bytes"] == len("ERROR while down\nquiet\n") and lg["path"] == str(log)
    assert rec["events_queued"] == 1
    assert "while opsrun watch was down: down " in second.log()
    assert "2 schedule fire(s) missed, 1 caught up" in second.log()
    status = second.cli("status")
    assert "at start:" in status.stdout and "schedule fire(s) missed" in status.stdout
    assert json.loads(second.cli("status", "--json").stdout)["gap"]["events_queued"] == 1
    # and the sources then do what it said: the caught-up fire and the line both run
    wait_for(lambda: len(out.read_text().splitlines()) == 3, timeout=20, message=second.log)
    second.kill()

    third = Service(tmp_path, rbdir)
    services.append(third)
    third.start()
    [_, rec] = kinds(third.audit(), "daemon.gap")
    assert rec["previous"]["clean_stop"] is False  # killed: down since its last sign of life
    assert rec["schedules"] == [] and rec["logs"] == []
    assert third.stop() == 0
