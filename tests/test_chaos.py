"""Crash safety of `opsrun watch` under SIGKILL (the driver is tests/chaos.py).

The suite runs a short chaos run with the fixed seed; OPSRUN_CHAOS_ITERATIONS=200 (or
`python tests/chaos.py`) runs the full one. Two kills that the random loop would rarely
hit are provoked on purpose: in the middle of an `opsrun emit` request, and while the
service holds a batch of queued events it has not handled yet.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from tests.chaos import run_chaos
from tests.helpers.cli import command
from tests.helpers.service import Service
from tests.helpers.wait import wait_for

SEED = 11
_NO_MATCH = re.compile(r"event matched no runbook event_id=(\S+)")


def test_chaos_kill_9_loop() -> None:
    iterations = int(os.environ.get("OPSRUN_CHAOS_ITERATIONS", "30"))
    report = run_chaos(iterations, SEED)
    print(json.dumps(report, indent=2))
    assert report["problems"] == []
    assert report["states"].get("succeeded", 0) > iterations  # work did flow
    assert sum(report["kills"].values()) == iterations


@pytest.fixture
def quiet_service(tmp_path: Path) -> Service:
    """A service whose only runbook matches no emitted event: each event drained leaves
    one `event matched no runbook event_id=…` line in its log, and nothing else."""
    rb = tmp_path / "runbooks"
    rb.mkdir()
    (rb / "r.yaml").write_text(textwrap.dedent("""\
        on: [{event: {where: {kind: never}}}]
        steps:
          - run: "true"
        """))
    return Service(tmp_path, rb)


def drained(svc: Service) -> Counter[str]:
    return Counter(_NO_MATCH.findall(svc.log()))


def events(prefix: str, count: int) -> str:
    return "".join(json.dumps({"kind": "flow", "id": f"{prefix}{n}"}) + "\n"
                   for n in range(count))


def test_emit_when_the_service_dies_in_the_middle(quiet_service: Service) -> None:
    svc = quiet_service
    count = 30_000  # three requests of 10,000: the kill lands in one, or between two
    svc.start()
    emit = subprocess.Popen(command("emit", "-"), env={**os.environ, **svc.env},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert emit.stdin is not None
        emit.stdin.write(events("ev", count))
        emit.stdin.close()
        emit.stdin = None
        # The first request was answered and the service is draining it: the next is on
        # its way or being read.
        wait_for(lambda: drained(svc), timeout=60, message=svc.log)
        svc.kill()
        out, err = emit.communicate(timeout=120)
    finally:
        if emit.poll() is None:
            emit.kill()
        svc.close()
    assert emit.returncode == 0, err
    assert "Traceback" not in err and "internal error" not in err
    assert f"queued {count} events" in out
    again = Service(svc.tmp, svc.runbooks)
    try:
        again.start()
        wait_for(lambda: sum(drained(again).values()) >= count, timeout=60, interval=0.2,
                 message=lambda: f"{sum(drained(again).values())} of {count} drained")
        assert again.stop() == 0
    finally:
        again.close()
    seen = drained(again)
    assert set(seen) == {f"ev{n}" for n in range(count)}
    assert max(seen.values()) == 1  # none queued twice


def test_restart_takes_the_events_a_killed_service_held(quiet_service: Service) -> None:
    svc = quiet_service
    count = 2_000
    r = svc.cli("emit", "-", input=events("held", count))  # no service yet: into the queue
    assert r.returncode == 0, r.stderr
    svc.start(wait_ready=False)
    # Killed while it holds a batch taken from the queue, before it handled all of it.
    wait_for(lambda: drained(svc), timeout=30, message=svc.log)
    svc.kill()
    again = Service(svc.tmp, svc.runbooks)
    try:
        again.start()
        # Well before the lease the dead service took would run out (60 s).
        wait_for(lambda: sum(drained(again).values()) >= count, timeout=20, interval=0.1,
                 message=lambda: f"{sum(drained(again).values())} of {count} drained")
        assert again.stop() == 0
    finally:
        again.close()
        svc.close()
    assert set(drained(again)) == {f"held{n}" for n in range(count)}
