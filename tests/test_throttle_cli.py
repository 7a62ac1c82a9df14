"""`throttle:` through the real CLI: `opsrun watch` with `opsrun emit`, a restart inside a
once_after window, the one-shot `opsrun dispatch`, `opsrun run` (never throttled), and
`show` / `explain`."""
from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any


from tests.helpers.cli import command, opsrun
from tests.helpers.files import audit, write
from tests.helpers.service import Service
from tests.helpers.wait import wait_for

ALERTS = """\
    on: [{event: {where: {type: alert}}}]
    throttle: {once_within: 10m, key: "${{ event.alertname }}"}
    steps:
      - run: echo "paged ${{ event.alertname }} ${{ event.n }}" >> OUT
    """
LATE = """\
    on: [{event: {where: {type: late}}}]
    throttle: {once_after: WINDOW}
    steps:
      - run: echo "${{ event.n }} of ${{ event.throttled.count }}" >> OUT
    """




def kinds(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == kind]


def unix(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_watch_runs_once_within_a_window_and_records_the_rest(
        tmp_path: Path, rbdir: Path, services: list[Service]) -> None:
    out = tmp_path / "out"
    write(rbdir, "alerts.yaml", ALERTS.replace("OUT", str(out)))
    svc = Service(tmp_path, rbdir, "--log-format", "json")
    services.append(svc)
    svc.start()
    events = [{"type": "alert", "alertname": name, "n": n}
              for n, name in enumerate(["DiskFull"] * 4 + ["NodeDown"] + ["DiskFull"])]
    svc.cli("emit", "-", input="".join(json.dumps(e) + "\n" for e in events))
    wait_for(lambda: len(kinds(svc.audit(), "run.throttled")) == 4
             and len(kinds(svc.audit(), "run.finished")) == 2, timeout=20, message=svc.log)
    assert sorted(lines(out)) == ["paged DiskFull 0", "paged NodeDown 4"]
    held = kinds(svc.audit(), "run.throttled")
    assert [r["suppressed"] for r in held] == [1, 2, 3, 4]
    assert {r["throttle_key"] for r in held} == {"DiskFull"}
    first = held[0]
    assert first["runbook"]["name"] == "alerts" and first["mode"] == "once_within"
    assert first["until"].endswith("Z") and first["trigger"].startswith("alerts/event/")
    assert first["run_id"] is None and first["event_id"]
    assert json.loads(svc.cli("status", "--json").stdout)["throttle_windows"] == 2
    assert "throttles:   2 window(s) open" in svc.cli("status").stdout
    assert svc.stop() == 0
    logged = [json.loads(ln) for ln in svc.log().splitlines() if ln.startswith("{")]
    assert sum(ln["msg"] == "run throttled" for ln in logged) == 4


def late_service(tmp_path: Path, rbdir: Path, services: list[Service], window: str,
                 out: Path, *, events: int) -> Service:
    """A service with the once_after runbook LATE, and `events` events emitted to it."""
    write(rbdir, "late.yaml", LATE.replace("OUT", str(out)).replace("WINDOW", window))
    svc = Service(tmp_path, rbdir)
    services.append(svc)
    svc.start()
    svc.cli("emit", "-", input="".join(json.dumps({"type": "late", "n": n}) + "\n"
                                       for n in range(events)))
    return svc


def test_watch_runs_once_after_the_window_with_the_last_event(
        tmp_path: Path, rbdir: Path, services: list[Service]) -> None:
    out = tmp_path / "out"
    svc = late_service(tmp_path, rbdir, services, "1s", out, events=3)
    wait_for(lambda: len(kinds(svc.audit(), "run.throttled")) == 3, timeout=20,
             message=svc.log)
    assert svc.runs() == []  # nothing runs inside the window
    wait_for(lambda: lines(out), timeout=20, message=svc.log)
    assert lines(out) == ["2 of 3"]
    [queued] = kinds(svc.audit(), "run.queued")
    held = kinds(svc.audit(), "run.throttled")
    assert queued["throttled"]["count"] == 3 and queued["event_id"] == held[-1]["event_id"]
    assert queued["throttled"]["first_event_id"] == held[0]["event_id"]
    assert svc.stop() == 0


def test_a_restart_inside_a_once_after_window_still_runs_it(
        tmp_path: Path, rbdir: Path, services: list[Service]) -> None:
    out = tmp_path / "out"
    svc = late_service(tmp_path, rbdir, services, "2s", out, events=2)
    wait_for(lambda: len(kinds(svc.audit(), "run.throttled")) == 2, timeout=20)
    until = kinds(svc.audit(), "run.throttled")[0]["until"]
    svc.kill()  # no goodbye: what the window owes is only in the state folder
    again = Service(tmp_path, rbdir)
    services.append(again)
    again.start()
    wait_for(lambda: lines(out), timeout=20, message=again.log)
    assert lines(out) == ["1 of 2"]
    [queued] = kinds(again.audit(), "run.queued")
    assert queued["pid"] == again.proc.pid  # type: ignore[union-attr]
    assert queued["time"] >= until  # at the window's end, not before
    assert again.stop() == 0


def test_a_window_that_ended_while_down_runs_at_start(tmp_path: Path, rbdir: Path,
                                                     services: list[Service]) -> None:
    out = tmp_path / "out"
    write(rbdir, "late.yaml", LATE.replace("OUT", str(out)).replace("WINDOW", "1s"))
    svc = Service(tmp_path, rbdir)
    services.append(svc)
    svc.start()
    svc.cli("emit", json.dumps({"type": "late", "n": 7}))
    wait_for(lambda: kinds(svc.audit(), "run.throttled"), timeout=20)
    assert svc.stop() == 0  # a clean stop inside the window
    until = unix(kinds(svc.audit(), "run.throttled")[0]["until"])
    wait_for(lambda: time.time() > until, timeout=10)  # the window ends while down
    assert lines(out) == []
    again = Service(tmp_path, rbdir)
    services.append(again)
    again.start()
    wait_for(lambda: lines(out), timeout=20, message=again.log)
    assert lines(out) == ["7 of 1"]
    assert again.stop() == 0


def test_dispatch_keeps_windows_across_invocations(tmp_path: Path, rbdir: Path,
                                                   env: dict[str, str]) -> None:
    out = tmp_path / "out"
    write(rbdir, "alerts.yaml", ALERTS.replace("OUT", str(out)))
    event = json.dumps({"type": "alert", "alertname": "DiskFull", "n": 1}) + "\n"
    for _ in range(3):
        r = opsrun("dispatch", "--runbooks", str(rbdir), env=env, input=event)
        assert r.returncode == 0, r.stderr
    assert lines(out) == ["paged DiskFull 1"]
    held = kinds(audit(tmp_path / "state"), "run.throttled")
    assert [r["suppressed"] for r in held] == [1, 2]
    explained = opsrun("explain", "alerts", "--runbooks", str(rbdir), "--event", event,
                       env=env)
    assert explained.returncode == 1
    assert "throttled until " in explained.stdout and "'DiskFull'" in explained.stdout
    other = opsrun("explain", "alerts", "--runbooks", str(rbdir), "--json", "--event",
                   json.dumps({"type": "alert", "alertname": "NodeDown"}), env=env)
    assert other.returncode == 0
    assert json.loads(other.stdout)["throttle"] == {
        "mode": "once_within", "key": "NodeDown", "window_s": 600.0, "runs_now": True,
        "until": None, "suppressed": None}


def test_the_next_dispatch_fires_a_once_after_window_that_ended(
        tmp_path: Path, rbdir: Path, env: dict[str, str]) -> None:
    out = tmp_path / "out"
    write(rbdir, "late.yaml", LATE.replace("OUT", str(out)).replace("WINDOW", "300ms"))
    r = opsrun("dispatch", "--runbooks", str(rbdir), env=env,
               input=json.dumps({"type": "late", "n": 1}) + "\n")
    assert r.returncode == 0 and lines(out) == []  # it ended before the window did
    until = unix(kinds(audit(tmp_path / "state"), "run.throttled")[0]["until"])
    wait_for(lambda: time.time() > until, timeout=10)
    r = opsrun("dispatch", "--runbooks", str(rbdir), env=env, input="")
    assert r.returncode == 0, r.stderr
    assert lines(out) == ["1 of 1"]


def test_dispatch_fires_a_once_after_window_that_ends_while_it_reads(
        tmp_path: Path, rbdir: Path, env: dict[str, str]) -> None:
    out = tmp_path / "out"
    write(rbdir, "late.yaml", LATE.replace("OUT", str(out)).replace("WINDOW", "300ms"))
    proc = subprocess.Popen(command("dispatch", "--runbooks", str(rbdir)),
                            env={**os.environ, **env}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None
        proc.stdin.write(b'{"type": "late", "n": 1}\n{"type": "late", "n": 2}\n')
        proc.stdin.flush()
        wait_for(lambda: lines(out), timeout=20)  # stdin still open: a long pipeline
        assert lines(out) == ["2 of 2"]
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_manual_run_is_never_throttled(tmp_path: Path, rbdir: Path,
                                       env: dict[str, str]) -> None:
    out = tmp_path / "out"
    write(rbdir, "alerts.yaml", ALERTS.replace("OUT", str(out)))
    event = json.dumps({"type": "alert", "alertname": "DiskFull", "n": 1})
    for _ in range(2):
        r = opsrun("run", "alerts", "--runbooks", str(rbdir), "--event", event, env=env)
        assert r.returncode == 0, r.stderr
    assert len(lines(out)) == 2
    assert kinds(audit(tmp_path / "state"), "run.throttled") == []


def test_show_describes_the_throttle(tmp_path: Path, rbdir: Path) -> None:
    write(rbdir, "alerts.yaml", ALERTS.replace("OUT", str(tmp_path / "out")))
    text = opsrun("show", "alerts", "--runbooks", str(rbdir)).stdout
    assert "throttle: once_within 10m00s, per key ${{ event.alertname }}" in text
    data = json.loads(opsrun("show", "alerts", "--runbooks", str(rbdir), "--json").stdout)
    assert data["throttle"] == {"mode": "once_within", "window_s": 600.0,
                                "key": "${{ event.alertname }}"}


def test_the_alert_storm_example_pages_once_with_the_count(tmp_path: Path, rbdir: Path,
                                                          env: dict[str, str],
                                                          repo_root: Path) -> None:
    text = (repo_root / "runbooks" / "alert-storm.yaml").read_text()
    assert "once_after: 5m" in text
    (rbdir / "alert-storm.yaml").write_text(text.replace("once_after: 5m",
                                                         "once_after: 300ms"))
    alert = {"type": "alert", "status": "firing", "alertname": "HighLatency"}
    storm = "".join(json.dumps({**alert, "labels": {"instance": f"web-{n}"}}) + "\n"
                    for n in range(3))
    r = opsrun("dispatch", "--runbooks", str(rbdir), env=env, input=storm)
    assert r.returncode == 0 and "page:" not in r.stdout
    until = unix(kinds(audit(tmp_path / "state"), "run.throttled")[-1]["until"])
    wait_for(lambda: time.time() > until, timeout=10)
    r = opsrun("dispatch", "--runbooks", str(rbdir), env=env, input="")
    assert r.returncode == 0, r.stderr
    assert "page: HighLatency fired 3 times in 0.3s since " in r.stdout
    assert "last on web-2" in r.stdout
