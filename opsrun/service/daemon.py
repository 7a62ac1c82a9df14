"""`opsrun watch`: the sources, a scheduler of runs, and the same engine as `opsrun run`.

Life of the service:
- start: load the runbooks (refuse to start if none is valid), recover what the last
  process left (running → interrupted, waiting runs adopted, queued runs started),
  open the control socket, start every source, then tell systemd READY=1;
- run: events become recorded runs (runs/dispatch.py) scheduled under --max-parallel and each
  runbook's concurrency policy; a run waiting for an answer holds no slot and is resumed
  when the answer (or its deadline) comes; runbook edits and SIGHUP reload;
- stop (SIGTERM/SIGINT): take no new events, let running runs finish up to the drain
  limit, then interrupt them (recorded as `interrupted`), and exit 0.
"""
from __future__ import annotations

import errno
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

from opsrun import identity
from opsrun import run_types as rt
from opsrun.approvals import Waiter
from opsrun.audit.read import finished_runs
from opsrun.engine import RunRequest
from opsrun.errors import OpsrunError, UsageError
from opsrun.matcher import Matcher
from opsrun.runbook import Runbook, load_runbooks
from opsrun.runs import recovery, resume
from opsrun.runs.cancel import cancel_undriven
from opsrun.runs.context import RunContext
from opsrun.runs.dispatch import Dispatcher
from opsrun.runs.driver_lock import DriverLock, driver_pid
from opsrun.runs.scheduler import Job, Scheduler
from opsrun.runs.throttle import ThrottleTimer
from opsrun.service.control import ControlHandler, ControlParts
from opsrun.service.log import DaemonLog, LogListener
from opsrun.service.metrics_file import MetricsFileWriter
from opsrun.service.notifications import ServiceNotifications
from opsrun.service.sources import SourceParts, Sources
from opsrun.service.systemd import Notifier
from opsrun.service.webhooks import WebhookService, WebhookSettings

PARKED_CHECK_S = 0.25
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.EDQUOT, errno.ENOMEM})
STATUS_EVERY_S = 5.0


@dataclass
class WatchOptions:
    runbooks_dir: Path
    stdin: bool = False
    max_parallel: int = field(default_factory=lambda: (os.cpu_count() or 1) * 4)
    drain_limit_s: float = 60.0
    inventory: Path | None = None  # --inventory, else the one in the runbooks folder
    accept_new_hosts: bool = False
    metrics_file: Path | None = None  # --metrics-file: a textfile for node_exporter
    metrics_interval_s: float = 15.0
    webhook: WebhookSettings = field(default_factory=WebhookSettings)  # --webhook-*
    notify_file: Path | None = None  # --notify, else the notify.yaml beside the runbooks


class Daemon:
    """One `opsrun watch` process."""

    def __init__(self, opts: WatchOptions, rc: RunContext, log: DaemonLog,
                 notifier: Notifier | None = None) -> None:
        self.opts = opts
        self.rc = rc
        self.log = log
        self.notifier = notifier or Notifier()
        self.starter = identity.current()
        self.scheduler = Scheduler(opts.max_parallel, on_error=self._job_failed)
        self.engine = rc.engine([LogListener(log)], confirmer=rc.waiting_confirmer(park=True))
        self.dispatcher = Dispatcher(rc, self.scheduler, self._run_job, self.starter, log)
        self.throttle_timer = ThrottleTimer(rc.store, lambda: self.dispatcher.matcher.runbooks,
                                            self.dispatcher.fire_window, log)
        self.dispatcher.window_opened = self.throttle_timer.wake
        self.waiter = Waiter(rc.store, rc.audit)
        self.runbooks: dict[Path, Runbook] = {}
        self.stop = threading.Event()
        self.reload_requested = threading.Event()
        self.wake_parked = threading.Event()
        self.requests: dict[str, RunRequest] = {}
        self.waiting_steps: dict[str, str] = {}
        self.locks: dict[str, DriverLock] = {}
        self._locks_mutex = threading.Lock()
        self.started_at = time.monotonic()
        self.webhook = WebhookService(opts.webhook, rc, log, self._wake_queue,
                                      self.metrics_text)
        self.sources = Sources(SourceParts(
            rc, self.dispatcher, log, opts.runbooks_dir, opts.stdin, self.stop,
            self.reload_requested, self.wake_parked, self.webhook))
        self.metrics_writer: MetricsFileWriter | None = None
        self.notifications = ServiceNotifications(rc, opts.runbooks_dir, opts.notify_file, log)
        self.gap: dict[str, Any] | None = None  # the start-up report, when there was one
        self.control = ControlHandler(ControlParts(
            rc, self.scheduler, self.status, self.status_line, self.sources.wake_queue,
            self.wake_parked, self.cancel_parked))

    # ── the whole life ──────────────────────────────────────────────────────

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the exit code."""
        self._signals()
        self.notifications.load(initial=True)
        self.reload(initial=True)
        self.notifications.start()
        self._recover()
        # Once_after windows that ended while opsrun was down fire now, the others on time.
        self.throttle_timer.start()
        server = self.control.start()
        try:
            self._report_gap()
            self.sources.start_runbook_watch()
            self.sources.start()
            self.rc.audit.append("daemon.started",
                                 runbooks=sorted(rb.name for rb in self.runbooks.values()),
                                 max_parallel=self.opts.max_parallel)
            self.log("opsrun watch is ready", runbooks=len(self.runbooks),
                     sources=",".join(f"{k}:{v}" for k, v in self.sources.describe().items()))
            self.notifier.notify("READY=1", f"STATUS={self.status_line()}")
            self.notifier.start_watchdog(self.sources.healthy)
            self._start_metrics()
            self._loop()
        finally:
            self._shutdown()
            server.stop()
            self._stop_metrics()
        return 0

    def _loop(self) -> None:
        last_status = 0.0
        while not self.stop.is_set():
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.notifications.load()
                self.reload()
            self._check_parked()
            self.sources.restart_if_dead()
            if time.monotonic() - last_status >= STATUS_EVERY_S:
                self.notifier.notify(f"STATUS={self.status_line()}")
                self._seen()
                last_status = time.monotonic()
            self.wake_parked.wait(PARKED_CHECK_S)
            self.wake_parked.clear()

    def _signals(self) -> None:
        def stop(signum: int, frame: FrameType | None) -> None:
            self.log(f"{signal.Signals(signum).name} received: stopping")
            self.stop.set()
            self.wake_parked.set()

        def reload(signum: int, frame: FrameType | None) -> None:
            self.reload_requested.set()
            self.wake_parked.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    # ── runbooks ────────────────────────────────────────────────────────────

    def reload(self, *, initial: bool = False) -> None:
        """Load the runbooks again; an invalid edit keeps the last valid version in force."""
        found, problems = load_runbooks([self.opts.runbooks_dir], inventory=self.opts.inventory)
        fresh = {rb.path.resolve(): rb for rb in found}
        bad_files = sorted({p.file for p in problems})
        for problem in problems:
            self.log("runbook invalid", level="error", problem=str(problem))
        for warning in (w for rb in found for w in rb.warnings):
            self.log("runbook warning", level="warning", problem=str(warning))
        for file in bad_files:
            old = self.runbooks.get(Path(file).resolve())
            kept = old is not None and Path(file).exists()
            self.rc.audit.append("runbook.invalid", file=file, kept_previous=kept,
                                 problems=[str(p) for p in problems if p.file == file])
            if kept and old is not None:
                fresh[old.path.resolve()] = old
                self.log("keeping the last valid version", runbook=old.name, file=file)
        if initial and not fresh:
            raise UsageError(f"no valid runbook in {self.opts.runbooks_dir}; nothing to watch"
                             + (" (see the problems above)" if problems else ""))
        changed = {p: rb.sha256 for p, rb in fresh.items()} != \
            {p: rb.sha256 for p, rb in self.runbooks.items()}
        self.runbooks = fresh
        self.dispatcher.set_matcher(Matcher(sorted(fresh.values(), key=lambda r: r.name)))
        if not initial:
            self.rc.audit.append("daemon.reloaded", runbooks=sorted(r.name for r in
                                                                    fresh.values()),
                                 invalid=bad_files)
            self.log("runbooks reloaded", runbooks=len(fresh), invalid=len(bad_files) or None)
            if changed:
                self.sources.start()

    # ── runs ────────────────────────────────────────────────────────────────

    def _run_job(self, job: Job, request: RunRequest) -> None:
        if not self._lock_run(job.run_id):
            self.log("run is driven by another process; leaving it", level="warning",
                     run_id=job.run_id)
            return
        parked = ended = False
        try:
            if job.resume:
                run = self.rc.store.get_run(job.run_id)
                if run is None or run.state != rt.WAITING:
                    return
                request = resume.load_request(self.rc.store, run, self.opts.inventory)
            self.requests[job.run_id] = request
            result = self.engine.run(request, job.cancel)
            ended = result.state in rt.FINAL_STATES
            if result.state == rt.WAITING and result.waiting_step:
                self.waiting_steps[job.run_id] = result.waiting_step
                self.scheduler.mark_parked(job)
                parked = True
                self.wake_parked.set()
        finally:
            if not parked:
                self.requests.pop(job.run_id, None)
                self.waiting_steps.pop(job.run_id, None)
                self._unlock_run(job.run_id, remove=ended)

    def _job_failed(self, job: Job, error: BaseException) -> None:
        self.log("run could not go on", level="error", run_id=job.run_id, error=str(error))
        # Out of file descriptors, disk or memory is the machine's state, not a bug here.
        exhausted = isinstance(error, MemoryError) or (
            isinstance(error, OSError) and error.errno in _EXHAUSTED)
        if not isinstance(error, OpsrunError) and not exhausted:
            import traceback

            self.log("".join(traceback.format_exception(error)), level="error")
        self._unlock_run(job.run_id)

    def _check_parked(self) -> None:
        now = datetime.now(timezone.utc)
        for job in self.scheduler.parked():
            step = self.waiting_steps.get(job.run_id)
            q = self.rc.store.latest_approval(job.run_id, step) if step else None
            if q is None:
                continue
            if q.answer is None and q.deadline is not None and now >= q.deadline:
                self.waiter.expire(q, self._on_timeout(job.run_id, q.step_id),
                                   self.rc.runbook_ref(job.run_id))
                q = self.rc.store.latest_approval(job.run_id, q.step_id)
            if q is not None and q.answer is not None:
                self.scheduler.resume(job)

    def _on_timeout(self, run_id: str, step_id: str) -> str:
        request = self.requests.get(run_id)
        if request is not None:
            for step in request.runbook.steps:
                if step.id == step_id:
                    return step.on_timeout
        return "deny"

    def cancel_parked(self, job: Job, who: str) -> None:
        """Record the cancel of a run that was waiting for an answer."""
        cancel_undriven(self.rc, job.run_id, uid=None,
                        why=f"cancelled by {who} while waiting for an answer")
        self.requests.pop(job.run_id, None)
        self.waiting_steps.pop(job.run_id, None)
        self._unlock_run(job.run_id, remove=True)

    # ── after a crash ───────────────────────────────────────────────────────

    def _recover(self) -> None:
        """Runs left `running` become interrupted; `waiting` runs are adopted; `queued` start."""
        store = self.rc.store
        # Not those an `opsrun run` elsewhere is running right now.
        left = [run for run in store.list_runs(state=rt.RUNNING, limit=1_000_000)
                if driver_pid(self.rc.state_dir, run.id) is None]
        ended = finished_runs(self.rc.audit.path, [r.id for r in left]) if left else {}
        for run in left:
            if run.id in ended and self._store_recorded_end(run.id, ended[run.id]):
                continue
            if recovery.retry_due(self.rc, run):
                self._adopt(run, parked=False, retry=True)
                continue
            recovery.interrupt(self.rc, run, self.log)
        for run in store.list_runs(state=rt.WAITING, limit=1_000_000):
            self._adopt(run, parked=True)
        for run in reversed(store.list_runs(state=rt.QUEUED, limit=1_000_000)):
            self._adopt(run, parked=False)

    def _store_recorded_end(self, run_id: str, record: dict[str, Any]) -> bool:
        """A run whose end the audit log holds but the store missed: store that end."""
        state = record.get("state")
        if state not in rt.FINAL_STATES:
            return False
        try:
            at = datetime.strptime(str(record.get("time")), "%Y-%m-%dT%H:%M:%S.%fZ")
        except ValueError:
            at = datetime.now(timezone.utc)
        exit_code = record.get("exit_code")
        done = self.rc.store.update_run(
            run_id, expect_state=rt.RUNNING, state=state,
            finished_at=at.replace(tzinfo=timezone.utc),
            exit_code=exit_code if isinstance(exit_code, int) else rt.EXIT_CODES[state],
            error=record.get("error") if isinstance(record.get("error"), str) else None)
        if done:
            self.log("run had ended before opsrun stopped; its end is taken from the audit "
                     "log", run_id=run_id, state=state)
        return done

    def _adopt(self, run: Any, *, parked: bool, retry: bool = False) -> None:
        if driver_pid(self.rc.state_dir, run.id) is not None:
            return
        try:
            request = resume.load_request(self.rc.store, run, self.opts.inventory)
        except OpsrunError as e:
            self.log("cannot take over run", level="error", run_id=run.id, error=str(e))
            if retry:
                recovery.interrupt(self.rc, run, self.log)
            return
        if retry:
            request = request._replace(resume_attempt=run.retry_attempt, retry_at=run.retry_at)
            self.rc.audit.append("run.resumed", run_id=run.id, runbook=run.runbook_ref(),
                                 from_state=run.state, at_step=request.resume_at,
                                 attempt=run.retry_attempt, reason="a retry was due when "
                                 "opsrun stopped; it is made when it is due")
            self.log("run goes on with the retry it was waiting for", run_id=run.id,
                     attempt=run.retry_attempt)
        rb = request.runbook
        key = self.dispatcher._key(rb, request.event, request.params)
        job = Job(run.id, rb.name, key, rb.concurrency.policy,
                  start=lambda j: self._run_job(j, request))
        if parked:
            pending = self.rc.store.pending_approvals(run.id)
            latest = pending[0] if pending else None
            step = latest.step_id if latest else rb.steps[request.resume_at].id
            if not self._lock_run(run.id):
                return
            self.requests[run.id] = request
            self.waiting_steps[run.id] = step
            self.scheduler.adopt_parked(job)
        else:
            self.scheduler.submit(job)

    # ── driver locks: this process drives the run ──────────────────────────

    def _lock_run(self, run_id: str) -> bool:
        with self._locks_mutex:
            if run_id in self.locks:
                return True
            lock = DriverLock.take(self.rc.state_dir, run_id)
            if lock is None:
                return False
            self.locks[run_id] = lock
            return True

    def _unlock_run(self, run_id: str, *, remove: bool = False) -> None:
        """Let go of a run; `remove` for a run that has ended (see DriverLock.release)."""
        with self._locks_mutex:
            lock = self.locks.pop(run_id, None)
        if lock is not None:
            lock.release(ended=remove)

    # ── stop ────────────────────────────────────────────────────────────────

    def _shutdown(self) -> None:
        self.notifier.notify("STOPPING=1", "STATUS=stopping: draining running runs")
        self.sources.stop_all()
        # Before the scheduler refuses runs: a window fired then would lose its run.
        self.throttle_timer.stop()
        self.scheduler.stop_accepting()
        running = len(self.scheduler.running())
        if running:
            self.log("waiting for running runs to finish", running=running,
                     drain_limit=f"{self.opts.drain_limit_s:g}s")
        if not self.scheduler.wait_idle(self.opts.drain_limit_s):
            for job in self.scheduler.running():
                job.cancel.cancel(rt.INTERRUPTED, "opsrun was stopped and the drain limit "
                                                  "was reached")
            self.scheduler.wait_idle(30)
        for run_id in list(self.locks):
            self._unlock_run(run_id)
        self.notifications.stop()
        self._seen(stopped=True)
        self.rc.audit.append("daemon.stopped")
        self.log("opsrun watch stopped")
        self.notifier.stop()

    # ── while it was down ───────────────────────────────────────────────────

    def _report_gap(self) -> None:
        """Say what happened while no service ran, before the sources act on it."""
        from opsrun.service import gap

        rep = gap.report(gap.GapParts(self.rc.store, self.dispatcher.matcher,
                                      datetime.now(timezone.utc)))
        self.rc.store.service_started(os.getpid())
        if not gap.worth_recording(rep):
            return
        self.gap = rep
        self.rc.audit.append("daemon.gap", **rep)
        self.log("while opsrun watch was down: " + gap.summary(rep))
        for line in gap.details(rep):
            self.log(line)

    def _seen(self, *, stopped: bool = False) -> None:
        """Note that the service is alive (its last sign before a crash says when it died)."""
        try:
            self.rc.store.service_seen(stopped=stopped)
        except OpsrunError as e:
            self.log("cannot note that the service is alive", level="warning", error=str(e))

    # ── metrics ─────────────────────────────────────────────────────────────

    def metrics_text(self, *, up: bool = True) -> str:
        """The exposition of `opsrun metrics`, as this service sees it now."""
        from opsrun.metrics import exposition
        from opsrun.service.metrics_file import collect

        return exposition(collect(self.rc.store, self.rc.audit.path,
                                  self.status() if up else None))

    def _file_metrics_text(self) -> str:
        """The exposition with the webhook counters too, as /metrics serves it."""
        from opsrun.metrics import render

        text = self.metrics_text()
        return text + render(self.webhook.receiver.families()) if self.webhook.alive() \
            else text

    def _start_metrics(self) -> None:
        if self.opts.metrics_file is None:
            return
        self.metrics_writer = MetricsFileWriter(self.opts.metrics_file,
                                                self.opts.metrics_interval_s,
                                                self._file_metrics_text, self.log).start()
        self.log("writing metrics", file=str(self.opts.metrics_file),
                 every=f"{self.opts.metrics_interval_s:g}s")

    def _stop_metrics(self) -> None:
        if self.metrics_writer is None:
            return
        # The last file says the service is down, rather than going stale saying it is up.
        try:
            final: str | None = self.metrics_text(up=False)
        except Exception as e:  # noqa: BLE001 - stopping goes on without a last file
            self.log("cannot gather the last metrics", level="error", error=str(e))
            final = None
        self.metrics_writer.stop(final)

    # ── status ──────────────────────────────────────────────────────────────

    def status(self) -> dict[str, Any]:
        counts = self.scheduler.counts()
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "runbooks": sorted(rb.name for rb in self.runbooks.values()),
            "sources": self.sources.describe(),
            "source_health": self.sources.health(),
            "runs_running": counts["running"], "runs_waiting": counts["parked"],
            "runs_queued": counts["queued"], "event_queue": self.rc.store.queue_length(),
            "max_parallel": self.opts.max_parallel,
            "throttle_windows": self.rc.store.count_throttles(),
            "notifications": self.notifications.counts(),
            "gap": self.gap,
            "webhook_url": self.webhook.url,
        }

    def _wake_queue(self) -> None:
        self.sources.wake_queue.set()

    def status_line(self) -> str:
        s = self.status()
        return (f"{len(s['runbooks'])} runbooks; running {s['runs_running']}, waiting "
                f"{s['runs_waiting']}, queued {s['runs_queued']}; event queue "
                f"{s['event_queue']}")

