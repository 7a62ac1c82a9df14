"""`throttle:` for alert storms: at most one run per window and key.

The dispatcher asks `spec_for` what a runbook's throttle asks of an event (its key
rendered), and the state store applies it in the transaction that records the event's
runs (store.record_runs): the first event of a `once_within` window runs and opens the
window; the others in it run nothing and are audited as `run.throttled`. A `once_after`
window runs nothing at first and keeps the last event; when it ends, a ThrottleTimer
(in `opsrun watch` and `opsrun dispatch`) fires it: one run with that event, to which
`throttled` is added (`throttled_event`). The windows live in the store, so a restart
forgets none and fires a due one at start. Manual `opsrun run` is never throttled: it is
a person's explicit choice.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opsrun import expressions
from opsrun.audit.format import rfc3339
from opsrun.durations import format_duration
from opsrun.errors import ExpressionError, OpsrunError
from opsrun.runbook import Runbook
from opsrun.store import Store
from opsrun.throttle_window import ONCE_AFTER, Entry, ThrottleSpec, Window

Log = Callable[..., None]  # log(message, **fields)
RESCAN_S = 5.0  # how soon a window another process opened is seen to end
MIN_WAIT_S = 0.01


def spec_for(rb: Runbook, event: Mapping[str, Any], params: Mapping[str, Any],
             log: Log) -> ThrottleSpec | None:
    """The throttle a runbook puts on this event, its key rendered; None: not throttled."""
    t = rb.throttle
    if t is None:
        return None
    key = ""
    if t.key:
        try:
            key = expressions.render_text(t.key, {"event": dict(event), "params": params})
        except ExpressionError as e:
            # Like the concurrency key: a storm of odd events still shares one window
            # rather than each starting a run.
            log("throttle key could not be rendered; using the runbook-wide key",
                runbook=rb.name, error=str(e))
    return ThrottleSpec(t.mode, key, t.window_s)


def throttled_fields(event_id: str, trigger: str, entry: Entry) -> dict[str, Any]:
    """The fields of a `run.throttled` audit record (beside the runbook)."""
    w = entry.window
    return {"event_id": event_id, "trigger": trigger, "throttle_key": w.key,
            "mode": w.mode, "until": rfc3339(w.until), "suppressed": w.suppressed(),
            "window_opened": entry.opened}


def throttled_event(window: Window) -> tuple[str, dict[str, Any]]:
    """The source and data of the event a once_after window runs with: its last event
    plus `throttled: {count, first, last_event_id, key, window_s}`."""
    kept = window.last_event or {}
    source = str(kept.get("source") or "json")
    data = dict(kept.get("data") or {})  # type: ignore[call-overload]
    data["throttled"] = {"count": window.events, "first": rfc3339(window.opened_at),
                         "first_event_id": window.first_event_id, "key": window.key,
                         "window_s": round(window.window_s(), 3)}
    return source, data


def explain(rb: Runbook, event: Mapping[str, Any], params: Mapping[str, Any],
            store: Store | None) -> dict[str, Any] | None:
    """What the runbook's throttle would do with an event that its triggers take now:
    `runs_now`, the rendered `key`, and the open window's `until` and `suppressed`
    (None when no window is open, or no state folder was given). None: not throttled."""
    spec = spec_for(rb, event, params, lambda message, **fields: None)
    if spec is None:
        return None
    window = None if store is None else store.open_throttle(rb.name, spec.key, spec.mode)
    return {"mode": spec.mode, "key": spec.key, "window_s": spec.window_s,
            "runs_now": spec.mode != ONCE_AFTER and window is None,
            "until": None if window is None else rfc3339(window.until),
            "suppressed": None if window is None else window.suppressed()}


def explain_text(t: Mapping[str, Any]) -> str:
    """`explain`'s line for a throttle verdict."""
    key = f"key {t['key']!r}" if t["key"] else "the runbook-wide key"
    if t["mode"] == ONCE_AFTER:
        if t["until"] is None:
            return (f"throttle: opens a once_after window of {format_duration(t['window_s'])} "
                    f"for {key}; one run with the last event of it when it ends")
        return (f"throttled: joins the once_after window for {key} "
                f"({_events(t['suppressed'])} so far); one run with the last event when it "
                f"ends at {t['until']}")
    if t["until"] is None:
        return (f"throttle: runs and opens a once_within window of "
                f"{format_duration(t['window_s'])} for {key}")
    return (f"throttled until {t['until']}: the once_within window for {key} is open "
            f"({_events(t['suppressed'])} held back so far); no run")


def _events(n: int) -> str:
    return f"{n} event" + ("s" if n != 1 else "")


class ThrottleTimer:
    """Fires once_after windows when they end: those of this process's runbooks, opened by
    this process (`wake` says when) or another one sharing the store (seen within
    RESCAN_S). Runs in its own thread until `stop`."""

    def __init__(self, store: Store, runbooks: Callable[[], Iterable[Runbook]],
                 fire: Callable[[Window], object], log: Log, *, rescan_s: float = RESCAN_S
                 ) -> None:
        self.store = store
        self.runbooks = runbooks
        self.fire = fire
        self.log = log
        self.rescan_s = rescan_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ThrottleTimer:
        """Fire what is due now (it ended while opsrun was down), then start the thread."""
        try:
            self.fire_due()
        except OpsrunError as e:
            self.log("throttle windows could not be fired; trying again", level="error",
                     error=str(e))
        self._thread = threading.Thread(target=self._loop, name="opsrun-throttle",
                                        daemon=True)
        self._thread.start()
        return self

    def wake(self) -> None:
        """Look at the windows again now: one was opened or changed."""
        self._wake.set()

    def stop(self) -> None:
        """Stop the thread and wait for it (a firing in progress completes)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def fire_due(self) -> float | None:
        """Fire every window that has ended; return when the next one ends (Unix time)."""
        names = [rb.name for rb in self.runbooks()]
        for window in self.store.due_throttles(names):
            if self._stop.is_set():
                return None
            self.fire(window)
        return self.store.next_throttle_end(names)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                end = self.fire_due()
            except OpsrunError as e:
                self.log("throttle windows could not be fired; trying again", level="error",
                         error=str(e))
                end = None
            # At least MIN_WAIT_S: a due window that a firing left in place (its store write
            # failed) is tried again without spinning.
            wait = self.rescan_s if end is None else min(self.rescan_s,
                                                         max(MIN_WAIT_S, end - time.time()))
            self._wake.wait(wait)
            self._wake.clear()

