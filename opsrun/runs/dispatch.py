"""From an event to recorded, scheduled runs: the step shared by `opsrun watch` and `dispatch`.

For each runbook the matcher picks, the dispatcher renders the concurrency key, asks the
scheduler whether the run may join (a `skip` policy may drop it: audited as run.skipped),
records the run as `queued` in the state store and the audit log, and hands it to the
scheduler. Runs for an event from the `emit` queue are recorded in the same transaction
that removes the event from the queue, so an emitted event starts its runs exactly once.
The service hands over batches (`dispatch_batch`): their runs share one transaction and
one audit group commit. Where a log or file source is up to (the events' checkpoints) is
stored in the transaction that records the runs of those events.
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
from opsrun.runs.scheduler import REPLACE, SKIP, Job, Scheduler

Log = Callable[..., None]  # log(message, **fields)
BATCH = 500  # events whose runs are recorded together by dispatch_batch


@dataclass
class Planned:
    """A run an event will start, before it is recorded."""

    match: Match
    request: RunRequest
    key: str
    replaced: tuple[str, ...] = ()


@dataclass
class Dispatcher:
    """Turns events into runs; thread-safe (sources call it from their own threads)."""

    rc: RunContext
    scheduler: Scheduler
    start: Callable[[Job, RunRequest], None]  # runs a job's request through the engine
    starter: Identity
    log: Log = lambda message, **fields: None
    matcher: Matcher = field(default_factory=lambda: Matcher([]))
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
        accepted = self.rc.store.record_runs(
            [self._row(p) for event, queue_id, planned in pending if queue_id is None
             for p in planned],
            [(queue_id, [self._row(p) for p in planned])
             for event, queue_id, planned in pending if queue_id is not None],
            merge(event.checkpoint for event, _queue_id, _planned in pending))
        taken = [(event, planned) for event, queue_id, planned in pending
                 if queue_id is None or queue_id in accepted]
        runs = [(p, event) for event, planned in taken for p in planned]
        for p, _event in runs:
            self._save_version(p.request.runbook)
        self.rc.audit.append_many([("run.queued", self._queued_record(p, event))
                                   for p, event in runs])
        for p, event in runs:
            self._schedule(p, event)
        for event, planned in taken:
            if not planned and event.source == "json":
                self.log("event matched no runbook", event_id=event.id)
        return [p.request.run_id for p, _event in runs]

    def dispatch(self, event: Event, queue_id: int | None = None) -> list[str]:
        """Record and schedule the runs an event starts; return their run ids."""
        planned = self.plan(event)
        if queue_id is not None:
            if not self.rc.store.accept_queued(queue_id, [self._row(p) for p in planned]):
                return []  # another process took this event first
        else:
            self.rc.store.record_runs([self._row(p) for p in planned],
                                      checkpoint=event.checkpoint)
        ids = []
        for p in planned:
            self._submit(p, event)
            ids.append(p.request.run_id)
        if not planned and event.source == "json":
            self.log("event matched no runbook", event_id=event.id)
        return ids

    def _plan_one(self, m: Match, event: Event) -> Planned | None:
        rb = m.runbook
        run_event = m.event_for_run(event)
        try:
            typed = params_mod.resolve(rb.params, {})
        except params_mod.ParamError as e:
            self._reject(rb, event, f"cannot start from an event: {e}")
            return None
        key = self._key(rb, run_event, typed)
        decision = self.scheduler.decide(rb.name, key, rb.concurrency.policy)
        if not decision.accepted:
            self.rc.audit.append("run.skipped", runbook=runbook_ref(rb), event_id=event.id,
                                 trigger=m.trigger_key, concurrency_key=key,
                                 reason=decision.reason)
            self.log("run skipped", runbook=rb.name, event_id=event.id, reason=decision.reason)
            return None
        request = RunRequest(rb, new_id(), run_event, typed, self.starter, trigger=m.trigger_key)
        return Planned(m, request, key, decision.replaced)

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
                "trigger": p.match.trigger_key, "state": rt.QUEUED,
                "run_id": p.request.run_id}

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
        return {"run_id": p.request.run_id, "runbook": runbook_ref(rb), "event_id": event.id,
                "trigger": p.match.trigger_key, "concurrency_key": p.key,
                "policy": rb.concurrency.policy, "replaces": list(p.replaced) or None}

    def _schedule(self, p: Planned, event: Event) -> None:
        rb = p.request.runbook
        self.log("event matched", runbook=rb.name, run_id=p.request.run_id,
                 event_id=event.id, trigger=p.match.trigger_key)
        request = p.request
        job = Job(request.run_id, rb.name, p.key, rb.concurrency.policy,
                  start=lambda j: self.start(j, request))
        self.scheduler.submit(job)
