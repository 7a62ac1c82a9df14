"""Which runbooks an event starts: triggers indexed by source, then by literal fields. Pure.

How an event is tied to its trigger
-----------------------------------
Every trigger has a **key**, `trigger_key(runbook, index)`, of the form
`<runbook name>/<kind>/<12 hex digits>`: a digest of what the trigger *follows* (file
trigger: paths and ignore globs; schedule: cron and time zone; log: path; event: the
`where:` conditions; webhook: its path and conditions; journal: directory, units, priority
and fields), with `~2`, `~3`… added when one runbook has identical triggers. It does not
depend on the trigger's position, so reordering or adding triggers keeps it, and it
survives edits that do not change what is followed (a log trigger's new `match:` keeps its
read position, a journal trigger's its cursor; a new `debounce:` or `catch_up:` keeps its
marks). Renaming the runbook or changing what is followed starts afresh. Sources key their state in the store by it
(log positions, schedule marks) and put it in the events they make as the field `trigger`.

A webhook event is matched against the webhook triggers of its path (`webhook.path`), never
by a `trigger` field, which its sender could have written. Another event with a `trigger`
field is matched against that trigger only (the trigger's own conditions are still
checked, so the answer does not depend on who made the event). An event without one is
matched against every trigger of its source. A runbook starts at most
one run per event: the first of its triggers that matches (in file order) is the one used.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opsrun import criteria
from opsrun.event import Event
from opsrun.globs import compile_glob, ignored
from opsrun.runbook import (
    EventTrigger,
    FileTrigger,
    JournalTrigger,
    LogTrigger,
    Runbook,
    Trigger,
    WebhookTrigger,
)

# Which trigger kind each event source can start.
SOURCE_KINDS = {"file": "file", "schedule": "schedule", "log": "log", "json": "event",
                "journal": "journal", "webhook": "webhook"}


@dataclass(frozen=True)
class Bound:
    """A trigger together with its runbook, its position there and its key."""

    key: str
    runbook: Runbook
    index: int
    trigger: Trigger
    order: int = field(default=0, compare=False)  # the runbook's position in the Matcher


@dataclass(frozen=True)
class Match:
    """One run to start: the runbook, the trigger that matched, the fields it adds."""

    runbook: Runbook
    trigger: Trigger
    trigger_key: str
    fields: Mapping[str, Any] = field(default_factory=dict)

    def event_for_run(self, event: Event) -> Event:
        """The event as the run sees it: its data plus this match's fields."""
        if not self.fields:
            return event
        return Event(event.source, {**self.fields, **event.data})


def trigger_keys(runbook: Runbook) -> tuple[str, ...]:
    """The key of each trigger of a runbook, in order."""
    seen: dict[str, int] = {}
    keys = []
    for trigger in runbook.triggers:
        base = f"{runbook.name}/{trigger.kind}/{_digest(trigger)}"
        seen[base] = seen.get(base, 0) + 1
        keys.append(base if seen[base] == 1 else f"{base}~{seen[base]}")
    return tuple(keys)


def trigger_key(runbook: Runbook, index: int) -> str:
    """The key of the runbook's trigger at `index`."""
    return trigger_keys(runbook)[index]


def _digest(trigger: Trigger) -> str:
    identity: Any
    if isinstance(trigger, FileTrigger):
        identity = [sorted(trigger.paths), sorted(trigger.ignore)]
    elif isinstance(trigger, LogTrigger):
        identity = trigger.path
    elif isinstance(trigger, EventTrigger):
        identity = [[c.field, c.op, c.value] for c in trigger.where.conditions]
    elif isinstance(trigger, WebhookTrigger):
        identity = [trigger.path, [[c.field, c.op, c.value] for c in trigger.where.conditions]]
    elif isinstance(trigger, JournalTrigger):
        # What journalctl is asked for: its cursor is only valid for the same question.
        identity = [trigger.directory, sorted(trigger.units), trigger.priority,
                    trigger.field_matches]
    else:
        identity = [trigger.cron, trigger.timezone]
    text = json.dumps([trigger.kind, identity], sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class Matcher:
    """Triggers of a set of runbooks, indexed for `match`. Immutable once built."""

    def __init__(self, runbooks: Iterable[Runbook]) -> None:
        self.runbooks = tuple(runbooks)
        self._by_key: dict[str, Bound] = {}
        self._by_kind: dict[str, list[Bound]] = {k: [] for k in SOURCE_KINDS.values()}
        # file and log triggers by their literal path, or the literal folder their glob
        # starts at (marked with a trailing "/")
        self._by_path: dict[str, dict[str, list[Bound]]] = {"file": {}, "log": {}}
        # event triggers by one literal equality each: field -> value key -> triggers
        self._by_field: dict[str, dict[tuple[str, Any], list[Bound]]] = {}
        self._unindexed: list[Bound] = []
        for order, rb in enumerate(self.runbooks):
            for index, (key, trig) in enumerate(zip(trigger_keys(rb), rb.triggers)):
                bound = Bound(key, rb, index, trig, order)
                self._by_key[key] = bound
                self._by_kind[trig.kind].append(bound)
        for kind in ("file", "log"):
            for bound in self._by_kind[kind]:
                for place in _places(bound.trigger):
                    self._by_path[kind].setdefault(place, []).append(bound)
        self._index_events(self._by_kind["event"])
        # webhook triggers by their path: a request is for the triggers of its path only
        self._by_webhook_path: dict[str, list[Bound]] = {}
        for bound in self._by_kind["webhook"]:
            assert isinstance(bound.trigger, WebhookTrigger)
            self._by_webhook_path.setdefault(bound.trigger.path, []).append(bound)

    def _index_events(self, bounds: list[Bound]) -> None:
        # Index each trigger under its most selective literal (the field = value that the
        # fewest triggers share); among equals, the field most triggers use, so that an
        # event needs few lookups (one per distinct indexed field).
        pairs: dict[tuple[str, tuple[str, Any]], int] = {}
        fields: dict[str, int] = {}
        for b in bounds:
            for name, value in _where(b).literal_equalities().items():
                pairs[(name, _value_key(value))] = pairs.get((name, _value_key(value)), 0) + 1
                fields[name] = fields.get(name, 0) + 1
        for b in bounds:
            literals = [(name, _value_key(v)) for name, v in
                        _where(b).literal_equalities().items()]
            if not literals:
                self._unindexed.append(b)
                continue
            name, value_key = min(literals, key=lambda p: (pairs[p], -fields[p[0]], p[0]))
            self._by_field.setdefault(name, {}).setdefault(value_key, []).append(b)
        self._field_paths = {name: tuple(name.split(".")) for name in self._by_field}

    def bound(self, kind: str | None = None) -> list[Bound]:
        """Every trigger (of one kind: file, schedule, log, event), in runbook order."""
        if kind is None:
            return list(self._by_key.values())
        return list(self._by_kind.get(kind, ()))

    def lookup(self, key: str) -> Bound | None:
        """The trigger with this key, or None (e.g. its runbook was removed)."""
        return self._by_key.get(key)

    def match(self, event: Event) -> list[Match]:
        """The runs an event starts, in runbook order, at most one per runbook."""
        kind = SOURCE_KINDS.get(event.source)
        if kind is None:
            return []
        key = event.data.get("trigger") if kind not in ("event", "webhook") else None
        if kind == "webhook":
            # Never by a `trigger` field: the body is the sender's, and that trigger's
            # secret may not be the one this request proved it knows.
            candidates = list(self._by_webhook_path.get(_webhook_path(event.data) or "", ()))
        elif isinstance(key, str):
            bound = self._by_key.get(key)
            candidates = [bound] if bound is not None and bound.trigger.kind == kind else []
        elif kind == "event":
            candidates = self._event_candidates(event.data)
        elif kind in ("file", "log"):
            candidates = self._path_candidates(kind, event.data.get("path"))
        else:
            candidates = []  # a schedule or journal event names its trigger, or none
        out: list[Match] = []
        started: set[int] = set()
        for b in sorted(candidates, key=lambda b: (b.order, b.index)):
            if b.order in started:
                continue
            fields = _check(b.trigger, event.data)
            if fields is not None:
                started.add(b.order)
                out.append(Match(b.runbook, b.trigger, b.key, fields))
        return out

    def _event_candidates(self, data: Mapping[str, Any]) -> list[Bound]:
        found = list(self._unindexed)
        for name, path in self._field_paths.items():
            value = criteria.lookup(data, path)
            if _hashable(value):
                found.extend(self._by_field[name].get(_value_key(value), ()))
        return found

    def _path_candidates(self, kind: str, path: Any) -> list[Bound]:
        if not isinstance(path, str) or not path.startswith("/"):
            return []
        index = self._by_path[kind]
        found: list[Bound] = list(index.get(path, ()))
        folder = os.path.dirname(path)
        while True:
            found.extend(index.get(folder.rstrip("/") + "/", ()))
            if folder == "/":
                return list({id(b): b for b in found}.values())
            folder = os.path.dirname(folder)


def _webhook_path(data: Mapping[str, Any]) -> str | None:
    info = data.get("webhook")
    path = info.get("path") if isinstance(info, Mapping) else None
    return path if isinstance(path, str) else None


def _where(b: Bound) -> criteria.Criteria:
    assert isinstance(b.trigger, EventTrigger)
    return b.trigger.where


def _places(trigger: Trigger) -> set[str]:
    paths = trigger.paths if isinstance(trigger, FileTrigger) else (
        trigger.path,) if isinstance(trigger, LogTrigger) else ()
    globs = [compile_glob(p) for p in paths]
    return {g.pattern if g.literal else g.base.rstrip("/") + "/" for g in globs}


def _hashable(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


def _value_key(value: Any) -> tuple[str, Any]:
    # criteria.same says 1 == 1.0 but true != 1 and "1" != 1; Python's own equality
    # agrees on the first and not the others, so the type family goes into the key.
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("number", value)
    return (type(value).__name__, value)


def _check(trigger: Trigger, data: Mapping[str, Any]) -> dict[str, Any] | None:
    """The fields the trigger adds when it matches the event's data, else None."""
    if isinstance(trigger, EventTrigger):
        return {} if criteria.matches(trigger.where, data) else None
    if isinstance(trigger, WebhookTrigger):
        if _webhook_path(data) != trigger.path:
            return None
        return {} if criteria.matches(trigger.where, data) else None
    if isinstance(trigger, FileTrigger):
        path, change = data.get("path"), data.get("change")
        if not isinstance(path, str) or change not in trigger.events:
            return None
        glob = next((g for g in map(compile_glob, trigger.paths) if g.matches(path)), None)
        if glob is None or ignored(path, trigger.ignore, glob.base):
            return None
        return {}
    if isinstance(trigger, LogTrigger):
        path, line = data.get("path"), data.get("line")
        if not isinstance(path, str) or not isinstance(line, str):
            return None
        if not compile_glob(trigger.path).matches(path):
            return None
        pattern = trigger.pattern
        if pattern is None:
            return {}
        found = pattern.search(line)
        return None if found is None else dict(found.groupdict())
    if isinstance(trigger, JournalTrigger):
        return trigger.check(data)
    return {}  # a schedule trigger: the key already named it
