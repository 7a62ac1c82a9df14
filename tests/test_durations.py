"""Durations as runbooks write them, and as opsrun prints them."""
from __future__ import annotations

import pytest

from opsrun.durations import DurationError, format_duration, parse_duration


@pytest.mark.parametrize("value, seconds", [
    ("500ms", 0.5), ("30s", 30), ("15m", 900), ("2h", 7200), ("1d", 86400),
    ("1h30m", 5400), ("1m30s", 90), ("1.5h", 5400), ("0.25s", 0.25), ("0s", 0),
    (" 10s ", 10), ("1h 30m", 5400), ("2m500ms", 120.5),
    (30, 30), (0, 0), (1.5, 1.5),  # a bare number means seconds
])
def test_parse(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)
    assert isinstance(parse_duration(value), float)


@pytest.mark.parametrize("value, words", [
    ("15 minutes", "is not a duration; use a number and a unit"),
    ("30", "is not a duration"),  # text without a unit: write 30s
    ("-5s", "is not a duration"),
    ("1H", "is not a duration"),
    ("2x", "is not a duration"),
    ("s", "is not a duration"),
    ("", "is not a duration"),
    ("1h30", "is not a duration"),
    ("1,5s", "is not a duration"),
    (True, "is not a duration"),
    (-1, "is negative"),
    (float("nan"), "is not a duration"),
    (float("inf"), "is not a duration"),
    (None, "expected a duration like 30s, found NoneType"),
    ([30], "expected a duration like 30s, found list"),
])
def test_parse_errors(value: object, words: str) -> None:
    with pytest.raises(DurationError) as exc:
        parse_duration(value)
    assert words in str(exc.value)


def test_error_says_what_to_write() -> None:
    with pytest.raises(DurationError, match="500ms, 30s, 15m, 2h or 1d"):
        parse_duration("soon")


@pytest.mark.parametrize("seconds, text", [
    (0, "0ms"), (0.0004, "0ms"), (0.85, "850ms"), (0.9996, "1.0s"), (1, "1.0s"),
    (12.34, "12.3s"), (59.94, "59.9s"), (59.96, "1m00s"), (60, "1m00s"), (245, "4m05s"),
    (3599.4, "59m59s"), (3599.6, "1h00m"), (5400, "1h30m"), (2 * 86400, "48h00m"),
])
def test_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
