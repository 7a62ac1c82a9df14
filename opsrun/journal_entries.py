"""journald entries and `journal:` trigger conditions: one meaning for validation, the
matcher and the journal source. Pure.

A journal entry, as `journalctl -o json` prints it, maps field names to a text, to a list
of byte values (a field that is not valid UTF-8 or holds control characters, like a binary
MESSAGE), to a list of those (a field given more than once), or to null (a field too large
to print, when `--all` is not given). `decode_entry` turns that into text values: bytes
are decoded as UTF-8 with U+FFFD for what is not, a repeated field becomes a list of texts,
and null stays None.

A trigger's conditions: `unit` (units by name or glob, on `_SYSTEMD_UNIT`), `priority`
(this level or more severe, as `journalctl -p` means it), `fields` (field → exact value,
or a list of values any of which will do) and `match` (a regex searched for in MESSAGE;
its named groups become event fields). All of them must hold.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from typing import Any

PRIORITIES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
PRIORITY_SYNONYMS = {"emergency": "emerg", "panic": "emerg", "critical": "crit",
                     "error": "err", "warn": "warning", "information": "info",
                     "informational": "info"}
# What journald and sd_journal_sendv accept as a field name; `__` starts the fields
# journald adds itself (__CURSOR, __REALTIME_TIMESTAMP), which cannot be matched on.
FIELD_NAME_RE = r"[A-Z_][A-Z0-9_]{0,63}"
UNIT_TYPES = (".service", ".socket", ".device", ".mount", ".automount", ".swap", ".target",
              ".path", ".timer", ".slice", ".scope")
_GLOB = re.compile(r"[*?\[]")


def parse_priority(value: str | int) -> int:
    """`err` / `error` / `3` → 3; ValueError with what is accepted otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value <= 7:
            return value
        raise ValueError(f"priority {value} is out of range; use 0 (emerg) to 7 (debug)")
    text = str(value).strip().lower()
    if text.isdigit():
        return parse_priority(int(text))
    text = PRIORITY_SYNONYMS.get(text, text)
    if text in PRIORITIES:
        return PRIORITIES.index(text)
    from opsrun.suggest import did_you_mean

    hint = did_you_mean(text, PRIORITIES)
    raise ValueError(f"unknown priority {value!r}{hint}; use one of "
                     f"{', '.join(PRIORITIES)} or a number 0–7 (this level or more severe)")


def check_field_name(name: str) -> str:
    """A journal field name, or ValueError saying what one looks like."""
    if name.startswith("__"):
        raise ValueError(f"{name!r} is a field journald adds to every entry (cursor, "
                         "timestamps); it cannot be matched on")
    if not re.fullmatch(FIELD_NAME_RE, name):
        hint = f" (did you mean {name.upper()!r}?)" if re.fullmatch(
            FIELD_NAME_RE, name.upper()) else ""
        raise ValueError(f"{name!r} is not a journal field name{hint}; journal fields are "
                         "upper-case letters, digits and _, like SYSLOG_IDENTIFIER or _PID")
    return name


def unit_name(name: str) -> str:
    """A unit as `journalctl -u` takes it: `nginx` means `nginx.service`."""
    if name.endswith(UNIT_TYPES) or name.endswith("*"):
        return name
    return name + ".service"


def is_glob(text: str) -> bool:
    return _GLOB.search(text) is not None


def decode_value(value: Any) -> str | list[str] | None:
    """One field of `journalctl -o json` as text (see the module docstring)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        if all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255
               for b in value):
            return bytes(value).decode("utf-8", "replace")
        out = []
        for v in value:
            one = decode_value(v)
            if isinstance(one, str):
                out.append(one)
        return out
    return str(value)


def decode_entry(raw: Mapping[str, Any]) -> dict[str, str | list[str] | None]:
    """Every field of an entry, decoded to text."""
    return {str(k): decode_value(v) for k, v in raw.items()}


def first(value: str | list[str] | None) -> str | None:
    """A field's value; for a repeated field its first."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def as_int(value: str | list[str] | None) -> int | None:
    text = first(value)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def realtime_rfc3339(value: str | list[str] | None) -> str | None:
    """`__REALTIME_TIMESTAMP` (µs since the epoch) as RFC 3339 UTC."""
    micros = as_int(value)
    if micros is None:
        return None
    try:
        moment = datetime.fromtimestamp(micros / 1_000_000, timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def event_fields(fields: Mapping[str, str | list[str] | None]) -> dict[str, Any]:
    """The event fields of an entry (without the trigger's named groups)."""
    message = first(fields.get("MESSAGE"))
    return {
        "message": message if message is not None else "",
        "unit": first(fields.get("_SYSTEMD_UNIT")),
        "priority": as_int(fields.get("PRIORITY")),
        "hostname": first(fields.get("_HOSTNAME")),
        "pid": as_int(fields.get("_PID")),
        "identifier": first(fields.get("SYSLOG_IDENTIFIER")),
        "cursor": first(fields.get("__CURSOR")),
        "timestamp": realtime_rfc3339(fields.get("__REALTIME_TIMESTAMP")),
        "fields": dict(fields),
    }


EVENT_FIELDS = ("message", "unit", "priority", "hostname", "pid", "identifier", "cursor",
                "timestamp", "fields")


def why_not(units: Sequence[str], priority: int | None, fields: Mapping[str, Sequence[str]],
            pattern: re.Pattern[str] | None, data: Mapping[str, Any]) -> list[str]:
    """What keeps the event `data` (a journal event) from matching; [] when it matches."""
    reasons = []
    entry = data.get("fields")
    entry = entry if isinstance(entry, Mapping) else {}
    unit = data.get("unit")
    if units and not (isinstance(unit, str) and any(fnmatchcase(unit, u) for u in units)):
        reasons.append(f"unit: {unit!r} is not {' or '.join(units)}")
    if priority is not None:
        got = data.get("priority")
        if not isinstance(got, int) or got > priority:
            reasons.append(f"priority: {got!r} is less severe than {PRIORITIES[priority]} "
                           f"({priority})" if isinstance(got, int) else
                           "priority: the entry has no PRIORITY")
    for name, allowed in fields.items():
        value = entry.get(name)
        values = value if isinstance(value, list) else [value]
        if not any(v in allowed for v in values if v is not None):
            reasons.append(f"fields.{name}: {first(value)!r} is not "
                           f"{' or '.join(map(repr, allowed))}")
    if pattern is not None:
        message = data.get("message")
        if not isinstance(message, str) or pattern.search(message) is None:
            reasons.append(f"message: does not match /{pattern.pattern}/")
    return reasons


def matches(units: Sequence[str], priority: int | None, fields: Mapping[str, Sequence[str]],
            pattern: re.Pattern[str] | None, data: Mapping[str, Any]) -> dict[str, Any] | None:
    """The named groups of `match` when the event matches, else None."""
    unit = data.get("unit")
    if units and not (isinstance(unit, str) and any(fnmatchcase(unit, u) for u in units)):
        return None
    if priority is not None:
        got = data.get("priority")
        if not isinstance(got, int) or got > priority:
            return None
    if fields:
        entry = data.get("fields")
        if not isinstance(entry, Mapping):
            return None
        for name, allowed in fields.items():
            value = entry.get(name)
            values = value if isinstance(value, list) else [value]
            if not any(v in allowed for v in values if v is not None):
                return None
    if pattern is None:
        return {}
    message = data.get("message")
    found = pattern.search(message) if isinstance(message, str) else None
    return None if found is None else dict(found.groupdict())
