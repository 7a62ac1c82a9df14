"""Run the real `opsrun` entry point in a subprocess, the way a user does."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path


def opsrun(*args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None,
           input: str | bytes | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """`python -m opsrun ARGS` with the test's environment; stdin closed unless input is given."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "opsrun", *args], cwd=cwd, env=full_env,
        input=input, stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True, text=not isinstance(input, bytes), timeout=timeout, check=False)


def no_traceback(result: subprocess.CompletedProcess[str]) -> bool:
    return "Traceback (most recent call last)" not in (result.stderr or "") + (result.stdout or "")


def command(*args: str) -> Sequence[str]:
    return [sys.executable, "-m", "opsrun", *args]


def on_terminal(*args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None,
                timeout: float = 30.0) -> tuple[int, str]:
    """`opsrun ARGS` on a pseudo-terminal (colour, no NO_COLOR): its exit code and output."""
    import pty
    import select

    master, slave = pty.openpty()
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "NO_COLOR"}
    full_env["TERM"] = "xterm-256color"
    p = subprocess.Popen(command(*args), cwd=cwd, stdin=slave, stdout=slave, stderr=slave,
                         env=full_env)
    os.close(slave)
    text = b""
    while True:
        ready, _, _ = select.select([master], [], [], timeout)
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # the terminal closed: the program ended
            break
        if not data:
            break
        text += data
    code = p.wait(timeout=timeout)
    os.close(master)
    return code, text.decode(errors="replace")
