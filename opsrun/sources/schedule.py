"""Schedule source: cron triggers in each trigger's time zone, safe across DST changes.

Cron expressions have 5 fields, or 6 with SECONDS FIRST (`*/5 * * * * *` is every five
seconds), or are `@hourly`, `@daily`, …

Daylight saving. Time is split into pieces of constant UTC offset; within a piece wall
time and real time map one to one. A job whose hour field starts with `*` (hourly and
finer, "clock-following") fires at every instant the wall clock shows a matching time:
it never fires in the hour that spring skips and fires in both passes of the hour autumn
repeats, so its rhythm in real time is unbroken. A job with a fixed hour (a daily job at
02:30) fires once per matching wall time: if spring skips that time it fires at the
moment the clock jumps (03:00), and if autumn repeats it, only in the first pass. So a
daily job is neither skipped nor fired twice. This is Vixie cron's rule.

Marks. Each trigger's last fire is kept in the store under its trigger key. The first
time a trigger is seen, its mark is set to "now" without firing. After downtime, the fires
between the mark and now are missed: with `catch_up: last` the last of them runs once
(event field `missed: true`), with `none` they are logged and dropped. A fire less than
`grace_s` (60 s) late — plus its jitter — is not missed, just late. The mark advances only
after the events are taken (`emit` returned): at-least-once.

`jitter` delays each on-time fire by a random time up to its value; `scheduled_for` keeps
the unjittered time. Events: `trigger`, `scheduled_for` (RFC 3339 in the trigger's time
zone), `missed`.
"""
from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import NamedTuple
from zoneinfo import ZoneInfo

from opsrun import cron
from opsrun.event import Event, new_event
from opsrun.runbook import ScheduleTrigger
from opsrun.sources.base import Emit, MarkStore, log

UTC = timezone.utc
_SECOND = timedelta(seconds=1)
_DAY = timedelta(days=1)
_MAX_WAIT_S = 30.0  # look at the wall clock again at least this often (it may be set)
_MAX_PIECES = 1000  # offset pieces crossed looking for a fire: ~500 years of DST
GRACE_S = 60.0  # a fire later than this (plus its jitter) is missed, not just late
MISSED_COUNT_LIMIT = 1000  # missed_fires counts this far, then says "at least"


def utc_now() -> datetime:
    """The current time, aware, in UTC."""
    return datetime.now(UTC)


def follows_clock(cron: str) -> bool:
    """Whether a job runs by the clock's rhythm (hour field `*…`) rather than at a fixed hour."""
    text = cron.strip()
    if text.startswith("@"):
        return text in ("@hourly",)
    fields = text.split()
    hour = fields[2] if len(fields) == 6 else fields[1]
    return hour.startswith("*")


def next_fire(trigger: ScheduleTrigger, after: datetime) -> datetime:
    """The first fire strictly after `after` (aware), in UTC."""
    tz = ZoneInfo(trigger.timezone)
    by_clock = follows_clock(trigger.cron)
    lo, inclusive = after.astimezone(UTC), False
    for _ in range(_MAX_PIECES):
        offset = _offset(tz, lo)
        start = _wall(lo, offset) - (_SECOND if inclusive else timedelta(0))
        wall = _cron_after(trigger.cron, start)
        instant = (wall - offset).replace(tzinfo=UTC)
        change = _first_change(tz, lo, instant, offset)
        if change is None:
            if not by_clock and _shown_before(tz, wall, instant):
                # the second pass of an hour autumn repeats: skip what the first pass showed
                lo, inclusive = _end_of_repeat(tz, instant, offset), True
                continue
            return instant
        if not by_clock and _offset(tz, change) > offset:
            # spring forward: wall times in the gap never show; fire once as the clock jumps
            if _cron_after(trigger.cron, _wall(change, offset) - _SECOND) < _wall(
                    change, _offset(tz, change)):
                return change
        lo, inclusive = change, True
    raise ValueError(f"no fire time found for {trigger.cron!r}")


def next_fires(trigger: ScheduleTrigger, after: datetime, count: int) -> list[datetime]:
    """The next `count` fires after `after`, in UTC."""
    out: list[datetime] = []
    for _ in range(count):
        after = next_fire(trigger, after)
        out.append(after)
    return out


def last_fire(trigger: ScheduleTrigger, at: datetime, since: datetime) -> datetime | None:
    """The latest fire in (since, at], or None."""
    window = _SECOND
    while True:
        start = max(since, at - window)
        latest = None
        fire = next_fire(trigger, start)
        while fire <= at:
            latest = fire
            fire = next_fire(trigger, fire)
        if latest is not None or start == since:
            return latest
        window *= 8  # widen until a fire is found: cheap for every-second and yearly jobs


class Missed(NamedTuple):
    """The fires a schedule missed between its mark and now (see `missed_fires`)."""

    fires: int  # how many were missed (at least this many when `more`)
    more: bool  # counting stopped at MISSED_COUNT_LIMIT
    last: datetime | None  # the latest missed fire
    due_now: bool  # the latest fire is less than the grace late: it runs on time


def missed_fires(trigger: ScheduleTrigger, mark: datetime, now: datetime,
                 grace_s: float = GRACE_S) -> Missed:
    """The fires in (mark, now] that ScheduleSource treats as missed when it starts now."""
    latest = last_fire(trigger, now, mark)
    if latest is None:
        return Missed(0, False, None, False)
    due_now = now - latest <= timedelta(seconds=grace_s + trigger.jitter_s)
    count, fire, last = 0, next_fire(trigger, mark), None
    while fire <= now and count < MISSED_COUNT_LIMIT:
        if not (due_now and fire == latest):
            count, last = count + 1, fire
        fire = next_fire(trigger, fire)
    more = count >= MISSED_COUNT_LIMIT and fire <= now
    if more and not due_now:
        last = latest
    elif more:
        last = last_fire(trigger, latest - _SECOND, mark)
    return Missed(count, more, last, due_now)


def rfc3339(moment: datetime, tz_name: str) -> str:
    """A moment as RFC 3339 in a time zone (`Z` for UTC), to the second."""
    local = moment.astimezone(ZoneInfo(tz_name)).replace(microsecond=0)
    text = local.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _offset(tz: ZoneInfo, moment: datetime) -> timedelta:
    off = moment.astimezone(tz).utcoffset()
    assert off is not None
    return off


def _wall(moment: datetime, offset: timedelta) -> datetime:
    return (moment + offset).replace(tzinfo=None)


def _cron_after(cron_text: str, wall: datetime) -> datetime:
    """The first wall time strictly after `wall` that the expression matches (naive)."""
    return cron.after(cron_text, wall)


def _first_change(tz: ZoneInfo, lo: datetime, hi: datetime,
                  offset: timedelta) -> datetime | None:
    """The first instant in (lo, hi] whose UTC offset is not `offset`, or None."""
    # Step a day at a time so that two changes between lo and hi (a yearly job crossing
    # a whole summer) are not missed, then bisect to the second.
    step_lo = lo
    while step_lo < hi:
        step_hi = min(step_lo + _DAY, hi)
        if _offset(tz, step_hi) != offset:
            a, b = step_lo, step_hi
            while b - a > _SECOND:
                mid = a + (b - a) / 2
                if _offset(tz, mid) != offset:
                    b = mid
                else:
                    a = mid
            # Offsets change on whole seconds, and (a, b] is at most a second long.
            return a.replace(microsecond=0) + _SECOND
        step_lo = step_hi
    return None


def _shown_before(tz: ZoneInfo, wall: datetime, instant: datetime) -> bool:
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    return first < instant


def _end_of_repeat(tz: ZoneInfo, instant: datetime, offset: timedelta) -> datetime:
    """Where, in the piece after an autumn change, the wall clock passes what it showed."""
    back = instant - 2 * _DAY
    change = _first_change(tz, back, instant, _offset(tz, back))
    assert change is not None
    before = _offset(tz, change - _SECOND)
    return change + (before - offset)


@dataclass
class _Schedule:
    key: str
    trigger: ScheduleTrigger
    last: datetime  # the mark: fires up to here are accounted for
    due: datetime  # the next fire after `last`
    jitter_s: float  # the delay drawn for `due`


class ScheduleSource:
    """Fires schedule triggers; `poll(now, emit)` does one step with an explicit clock."""

    name = "schedule"

    def __init__(self, schedules: Sequence[tuple[str, ScheduleTrigger]], marks: MarkStore,
                 *, clock: Callable[[], datetime] = utc_now,
                 rng: random.Random | None = None, grace_s: float = GRACE_S) -> None:
        self._pairs = list(schedules)
        self._marks = marks
        self._clock = clock
        self._rng = rng or random.Random()
        self._grace = timedelta(seconds=grace_s)
        self._schedules: list[_Schedule] | None = None

    def run(self, stop: threading.Event, emit: Emit) -> None:
        """Fire schedules until `stop` is set."""
        while not stop.is_set():
            now = self._clock()
            self.poll(now, emit)
            wake = (self.next_wake() - now).total_seconds()
            stop.wait(min(max(wake, 0.0), _MAX_WAIT_S))

    def next_wake(self) -> datetime:
        """When the next fire (with its jitter) is due; far ahead when there are none."""
        if not self._schedules:
            return self._clock() + timedelta(seconds=_MAX_WAIT_S)
        return min(s.due + timedelta(seconds=s.jitter_s) for s in self._schedules)

    def poll(self, now: datetime, emit: Emit) -> list[Event]:
        """Emit what is due at `now`, then advance the marks; return the events."""
        if self._schedules is None:
            self._schedules = [self._arm(key, trig, now) for key, trig in self._pairs]
        events: list[Event] = []
        fired: list[tuple[_Schedule, datetime]] = []
        for s in self._schedules:
            if now < s.due:
                continue
            latest = last_fire(s.trigger, now, s.last)
            if latest is None:
                continue
            late = now - latest
            if late <= self._grace + timedelta(seconds=s.jitter_s):
                if now < latest + timedelta(seconds=s.jitter_s):
                    s.due = latest  # on time, waiting out its jitter
                    continue
                events.append(self._event(s, latest, missed=False))
            elif s.trigger.catch_up == "last":
                log.info("schedule %s: missed fire(s) up to %s; running once now (catch_up: "
                         "last)", s.key, rfc3339(latest, s.trigger.timezone))
                events.append(self._event(s, latest, missed=True))
            else:
                log.info("schedule %s: missed fire(s) up to %s are dropped (catch_up: none)",
                         s.key, rfc3339(latest, s.trigger.timezone))
            fired.append((s, latest))
        if events:
            emit(events)
        for s, latest in fired:
            self._marks.set_schedule_mark(s.key, latest)
            self._advance(s, latest)
        return events

    def _arm(self, key: str, trigger: ScheduleTrigger, now: datetime) -> _Schedule:
        mark = self._marks.get_schedule_mark(key)
        if mark is None:
            mark = now
            self._marks.set_schedule_mark(key, mark)
        s = _Schedule(key, trigger, mark, mark, 0.0)
        self._advance(s, mark)
        return s

    def _advance(self, s: _Schedule, last: datetime) -> None:
        s.last = last
        s.due = next_fire(s.trigger, last)
        s.jitter_s = self._rng.uniform(0, s.trigger.jitter_s) if s.trigger.jitter_s else 0.0

    def _event(self, s: _Schedule, fire: datetime, missed: bool) -> Event:
        return new_event("schedule", trigger=s.key,
                         scheduled_for=rfc3339(fire, s.trigger.timezone), missed=missed)
