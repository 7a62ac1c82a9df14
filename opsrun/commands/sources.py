"""opsrun sources: what `opsrun watch` would watch, and when schedules fire next."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from opsrun import describe, output
from opsrun.matcher import Matcher
from opsrun.runbook import (
    EventTrigger,
    FileTrigger,
    JournalTrigger,
    LogTrigger,
    ScheduleTrigger,
    WebhookTrigger,
    load_runbooks,
)


def main(folder: Path, *, as_json: bool, now: datetime | None = None) -> int:
    """Every trigger of every runbook, by source; schedules with their next three fires."""
    from opsrun.sources.schedule import next_fires, rfc3339

    runbooks, problems = load_runbooks([folder])
    matcher = Matcher(runbooks)
    now = now or datetime.now(timezone.utc)
    rows: list[dict[str, Any]] = []
    for bound in matcher.bound():
        t = bound.trigger
        row: dict[str, Any] = {"runbook": bound.runbook.name, "source": t.kind,
                               "key": bound.key, "watch": describe.trigger_short(t)}
        if isinstance(t, ScheduleTrigger):
            fires = next_fires(t, now, 3)
            row["next"] = [{"utc": rfc3339(f, "UTC"), t.timezone: rfc3339(f, t.timezone),
                            "local": f.astimezone().isoformat(timespec="seconds")}
                           for f in fires]
        elif isinstance(t, FileTrigger):
            row["paths"], row["events"] = list(t.paths), list(t.events)
        elif isinstance(t, LogTrigger):
            row["path"], row["match"] = t.path, t.match
        elif isinstance(t, EventTrigger):
            row["where"] = describe.where_text(t) or "every event"
        elif isinstance(t, WebhookTrigger):
            row["path"], row["shape"] = t.path, t.shape
            row["where"] = describe.where_text(t) or "every event"
        elif isinstance(t, JournalTrigger):
            row.update(units=list(t.units), priority=t.priority, match=t.match,
                       fields={k: list(v) for k, v in t.field_matches},
                       directory=t.directory)
        rows.append(row)
    if as_json:
        output.print_json({"version": 1, "triggers": rows,
                           "invalid": sorted({p.file for p in problems})})
        return 2 if problems else 0
    if not rows:
        print(f"no triggers in {folder}: every runbook there runs only by hand")
    for kind, title in (("file", "Files"), ("schedule", "Schedules"), ("log", "Log files"),
                        ("journal", "Journal"), ("event", "JSON events"),
                        ("webhook", "Webhooks")):
        mine = [r for r in rows if r["source"] == kind]
        if not mine:
            continue
        print(output.heading(title))
        for r in mine:
            print(f"  {r['runbook']}: {output.safe(describe.trigger_long(_trigger(matcher, r)).strip())}")
            t = _trigger(matcher, r)
            if isinstance(t, ScheduleTrigger):
                for f in next_fires(t, now, 3):
                    print(f"      next: {_when(f, t.timezone)}")
        print()
    if problems:
        print(f"opsrun: {len({p.file for p in problems})} invalid runbook file(s) not shown; "
              f"run `opsrun validate {folder}`")
        return 2
    return 0


def _when(moment: datetime, zone: str) -> str:
    """`2026-12-07 03:00:00 UTC`, or in this machine's zone, named, with the trigger's own
    wall time when that zone differs: `… 04:00:00 CET (Europe/Berlin: 04:00:00)`."""
    from zoneinfo import ZoneInfo

    local = moment.astimezone()
    text = local.strftime("%Y-%m-%d %H:%M:%S ") + (local.tzname() or local.strftime("%z"))
    wall = moment.astimezone(ZoneInfo(zone))
    if wall.utcoffset() != local.utcoffset() or (zone != "UTC" and wall.tzname() !=
                                                 local.tzname()):
        text += f" ({zone}: {wall.strftime('%Y-%m-%d %H:%M:%S %Z')})"
    return text


def _trigger(matcher: Matcher, row: dict[str, Any]) -> Any:
    bound = matcher.lookup(row["key"])
    assert bound is not None
    return bound.trigger
