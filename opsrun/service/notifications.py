"""The service's notifications: its notify file (targets for every runbook) and the outbox worker.

The file is `--notify FILE`, else `notify.yaml` (or `.yml`) beside the runbooks when there
is one. At start an invalid file stops the service (exit 2, each problem at file:line:col);
at a reload (SIGHUP) an invalid edit is logged and the last valid targets stay in force,
as with runbooks.
"""
from __future__ import annotations

from pathlib import Path

from opsrun.errors import RunbookInvalid, UsageError
from opsrun.notify.outbox import Outbox
from opsrun.notify.targets import NotifyFileInvalid, Target, find_service_file, load_service_file
from opsrun.runs.context import RunContext
from opsrun.service.log import DaemonLog


class ServiceNotifications:
    """Loads the notify file and runs the outbox worker for one `opsrun watch`."""

    def __init__(self, rc: RunContext, runbooks_dir: Path, explicit: Path | None,
                 log: DaemonLog) -> None:
        self.rc = rc
        self.runbooks_dir = runbooks_dir
        self.explicit = explicit
        self.log = log
        self.outbox: Outbox | None = None
        self.path: Path | None = None

    def load(self, *, initial: bool = False) -> None:
        """Read the notify file (again); see the module docstring for an invalid one."""
        path = self.explicit if self.explicit is not None else \
            find_service_file(self.runbooks_dir)
        if path is None:
            self.rc.service_targets, self.path = (), None
            return
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            problem = (f"--notify {path}: the file {what}; give the notify file (like "
                       "runbooks/notify.yaml), or leave --notify out")
            if initial:
                raise UsageError(problem)
            self.log("the notify file is gone; keeping its last targets", level="error",
                     file=str(path))
            return
        try:
            targets: tuple[Target, ...] = load_service_file(path)
        except NotifyFileInvalid as e:
            if initial:
                raise RunbookInvalid(e.problems) from None
            for p in e.problems:
                self.log("notify file invalid; keeping its last valid targets", level="error",
                         problem=str(p))
            return
        self.rc.service_targets, self.path = targets, path
        if targets:
            self.log("notification targets for every runbook", file=str(path),
                     targets=", ".join(t.describe() for t in targets))

    def start(self) -> None:
        """Deliver from now on: what this service queues, and what others left queued."""
        self.rc.log = self.log
        self.outbox = Outbox(self.rc.store, self.rc.audit, self.rc.secrets, log=self.log)
        self.rc.outbox = self.outbox.start()

    def stop(self) -> None:
        if self.outbox is not None:
            self.outbox.stop()

    def counts(self) -> dict[str, int]:
        return self.rc.store.notification_counts()
