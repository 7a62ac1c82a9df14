"""The service's sources: started from the current triggers, restarted when runbooks change.

Trigger sources (files, schedules, log tails) are rebuilt as a set on each reload; their
positions and marks live in the store under trigger keys, so a restart loses nothing.
The emit-queue drainer, stdin, and the watch on the runbooks folder live as long as the
service does.
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opsrun.event import Event, from_object
from opsrun.runbook import FileTrigger, JournalTrigger, LogTrigger, ScheduleTrigger, WebhookTrigger
from opsrun.runs.context import RunContext
from opsrun.runs.dispatch import Dispatcher
from opsrun.sources.base import start_thread

READY_TIMEOUT_S = 15.0
QUEUE_POLL_S = 0.1
QUEUE_TAKE = 500  # events leased from the queue at a time
RESTART_BACKOFF_S = 5.0

Log = Callable[..., None]  # log(message, level=…, **fields)


@dataclass(frozen=True)
class SourceParts:
    """What the sources need of the service."""

    rc: RunContext
    dispatcher: Dispatcher
    log: Log
    runbooks_dir: Path
    stdin: bool
    stop: threading.Event  # the service is stopping
    reload_requested: threading.Event
    wake: threading.Event  # the service's loop looks at its state again
    webhook: Any = None  # a service.webhooks.WebhookService: its listener follows the triggers


class Sources:
    """The service's sources, started and restarted as its runbooks come and go."""

    def __init__(self, parts: SourceParts) -> None:
        self.p = parts
        self.stop_current = threading.Event()
        self.threads: list[threading.Thread] = []
        self.counts: dict[str, int] = {}
        self.stop_forever = threading.Event()
        self.wake_queue = threading.Event()
        self._lifelong: list[threading.Thread] = []
        self._lifelong_started = False
        self._failed_at = 0.0
        self._lock = threading.Lock()
        self._last_event: dict[str, float] = {}  # source name → Unix time, for metrics
        self._last_event_lock = threading.Lock()

    # ── trigger sources ─────────────────────────────────────────────────────

    def start(self) -> None:
        """(Re)start the trigger sources for the current runbooks; wait until they are up."""
        from opsrun.sources.files import FileSource
        from opsrun.sources.journal import JournalSource
        from opsrun.sources.logtail import LogSource
        from opsrun.sources.schedule import ScheduleSource

        with self._lock:
            self._stop_current()
            matcher = self.p.dispatcher.matcher
            store = self.p.rc.store
            stop = threading.Event()
            made: list[Any] = []
            files = [(b.key, t) for b in matcher.bound("file")
                     if isinstance(t := b.trigger, FileTrigger)]
            schedules = [(b.key, t) for b in matcher.bound("schedule")
                         if isinstance(t := b.trigger, ScheduleTrigger)]
            logs = [(b.key, t) for b in matcher.bound("log")
                    if isinstance(t := b.trigger, LogTrigger)]
            if files:
                made.append(FileSource(files, states=store))
            if schedules:
                made.append(ScheduleSource(schedules, store))
            if logs:
                made.append(LogSource(logs, store))
            journals = [(b.key, t) for b in matcher.bound("journal")
                        if isinstance(t := b.trigger, JournalTrigger)]
            made += [JournalSource(key, t, store) for key, t in journals]  # a journalctl each
            hooks = [(b.runbook.name, t) for b in matcher.bound("webhook")
                     if isinstance(t := b.trigger, WebhookTrigger)]
            if self.p.webhook is not None:
                self.p.webhook.update(hooks, initial=not self._lifelong_started)
            self.counts = {"file": len(files), "schedule": len(schedules), "log": len(logs),
                           "journal": len(journals), "webhook": len(hooks)}
            self.stop_current = stop
            self.threads = [start_thread(s, stop, self._emit_from(s.name)) for s in made]
            if not self._lifelong_started:
                self._lifelong_started = True
                self._start_lifelong()
        deadline = time.monotonic() + READY_TIMEOUT_S
        for s in made:
            ready = getattr(s, "ready", None)
            if ready is not None and not ready.wait(max(0.0, deadline - time.monotonic())):
                self.p.log(f"the {s.name} source is not up after {READY_TIMEOUT_S:g}s; "
                           "going on", level="warning")

    def emit(self, events: Sequence[Event]) -> None:
        """Taken = recorded: runs are in the store before a source moves its position.

        A batch is recorded together (dispatch_batch), so the time in which a crash makes
        a source hand the same events over again does not grow with the batch.
        """
        self.p.dispatcher.dispatch_batch(events)

    def _emit_from(self, name: str) -> Callable[[Sequence[Event]], None]:
        def emit(events: Sequence[Event]) -> None:
            self.emit(events)
            if events:
                self._saw(name)
        return emit

    def _saw(self, name: str) -> None:
        """Note that a source handed over events now (after they were taken)."""
        with self._last_event_lock:
            self._last_event[name] = time.time()

    def health(self) -> dict[str, dict[str, Any]]:
        """Each source of describe(): whether its thread runs, and its last event's time.

        A trigger source whose thread died shows `up: False` until restart_if_dead brings it
        back; stdin is down once its input has ended.
        """
        alive: dict[str, bool] = {}
        for t in self.threads:
            name = t.name.removeprefix("opsrun-source-")
            alive[name] = alive.get(name, True) and t.is_alive()
        for t in self._lifelong:
            if t.name == "opsrun-queue":
                alive["queue"] = t.is_alive()
            elif t.name == "opsrun-source-stdin":
                alive["stdin"] = t.is_alive()
        if self.p.webhook is not None:
            alive["webhook"] = self.p.webhook.alive()
        with self._last_event_lock:
            last = dict(self._last_event)
        if self.p.webhook is not None and self.p.webhook.receiver.last_event is not None:
            last["webhook"] = self.p.webhook.receiver.last_event
        return {name: {"up": alive.get(name, False), "last_event_time": last.get(name)}
                for name in self.describe()}

    def _stop_current(self) -> None:
        self.stop_current.set()
        for t in self.threads:
            t.join(timeout=10)
        self.threads = []

    def stop_all(self) -> None:
        with self._lock:
            self._stop_current()
            if self.p.webhook is not None:
                self.p.webhook.stop()
        self.stop_forever.set()
        self.wake_queue.set()
        for t in self._lifelong:
            t.join(timeout=10)

    def healthy(self) -> bool:
        return all(t.is_alive() for t in self.threads + self._lifelong) or \
            self.stop_current.is_set()

    def restart_if_dead(self) -> None:
        """A source that died on an error (a full disk, say) is started again, after a pause."""
        dead = [t.name for t in self.threads if not t.is_alive()]
        hook = self.p.webhook
        if hook is not None and hook.receiver.route_table and not hook.alive():
            dead.append("opsrun-source-webhook")  # its listener could not start, or stopped
        if not dead or self.stop_current.is_set() or self.p.stop.is_set():
            return
        if time.monotonic() - self._failed_at < RESTART_BACKOFF_S:
            return
        self._failed_at = time.monotonic()
        self.p.log("a source stopped; starting the sources again", level="warning",
                   sources=",".join(dead))
        self.start()

    def describe(self) -> dict[str, int]:
        out = {k: v for k, v in self.counts.items() if v}
        out["queue"] = 1
        if self.p.stdin:
            out["stdin"] = 1
        return out

    # ── for the life of the service ────────────────────────────────────────

    def _start_lifelong(self) -> None:
        drainer = threading.Thread(target=self._drain_queue, name="opsrun-queue", daemon=True)
        drainer.start()
        self._lifelong.append(drainer)
        if self.p.stdin:
            from opsrun.sources.stdin_json import StdinJsonSource

            stdin = StdinJsonSource(sys.stdin.buffer, self._rejected)
            self._lifelong.append(start_thread(stdin, self.stop_forever,
                                               self._emit_from("stdin")))

    def start_runbook_watch(self) -> None:
        """Reload when a runbook file is added, changed or removed."""
        from opsrun.sources.files import FileSource

        folder = self.p.runbooks_dir.resolve()
        trigger = FileTrigger((f"{folder}/**/*.yaml", f"{folder}/**/*.yml",
                               f"{folder}/*.yaml", f"{folder}/*.yml"),
                              ("added", "modified", "deleted"), 0.2, ())
        watch = FileSource([("opsrun:runbooks", trigger)])

        def changed(events: Sequence[Event]) -> None:
            self.p.log("runbook files changed", files=len(events))
            self.p.reload_requested.set()
            self.p.wake.set()

        self._lifelong.append(start_thread(watch, self.stop_forever, changed))
        watch.ready.wait(READY_TIMEOUT_S)

    def _drain_queue(self) -> None:
        """Take events from the durable emit queue; each one's runs and removal are atomic."""
        store = self.p.rc.store
        try:
            # One service per state folder (its control socket is taken by now), so a lease
            # still held is a dead service's: its events are this one's to handle now.
            released = store.release_leases()
            if released:
                self.p.log("taking over events a stopped service had taken and not handled",
                           events=released)
        except Exception as e:  # noqa: BLE001 - the leases then run out by themselves
            self.p.log("cannot release the event queue's leases", level="error", error=str(e))
        while not self.stop_forever.is_set():
            try:
                items = store.take_events(limit=QUEUE_TAKE, lease_s=60.0)
            except Exception as e:  # noqa: BLE001 - keep draining after a store hiccup
                self.p.log("cannot read the event queue", level="error", error=str(e))
                items = []
                self.stop_forever.wait(1.0)
            if items and not self.stop_forever.is_set():
                try:
                    self.p.dispatcher.dispatch_batch(
                        [from_object(item.event, _source_of(item)) for item in items],
                        [item.id for item in items])
                except Exception:  # noqa: BLE001 - one at a time, so one bad event stays alone
                    self._dispatch_each(items)
                self._saw("queue")
            if not items:
                self.wake_queue.wait(QUEUE_POLL_S)
                self.wake_queue.clear()

    def _dispatch_each(self, items: Sequence[Any]) -> None:
        for item in items:
            if self.stop_forever.is_set():
                return
            try:
                self.p.dispatcher.dispatch(from_object(item.event, _source_of(item)),
                                           queue_id=item.id)
            except Exception as e:  # noqa: BLE001 - the event stays queued; retried later
                self.p.log("event could not be handled; it stays queued", level="error",
                           queue_id=item.id, error=str(e))

    def _rejected(self, rejection: Any) -> None:
        self.p.rc.audit.append("event.rejected", source="stdin", lineno=rejection.lineno,
                               reason=rejection.reason, excerpt=rejection.excerpt)
        self.p.log("event rejected", level="warning", source="stdin",
                   line=rejection.lineno, reason=rejection.reason)


def _source_of(item: Any) -> str:
    """The source of a queued event: `webhook` for the listener's, else `json` (emit)."""
    return "webhook" if item.source.get("via") == "webhook" else "json"
