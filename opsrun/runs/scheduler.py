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
    seq: int = 0  # arrival order
    counted: bool = True  # holds one of the max-parallel slots while it runs

    @property
    def group(self) -> tuple[str, str]:
        return (self.runbook, self.key)

    @property
    def serial(self) -> bool:
        return self.policy != PARALLEL


@dataclass(frozen=True)
class Decision:
    accepted: bool
    replaced: tuple[str, ...] = ()  # run ids cancelled to make way
    reason: str = ""


class Scheduler:
    """Starts jobs in worker threads as slots and policies allow.

    Every operation is O(1) or O(jobs of one group): a flood of queued runs of one runbook
    costs no more per run than a single one.
    """

    def __init__(self, max_parallel: int, *, on_error: Callable[[Job, BaseException], None]
                 = lambda job, e: None) -> None:
        self.max_parallel = max(1, max_parallel)
        self.on_error = on_error
        self._lock = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._groups: dict[tuple[str, str], dict[str, Job]] = {}  # the jobs of each group
        self._queues: dict[tuple[str, str], deque[Job]] = {}  # serial groups' queued jobs
        self._parallel: deque[Job] = deque()
        self._resumes: deque[Job] = deque()
        self._busy: dict[tuple[str, str], Job] = {}  # serial group -> its running/parked job
        self._ready: deque[tuple[str, str]] = deque()  # serial groups free with work queued
        self._running = 0
        self._seq = 0
        self._accepting = True

    # ── admission ───────────────────────────────────────────────────────────

    def decide(self, runbook: str, key: str, policy: str) -> Decision:
        """Whether a new run of this runbook and key may join, before it is recorded."""
        with self._lock:
            if not self._accepting:
                return Decision(False, reason="opsrun is shutting down")
            if policy not in (SKIP, REPLACE):
                return Decision(True)
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
            self._seq += 1
            job.seq = self._seq
            if job.policy == REPLACE:
                for other in self._in_group(job.group):
                    self._cancel_locked(other, rt.CANCELLED, f"replaced by run {job.run_id}")
            self._remember(job)
            if job.serial:
                q = self._queues.setdefault(job.group, deque())
                q.append(job)
                if len(q) == 1 and job.group not in self._busy:
                    self._ready.append(job.group)
            else:
                self._parallel.append(job)
            self._pump_locked()

    def resume(self, job: Job) -> None:
        """A parked job's answer came: run it again, ahead of new work."""
        with self._lock:
            if job.state != "parked":
                return
            job.state, job.resume = "queued", True
            self._resumes.append(job)
            self._pump_locked()

    def adopt_parked(self, job: Job) -> None:
        """A job that was already waiting for an answer when opsrun started."""
        with self._lock:
            job.state = "parked"
            self._remember(job)
            if job.serial:
                self._busy[job.group] = job

    def mark_parked(self, job: Job) -> None:
        """Called from a job's own start() when its run parked for an answer."""
        with self._lock:
            job.state = "parked"

    # ── control ─────────────────────────────────────────────────────────────

    def cancel(self, run_id: str, reason: str = rt.CANCELLED, why: str | None = None
               ) -> Job | None:
        """Cancel a job: a running one is told to stop; a queued or parked one is dropped."""
        with self._lock:
            job = self._jobs.get(run_id)
            if job is not None:
                self._cancel_locked(job, reason, why)
            return job

    def stop_accepting(self) -> None:
        """Take no new work; queued jobs that never started are forgotten (they stay queued
        in the store, and the next start takes them up)."""
        with self._lock:
            self._accepting = False
            for q in self._queues.values():
                for j in q:
                    j.state = "done"
                    self._forget(j)
            self._queues.clear()
            self._ready.clear()
            for j in self._parallel:
                j.state = "done"
                self._forget(j)
            self._parallel.clear()
            self._lock.notify_all()

    def running(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.state == "running"]

    def parked(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.state == "parked"]

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until nothing runs or waits to run (parked jobs do not count)."""
        with self._lock:
            return self._lock.wait_for(
                lambda: self._running == 0 and not self._resumes and not self._parallel
                and not any(self._queues.values()), timeout=timeout_s)

    def counts(self) -> dict[str, int]:
        with self._lock:
            states = [j.state for j in self._jobs.values()]
        return {s: states.count(s) for s in ("queued", "running", "parked")}

    # ── inside ──────────────────────────────────────────────────────────────

    def _remember(self, job: Job) -> None:
        self._jobs[job.run_id] = job
        self._groups.setdefault(job.group, {})[job.run_id] = job

    def _forget(self, job: Job) -> None:
        self._jobs.pop(job.run_id, None)
        members = self._groups.get(job.group)
        if members is not None:
            members.pop(job.run_id, None)
            if not members:
                del self._groups[job.group]

    def _in_group(self, group: tuple[str, str]) -> list[Job]:
        """The group's jobs in progress: its busy one, its queue in order, the rest."""
        out = [self._busy[group]] if group in self._busy else []
        out += list(self._queues.get(group, ()))
        listed = {j.run_id for j in out}
        out += [j for j in self._groups.get(group, {}).values()
                if j.state in ("queued", "running") and j.run_id not in listed]
        return out

    def _cancel_locked(self, job: Job, reason: str, why: str | None) -> None:
        job.cancel.cancel(reason, why)
        if job.state == "parked":
            # Nothing runs; the caller records the cancel of a parked run itself.
            job.state = "done"
            self._forget(job)
            self._release(job)
        elif job.state == "queued":
            # Never started: start it now (no slot needed) so the engine records the cancel.
            self._unqueue(job)
            self._launch(job, counted=False)
        self._pump_locked()

    def _unqueue(self, job: Job) -> None:
        q = self._queues.get(job.group)
        if q is not None and job in q:
            was_head = q[0] is job
            q.remove(job)
            if was_head and job.group in self._ready:
                self._ready.remove(job.group)
                if q and job.group not in self._busy:
                    self._ready.appendleft(job.group)
        elif job in self._parallel:
            self._parallel.remove(job)
        elif job in self._resumes:
            self._resumes.remove(job)

    def _pump_locked(self) -> None:
        while self._running < self.max_parallel:
            job = self._next()
            if job is None:
                return
            self._launch(job, counted=True)

    def _next(self) -> Job | None:
        if self._resumes:
            return self._resumes.popleft()
        head = self._queues[self._ready[0]][0] if self._ready else None
        if self._parallel and (head is None or self._parallel[0].seq < head.seq):
            return self._parallel.popleft()
        if head is None:
            return None
        group = self._ready.popleft()
        self._queues[group].popleft()
        if not self._queues[group]:
            del self._queues[group]
        return head

    def _launch(self, job: Job, *, counted: bool) -> None:
        if job.serial:
            self._busy[job.group] = job
        job.state = "running"
        if counted:
            self._running += 1
        job.counted = counted
        threading.Thread(target=self._work, args=(job,), name=f"run-{job.run_id}",
                         daemon=True).start()

    def _release(self, job: Job) -> None:
        """The job no longer holds its group: let the next of the group go."""
        if job.serial and self._busy.get(job.group) is job:
            del self._busy[job.group]
            if self._queues.get(job.group):
                self._ready.append(job.group)

    def _work(self, job: Job) -> None:
        try:
            job.start(job)
        except BaseException as e:  # noqa: BLE001 - a run's failure must not stop the service
            self.on_error(job, e)
            job.state = "done"
        with self._lock:
            if job.counted:
                self._running -= 1
            if job.state == "running":
                job.state = "done"
            if job.state == "done":
                self._forget(job)
                self._release(job)
            self._pump_locked()
            self._lock.notify_all()


def describe(job: Job) -> dict[str, Any]:
    return {"run_id": job.run_id, "runbook": job.runbook, "key": job.key, "state": job.state}
