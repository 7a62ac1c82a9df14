"""Confirm steps: at the prompt (a real pseudo-terminal), waiting, answering, deadlines."""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cli import command, no_traceback, opsrun
from tests.helpers.files import audit
from tests.helpers.users import other_user, run_as, share_with_group
from tests.helpers.wait import wait_for


def runbook(tmp_path: Path, confirm_extra: str = "", name: str = "c.yaml") -> Path:
    marker = tmp_path / "deleted"
    path = tmp_path / name
    confirm_extra = confirm_extra.replace("\n", "\n" + " " * 12)
    path.write_text(textwrap.dedent(f"""\
        params:
          target: {{default: "/srv/old data"}}
        steps:
          - id: ask
            confirm: Delete ${{{{ params.target }}}}?
            {confirm_extra}
          - id: delete
            run: echo deleting ${{{{ params.target }}}} && touch {marker}
          - id: ask_again
            confirm: Also the backups?
            timeout: 5s
            on_timeout: approve
        on_denied:
          - run: echo "not approved at ${{{{ run.failed_step }}}}"
        """))
    return path


# ── at the prompt ───────────────────────────────────────────────────────────

class Terminal:
    """opsrun attached to a real pseudo-terminal."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(command(*args), stdin=slave, stdout=slave, stderr=slave,
                                     env={**os.environ, **env}, start_new_session=True)
        os.close(slave)
        self.text = ""

    def read_until(self, needle: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            left = deadline - time.monotonic()
            assert left > 0, f"{needle!r} never appeared in:\n{self.text}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:
                    data = b""
                if not data:
                    assert needle in self.text, f"{needle!r} not in:\n{self.text}"
                self.text += data.decode(errors="replace")
        return self.text

    def send(self, data: str) -> None:
        os.write(self.master, data.encode())

    def finish(self, timeout: float = 30) -> int:
        end = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < end:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.text += os.read(self.master, 4096).decode(errors="replace")
                except OSError:
                    break
        code = self.proc.wait(timeout=max(0.1, end - time.monotonic()))
        os.close(self.master)
        return code


@pytest.mark.parametrize("typed, approved", [("y\r", True), ("yes\r", True), ("n\r", False),
                                             ("\r", False), ("maybe\r", False),
                                             ("\x04", False)])
def test_prompt(tmp_path: Path, env: dict[str, str], state: Path, typed: str,
                approved: bool) -> None:
    rb = runbook(tmp_path)
    t = Terminal(["run", str(rb)], {**env, "NO_COLOR": "1"})
    t.read_until("Proceed? [y/N]")
    assert "Delete /srv/old data?" in t.text
    assert "$ echo deleting '/srv/old data' && touch" in t.text  # what it guards, rendered
    assert "Also the backups?" not in t.text  # only up to the next confirm
    t.send(typed)
    if approved:
        t.read_until("Also the backups?")
        t.read_until("Proceed? [y/N]")
        t.send("y\r")
    code = t.finish()
    assert code == (0 if approved else 3), t.text
    assert (tmp_path / "deleted").exists() == approved
    answered = [r for r in audit(state) if r["kind"] == "confirm.answered"]
    assert answered[0]["approved"] is approved
    assert answered[0]["how"] == "prompt" and answered[0]["answered_by"] == "root" \
        or answered[0]["answered_uid"] == os.getuid()
    if not approved:
        assert "not approved at ask" in t.text


def test_prompt_timeout(tmp_path: Path, env: dict[str, str], state: Path) -> None:
    rb = runbook(tmp_path, "timeout: 300ms")
    t = Terminal(["run", str(rb)], env)
    t.read_until("Proceed? [y/N]")
    code = t.finish()
    assert code == 3
    rec = [r for r in audit(state) if r["kind"] == "confirm.answered"][0]
    assert rec["how"] == "timeout" and rec["approved"] is False


# ── waiting for an answer from another terminal ─────────────────────────────

_STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_strays() -> Iterator[None]:
    """A waiting `opsrun run` left by a failing test is killed, not left to wait for hours."""
    yield
    while _STARTED:
        p = _STARTED.pop()
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)


def start_waiting(rb: Path, env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    p = subprocess.Popen(command("run", str(rb), *extra), env={**os.environ, **env},
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    _STARTED.append(p)
    return p


def pending(env: dict[str, str]) -> list[dict]:
    r = opsrun("pending", "--json", env=env)
    return json.loads(r.stdout)["pending"] if r.returncode == 0 else []


def wait_pending(env: dict[str, str], step: str = "ask") -> dict:
    return wait_for(lambda: next((p for p in pending(env) if p["step_id"] == step), None),
                    timeout=20)


def test_wait_then_approve(tmp_path: Path, env: dict[str, str], state: Path) -> None:
    rb = runbook(tmp_path, "approvers: [root, 'group:wheel']")
    p = start_waiting(rb, env)
    q = wait_pending(env)
    assert q["question"] == "Delete /srv/old data?"
    assert q["approvers"] == {"users": ["root"], "groups": ["wheel"], "not_starter": False}
    table = opsrun("pending", env=env).stdout
    assert q["run_id"] in table and "root, group:wheel" in table and "no deadline" in table
    r = opsrun("approve", q["run_id"][:10], "--comment", "ticket OPS-1", env=env)
    assert r.returncode == 0 and "approved by root" in r.stdout
    q2 = wait_pending(env, "ask_again")
    assert opsrun("approve", q2["run_id"], env=env).returncode == 0
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert f"opsrun approve {q['run_id']} --step ask" in err  # it told us how to answer
    rec = [r for r in audit(state) if r["kind"] == "confirm.answered"][0]
    assert (rec["approved"], rec["how"], rec["comment"], rec["answered_uid"]) == \
        (True, "command", "ticket OPS-1", os.getuid())
    assert "confirm.asked" in [r["kind"] for r in audit(state)]


def test_wait_then_deny(tmp_path: Path, env: dict[str, str], state: Path) -> None:
    rb = runbook(tmp_path)
    p = start_waiting(rb, env, "--json")
    q = wait_pending(env)
    assert opsrun("deny", q["run_id"], "-m", "not today", env=env).returncode == 0
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 3
    doc = json.loads(out)
    assert doc["run"]["state"] == "denied"
    assert doc["steps"][0]["answer"]["comment"] == "not today"
    assert doc["steps"][1]["stdout"] == "not approved at ask\n"  # on_denied ran
    assert not (tmp_path / "deleted").exists()


@pytest.mark.parametrize("on_timeout, code, state_name", [("deny", 3, "timed_out"),
                                                          ("approve", 0, "succeeded")])
def test_wait_timeout(tmp_path: Path, env: dict[str, str], on_timeout: str, code: int,
                      state_name: str) -> None:
    rb = runbook(tmp_path, f"timeout: 500ms\non_timeout: {on_timeout}")
    p = start_waiting(rb, env, "--json")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == code
    assert json.loads(out)["run"]["state"] == state_name


def test_waiting_survives_restart_and_resume(tmp_path: Path, env: dict[str, str],
                                             state: Path) -> None:
    rb = runbook(tmp_path)
    p = start_waiting(rb, env)
    q = wait_pending(env)
    p.send_signal(signal.SIGKILL)
    p.wait()
    runs = json.loads(opsrun("runs", "--json", env=env).stdout)["runs"]
    assert runs[0]["state"] == "waiting"
    assert pending(env)[0]["run_id"] == q["run_id"]  # the question is still there
    # Resume before an answer: it waits again, on the same question.
    p2 = subprocess.Popen(command("resume", q["run_id"]), env={**os.environ, **env},
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (state / "runs" / f"{q['run_id']}.sock").exists(), timeout=20)
    assert len(pending(env)) == 1
    assert opsrun("approve", q["run_id"], env=env).returncode == 0
    q2 = wait_pending(env, "ask_again")
    p2.send_signal(signal.SIGKILL)
    p2.wait()
    # Answered while nobody waits; a later resume goes straight on.
    assert opsrun("approve", q2["run_id"], env=env).returncode == 0
    r = opsrun("resume", q["run_id"], env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "deleted").exists()
    assert opsrun("audit", "verify", env=env).returncode == 0


def test_resume_refuses_a_run_someone_drives(tmp_path: Path, env: dict[str, str]) -> None:
    rb = runbook(tmp_path)
    p = start_waiting(rb, env)
    q = wait_pending(env)
    r = opsrun("resume", q["run_id"], env=env)
    assert r.returncode == 2
    assert "still being run or waited on by another opsrun process" in r.stderr
    opsrun("deny", q["run_id"], env=env)
    p.communicate(timeout=30)
    r = opsrun("resume", q["run_id"], env=env)
    assert r.returncode == 2 and "has ended (denied); only waiting or interrupted runs" in r.stderr


def test_two_answers_race(tmp_path: Path, env: dict[str, str], state: Path) -> None:
    rb = runbook(tmp_path)
    p = start_waiting(rb, env)
    q = wait_pending(env)
    results: list[subprocess.CompletedProcess[str]] = []
    threads = [threading.Thread(target=lambda verb=verb: results.append(
        opsrun(verb, q["run_id"], "--step", "ask", env=env))) for verb in ("approve", "deny")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 1], [(r.stdout, r.stderr) for r in results]
    loser = next(r for r in results if r.returncode == 1)
    assert "was already answered" in loser.stderr and no_traceback(loser)
    if p.poll() is None:
        wait_for(lambda: pending(env) or p.poll() is not None, timeout=20)
        for extra in pending(env):
            opsrun("approve", extra["run_id"], env=env)
    p.communicate(timeout=30)
    answered = [r for r in audit(state) if r["kind"] == "confirm.answered"
                and r["step_id"] == "ask"]
    assert len(answered) == 1


def test_yes_flag_is_recorded(tmp_path: Path, env: dict[str, str], state: Path) -> None:
    rb = runbook(tmp_path)
    r = opsrun("run", str(rb), "--yes", env=env)
    assert r.returncode == 0
    answers = [a for a in audit(state) if a["kind"] == "confirm.answered"]
    assert len(answers) == 2
    assert all(a["how"] == "flag" and a["approved"] and a["answered_uid"] == os.getuid()
               and "--yes given by" in a["comment"] for a in answers)


def test_answer_when_nothing_waits(tmp_path: Path, env: dict[str, str]) -> None:
    rb = tmp_path / "plain.yaml"
    rb.write_text("steps:\n  - run: 'true'\n")
    run_id = json.loads(opsrun("run", str(rb), "--json", env=env).stdout)["run"]["id"]
    r = opsrun("approve", run_id, env=env)
    assert r.returncode == 1
    assert f"run {run_id} is not waiting for an answer: it has ended (succeeded)" in r.stderr
    assert opsrun("approve", "ZZZZZZZZ", env=env).returncode == 2


# ── who may answer ──────────────────────────────────────────────────────────

def _answer_as_other(env: dict[str, str], run_id: str, verb: str) -> tuple[int, str]:
    user = other_user()
    # Everything the child needs is imported here: it may not be able to read the
    # interpreter's own files once it is the other user.
    import opsrun.cli
    import opsrun.commands.approvals
    import opsrun.commands.runs  # noqa: F401

    def answer() -> int:
        from opsrun.cli import main

        return main([verb, run_id, "--state-dir", env["OPSRUN_STATE_DIR"]])

    return run_as(user, answer)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A state folder other users can reach: pytest's own temp folders are 0700."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="opsrun-shared-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder / "state"
    shutil.rmtree(folder, ignore_errors=True)


def test_refused_answerer_keeps_run_waiting(tmp_path: Path, shared: Path) -> None:
    user = other_user()
    state = shared
    env = {"OPSRUN_STATE_DIR": str(state)}
    share_with_group(state)
    rb = runbook(tmp_path, "approvers: [root]")
    p = start_waiting(rb, env)
    q = wait_pending(env)
    code, out = _answer_as_other(env, q["run_id"], "approve")
    assert code == 1, out
    assert f"only root may answer; {user.name} is not among them" in out
    assert "the run keeps waiting" in out
    assert pending(env)[0]["run_id"] == q["run_id"]
    refused = [r for r in audit(state) if r["kind"] == "confirm.refused"]
    assert refused and refused[0]["answerer"]["uid"] == user.uid
    opsrun("deny", q["run_id"], env=env)
    p.communicate(timeout=30)


def test_not_starter(tmp_path: Path, shared: Path) -> None:
    user = other_user()
    state = shared
    env = {"OPSRUN_STATE_DIR": str(state)}
    share_with_group(state)
    rb = runbook(tmp_path, f"approvers: {{users: [root, {user.name}], not_starter: true}}")
    p = start_waiting(rb, env)
    q = wait_pending(env)
    r = opsrun("approve", q["run_id"], env=env)  # root started it
    assert r.returncode == 1
    assert "root started this run, and this step needs someone else to answer" in r.stderr
    code, out = _answer_as_other(env, q["run_id"], "approve")
    assert code == 0, out
    assert f"approved by {user.name}" in out
    q2 = wait_pending(env, "ask_again")
    opsrun("approve", q2["run_id"], env=env)
    p.communicate(timeout=30)
    assert p.returncode == 0
    rec = [r for r in audit(state) if r["kind"] == "confirm.answered"][0]
    assert rec["answered_by"] == user.name and rec["answered_uid"] == user.uid


# ── four eyes on every path ─────────────────────────────────────────────────

@pytest.mark.parametrize("approvers, why", [
    ("{users: [root, nobody], not_starter: true}",
     "root started this run, and this step needs someone else to answer"),
    ("[nobody]", "only nobody may answer; root is not among them"),
])
def test_yes_cannot_answer_for_others(tmp_path: Path, env: dict[str, str], state: Path,
                                      approvers: str, why: str) -> None:
    rb = runbook(tmp_path, f"approvers: {approvers}")
    r = opsrun("run", str(rb), "--yes", env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--yes cannot answer step 'ask'" in r.stderr and why in r.stderr
    assert "who may answer: nobody" in r.stderr or "who may answer: root, nobody" in r.stderr
    assert no_traceback(r)
    assert not (tmp_path / "deleted").exists()
    assert not (state / "audit.jsonl").exists()  # refused before anything ran


def test_resume_yes_cannot_answer_for_others(tmp_path: Path, env: dict[str, str]) -> None:
    rb = runbook(tmp_path, "approvers: [nobody]")
    p = start_waiting(rb, env)
    q = wait_pending(env)
    p.send_signal(signal.SIGKILL)  # the run is left waiting, with nobody driving it
    p.wait(timeout=30)
    r = opsrun("resume", q["run_id"], "--yes", env=env)
    assert r.returncode == 2 and "--yes cannot answer step 'ask'" in r.stderr
    assert pending(env)[0]["run_id"] == q["run_id"]  # still waits for nobody


def test_cancelled_run_closes_its_question(tmp_path: Path, env: dict[str, str],
                                          state: Path) -> None:
    rb = runbook(tmp_path)
    p = start_waiting(rb, env)
    q = wait_pending(env)
    r = opsrun("cancel", q["run_id"], env=env)
    assert r.returncode == 0, r.stderr
    p.communicate(timeout=30)
    assert p.returncode == 130
    assert pending(env) == []
    r = opsrun("approve", q["run_id"], env=env)
    assert r.returncode == 1 and no_traceback(r)
    assert "was cancelled" in r.stderr and "answers are no longer taken" in r.stderr
    kinds = [a["kind"] for a in audit(state)]
    assert "confirm.answered" not in kinds[kinds.index("confirm.asked"):]
    assert kinds[-1] == "run.finished"
    assert not (tmp_path / "deleted").exists()


def test_live_view_shows_confirm_steps(tmp_path: Path, env: dict[str, str]) -> None:
    """The colour view's summary lists confirm steps too, and a deadline's answer reads as
    one (not `approved by (timeout) (timeout)`)."""
    rb = tmp_path / "t.yaml"
    rb.write_text(textwrap.dedent("""\
        steps:
          - id: first
            run: 'true'
          - id: go_ahead
            confirm: Go on?
            timeout: 300ms
            on_timeout: approve
          - id: last
            run: 'true'
        """))
    t = Terminal(["run", str(rb)], {**env, "NO_COLOR": "", "TERM": "xterm", "COLUMNS": "120"})
    t.read_until("Proceed? [y/N]")
    assert t.finish() == 0, t.text
    summary = t.text[t.text.rindex("outcome"):]
    assert "go_ahead" in summary and "approved: no answer in time" in summary
    assert "(timeout) (timeout)" not in t.text
