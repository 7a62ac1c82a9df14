"""Sizes as people write them in settings: `64MiB`, `500KiB`, `1GiB`, `100MB`, or bytes."""
from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_SIZE = re.compile(r"^\s*(\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


class SizeError(ValueError):
    """Text that is not a size; the message says what to write instead."""


def parse_size(text: str) -> int:
    """Bytes in `text`: a whole number with an optional unit (KiB, MiB, GiB, kB, MB, GB)."""
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise SizeError(f"{text!r} is not a size; write a whole number and a unit, like "
                        "64MiB, 500KiB or 1GiB")
    return int(m.group(1)) * _UNITS[unit]
