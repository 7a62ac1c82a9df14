"""The engine listener that puts notifications in the outbox; it never delivers them itself.

When a run starts to wait for an answer given elsewhere (`confirm.asked`, then the
waiting confirmer's word that the question is recorded) it queues a `waiting`
notification for each target that wants one, and a `stale` one due when the wait is
`stale_after` old (dropped if the question is answered first: so a wait is notified stale
at most once); a question answered at once, at the prompt or by `--yes`, notifies nobody.
On `run.finished` in state `failed` or `timed_out` it queues one with the failed step, its
exit code and the tail of its output.
Queueing is one short write to the state store. Whatever goes wrong here is logged and
swallowed: a notification never fails, or holds up, the run it reports on.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opsrun import run_types as rt
from opsrun.approvals import describe_approvers
from opsrun.notify import message
from opsrun.notify.targets import Target
from opsrun.runbook import Runbook
from opsrun.secrets import Masker
from opsrun.store import Store

Queued = Callable[[list[int]], None]  # ids just queued (due now or later)


class NotifyListener:
    """Queues notifications for a runbook's `notify:` targets and the service's."""

    def __init__(self, store: Store, masker: Masker, *,
                 service_targets: Callable[[], Sequence[Target]] = lambda: (),
                 on_queued: Queued = lambda ids: None,
                 log: Callable[..., None] = lambda *a, **k: None) -> None:
        self.store = store
        self.masker = masker
        self.service_targets = service_targets
        self.on_queued = on_queued
        self.log = log
        self._failed: dict[str, dict[str, Mapping[str, Any]]] = {}  # run → step → result
        self._asked_now: dict[tuple[str, str], dict[str, Any]] = {}  # not yet waiting

    def transition(self, kind: str, data: dict[str, Any]) -> None:
        try:
            self._transition(kind, data)
        except Exception as e:  # noqa: BLE001 - see the module's docstring
            self.log("cannot queue a notification", level="error",
                     run_id=data.get("run_id"), error=str(e))

    def output(self, step_id: str, stream: str, text: str, host: str | None) -> None:
        """Output reaches a notification as the tail in step.finished."""

    def _targets(self, rb: Any, event: str) -> list[Target]:
        own = rb.notify if isinstance(rb, Runbook) else ()
        return [t for t in (*own, *self.service_targets()) if event in t.events]

    def _transition(self, kind: str, data: dict[str, Any]) -> None:
        run_id = data.get("run_id")
        if not isinstance(run_id, str):
            return
        if kind == "step.finished" and data.get("outcome") in (rt.FAILURE, rt.STEP_TIMED_OUT):
            self._failed.setdefault(run_id, {})[str(data.get("step_id"))] = {
                k: data.get(k) for k in ("exit_code", "stdout", "stderr", "error")}
        elif kind == "confirm.asked":
            # Queued once the confirmer says the run waits (waits()); answered at once
            # (a prompt, --yes), the question needs nobody told.
            self._asked_now[(run_id, _step_id(data))] = data
        elif kind in ("confirm.answered", "confirm.closed"):
            self._asked_now.pop((run_id, _step_id(data)), None)
        elif kind == "run.finished":
            for key in [k for k in self._asked_now if k[0] == run_id]:
                del self._asked_now[key]
            failures = self._failed.pop(run_id, {})
            state = data.get("state")
            if state in (rt.FAILED, rt.TIMED_OUT):
                self._ended(run_id, data, str(state), failures)

    def waits(self, run_id: str, step_id: str) -> None:
        """The question this engine just asked is recorded and waits for an answer."""
        data = self._asked_now.pop((run_id, step_id), None)
        if data is None:
            return  # asked before (a resumed run), or by another engine
        try:
            self._asked(run_id, data)
        except Exception as e:  # noqa: BLE001 - see the module's docstring
            self.log("cannot queue a notification", level="error", run_id=run_id,
                     error=str(e))

    def _asked(self, run_id: str, data: dict[str, Any]) -> None:
        rb = data.get("runbook")
        waiting, stale = self._targets(rb, "waiting"), self._targets(rb, "stale")
        if not waiting and not stale:
            return
        wait_step = _step_id(data)
        approvers = describe_approvers(data.get("approvers") or {})
        args = (run_id, getattr(rb, "name", "?"), str(data.get("step_id")),
                str(data.get("question", "")), list(data.get("guarded") or []), approvers,
                data.get("timeout_s"), str(data.get("on_timeout") or "deny"))
        now = time.time()
        rows = [self._row(run_id, "waiting", t, message.waiting(*args), now, wait_step)
                for t in waiting]
        rows += [self._row(run_id, "stale", t,
                           message.waiting(*args, stale_after_s=t.stale_after_s),
                           now + t.stale_after_s, wait_step) for t in stale]
        self._queue(rows)

    def _ended(self, run_id: str, data: dict[str, Any], state: str,
               failures: Mapping[str, Mapping[str, Any]]) -> None:
        rb = data.get("runbook")
        targets = self._targets(rb, state)
        if not targets:
            return
        step = data.get("failed_step")
        failed = failures.get(str(step), {})
        error = data.get("error")
        if state == rt.TIMED_OUT and not error:
            error = f"nobody answered step {step!r} in time"
        msg = message.ended(state, run_id, getattr(rb, "name", "?"), step,
                            failed.get("exit_code"), error, str(failed.get("stdout") or ""),
                            str(failed.get("stderr") or ""))
        now = time.time()
        self._queue([self._row(run_id, state, t, msg, now, None) for t in targets])

    def _row(self, run_id: str, event: str, target: Target, msg: dict[str, Any],
             due_at: float, wait_step: str | None) -> dict[str, Any]:
        return {"run_id": run_id, "event": event, "target": target.as_record(),
                "message": _masked(msg, self.masker), "due_at": due_at,
                "wait_step": wait_step}

    def _queue(self, rows: list[dict[str, Any]]) -> None:
        ids = self.store.queue_notifications(rows)
        self.on_queued(ids)


def _step_id(data: Mapping[str, Any]) -> str:
    """The id its confirmer records a question under (a nested step's own, unprefixed)."""
    return str(getattr(data.get("step"), "id", None) or data.get("step_id"))


def _masked(value: Any, masker: Masker) -> Any:
    if isinstance(value, str):
        return masker(value)
    if isinstance(value, Mapping):
        return {k: _masked(v, masker) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, masker) for v in value]
    return value
