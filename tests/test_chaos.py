"""Crash safety of `opsrun watch` under SIGKILL (the driver is tests/chaos.py).

The suite runs a short chaos run with the fixed seed; OPSRUN_CHAOS_ITERATIONS=200 (or
`python tests/chaos.py`) runs the full one. Two kills that the random loop would rarely
hit are provoked on purpose: in the middle of an `opsrun emit` request, and while the
service holds a batch of queued events it has not handled yet.
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos import run_chaos
from tests.helpers.cli import command
from tests.helpers.service import Service
from tests.helpers.wait import wait_for

SEED = 11


def test_chaos_kill_9_loop() -> None:
    iterations = int(os.environ.get("OPSRUN_CHAOS_ITERATIONS", "25"))
    report = run_chaos(iterations, SEED)
    print(json.dumps(report, indent=2))
    assert report["problems"] == []
    assert report["states"].get("succeeded", 0) > iterations  # work did flow
    assert sum(report["kills"].values()) == iterations


@pytest.fixture
def skip_service(tmp_path: Path) -> Iterator[Service]:
    """A service that leaves a durable trace of every event it handles, cheaply: the first
    starts a run that stays (sleep), each later one is skipped (`run.skipped`, fsynced
    before the event leaves the queue)."""
    rb = tmp_path / "runbooks"
    rb.mkdir()
    (rb / "r.yaml").write_text(textwrap.dedent("""\
        on: [{event: {where: {kind: flow}}}]
        concurrency: {policy: skip}
        steps:
          - run: sleep 600
        """))
    svc = Service(tmp_path, rb, "--drain-limit", "0s")
    yield svc
    svc.close()


def handled(svc: Service) -> Counter[str]:
    """Event ids the service handled: skipped, or the run it started."""
    ids = Counter(r["event_id"] for r in svc.audit() if r["kind"] == "run.skipped")
    ids.update(str((r.get("event") or {}).get("id")) for r in svc.runs())
    return ids


def queued(svc: Service) -> Counter[str]:
    """Event ids in the emit queue, read from the state store file."""
    with sqlite3.connect(svc.state / "state.db") as db:
        rows = db.execute("SELECT json_extract(event, '$.id') FROM event_queue").fetchall()
    return Counter(r[0] for r in rows)


def events(prefix: str, count: int) -> str:
    return "".join(json.dumps({"kind": "flow", "id": f"{prefix}{n}"}) + "\n"
                   for n in range(count))


def skipped_any(svc: Service) -> bool:
    return any(r["kind"] == "run.skipped" for r in svc.audit())


def test_emit_when_the_service_dies_in_the_middle(skip_service: Service) -> None:
    svc = skip_service
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
        # The first request was answered and the service is handling it: the next one is
        # on its way or being read.
        wait_for(lambda: skipped_any(svc), timeout=60, message=svc.log)
        svc.kill()
        out, err = emit.communicate(timeout=120)
    finally:
        if emit.poll() is None:
            emit.kill()
    assert emit.returncode == 0, err
    assert "Traceback" not in err and "internal error" not in err
    assert f"queued {count} events" in out
    waiting, done = queued(svc), handled(svc)
    assert max(waiting.values()) == 1  # nothing queued twice
    assert set(waiting) | set(done) == {f"ev{n}" for n in range(count)}  # nothing lost


def test_restart_takes_the_events_a_killed_service_held(skip_service: Service) -> None:
    svc = skip_service
    count = 2_000
    r = svc.cli("emit", "-", input=events("held", count))  # no service yet: into the queue
    assert r.returncode == 0, r.stderr
    svc.start(wait_ready=False)
    # Killed while it holds a batch taken from the queue, before it handled all of it.
    wait_for(lambda: skipped_any(svc), timeout=30, message=svc.log)
    svc.kill()
    again = Service(svc.tmp, svc.runbooks, "--drain-limit", "0s")
    try:
        again.start()
        # Well before the lease the dead service took would run out (60 s).
        wait_for(lambda: len(handled(again)) >= count, timeout=20, interval=0.2,
                 message=lambda: f"{len(handled(again))} of {count} handled")
        assert again.stop() == 0
    finally:
        again.close()
    assert set(handled(again)) == {f"held{n}" for n in range(count)}


def test_a_run_that_ended_just_before_the_kill_keeps_its_end(tmp_path: Path) -> None:
    rb = tmp_path / "runbooks"
    rb.mkdir()
    (rb / "r.yaml").write_text(textwrap.dedent("""\
        on: [{event: {where: {kind: go}}}]
        steps:
          - run: "true"
        """))
    svc = Service(tmp_path, rb)
    try:
        svc.start()
        svc.cli("emit", '{"kind": "go"}')
        wait_for(lambda: [r["state"] for r in svc.runs()] == ["succeeded"], timeout=20)
        svc.kill()
    finally:
        svc.close()
    # The narrowest window of a kill: the audit log has the run's end, the store not yet.
    with sqlite3.connect(svc.state / "state.db") as db:
        db.execute("UPDATE runs SET state = 'running', finished_at = NULL, exit_code = NULL")
    again = Service(tmp_path, rb)
    try:
        again.start()
        assert [(r["state"], r["exit_code"]) for r in again.runs()] == [("succeeded", 0)]
        assert again.stop() == 0
    finally:
        again.close()
    assert "run.interrupted" not in [r["kind"] for r in again.audit()]
    assert again.cli("audit", "verify").returncode == 0
