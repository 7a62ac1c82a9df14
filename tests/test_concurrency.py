"""The scheduler: max-parallel slots and the queue / skip / replace / parallel policies."""
from __future__ import annotations

import threading

from opsrun import run_types as rt
from opsrun.runs.scheduler import Job, Scheduler
from tests.helpers.wait import wait_for


class Recorder:
    """Jobs that block until released, recording the order they start in."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.gates: dict[str, threading.Event] = {}
        self.park: set[str] = set()
        self.lock = threading.Lock()

    def job(self, scheduler: Scheduler, run_id: str, key: str = "", policy: str = "queue",
            runbook: str = "rb") -> Job:
        gate = self.gates.setdefault(run_id, threading.Event())

        def start(job: Job) -> None:
            with self.lock:
                self.started.append(run_id)
            while not gate.wait(0.01):
                if job.cancel.is_set():
                    return
            if run_id in self.park:
                scheduler.mark_parked(job)

        return Job(run_id, runbook, key, policy, start)

    def release(self, run_id: str) -> None:
        self.gates[run_id].set()


def test_queue_runs_one_at_a_time_in_order() -> None:
    s, r = Scheduler(4), Recorder()
    for n in range(5):
        s.submit(r.job(s, f"r{n}"))
    for n in range(5):
        wait_for(lambda: len(r.started) == n + 1, timeout=5)
        assert r.started == [f"r{i}" for i in range(n + 1)]
        r.release(f"r{n}")
    assert s.wait_idle(5)


def test_keys_are_independent_and_slots_bound_everything() -> None:
    s, r = Scheduler(2), Recorder()
    for key in ("a", "b", "c"):
        s.submit(r.job(s, f"run-{key}", key=key))
    wait_for(lambda: len(r.started) == 2, timeout=5)
    assert r.started == ["run-a", "run-b"]  # the third waits for a slot
    assert s.counts() == {"queued": 1, "running": 2, "parked": 0}
    r.release("run-a")
    wait_for(lambda: len(r.started) == 3, timeout=5)
    for run_id in ("run-b", "run-c"):
        r.release(run_id)
    assert s.wait_idle(5)


def test_skip_drops_while_one_is_in_progress() -> None:
    s, r = Scheduler(4), Recorder()
    assert s.decide("rb", "k", "skip").accepted
    s.submit(r.job(s, "first", key="k", policy="skip"))
    decision = s.decide("rb", "k", "skip")
    assert not decision.accepted and "run first of rb (key 'k') is still in progress" in \
        decision.reason
    assert s.decide("rb", "other", "skip").accepted
    r.release("first")
    assert s.wait_idle(5)
    assert s.decide("rb", "k", "skip").accepted


def test_replace_cancels_the_running_one() -> None:
    s, r = Scheduler(4), Recorder()
    old = r.job(s, "old", policy="replace")
    s.submit(old)
    wait_for(lambda: r.started == ["old"], timeout=5)
    decision = s.decide("rb", "", "replace")
    assert decision.replaced == ("old",)
    s.submit(r.job(s, "new", policy="replace"))
    wait_for(lambda: r.started == ["old", "new"], timeout=5)
    assert old.cancel.is_set() and rt.cancel_reason(old.cancel) == rt.CANCELLED
    assert old.cancel.why == "replaced by run new"
    r.release("new")
    assert s.wait_idle(5)


def test_parallel_has_no_limit_but_slots() -> None:
    s, r = Scheduler(3), Recorder()
    for n in range(3):
        s.submit(r.job(s, f"p{n}", policy="parallel"))
    wait_for(lambda: len(r.started) == 3, timeout=5)
    for n in range(3):
        r.release(f"p{n}")
    assert s.wait_idle(5)


def test_parked_runs_hold_no_slot_but_keep_their_key() -> None:
    s, r = Scheduler(1), Recorder()
    r.park.add("asks")
    asks = r.job(s, "asks", key="k")
    s.submit(asks)
    wait_for(lambda: r.started == ["asks"], timeout=5)
    r.release("asks")
    wait_for(lambda: s.counts()["parked"] == 1, timeout=5)
    s.submit(r.job(s, "same-key", key="k"))
    s.submit(r.job(s, "other-key", key="x"))
    wait_for(lambda: "other-key" in r.started, timeout=5)  # the one slot is free
    assert "same-key" not in r.started  # the key is still held by the parked run
    r.release("other-key")
    r.park.clear()
    s.resume(asks)
    wait_for(lambda: r.started.count("asks") == 2, timeout=5)
    wait_for(lambda: "same-key" in r.started, timeout=5)
    r.release("same-key")
    assert s.wait_idle(5)


def test_stop_accepting_forgets_queued_work() -> None:
    s, r = Scheduler(1), Recorder()
    s.submit(r.job(s, "running"))
    s.submit(r.job(s, "queued", key="other"))
    wait_for(lambda: r.started == ["running"], timeout=5)
    s.stop_accepting()
    assert not s.decide("rb", "", "queue").accepted
    r.release("running")
    assert s.wait_idle(5)
    assert r.started == ["running"]


def test_a_failing_job_frees_its_slot() -> None:
    errors: list[BaseException] = []
    s = Scheduler(1, on_error=lambda job, e: errors.append(e))

    def boom(job: Job) -> None:
        raise RuntimeError("boom")

    s.submit(Job("bad", "rb", "", "queue", boom))
    done = threading.Event()
    s.submit(Job("good", "rb", "", "queue", lambda job: done.set()))
    assert done.wait(5)
    assert [str(e) for e in errors] == ["boom"]
