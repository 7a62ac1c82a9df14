"""Cancelling a run that no process drives: waiting for an answer, queued, or interrupted.

A run that a process drives is cancelled by that process (it is told to stop); one that
none drives has its end recorded here, the same way by `opsrun cancel` and by the service.
"""
from __future__ import annotations

from datetime import datetime, timezone

from opsrun import run_types as rt
from opsrun.runs.context import RunContext

NOT_ENDED = (rt.QUEUED, rt.WAITING, rt.INTERRUPTED, rt.RUNNING)


def cancel_undriven(rc: RunContext, run_id: str, *, why: str, uid: int | None) -> bool:
    """Record a run nobody drives as cancelled: its state, its questions closed (by `uid`),
    and run.finished. False, and nothing recorded, if the run had ended meanwhile."""
    if not rc.store.update_run(run_id, expect_state=NOT_ENDED, state=rt.CANCELLED,
                               finished_at=datetime.now(timezone.utc),
                               exit_code=rt.EXIT_CODES[rt.CANCELLED], error=why):
        return False
    rc.store.close_questions(run_id, uid=uid)
    rc.audit.append("run.finished", run_id=run_id, runbook=rc.runbook_ref(run_id),
                    state=rt.CANCELLED, exit_code=rt.EXIT_CODES[rt.CANCELLED], error=why)
    return True
