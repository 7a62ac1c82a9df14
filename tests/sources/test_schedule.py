"""Schedules: DST at real transition dates (clock passed in), catch_up, 6 fields, jitter."""
from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from opsrun.event import Event
from opsrun.runbook import ScheduleTrigger
from opsrun.sources.schedule import (
    ScheduleSource,
    follows_clock,
    last_fire,
    next_fire,
    next_fires,
    rfc3339,
)
from opsrun.store import Store
from tests.helpers.wait import wait_for

UTC = timezone.utc
BERLIN, NEW_YORK = "Europe/Berlin", "America/New_York"


def sched(cron: str, tz: str = "UTC", catch_up: str = "none", jitter: float = 0.0
          ) -> ScheduleTrigger:
    return ScheduleTrigger(cron, tz, catch_up, jitter)


def local(text: str, tz: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz))


class Marks:
    def __init__(self) -> None:
        self.marks: dict[str, datetime] = {}

    def get_schedule_mark(self, key: str) -> datetime | None:
        return self.marks.get(key)

    def set_schedule_mark(self, key: str, fired_at: datetime) -> None:
        self.marks[key] = fired_at


class Collect:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, events: Sequence[Event]) -> None:
        self.events.extend(events)

    @property
    def fired(self) -> list[tuple[str, bool]]:
        return [(e.data["scheduled_for"], e.data["missed"]) for e in self.events]


def simulate(trigger: ScheduleTrigger, start: datetime, end: datetime,
             step: timedelta = timedelta(minutes=5), marks: Marks | None = None) -> Collect:
    """Poll a source with a clock that moves from start to end; return what fired."""
    got = Collect()
    source = ScheduleSource([("rb/schedule/k", trigger)], marks or Marks())
    now = start
    while now <= end:
        source.poll(now, got)
        now += step
    return got


# (time zone, cron, start and end of the simulation in local time, expected fires)
DST_DAYS = [
    (BERLIN, "30 2 * * *", "2024-03-30T12:00", "2024-04-01T12:00",
     ["2024-03-31T03:00:00+02:00", "2024-04-01T02:30:00+02:00"]),
    (BERLIN, "30 2 * * *", "2024-10-26T12:00", "2024-10-28T12:00",
     ["2024-10-27T02:30:00+02:00", "2024-10-28T02:30:00+01:00"]),
    (NEW_YORK, "30 2 * * *", "2024-03-09T12:00", "2024-03-11T12:00",
     ["2024-03-10T03:00:00-04:00", "2024-03-11T02:30:00-04:00"]),
    (NEW_YORK, "30 1 * * *", "2024-11-02T12:00", "2024-11-04T12:00",
     ["2024-11-03T01:30:00-04:00", "2024-11-04T01:30:00-05:00"]),
    (NEW_YORK, "0 9 * * *", "2024-11-02T12:00", "2024-11-04T12:00",
     ["2024-11-03T09:00:00-05:00", "2024-11-04T09:00:00-05:00"]),
]


@pytest.mark.parametrize(("tz", "cron", "start", "end", "expected"), DST_DAYS)
def test_a_daily_job_fires_once_a_day_across_dst(tz: str, cron: str, start: str, end: str,
                                                 expected: list[str]) -> None:
    got = simulate(sched(cron, tz), local(start, tz), local(end, tz))
    assert got.fired == [(when, False) for when in expected]


@pytest.mark.parametrize(("tz", "day", "fires"), [
    (BERLIN, "2024-03-31", 23), (BERLIN, "2024-10-27", 25),
    (NEW_YORK, "2024-03-10", 23), (NEW_YORK, "2024-11-03", 25)])
def test_an_hourly_job_keeps_its_rhythm_in_real_time(tz: str, day: str, fires: int) -> None:
    start = local(f"{day}T00:00", tz) - timedelta(seconds=1)
    end = local(f"{day}T00:00", tz) + timedelta(days=1) - timedelta(seconds=1)
    found = []
    t = start
    while (t := next_fire(sched("0 * * * *", tz), t)) <= end:
        found.append(t)
    assert len(found) == fires
    assert all(b - a == timedelta(hours=1) for a, b in zip(found, found[1:]))


def test_a_job_pinned_to_the_repeated_hour_runs_in_its_first_pass_only() -> None:
    start = local("2024-10-27T00:00", BERLIN)
    fires = [rfc3339(t, BERLIN) for t in next_fires(sched("*/20 2 * * *", BERLIN), start, 4)]
    assert fires == ["2024-10-27T02:00:00+02:00", "2024-10-27T02:20:00+02:00",
                     "2024-10-27T02:40:00+02:00", "2024-10-28T02:00:00+01:00"]


def test_the_skipped_hour_fires_once_at_the_jump() -> None:
    start = local("2024-03-31T00:00", BERLIN)
    fires = [rfc3339(t, BERLIN) for t in next_fires(sched("*/20 2 * * *", BERLIN), start, 2)]
    assert fires == ["2024-03-31T03:00:00+02:00", "2024-04-01T02:00:00+02:00"]


def test_a_yearly_job_on_the_autumn_day() -> None:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    fires = [rfc3339(t, BERLIN) for t in next_fires(sched("30 2 27 10 *", BERLIN), start, 2)]
    assert fires == ["2024-10-27T02:30:00+02:00", "2025-10-27T02:30:00+01:00"]


def test_six_fields_have_seconds_first() -> None:
    start = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    assert next_fires(sched("*/15 * * * * *"), start, 3) == [
        start + timedelta(seconds=15), start + timedelta(seconds=30),
        start + timedelta(seconds=45)]
    assert next_fire(sched("0 30 3 * * *"), start) == datetime(2024, 5, 2, 3, 30, tzinfo=UTC)
    assert next_fire(sched("30 0 3 * * *"), start) == datetime(2024, 5, 2, 3, 0, 30,
                                                               tzinfo=UTC)


def test_follows_clock() -> None:
    assert follows_clock("0 * * * *") and follows_clock("*/5 * * * * *")
    assert follows_clock("0 */2 * * *") and follows_clock("@hourly")
    assert not follows_clock("30 2 * * *") and not follows_clock("0 0 2 * * *")
    assert not follows_clock("@daily")


def test_last_fire() -> None:
    t = sched("0 3 * * *")
    at = datetime(2024, 5, 10, 12, tzinfo=UTC)
    assert last_fire(t, at, at - timedelta(days=365)) == datetime(2024, 5, 10, 3, tzinfo=UTC)
    assert last_fire(t, at, datetime(2024, 5, 10, 3, tzinfo=UTC)) is None
    every = sched("* * * * * *")
    assert last_fire(every, at, at - timedelta(days=30)) == at


def test_the_first_start_arms_without_firing() -> None:
    marks = Marks()
    got = Collect()
    now = datetime(2024, 5, 1, 3, 0, 30, tzinfo=UTC)  # 30 s after a fire time
    ScheduleSource([("k", sched("0 3 * * *"))], marks).poll(now, got)
    assert got.events == [] and marks.marks["k"] == now


@pytest.mark.parametrize(("catch_up", "expected"), [
    ("last", [("2024-05-04T03:00:00Z", True), ("2024-05-05T03:00:00Z", False)]),
    ("none", [("2024-05-05T03:00:00Z", False)])])
def test_catch_up_after_downtime(catch_up: str, expected: list[tuple[str, bool]]) -> None:
    marks = Marks()
    t = sched("0 3 * * *", catch_up=catch_up)
    down = datetime(2024, 5, 1, 12, tzinfo=UTC)
    ScheduleSource([("k", t)], marks).poll(down, Collect())  # armed, then the host is down
    got = Collect()
    source = ScheduleSource([("k", t)], marks)
    source.poll(datetime(2024, 5, 4, 9, tzinfo=UTC), got)  # back up: three fires missed
    source.poll(datetime(2024, 5, 4, 9, 5, tzinfo=UTC), got)  # nothing more to catch up
    source.poll(datetime(2024, 5, 5, 3, 0, 1, tzinfo=UTC), got)  # on time again
    assert got.fired == expected
    assert marks.marks["k"] == datetime(2024, 5, 5, 3, tzinfo=UTC)


def test_a_late_fire_within_grace_is_not_missed() -> None:
    marks = Marks()
    t = sched("0 3 * * *", catch_up="none")
    ScheduleSource([("k", t)], marks).poll(datetime(2024, 5, 1, 2, 59, tzinfo=UTC), Collect())
    got = Collect()
    ScheduleSource([("k", t)], marks).poll(datetime(2024, 5, 1, 3, 0, 40, tzinfo=UTC), got)
    assert got.fired == [("2024-05-01T03:00:00Z", False)]


def test_jitter_delays_the_fire_and_keeps_scheduled_for() -> None:
    t = sched("0 3 * * *", jitter=120.0)
    source = ScheduleSource([("k", t)], Marks(), rng=random.Random(7))
    got = Collect()
    source.poll(datetime(2024, 5, 1, 2, tzinfo=UTC), got)
    delay = random.Random(7).uniform(0, 120.0)
    fire = datetime(2024, 5, 1, 3, tzinfo=UTC)
    assert source.next_wake() == fire + timedelta(seconds=delay)
    source.poll(fire, got)
    source.poll(fire + timedelta(seconds=delay - 1), got)
    assert got.events == []
    source.poll(fire + timedelta(seconds=delay), got)
    assert got.fired == [("2024-05-01T03:00:00Z", False)]


def test_marks_survive_a_restart_in_the_store(tmp_path: Path) -> None:
    t = sched("0 * * * *", catch_up="last")
    with Store.open(tmp_path) as store:
        got = Collect()
        ScheduleSource([("k", t)], store).poll(datetime(2024, 5, 1, 9, 30, tzinfo=UTC), got)
        ScheduleSource([("k", t)], store).poll(datetime(2024, 5, 1, 10, 0, 5, tzinfo=UTC), got)
    with Store.open(tmp_path) as store:
        ScheduleSource([("k", t)], store).poll(datetime(2024, 5, 1, 13, 30, tzinfo=UTC), got)
        assert store.get_schedule_mark("k") == datetime(2024, 5, 1, 13, tzinfo=UTC)
    assert got.fired == [("2024-05-01T10:00:00Z", False), ("2024-05-01T13:00:00Z", True)]


def test_the_mark_moves_only_after_emit_returned() -> None:
    marks = Marks()
    t = sched("0 3 * * *")
    ScheduleSource([("k", t)], marks).poll(datetime(2024, 5, 1, 2, tzinfo=UTC), Collect())

    def broken(events: Sequence[Event]) -> None:
        raise RuntimeError("queue unavailable")

    fire = datetime(2024, 5, 1, 3, 0, 1, tzinfo=UTC)
    with pytest.raises(RuntimeError):
        ScheduleSource([("k", t)], marks).poll(fire, broken)
    got = Collect()
    ScheduleSource([("k", t)], marks).poll(fire + timedelta(seconds=2), got)
    assert got.fired == [("2024-05-01T03:00:00Z", False)]  # delivered again, not lost


def test_dst_with_the_source_and_a_daily_job_in_new_york() -> None:
    got = simulate(sched("30 2 * * *", NEW_YORK), local("2024-03-01T00:00", NEW_YORK),
                   local("2024-03-20T00:00", NEW_YORK), step=timedelta(seconds=50))
    days = Counter(e[0][:10] for e in got.fired)
    assert len(days) == 19 and set(days.values()) == {1}


def test_run_with_the_real_clock_and_a_six_field_cron() -> None:
    got = Collect()
    source = ScheduleSource([("k", sched("* * * * * *"))], Marks())
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop, got))
    thread.start()
    try:
        wait_for(lambda: len(got.events) >= 2, timeout=5)
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    first, second = (datetime.fromisoformat(e.data["scheduled_for"].replace("Z", "+00:00"))
                     for e in got.events[:2])
    assert second - first == timedelta(seconds=1)
    assert all(e.data["trigger"] == "k" and e.source == "schedule" for e in got.events)
