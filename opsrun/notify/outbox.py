"""Delivering the outbox: worker threads that take due notifications and try each once.

Each attempt is audited: `notify.sent`, `notify.failed` (the attempt number, the reason,
when the next one is due) or, after the last attempt or an answer that will not get
better, `notify.gave_up`. A failed attempt is tried again after `retry_delay`, doubled
each time up to 10 minutes. A waiting (or stale) notification whose question was answered
before it got out is dropped (`notify.dropped`): it would ask for an answer already given.

Deliverers claim a notification for its timeout plus a margin, so a service and an
`opsrun run` on the same state folder never send one twice, and a deliverer that died
leaves its claims to the next.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from opsrun.audit.log import AuditLog
from opsrun.errors import OpsrunError
from opsrun.notify import deliver
from opsrun.notify.targets import MAX_DELAY_S, Target
from opsrun.store import Notification, Store

POLL_S = 0.5  # for notifications queued by other processes (an `opsrun run`)
LEASE_MARGIN_S = 30.0
WORKERS = 4

Log = Callable[..., None]


def backoff_s(target: Target, attempt: int) -> float:
    """The wait after failed attempt `attempt` (1-based): delay, 2×delay, 4×… up to 10m."""
    return float(min(target.delay_s * 2 ** (attempt - 1), MAX_DELAY_S))


class Outbox:
    """Delivers what is due in the store's outbox, in a few threads, until stopped."""

    def __init__(self, store: Store, audit: AuditLog, secrets: Mapping[str, str], *,
                 log: Log = lambda *a, **k: None, poll_s: float = POLL_S,
                 workers: int = WORKERS, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.audit = audit
        self.secrets = dict(secrets)
        self.log = log
        self.poll_s = poll_s
        self.workers = workers
        self.clock = clock
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._inflight = 0
        self._cond = threading.Condition()

    # ── the worker ──────────────────────────────────────────────────────────

    def start(self) -> Outbox:
        """Deliver from a thread of its own until stop()."""
        if self._thread is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="notify")
            self._thread = threading.Thread(target=self._loop, name="notify-outbox",
                                            daemon=True)
            self._thread.start()
        return self

    def wake(self) -> None:
        """Something was queued: look now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Take nothing more; let attempts under way end (each is bounded by its timeout)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._cond:
            self._cond.wait_for(lambda: self._inflight == 0, timeout_s)
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._take_and_submit()
            except OpsrunError as e:  # a busy or broken store: say so, try again later
                self.log("cannot read the notification outbox", level="error", error=str(e))
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _take_and_submit(self, ids: Iterable[int] | None = None) -> int:
        with self._cond:
            free = self.workers - self._inflight
        if free <= 0:
            return 0
        taken = self.store.take_notifications(now=self.clock(), lease_s=LEASE_MARGIN_S,
                                              limit=free, ids=ids)
        assert self._pool is not None
        for n in taken:
            with self._cond:
                self._inflight += 1
            self._pool.submit(self._attempt_then_done, n)
        return len(taken)

    def _attempt_then_done(self, n: Notification) -> None:
        try:
            self.attempt(n)
        except Exception as e:  # noqa: BLE001 - one bad notification must not stop the rest
            self.log("a notification attempt went wrong", level="error", notify_id=n.id,
                     error=str(e))
            try:
                self.store.notification_tried(n.id, state="pending", attempts=n.attempts,
                                              due_at=self.clock() + MAX_DELAY_S,
                                              error=str(e))
            except OpsrunError:
                pass  # the claim runs out, and the next deliverer tries it
        finally:
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()
            self._wake.set()

    # ── one attempt ─────────────────────────────────────────────────────────

    def attempt(self, n: Notification) -> str:
        """Try one claimed notification once; record and audit how it went; its new state."""
        target = Target.from_record(n.target)
        ref = self._runbook_ref(n.run_id)
        base = {"notify_id": n.id, "notify_event": n.event, "target": target.describe()}
        if n.wait_step is not None and self._answered(n.run_id, n.wait_step):
            self.store.notification_tried(n.id, state="dropped", attempts=n.attempts,
                                          error="the question was answered first")
            self.audit.append("notify.dropped", run_id=n.run_id, runbook=ref, **base,
                              reason="the question was answered before the notification "
                                     "got out")
            return "dropped"
        number = n.attempts + 1
        out = deliver.attempt(target, n.message, self.secrets)
        if out.delivered:
            self.store.notification_tried(n.id, state="sent", attempts=number)
            self.audit.append("notify.sent", run_id=n.run_id, runbook=ref, **base,
                              attempt=number, result=out.reason)
            self.log("notification sent", run_id=n.run_id, event=n.event,
                     target=target.describe(), attempt=number)
            return "sent"
        if out.retry and number < target.attempts:
            wait = backoff_s(target, number)
            self.store.notification_tried(n.id, state="pending", attempts=number,
                                          due_at=self.clock() + wait, error=out.reason)
            self.audit.append("notify.failed", run_id=n.run_id, runbook=ref, **base,
                              attempt=number, reason=out.reason, retry_in_s=round(wait, 3))
            self.log("notification attempt failed", level="warning", run_id=n.run_id,
                     target=target.describe(), attempt=number, reason=out.reason,
                     retry_in=f"{wait:g}s")
            return "pending"
        self.store.notification_tried(n.id, state="gave_up", attempts=number,
                                      error=out.reason)
        self.audit.append("notify.gave_up", run_id=n.run_id, runbook=ref, **base,
                          attempts=number, reason=out.reason)
        self.log("notification given up", level="error", run_id=n.run_id,
                 target=target.describe(), attempts=number, reason=out.reason)
        return "gave_up"

    def _answered(self, run_id: str | None, step_id: str) -> bool:
        if run_id is None:
            return False
        q = self.store.latest_approval(run_id, step_id)
        # No question yet: the engine announces it just before the confirmer records it.
        return q is not None and q.answer is not None

    def _runbook_ref(self, run_id: str | None) -> Any:
        run = self.store.get_run(run_id) if run_id else None
        return None if run is None else run.runbook_ref()

    # ── for commands that end (opsrun run) ──────────────────────────────────

    def drain(self, ids: Iterable[int], budget_s: float) -> list[int]:
        """Deliver these notifications (retries included) for up to `budget_s`; the ids
        still pending after it, left to `opsrun watch`."""
        wanted = list(ids)
        end = time.monotonic() + budget_s
        self.start()
        while True:
            left = [n for n in self.store.notifications(ids=wanted, limit=len(wanted) or 1)
                    if n.state == "pending"]
            if not left or time.monotonic() >= end:
                break
            due = min(n.due_at for n in left)
            if due - self.clock() > end - time.monotonic():
                break  # the next attempt is due after the budget
            self._wake.set()
            with self._cond:
                self._cond.wait(min(0.1, max(0.0, end - time.monotonic())))
        self.stop(timeout_s=max(0.0, end - time.monotonic()) + 1.0)
        return [n.id for n in self.store.notifications(ids=wanted, limit=len(wanted) or 1)
                if n.state == "pending"]
