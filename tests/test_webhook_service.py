"""Webhooks through `opsrun watch` started by its entry point, with real HTTP clients."""
from __future__ import annotations

import http.client
import json
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from opsrun.store import Store
from tests.helpers.files import write
from tests.helpers.service import Service
from tests.helpers.wait import wait_for
from tests.test_webhook import TOKEN, alert, alertmanager

ENV = {"OPSRUN_SECRET_AM_TOKEN": TOKEN, "OPSRUN_WEBHOOK_LISTEN": "127.0.0.1:0"}


def disk_full(rbdir: Path, out: Path, name: str = "disk-full",
              alertname: str = "DiskFull") -> None:
    write(rbdir, f"{name}.yaml", f"""\
        on:
          - webhook:
              path: /hooks/alertmanager
              token: ${{{{ secrets.AM_TOKEN }}}}
              shape: alertmanager
              where: {{labels.alertname: {alertname}, status: firing}}
        steps:
          - run: echo "{name} ${{{{ event.labels.instance }}}} ${{{{ event.id }}}}" >> {out}
        """)


def url(svc: Service) -> str:
    def found() -> str | None:
        r = svc.cli("status", "--json")
        return json.loads(r.stdout).get("webhook_url") if r.returncode == 0 else None
    return wait_for(found, timeout=20, message=svc.log)


def post(base: str, path: str, body: bytes, token: str = TOKEN) -> tuple[int, Any]:
    req = urllib.request.Request(base + path, data=body, method="POST", headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def lines(path: Path) -> list[str]:
    return sorted(path.read_text().splitlines()) if path.exists() else []


def test_alertmanager_alerts_start_the_runbooks_they_match(tmp_path: Path, rbdir: Path,
                                                           services: list[Service]) -> None:
    out = tmp_path / "out"
    disk_full(rbdir, out)
    disk_full(rbdir, out, "inodes-full", "InodesFull")
    svc = Service(tmp_path, rbdir, env=ENV)
    services.append(svc)
    svc.start()
    base = url(svc)
    assert base.startswith("http://127.0.0.1:")
    body = alertmanager(alert("f1", instance="web-1"), alert("f2", instance="web-2"),
                        {**alert("f3", instance="db-1"),
                         "labels": {"alertname": "InodesFull", "instance": "db-1"}},
                        alert("f4", "resolved", instance="web-3"))
    status, reply = post(base, "/hooks/alertmanager", body)
    assert status == 202 and reply["queued"] == 4
    expected = ["disk-full web-1 f1:firing", "disk-full web-2 f2:firing",
                "inodes-full db-1 f3:firing"]
    wait_for(lambda: lines(out) == expected, timeout=30, message=lambda: svc.log())
    # Alertmanager repeats the group: answered, not run again.
    status, reply = post(base, "/hooks/alertmanager", body)
    assert status == 202 and reply["duplicates"] == 4
    assert post(base, "/hooks/alertmanager", body, token="nope")[0] == 401
    with urllib.request.urlopen(base + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    assert "opsrun_service_up 1" in text
    assert 'opsrun_source_up{source="webhook"} 1' in text
    assert 'opsrun_webhook_requests_total{path="/hooks/alertmanager",code="202"} 2' in text
    assert svc.stop() == 0
    assert lines(out) == expected
    kinds = [r["kind"] for r in svc.audit()]
    assert kinds.count("run.finished") == 3
    assert kinds.count("webhook.refused") == 1 and kinds.count("webhook.duplicate") == 1


def test_an_event_answered_202_is_kept_when_the_service_dies_right_after(
        tmp_path: Path, rbdir: Path, services: list[Service]) -> None:
    out = tmp_path / "out"
    disk_full(rbdir, out)
    svc = Service(tmp_path, rbdir, env=ENV)
    services.append(svc)
    svc.start()
    status, reply = post(url(svc), "/hooks/alertmanager", alertmanager(alert("k1", instance="i")))
    assert status == 202
    svc.signal(signal.SIGKILL)
    assert svc.proc is not None
    svc.proc.wait(timeout=30)
    with Store.open(svc.state) as store:
        queued = [q.event["id"] for q in store.peek_events()]
        ran = [r.event["id"] for r in store.list_runs(limit=10) if r.event]
    assert queued + ran == ["k1:firing"]
    # The next service runs it (once).
    again = Service(tmp_path, rbdir, env=ENV)
    services.append(again)
    again.start()
    wait_for(lambda: lines(out) == ["disk-full i k1:firing"], timeout=30, message=again.log)


def test_webhook_triggers_come_and_go_with_reloads(tmp_path: Path, rbdir: Path,
                                                   services: list[Service]) -> None:
    out = tmp_path / "out"
    write(rbdir, "hello.yaml", """\
        steps:
          - run: echo hello
        """)
    svc = Service(tmp_path, rbdir, env=ENV)
    services.append(svc)
    svc.start()
    assert json.loads(svc.cli("status", "--json").stdout)["webhook_url"] is None
    disk_full(rbdir, out)  # the listener starts when the first webhook trigger comes
    base = url(svc)
    assert post(base, "/hooks/alertmanager", alertmanager(alert("r1", instance="i")))[0] == 202
    wait_for(lambda: lines(out) == ["disk-full i r1:firing"], timeout=30, message=svc.log)
    (rbdir / "disk-full.yaml").unlink()  # and stops when the last one goes

    def stopped() -> bool:
        return json.loads(svc.cli("status", "--json").stdout)["webhook_url"] is None
    wait_for(stopped, timeout=30, message=svc.log)
    port = int(base.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", "/hooks/alertmanager", body=b"{}")
        refused = False
    except ConnectionRefusedError:
        refused = True
    finally:
        conn.close()
    assert refused
    assert svc.stop() == 0


def test_a_missing_secret_or_a_taken_path_is_refused_with_a_message(
        tmp_path: Path, rbdir: Path, services: list[Service]) -> None:
    disk_full(rbdir, tmp_path / "out")
    svc = Service(tmp_path, rbdir, env={"OPSRUN_WEBHOOK_LISTEN": "127.0.0.1:0"})
    services.append(svc)
    svc.start(wait_ready=False)
    assert svc.proc is not None
    assert svc.proc.wait(timeout=60) == 2
    log = svc.log()
    assert "names the secret 'AM_TOKEN', which the service does not have" in log
    assert "OPSRUN_SECRET_AM_TOKEN" in log and "Traceback" not in log
    bad = Service(tmp_path, rbdir, env={**ENV, "OPSRUN_WEBHOOK_LISTEN": "localhost:99999"})
    services.append(bad)
    bad.start(wait_ready=False)
    assert bad.proc is not None and bad.proc.wait(timeout=60) == 2
    assert "--webhook-listen 'localhost:99999': give HOST:PORT" in bad.log()
    # Another runbook on the same path with another secret: refused like a taken name.
    write(rbdir, "zz-other.yaml", """\
        on:
          - webhook: {path: /hooks/alertmanager, token: OTHER_TOKEN}
        steps:
          - run: echo other
        """)
    r = svc.cli("validate", str(rbdir))
    assert r.returncode == 2
    assert "zz-other.yaml:2:21: error: the webhook path /hooks/alertmanager is already " \
           "taken by" in r.stdout + r.stderr


def test_hostile_requests_leave_the_service_up_and_its_log_short(
        tmp_path: Path, rbdir: Path, services: list[Service]) -> None:
    import socket

    out = tmp_path / "out"
    disk_full(rbdir, out)
    svc = Service(tmp_path, rbdir, env=ENV)
    services.append(svc)
    svc.start()
    base = url(svc)
    port = int(base.rsplit(":", 1)[1])
    for _ in range(20):
        for raw in (b"\x00\xff\x16\x03 garbage\r\n\r\n",
                    b"POST /hooks/alertmanager HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
                    b"POST /hooks/alertmanager HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                try:
                    sock.sendall(raw)
                    sock.recv(4096)
                except OSError:
                    pass
    status, _ = post(base, "/hooks/alertmanager", alertmanager(alert("h1", instance="i")))
    assert status == 202
    wait_for(lambda: lines(out) == ["disk-full i h1:firing"], timeout=30, message=svc.log)
    assert svc.stop() == 0
    log = svc.log()
    assert "Traceback" not in log
    assert log.count("webhook request refused") <= 4, log  # one per kind in the minute
    refused = [r for r in svc.audit() if r["kind"] == "webhook.refused"]
    assert sum(r["count"] for r in refused) == 60  # the rest are counted at the stop


def test_the_service_serves_https_with_the_tls_flags(tmp_path: Path, rbdir: Path,
                                                      services: list[Service]) -> None:
    import ssl

    from tests.test_webhook import self_signed

    out = tmp_path / "out"
    disk_full(rbdir, out)
    cert, key = self_signed(tmp_path)
    svc = Service(tmp_path, rbdir, "--webhook-tls-cert", str(cert), "--webhook-tls-key",
                  str(key), env=ENV)
    services.append(svc)
    svc.start()
    base = url(svc)
    assert base.startswith("https://127.0.0.1:")
    context = ssl.create_default_context(cafile=str(cert))
    req = urllib.request.Request(base + "/hooks/alertmanager", method="POST",
                                 data=alertmanager(alert("t1", instance="tls")),
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=30, context=context) as resp:
        assert resp.status == 202
    wait_for(lambda: lines(out) == ["disk-full tls t1:firing"], timeout=30, message=svc.log)
    assert svc.stop() == 0
    # Only one of the pair, or a key that is not one: refused at the start, with a message.
    half = Service(tmp_path, rbdir, "--webhook-tls-cert", str(cert), env=ENV)
    services.append(half)
    half.start(wait_ready=False)
    assert half.proc is not None and half.proc.wait(timeout=60) == 2
    assert "give both --webhook-tls-cert and --webhook-tls-key" in half.log()
    wrong = Service(tmp_path, rbdir, "--webhook-tls-cert", str(cert), "--webhook-tls-key",
                    str(cert), env=ENV)
    services.append(wrong)
    wrong.start(wait_ready=False)
    assert wrong.proc is not None and wrong.proc.wait(timeout=60) == 2
    assert "cannot load them" in wrong.log() and "Traceback" not in wrong.log()


def test_the_alertmanager_example_asks_before_it_cleans_and_tells_the_approvers(
        repo_root: Path, tmp_path: Path, rbdir: Path, services: list[Service]) -> None:
    from tests.helpers.receiver import Receiver

    with Receiver() as receiver:
        # The example as it is, but its Slack notifications go to the receiver here.
        text = (repo_root / "runbooks" / "alertmanager-disk-full.yaml").read_text()
        slack = "https://hooks.slack.com/services/${{ secrets.SLACK_WEBHOOK_PATH }}"
        assert slack in text
        (rbdir / "alertmanager-disk-full.yaml").write_text(
            text.replace(slack, receiver.url + "/services/${{ secrets.SLACK_WEBHOOK_PATH }}"))
        mount = tmp_path / "data"
        (mount / "big").mkdir(parents=True)
        (mount / "big" / "file").write_bytes(b"x" * 100_000)
        svc = Service(tmp_path, rbdir, env={**ENV, "OPSRUN_SECRET_SLACK_WEBHOOK_PATH": "T0/B0/x"})
        services.append(svc)
        svc.start()
        labels = {"alertname": "NodeFilesystemAlmostOutOfSpace", "instance": "db-1:9100",
                  "mountpoint": str(mount)}
        body = alertmanager({**alert("e1", instance="db-1:9100"), "labels": labels},
                            {**alert("e2"), "labels": {**labels, "alertname": "CPUHigh"}})
        status, reply = post(url(svc), "/hooks/alertmanager", body)
        assert status == 202 and reply["queued"] == 2

        def pending() -> list[dict[str, Any]]:
            r = svc.cli("pending", "--json")
            return json.loads(r.stdout).get("pending", []) if r.returncode == 0 else []
        (question,) = wait_for(pending, timeout=30, message=svc.log)
        assert f"db-1:9100: {mount} is filling up (disk full)" in question["question"]
        run_id = question["run_id"]
        # The approvers are told, in Slack's shape, with the exact line that answers.
        [told] = wait_for(receiver.bodies, timeout=30, message=svc.log)
        assert receiver.requests[0]["path"] == "/services/T0/B0/x"
        assert f"opsrun approve {run_id}" in told["text"] and "group:ops" in told["text"]
        assert told["blocks"]
        assert svc.cli("deny", run_id).returncode == 0
        wait_for(lambda: any(r["state"] == "denied" for r in svc.runs()), timeout=30,
                 message=svc.log)
        assert [r["runbook"] for r in svc.runs()] == ["alertmanager-disk-full"]  # not CPUHigh
        assert svc.stop() == 0
    steps = {r.get("step_id"): r.get("outcome") for r in svc.audit()
             if r["kind"] == "step.finished" and r.get("run_id") == run_id}
    assert steps["usage"] == "success" and "clean" not in steps  # asked; `clean` never ran
    assert [r["notify_event"] for r in svc.audit() if r["kind"] == "notify.sent"] == ["waiting"]


def test_the_metrics_file_carries_the_webhook_counters_too(
        tmp_path: Path, rbdir: Path, services: list[Service]) -> None:
    disk_full(rbdir, tmp_path / "out")
    prom = tmp_path / "opsrun.prom"
    svc = Service(tmp_path, rbdir, "--metrics-file", str(prom), "--metrics-interval", "100ms",
                  env=ENV)
    services.append(svc)
    svc.start()
    status, _ = post(url(svc), "/hooks/alertmanager", b"{}", token="wrong")
    assert status == 401
    wait_for(lambda: prom.exists() and 'opsrun_webhook_requests_total{path="/hooks/'
             'alertmanager",code="401"} 1' in prom.read_text(), timeout=20, message=svc.log)
    assert "opsrun_webhook_duplicates_total 0" in prom.read_text()
    assert svc.stop() == 0
    assert "opsrun_webhook_requests_total" not in prom.read_text()  # down: only what lasts
