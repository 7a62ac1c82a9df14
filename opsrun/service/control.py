"""What other processes may ask the running service, over `<state>/control.sock`.

Identity comes from SO_PEERCRED (see control.py). Reaching the socket at all needs the
state folder's permissions; beyond that, answering follows each step's `approvers:`, and
cancelling needs to be the service's own user or root.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opsrun import control_socket, paths
from opsrun import run_types as rt
from opsrun.approvals import give_answer, pending_rows, resolve_run_id
from opsrun.errors import OpsrunError, UsageError
from opsrun.event import EventRejected, check_object
from opsrun.identity import Identity
from opsrun.runs.context import RunContext
from opsrun.runs.scheduler import Job, Scheduler

MAX_EVENTS = 100_000


@dataclass(frozen=True)
class ControlParts:
    """What the control operations need of the service."""

    rc: RunContext
    scheduler: Scheduler
    status: Callable[[], dict[str, Any]]
    status_line: Callable[[], str]
    wake_queue: threading.Event  # the emit queue's drainer looks again
    wake: threading.Event  # the service's loop looks at its state again
    cancel_parked: Callable[[Job, str], None]  # (the job, who cancelled it)


class ControlHandler:
    """The operations of `<state>/control.sock`, one method each: op_<name>."""

    def __init__(self, parts: ControlParts) -> None:
        self.p = parts

    def start(self) -> control_socket.Server:
        return control_socket.Server(self.p.rc.state_dir / paths.CONTROL_SOCKET, self.handle).start()

    def handle(self, req: dict[str, Any], who: Identity) -> dict[str, Any]:
        op = req.get("op")
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            return {"ok": False, "exit_code": 2, "message": f"unknown request {op!r}"}
        result: dict[str, Any] = handler(req, who)
        return result

    def op_status(self, req: dict[str, Any], who: Identity) -> dict[str, Any]:
        return {"ok": True, "exit_code": 0, "message": self.p.status_line(),
                "status": self.p.status()}

    def op_pending(self, req: dict[str, Any], who: Identity) -> dict[str, Any]:
        return {"ok": True, "exit_code": 0, "message": "", "pending":
                pending_rows(self.p.rc.store)}

    def op_wake(self, req: dict[str, Any], who: Identity) -> dict[str, Any]:
        self.p.wake_queue.set()
        return {"ok": True, "exit_code": 0, "message": "awake"}

    def op_emit(self, req: dict[str, Any], who: Identity) -> dict[str, Any]:
        events = req.get("events")
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            return {"ok": False, "exit_code": 2, "message": "events must be a list of objects"}
        if len(events) > MAX_EVENTS:
            return {"ok": False, "exit_code": 2,
                    "message": f"at most {MAX_EVENTS:,} events per request"}
        for n, event in enumerate(events, 1):
            try:  # what `opsrun emit` checks, for a client that did not
                check_object(event)
            except EventRejected as e:
                return {"ok": False, "exit_code": 2,
                        "message": f"event {n} of the request was rejected: {e}"}
        receipt = req.get("receipt") if isinstance(req.get("receipt"), str) else None
        ids = self.p.rc.store.enqueue_events(events, source={
            "via": "control socket", "user": who.user, "uid": who.uid}, receipt=receipt)
        self.p.wake_queue.set()
        return {"ok": True, "exit_code": 0, "ids": ids,
                "message": f"queued {len(ids)} event{'s' * (len(ids) != 1)}"}

    def op_approve(self, req: dict[str, Any], who: Identity) -> dict[str, Any]:
        return self._answer(req, who, True)

    def op_deny(self, req: dict[str, Any], who: Identity) -> dict[str, Any]:
        return self._answer(req, who, False)

    def _answer(self, req: dict[str, Any], who: Identity, approve: bool) -> dict[str, Any]:
        comment = req.get("comment") if isinstance(req.get("comment"), str) else None
        step = req.get("step_id") if isinstance(req.get("step_id"), str) else None
        q = give_answer(self.p.rc.store, self.p.rc.audit, str(req.get("run_id", "")),
                        approve=approve, who=who, comment=comment, step_id=step)
        self.p.wake.set()
        verdict = "approved" if approve else "denied"
        return {"ok": True, "exit_code": 0,
                "message": f"run {q.run_id}: step {q.step_id!r} {verdict} by {who.user}"}

    def op_cancel(self, req: dict[str, Any], who: Identity) -> dict[str, Any]:
        if who.uid not in (0, os.getuid()):
            raise OpsrunError(f"only {_me()} (the service's user) and root may cancel runs; "
                              f"you are {who.user}")
        try:
            run_id = resolve_run_id(self.p.rc.store, str(req.get("run_id", "")))
        except UsageError as e:
            return {"ok": False, "exit_code": 2, "message": str(e)}
        before = {j.run_id: j.state for j in self.p.scheduler.parked()}
        job = self.p.scheduler.cancel(run_id, rt.CANCELLED, f"cancelled by {who.user}")
        if job is None:
            return {"ok": False, "exit_code": 4, "not_here": True,
                    "message": f"run {run_id} is not run by this service"}
        if before.get(run_id) == "parked":
            self.p.cancel_parked(job, who.user)
            return {"ok": True, "exit_code": 0, "message": f"run {run_id} cancelled"}
        return {"ok": True, "exit_code": 0, "message": f"run {run_id} is being stopped"}


def _me() -> str:
    from opsrun.identity import user_name

    return user_name(os.getuid())
