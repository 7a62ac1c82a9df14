"""Flow control in-process: parallel branches, for_each, emit, uses and on_success.

A scripted executor stands in for processes, so what is tested is the engine's own logic:
what runs at the same time (shown by steps that wait for each other, with a deadline),
what stops when one part fails, what later steps can read, and what is recorded.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from opsrun import run_types as rt
from opsrun.engine import MAX_CHAIN_DEPTH, Engine, RunRequest
from opsrun.event import from_object, new_event
from opsrun.executors.base import ExecRequest
from opsrun.executors.scripted import Reply, ScriptedExecutor
from opsrun.params import resolve
from opsrun.runbook import Runbook, load_runbook
from tests.helpers.files import write
from tests.test_engine import STARTER, Recorder, go, runbook

DEADLINE_S = 10.0


def together(*names: str) -> tuple[dict[str, threading.Event], Any]:
    """A handler under which each named step waits until all of them have started."""
    started = {n: threading.Event() for n in names}

    def handler(request: ExecRequest, cancel: threading.Event) -> Reply | int:
        sid = request.step.id
        if sid in started:
            started[sid].set()
            for other in started.values():
                if not other.wait(DEADLINE_S):
                    return Reply(9, stderr="the others never started\n")
        return Reply(0, outputs={"seen": sid})
    return started, handler


def test_branches_run_at_the_same_time_and_later_steps_read_them() -> None:
    rb = runbook("""\
        steps:
          - id: checks
            parallel:
              web:
                - id: a
                  run: echo a
              db:
                - id: b
                  run: echo b
                - id: b2
                  run: echo ${{ steps.b.outputs.seen }}
          - id: after
            run: echo ${{ steps.a.outputs.seen }} ${{ steps.b2.outputs.seen }} ${{ steps.checks.branches.db.outcome }}
        """)
    _started, handler = together("a", "b")
    result, rec, executor = go(rb, handler)
    assert result.state == rt.SUCCEEDED, result.error
    after = [r for r in executor.requests if r.step.id == "after"][0]
    assert after.display == "echo a b2 success"
    started = [d for k, d in rec.transitions if k == "step.started"]
    nested = {d["step_id"]: d for d in started if d.get("parent_step") == "checks"}
    assert {d["branch"] for d in nested.values()} == {"web", "db"}
    assert {d["index"] for d in nested.values()} == {0}  # under their step
    assert len({d["sub"] for d in nested.values()}) == 3
    assert not any(k == "run.progress" and d["current_step"] != 0 for k, d in rec.transitions
                   if k == "run.progress" and d.get("step_id") in nested)


def test_fail_fast_stops_the_other_branches_and_the_run_fails() -> None:
    rb = runbook("""\
        steps:
          - id: both
            parallel:
              quick:
                - id: bad
                  run: exit 3
              slow:
                - id: waits
                  run: sleep 600
                - id: never
                  run: echo never
          - id: later
            run: echo later
        on_failure:
          - id: cleanup
            run: echo cleanup
        """)
    cancelled, waiting = threading.Event(), threading.Event()

    def handler(request: ExecRequest, cancel: threading.Event) -> Reply | int:
        if request.step.id == "bad":
            waiting.wait(DEADLINE_S)  # fail once the other branch is busy
            return 3
        if request.step.id == "waits":
            waiting.set()
            if cancel.wait(DEADLINE_S):
                cancelled.set()
                return Reply(None)
        return 0

    result, rec, executor = go(rb, handler)
    assert result.state == rt.FAILED and result.failed_step == "both"
    assert "branch 'quick' failed at step 'bad'" in (result.error or "")
    assert cancelled.is_set()
    ran = [r.step.id for r in executor.requests]
    assert "never" not in ran and "later" not in ran and "cleanup" in ran
    both = rec.finished("both")[0]
    assert both["branches"]["slow"]["outcome"] == rt.STEP_CANCELLED


def test_without_fail_fast_the_other_branches_finish() -> None:
    rb = runbook("""\
        steps:
          - id: both
            fail_fast: false
            parallel:
              quick:
                - id: bad
                  run: exit 3
              slow:
                - id: one
                  run: echo one
                - id: two
                  run: echo two
        """)
    result, rec, executor = go(rb, lambda r, c: 3 if r.step.id == "bad" else 0)
    assert result.state == rt.FAILED
    assert {r.step.id for r in executor.requests} == {"bad", "one", "two"}
    assert rec.finished("both")[0]["branches"]["slow"]["outcome"] == rt.SUCCESS


def test_cancelling_the_run_cancels_every_branch() -> None:
    rb = runbook("""\
        steps:
          - parallel:
              a: [{id: a, run: sleep 600}]
              b: [{id: b, run: sleep 600}]
        """)
    cancel = rt.Cancel()
    seen: list[str] = []
    lock = threading.Lock()

    def handler(request: ExecRequest, c: threading.Event) -> Reply | int:
        with lock:
            seen.append(request.step.id)
            if len(seen) == 2:
                cancel.cancel(rt.CANCELLED, "test")
        return Reply(None) if c.wait(DEADLINE_S) else 0

    result, _rec, _ex = go(rb, handler, cancel=cancel)
    assert result.state == rt.CANCELLED
    assert sorted(seen) == ["a", "b"]


def test_for_each_runs_items_at_most_max_parallel_at_once() -> None:
    rb = runbook("""\
        steps:
          - id: each
            for_each: ${{ event.alerts }}
            max_parallel: 2
            run: echo ${{ item.name }} ${{ item_index }}
          - id: after
            run: echo ${{ steps.each.items | length }} ${{ steps.each.items[2].outputs.seen }}
        """)
    running, most = [0], [0]
    lock = threading.Lock()
    two_in = threading.Event()

    def handler(request: ExecRequest, cancel: threading.Event) -> Reply | int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            if running[0] == 2:
                two_in.set()
        two_in.wait(DEADLINE_S)  # the first two overlap: max_parallel is reached
        with lock:
            running[0] -= 1
        return Reply(0, outputs={"seen": request.display})

    event = from_object({"alerts": [{"name": n} for n in "abcde"]})
    result, rec, executor = go(rb, handler, event=event)
    assert result.state == rt.SUCCEEDED, result.error
    assert most[0] == 2
    scripts = sorted(r.display for r in executor.requests if r.step.id.startswith("each["))
    assert scripts == [f"echo {n} {i}" for i, n in enumerate("abcde")]
    after = [r for r in executor.requests if r.step.id == "after"][0]
    assert after.display == "echo 5 'echo c 2'"


def test_for_each_on_something_else_than_a_list_fails_the_step_with_the_value() -> None:
    rb = runbook("""\
        steps:
          - id: each
            for_each: ${{ event.alerts }}
            run: echo ${{ item }}
        """)
    result, rec, executor = go(rb, 0, event=from_object({"alerts": {"a": 1}}))
    assert result.state == rt.FAILED
    assert "gave a mapping, not a list" in (result.error or "")
    assert executor.requests == []


def test_for_each_fail_fast_starts_no_more_items_and_keeps_each_result() -> None:
    rb = runbook("""\
        steps:
          - id: each
            for_each: [1, 2, 3, 4]
            fail_fast: true
            run: echo ${{ item }}
        """)
    result, rec, executor = go(rb, lambda r, c: 4 if r.display == "echo 2" else 0)
    assert result.state == rt.FAILED
    assert [r.display for r in executor.requests] == ["echo 1", "echo 2"]
    items = rec.finished("each")[0]["items"]
    assert [i["outcome"] for i in items] == ["success", "failure", "cancelled", "cancelled"]
    assert "item 1 of 4 failed" in (result.error or "")


def test_for_each_with_if_per_item_and_an_empty_list() -> None:
    rb = runbook("""\
        steps:
          - id: some
            for_each: [1, 2, 3]
            if: item != 2
            run: echo ${{ item }}
          - id: none
            for_each: []
            run: echo never
        """)
    result, _rec, executor = go(rb)
    assert result.state == rt.SUCCEEDED
    assert [r.display for r in executor.requests] == ["echo 1", "echo 3"]


class Queue:
    def __init__(self) -> None:
        self.events: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def __call__(self, data: dict[str, Any], via: dict[str, Any]) -> None:
        self.events.append((data, via))


def emitting(rb: Runbook, event: Any = None) -> tuple[rt.RunResult, Recorder, Queue]:
    queue, rec = Queue(), Recorder()
    executor = ScriptedExecutor(lambda r, c: 0)
    engine = Engine({"run": executor, "ssh": executor}, [rec], emitter=queue,
                    secrets={"token": "s3cr3t"})
    req = RunRequest(rb, "RUN1", event or new_event("manual"), resolve(rb.params, {}),
                     STARTER)
    return engine.run(req), rec, queue


def test_emit_queues_a_rendered_event_with_its_chain() -> None:
    rb = runbook("""\
        steps:
          - id: tell
            emit:
              type: disk.cleaned
              host: ${{ event.host }}
              freed: ${{ event.freed | int }}
              tags: ["a", "${{ event.host }}"]
              note: "token ${{ secrets.token }}"
        """)
    result, rec, queue = emitting(rb, from_object({"host": "web-1", "freed": "12"}))
    assert result.state == rt.SUCCEEDED, result.error
    (data, via), = queue.events
    assert data["type"] == "disk.cleaned" and data["freed"] == 12
    assert data["tags"] == ["a", "web-1"] and data["note"] == "token s3cr3t"
    assert data["emitted_by"] == {"run_id": "RUN1", "runbook": "rb", "step_id": "tell",
                                  "depth": 1}
    assert via == {"via": "emit step", "run_id": "RUN1", "step_id": "tell"}
    finished = rec.finished("tell")[0]
    assert finished["outputs"] == {"event_id": data["id"]}
    started = [d for k, d in rec.transitions if k == "step.started"][0]
    assert "s3cr3t" not in started["command"] and "web-1" in started["command"]


def test_an_event_deep_in_a_chain_is_refused_and_recorded() -> None:
    rb = runbook("""\
        steps:
          - id: again
            emit: {type: ping}
        """)
    deep = from_object({"type": "ping", "emitted_by": {"depth": MAX_CHAIN_DEPTH}})
    result, rec, queue = emitting(rb, deep)
    assert queue.events == []
    assert result.state == rt.FAILED
    assert "refused" in (result.error or "") and f"{MAX_CHAIN_DEPTH}" in (result.error or "")
    assert rec.finished("again")[0]["outcome"] == rt.FAILURE
    result, _rec, queue = emitting(rb, from_object({"emitted_by": {"depth": 3}}))
    assert queue.events[0][0]["emitted_by"]["depth"] == 4


def test_on_success_runs_only_when_every_step_succeeded() -> None:
    rb = runbook("""\
        steps:
          - id: work
            run: echo work
        on_success:
          - id: tell
            run: echo done
        on_failure:
          - id: page
            run: echo page
        """)
    result, _rec, executor = go(rb)
    assert result.state == rt.SUCCEEDED
    assert [r.step.id for r in executor.requests] == ["work", "tell"]
    result, _rec, executor = go(rb, lambda r, c: 1 if r.step.id == "work" else 0)
    assert [r.step.id for r in executor.requests] == ["work", "page"]
    # A failing on_success step is recorded and does not undo the work.
    result, rec, _ex = go(rb, lambda r, c: 1 if r.step.id == "tell" else 0)
    assert result.state == rt.SUCCEEDED
    assert rec.finished("tell")[0]["outcome"] == rt.FAILURE


def used(tmp_path: Path) -> Runbook:
    write(tmp_path, "restart.yaml", """\
        params:
          service: {type: string, required: true}
          count: {type: int, default: 1}
        steps:
          - id: stop
            run: echo stop ${{ params.service }}
          - id: start
            run: echo start ${{ params.service }} ${{ params.count }}
        on_failure:
          - id: undo
            run: echo undo
        outputs:
          pid: ${{ steps.start.outputs.seen }}
        """)
    return load_runbook(write(tmp_path, "main.yaml", """\
        steps:
          - id: fix
            uses: restart
            with:
              service: ${{ event.service }}
              count: "3"
          - id: after
            run: echo ${{ steps.fix.outputs.pid }}
        """))


def test_uses_runs_the_other_runbook_with_typed_inputs_and_returns_its_outputs(
        tmp_path: Path) -> None:
    rb = used(tmp_path)
    result, rec, executor = go(rb, lambda r, c: Reply(0, outputs={"seen": r.display}),
                               event=from_object({"service": "nginx"}))
    assert result.state == rt.SUCCEEDED, result.error
    assert [r.display for r in executor.requests] == [
        "echo stop nginx", "echo start nginx 3", "echo 'echo start nginx 3'"]
    kinds = [k for k, d in rec.transitions if d.get("child_run")]
    assert kinds[:2] == ["step.started", "run.child_started"]
    child = [d for k, d in rec.transitions if k == "run.child_started"][0]
    assert child["child_run"] == "RUN1/fix" and child["runbook"].name == "restart"
    assert child["params"] == {"service": "nginx", "count": 3}
    done = [d for k, d in rec.transitions if k == "run.child_finished"][0]
    assert done["state"] == rt.SUCCEEDED and done["outputs"] == {"pid": "echo start nginx 3"}
    inner = [d for k, d in rec.transitions if k == "step.started"
             and d.get("parent_step") == "fix"]
    assert [d["step_id"] for d in inner] == ["fix.stop", "fix.start"]
    assert [r.id for r in result.steps] == ["fix.stop", "fix.start", "fix", "after"]


def test_a_failing_used_runbook_runs_its_on_failure_and_fails_the_step(
        tmp_path: Path) -> None:
    rb = used(tmp_path)
    result, rec, executor = go(rb, lambda r, c: 5 if "start" in r.display else 0,
                               event=from_object({"service": "nginx"}))
    assert result.state == rt.FAILED and result.failed_step == "fix"
    assert "restart failed at step 'start'" in (result.error or "")
    assert [r.step.id for r in executor.requests] == ["stop", "start", "undo"]


def test_an_input_of_the_wrong_type_fails_before_anything_runs(tmp_path: Path) -> None:
    rb = used(tmp_path)
    bad = rb._replace(steps=(rb.steps[0]._replace(inputs={"service": "x",
                                                          "count": "${{ event.n }}"}),))
    result, _rec, executor = go(bad, 0, event=from_object({"n": "many"}))
    assert result.state == rt.FAILED and executor.requests == []
    assert "with: param 'count'" in (result.error or "")
