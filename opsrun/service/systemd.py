"""systemd integration: sd_notify (READY, STATUS, WATCHDOG, STOPPING) and the unit file.

sd_notify is a datagram to the socket named by $NOTIFY_SOCKET (a path, or an abstract
socket when it starts with '@'). Outside systemd the variable is unset and nothing is sent.
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
from collections.abc import Callable

DEFAULT_DRAIN_S = 60.0


class Notifier:
    """Sends sd_notify messages; does nothing when not started by systemd."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        self.watchdog_s = (int(usec) / 1e6) if usec and usec.isdigit() and \
            (not pid or pid == str(os.getpid())) else None
        self._stop = threading.Event()

    def notify(self, *lines: str) -> None:
        """Send `READY=1`, `STATUS=…` and the like; errors are ignored (best effort)."""
        if not self.address:
            return
        addr = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                # Never block: a listener that stopped reading must not stall the service.
                s.setblocking(False)
                s.connect(addr)
                s.send("\n".join(lines).encode())
        except OSError:
            pass

    def start_watchdog(self, healthy: Callable[[], bool] = lambda: True) -> None:
        """Send WATCHDOG=1 at half the interval systemd asked for, while `healthy()`."""
        if not self.watchdog_s or not self.address:
            return
        interval = self.watchdog_s / 2

        def beat() -> None:
            while not self._stop.wait(interval):
                if healthy():
                    self.notify("WATCHDOG=1")

        threading.Thread(target=beat, name="opsrun-watchdog", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


def unit_file(*, user: bool, drain_s: float = DEFAULT_DRAIN_S,
              runbooks: str | None = None, executable: str | None = None) -> str:
    """A systemd unit for `opsrun watch`; `user` gives one for `systemctl --user`."""
    exe = executable or shutil.which("opsrun") or f"{sys.executable} -m opsrun"
    folder = runbooks or ("%h/runbooks" if user else "/etc/opsrun/runbooks")
    # TimeoutStopSec outlasts the drain limit, so SIGTERM reaches opsrun first and running
    # steps are drained by opsrun, not killed by systemd alongside it.
    stop_timeout = int(drain_s + 30)
    lines = [
        "[Unit]",
        "Description=opsrun: run runbooks when their events come",
        "Documentation=https://github.com/opsrun/opsrun#readme",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={exe} watch --runbooks {folder} --drain-limit {int(drain_s)}s",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=opsrun",
        "StateDirectoryMode=0700",
        "WatchdogSec=30s",
        "Restart=on-failure",
        "RestartSec=2s",
        "KillMode=mixed",
        f"TimeoutStopSec={stop_timeout}s",
        "Environment=PYTHONUNBUFFERED=1",
        # Hardening that leaves the commands of runbooks free to do their job.
        "ProtectControlGroups=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectClock=yes",
        "RestrictRealtime=yes",
        "LockPersonality=yes",
        "",
        "[Install]",
        "WantedBy=default.target" if user else "WantedBy=multi-user.target",
        "",
    ]
    if user:
        lines = [ln for ln in lines if not ln.startswith(("ProtectKernel", "ProtectClock",
                                                           "ProtectControlGroups"))]
    return "\n".join(lines)
