"""opsrun runs / logs / resume / cancel: what ran, what it printed, and picking runs up."""
from __future__ import annotations

import os
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path

from opsrun import output, paths, secrets
from opsrun import run_types as rt
from opsrun.approvals import check_flag_may_answer, resolve_run_id
from opsrun.commands.run import result_document, run_with_signals
from opsrun.describe import describe_answer
from opsrun.durations import format_duration
from opsrun.errors import UsageError
from opsrun.inventory import check_option as check_inventory_option
from opsrun.runs import recovery, resume
from opsrun.runs.cancel import cancel_undriven
from opsrun.runs.context import open_run_context
from opsrun.runs.driver_lock import driver_pid, driving
from opsrun.store import RunRecord, Store


def _store(state_dir: str | None) -> Store:
    folder = paths.state_dir_from_env(state_dir)
    paths.check_trusted(folder)
    if not (folder / paths.STATE_DB).exists():
        raise UsageError(f"no state store in {folder}: nothing has run yet "
                         "(or give --state-dir)")
    return Store.open(folder)


def _when(t: datetime | None) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _took(run: RunRecord) -> str:
    if run.started_at is None:
        return "-"
    end = run.finished_at or datetime.now(timezone.utc)
    return format_duration((end - run.started_at).total_seconds())


def list_runs(state_dir: str | None, *, runbook: str | None, state: str | None, limit: int,
              as_json: bool) -> int:
    """Recent runs, newest first."""
    if state is not None and state not in rt.ALL_STATES:
        from opsrun.suggest import did_you_mean

        raise UsageError(f"--state: unknown state {state!r}{did_you_mean(state, rt.ALL_STATES)};"
                         f" the states are {', '.join(rt.ALL_STATES)}")
    with _store(state_dir) as store:
        runs = store.list_runs(runbook=runbook, state=state, limit=limit)
    if as_json:
        output.print_json({"version": 1, "runs": [_run_json(r) for r in runs]})
        return 0
    if not runs:
        print("no runs yet")
        return 0
    output.print_table(["run", "runbook", "state", "started", "took", "by", "trigger"],
                       [(r.id, r.runbook, r.state, _when(r.started_at or r.created_at),
                         _took(r), r.started_by or "-", r.trigger or "-") for r in runs])
    return 0


def _run_json(r: RunRecord) -> dict[str, object]:
    return {"id": r.id, "runbook": r.runbook, "state": r.state, "exit_code": r.exit_code,
            "created_at": r.created_at.isoformat(), "started_at": _iso(r.started_at),
            "finished_at": _iso(r.finished_at), "started_by": r.started_by,
            "trigger": r.trigger, "error": r.error, "params": r.params, "event": r.event}


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


def logs(state_dir: str | None, run_ref: str | None, *, as_json: bool) -> int:
    """A run's steps and their stored output; the newest run when none is named."""
    with _store(state_dir) as store:
        if run_ref is None:
            newest = store.list_runs(limit=1)
            if not newest:
                raise UsageError("no runs yet")
            run_ref = newest[0].id
        run_id = resolve_run_id(store, run_ref)
        run = store.get_run(run_id)
        steps = store.steps_of(run_id)
        approvals = store.approvals_of(run_id)
    assert run is not None
    if as_json:
        output.print_json({"version": 1, "run": _run_json(run), "steps": [
            {"index": s.position, "id": s.step_id, "attempt": s.attempt, "outcome": s.outcome,
             "exit_code": s.exit_code, "started_at": _iso(s.started_at),
             "finished_at": _iso(s.finished_at), "stdout": s.stdout_tail,
             "stderr": s.stderr_tail, "outputs": s.outputs, "hosts": s.hosts}
            for s in steps], "approvals": [
            {"step_id": a.step_id, "question": a.question, "answer": a.answer,
             "answered_by": a.answered_by, "how": a.how, "comment": a.comment,
             "asked_at": _iso(a.asked_at), "answered_at": _iso(a.answered_at)}
            for a in approvals]})
        return 0
    print(output.heading(output.safe(f"run {run.id} of {run.runbook}: {run.state}",
                                     keep_newlines=False))
          + (f" (exit code {run.exit_code})" if run.exit_code is not None else ""))
    print(output.safe(f"started {_when(run.started_at)} by {run.started_by or '?'}, took "
                      f"{_took(run)}, trigger {run.trigger or '-'}", keep_newlines=False))
    if run.error:
        print(f"error: {output.safe(run.error)}")
    for s in steps:
        took = format_duration((s.finished_at - s.started_at).total_seconds()) \
            if s.started_at and s.finished_at else "-"
        attempt = f" (attempt {s.attempt})" if s.attempt > 1 else ""
        code = f", exit code {s.exit_code}" if s.exit_code is not None else ""
        print(f"\n{output.heading(f'[{s.step_id}]')}{attempt} {s.outcome}{code}, {took}")
        for stream, text in (("", s.stdout_tail), ("! ", s.stderr_tail)):
            for line in text.splitlines():
                print(f"  {stream}{output.safe(line, keep_newlines=False)}")
        answer = s.outputs.get("answer") if isinstance(s.outputs, dict) else None
        if isinstance(answer, dict):
            text = describe_answer(bool(answer.get("approved")), answer.get("answered_by"),
                                   answer.get("how"))
            print(f"  {output.safe(text)}"
                  + (f": {output.safe(str(answer['comment']))}" if answer.get("comment") else ""))
    return 0


def resume_run(state_dir: str | None, audit_log: str | None, run_ref: str, *, yes: bool,
               as_json: bool, secrets_file: str | None, inventory: Path | None = None,
               accept_new_hosts: bool = False) -> int:
    """Pick up a waiting or interrupted run at the step where it stopped."""
    from opsrun import identity

    check_inventory_option(inventory)
    secret_values = secrets.load(Path(secrets_file) if secrets_file else None)
    with open_run_context(state_dir, audit_log, secret_values,
                          accept_new_hosts=accept_new_hosts) as rc:
        run_id = resolve_run_id(rc.store, run_ref)
        with driving(rc.state_dir, run_id, rc.store):
            run = rc.store.get_run(run_id)
            assert run is not None
            if run.state == rt.RUNNING:  # and nobody drives it: its driver died
                recovery.interrupt(rc, run)
                run = rc.store.get_run(run_id)
                assert run is not None
            elif run.state == rt.INTERRUPTED:
                recovery.end_orphans(rc, run_id)
            req = resume.request_for(rc.store, run, inventory)
            who = identity.current()
            if yes:
                rb = req.runbook
                check_flag_may_answer([*rb.steps[req.resume_at:], *rb.on_failure,
                                       *rb.on_denied], who, req.starter.user)
            rc.audit.append("run.resumed", run_id=run_id, runbook=run.runbook_ref(),
                            from_state=run.state, at_step=req.resume_at)
            eng = rc.engine([output.reporter(as_json)], confirmer=rc.confirmer(yes=yes, who=who))
            result = run_with_signals(eng, req)
    if as_json:
        output.print_json(result_document(result, req.runbook))
    return result.exit_code


def cancel_run(state_dir: str | None, audit_log: str | None, run_ref: str) -> int:
    """Cancel a run: stop the process driving it, or close a run nobody drives."""
    from opsrun import control_socket, identity

    try:
        reply = control_socket.request(paths.state_dir_from_env(state_dir) / paths.CONTROL_SOCKET,
                                {"op": "cancel", "run_id": run_ref})
    except control_socket.ControlUnavailable:
        reply = None
    if reply is not None and not reply.data.get("not_here"):
        print(reply.message if reply.ok else f"opsrun: {reply.message}",
              file=sys.stdout if reply.ok else sys.stderr)
        return reply.exit_code
    with open_run_context(state_dir, audit_log, {}) as rc:
        run_id = resolve_run_id(rc.store, run_ref)
        run = rc.store.get_run(run_id)
        assert run is not None
        if run.state in rt.FINAL_STATES:
            raise UsageError(f"run {run_id} has already ended ({run.state})")
        pid = driver_pid(rc.state_dir, run_id)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except PermissionError:
                raise UsageError(f"run {run_id} is run by process {pid} of another user; "
                                 "you may not stop it") from None
            except ProcessLookupError:
                pid = None
            else:
                print(f"asked opsrun process {pid} to stop run {run_id}")
                return 0
        with driving(rc.state_dir, run_id, rc.store):
            recovery.end_orphans(rc, run_id)
            if not cancel_undriven(rc, run_id, uid=os.getuid(),
                                   why=f"cancelled by {identity.current().user} with "
                                       "opsrun cancel"):
                raise UsageError(f"run {run_id} could not be cancelled (it just ended?)")
    print(f"run {run_id} cancelled")
    return 0
