"""Why an event does (or does not) start a runbook, trigger by trigger. Pure.

The answers follow the matcher's rules (matcher.py): an event is matched against the
triggers of its own source; one naming a trigger (`trigger: KEY`) against that trigger
only; a runbook starts one run for the first of its triggers that matches.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from opsrun.criteria import why_not
from opsrun.event import Event
from opsrun.globs import compile_glob, ignored
from opsrun.matcher import SOURCE_KINDS, trigger_keys
from opsrun.runbook import (
    EventTrigger,
    FileTrigger,
    JournalTrigger,
    LogTrigger,
    Runbook,
    ScheduleTrigger,
    Trigger,
    WebhookTrigger,
)


class TriggerVerdict(NamedTuple):
    """One trigger's answer: whether it matches, and why not."""

    position: int  # on[position]
    key: str
    kind: str
    matches: bool
    reasons: tuple[str, ...]


def explain(rb: Runbook, event: Event) -> list[TriggerVerdict]:
    """Each trigger of the runbook, and whether (or why not) it takes the event."""
    kind = SOURCE_KINDS.get(event.source)
    named = event.data.get("trigger") if kind not in ("event", "webhook") else None
    out = []
    for index, (key, trigger) in enumerate(zip(trigger_keys(rb), rb.triggers)):
        if kind != trigger.kind:
            reasons = [f"this trigger takes {trigger.kind} events; the event's source is "
                       f"{event.source}"]
        elif isinstance(named, str) and named != key:
            reasons = [f"the event names the trigger {named!r}"]
        else:
            reasons = _why_not(trigger, event.data)
        out.append(TriggerVerdict(index, key, trigger.kind, not reasons, tuple(reasons)))
    return out


def _why_not(trigger: Trigger, data: Mapping[str, Any]) -> list[str]:
    if isinstance(trigger, EventTrigger):
        return why_not(trigger.where, data)
    if isinstance(trigger, WebhookTrigger):
        info = data.get("webhook")
        path = info.get("path") if isinstance(info, Mapping) else None
        if path != trigger.path:
            return [f"webhook.path: {path!r} is not {trigger.path}"]
        return why_not(trigger.where, data)
    if isinstance(trigger, FileTrigger):
        return _file(trigger, data)
    if isinstance(trigger, LogTrigger):
        return _log(trigger, data)
    if isinstance(trigger, JournalTrigger):
        return trigger.why_not(data)
    assert isinstance(trigger, ScheduleTrigger)
    return []  # a schedule event names its trigger (checked above)


def _file(trigger: FileTrigger, data: Mapping[str, Any]) -> list[str]:
    path, change = data.get("path"), data.get("change")
    if not isinstance(path, str):
        return ["path: missing (a file event names the file that changed)"]
    reasons = []
    if change not in trigger.events:
        reasons.append(f"change: expected one of {', '.join(trigger.events)}, found {change!r}")
    glob = next((g for g in map(compile_glob, trigger.paths) if g.matches(path)), None)
    if glob is None:
        reasons.append(f"path: {path!r} is not among {', '.join(trigger.paths)}")
    elif ignored(path, trigger.ignore, glob.base):
        reasons.append(f"path: {path!r} is ignored ({', '.join(trigger.ignore)})")
    return reasons


def _log(trigger: LogTrigger, data: Mapping[str, Any]) -> list[str]:
    path, line = data.get("path"), data.get("line")
    if not isinstance(path, str) or not isinstance(line, str):
        return ["path and line: missing (a log event names the file and the line)"]
    if not compile_glob(trigger.path).matches(path):
        return [f"path: {path!r} is not {trigger.path}"]
    if trigger.pattern is not None and trigger.pattern.search(line) is None:
        return [f"line: does not match /{trigger.match}/"]
    return []
