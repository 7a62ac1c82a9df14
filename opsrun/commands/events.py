"""opsrun emit / dispatch: JSON events into the service's queue, or run right here.

    opsrun emit '{"type": "alert", "severity": "critical"}'
    tail -F app.log | jq -c … | opsrun dispatch

A line that is not an acceptable event is reported with its line number and reason on
stderr and recorded as `event.rejected`; the lines after it are still taken.
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opsrun import identity, output, paths, secrets
from opsrun.audit.log import AuditLog
from opsrun.errors import UsageError
from opsrun.event import Event, EventRejected, parse_json_event
from opsrun.matcher import Matcher
from opsrun.runbook import Runbook, load_runbooks
from opsrun.runs.scheduler import Job, Scheduler
from opsrun.sources.stdin_json import Rejection, read_events

if TYPE_CHECKING:
    from opsrun.store import Store

BATCH = 10_000
BATCH_BYTES = 2 * 1024 * 1024  # per request to the service (its limit is 4 MiB)
BATCH_WAIT_S = 1.0  # a batch begun this long ago goes with the next event that comes


def emit(arg: str | None, *, state_dir: str | None, audit_log: str | None) -> int:
    """Put events on the durable queue for `opsrun watch`; works while it is down.

    Events are sent in batches as they are read, so a flood on stdin takes no more memory
    than a batch. What the service does not take (none runs, or it stops in the middle)
    goes straight into the queue it drains, each event exactly once.
    """
    with _Emitter(state_dir, audit_log) as out:
        batch: list[dict[str, Any]] = []
        size, began = 0, 0.0
        for item in _events_from_arg(arg):
            if isinstance(item, Rejection):
                print(f"opsrun: {_where(arg)}{item}", file=sys.stderr)
                out.reject(item)
                continue
            n = len(item.to_json()) + 2
            if batch and (len(batch) >= BATCH or size + n > BATCH_BYTES
                          or time.monotonic() - began > BATCH_WAIT_S):
                out.send(batch)
                batch, size = [], 0
            if not batch:
                began = time.monotonic()
            batch.append(dict(item.data))
            size += n
        if batch:
            out.send(batch)
    if out.taken or out.later:
        print(out.message())
    return 2 if out.rejected else 0


class _Emitter:
    """Hands batches to the running service until it is gone (or found not to run), then
    queues them straight in the state store; each event exactly once."""

    def __init__(self, state_dir: str | None, audit_log: str | None) -> None:
        self.state_dir = state_dir
        self.audit_log = audit_log
        self.sock = paths.state_dir_from_env(state_dir) / paths.CONTROL_SOCKET
        self.service = True  # worth asking: not found gone yet
        self.lost = False  # it went away in the middle
        self.taken = self.later = self.rejected = 0
        self._stack = ExitStack()
        self._rc: Any = None

    def __enter__(self) -> _Emitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def send(self, batch: list[dict[str, Any]]) -> None:
        if self.service and self._to_service(batch):
            self.taken += len(batch)
            return
        self._context().store.enqueue_events(batch, source={
            "via": "opsrun emit", "user": identity.current().user})
        self.later += len(batch)

    def _to_service(self, batch: list[dict[str, Any]]) -> bool:
        """Whether the service queued the batch (asking it, or its receipt when it went
        away before it answered)."""
        from opsrun import control_socket
        from opsrun.ids import new_id

        receipt = new_id()
        try:
            reply = control_socket.request(self.sock, {"op": "emit", "events": batch,
                                                "receipt": receipt}, timeout_s=120)
        except control_socket.ControlLost:
            self.service, self.lost = False, True
            return bool(self._context().store.has_receipt(receipt))
        except control_socket.ControlUnavailable:
            self.service, self.lost = False, self.taken > 0
            return False
        if not reply.ok:
            raise UsageError(reply.message)
        return True

    def reject(self, r: Rejection) -> None:
        self.rejected += 1
        _audit_rejection(self._context().audit, r, "emit")

    def _context(self) -> Any:
        if self._rc is None:
            from opsrun.runs.context import open_run_context

            self._rc = self._stack.enter_context(open_run_context(self.state_dir,
                                                                  self.audit_log, {}))
        return self._rc

    def message(self) -> str:
        total = self.taken + self.later
        if not self.later:
            return f"queued {total} event{'s' * (total != 1)} for the running service"
        if not self.taken and not self.lost:
            return (f"queued {total} event{'s' * (total != 1)} for later: no service is "
                    "running; it takes queued events when it starts")
        return (f"queued {total} events: {self.taken} for the running service, "
                f"{self.later} for later: the service stopped while taking them; it takes "
                "queued events when it starts")


def _where(arg: str | None) -> str:
    return "stdin " if arg in (None, "-") else ""


def _events_from_arg(arg: str | None) -> Iterator[Event | Rejection]:
    if arg is None and sys.stdin.isatty():
        raise UsageError("give an event as JSON, or - to read JSON lines from stdin")
    if arg is None or arg == "-":
        yield from read_events(sys.stdin.buffer)
        return
    try:
        yield parse_json_event(arg.encode("utf-8", "surrogateescape"))
    except EventRejected as e:
        raise UsageError(f"the event was rejected: {e}") from None


def _audit_rejection(audit: AuditLog, r: Rejection, source: str) -> None:
    audit.append("event.rejected", source=source, lineno=r.lineno, reason=r.reason,
                 excerpt=r.excerpt)


# ── dispatch ───────────────────────────────────────────────────────────────

def dispatch(folder: Path, *, dry_run: bool, parallel: int, state_dir: str | None,
             audit_log: str | None, secrets_file: str | None, as_json: bool,
             inventory: Path | None = None, accept_new_hosts: bool = False,
             explain: bool = False) -> int:
    """Read JSON lines on stdin and run each event's runbooks in this process."""
    from opsrun.inventory import check_option as check_inventory_option

    if sys.stdin.isatty():
        raise UsageError("dispatch reads JSON lines on stdin; pipe events into it")
    check_inventory_option(inventory)
    runbooks, problems = load_runbooks([folder], inventory=inventory)
    for p in problems:
        print(f"opsrun: {p}", file=sys.stderr)
    if problems:
        raise UsageError(f"{len({p.file for p in problems})} runbook(s) in {folder} do not "
                         f"validate; fix them first (`opsrun validate {folder}`)")
    matcher = Matcher(runbooks)
    if explain:
        return _explain(runbooks, read_events(sys.stdin.buffer), as_json=as_json,
                        state_dir=state_dir)
    if dry_run:
        return _dry_run(matcher, read_events(sys.stdin.buffer), as_json=as_json)
    return _run_all(matcher, parallel, state_dir, audit_log, secrets_file, as_json,
                    accept_new_hosts)


def _dry_run(matcher: Matcher, items: Iterable[Event | Rejection], *, as_json: bool) -> int:
    rejected = False
    lineno = 0
    for item in items:
        if isinstance(item, Rejection):
            rejected = True
            print(f"opsrun: stdin {item}", file=sys.stderr)
            lineno = item.lineno
            continue
        lineno += 1
        names = [m.runbook.name for m in matcher.match(item)]
        if as_json:
            sys.stdout.write(output.json_line({"event_id": item.id, "runbooks": names}) + "\n")
        else:
            # The id is the sender's own: shown escaped, like everything from an event.
            print(output.safe(f"event {item.id}: ", keep_newlines=False)
                  + (output.safe(", ".join(names)) if names else "no runbook matches"))
    return 2 if rejected else 0


def _explain(runbooks: list[Runbook], items: Iterable[Event | Rejection], *,
             as_json: bool, state_dir: str | None = None) -> int:
    """For each event, each runbook with a trigger for it: does it start, and why not
    (throttle windows open in the state folder included)."""
    from opsrun.commands.explain import state_store

    with state_store(state_dir) as store:
        return _explain_each(runbooks, items, as_json, store)


def _explain_each(runbooks: list[Runbook], items: Iterable[Event | Rejection],
                  as_json: bool, store: Store | None) -> int:
    from opsrun.commands.explain import explain_rows, print_verdicts, throttle_verdict
    from opsrun.explain import explain

    rejected = False
    for item in items:
        if isinstance(item, Rejection):
            rejected = True
            print(f"opsrun: stdin {item}", file=sys.stderr)
            continue
        if as_json:
            sys.stdout.write(output.json_line({"event_id": item.id, "runbooks":
                                               explain_rows(runbooks, item, store)}) + "\n")
            continue
        print(output.safe(f"event {item.id}:", keep_newlines=False))
        shown = [rb for rb in runbooks if any(t.kind == "event" for t in rb.triggers)]
        for rb in shown:
            verdicts = explain(rb, item)
            print_verdicts(rb, verdicts, indent="  ",
                           throttle=throttle_verdict(rb, item, verdicts, store))
        if not shown:
            print("  no runbook has an event trigger")
    return 2 if rejected else 0


def _run_all(matcher: Matcher, parallel: int, state_dir: str | None, audit_log: str | None,
             secrets_file: str | None, as_json: bool, accept_new_hosts: bool) -> int:
    from opsrun.engine import RunRequest
    from opsrun.runs.context import open_run_context
    from opsrun.runs.dispatch import Dispatcher
    from opsrun.runs.driver_lock import driving
    from opsrun.runs.throttle import ThrottleTimer

    secret_values = secrets.load(Path(secrets_file) if secrets_file else None)
    codes: list[int] = []
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    with open_run_context(state_dir, audit_log, secret_values,
                          accept_new_hosts=accept_new_hosts) as rc:
        reporter = output.reporter(as_json)
        eng = rc.engine([reporter], confirmer=rc.waiting_confirmer())
        scheduler = Scheduler(parallel)

        def start(job: Job, request: RunRequest) -> None:
            with driving(rc.state_dir, request.run_id, rc.store):
                result = eng.run(request, job.cancel)
            with lock:
                codes.append(result.exit_code)
                results.append({"run_id": result.run_id, "runbook": result.runbook,
                                "state": result.state, "exit_code": result.exit_code,
                                "event_id": request.event.id})

        dispatcher = Dispatcher(rc, scheduler, start, identity.current(),
                                matcher=matcher)
        # once_after windows end while events still come (a long pipeline), or ended
        # before: they fire here; those still open at the end are left in the state folder.
        timer = ThrottleTimer(rc.store, lambda: matcher.runbooks, dispatcher.fire_window,
                              lambda message, **fields: None).start()
        dispatcher.window_opened = timer.wake
        for item in read_events(sys.stdin.buffer):
            if isinstance(item, Rejection):
                print(f"opsrun: stdin {item}", file=sys.stderr)
                _audit_rejection(rc.audit, item, "dispatch")
                codes.append(2)
                continue
            dispatcher.dispatch(item)
            if parallel == 1:
                scheduler.wait_idle()
        timer.stop()
        scheduler.wait_idle()
    if as_json:
        output.print_json({"version": 1, "runs": results})
    return max(codes, default=0)
