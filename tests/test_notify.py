"""Notifications: the `notify:` format, what is queued when, delivery with retries, audit.

Webhooks go to a real HTTP server on 127.0.0.1 (tests/helpers/receiver.py), commands are
real processes; runs use the real engine and executors, and the end-to-end tests go through
`opsrun watch` and `opsrun approve` as a user runs them.
"""
from __future__ import annotations

import json
import os
import signal
import textwrap
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator

import pytest

from opsrun import run_types as rt
from opsrun.approvals import give_answer
from opsrun.engine import RunRequest
from opsrun.errors import RunbookInvalid
from opsrun.event import new_event
from opsrun.identity import Identity, current
from opsrun.notify.outbox import Outbox, backoff_s
from opsrun.notify.targets import Target, load_service_file, NotifyFileInvalid
from opsrun.params import resolve
from opsrun.runbook import load_runbook_bytes
from opsrun.runs.context import RunContext, open_run_context
from tests.helpers.cli import opsrun
from tests.helpers.receiver import Receiver
from tests.helpers.service import Service
from tests.helpers.wait import wait_for

SECRET = "s3cr3t-token-value"


def rb_of(text: str, tmp: Path | None = None) -> Any:
    return load_runbook_bytes(textwrap.dedent(text).encode(),
                              (tmp or Path("/nowhere")) / "rb.yaml")


def asking(url: str, tmp: Path, target: str, confirm: str = "") -> Any:
    """A runbook that asks `Go?` (with `confirm` keys added), notifying `url` with `target`."""
    return rb_of(f"""\
        steps:
          - id: ask
            confirm: Go?{confirm}
          - run: "true"
        notify:
          - webhook: {url}
            {target}
        """, tmp)


@pytest.fixture
def rc(tmp_path: Path) -> Iterator[RunContext]:
    with open_run_context(str(tmp_path / "state"), None, {"TOKEN": SECRET}) as ctx:
        yield ctx


def start_outbox(rc: RunContext, stack: ExitStack) -> Outbox:
    outbox = Outbox(rc.store, rc.audit, rc.secrets, poll_s=0.05)
    rc.outbox = outbox.start()
    stack.callback(outbox.stop)
    return outbox


def run(rc: RunContext, rb: Any, *, park: bool = True) -> rt.RunResult:
    engine = rc.engine([], confirmer=rc.waiting_confirmer(park=park))
    run_id = rc.store.create_run(rb.name, runbook_path=str(rb.path), runbook_sha256=rb.sha256,
                                 event={}, params={}, started_by="alice", started_uid=1000,
                                 state=rt.QUEUED).id
    return engine.run(RunRequest(rb, run_id, new_event("manual"), resolve(rb.params, {}),
                                 Identity("alice", 1000)))


def audit_kinds(rc: RunContext, prefix: str = "notify.") -> list[dict[str, Any]]:
    lines = rc.audit.path.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"].startswith(prefix)]


# ── the format ──────────────────────────────────────────────────────────────

def test_targets_are_built_with_their_defaults() -> None:
    rb = rb_of("""\
        steps: [{run: "true"}]
        notify:
          - webhook: https://hooks.example.com/x/${{ secrets.TOKEN }}
            format: slack
            headers: {Authorization: "Bearer ${{ secrets.TOKEN }}"}
          - command: mail -s opsrun oncall@example.com
            on: [failed, timed_out]
            stale_after: 5m
          - command: [logger, -t, opsrun]
            on: failed
        """)
    web, mail, logger = rb.notify
    assert web.kind == "webhook" and web.format == "slack"
    assert web.events == ("waiting", "failed", "timed_out", "stale")
    assert web.describe() == "webhook to hooks.example.com (slack)"
    assert mail.argv == ("sh", "-c", "mail -s opsrun oncall@example.com")
    assert mail.events == ("failed", "timed_out") and mail.stale_after_s == 300
    assert logger.argv == ("logger", "-t", "opsrun") and logger.events == ("failed",)
    assert Target.from_record(web.as_record()) == web


@pytest.mark.parametrize("target, expected", [
    ("{webhook: https://x.example, command: [logger]}",
     "notify[0]: give `webhook:` or `command:`, not both"),
    ("{on: [failed]}", "notify[0]: a notification target needs `webhook: URL`"),
    ("{webhook: 'https://x.example/${{ run.id }}'}",
     "a notification target reads only secrets"),
    ("{webhook: ftp://x.example}", "is not an http:// or https:// URL"),
    ("{command: [logger], format: slack}", "`format` only applies to a `webhook:` target"),
    ("{command: 'echo ${{ secrets.TOKEN }}'}", "a command target takes no ${{ … }}"),
    ("{webhook: https://x.example, on: [finished]}", "is not one of waiting, failed"),
])
def test_bad_targets_are_refused_with_their_place(target: str, expected: str) -> None:
    with pytest.raises(RunbookInvalid) as e:
        rb_of(f"steps: [{{run: 'true'}}]\nnotify:\n  - {target}\n")
    assert expected in str(e.value)
    assert "rb.yaml:3:" in str(e.value)


def test_the_service_file_is_checked_with_file_line_col(tmp_path: Path) -> None:
    f = tmp_path / "notify.yaml"
    f.write_text("notify:\n  - webhook: https://x.example\n    retries: 3\n")
    with pytest.raises(NotifyFileInvalid) as e:
        load_service_file(f)
    assert str(e.value).startswith(f"{f}:3:5: error: notify[0].retries: unknown key "
                                   "'retries' in a notification target (did you mean "
                                   "'attempts'?)")
    f.write_text("notify:\n  - command: [logger, -t, opsrun]\n")
    (target,) = load_service_file(f)
    assert target.origin == "service"


def test_backoff_doubles_up_to_ten_minutes() -> None:
    t = Target("webhook", "https://x", delay_s=1.0)
    assert [backoff_s(t, n) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert backoff_s(t, 30) == 600


# ── what is queued, and delivery ───────────────────────────────────────────

def test_a_failed_run_is_sent_after_retries_and_every_attempt_is_audited(
        rc: RunContext, tmp_path: Path) -> None:
    with Receiver(codes=[500, 503]) as rx, ExitStack() as stack:
        start_outbox(rc, stack)
        rb = rb_of(f"""\
            name: breaks
            steps:
              - id: check
                run: echo "token is {SECRET}"; echo "disk is full" >&2; exit 3
            notify:
              - webhook: {rx.url}/hook?k=${{{{ secrets.TOKEN }}}}
                headers: {{X-Token: "${{{{ secrets.TOKEN }}}}"}}
                retry_delay: 20ms
            """, tmp_path)
        result = run(rc, rb)
        assert result.state == rt.FAILED
        wait_for(lambda: rx.bodies(), timeout=20, message=lambda: str(audit_kinds(rc)))
    (body,) = rx.bodies()
    assert [r["code"] for r in rx.requests] == [500, 503, 200]
    assert rx.requests[-1]["path"] == f"/hook?k={SECRET}"
    assert rx.requests[-1]["headers"]["X-Token"] == SECRET
    assert body["event"] == "failed" and body["run_id"] == result.run_id
    assert body["step"] == "check" and body["exit_code"] == 3
    assert "disk is full" in body["output"] and SECRET not in json.dumps(body)
    assert "token is ***" in body["output"]
    assert body["logs"] == f"opsrun logs {result.run_id}"
    records = audit_kinds(rc)
    assert [(r["kind"], r.get("attempt")) for r in records] == [
        ("notify.failed", 1), ("notify.failed", 2), ("notify.sent", 3)]
    assert records[0]["reason"] == "HTTP 500 Internal Server Error"
    assert records[0]["target"] == "webhook to 127.0.0.1"
    everything = rc.audit.path.read_text() + json.dumps(
        [n._asdict() for n in rc.store.notifications()], default=str)
    assert SECRET not in everything


def test_a_waiting_run_sends_the_question_and_the_approve_line_in_slack_shape(
        rc: RunContext, tmp_path: Path) -> None:
    with Receiver() as rx, ExitStack() as stack:
        start_outbox(rc, stack)
        rb = rb_of(f"""\
            name: restart
            steps:
              - id: ask
                confirm: Restart <!channel> web?
                approvers: [root, "group:ops"]
                timeout: 1h
              - id: go
                run: systemctl restart web
            notify:
              - webhook: {rx.url}
                format: slack
                on: [waiting]
            """, tmp_path)
        result = run(rc, rb)
        assert result.state == rt.WAITING
        (body,) = wait_for(lambda: rx.bodies(), timeout=20)
    assert set(body) == {"text", "blocks"}
    assert body["blocks"][0]["type"] == "header"
    assert all(b["type"] in ("header", "section", "context") for b in body["blocks"])
    texts = "\n".join(b["text"]["text"] for b in body["blocks"] if b["type"] == "section")
    assert f"opsrun approve {result.run_id}" in texts
    assert f"opsrun deny {result.run_id}" in texts
    assert "systemctl restart web" in texts
    assert "root, group:ops" in texts
    assert "&lt;!channel&gt;" in texts and "<!channel>" not in texts
    assert "*Deadline:*" in texts


def test_a_command_target_gets_the_message_on_stdin_and_fields_in_env(
        rc: RunContext, tmp_path: Path) -> None:
    out = tmp_path / "got"
    script = tmp_path / "note.sh"
    script.write_text(f'#!/bin/sh\ncat > {out}.txt\nprintf %s "$OPSRUN_NOTIFY_EVENT '
                      f'$OPSRUN_NOTIFY_RUN_ID $OPSRUN_NOTIFY_APPROVE" > {out}.env\n')
    script.chmod(0o755)
    with ExitStack() as stack:
        start_outbox(rc, stack)
        rb = rb_of(f"""\
            steps:
              - id: ask
                confirm: Go on?
              - run: "true"
            notify:
              - command: [{script}]
            """, tmp_path)
        result = run(rc, rb)
        wait_for(lambda: (tmp_path / "got.env").exists() and audit_kinds(rc), timeout=20)
    text = (tmp_path / "got.txt").read_text()
    assert "Question (step ask): Go on?" in text
    assert f"Approve:  opsrun approve {result.run_id}" in text
    assert (tmp_path / "got.env").read_text() == \
        f"waiting {result.run_id} opsrun approve {result.run_id}"
    assert audit_kinds(rc)[0]["kind"] == "notify.sent"


def test_an_unreachable_webhook_is_given_up_after_its_attempts_and_the_run_is_unaffected(
        rc: RunContext, tmp_path: Path) -> None:
    with Receiver() as rx:
        dead = rx.url  # nothing listens there once the receiver is closed
    with ExitStack() as stack:
        start_outbox(rc, stack)
        rb = rb_of(f"""\
            steps:
              - id: ok
                run: "false"
            notify:
              - webhook: {dead}
                attempts: 3
                retry_delay: 10ms
            """, tmp_path)
        result = run(rc, rb)
        assert result.state == rt.FAILED and result.failed_step == "ok"
        wait_for(lambda: any(r["kind"] == "notify.gave_up" for r in audit_kinds(rc)),
                 timeout=20)
    records = audit_kinds(rc)
    assert [r["kind"] for r in records] == ["notify.failed", "notify.failed",
                                            "notify.gave_up"]
    assert records[-1]["attempts"] == 3 and "cannot connect" in records[-1]["reason"]
    assert [n.state for n in rc.store.notifications()] == ["gave_up"]
    text = metrics_text(rc)
    assert 'opsrun_notifications{state="gave_up"} 1' in text  # what an alert rule watches
    assert 'opsrun_notifications{state="sent"} 0' in text


def metrics_text(rc: RunContext) -> str:
    from opsrun.metrics import exposition
    from opsrun.service.metrics_file import collect

    return exposition(collect(rc.store, rc.audit.path, None))


def test_a_4xx_answer_is_given_up_at_once(rc: RunContext, tmp_path: Path) -> None:
    with Receiver(default=404) as rx, ExitStack() as stack:
        start_outbox(rc, stack)
        run(rc, rb_of(f"steps: [{{run: 'false'}}]\nnotify: [{{webhook: {rx.url}}}]\n",
                      tmp_path))
        wait_for(lambda: audit_kinds(rc), timeout=20)
    assert [(r["kind"], r["attempts"]) for r in audit_kinds(rc)] == [("notify.gave_up", 1)]


def test_a_slow_webhook_does_not_hold_up_the_run(rc: RunContext, tmp_path: Path) -> None:
    with Receiver(hold=True) as rx, ExitStack() as stack:
        start_outbox(rc, stack)
        rb = asking(rx.url, tmp_path, "on: [waiting]")
        result = run(rc, rb)
        # The run parked while the webhook still holds its answer back.
        assert result.state == rt.WAITING
        wait_for(lambda: rx.held == 1, timeout=20)
        assert rc.store.notifications()[0].state == "pending"
        rx.released.set()
        wait_for(lambda: [n.state for n in rc.store.notifications()] == ["sent"], timeout=20)


def test_stale_is_sent_once_after_its_threshold(rc: RunContext, tmp_path: Path) -> None:
    with Receiver() as rx, ExitStack() as stack:
        start_outbox(rc, stack)
        rb = asking(rx.url, tmp_path, "on: [stale]\n            stale_after: 200ms")
        result = run(rc, rb)
        (body,) = wait_for(lambda: rx.bodies(), timeout=20)
        assert body["event"] == "stale" and body["run_id"] == result.run_id
        assert "has waited 200ms" in body["subject"]
        wait_for(lambda: not rc.store.notifications(state="pending"), timeout=20)
    assert [n.event for n in rc.store.notifications()] == ["stale"]
    assert len(rx.bodies()) == 1


def test_a_wait_answered_before_it_goes_stale_is_not_notified(
        rc: RunContext, tmp_path: Path) -> None:
    with Receiver() as rx, ExitStack() as stack:
        outbox = Outbox(rc.store, rc.audit, rc.secrets)  # driven by hand below
        stack.callback(outbox.stop)
        rb = asking(rx.url, tmp_path, "on: [stale]\n            stale_after: 1h")
        result = run(rc, rb)
        give_answer(rc.store, rc.audit, result.run_id, approve=True, who=current(),
                    comment=None)
        (n,) = rc.store.take_notifications(now=n_due(rc) + 1, lease_s=30)
        assert outbox.attempt(n) == "dropped"
    assert rx.requests == []
    assert [r["kind"] for r in audit_kinds(rc)] == ["notify.dropped"]


def n_due(rc: RunContext) -> float:
    return rc.store.notifications()[0].due_at


def test_a_command_that_ends_delivers_what_it_queued(tmp_path: Path) -> None:
    with Receiver() as rx:
        book = tmp_path / "breaks.yaml"
        book.write_text(f"steps: [{{run: 'exit 4'}}]\nnotify: [{{webhook: {rx.url}}}]\n")
        done = opsrun("run", str(book), env={"OPSRUN_STATE_DIR": str(tmp_path / "s")})
        assert done.returncode == 1, done.stderr
        # Delivered before the command exited: nothing is left for a service.
        (body,) = rx.bodies()
    assert body["event"] == "failed" and body["exit_code"] == 4


# ── through the service ────────────────────────────────────────────────────

WAITING_BOOK = """\
name: ask-first
on:
  - event: {where: {type: disk}}
steps:
  - id: ask
    confirm: "Clean ${{ event.path }}?"
    approvers: [%(user)s]
  - id: clean
    run: echo cleaning ${{ event.path }}
"""


def test_watch_tells_the_approver_and_the_approve_line_works(tmp_path: Path) -> None:
    books = tmp_path / "books"
    books.mkdir()
    (books / "ask.yaml").write_text(WAITING_BOOK % {"user": current().user})
    env = {"OPSRUN_STATE_DIR": str(tmp_path / "state")}
    with Receiver() as rx:
        # Service-level targets, from the notify.yaml beside the runbooks.
        (books / "notify.yaml").write_text(f"notify:\n  - webhook: {rx.url}\n"
                                           "    on: [waiting]\n")
        svc = Service(tmp_path, books).start()
        try:
            emitted = opsrun("emit", '{"type": "disk", "path": "/srv/tmp"}', env=env)
            assert emitted.returncode == 0, emitted.stderr
            (body,) = wait_for(lambda: rx.bodies(), timeout=30, message=svc.log)
            assert body["question"] == "Clean /srv/tmp?"
            assert body["commands"] == ["echo cleaning /srv/tmp"]
            approve_line = f"opsrun approve {body['run_id']}"
            assert approve_line in body["text"] and body["approve"] == approve_line
            status = wait_for(lambda: (json.loads(opsrun("status", "--json", env=env).stdout)
                                       .get("notifications", {}).get("sent") == 1), timeout=30)
            assert status
            answered = opsrun(*approve_line.split()[1:], env=env)
            assert answered.returncode == 0, answered.stderr
            shown = wait_for(lambda: _run_state(env, body["run_id"]) == "succeeded" or None,
                             timeout=30, message=svc.log)
            assert shown
        finally:
            assert svc.stop() == 0


def _run_state(env: dict[str, str], run_id: str) -> str:
    done = opsrun("runs", "--json", env=env)
    runs = json.loads(done.stdout)["runs"]
    return next((r["state"] for r in runs if r["id"] == run_id), "")


def test_the_outbox_survives_a_restart_of_the_service(tmp_path: Path) -> None:
    books = tmp_path / "books"
    books.mkdir()
    env = {"OPSRUN_STATE_DIR": str(tmp_path / "state")}
    with Receiver(default=503) as rx:
        (books / "ask.yaml").write_text(WAITING_BOOK % {"user": current().user}
                                        + f"notify:\n  - webhook: {rx.url}\n"
                                          "    on: [waiting]\n    retry_delay: 2s\n")
        svc = Service(tmp_path, books).start()
        assert opsrun("emit", '{"type": "disk", "path": "/x"}', env=env).returncode == 0
        wait_for(lambda: rx.requests, timeout=30, message=svc.log)
        assert svc.stop() == 0
        rx.default = 200
        svc = Service(tmp_path, books).start()
        try:
            (body,) = wait_for(lambda: rx.bodies(), timeout=30, message=svc.log)
            assert body["event"] == "waiting"
        finally:
            svc.stop()
    audit = [json.loads(line) for line in (tmp_path / "state" / "audit.jsonl").read_text()
             .splitlines()]
    kinds = [r["kind"] for r in audit if r["kind"].startswith("notify.")]
    assert kinds[0] == "notify.failed" and kinds[-1] == "notify.sent"


def test_watch_refuses_an_invalid_notify_file(tmp_path: Path) -> None:
    books = tmp_path / "books"
    books.mkdir()
    (books / "ask.yaml").write_text(WAITING_BOOK % {"user": "root"})
    (books / "notify.yaml").write_text("notify:\n  - webhook: nope\n")
    done = opsrun("watch", "--runbooks", str(books),
                  env={"OPSRUN_STATE_DIR": str(tmp_path / "state")}, timeout=30)
    assert done.returncode == 2
    assert f"{books / 'notify.yaml'}:2:14: error: notify[0].webhook: 'nope' is not an " \
           "http:// or https:// URL" in done.stderr
    assert "Traceback" not in done.stderr
    missing = opsrun("watch", "--runbooks", str(books), "--notify", str(tmp_path / "nope.yaml"),
                     env={"OPSRUN_STATE_DIR": str(tmp_path / "state")}, timeout=30)
    assert missing.returncode == 2
    assert f"--notify {tmp_path / 'nope.yaml'}: the file does not exist" in missing.stderr
    checked = opsrun("validate", str(books))
    assert checked.returncode == 2 and "notify.yaml:2:14" in checked.stdout + checked.stderr


def test_sigterm_is_not_held_up_by_a_slow_webhook(tmp_path: Path) -> None:
    books = tmp_path / "books"
    books.mkdir()
    env = {"OPSRUN_STATE_DIR": str(tmp_path / "state")}
    with Receiver(hold=True) as rx:
        (books / "ask.yaml").write_text(WAITING_BOOK % {"user": "root"}
                                        + f"notify:\n  - webhook: {rx.url}\n"
                                          "    timeout: 1s\n")
        svc = Service(tmp_path, books).start()
        assert opsrun("emit", '{"type": "disk", "path": "/x"}', env=env).returncode == 0
        wait_for(lambda: rx.held, timeout=30, message=svc.log)
        svc.signal(signal.SIGTERM)
        assert svc.stop() == 0
    from opsrun.store import Store

    with Store.open(tmp_path / "state") as store:
        (n,) = [n for n in store.notifications() if n.event == "waiting"]
    # The attempt ended at its timeout; the notification waits for the next start.
    assert n.state == "pending" and n.attempts == 1
    assert n.last_error == "no answer within 1s"


def test_a_confirmation_nobody_answers_in_time_is_sent_as_timed_out(
        rc: RunContext, tmp_path: Path) -> None:
    with Receiver() as rx, ExitStack() as stack:
        start_outbox(rc, stack)
        rb = asking(rx.url, tmp_path, "on: [timed_out]", "\n            timeout: 100ms")
        result = run(rc, rb, park=False)  # waits in this process, as `opsrun run` does
        assert result.state == rt.TIMED_OUT
        (body,) = wait_for(lambda: rx.bodies(), timeout=20)
    assert body["event"] == "timed_out" and body["step"] == "ask"
    assert body["error"] == "nobody answered step 'ask' in time"


def test_opsrun_run_without_a_terminal_tells_the_approver_while_it_waits(
        tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "OPSRUN_STATE_DIR": str(tmp_path / "state")}
    with Receiver() as rx:
        book = tmp_path / "ask.yaml"
        book.write_text(f"steps:\n  - id: ask\n    confirm: Go on?\n  - run: echo went\n"
                        f"notify:\n  - webhook: {rx.url}\n    on: [waiting]\n")
        p = subprocess.Popen([sys.executable, "-m", "opsrun", "run", str(book)], env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        try:
            (body,) = wait_for(lambda: rx.bodies(), timeout=30)
            answered = opsrun(*body["approve"].split()[1:], env=env)
            assert answered.returncode == 0, answered.stderr
            out, err = p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
    assert p.returncode == 0, err
    assert "went" in out


def test_a_question_answered_at_once_by_yes_notifies_nobody(tmp_path: Path) -> None:
    with Receiver() as rx:
        book = tmp_path / "ask.yaml"
        book.write_text(f"steps:\n  - id: ask\n    confirm: Go on?\n  - run: exit 5\n"
                        f"notify:\n  - webhook: {rx.url}\n")
        done = opsrun("run", "--yes", str(book), env={"OPSRUN_STATE_DIR": str(tmp_path / "s")})
        assert done.returncode == 1, done.stderr
        # Only the failure: the question was answered by the flag, nobody waited.
        assert [b["event"] for b in rx.bodies()] == ["failed"]
