"""Wait for a condition with a deadline, never for a fixed time."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold before the deadline."""


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, *, interval: float = 0.005,
             message: str | Callable[[], str] = "") -> T:
    """Poll `predicate` until it returns a truthy value (returned), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise WaitTimeout(f"condition not met within {timeout} s"
                              + (f": {text}" if text else ""))
        # A short pause between checks of a condition, not a wait for an outcome.
        time.sleep(interval)
