"""Engine listeners that keep the record: the audit log and the state store.

The audit listener comes first among an engine's listeners: its append is fsynced before
the engine goes on, and if it cannot write, it raises, so the step it announces never starts.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from opsrun import run_types as rt
from opsrun.audit.format import RunbookRef
from opsrun.audit.log import AuditLog
from opsrun.runbook import Runbook
from opsrun.store import Store

# Transitions that are progress bookkeeping for the store, not facts for the audit log.
_NOT_AUDITED = frozenset({"run.progress"})
_OBJECTS = ("runbook", "step", "run_id")


def runbook_ref(rb: Runbook) -> RunbookRef:
    return RunbookRef(rb.name, str(rb.path), rb.sha256)


class AuditListener:
    """Writes every transition to the audit log, durably, before the engine continues."""

    is_audit = True

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    def transition(self, kind: str, data: dict[str, Any]) -> None:
        if kind in _NOT_AUDITED:
            return
        fields = {k: v for k, v in data.items() if k not in _OBJECTS and v is not None}
        rb = data.get("runbook")
        self.audit.append(kind, run_id=data.get("run_id"),
                          runbook=runbook_ref(rb) if isinstance(rb, Runbook) else None, **fields)

    def output(self, step_id: str, stream: str, text: str, host: str | None) -> None:
        """Output is audited whole (its bounded tail) in step.finished, not chunk by chunk."""


class StoreListener:
    """Keeps runs and step results in the state store for `opsrun runs`, `logs`, `resume`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._started: dict[tuple[str, int, int, int], datetime] = {}
        self._versions: set[str] = set()  # runbook versions already kept
        self._retrying: set[str] = set()  # runs with a retry due

    def transition(self, kind: str, data: dict[str, Any]) -> None:
        run_id = data["run_id"]
        now = datetime.now(timezone.utc)
        if kind == "run.started":
            rb: Runbook = data["runbook"]
            if rb.source and rb.sha256 not in self._versions:
                self.store.save_runbook_version(rb.sha256, str(rb.path), rb.source)
                self._versions.add(rb.sha256)
            if self.store.get_run(run_id) is None:
                self.store.create_run(rb.name, runbook_path=str(rb.path),
                                      runbook_sha256=rb.sha256, event=data["event"],
                                      params=data["params"],
                                      started_by=data["started_by"]["user"],
                                      started_uid=data["started_by"]["uid"],
                                      trigger=data.get("trigger"), state=rt.RUNNING,
                                      run_id=run_id)
            self.store.update_run(run_id, state=rt.RUNNING, started_at=now, error=None)
        elif kind == "run.progress":
            self.store.update_run(run_id, current_step=data["current_step"])
        elif kind == "step.started":
            if run_id in self._retrying:
                self._retrying.discard(run_id)
                self.store.update_run(run_id, retry_attempt=None, retry_at=None)
            sub = data.get("sub") or 0
            self._started[(run_id, data["index"], sub, data["attempt"])] = now
            self.store.record_step(run_id, data["index"], data["step_id"], outcome="running",
                                   attempt=data["attempt"], started_at=now, sub=sub)
        elif kind == "step.finished":
            sub = data.get("sub") or 0
            started = self._started.pop((run_id, data["index"], sub, data["attempt"]), now)
            self.store.record_step(run_id, data["index"], data["step_id"], sub=sub,
                                   outcome=data["outcome"], attempt=data["attempt"],
                                   started_at=started, finished_at=now,
                                   exit_code=data.get("exit_code"), stdout_tail=data["stdout"],
                                   stderr_tail=data["stderr"], outputs=data["outputs"],
                                   hosts=data.get("hosts") or {})
        elif kind == "step.retrying":
            self._retrying.add(run_id)
            self.store.update_run(run_id, retry_attempt=data["attempt"], retry_at=data["at"])
        elif kind == "step.skipped":
            self.store.record_step(run_id, data["index"], data["step_id"], outcome=rt.SKIPPED,
                                   started_at=now, finished_at=now, sub=data.get("sub") or 0)
        elif kind in ("confirm.answered", "confirm.resumed"):
            outcome = rt.SUCCESS if data["approved"] else rt.STEP_DENIED
            self.store.record_step(run_id, data["index"], data["step_id"], outcome=outcome,
                                   finished_at=now, outputs={"answer": {
                                       k: data.get(k) for k in ("approved", "answered_by",
                                                                "answered_uid", "how",
                                                                "comment")}})
        elif kind == "confirm.closed":
            self.store.record_step(run_id, data["index"], data["step_id"],
                                   outcome=rt.STEP_CANCELLED, finished_at=now)
        elif kind == "run.finished":
            self.store.update_run(run_id, state=data["state"], finished_at=now,
                                  exit_code=data["exit_code"], error=data.get("error"))

    def output(self, step_id: str, stream: str, text: str, host: str | None) -> None:
        """Output reaches the store as the bounded tail in step.finished."""
