"""Questions that wait for a person: who may answer, answering, and waiting for the answer.

Exactly one answer wins (the store updates only an unanswered question). The answerer's
identity comes from the operating system: the uid of the process that answers, or of the
peer on the daemon's socket — never from an argument.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

from opsrun import run_types as rt
from opsrun.audit.format import RunbookRef
from opsrun.audit.log import AuditLog
from opsrun.describe import describe_answer
from opsrun.errors import OpsrunError, UsageError
from opsrun.identity import Identity
from opsrun.runbook import Approvers, Step
from opsrun.store import ApprovalRecord, Store

POLL_S = 0.2


class AnswerRefused(OpsrunError):
    """The answer was not accepted: not an approver, already answered, or nothing waits."""


def check_flag_may_answer(steps: Iterable[Step], who: Identity, starter: str) -> None:
    """`--yes` answers only where whoever gave it may answer; otherwise nothing runs.

    Raises UsageError naming the first confirm step the flag cannot answer and who can.
    """
    for step in steps:
        if step.kind != "confirm":
            continue
        rec = step.approvers.as_record()
        why = refusal(rec, who, starter)
        if why:
            raise UsageError(f"--yes cannot answer step {step.id!r}: {why}; who may answer: "
                             f"{describe_approvers(rec)}. Nothing was run: run it without "
                             "--yes, and one of them answers with `opsrun approve`")


def describe_approvers(rec: dict[str, Any] | list[Any]) -> str:
    """`alice, group:ops (not the starter)` or `anyone`."""
    if isinstance(rec, list):  # an old-style row: plain names
        return ", ".join(rec) or "anyone"
    names = list(rec.get("users", [])) + [f"group:{g}" for g in rec.get("groups", [])]
    text = ", ".join(names) or "anyone"
    return text + (" (not the user who started the run)" if rec.get("not_starter") else "")


def refusal(rec: dict[str, Any] | list[Any], who: Identity, starter: str | None) -> str | None:
    """Why `who` may not answer, or None if they may."""
    if isinstance(rec, list):
        rec = {"users": rec, "groups": [], "not_starter": False}
    if rec.get("not_starter") and starter is not None and who.user == starter:
        return (f"{who.user} started this run, and this step needs someone else to answer "
                "(not_starter)")
    users, groups = set(rec.get("users", [])), set(rec.get("groups", []))
    if not users and not groups:
        return None
    if who.user in users or groups & set(who.groups):
        return None
    return f"only {describe_approvers(rec)} may answer; {who.user} is not among them"


def resolve_run_id(store: Store, ref: str) -> str:
    """A full run id from the id or an unambiguous prefix of it."""
    if store.get_run(ref) is not None:
        return ref
    found = store.find_run_ids(ref) if len(ref) >= 4 else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise UsageError(f"no run {ref!r} in the state folder {store.path.parent}; "
                         "`opsrun runs` lists recent runs, `opsrun pending` those waiting for "
                         "an answer (and --state-dir picks another folder)")
    raise UsageError(f"{ref!r} matches several runs ({', '.join(found)}); give more of the id")


def give_answer(store: Store, audit: AuditLog, run_ref: str, *, approve: bool, who: Identity,
                comment: str | None, how: str = "command",
                step_id: str | None = None) -> ApprovalRecord:
    """Answer the question a run waits on (or only its step `step_id`), as `who`.

    Raises AnswerRefused when the answer is not accepted.
    """
    run_id = resolve_run_id(store, run_ref)
    pending = [q for q in store.pending_approvals(run_id)
               if step_id is None or q.step_id == step_id]
    if not pending:
        raise AnswerRefused(_nothing_waits(store, run_id, step_id))
    q = pending[0]
    reason = refusal(q.approvers, who, q.starter)
    run = store.get_run(run_id)
    runbook = run.runbook_ref() if run else None
    if reason:
        audit.append("confirm.refused", run_id=run_id, runbook=runbook, step_id=q.step_id,
                     answerer=who.as_record(), approved=approve, reason=reason)
        raise AnswerRefused(f"answer refused: {reason}; the run keeps waiting")
    answer = "approved" if approve else "denied"
    if not store.answer_approval(run_id, answer, answered_by=who.user, answered_uid=who.uid,
                                 how=how, step_id=q.step_id, comment=comment):
        raise AnswerRefused(_nothing_waits(store, run_id, step_id))
    try:
        audit.append("confirm.answered", run_id=run_id, runbook=runbook, step_id=q.step_id,
                     approved=approve, answered_by=who.user, answered_uid=who.uid, how=how,
                     comment=comment,
                     question=q.question, **({"sudo_user": who.sudo_user} if who.sudo_user
                                             else {}))
    except OpsrunError:
        store.unanswer_approval(q.id)  # an answer that is not on record does not count
        raise
    latest = store.latest_approval(run_id, q.step_id)
    assert latest is not None
    return latest


def _nothing_waits(store: Store, run_id: str, step_id: str | None = None) -> str:
    run = store.get_run(run_id)
    answered = [a for a in store.approvals_of(run_id) if a.answer is not None
                and (step_id is None or a.step_id == step_id)]
    if answered:
        a = answered[-1]
        when = a.answered_at.strftime("%Y-%m-%d %H:%M:%S UTC") if a.answered_at else "?"
        if a.how == "cancel":
            return (f"run {run_id} was cancelled at {when} while step {a.step_id!r} waited "
                    "for an answer: its question is closed, and answers are no longer taken")
        return (f"run {run_id} was already answered: step {a.step_id!r} "
                f"{describe_answer(a.answer == 'approved', a.answered_by, a.how)} at {when}")
    waiting = store.pending_approvals(run_id)
    if step_id is not None and waiting:
        other = waiting[0].step_id
        return (f"run {run_id} waits for an answer to step {other!r}, not {step_id!r}; "
                f"`opsrun pending` shows its question, then answer with --step {other}")
    state = rt.state_phrase(run.state) if run else "is unknown"
    return f"run {run_id} is not waiting for an answer: it {state}"


def pending_rows(store: Store) -> list[dict[str, object]]:
    """The questions waiting for an answer, as plain data."""
    now = datetime.now(timezone.utc)
    rows: list[dict[str, object]] = []
    for q in store.pending_approvals():
        run = store.get_run(q.run_id)
        rows.append({
            "run_id": q.run_id, "runbook": run.runbook if run else "?", "step_id": q.step_id,
            "question": q.question, "approvers": q.approvers, "started_by": q.starter,
            "asked_at": q.asked_at.isoformat(),
            "deadline": q.deadline.isoformat() if q.deadline else None,
            "seconds_left": None if q.deadline is None else
            round((q.deadline - now).total_seconds(), 1)})
    return rows


class Waiter:
    """Waits for the answer to a question, until its deadline; the deadline answers itself."""

    def __init__(self, store: Store, audit: AuditLog,
                 notify: Callable[[str], None] = lambda text: None,
                 poll_s: float = POLL_S) -> None:
        self.store = store
        self.audit = audit
        self.notify = notify
        self.poll_s = poll_s

    def ask(self, run_id: str, step_id: str, question: str, approvers: Approvers,
            starter: str, timeout_s: float | None) -> ApprovalRecord:
        """The question for this step: the one already asked (a resumed run), or a new one."""
        latest = self.store.latest_approval(run_id, step_id)
        if latest is not None:
            return latest
        deadline = None if timeout_s is None else \
            datetime.now(timezone.utc) + timedelta(seconds=timeout_s)
        return self.store.create_approval(run_id, step_id, question,
                                          approvers=approvers.as_record(),
                                          starter=starter, deadline=deadline)

    def wait(self, q: ApprovalRecord, on_timeout: str, cancel: threading.Event,
             runbook: RunbookRef | None) -> ApprovalRecord | None:
        """Block until answered or the deadline; None if cancelled first."""
        last_note = 0.0
        while True:
            current = self.store.latest_approval(q.run_id, q.step_id)
            if current is not None and current.answer is not None:
                return current
            now = datetime.now(timezone.utc)
            if q.deadline is not None and now >= q.deadline:
                self.expire(q, on_timeout, runbook)
                continue
            if time.monotonic() - last_note >= 60 and q.deadline is not None:
                self.notify(f"waiting for an answer; {_left(q.deadline - now)} left")
                last_note = time.monotonic()
            if cancel.wait(self.poll_s):
                return None

    def expire(self, q: ApprovalRecord, on_timeout: str, runbook: RunbookRef | None) -> None:
        """Answer a question whose deadline passed with its on_timeout answer."""
        answer = "approved" if on_timeout == "approve" else "denied"
        if self.store.answer_approval(q.run_id, answer, answered_by="(timeout)",
                                      answered_uid=None, how="timeout", step_id=q.step_id):
            self.audit.append("confirm.answered", run_id=q.run_id, runbook=runbook,
                              step_id=q.step_id, approved=answer == "approved",
                              answered_by="(timeout)", how="timeout", question=q.question)


def _left(delta: timedelta) -> str:
    from opsrun.durations import format_duration

    return format_duration(max(0.0, delta.total_seconds()))
