"""From an event to recorded, scheduled runs: the step shared by `opsrun watch` and `dispatch`.

For each runbook the matcher picks, the dispatcher renders the concurrency key, asks the
scheduler whether the run may join (a `skip` policy may drop it: audited as run.skipped),
records the run as `queued` in the state store and the audit log, and hands it to the
scheduler. Runs for an event from the `emit` queue are recorded in the same transaction
that removes the event from the queue, so an emitted event starts its runs exactly once.
The service hands over batches (`dispatch_batch`): their runs share one transaction and
one audit group commit. Where a log or file source is up to (the events' checkpoints) is
stored in the transaction that records the runs of those events.

A runbook's `throttle:` is applied in that same transaction (runs/throttle.py): a run its
window holds back is not recorded, and is audited as run.throttled instead of run.queued.
Since the scheduler knows nothing of windows, an event inside an open window skips the
concurrency decision (it is throttled, not skipped), and a once_after event always does:
its run is decided when the window ends (`fire_window`).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opsrun import expressions
from opsrun import params as params_mod
from opsrun import run_types as rt
from opsrun.checkpoints import merge
from opsrun.engine import RunRequest
from opsrun.errors import ExpressionError
from opsrun.event import Event
from opsrun.identity import Identity
from opsrun.ids import new_id
from opsrun.matcher import Match, Matcher
from opsrun.runbook import Runbook
from opsrun.runs.context import RunContext
from opsrun.runs.recording import runbook_ref
from opsrun.runs import throttle
from opsrun.runs.scheduler import REPLACE, SKIP, Decision, Job, Scheduler
from opsrun.throttle_window import ONCE_AFTER, Entry, ThrottleSpec, Window

Log = Callable[..., None]  # log(message, **fields)
BATCH = 500  # events whose runs are recorded together by dispatch_batch


@dataclass
class Planned:
    """A run an event will start, before it is recorded."""

    trigger_key: str
    request: RunRequest
    key: str
    replaced: tuple[str, ...] = ()
    throttle: ThrottleSpec | None = None
    throttled: dict[str, Any] | None = None  # a once_after window's run: its `throttled`


@dataclass
class Dispatcher:
    """Turns events into runs; thread-safe (sources call it from their own threads)."""

    rc: RunContext
    scheduler: Scheduler
    start: Callable[[Job, RunRequest], None]  # runs a job's request through the engine
    starter: Identity
    log: Log = lambda message, **fields: None
    matcher: Matcher = field(default_factory=lambda: Matcher([]))
    # Called when a once_after window opens, so its timer knows of a new end.
    window_opened: Callable[[], None] = lambda: None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _versions: set[str] = field(default_factory=set)  # runbook versions already kept

    def set_matcher(self, matcher: Matcher) -> None:
        with self._lock:
            self.matcher = matcher

    def plan(self, event: Event, matches: Sequence[Match] | None = None) -> list[Planned]:
        """What an event would start (nothing is recorded); skips are audited and logged."""
        out = []
        for m in self._matches(event) if matches is None else matches:
            planned = self._plan_one(m, event)
            if planned is not None:
                out.append(planned)
        return out

    def _matches(self, event: Event) -> list[Match]:
        with self._lock:
            matcher = self.matcher
        return matcher.match(event)

    def dispatch_batch(self, events: Sequence[Event],
                       queue_ids: Sequence[int] | None = None) -> list[str]:
        """Like `dispatch` for each event in turn, with one store transaction and one audit
        commit for every run of up to BATCH events (group commit) instead of one each.

        An event that a `skip` or `replace` runbook matches is dispatched alone, after what
        came before it was scheduled, since its decision depends on the runs before it.
        Throttled runbooks need not be: the store applies their windows event by event in
        the batch's transaction.
        """
        ids: list[str] = []
        pending: list[tuple[Event, int | None, list[Planned]]] = []
        for n, event in enumerate(events):
            queue_id = None if queue_ids is None else queue_ids[n]
            matches = self._matches(event)
            if any(m.runbook.concurrency.policy in (SKIP, REPLACE) for m in matches):
                ids += self._record_batch(pending)
                pending = []
                ids += self.dispatch(event, queue_id=queue_id)
                continue
            pending.append((event, queue_id, self.plan(event, matches)))
            if len(pending) >= BATCH:
                ids += self._record_batch(pending)
                pending = []
        return ids + self._record_batch(pending)

    def _record_batch(self, pending: Sequence[tuple[Event, int | None, list[Planned]]]
                      ) -> list[str]:
        if not pending:
            return []
        throttled: dict[str, Entry] = {}
        accepted = self.rc.store.record_runs(
            [self._row(p) for event, queue_id, planned in pending if queue_id is None
             for p in planned],
            [(queue_id, [self._row(p) for p in planned])
             for event, queue_id, planned in pending if queue_id is not None],
            merge(event.checkpoint for event, _queue_id, _planned in pending),
            throttled=throttled)
        taken = [(event, planned) for event, queue_id, planned in pending
                 if queue_id is None or queue_id in accepted]
        held = [(p, event, throttled[p.request.run_id]) for event, planned in taken
                for p in planned if not self._runs(p, throttled)]
        runs = [(p, event) for event, planned in taken for p in planned
                if self._runs(p, throttled)]
        for p, _event in runs:
            self._save_version(p.request.runbook)
        self.rc.audit.append_many(
            [("run.throttled", self._throttled_record(p, event, entry))
             for p, event, entry in held]
            + [("run.queued", self._queued_record(p, event)) for p, event in runs])
        self._held(held)
        for p, event in runs:
            self._schedule(p, event)
        for event, planned in taken:
            if not planned and event.source in ("json", "webhook"):
                self.log("event matched no runbook", event_id=event.id)
        return [p.request.run_id for p, _event in runs]

    def dispatch(self, event: Event, queue_id: int | None = None) -> list[str]:
        """Record and schedule the runs an event starts; return their run ids."""
        planned = self.plan(event)
        throttled: dict[str, Entry] = {}
        if queue_id is not None:
            if not self.rc.store.accept_queued(queue_id, [self._row(p) for p in planned],
                                               throttled=throttled):
                return []  # another process took this event first
        else:
            self.rc.store.record_runs([self._row(p) for p in planned],
                                      checkpoint=event.checkpoint, throttled=throttled)
        ids = []
        held = [(p, event, throttled[p.request.run_id]) for p in planned
                if not self._runs(p, throttled)]
        for p, _event, entry in held:
            self.rc.audit.append("run.throttled", **self._throttled_record(p, event, entry))
        self._held(held)
        for p in planned:
            if not self._runs(p, throttled):
                continue
            self._submit(p, event)
            ids.append(p.request.run_id)
        if not planned and event.source in ("json", "webhook"):
            self.log("event matched no runbook", event_id=event.id)
        return ids

    def _plan_one(self, m: Match, event: Event) -> Planned | None:
        rb = m.runbook
        run_event = m.event_for_run(event)
        typed = self._defaults(rb, event)
        if typed is None:
            return None
        key = self._key(rb, run_event, typed)
        spec = throttle.spec_for(rb, run_event.data, typed, self.log)
        decision = self._decide(rb, key, spec)
        if not decision.accepted:
            self.rc.audit.append("run.skipped", runbook=runbook_ref(rb), event_id=event.id,
                                 trigger=m.trigger_key, concurrency_key=key,
                                 reason=decision.reason)
            self.log("run skipped", runbook=rb.name, event_id=event.id, reason=decision.reason)
            return None
        request = RunRequest(rb, new_id(), run_event, typed, self.starter, trigger=m.trigger_key)
        return Planned(m.trigger_key, request, key, decision.replaced, spec)

    def _decide(self, rb: Runbook, key: str, spec: ThrottleSpec | None) -> Decision:
        """The scheduler's decision, unless the throttle will hold the run back anyway."""
        if spec is not None and (spec.mode == ONCE_AFTER or self.rc.store.open_throttle(
                rb.name, spec.key, spec.mode) is not None):
            return Decision(True)
        return self.scheduler.decide(rb.name, key, rb.concurrency.policy)

    @staticmethod
    def _runs(p: Planned, throttled: Mapping[str, Entry]) -> bool:
        entry = throttled.get(p.request.run_id)
        return entry is None or entry.runs

    def _throttled_record(self, p: Planned, event: Event, entry: Entry) -> dict[str, Any]:
        return {"runbook": runbook_ref(p.request.runbook),
                **throttle.throttled_fields(event.id, p.trigger_key, entry)}

    def _held(self, held: Sequence[tuple[Planned, Event, Entry]]) -> None:
        """Log the runs throttle windows held back; wake the timer for a new window's end."""
        for p, event, entry in held:
            self.log("run throttled", runbook=p.request.runbook.name, event_id=event.id,
                     throttle_key=entry.window.key, suppressed=entry.window.suppressed())
        if any(entry.opened and entry.window.mode == ONCE_AFTER for _p, _e, entry in held):
            self.window_opened()

    def fire_window(self, window: Window) -> str | None:
        """Start the one run an ended once_after window owes, with its last event; return
        its run id (None: another process fired it, or no run could start).

        The window is closed in the transaction that records the run, so it fires once.
        """
        with self._lock:
            rb = next((r for r in self.matcher.runbooks if r.name == window.runbook), None)
        if rb is None:
            return None  # not a runbook of this process: left for the one that has it
        source, data = throttle.throttled_event(window)
        run_event = Event(source, data)
        planned = self._plan_fired(rb, window, run_event)
        if not self.rc.store.fire_throttle(window, None if planned is None
                                           else self._row(planned)):
            return None
        if planned is None:
            return None
        self._submit(planned, run_event)
        return planned.request.run_id

    def _plan_fired(self, rb: Runbook, window: Window, event: Event) -> Planned | None:
        typed = self._defaults(rb, event)
        if typed is None:
            return None
        key = self._key(rb, event, typed)
        trigger = window.trigger or ""
        decision = self.scheduler.decide(rb.name, key, rb.concurrency.policy)
        if not decision.accepted:
            self.rc.audit.append("run.skipped", runbook=runbook_ref(rb), event_id=event.id,
                                 trigger=trigger, concurrency_key=key,
                                 reason=decision.reason)
            self.log("run skipped", runbook=rb.name, event_id=event.id, reason=decision.reason)
            return None
        request = RunRequest(rb, new_id(), event, typed, self.starter, trigger=trigger)
        return Planned(trigger, request, key, decision.replaced,
                       throttled=dict(event.data["throttled"]))

    def _defaults(self, rb: Runbook, event: Event) -> dict[str, Any] | None:
        """The params of a run an event starts (their defaults), or None: rejected, audited."""
        try:
            return params_mod.resolve(rb.params, {})
        except params_mod.ParamError as e:
            self._reject(rb, event, f"cannot start from an event: {e}")
            return None

    def _key(self, rb: Runbook, event: Event, typed: Mapping[str, Any]) -> str:
        if not rb.concurrency.key:
            return ""
        try:
            return expressions.render_text(rb.concurrency.key,
                                           {"event": dict(event.data), "params": typed})
        except ExpressionError as e:
            self.log("concurrency key could not be rendered; using the runbook-wide key",
                     runbook=rb.name, error=str(e))
            return ""

    def _reject(self, rb: Runbook, event: Event, reason: str) -> None:
        self.rc.audit.append("run.rejected", runbook=runbook_ref(rb), event_id=event.id,
                             reason=reason)
        self.log("run not started", runbook=rb.name, event_id=event.id, reason=reason)

    def _row(self, p: Planned) -> dict[str, Any]:
        rb = p.request.runbook
        return {"runbook": rb.name, "runbook_path": str(rb.path), "runbook_sha256": rb.sha256,
                "event": dict(p.request.event.data), "params": p.request.params,
                "started_by": self.starter.user, "started_uid": self.starter.uid,
                "trigger": p.trigger_key, "state": rt.QUEUED,
                "run_id": p.request.run_id, "throttle": p.throttle,
                "event_source": p.request.event.source}

    def _submit(self, p: Planned, event: Event) -> None:
        self._save_version(p.request.runbook)
        self.rc.audit.append("run.queued", **self._queued_record(p, event))
        self._schedule(p, event)

    def _save_version(self, rb: Runbook) -> None:
        if rb.source and rb.sha256 not in self._versions:
            self.rc.store.save_runbook_version(rb.sha256, str(rb.path), rb.source)
            self._versions.add(rb.sha256)

    def _queued_record(self, p: Planned, event: Event) -> dict[str, Any]:
        rb = p.request.runbook
        record: dict[str, Any] = {
            "run_id": p.request.run_id, "runbook": runbook_ref(rb), "event_id": event.id,
            "trigger": p.trigger_key, "concurrency_key": p.key,
            "policy": rb.concurrency.policy, "replaces": list(p.replaced) or None}
        if p.throttled is not None:
            record["throttled"] = p.throttled  # the once_after window this run closes
        return record

    def _schedule(self, p: Planned, event: Event) -> None:
        rb = p.request.runbook
        self.log("event matched", runbook=rb.name, run_id=p.request.run_id,
                 event_id=event.id, trigger=p.trigger_key)
        request = p.request
        job = Job(request.run_id, rb.name, p.key, rb.concurrency.policy,
                  start=lambda j: self.start(j, request))
        self.scheduler.submit(job)
