"""Runs whose driver died (`kill -9`, the OOM killer, a crash): what they left is ended,
and the run is recorded interrupted, for a person to resume or cancel.

The order matters. The step processes the dead driver left are found and stopped first,
so that `opsrun resume` never runs a step while its earlier attempt still runs; the
record comes before each action it announces, so a kill in between only makes the next
start do it again.
"""
from __future__ import annotations

from collections.abc import Callable

from opsrun import run_types as rt
from opsrun.executors.local import kill_grace
from opsrun.runs import step_processes
from opsrun.runs.context import RunContext
from opsrun.runs.driver_lock import runs_dir
from opsrun.store import RunRecord

# A stop drains or interrupts its runs and records them: one left `running` was not stopped.
CRASHED = ("the opsrun process running it ended without finishing it (killed, crashed, or "
           "the machine went down)")

Log = Callable[..., None]  # log(message, **fields)


def end_orphans(rc: RunContext, run_id: str, log: Log | None = None) -> int:
    """Stop what still runs of a run's steps (recorded as run.orphans_stopped); how many."""
    folder = runs_dir(rc.state_dir)
    found = step_processes.find(folder, run_id)
    if found:
        grace = kill_grace()
        rc.audit.append("run.orphans_stopped", run_id=run_id,
                        runbook=rc.runbook_ref(run_id), grace_s=grace,
                        processes=[{"pid": p.pid, "command": p.command} for p in found])
        if log is not None:
            log("stopping step processes left by the run's dead driver", level="warning",
                run_id=run_id, pids=",".join(str(p.pid) for p in found))
        step_processes.stop(found, grace)
    step_processes.forget(folder, run_id)
    return len(found)


def retry_due(rc: RunContext, run: RunRecord) -> bool:
    """Whether a run left `running` was only waiting to retry a step: its earlier attempt
    ended (no process of it is left, no later attempt started), so the retry can be made."""
    if run.retry_attempt is None or run.current_step is None:
        return False
    started = any(s.position == run.current_step and s.attempt >= run.retry_attempt
                  for s in rc.store.steps_of(run.id))
    if started or step_processes.find(runs_dir(rc.state_dir), run.id):
        return False
    return True


def interrupt(rc: RunContext, run: RunRecord, log: Log | None = None) -> bool:
    """Record a run left `running` by a dead driver as interrupted; whether it was."""
    end_orphans(rc, run.id, log)
    rc.audit.append("run.interrupted", run_id=run.id, runbook=rc.runbook_ref(run.id),
                    current_step=run.current_step, reason=CRASHED)
    done = rc.store.update_run(run.id, expect_state=rt.RUNNING, state=rt.INTERRUPTED,
                               exit_code=rt.EXIT_CODES[rt.INTERRUPTED],
                               error=CRASHED + "; `opsrun resume` or `opsrun cancel` it")
    if done and log is not None:
        log(f"run was interrupted: {CRASHED}", level="warning", run_id=run.id,
            runbook=run.runbook)
    return done
