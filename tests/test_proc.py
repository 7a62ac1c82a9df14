"""The process runner: streaming, timeouts in two stages, cancel, nothing left behind."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from opsrun import proc
from tests.helpers.wait import wait_for

ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def run(script: str, **kw: object) -> tuple[proc.ProcResult, dict[str, bytes]]:
    got: dict[str, bytes] = {"stdout": b"", "stderr": b""}

    def on_output(stream: str, data: bytes) -> None:
        got[stream] += data

    result = proc.run_streaming(["bash", "-c", script], env=ENV, cwd=kw.pop("cwd", None),
                                on_output=on_output, **kw)  # type: ignore[arg-type]
    return result, got


def test_streams_and_exit_code() -> None:
    r, got = run("echo out; echo err >&2; exit 7")
    assert r == proc.ProcResult(7)
    assert got == {"stdout": b"out\n", "stderr": b"err\n"}


def test_signal_exit_code_like_a_shell() -> None:
    r, _ = run("kill -KILL $$")
    assert r.exit_code == 137


def test_missing_workdir_and_shell(tmp_path: Path) -> None:
    r, _ = run("true", cwd=tmp_path / "nope")
    assert r.exit_code is None and "does not exist" in (r.error or "")
    r2 = proc.run_streaming(["no-such-shell-xyz", "-c", "true"], env=ENV, cwd=None,
                            on_output=lambda s, d: None)
    assert r2.exit_code is None and "cannot start 'no-such-shell-xyz'" in (r2.error or "")


def test_timeout_term_then_kill(tmp_path: Path) -> None:
    t0 = time.monotonic()
    r, got = run("trap 'echo got-term' TERM; while :; do sleep 0.01; done", timeout_s=0.3,
                 grace_s=0.5)
    assert r.timed_out and r.exit_code == 137
    assert b"got-term" in got["stdout"]  # SIGTERM came first
    assert time.monotonic() - t0 < 10


def test_cancel_stops_group(tmp_path: Path) -> None:
    cancel = threading.Event()
    pidfile = tmp_path / "pid"
    result: list[proc.ProcResult] = []
    th = threading.Thread(target=lambda: result.append(
        run(f"sleep 600 & echo $! > {pidfile}; wait", cancel=cancel, grace_s=0.5)[0]))
    th.start()
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=10)
    cancel.set()
    th.join(timeout=30)
    assert result and result[0].cancelled
    assert not os.path.exists(f"/proc/{pidfile.read_text().strip()}/stat") or \
        open(f"/proc/{pidfile.read_text().strip()}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"


def test_capture() -> None:
    assert proc.capture(["bash", "-c", "echo hi"]) == (0, "hi\n", "")
    code, _, err = proc.capture(["no-such-program-xyz"])
    assert code == 127 and err
    code, _, err = proc.capture(["sleep", "5"], timeout_s=0.2)
    assert code == 124
