"""The only croniter importer: checking cron expressions, and the next time one matches.

Six fields mean seconds first (`*/5 * * * * *`), as in `runbook_schema` and the docs.
"""
from __future__ import annotations

import threading
from datetime import datetime, timezone

from croniter import CroniterBadDateError, croniter

_CRON_FIELDS = (("minute", "0-59"), ("hour", "0-23"), ("day-of-month", "1-31"),
                ("month", "1-12 or jan-dec"), ("day-of-week", "0-7 or sun-sat"))
_CRON_SHORTHANDS = ("@hourly", "@daily", "@midnight", "@weekly", "@monthly", "@yearly",
                    "@annually")


def check(text: str) -> None:
    """Raise ValueError, naming the field at fault, if `text` is not a schedule."""
    fields = text.split()
    if text.startswith("@"):
        if text.strip() not in _CRON_SHORTHANDS:
            raise ValueError(f"{text!r} is not a schedule opsrun knows; use 5 fields "
                             f"(minute hour day month weekday) or one of "
                             f"{', '.join(_CRON_SHORTHANDS)}")
    elif len(fields) not in (5, 6):
        raise ValueError(f"{text!r} has {len(fields)} fields; a cron expression has 5 "
                         "(minute hour day month weekday), or 6 with seconds first")
    try:
        schedule = croniter(text, datetime(2000, 1, 1, tzinfo=timezone.utc),
                            second_at_beginning=True)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{text!r} is not a valid cron expression: "
                         f"{_cron_field_problem(fields) or e}") from None
    try:
        schedule.get_next(datetime)
    except CroniterBadDateError:
        raise ValueError(f"{text!r} never fires: no month has that day") from None


def _cron_field_problem(fields: list[str]) -> str:
    """Which field of a refused cron expression is wrong, in words."""
    names = ((("second", "0-59"),) if len(fields) == 6 else ()) + _CRON_FIELDS
    for i, (name, allowed) in enumerate(names):
        probe = ["*"] * len(fields)
        probe[i] = fields[i]
        try:
            croniter(" ".join(probe), second_at_beginning=True)
        except (ValueError, KeyError, TypeError):
            return f"the {name} field {fields[i]!r} is not valid; it allows {allowed}"
    return ""


_parsed: dict[str, croniter] = {}
_parsed_lock = threading.Lock()


def after(cron: str, wall: datetime) -> datetime:
    """The first wall time strictly after `wall` that the expression matches (naive)."""
    # Parsing is most of croniter's cost; keep one parsed iterator per expression.
    with _parsed_lock:
        it = _parsed.get(cron)
        if it is None:
            it = _parsed[cron] = croniter(cron, wall, second_at_beginning=True)
        else:
            it.set_current(wall, force=True)
        nxt: datetime = it.get_next(datetime)
    return nxt
