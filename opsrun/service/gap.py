"""The start-up report: what happened while the service was down (audited as `daemon.gap`).

Made at start, before any source runs, from what the store kept: the last service's life
(its last sign of life, whether it stopped cleanly), each schedule's mark (fires missed
since, and what `catch_up` does with them), each log position (bytes written after it),
each journal cursor (entries after it, as journalctl counts them before `match:`) and
the event queue (events `opsrun emit` queued meanwhile). It says what the sources are about
to do; they do it themselves a moment later.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from opsrun.durations import format_duration
from opsrun.matcher import Matcher
from opsrun.runbook import JournalTrigger, LogTrigger, ScheduleTrigger
from opsrun.sources.logtail import backlog
from opsrun.sources.schedule import missed_fires, rfc3339
from opsrun.store import Store


@dataclass(frozen=True)
class GapParts:
    """What the report reads: the store, the triggers in force, and the time now."""

    store: Store
    matcher: Matcher
    now: datetime


def report(parts: GapParts) -> dict[str, Any]:
    """The report, as the `daemon.gap` record carries it (plain JSON data)."""
    life = parts.store.service_life()
    out: dict[str, Any] = {"previous": None, "down_s": None}
    if life is not None:
        last = life.stopped_at or life.seen_at
        out["previous"] = {"pid": life.pid, "started_at": _iso(life.started_at),
                           "last_seen": _iso(last), "clean_stop": life.stopped_at is not None}
        out["down_s"] = round(max(0.0, (parts.now - last).total_seconds()), 1)
    out["schedules"] = _schedules(parts)
    out["logs"] = _logs(parts)
    out["journals"] = _journals(parts)
    oldest = parts.store.oldest_queued_at()
    out["events_queued"] = parts.store.queue_length()
    out["oldest_queued_at"] = _iso(oldest) if oldest is not None else None
    return out


def _schedules(parts: GapParts) -> list[dict[str, Any]]:
    found = []
    for b in parts.matcher.bound("schedule"):
        t = b.trigger
        if not isinstance(t, ScheduleTrigger):
            continue
        mark = parts.store.get_schedule_mark(b.key)
        if mark is None:
            continue  # a new trigger: armed now, nothing missed
        m = missed_fires(t, mark, parts.now)
        if m.fires == 0:
            continue
        if m.due_now:
            action = "dropped: a fire is due now and runs on time"
        elif t.catch_up == "last":
            action = "the last missed fire runs once now (catch_up: last)"
        else:
            action = "dropped (catch_up: none)"
        found.append({"runbook": b.runbook.name, "trigger": b.key, "cron": t.cron,
                      "missed": m.fires, "at_least": m.more,
                      "last_missed": rfc3339(m.last, t.timezone) if m.last else None,
                      "catch_up": t.catch_up, "action": action})
    return found


def _logs(parts: GapParts) -> list[dict[str, Any]]:
    found = []
    for b in parts.matcher.bound("log"):
        if not isinstance(b.trigger, LogTrigger):
            continue
        for pos in parts.store.log_positions(b.key):
            path = pos.key[len(b.key) + 1:]
            left = backlog(path, pos)
            if left.bytes == 0 and not left.lost:
                continue
            found.append({"runbook": b.runbook.name, "trigger": b.key, "path": path,
                          "bytes": left.bytes, "offset": pos.offset, "rotated": left.rotated,
                          "lost": left.lost, "truncated": left.truncated})
    return found


def _journals(parts: GapParts) -> list[dict[str, Any]]:
    from opsrun.sources.journal import backlog as journal_backlog

    found = []
    for b in parts.matcher.bound("journal"):
        if not isinstance(b.trigger, JournalTrigger):
            continue
        cursor = parts.store.get_journal_cursor(b.key)
        if cursor is None:
            continue  # never followed: it starts where its `from:` says
        left = journal_backlog(b.trigger, cursor)
        if left.entries or left.error:
            found.append({"runbook": b.runbook.name, "trigger": b.key,
                          "units": list(b.trigger.units), "entries": left.entries,
                          "error": left.error})
    return found


def worth_recording(rep: Mapping[str, Any]) -> bool:
    """Whether there was a previous service or anything to tell (not on a first start)."""
    return bool(rep.get("previous") or rep.get("schedules") or rep.get("logs")
                or rep.get("journals") or rep.get("events_queued"))


def summary(rep: Mapping[str, Any]) -> str:
    """One line for the service's log and `opsrun status`."""
    prev = rep.get("previous")
    if prev is None:
        head = "no earlier service recorded"
    else:
        head = (f"down {format_duration(rep.get('down_s') or 0)} since {prev['last_seen']}"
                + ("" if prev["clean_stop"] else " (not stopped cleanly)"))
    schedules: Sequence[Mapping[str, Any]] = rep.get("schedules") or []
    logs: Sequence[Mapping[str, Any]] = rep.get("logs") or []
    missed = sum(int(s["missed"]) for s in schedules)
    caught = sum(1 for s in schedules if s["action"].startswith("the last"))
    parts = [head]
    if schedules:
        more = "+" if any(s.get("at_least") for s in schedules) else ""
        parts.append(f"{missed:,}{more} schedule fire(s) missed, {caught} caught up")
    if logs:
        parts.append(f"{sum(int(g['bytes']) for g in logs):,} log bytes to read in "
                     f"{len(logs)} file(s)" + (" (some lost to rotation)"
                                               if any(g["lost"] for g in logs) else ""))
    journals: Sequence[Mapping[str, Any]] = rep.get("journals") or []
    if journals:
        parts.append(f"{sum(int(j['entries']) for j in journals):,} journal entries to read")
    parts.append(f"{int(rep.get('events_queued') or 0):,} event(s) queued")
    return "; ".join(parts)


def details(rep: Mapping[str, Any]) -> list[str]:
    """One line per schedule and log file the report names, for the service's log."""
    lines = []
    for s in rep.get("schedules") or []:
        lines.append(f"{s['runbook']}: schedule {s['cron']!r}: {s['missed']:,}"
                     f"{'+' if s['at_least'] else ''} fire(s) missed, the last at "
                     f"{s['last_missed']}; {s['action']}")
    for g in rep.get("logs") or []:
        how = ("rotated; the old file is gone, its lines after the position are lost, "
               if g["lost"] else "rotated, " if g["rotated"] else
               "truncated, read from the start, " if g["truncated"] else "")
        lines.append(f"{g['runbook']}: log {g['path']}: {how}{g['bytes']:,} byte(s) to read")
    for j in rep.get("journals") or []:
        what = ", ".join(j["units"]) or "every unit"
        lines.append(f"{j['runbook']}: journal ({what}): " + (
            f"cannot count the entries after the kept cursor: {j['error']}" if j["error"]
            else f"{j['entries']:,} entries after the kept cursor to read"))
    return lines


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
