"""How runs share the machine: a bound on running runs, and each runbook's concurrency policy.

- `--max-parallel` bounds the runs that are running at once. A run waiting for an answer
  (parked) holds no slot.
- A runbook's `concurrency: {key, policy}` applies among runs of that runbook with the
  same rendered key, counting runs that are running, parked, or queued before it:
  `queue` one at a time, in arrival order; `skip` drops a new run while one is in
  progress; `replace` cancels the one in progress (and any queued) for the new one;
  `parallel` no limit.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opsrun import run_types as rt

QUEUE, SKIP, REPLACE, PARALLEL = "queue", "skip", "replace", "parallel"


@dataclass(eq=False)
class Job:
    """One run the scheduler knows about, from queued to done."""

    run_id: str
    runbook: str
    key: str  # the rendered concurrency key
    policy: str
    start: Callable[[Job], None]  # runs the job to its end (or until it parks); blocking
    cancel: rt.Cancel = field(default_factory=rt.Cancel)
    state: str = "queued"  # queued | running | parked | done
    resume: bool = False

    @property
    def group(self) -> tuple[str, str]:
        return (self.runbook, self.key)


@dataclass(frozen=True)
class Decision:
    accepted: bool
    replaced: tuple[str, ...] = ()  # run ids cancelled to make way
    reason: str = ""


class Scheduler:
    """Starts jobs in worker threads as slots and policies allow."""

    def __init__(self, max_parallel: int, *, on_error: Callable[[Job, BaseException], None]
                 = lambda job, e: None) -> None:
        self.max_parallel = max(1, max_parallel)
        self.on_error = on_error
        self._lock = threading.Condition()
        self._pending: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}
        self._accepting = True

    # ── admission ───────────────────────────────────────────────────────────

    def decide(self, runbook: str, key: str, policy: str) -> Decision:
        """Whether a new run of this runbook and key may join, before it is recorded."""
        with self._lock:
            if not self._accepting:
                return Decision(False, reason="opsrun is shutting down")
            active = self._in_group((runbook, key))
            if policy == SKIP and active:
                return Decision(False, reason=f"run {active[0].run_id} of {runbook} "
                                              f"(key {key!r}) is still in progress")
            if policy == REPLACE:
                return Decision(True, replaced=tuple(j.run_id for j in active))
            return Decision(True)

    def submit(self, job: Job) -> None:
        """Queue a job (recorded as queued by the caller); start what can start."""
        with self._lock:
            if job.policy == REPLACE:
                for other in self._in_group(job.group):
                    self._cancel_locked(other, rt.CANCELLED, f"replaced by run {job.run_id}")
            self._jobs[job.run_id] = job
            self._pending.append(job)
            self._pump_locked()

    def resume(self, job: Job) -> None:
        """A parked job's answer came: run it again, ahead of new work."""
        with self._lock:
            if job.state != "parked":
                return
            job.state, job.resume = "queued", True
            self._pending.appendleft(job)
            self._pump_locked()

    def adopt_parked(self, job: Job) -> None:
        """A job that was already waiting for an answer when opsrun started."""
        with self._lock:
            job.state = "parked"
            self._jobs[job.run_id] = job

    # ── control ─────────────────────────────────────────────────────────────

    def cancel(self, run_id: str, reason: str = rt.CANCELLED, why: str | None = None) -> Job | None:
        """Cancel a job: a running one is told to stop; a queued or parked one is dropped."""
        with self._lock:
            job = self._jobs.get(run_id)
            if job is not None:
                self._cancel_locked(job, reason, why)
            return job

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False
            dropped = [j for j in self._pending if not j.resume]
            for j in dropped:
                self._pending.remove(j)
                j.state = "done"
                self._jobs.pop(j.run_id, None)

    def running(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.state == "running"]

    def parked(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.state == "parked"]

    def queued(self) -> list[Job]:
        with self._lock:
            return list(self._pending)

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until nothing runs (parked jobs do not count); False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: not any(
                j.state == "running" for j in self._jobs.values()) and not (
                self._accepting and self._pending), timeout=timeout_s)

    def counts(self) -> dict[str, int]:
        with self._lock:
            states = [j.state for j in self._jobs.values()]
        return {s: states.count(s) for s in ("queued", "running", "parked")}

    # ── inside ──────────────────────────────────────────────────────────────

    def _in_group(self, group: tuple[str, str]) -> list[Job]:
        return [j for j in self._jobs.values() if j.group == group and j.state != "done"]

    def _cancel_locked(self, job: Job, reason: str, why: str | None) -> None:
        job.cancel.cancel(reason, why)
        if job.state == "parked":
            # Nothing runs; the caller records the cancel of a parked run itself.
            job.state = "done"
            self._jobs.pop(job.run_id, None)
        elif job.state == "queued" and job in self._pending:
            # Never started: it goes through the engine once, which records the cancel.
            self._pending.remove(job)
            self._pending.appendleft(job)
        self._pump_locked()

    def _may_start(self, job: Job, running: int) -> bool:
        if job.cancel.is_set():
            return True  # it only needs to record that it was cancelled
        if running >= self.max_parallel:
            return False
        if job.policy == PARALLEL:
            return True
        ahead = [j for j in self._in_group(job.group) if j is not job]
        if job.resume:
            return not any(j.state == "running" for j in ahead)
        # queue/skip/replace: alone in its group, and first in line among the queued.
        for other in ahead:
            if other.state in ("running", "parked"):
                return False
            if other.state == "queued" and self._before(other, job):
                return False
        return True

    def _before(self, a: Job, b: Job) -> bool:
        order = list(self._pending)
        return a in order and b in order and order.index(a) < order.index(b)

    def _pump_locked(self) -> None:
        running = sum(1 for j in self._jobs.values() if j.state == "running")
        for job in list(self._pending):
            if not self._may_start(job, running):
                continue
            self._pending.remove(job)
            job.state = "running"
            running += 1
            threading.Thread(target=self._work, args=(job,), name=f"run-{job.run_id}",
                             daemon=True).start()

    def _work(self, job: Job) -> None:
        try:
            job.start(job)
        except BaseException as e:  # noqa: BLE001 - a run's failure must not stop the service
            self.on_error(job, e)
            job.state = "done"
        with self._lock:
            if job.state == "running":
                job.state = "done"
            if job.state == "done":
                self._jobs.pop(job.run_id, None)
            self._pump_locked()
            self._lock.notify_all()

    def mark_parked(self, job: Job) -> None:
        """Called from a job's own start() when its run parked for an answer."""
        with self._lock:
            job.state = "parked"


def describe(job: Job) -> dict[str, Any]:
    return {"run_id": job.run_id, "runbook": job.runbook, "key": job.key, "state": job.state}
