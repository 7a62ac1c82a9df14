"""The engine in-process: a scripted executor and confirmer, transitions collected in a list.

No process is started and nothing is written: what is tested is the engine's own logic —
order, `if:`, rendering into variables, outputs between steps, failures and on_failure,
continue_on_error, retries, timeouts, confirmations and on_denied, cancelling, resuming,
masking, and refusing to go on when a transition cannot be recorded.
"""
from __future__ import annotations

import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from opsrun import run_types as rt
from opsrun.engine import Engine, RunRequest
from opsrun.errors import StateError
from opsrun.event import Event, new_event
from opsrun.executors.base import ExecRequest
from opsrun.executors.scripted import Reply, ScriptedConfirmer, ScriptedExecutor
from opsrun.identity import Identity
from opsrun.params import resolve
from opsrun.runbook import Runbook, load_runbook_bytes

STARTER = Identity("alice", 1000)


class Recorder:
    """A listener that keeps every transition and every piece of output."""

    def __init__(self) -> None:
        self.transitions: list[tuple[str, dict[str, Any]]] = []
        self.outputs: list[tuple[str, str, str]] = []

    def transition(self, kind: str, data: dict[str, Any]) -> None:
        self.transitions.append((kind, data))

    def output(self, step_id: str, stream: str, text: str, host: str | None) -> None:
        self.outputs.append((step_id, stream, text))

    def kinds(self, *, of: str | None = None) -> list[str]:
        return [k for k, d in self.transitions if of is None or d.get("step_id") == of]

    def finished(self, step_id: str) -> list[dict[str, Any]]:
        return [d for k, d in self.transitions if k == "step.finished"
                and d["step_id"] == step_id]


def runbook(text: str) -> Runbook:
    return load_runbook_bytes(textwrap.dedent(text).encode(), Path("/nowhere/rb.yaml"))


def go(rb: Runbook, handler: Any = 0, *, event: Event | None = None,
       confirm: Any = None, secrets: dict[str, str] | None = None,
       cancel: threading.Event | None = None, listeners: list[Any] | None = None,
       **request: Any) -> tuple[rt.RunResult, Recorder, ScriptedExecutor]:
    recorder = Recorder()
    executor = ScriptedExecutor(handler if callable(handler) else (lambda r, c: handler))
    engine = Engine({"run": executor, "ssh": executor}, [*(listeners or []), recorder],
                    secrets=secrets, confirmer=None if confirm is None else
                    ScriptedConfirmer(confirm))
    req = RunRequest(rb, "RUN1", event or new_event("manual"), resolve(rb.params, {}),
                     STARTER, **request)
    return engine.run(req, cancel), recorder, executor


def by_step(replies: dict[str, Any]) -> Any:
    return lambda request, cancel: replies.get(request.step.id, 0)


def test_steps_run_in_order_and_outputs_flow_between_them() -> None:
    rb = runbook("""\
        params:
          name: {default: "Ada; rm -rf ~"}
        steps:
          - id: first
            run: echo ${{ params.name }}
          - id: second
            run: echo ${{ steps.first.outputs.greeting }} ${{ steps.first.exit_code }}
        """)
    result, rec, ex = go(rb, by_step({"first": Reply(0, "hi\n", outputs={"greeting": "hello"})}))
    assert result.state == rt.SUCCEEDED and result.exit_code == 0
    assert [r.step.id for r in ex.requests] == ["first", "second"]
    # A value is a variable the script refers to, never script text.
    first = ex.requests[0]
    assert "Ada" not in first.script and "Ada; rm -rf ~" in first.env.values()
    assert first.display == "echo 'Ada; rm -rf ~'"
    assert ex.requests[1].display == "echo hello 0"
    assert rec.kinds() == ["run.started", "run.progress", "step.started", "step.finished",
                           "run.progress", "step.started", "step.finished", "run.finished"]
    assert rec.outputs == [("first", "stdout", "hi\n")]
    assert rec.finished("first")[0]["stdout"] == "hi\n"


def test_the_event_reaches_steps_as_variables() -> None:
    rb = runbook("steps:\n  - run: 'true'\n")
    event = Event("json", {"source": "json", "id": "e1", "time": "t", "host": "web-1",
                           "n": 3, "nested": {"a": 1}})
    _, _, ex = go(rb, event=event)
    env = ex.requests[0].env
    assert env["OPSRUN_EVENT_HOST"] == "web-1" and env["OPSRUN_EVENT_N"] == "3"
    assert "OPSRUN_EVENT_NESTED" not in env and '"nested":{"a":1}' in env["OPSRUN_EVENT"]
    assert env["OPSRUN_RUN_ID"] == "RUN1" and env["OPSRUN_STEP_ID"] == "step-1"


def test_if_false_skips_and_is_reported() -> None:
    rb = runbook("""\
        params:
          loud: {type: bool, default: false}
        steps:
          - id: shout
            if: params.loud
            run: echo HI
          - id: after
            run: 'true'
        """)
    result, rec, ex = go(rb)
    assert result.state == rt.SUCCEEDED
    assert [r.step.id for r in ex.requests] == ["after"]
    assert "step.skipped" in rec.kinds(of="shout")
    assert result.steps[0].outcome == rt.SKIPPED


def test_a_failure_stops_the_run_and_on_failure_runs() -> None:
    rb = runbook("""\
        steps:
          - id: a
            run: 'false'
          - id: never
            run: 'true'
        on_failure:
          - id: report
            run: echo ${{ run.failed_step }}
        """)
    result, _, ex = go(rb, by_step({"a": 3}))
    assert (result.state, result.exit_code, result.failed_step) == (rt.FAILED, 1, "a")
    assert result.error == "step 'a' exited with 3"
    assert [r.step.id for r in ex.requests] == ["a", "report"]
    assert ex.requests[1].display == "echo a"


def test_continue_on_error_goes_on() -> None:
    rb = runbook("""\
        steps:
          - id: check
            run: 'false'
            continue_on_error: true
          - id: fix
            if: steps.check.exit_code != 0
            run: 'true'
        """)
    result, _, ex = go(rb, by_step({"check": 1}))
    assert result.state == rt.SUCCEEDED
    assert [r.step.id for r in ex.requests] == ["check", "fix"]
    assert result.steps[0].outcome == rt.FAILURE


def test_retries_until_success_with_backoff() -> None:
    rb = runbook("""\
        steps:
          - id: flaky
            run: ./flaky
            retry: {attempts: 4, delay: 10ms, backoff: 2}
        """)
    codes = iter([1, 1, 0])
    result, rec, ex = go(rb, lambda r, c: next(codes))
    assert result.state == rt.SUCCEEDED
    assert [r.attempt for r in ex.requests] == [1, 2, 3]
    assert [d["outcome"] for d in rec.finished("flaky")] == ["failure", "failure", "success"]
    assert result.steps[0].attempts == 3


def test_retries_give_up_after_the_last_attempt() -> None:
    rb = runbook("steps:\n  - id: x\n    run: 'false'\n    retry: {attempts: 2, delay: 10ms}\n")
    result, _, ex = go(rb, 7)
    assert result.state == rt.FAILED and len(ex.requests) == 2


def test_a_timed_out_step_fails_the_run_and_timeouts_reach_the_executor() -> None:
    rb = runbook("""\
        timeout: 1h
        steps:
          - id: slow
            run: sleep 100
            timeout: 5s
        """)
    result, _, ex = go(rb, Reply(None, timed_out=True))
    assert result.state == rt.FAILED and result.error == "step 'slow' timed out"
    assert result.steps[0].outcome == rt.STEP_TIMED_OUT
    assert ex.requests[0].timeout_s == 5.0


CONFIRM = """\
    steps:
      - id: ask
        confirm: Restart ${{ params.svc }}?
      - id: restart
        run: systemctl restart ${{ params.svc }}
    on_denied:
      - id: tell
        run: echo not approved
    params:
      svc: {default: web}
    """


def test_an_approval_lets_the_guarded_steps_run() -> None:
    result, rec, ex = go(runbook(CONFIRM), confirm=lambda q: True)
    assert result.state == rt.SUCCEEDED
    assert [r.step.id for r in ex.requests] == ["restart"]
    asked = dict(rec.transitions)["confirm.asked"]
    assert asked["question"] == "Restart web?"
    assert asked["guarded"] == ["systemctl restart web"]


def test_a_denial_runs_on_denied_and_ends_denied() -> None:
    result, _, ex = go(runbook(CONFIRM), confirm=lambda q: False)
    assert (result.state, result.exit_code) == (rt.DENIED, 3)
    assert [r.step.id for r in ex.requests] == ["tell"]


def test_a_deadline_answer_ends_timed_out() -> None:
    timeout = rt.Answer(False, "(timeout)", None, "timeout")
    result, _, _ = go(runbook(CONFIRM), confirm=lambda q: timeout)
    assert result.state == rt.TIMED_OUT


def test_cancelling_stops_before_the_next_step() -> None:
    cancel = threading.Event()

    def first_then_cancel(request: ExecRequest, c: threading.Event) -> int:
        cancel.set()  # as SIGTERM would, while the first step runs
        return 0

    rb = runbook("steps:\n  - id: a\n    run: 'true'\n  - id: b\n    run: 'true'\n")
    result, rec, ex = go(rb, first_then_cancel, cancel=cancel)
    # The step that was running when the cancel came is the one the run ended at.
    assert result.state == rt.CANCELLED and result.failed_step == "a"
    assert result.steps[0].outcome == rt.STEP_CANCELLED
    assert [r.step.id for r in ex.requests] == ["a"]
    assert rec.transitions[-1][1]["state"] == rt.CANCELLED


def test_secrets_are_masked_in_output_and_records() -> None:
    rb = runbook("steps:\n  - id: a\n    run: use ${{ secrets.TOKEN }}\n")
    result, rec, ex = go(rb, Reply(0, stdout="token is s3cr3t-value\n"),
                         secrets={"TOKEN": "s3cr3t-value"})
    assert result.state == rt.SUCCEEDED
    assert "s3cr3t-value" in ex.requests[0].env.values()  # the step itself gets it
    assert rec.outputs == [("a", "stdout", "token is ***\n")]
    assert "s3cr3t-value" not in repr(rec.transitions)


def test_resume_starts_at_the_step_with_the_results_before_it() -> None:
    rb = runbook("""\
        steps:
          - id: a
            run: 'true'
          - id: b
            run: echo ${{ steps.a.outputs.v }}
        """)
    prior = {"a": rt.StepResult("a", rt.SUCCESS, 0, outputs={"v": "kept"})}
    result, rec, ex = go(rb, resume_at=1, prior=prior)
    assert result.state == rt.SUCCEEDED
    assert [r.step.id for r in ex.requests] == ["b"] and ex.requests[0].display == "echo kept"
    assert dict(rec.transitions)["run.started"]["resume_at"] == 1


class _FailingAudit:
    """An audit listener whose disk is full from the second record on."""

    is_audit = True

    def __init__(self) -> None:
        self.seen = 0

    def transition(self, kind: str, data: dict[str, Any]) -> None:
        self.seen += 1
        if kind == "step.started":
            raise StateError("the audit log cannot be written")

    def output(self, step_id: str, stream: str, text: str, host: str | None) -> None:
        pass


def test_a_step_whose_start_cannot_be_recorded_does_not_run() -> None:
    rb = runbook("steps:\n  - run: 'true'\n")
    with pytest.raises(StateError):
        go(rb, listeners=[_FailingAudit()])
    recorder = Recorder()
    executor = ScriptedExecutor(lambda r, c: 0)
    engine = Engine({"run": executor}, [_FailingAudit(), recorder])
    with pytest.raises(StateError):
        engine.run(RunRequest(rb, "R", new_event("manual"), {}, STARTER))
    assert executor.requests == []  # fail closed
    assert recorder.transitions[-1][0] == "run.finished"  # the others still hear of it
    assert recorder.transitions[-1][1]["state"] == rt.FAILED


def test_retry_only_the_chosen_exit_codes_and_outcomes() -> None:
    rb = runbook("steps:\n  - id: x\n    run: ./x\n"
                 "    retry: {attempts: 3, delay: 10ms, on_exit_codes: [75]}\n")
    _, _, ex = go(rb, 1)
    assert len(ex.requests) == 1  # exit 1 is not among them
    _, _, ex = go(rb, 75)
    assert len(ex.requests) == 3
    only_timeouts = runbook("steps:\n  - id: x\n    run: ./x\n"
                            "    retry: {attempts: 3, delay: 10ms, on: [timed_out]}\n")
    _, _, ex = go(only_timeouts, 1)
    assert len(ex.requests) == 1
    _, _, ex = go(only_timeouts, Reply(None, timed_out=True))
    assert len(ex.requests) == 3


def test_retry_waits_are_capped_and_jittered() -> None:
    rb = runbook("steps:\n  - id: x\n    run: ./x\n"
                 "    retry: {attempts: 5, delay: 10ms, backoff: 3, max_delay: 50ms}\n")
    _, rec, _ = go(rb, 1)
    waits = [d["delay_s"] for k, d in rec.transitions if k == "step.retrying"]
    assert waits == [0.01, 0.03, 0.05, 0.05]
    jittered = runbook("steps:\n  - id: x\n    run: ./x\n"
                       "    retry: {attempts: 4, delay: 20ms, backoff: 2, jitter: full}\n")
    _, rec, _ = go(jittered, 1)
    waits = [d["delay_s"] for k, d in rec.transitions if k == "step.retrying"]
    assert len(waits) == 3 and all(0 <= w <= cap for w, cap in zip(waits, (0.02, 0.04, 0.08)))
