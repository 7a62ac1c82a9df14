"""Everything a run needs around the engine: state folder, store, audit log, executors, confirmer.

`opsrun run`, `resume`, `dispatch` and `watch` all build their engine here, so every run is
recorded the same way whichever command started it.
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opsrun import paths
from opsrun import run_types as rt
from opsrun.audit.format import RunbookRef
from opsrun.audit.log import AuditLog, segment_size_from_env
from opsrun.engine import Engine
from opsrun.executors.local import LocalExecutor
from opsrun.identity import Identity
from opsrun.runs.driver_lock import runs_dir
from opsrun.runs.recording import AuditListener, StoreListener
from opsrun.secrets import Masker
from opsrun.store import Store

if TYPE_CHECKING:
    from opsrun.executors.confirm import WaitingConfirmer
    from opsrun.notify.listener import NotifyListener
    from opsrun.notify.outbox import Outbox
    from opsrun.notify.targets import Target

NOTIFY_EXIT_BUDGET_S = 10.0  # how long a command that ends tries to deliver notifications


class RunContext:
    """The state folder, store, audit log and secrets of one command, and what it builds."""

    def __init__(self, state_dir: Path, store: Store, audit: AuditLog, secrets: dict[str, str],
                 accept_new_hosts: bool = False) -> None:
        self.state_dir = state_dir
        self.store = store
        self.audit = audit
        self.secrets = secrets
        self.accept_new_hosts = accept_new_hosts  # learn unknown SSH host keys
        # Notifications: the service gives its outbox worker and its notify file's targets;
        # other commands deliver what their runs queue themselves (finish_notifications).
        self.outbox: Outbox | None = None
        self.service_targets: Sequence[Target] = ()
        self.log: Callable[..., None] = _say_problems
        self._queued_here: list[int] = []
        self._notify_listeners: list[NotifyListener] = []
        self._own_outbox: Outbox | None = None

    def executors(self) -> dict[str, Any]:
        return {"run": LocalExecutor(extra_env=self.step_env(), on_start=self._step_started),
                "ssh": _LazySsh(self._ssh_executor)}

    def _step_started(self, run_id: str, pid: int) -> None:
        from opsrun.runs import step_processes

        step_processes.record(runs_dir(self.state_dir), run_id, pid)

    def step_env(self) -> dict[str, str]:
        """What local steps are told of this opsrun, so that an `opsrun emit`, `approve` or
        `audit` inside a step reaches the same state folder, service and audit log."""
        return {"OPSRUN_STATE_DIR": str(self.state_dir),
                "OPSRUN_AUDIT_LOG": str(self.audit.path)}

    def _ssh_executor(self) -> Any:
        from opsrun.executors.ssh import SshExecutor, SshOptions

        options = SshOptions(self.state_dir, accept_new_hosts=self.accept_new_hosts,
                             grace_s=LocalExecutor().grace_s)
        return SshExecutor(options, on_learned=self._audit_learned_key)

    def _audit_learned_key(self, run_id: str, learned: dict[str, Any]) -> None:
        self.audit.append("host_key.learned", run_id=run_id,
                          runbook=self.runbook_ref(run_id), **learned)

    def engine(self, listeners: Sequence[rt.Listener], *,
               confirmer: rt.Confirmer | None) -> Engine:
        """An engine whose first listeners are the audit log and the store."""
        from opsrun.notify.listener import NotifyListener

        notify = NotifyListener(self.store, Masker(self.secrets),
                                service_targets=lambda: self.service_targets,
                                on_queued=self._notifications_queued, log=self.log)
        self._notify_listeners.append(notify)
        return Engine(self.executors(),
                      [AuditListener(self.audit), StoreListener(self.store), *listeners,
                       notify],
                      secrets=self.secrets, confirmer=confirmer, emitter=self.queue_event)

    def _run_waits(self, run_id: str, step_id: str) -> None:
        """A question is recorded and waits for an answer given elsewhere: notify it (a
        question answered at once, at the prompt or by --yes, is not)."""
        for listener in self._notify_listeners:
            listener.waits(run_id, step_id)

    def _notifications_queued(self, ids: list[int]) -> None:
        if self.outbox is not None:
            self.outbox.wake()
            return
        from opsrun.notify.outbox import Outbox

        self._queued_here += ids
        if self._own_outbox is None:
            self._own_outbox = Outbox(self.store, self.audit, self.secrets,
                                      log=self.log).start()
        self._own_outbox.wake()

    def finish_notifications(self, budget_s: float = NOTIFY_EXIT_BUDGET_S) -> list[int]:
        """Before a command ends: deliver what its runs queued, for up to `budget_s`; the
        ids left pending (for `opsrun watch` on this state folder to deliver)."""
        if self._own_outbox is None:
            return []
        left = self._own_outbox.drain(self._queued_here, budget_s)
        self._own_outbox = None
        if left:
            print(f"opsrun: {len(left)} notification{'s' * (len(left) != 1)} not delivered "
                  "yet; they stay in the outbox of the state folder, and `opsrun watch` on it "
                  "delivers them", file=sys.stderr, flush=True)
        return left

    def queue_event(self, data: dict[str, Any], via: dict[str, Any]) -> None:
        """An `emit:` step's event onto the durable queue that `opsrun watch` drains."""
        self.store.enqueue_events([data], source=via)

    def waiting_confirmer(self, *, park: bool = False,
                          notify: Callable[[str], None] | None = None) -> WaitingConfirmer:
        """A confirmer that records the question and waits (or parks) for an answer."""
        from opsrun.approvals import Waiter
        from opsrun.executors.confirm import WaitingConfirmer

        waiter = Waiter(self.store, self.audit,
                        notify or (lambda text: print(text, file=sys.stderr, flush=True)))
        return WaitingConfirmer(waiter, park=park, runbook_ref=self.runbook_ref,
                                socket_dir=None if park else runs_dir(self.state_dir),
                                on_waiting=self._run_waits)

    def confirmer(self, *, yes: bool, who: Identity) -> rt.Confirmer:
        """--yes answers; a terminal is asked; anything else waits for `opsrun approve`.

        `who` is the person at this terminal (identity.current()), who answers at the
        prompt or gave --yes: for a resumed run not necessarily the one who started it.
        """
        from opsrun.executors.confirm import FlagConfirmer, PromptConfirmer

        waiting = self.waiting_confirmer()
        if yes:
            return FlagConfirmer(who, waiting, on_refused=self._audit_refusal(who, "flag"))
        if sys.stdin.isatty():
            return PromptConfirmer(who, waiting, on_refused=self._audit_refusal(who, "prompt"))
        return waiting

    def runbook_ref(self, run_id: str) -> RunbookRef | None:
        """The runbook version a recorded run started with, for its audit records."""
        run = self.store.get_run(run_id)
        return None if run is None else run.runbook_ref()

    def _audit_refusal(self, who: Identity, how: str) -> Any:
        def record(request: rt.ConfirmRequest, why: str) -> None:
            self.audit.append("confirm.refused", run_id=request.run_id,
                              runbook=self.runbook_ref(request.run_id),
                              step_id=request.step_id, answerer=who.as_record(), reason=why,
                              how=how)
        return record


def _say_problems(message: str, level: str = "info", **fields: Any) -> None:
    """A command's notification problems on stderr (the service has its own log)."""
    if level in ("error", "warning"):
        details = ", ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        print(f"opsrun: {message}" + (f" ({details})" if details else ""), file=sys.stderr,
              flush=True)


class _LazySsh:
    """The SSH executor, made (and paramiko imported) only when a step needs it."""

    def __init__(self, make: Any) -> None:
        self._make = make
        self._made: Any = None
        self._lock = threading.Lock()

    def execute(self, request: Any, on_output: Any, cancel: Any) -> Any:
        with self._lock:
            if self._made is None:
                self._made = self._make()
        return self._made.execute(request, on_output, cancel)

    def end_run(self, run_id: str) -> None:
        if self._made is not None:
            self._made.end_run(run_id)


@contextmanager
def open_run_context(state_dir: str | None, audit_log: str | None,
                     secret_values: Mapping[str, str], *,
                     durable_store: bool = True,
                     accept_new_hosts: bool = False) -> Iterator[RunContext]:
    """Open the state folder's store and audit log for the length of a command."""
    folder = paths.ensure_state_dir(paths.state_dir_from_env(state_dir))
    store = Store.open(folder, durable=durable_store)
    audit_path = Path(audit_log) if audit_log else folder / paths.AUDIT_LOG
    audit = AuditLog(audit_path, store=store, masker=Masker(dict(secret_values)),
                     max_segment_bytes=segment_size_from_env())
    rc = RunContext(folder, store, audit, dict(secret_values), accept_new_hosts)
    interrupted = False
    try:
        yield rc
    except KeyboardInterrupt:
        interrupted = True  # the person wants out: what is queued stays for the service
        raise
    finally:
        try:
            rc.finish_notifications(0.0 if interrupted else NOTIFY_EXIT_BUDGET_S)
        finally:
            audit.close()
        store.close()
