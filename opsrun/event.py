"""Events: what sources report and triggers match (DESIGN section 1).

An event is a plain JSON object. opsrun guarantees `source`, `id` and `time` (RFC 3339,
UTC); each source adds its own fields. For JSON events the object is kept as sent, and
`id`/`time`/`source` are added only when missing, so a sender's own `source` survives;
`Event.source` is always the opsrun source that produced it.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, NamedTuple

from opsrun.checkpoints import Checkpoint
from opsrun.ids import new_id

_EMPTY_MAP: Mapping[str, Any] = MappingProxyType({})

MAX_EVENT_BYTES = 1024 * 1024
MAX_DEPTH = 64


class EventRejected(ValueError):
    """Input that is not an acceptable event; the message says why."""


class Event(NamedTuple):
    source: str
    data: Mapping[str, Any] = _EMPTY_MAP
    # Stored with the event's runs: where its source is up to once it is taken.
    checkpoint: Checkpoint | None = None

    @property
    def id(self) -> str:
        return str(self.data["id"])

    @property
    def time(self) -> str:
        return str(self.data["time"])

    def to_json(self) -> str:
        return json.dumps(self.data, separators=(",", ":"), ensure_ascii=False)


def now_rfc3339() -> str:
    """The current time in RFC 3339, UTC, with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_event(source: str, **fields: Any) -> Event:
    """An event from one of opsrun's own sources."""
    data = {"source": source, "id": new_id(), "time": now_rfc3339(), **fields}
    return Event(source, data)


def from_object(obj: Mapping[str, Any], source: str = "json") -> Event:
    """A JSON event as sent, with id, time and source added where missing."""
    data = dict(obj)
    data.setdefault("source", source)
    if not isinstance(data.get("id"), (str, int)) or data.get("id") == "":
        data["id"] = new_id()
    data.setdefault("time", now_rfc3339())
    return Event(source, data)


def parse_json_event(raw: bytes | str, source: str = "json") -> Event:
    """Parse one JSON line into an event, or raise EventRejected with the reason."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_EVENT_BYTES:
        raise EventRejected(f"the event is {len(raw):,} bytes; the limit is "
                            f"{MAX_EVENT_BYTES:,} (1 MiB)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EventRejected(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                            f"{e.start})") from None
    # Only a line with enough brackets can be too deep; most lines skip the scan.
    depth = _max_depth(text) if text.count("[") + text.count("{") > MAX_DEPTH else 0
    if depth > MAX_DEPTH:
        raise EventRejected(f"nested {depth} levels deep; the limit is {MAX_DEPTH}")
    try:
        obj = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise EventRejected(f"not JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise EventRejected(f"nested too deeply; the limit is {MAX_DEPTH}") from None
    except EventRejected:
        raise
    except ValueError:
        # Python refuses integers of over 4,300 digits (CVE-2020-10735) with a ValueError.
        raise EventRejected("a number has more than 4,300 digits; send it as text") from None
    if not isinstance(obj, dict):
        raise EventRejected(f"a JSON event must be an object {{…}}, not "
                            f"{_json_kind(obj)}")
    if "\\u" in text:
        _refuse_lone_surrogates(obj)
    return from_object(obj, source)


def check_object(obj: Mapping[str, Any]) -> None:
    """Refuse an already parsed event (from the control socket) that a JSON line could not
    carry: over the size or depth limit, NaN or infinity, or a lone surrogate."""
    try:
        raw = json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except ValueError as e:  # NaN/Infinity, or UnicodeEncodeError for a lone surrogate
        raise EventRejected(_unencodable(e)) from None
    except RecursionError:
        raise EventRejected(f"nested too deeply; the limit is {MAX_DEPTH}") from None
    parse_json_event(raw)


def _no_constant(name: str) -> Any:
    raise EventRejected(f"{name} is not a JSON number (the JSON standard has no NaN or "
                        "Infinity); send it as text, like \"NaN\"")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise EventRejected(f"the number {text[:40]} is too large for a float")
    return value


def _refuse_lone_surrogates(obj: Any) -> None:
    # `"\ud800"` is valid JSON grammar but no character: it could not be stored, logged or
    # given to a command as UTF-8. Checked only when the text has \u escapes.
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise EventRejected(_unencodable(e)) from None


def _unencodable(e: ValueError) -> str:
    if isinstance(e, UnicodeEncodeError):
        bad = e.object[e.start:e.end]
        return (f"a text holds a lone surrogate ({ascii(bad)[1:-1]}), which is not a "
                "character; send valid Unicode")
    return "NaN and Infinity are not JSON numbers; send them as text"


def _max_depth(text: str) -> int:
    """Deepest bracket nesting, outside strings; cheap enough to run before json.loads."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def _json_kind(obj: Any) -> str:
    if isinstance(obj, list):
        return "a list"
    if isinstance(obj, str):
        return "a string"
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "a boolean"
    return "a number"
