"""`opsrun watch` as a real service: sources, reload, crashes, floods, systemd."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.helpers.files import write
from tests.helpers.procs import alive, processes_of
from tests.helpers.service import Service
from tests.helpers.wait import wait_for




def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_every_source_starts_runs(tmp_path: Path, rbdir: Path,
                                  services: list[Service]) -> None:
    out = tmp_path / "out"
    drop = tmp_path / "drop"
    drop.mkdir()
    log = tmp_path / "app.log"
    log.write_text("old line ERROR before start\n")
    write(rbdir, "files.yaml", f"""\
        on:
          - file: {{paths: ["{drop}/*.txt"], events: [added]}}
        steps:
          - run: echo "file ${{{{ event.change }}}} ${{{{ event.path }}}}" >> {out}
        """)
    write(rbdir, "logs.yaml", f"""\
        on:
          - log: {{path: {log}, match: 'ERROR (?P<code>E\\d+)'}}
        steps:
          - run: echo "log ${{{{ event.code }}}} line ${{{{ event.lineno }}}}" >> {out}
        """)
    write(rbdir, "tick.yaml", f"""\
        on:
          - schedule: {{cron: "* * * * * *"}}
        concurrency: {{policy: skip}}
        steps:
          - run: echo "tick" >> {out}
        """)
    write(rbdir, "events.yaml", f"""\
        on:
          - event: {{where: {{kind: ping}}}}
        steps:
          - run: echo "event ${{{{ event.n }}}}" >> {out}
        """)
    svc = Service(tmp_path, rbdir, stdin=True)
    services.append(svc)
    svc.start()
    assert any(m.startswith("STATUS=") for m in svc.messages)
    (drop / "a.txt").write_text("x")
    with log.open("a") as f:
        f.write("ok\nERROR E42 disk\n")
    assert svc.cli("emit", '{"kind": "ping", "n": "emitted"}').returncode == 0
    svc.send_stdin('{"kind": "ping", "n": "stdin"}\nnot json\n')
    wait_for(lambda: {"event emitted", "event stdin", "log E42 line 3",
                      f"file added {drop}/a.txt"} <= set(lines(out)) and "tick" in lines(out),
             timeout=30, message=lambda: "\n".join(lines(out)) + svc.log())
    assert "log E42 line 1" not in lines(out)  # from: end
    rejected = [r for r in svc.audit() if r["kind"] == "event.rejected"]
    assert rejected and rejected[0]["lineno"] == 2
    status = json.loads(svc.cli("status", "--json").stdout)
    assert status["running"] is True and set(status["sources"]) >= {"file", "log", "schedule"}
    assert svc.stop() == 0
    assert "STOPPING=1" in svc.messages
    assert svc.cli("audit", "verify").returncode == 0
    assert svc.cli("status").returncode == 1


def test_refuses_to_start_without_valid_runbooks(tmp_path: Path, rbdir: Path) -> None:
    write(rbdir, "bad.yaml", "steps:\n  - run: x\n    timout: 1s\n")
    svc = Service(tmp_path, rbdir)
    try:
        svc.start(wait_ready=False)
        assert svc.proc is not None and svc.proc.wait(timeout=30) == 2
        assert "no valid runbook" in svc.log() and "unknown key 'timout'" in svc.log()
    finally:
        svc.close()


def test_reload_valid_and_invalid_edits(tmp_path: Path, rbdir: Path,
                                        services: list[Service]) -> None:
    out = tmp_path / "out"
    rb = write(rbdir, "r.yaml", f"""\
        on: [{{event: {{where: {{kind: go}}}}}}]
        steps:
          - run: echo v1 >> {out}
        """)
    write(rbdir, "other.yaml", "steps:\n  - run: 'true'\n")
    svc = Service(tmp_path, rbdir)
    services.append(svc)
    svc.start()
    svc.cli("emit", '{"kind": "go"}')
    wait_for(lambda: lines(out) == ["v1"], timeout=20)
    # An invalid edit: logged, the last valid version stays in force.
    rb.write_text(rb.read_text().replace("steps:", "steps:\n  - run: echo bad\n    timout: 1s"))
    wait_for(lambda: "keeping the last valid version" in svc.log(), timeout=20,
             message=svc.log)
    svc.cli("emit", '{"kind": "go"}')
    wait_for(lambda: lines(out) == ["v1", "v1"], timeout=20)
    # A valid edit on disk takes over.
    rb.write_text(rb.read_text().replace("echo v1", "echo v2").replace(
        "  - run: echo bad\n    timout: 1s\n", ""))
    wait_for(lambda: svc.log().count("runbooks reloaded") >= 2, timeout=20, message=svc.log)
    svc.cli("emit", '{"kind": "go"}')
    wait_for(lambda: lines(out)[-1:] == ["v2"], timeout=20, message=svc.log)
    # SIGHUP reloads too; a removed runbook stops triggering.
    rb.unlink()
    svc.signal(signal.SIGHUP)
    wait_for(lambda: svc.log().count("runbooks reloaded") >= 3, timeout=20, message=svc.log)
    before = len(lines(out))
    svc.cli("emit", '{"kind": "go"}')
    svc.cli("emit", '{"kind": "other"}')
    wait_for(lambda: svc.cli("status", "--json").returncode == 0 and json.loads(
        svc.cli("status", "--json").stdout)["event_queue"] == 0, timeout=20)
    assert len(lines(out)) == before
    kinds = [r["kind"] for r in svc.audit()]
    assert "runbook.invalid" in kinds and "daemon.reloaded" in kinds
    assert svc.stop() == 0


def test_running_run_finishes_with_its_version(tmp_path: Path, rbdir: Path,
                                               services: list[Service]) -> None:
    out, gate = tmp_path / "out", tmp_path / "gate"
    rb = write(rbdir, "r.yaml", f"""\
        on: [{{event: {{where: {{kind: go}}}}}}]
        steps:
          - run: touch {tmp_path}/started; while [ ! -e {gate} ]; do sleep 0.05; done
          - run: echo first-version >> {out}
        """)
    svc = Service(tmp_path, rbdir)
    services.append(svc)
    svc.start()
    svc.cli("emit", '{"kind": "go"}')
    wait_for((tmp_path / "started").exists, timeout=20)
    rb.write_text(rb.read_text().replace("first-version", "second-version"))
    wait_for(lambda: "runbooks reloaded" in svc.log(), timeout=20)
    gate.touch()
    wait_for(lambda: lines(out) == ["first-version"], timeout=20)
    assert svc.stop() == 0


def test_kill_9_and_restart(tmp_path: Path, rbdir: Path, services: list[Service]) -> None:
    out = tmp_path / "out"
    write(rbdir, "slow.yaml", f"""\
        on: [{{event: {{where: {{kind: slow}}}}}}]
        concurrency: {{policy: parallel}}
        steps:
          - run: touch {tmp_path}/slow-started; sleep 601; echo slow went on >> {out}
        """)
    write(rbdir, "ask.yaml", f"""\
        on: [{{event: {{where: {{kind: ask}}}}}}]
        steps:
          - id: ok
            confirm: go on?
          - run: echo answered >> {out}
        """)
    write(rbdir, "fast.yaml", f"""\
        on: [{{event: {{where: {{kind: fast}}}}}}]
        steps:
          - run: echo fast ${{{{ event.n }}}} >> {out}
        """)
    log = tmp_path / "app.log"
    log.write_text("")
    write(rbdir, "tail.yaml", f"""\
        on: [{{log: {{path: {log}, match: 'HIT'}}}}]
        steps:
          - run: echo tail ${{{{ event.lineno }}}} >> {out}
        """)
    svc = Service(tmp_path, rbdir)
    services.append(svc)
    svc.start()
    svc.cli("emit", '{"kind": "slow"}')
    svc.cli("emit", '{"kind": "ask"}')
    wait_for((tmp_path / "slow-started").exists, timeout=20)
    wait_for(lambda: svc.cli("pending", "--json").returncode == 0 and json.loads(
        svc.cli("pending", "--json").stdout)["pending"], timeout=20)
    with log.open("a") as f:
        f.write("HIT one\n")
    wait_for(lambda: "tail 1" in lines(out), timeout=20)
    slow_id = svc.runs(runbook="slow")[0]["id"]
    svc.kill()
    orphans = processes_of(slow_id)
    assert orphans, "the slow step should outlive a kill -9 of the service"
    # While it is down: events queue up, a log line is written.
    for n in range(3):
        assert svc.cli("emit", json.dumps({"kind": "fast", "n": n})).returncode == 0
    with log.open("a") as f:
        f.write("HIT two\n")
    waiting_id = json.loads(svc.cli("pending", "--json").stdout)["pending"][0]["run_id"]
    svc2 = Service(tmp_path, rbdir)
    services.append(svc2)
    svc2.start()
    wait_for(lambda: {"fast 0", "fast 1", "fast 2", "tail 2"} <= set(lines(out)), timeout=30,
             message=lambda: "\n".join(lines(out)) + svc2.log())
    assert lines(out).count("tail 1") == 1  # not read twice
    slow = svc2.runs(runbook="slow")
    assert [r["state"] for r in slow] == ["interrupted"]  # never re-run by itself
    assert "ended without finishing it (killed, crashed" in slow[0]["error"]
    # Its step's processes were ended (and recorded) before the run was marked interrupted.
    assert not any(alive(pid) for pid in orphans)
    kinds = [(r["kind"], r.get("run_id")) for r in svc2.audit()]
    stopped = kinds.index(("run.orphans_stopped", slow_id))
    assert stopped < kinds.index(("run.interrupted", slow_id))
    record = svc2.audit()[stopped]
    assert {p["pid"] for p in record["processes"]} >= set(orphans)
    assert any("sleep 601" in p["command"] for p in record["processes"])
    assert svc2.runs(runbook="ask")[0]["state"] == "waiting"
    assert svc2.cli("approve", waiting_id).returncode == 0
    wait_for(lambda: "answered" in lines(out), timeout=20, message=svc2.log)
    assert svc2.stop() == 0
    assert svc2.cli("audit", "verify").returncode == 0


def test_sigterm_drains_then_interrupts(tmp_path: Path, rbdir: Path,
                                        services: list[Service]) -> None:
    write(rbdir, "long.yaml", f"""\
        on: [{{event: {{where: {{kind: go}}}}}}]
        steps:
          - run: touch {tmp_path}/started; sleep 600
        """)
    svc = Service(tmp_path, rbdir, "--drain-limit", "1s")
    services.append(svc)
    svc.start()
    svc.cli("emit", '{"kind": "go"}')
    wait_for((tmp_path / "started").exists, timeout=20)
    assert svc.stop() == 0
    assert [r["state"] for r in svc.runs()] == ["interrupted"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_flood_of_emitted_events_in_order(tmp_path: Path, rbdir: Path,
                                          services: list[Service]) -> None:
    out = tmp_path / "out"
    count = int(os.environ.get("OPSRUN_FLOOD_EVENTS", "10000"))
    write(rbdir, "q.yaml", f"""\
        on: [{{event: {{where: {{kind: flood}}}}}}]
        concurrency: {{policy: queue}}
        steps:
          - run: echo ${{{{ event.n }}}} >> {out}
        """)
    svc = Service(tmp_path, rbdir, "--max-parallel", "8")
    services.append(svc)
    svc.start()
    events = "".join(json.dumps({"kind": "flood", "n": n}) + "\n" for n in range(count))
    r = svc.cli("emit", "-", input=events, timeout=300)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: len(lines(out)) >= count, timeout=900, interval=0.5,
             message=lambda: f"{len(lines(out))} of {count} ran")
    assert lines(out) == [str(n) for n in range(count)]  # all, in order, none twice
    assert svc.stop() == 0


def test_sd_notify_watchdog(tmp_path: Path, rbdir: Path, services: list[Service]) -> None:
    write(rbdir, "r.yaml", "steps:\n  - run: 'true'\n")
    svc = Service(tmp_path, rbdir, env={"WATCHDOG_USEC": "400000"})
    services.append(svc)
    svc.start()
    svc.wait_message("WATCHDOG=1", timeout=10)
    assert svc.stop() == 0
    assert svc.messages.index("READY=1") < svc.messages.index("STOPPING=1")


@pytest.mark.parametrize("user", [False, True])
def test_systemd_unit_verifies(tmp_path: Path, user: bool) -> None:
    from tests.helpers.cli import opsrun

    r = opsrun("systemd-unit", *(["--user"] if user else []))
    assert r.returncode == 0
    text = r.stdout
    for line in ("Type=notify", "StateDirectory=opsrun", "WatchdogSec=", "KillMode=mixed",
                 "TimeoutStopSec=90s"):
        assert line in text
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing; install the systemd package (.ci/run does)")
    unit = tmp_path / "opsrun.service"
    unit.write_text(text)
    done = subprocess.run([analyze, "verify", *(["--user"] if user else []), str(unit)],
                          capture_output=True, text=True)
    problems = [ln for ln in (done.stdout + done.stderr).splitlines()
                if "opsrun.service" in ln and "Failed to" not in ln or "ExecStart" in ln]
    assert done.returncode == 0 or not problems, done.stdout + done.stderr


def test_skip_and_replace_policies(tmp_path: Path, rbdir: Path,
                                   services: list[Service]) -> None:
    out = tmp_path / "out"
    for policy in ("skip", "replace"):
        write(rbdir, f"{policy}.yaml", f"""\
            on: [{{event: {{where: {{kind: {policy}}}}}}}]
            concurrency: {{key: "${{{{ event.host }}}}", policy: {policy}}}
            steps:
              - run: echo "{policy} ${{{{ event.n }}}} start" >> {out}; touch {tmp_path}/{policy}-${{{{ event.n }}}}; sleep 600
            """)
    svc = Service(tmp_path, rbdir, "--log-format", "json", "--drain-limit", "0s")
    services.append(svc)
    svc.start()
    svc.cli("emit", '{"kind": "skip", "host": "a", "n": 1}')
    wait_for((tmp_path / "skip-1").exists, timeout=20)
    svc.cli("emit", '{"kind": "skip", "host": "a", "n": 2}')  # same key: dropped
    svc.cli("emit", '{"kind": "skip", "host": "b", "n": 3}')  # another key: runs
    wait_for((tmp_path / "skip-3").exists, timeout=20)
    wait_for(lambda: any(r["kind"] == "run.skipped" for r in svc.audit()), timeout=20)
    skipped = [r for r in svc.audit() if r["kind"] == "run.skipped"]
    assert len(skipped) == 1 and skipped[0]["concurrency_key"] == "a"
    svc.cli("emit", '{"kind": "replace", "host": "a", "n": 1}')
    wait_for((tmp_path / "replace-1").exists, timeout=20)
    svc.cli("emit", '{"kind": "replace", "host": "a", "n": 2}')
    wait_for((tmp_path / "replace-2").exists, timeout=20)
    oldest = lambda: svc.runs(runbook="replace")[-1]  # noqa: E731 - runs are newest first
    wait_for(lambda: oldest()["state"] == "cancelled", timeout=20)
    assert "replaced by run" in (oldest()["error"] or "")
    assert "skip 2 start" not in lines(out)
    assert svc.stop() == 0
    log_lines = [json.loads(ln) for ln in svc.log().splitlines() if ln.startswith("{")]
    assert log_lines and {"time", "level", "msg"} <= set(log_lines[0])
    assert any(ln["msg"] == "run skipped" for ln in log_lines)


def test_max_parallel_bounds_running_runs(tmp_path: Path, rbdir: Path,
                                          services: list[Service]) -> None:
    write(rbdir, "p.yaml", f"""\
        on: [{{event: {{where: {{kind: p}}}}}}]
        concurrency: {{policy: parallel}}
        steps:
          - run: touch {tmp_path}/p-${{{{ event.n }}}}; sleep 600
        """)
    svc = Service(tmp_path, rbdir, "--max-parallel", "2", "--drain-limit", "0s")
    services.append(svc)
    svc.start()
    for n in range(4):
        svc.cli("emit", json.dumps({"kind": "p", "n": n}))
    wait_for(lambda: len(list(tmp_path.glob("p-*"))) == 2, timeout=20)
    status = json.loads(svc.cli("status", "--json").stdout)
    assert status["runs_running"] == 2 and status["runs_queued"] == 2
    assert svc.stop() == 0
    states = sorted(r["state"] for r in svc.runs())
    assert states == ["interrupted", "interrupted", "queued", "queued"]


def test_steps_reach_the_same_service(tmp_path: Path, rbdir: Path,
                                      services: list[Service]) -> None:
    """Under `watch --state-dir X`, `opsrun emit` inside a step queues to X (and its audit
    log), not to the default state folder."""
    import sys

    out = tmp_path / "out"
    state = tmp_path / "elsewhere"
    write(rbdir, "first.yaml", f"""\
        on: [{{event: {{where: {{kind: first}}}}}}]
        steps:
          - run: '"{sys.executable}" -m opsrun emit "{{\\"kind\\": \\"second\\"}}"'
        """)
    write(rbdir, "second.yaml", f"""\
        on: [{{event: {{where: {{kind: second}}}}}}]
        steps:
          - run: echo "$OPSRUN_STATE_DIR $OPSRUN_AUDIT_LOG" >> {out}
        """)
    svc = Service(tmp_path, rbdir, "--state-dir", str(state), env={"OPSRUN_STATE_DIR": ""})
    services.append(svc)
    svc.start()
    r = svc.cli("emit", '{"kind": "first"}', "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: lines(out), timeout=30, message=svc.log)
    assert lines(out) == [f"{state} {state / 'audit.jsonl'}"]
    default = Path(os.environ["XDG_STATE_HOME"]) / "opsrun"
    assert not default.exists()


def test_a_pending_retry_survives_a_kill_of_the_service(tmp_path: Path, rbdir: Path,
                                                       services: list[Service]) -> None:
    """Killed while a step waits to be tried again, the service makes that retry at its
    next start, when it is due: the run goes on instead of being called interrupted."""
    marks = tmp_path / "marks"
    write(rbdir, "flaky.yaml", f"""\
        on: [{{event: {{where: {{kind: flaky}}}}}}]
        steps:
          - id: call
            run: |
              echo "try $OPSRUN_RUN_ID" >> {marks}
              [ "$(wc -l < {marks})" -ge 2 ]
            retry: {{attempts: 3, delay: 2s}}
          - run: echo done >> {marks}
        """)
    svc = Service(tmp_path, rbdir)
    services.append(svc)
    svc.start()
    assert svc.cli("emit", '{"kind": "flaky"}').returncode == 0
    wait_for(lambda: any(r["kind"] == "step.retrying" for r in svc.audit()), timeout=20,
             message=svc.log)
    svc.kill()
    assert lines(marks) == [lines(marks)[0]]  # one try so far
    svc2 = Service(tmp_path, rbdir)
    services.append(svc2)
    svc2.start()
    wait_for(lambda: "done" in lines(marks), timeout=30, message=svc2.log)
    (run,) = svc2.runs(runbook="flaky")
    assert run["state"] == "succeeded"
    audit = svc2.audit()
    retrying = next(r for r in audit if r["kind"] == "step.retrying")
    resumed = next(r for r in audit if r["kind"] == "run.resumed")
    assert resumed["attempt"] == 2 and "a retry was due" in resumed["reason"]
    second = [r for r in audit if r["kind"] == "step.started" and r["attempt"] == 2]
    assert len(second) == 1
    from datetime import datetime, timezone

    started = datetime.fromisoformat(second[0]["time"].removesuffix("Z")).replace(
        tzinfo=timezone.utc).timestamp()
    assert started >= retrying["at"] - 0.1  # not before it was due
    assert not any(r["kind"] == "run.interrupted" for r in audit)
