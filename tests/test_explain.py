"""opsrun explain and dispatch --explain: why an event starts a runbook, or why not."""
from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.cli import no_traceback, opsrun
from tests.helpers.files import write

ALERT = """\
    on:
      - event:
          where:
            type: alert
            alerts: {contains: {labels.severity: critical, status: firing}}
            not: {env: staging}
      - log: {path: /var/log/app.log, match: 'ERROR (?P<code>E\\d+)'}
      - file: {paths: ["/srv/drop/*.csv"], events: [added]}
    steps:
      - run: 'true'
    """


def test_explain_names_the_failed_condition_and_its_value(tmp_path: Path) -> None:
    write(tmp_path / "rb", "alert.yaml", ALERT)
    event = {"type": "alert", "env": "prod",
             "alerts": [{"labels": {"severity": "warning"}, "status": "firing"}]}
    r = opsrun("explain", "alert", "-r", str(tmp_path / "rb"), "--event", json.dumps(event))
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.splitlines() == [
        "alert: no run",
        '  on[0] event: no: alerts: expected a list with an object meeting '
        '{"labels.severity": "critical", "status": "firing"}, found [{"labels": '
        '{"severity": "warning"}, "status": "firing"}]',
        "  on[1] log: no: this trigger takes log events; the event's source is json",
        "  on[2] file: no: this trigger takes file events; the event's source is json"]
    event["alerts"].append({"labels": {"severity": "critical"}, "status": "firing"})
    ok = opsrun("explain", "alert", "-r", str(tmp_path / "rb"), "--event", json.dumps(event),
                "--json")
    assert ok.returncode == 0
    doc = json.loads(ok.stdout)
    assert doc["starts"] and [t["matches"] for t in doc["triggers"]] == [True, False, False]


def test_explain_file_and_log_events_by_their_source(tmp_path: Path) -> None:
    write(tmp_path / "rb", "alert.yaml", ALERT)
    rb = str(tmp_path / "rb")
    log = opsrun("explain", "alert", "-r", rb, "--event", json.dumps(
        {"source": "log", "path": "/var/log/app.log", "line": "WARN nothing"}))
    assert "on[1] log: no: line: does not match /ERROR (?P<code>E\\d+)/" in log.stdout
    hit = opsrun("explain", "alert", "-r", rb, "--event", json.dumps(
        {"source": "file", "path": "/srv/drop/a.csv", "change": "added"}))
    assert hit.returncode == 0 and "starts a run (on[2], file)" in hit.stdout
    miss = opsrun("explain", "alert", "-r", rb, "--event", json.dumps(
        {"source": "file", "path": "/srv/other/a.csv", "change": "modified"}))
    assert ("on[2] file: no: change: expected one of added, found 'modified'; path: "
            "'/srv/other/a.csv' is not among /srv/drop/*.csv") in miss.stdout


def test_explain_bad_input_is_a_clear_usage_error(tmp_path: Path) -> None:
    write(tmp_path / "rb", "alert.yaml", ALERT)
    r = opsrun("explain", "alert", "-r", str(tmp_path / "rb"), "--event", "{oops")
    assert r.returncode == 2 and no_traceback(r)
    assert "the event from --event was rejected" in r.stderr
    r = opsrun("explain", "nope", "-r", str(tmp_path / "rb"), "--event", "{}")
    assert r.returncode == 2 and "no runbook named 'nope'" in r.stderr


def test_dispatch_explain_runs_nothing(tmp_path: Path) -> None:
    write(tmp_path / "rb", "alert.yaml", ALERT)
    write(tmp_path / "rb", "other.yaml", "on: [{event: {where: {type: deploy}}}]\n"
          f"steps: [{{run: 'touch {tmp_path}/ran'}}]\n")
    lines = '{"id": "e1", "type": "deploy"}\n{"id": "e2", "type": "alert"}\n'
    r = opsrun("dispatch", "-r", str(tmp_path / "rb"), "--explain", input=lines,
               env={"OPSRUN_STATE_DIR": str(tmp_path / "state")})
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "ran").exists() and not (tmp_path / "state").exists()
    out = r.stdout.splitlines()
    assert out[0] == "event e1:" and "  other: starts a run (on[0], event)" in out
    assert '    on[0] event: no: type: expected "alert", found "deploy"; alerts: missing' in out
    j = opsrun("dispatch", "-r", str(tmp_path / "rb"), "--explain", "--json", input=lines)
    rows = [json.loads(x) for x in j.stdout.splitlines()]
    assert [(r["event_id"], [(x["runbook"], x["starts"]) for x in r["runbooks"]])
            for r in rows] == [("e1", [("alert", False), ("other", True)]),
                               ("e2", [("alert", False), ("other", False)])]
