"""SSH fan-out against the real sshd: many hosts, bounded at once, one failing alone;
timeouts and cancelling that really end the remote command; connections closed at the end.

Twenty inventory names point at the one test server; what is measured is measured on the
remote side (a file per running command), never by timing.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from opsrun.executors.base import ExecRequest
from opsrun.executors.ssh import SshExecutor, SshOptions
from opsrun.inventory import load_inventory
from opsrun.runbook import Step
from tests.helpers.cli import command, no_traceback, opsrun
from tests.helpers.sshd import Sshd
from tests.helpers.wait import wait_for

NAMES = [f"h{i:02d}" for i in range(1, 21)]


def closed_port() -> int:
    """A port nothing listens on: a host there is unreachable (refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def rb(tmp_path: Path, sshd: Sshd) -> Path:
    sshd.trust()
    folder = tmp_path / "rb"
    folder.mkdir()
    (folder / "inventory.yaml").write_text(
        sshd.inventory(NAMES, groups=("fleet",))
        + f"  down: {{hostname: 127.0.0.1, port: {closed_port()}, user: {sshd.user}, "
          f"key: {sshd.client_key}}}\n")
    return folder


def run(rb: Path, text: str, *args: str) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    (rb / "t.yaml").write_text(textwrap.dedent(text))
    state = rb.parent / "state"
    r = opsrun("run", "t", "-r", str(rb), "--state-dir", str(state), *args)
    assert no_traceback(r), r.stderr
    records = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
    return r, [x for x in records if x["kind"] == "step.finished"]


def running_with(marker: str) -> list[int]:
    """Processes whose command line holds `marker` (the remote side is this machine)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def test_fan_out_to_20_hosts_is_bounded_and_prefixes_each_line(rb: Path) -> None:
    spool = rb.parent / "spool"
    (spool / "running").mkdir(parents=True)
    (spool / "counts").mkdir()
    r, finished = run(rb, f"""\
        steps:
          - id: fan
            hosts: ["group:fleet"]
            parallel: 3
            run: |
              touch {spool}/running/$OPSRUN_HOST
              ls {spool}/running | wc -l > {spool}/counts/$OPSRUN_HOST
              sleep 0.2
              rm {spool}/running/$OPSRUN_HOST
              echo "hello from $OPSRUN_HOST"
        """)
    assert r.returncode == 0, r.stdout + r.stderr
    (fan,) = finished
    assert list(fan["hosts"]) == NAMES
    assert all(h["outcome"] == "success" and h["exit_code"] == 0 for h in fan["hosts"].values())
    for name in NAMES:
        assert f"fan@{name} | hello from {name}" in r.stdout.splitlines()
    # Every command saw how many ran at that moment (itself included): never more than 3.
    counts = [int((spool / "counts" / n).read_text()) for n in NAMES]
    assert max(counts) <= 3, counts
    assert max(counts) >= 2, counts  # and they did overlap: it is a fan-out


def test_an_unreachable_host_fails_alone(rb: Path) -> None:
    r, finished = run(rb, """\
        steps:
          - id: wide
            hosts: ["group:fleet", down]
            parallel: 21
            run: echo "up on $OPSRUN_HOST"
          - id: never
            run: echo not reached
        """)
    assert r.returncode == 1
    (wide,) = finished
    down = wide["hosts"].pop("down")
    assert down["outcome"] == "failure" and down["exit_code"] is None
    assert down["error"].startswith("down: cannot connect to 127.0.0.1:") and \
        "refused" in down["error"]
    assert sorted(wide["hosts"]) == NAMES
    assert {h["stdout"] for h in wide["hosts"].values()} == {f"up on {n}\n" for n in NAMES}
    assert wide["outcome"] == "failure"
    assert wide["error"].startswith("1 of 21 hosts failed: down (cannot connect to 127.0.0.1:")
    assert "not reached" not in r.stdout


def test_continue_on_error_lets_the_run_go_on_past_a_failed_host(rb: Path) -> None:
    r, finished = run(rb, """\
        steps:
          - id: some
            hosts: [h01, down]
            continue_on_error: true
            run: echo "up"
          - id: next
            if: steps.some.hosts.h01.outcome == 'success' and steps.some.hosts.down.outcome == 'failure'
            run: echo "went on"
        """)
    assert r.returncode == 0, r.stdout
    assert [f["step_id"] for f in finished] == ["some", "next"]
    assert "next | went on" in r.stdout


def test_a_remote_command_that_outlives_its_timeout_is_killed(rb: Path) -> None:
    marker = f"1000.{secrets.randbelow(10**9):09d}"  # a unique sleep, found in /proc
    r, finished = run(rb, f"""\
        steps:
          - id: slow
            hosts: [h01, h02]
            parallel: 2
            timeout: 1s
            run: echo started; sleep {marker}; echo never
        """)
    assert r.returncode == 1
    (slow,) = finished
    assert slow["outcome"] == "timed_out"
    for h in slow["hosts"].values():
        assert h["outcome"] == "timed_out" and h["stdout"] == "started\n"
        assert h["error"].endswith("timed out; the remote command was stopped")
    wait_for(lambda: not running_with(marker), timeout=10,
             message=lambda: f"still running: {running_with(marker)}")


def test_ctrl_c_stops_the_remote_commands_too(rb: Path) -> None:
    marker = f"1000.{secrets.randbelow(10**9):09d}"
    (rb / "t.yaml").write_text(f"steps:\n  - hosts: [h01, h02, h03]\n    parallel: 3\n"
                               f"    run: sleep {marker}\n")
    p = subprocess.Popen(command("run", "t", "-r", str(rb), "--state-dir",
                                 str(rb.parent / "state")), stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len([p for p in running_with(marker)
                              if _comm(p) == "sleep"]) == 3, timeout=20,
                 message="the three remote sleeps did not start")
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, out + err
    assert "cancelled" in out
    wait_for(lambda: not running_with(marker), timeout=10,
             message=lambda: f"still running: {running_with(marker)}")


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_connections_are_closed_when_the_run_ends(rb: Path, tmp_path: Path) -> None:
    inventory = load_inventory(rb / "inventory.yaml")
    targets = inventory.expand(["h01", "h02"])
    step = Step("s", "run", 0, run="true", hosts=("h01", "h02"), parallel=2, targets=targets)
    executor = SshExecutor(SshOptions(tmp_path))
    request = ExecRequest(step, "run-1", "true", "true", {}, None, None, str(tmp_path))
    x = executor.execute(request, lambda *a: None, threading.Event())
    assert x.ok, x
    conns = list(executor._conns.values())
    assert len(conns) == 2 and all(c.alive() for c in conns)
    executor.execute(request, lambda *a: None, threading.Event())  # the same run: reused
    assert list(executor._conns.values()) == conns
    executor.end_run("other-run")
    assert all(c.alive() for c in conns)
    executor.end_run("run-1")
    assert executor._conns == {} and not any(c.alive() for c in conns)


@pytest.fixture
def silent_server() -> Any:
    """A TCP port that accepts connections and never says a word (no SSH banner)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    for s in [*accepted, server]:
        s.close()


def test_the_step_timeout_bounds_connecting_too(rb: Path, silent_server: Any, sshd: Sshd
                                                ) -> None:
    port, _ = silent_server
    with (rb / "inventory.yaml").open("a") as f:
        f.write(f"  mute: {{hostname: 127.0.0.1, port: {port}, user: {sshd.user}}}\n")
    r, finished = run(rb, """\
        steps:
          - id: s
            hosts: [mute, h01]
            parallel: 2
            timeout: 1s
            run: echo fine
        """)
    assert r.returncode == 1
    (s,) = finished
    assert s["hosts"]["h01"]["outcome"] == "success"
    mute = s["hosts"]["mute"]
    assert mute["outcome"] == "timed_out", mute
    assert mute["error"].startswith("mute: ")
    assert mute["duration"] < 5  # the 1 s step timeout, not the 10 s connect timeout


def test_a_cancel_stops_a_connection_in_progress(silent_server: Any, tmp_path: Path,
                                                 sshd: Sshd) -> None:
    from opsrun.inventory import Host

    port, accepted = silent_server
    host = Host("mute", "127.0.0.1", port, sshd.user)
    step = Step("s", "run", 0, run="true", hosts=("mute",), targets=(host,))
    executor = SshExecutor(SshOptions(tmp_path, connect_timeout_s=60))
    request = ExecRequest(step, "run-1", "true", "true", {}, None, None, str(tmp_path))
    cancel = threading.Event()
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(
        executor.execute(request, lambda *a: None, cancel)))
    worker.start()
    wait_for(lambda: accepted, timeout=5, message="opsrun did not connect")
    cancel.set()  # while it waits for the server's banner
    worker.join(timeout=10)  # far below the 60 s connect timeout
    assert not worker.is_alive(), "the connection was not given up at the cancel"
    (x,) = results
    assert x.cancelled and x.hosts["mute"]["outcome"] == "cancelled"
    assert x.hosts["mute"]["error"] == (f"mute: connecting to {sshd.user}@127.0.0.1:{port} "
                                        "was cancelled")


def test_accept_new_hosts_in_parallel_learns_a_shared_key_once(tmp_path: Path,
                                                              sshd: Sshd) -> None:
    """Twenty inventory names with one address, all unknown at once: one known_hosts line
    and one host_key.learned record, not twenty."""
    folder = tmp_path / "rb"
    folder.mkdir()
    (folder / "inventory.yaml").write_text(sshd.inventory(NAMES, groups=("fleet",)))
    (folder / "t.yaml").write_text(textwrap.dedent("""\
        steps:
          - hosts: ["group:fleet"]
            parallel: 20
            run: 'true'
        """))
    state = tmp_path / "state"
    r = opsrun("run", "t", "-r", str(folder), "--state-dir", str(state), "--accept-new-hosts")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = (state / "known_hosts").read_text().splitlines()
    assert lines == [sshd.host_key_line] or len(lines) == 1, lines
    records = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in records].count("host_key.learned") == 1
