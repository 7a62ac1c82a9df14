"""A throttle window of one runbook and key, and what an event arriving does to it. Pure.

The state store keeps the windows (store.py) and applies `enter` inside the transaction
that records the event's runs, so the decision and its record are one atomic step.
"""
from __future__ import annotations

from typing import NamedTuple

ONCE_WITHIN = "once_within"
ONCE_AFTER = "once_after"


class ThrottleSpec(NamedTuple):
    """What a runbook's `throttle:` asks of one event, its key rendered."""

    mode: str  # ONCE_WITHIN | ONCE_AFTER
    key: str
    window_s: float


class Window(NamedTuple):
    """An open (or, for once_after, ended but not yet fired) window.

    `events` counts every event the window took, the first included.
    """

    runbook: str
    key: str
    mode: str
    opened_at: float  # Unix time
    until: float  # Unix time: the window ends
    events: int  # every event it took, the first included
    first_event_id: str
    last_event_id: str
    trigger: str | None = None  # the trigger of the last event (once_after)
    last_event: dict[str, object] | None = None  # the run's event data (once_after)

    def window_s(self) -> float:
        return self.until - self.opened_at

    def suppressed(self) -> int:
        """How many of its events started no run (so far, for once_after: all of them)."""
        return self.events - 1 if self.mode == ONCE_WITHIN else self.events


class Entry(NamedTuple):
    """An event's effect: whether it starts a run now, and the window as it now stands."""

    runs: bool
    window: Window
    opened: bool  # this event opened the window


def enter(open_window: Window | None, runbook: str, spec: ThrottleSpec, now: float,
          event_id: str, trigger: str | None, event: dict[str, object]) -> Entry:
    """What an event does to the window open for its runbook and key (None: none is open)."""
    keep = event if spec.mode == ONCE_AFTER else None
    if open_window is None or open_window.until <= now:
        fresh = Window(runbook, spec.key, spec.mode, now, now + spec.window_s,
                       1, event_id, event_id,
                       trigger if keep is not None else None, keep)
        return Entry(spec.mode == ONCE_WITHIN, fresh, True)
    return Entry(False, open_window._replace(
        events=open_window.events + 1, last_event_id=event_id,
        trigger=trigger if keep is not None else open_window.trigger,
        last_event=keep if keep is not None else open_window.last_event), False)
