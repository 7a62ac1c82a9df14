"""The only module that starts processes.

A step's command runs in its own process group (its own session), so that stopping it
stops everything it started: at a timeout or a cancel, the whole group gets SIGTERM, then
SIGKILL after a grace period. When the command ends, whatever it left running in its group
is stopped the same way — a step leaves no process behind (a process that made itself a
new session with setsid is beyond reach, as with any supervisor that is not a cgroup).
"""
from __future__ import annotations

import errno
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

READ_SIZE = 64 * 1024
DEFAULT_GRACE_S = 5.0  # SIGTERM → SIGKILL; OPSRUN_KILL_GRACE (a duration) changes it
_POLL_S = 0.05

OutputFn = Callable[[str, bytes], None]  # (stream name "stdout"|"stderr", chunk)


class ProcResult(NamedTuple):
    """How a command ended; `exit_code` is 128+N when signal N ended it, like a shell's."""

    exit_code: int | None
    timed_out: bool = False
    cancelled: bool = False
    error: str | None = None  # the command could not be started at all


def capture(argv: Sequence[str], *, cwd: Path | None = None,
            timeout_s: float = 10.0) -> tuple[int, str, str]:
    """Run a short helper command to completion; return (returncode, stdout, stderr).

    A command that cannot be started or does not end in time reports returncode 127 / 124
    instead of raising, since callers treat helper output as optional information.
    """
    try:
        done = subprocess.run(list(argv), cwd=cwd, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return 124, "", f"{argv[0]} did not finish within {timeout_s:g}s"
    except OSError as e:  # not found, not allowed, or out of file descriptors or processes
        return 127, "", str(e)
    return (done.returncode, done.stdout.decode("utf-8", "replace"),
            done.stderr.decode("utf-8", "replace"))


_LIMIT_HINTS = {
    errno.EMFILE: " (this process's limit on open files is reached: raise it with ulimit -n, "
                  "or LimitNOFILE= in the systemd unit)",
    errno.ENFILE: " (the system's limit on open files is reached: see fs.file-max)",
    errno.EAGAIN: " (the limit on processes is reached: raise ulimit -u, or TasksMax= in the "
                  "systemd unit)",
    errno.ENOMEM: " (out of memory)",
}


def run_streaming(argv: Sequence[str], *, env: Mapping[str, str], cwd: Path | None,
                  on_output: OutputFn, timeout_s: float | None = None,
                  cancel: threading.Event | None = None,
                  grace_s: float = DEFAULT_GRACE_S,
                  on_start: Callable[[int], None] | None = None) -> ProcResult:
    """Run a command with stdin closed, streaming its output; stop it at timeout or cancel."""
    if cwd is not None and not cwd.is_dir():
        return ProcResult(None, error=f"the working folder {cwd} does not exist")
    try:
        p = subprocess.Popen(list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True, close_fds=True)
    except (FileNotFoundError, PermissionError) as e:
        return ProcResult(None, error=f"cannot start {argv[0]!r}: {e.strerror}")
    except OSError as e:
        hint = _LIMIT_HINTS.get(e.errno or 0, "")
        return ProcResult(None, error=f"cannot start {argv[0]!r}: {e.strerror or e}{hint}")
    if on_start is not None:
        on_start(p.pid)
    return _Supervisor(p, on_output, timeout_s, cancel, grace_s).run()


class _Supervisor:
    def __init__(self, p: subprocess.Popen[bytes], on_output: OutputFn,
                 timeout_s: float | None, cancel: threading.Event | None,
                 grace_s: float) -> None:
        self.p = p
        self.pgid = p.pid  # start_new_session made the child its group's leader
        self.on_output = on_output
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.cancel = cancel
        self.grace_s = grace_s
        self.sel = selectors.DefaultSelector()
        assert p.stdout is not None and p.stderr is not None
        for f, name in ((p.stdout, "stdout"), (p.stderr, "stderr")):
            os.set_blocking(f.fileno(), False)
            self.sel.register(f.fileno(), selectors.EVENT_READ, name)

    def run(self) -> ProcResult:
        timed_out = cancelled = False
        try:
            while True:
                if self.cancel is not None and self.cancel.is_set():
                    cancelled = True
                    break
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    timed_out = True
                    break
                if self.sel.get_map():
                    self._pump(_POLL_S)
                else:
                    # Output closed; the command may still be running (or just exiting).
                    try:
                        self.p.wait(timeout=_POLL_S)
                    except subprocess.TimeoutExpired:
                        continue
                if self.p.poll() is not None:
                    break
            if timed_out or cancelled:
                self._stop_group()
            else:
                self._drain_after_exit()
            self._stop_group()  # leftovers the command started and did not wait for
            self._pump_until_eof(0.5)
        finally:
            self.sel.close()
            for f in (self.p.stdout, self.p.stderr):
                if f is not None:
                    f.close()
        code = self.p.wait()
        exit_code = 128 - code if code < 0 else code
        return ProcResult(exit_code, timed_out=timed_out, cancelled=cancelled)

    def _pump(self, wait_s: float) -> None:
        for key, _ in self.sel.select(timeout=wait_s):
            try:
                data = os.read(key.fd, READ_SIZE)
            except BlockingIOError:
                continue
            if data:
                self.on_output(key.data, data)
            else:
                self.sel.unregister(key.fd)

    def _drain_after_exit(self) -> None:
        """The command exited: read what is left until its output closes or goes quiet."""
        quiet_until = time.monotonic() + 0.2
        give_up = time.monotonic() + 1.0  # a leftover that keeps talking is stopped anyway
        while self.sel.get_map() and time.monotonic() < min(quiet_until, give_up):
            if self.sel.select(timeout=0.02):
                self._pump(0)
                quiet_until = time.monotonic() + 0.2

    def _pump_until_eof(self, limit_s: float) -> None:
        end = time.monotonic() + limit_s
        while self.sel.get_map() and time.monotonic() < end:
            self._pump(0.02)

    def _alive(self) -> bool:
        """Whether the command or anything left in its group still runs (zombies do not)."""
        if self.p.poll() is None:
            return True
        try:
            os.killpg(self.pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False  # the usual case: the group is empty, no need to look further
        return _group_has_others(self.pgid, self.p.pid)

    def _stop_group(self) -> None:
        """SIGTERM to the whole group, then SIGKILL after the grace period."""
        if not self._alive():
            return
        _signal_group(self.pgid, signal.SIGTERM)
        end = time.monotonic() + self.grace_s
        while time.monotonic() < end and self._alive():
            self._pump(0.02)
        if self._alive():
            _signal_group(self.pgid, signal.SIGKILL)
            end = time.monotonic() + 2.0
            while time.monotonic() < end and self._alive():
                self._pump(0.02)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_has_others(pgid: int, leader: int) -> bool:
    """Whether any process other than the (exited) leader is still in the group."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        if not entry.isdigit() or int(entry) == leader:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces) start after the last ')'.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def run_with_input(argv: Sequence[str], stdin: bytes, *, env: Mapping[str, str],
                   timeout_s: float) -> tuple[int, str]:
    """Run a helper (a notification command) with `stdin` as its input, in its own process
    group; return (returncode, the tail of its stderr).

    Like `capture`, nothing raises: 127 when it cannot start, 124 when it did not finish in
    time (its whole group is killed then).
    """
    try:
        p = subprocess.Popen(list(argv), env=dict(env), stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True, close_fds=True)
    except OSError as e:
        hint = _LIMIT_HINTS.get(e.errno or 0, "")
        return 127, f"cannot start {argv[0]!r}: {e.strerror or e}{hint}"
    try:
        _, err = p.communicate(stdin, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _signal_group(p.pid, signal.SIGKILL)
        p.communicate()
        return 124, f"{argv[0]} did not finish within {timeout_s:g}s"
    _signal_group(p.pid, signal.SIGKILL)  # what it left behind in its group
    return p.returncode, err.decode("utf-8", "replace")[-2000:]
