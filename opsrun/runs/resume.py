"""Picking a run up again: the runbook version it started with, and the results it had."""
from __future__ import annotations

from pathlib import Path

from opsrun import run_types as rt
from opsrun.engine import RunRequest
from opsrun.errors import UsageError
from opsrun.event import Event
from opsrun.identity import Identity
from opsrun.runbook import Runbook, load_runbook, load_runbook_bytes
from opsrun.store import RunRecord, Store

RESUMABLE = (rt.WAITING, rt.INTERRUPTED)


def runbook_of(store: Store, run: RunRecord, inventory: Path | None = None) -> Runbook:
    """The exact runbook version the run started with (kept in the store).

    Its SSH hosts come from the inventory as it is now: `inventory`, else the one beside it.
    """
    kept = store.runbook_version(run.runbook_sha256 or "")
    if kept is not None:
        return load_runbook_bytes(kept[1], Path(kept[0]), inventory=inventory)
    if run.runbook_path and Path(run.runbook_path).is_file():
        rb = load_runbook(Path(run.runbook_path), inventory=inventory)
        if rb.sha256 == run.runbook_sha256:
            return rb
    raise UsageError(f"run {run.id}: the runbook version it started with "
                     f"(sha256 {str(run.runbook_sha256)[:12]}) is no longer available; "
                     "start a new run")


def request_for(store: Store, run: RunRecord, inventory: Path | None = None) -> RunRequest:
    """A RunRequest that continues `run` at the step where it stopped."""
    if run.state not in RESUMABLE:
        raise UsageError(f"run {run.id} {rt.state_phrase(run.state)}; only waiting or "
                         "interrupted runs can be resumed (start a new one with `opsrun run`)")
    return load_request(store, run, inventory)


def load_request(store: Store, run: RunRecord, inventory: Path | None = None) -> RunRequest:
    """The request of a recorded run, at its current step, with the results before it."""
    rb = runbook_of(store, run, inventory)
    at = run.current_step or 0
    if at >= len(rb.steps):
        raise UsageError(f"run {run.id} stopped in its on_failure/on_denied steps; those are "
                         "not resumed — start a new run if needed")
    prior: dict[str, rt.StepResult] = {}
    for rec in store.steps_of(run.id):
        if rec.position >= at:
            continue
        answer = rec.outputs.get("answer") if isinstance(rec.outputs.get("answer"), dict) \
            else None
        outputs = {} if answer is not None else rec.outputs
        prior[rec.step_id] = rt.StepResult(rec.step_id, rec.outcome, rec.exit_code,
                                           rec.stdout_tail, rec.stderr_tail, outputs,
                                           attempts=rec.attempt, hosts=rec.hosts,
                                           answer=answer)
    starter = Identity(run.started_by or "?", run.started_uid if run.started_uid is not None
                       else -1)
    event = Event((run.event or {}).get("source", "manual"), run.event or {})
    return RunRequest(rb, run.id, event, dict(run.params), starter, trigger=run.trigger,
                      resume_at=at, prior=prior)
