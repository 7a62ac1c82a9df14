"""Durations as runbooks write them: `500ms`, `30s`, `15m`, `2h`, `1d`, or `1h30m`."""
from __future__ import annotations

import math
import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_WHOLE = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+$")

HINT = "use a number and a unit: 500ms, 30s, 15m, 2h or 1d (combinations like 1h30m work too)"


class DurationError(ValueError):
    """Text that is not a duration; the message says what to write instead."""


def parse_duration(value: object) -> float:
    """Parse a duration into seconds; a bare number means seconds."""
    if isinstance(value, bool):
        raise DurationError(f"{value!r} is not a duration; {HINT}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise DurationError(f"{value!r} is not a duration; {HINT}")
        if value < 0:
            raise DurationError(f"{value!r} is negative; durations are zero or more")
        return float(value)
    if not isinstance(value, str):
        raise DurationError(f"expected a duration like 30s, found {type(value).__name__}")
    text = value.strip().replace(" ", "")
    if not _WHOLE.match(text):
        raise DurationError(f"{value!r} is not a duration; {HINT}")
    return sum(float(n) * _UNITS[u] for n, u in _PART.findall(text))


def format_duration(seconds: float) -> str:
    """Short human form: 850ms, 12.3s, 4m05s, 2h10m."""
    # The unit is chosen after rounding, so 59.97 reads 1m00s rather than 60.0s.
    if seconds < 0.9995:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 59.95:
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    if whole < 3600:
        m, s = divmod(whole, 60)
        return f"{m}m{s:02d}s"
    h, rest = divmod(whole, 3600)
    return f"{h}h{rest // 60:02d}m"
