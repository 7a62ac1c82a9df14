"""`opsrun watch` as a real subprocess, with a real sd_notify datagram socket."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

from tests.helpers.cli import command, opsrun
from tests.helpers.wait import wait_for


class Service:
    """Starts `opsrun watch`, reads its sd_notify messages, stops it."""

    def __init__(self, tmp: Path, runbooks: Path, *extra: str, stdin: bool = False,
                 env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.runbooks = runbooks
        self.state = tmp / "state"
        self.extra = extra
        self.stdin = stdin
        self.env = {"OPSRUN_STATE_DIR": str(self.state), "OPSRUN_KILL_GRACE": "500ms",
                    **(env or {})}
        self.notify_path = tmp / f"notify-{len(list(tmp.glob('notify-*')))}.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(0.1)
        self.messages: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = tmp / "watch.log"

    def start(self, *, wait_ready: bool = True) -> Service:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            command("watch", "--runbooks", str(self.runbooks), *self.extra,
                    *(["--stdin"] if self.stdin else [])),
            env={**os.environ, **self.env, "NOTIFY_SOCKET": str(self.notify_path)},
            stdin=subprocess.PIPE if self.stdin else subprocess.DEVNULL,
            stdout=log, stderr=log)
        log.close()
        if wait_ready:
            self.wait_message("READY=1", timeout=30)
        return self

    def read_notify(self) -> None:
        while True:
            try:
                data = self.notify.recv(65536)
            except (socket.timeout, BlockingIOError):
                return
            self.messages.extend(data.decode().splitlines())

    def wait_message(self, text: str, timeout: float = 20) -> None:
        def seen() -> bool:
            self.read_notify()
            if self.proc is not None and self.proc.poll() is not None and text not in \
                    self.messages:
                raise AssertionError(f"opsrun watch exited ({self.proc.returncode}):\n"
                                     + self.log())
            return text in self.messages
        wait_for(seen, timeout=timeout, message=self.log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def send_stdin(self, text: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self.read_notify()
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.notify.close()

    def cli(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return opsrun(*args, env=self.env, **kw)  # type: ignore[arg-type]

    def runs(self, **filters: str) -> list[dict]:
        args = ["runs", "--json", "--limit", "100000"]
        for k, v in filters.items():
            args += [f"--{k}", v]
        r = self.cli(*args)
        return json.loads(r.stdout)["runs"] if r.returncode == 0 else []

    def audit(self) -> list[dict]:
        path = self.state / "audit.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
