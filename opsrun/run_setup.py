"""Everything a run needs around the engine: state folder, store, audit log, executors, confirmer.

`opsrun run`, `resume`, `dispatch` and `watch` all build their engine here, so every run is
recorded the same way whichever command started it.
"""
from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opsrun import paths, run_types as rt
from opsrun.audit.log import AuditLog
from opsrun.engine import Engine
from opsrun.errors import UsageError
from opsrun.executors.local import LocalExecutor
from opsrun.identity import Identity
from opsrun.run_records import AuditListener, StoreListener
from opsrun.secrets import Masker
from opsrun.store import Store


@dataclass
class RunContext:
    state_dir: Path
    store: Store
    audit: AuditLog
    secrets: dict[str, str]
    accept_new_hosts: bool = False  # --accept-new-hosts: learn unknown SSH host keys

    def executors(self) -> dict[str, Any]:
        return {"run": LocalExecutor(extra_env=self.step_env(), on_start=self._step_started),
                "ssh": _LazySsh(self._ssh_executor)}

    def _step_started(self, run_id: str, pid: int) -> None:
        from opsrun import step_processes

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
                          runbook=self.runbook_record(run_id), **learned)

    def engine(self, listeners: Sequence[rt.Listener], *,
               confirmer: rt.Confirmer | None) -> Engine:
        """An engine whose first listeners are the audit log and the store."""
        return Engine(self.executors(),
                      [AuditListener(self.audit), StoreListener(self.store), *listeners],
                      secrets=self.secrets, confirmer=confirmer)

    def waiting_confirmer(self, *, park: bool = False, notify: Any = None) -> Any:
        """A confirmer that records the question and waits (or parks) for an answer."""
        from opsrun.approvals import Waiter
        from opsrun.executors.confirm import WaitingConfirmer

        waiter = Waiter(self.store, self.audit,
                        notify or (lambda text: print(text, file=sys.stderr, flush=True)))
        return WaitingConfirmer(waiter, park=park, runbook_record=self.runbook_record,
                                socket_dir=None if park else runs_dir(self.state_dir))

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

    def runbook_record(self, run_id: str) -> dict[str, Any] | None:
        run = self.store.get_run(run_id)
        if run is None:
            return None
        return {"name": run.runbook, "path": run.runbook_path, "sha256": run.runbook_sha256}

    def _audit_refusal(self, who: Identity, how: str) -> Any:
        def record(request: rt.ConfirmRequest, why: str) -> None:
            self.audit.append("confirm.refused", run_id=request.run_id,
                              runbook=self.runbook_record(request.run_id),
                              step_id=request.step_id, answerer=who.as_record(), reason=why,
                              how=how)
        return record


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
                     max_segment_bytes=audit_segment_bytes())
    try:
        yield RunContext(folder, store, audit, dict(secret_values), accept_new_hosts)
    finally:
        audit.close()
        store.close()


def audit_segment_bytes(environ: Mapping[str, str] | None = None) -> int:
    """When the audit log starts a new segment: OPSRUN_AUDIT_SEGMENT_SIZE, default 64 MiB."""
    from opsrun.audit.log import DEFAULT_MAX_SEGMENT_BYTES
    from opsrun.sizes import SizeError, parse_size

    text = (os.environ if environ is None else environ).get("OPSRUN_AUDIT_SEGMENT_SIZE")
    if not text:
        return DEFAULT_MAX_SEGMENT_BYTES
    try:
        size = parse_size(text)
    except SizeError as e:
        raise UsageError(f"OPSRUN_AUDIT_SEGMENT_SIZE: {e}") from None
    if size < 4096:
        raise UsageError(f"OPSRUN_AUDIT_SEGMENT_SIZE: {text!r} is too small; a segment must "
                         "hold a few records, so give at least 4KiB")
    return size


@contextmanager
def driving(state_dir: Path, run_id: str, store: Store) -> Iterator[None]:
    """Hold the lock that says "this process drives this run" while it runs or waits.

    The kernel drops the lock when the process dies, so `opsrun resume` can tell a run that
    nobody drives any more from one another process is still working on or waiting for.
    Once the run has ended the lock file is removed, still locked, so that the folder does
    not keep one file per run ever made.
    """
    from opsrun import file_lock
    from opsrun.store import FINAL_RUN_STATES

    path = runs_dir(state_dir) / f"{run_id}.lock"
    fd = file_lock.open_lock_file(path)
    try:
        try:
            with file_lock.flock(fd, timeout_s=0, what=str(path)):
                _write_pid(fd, path)
                yield
                run = store.get_run(run_id)
                if run is not None and run.state in FINAL_RUN_STATES:
                    from opsrun import step_processes

                    step_processes.forget(path.parent, run_id)
                    path.unlink(missing_ok=True)
        except file_lock.LockTimeout:
            raise RunBusy(f"run {run_id} is still being run or waited on by another opsrun "
                          f"process (pid {driver_pid(state_dir, run_id) or '?'}); stop that "
                          "process first, or answer it with opsrun approve/deny") from None
    finally:
        os.close(fd)


def _write_pid(fd: int, path: Path) -> None:
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as e:  # a full disk: say so before anything runs
        from opsrun.errors import StateError

        raise StateError(f"cannot write {path}: {e.strerror}; nothing was run (free some "
                         "space on the state folder's disk)") from None


def runs_dir(state_dir: Path) -> Path:
    """`<state>/runs`: run locks and sockets; as open to the group as the state folder is."""
    folder = state_dir / "runs"
    if not folder.is_dir():
        st = state_dir.stat()
        folder.mkdir(exist_ok=True)
        try:
            os.chown(folder, -1, st.st_gid)
        except OSError:
            pass
        os.chmod(folder, 0o700 | (st.st_mode & 0o050))
    return folder


def driver_pid(state_dir: Path, run_id: str) -> int | None:
    """The pid of the process driving a run, if one holds its lock."""
    import fcntl

    path = state_dir / "runs" / f"{run_id}.lock"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isascii() and text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunBusy(UsageError):
    """Another process drives the run."""
